"""The continuous toy LMM: the toy world in the dream backend's form (silmm/backends/dream.py).

A small LLaVA (a CLIP vision tower whose 8-pixel patches are exactly the toy world's cells, over a small
Llama) understands images and writes text; ``num_queries`` dream queries after the prompt give the feature
matrix H, which a linear projector turns into the cross-attention conditioning of a small diffusers UNet; a
diffusers AutoencoderKL turns the UNet's latents into 32x32 toy images. Everything is written in the layout
:meth:`DreamBackend.load` reads, so the SILMM stages (DropDiv sampling, KC-DPO) run it unchanged.

The latent space is designed, not learnt: one latent pixel per cell (the VAE downsamples by 8 = CELL), whose
channels are the cell's colour (RGB in [-1, 1]) and a +-1 shape one-hot; an empty cell is (0, 0, 0, -1, -1,
-1). The VAE's decoder and encoder are trained to map codes to renderings and back (phase 1), so the
diffusion model learns a distribution over near-discrete cells, and ``scaling_factor`` stays 1.

Pretraining (phase 2), one batch of each kind per step, each in the exact format the backend uses:
- generate: the prompt (a share ``caption_noise`` of scenes miss it, none by default: the discrete toy's
  noisy captions taught the decoder to miss at random whatever H said; a share ``uncond_p`` of prompts are
  emptied, which trains the unconditional branch classifier-free guidance uses) -> H -> projector -> UNet,
  predicting the clean latent (``prediction_type="sample"``) at a uniformly drawn noise level; the loss
  reaches the LLM, the queries, the projector and the UNet. Objects sit in the cells ``layout`` says: with
  "canonical" (fixed cells) a prompt decides its scene but for the colours it leaves open, so what H says is
  what the image shows; with random cells the UNet learnt to denoise without reading H (the README's
  issue #20 section has the measurements);
- answer: an image (exact renderings with slight pixel noise, so that decoded images are read alike) and
  up to four yes/no questions with exact labels from the oracle;
- questions: the questions stage's own request -> the prompt's decomposition;
- caption: an image -> its objects in reading order ("a red circle and a blue square"; "empty"), LLaVA's
  first-stage task, which teaches the vision tower and projector what each cell holds far faster than
  yes/no labels alone (without it, colour and count answers stayed near 66% after 2400 steps).
Batch ``step`` of a kind depends only on (seed, step), so a resumed pretraining equals an uninterrupted one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from silmm.backends.dream import DreamBackend, DreamHead, DreamHeadConfig
from silmm.backends.fusion import build_word_tokenizer, text_words
from silmm.config import ModelConfig, SamplingConfig, ToyConfig
from silmm.questions import question_request
from silmm.seeding import derive_seed
from silmm.toy import world

KINDS = ("generate", "answer", "questions", "caption")
IMAGE_TOKEN = "<image>"
ANSWER_SUFFIX = "Answer:"
# what the LLM sees (dream backend templates): generation, question writing, yes/no questions about an image
TEMPLATES = {"prompt_template": "<s> {prompt}", "chat_template": "<s> {prompt}",
             "question_template": f"<s> {IMAGE_TOKEN} {{question}} {ANSWER_SUFFIX}"}
LATENT_CHANNELS = 6  # r, g, b, circle, square, triangle


# ----------------------------------------------------------------------------------------- latents
def cell_code(colour: str | None, shape: str | None) -> np.ndarray:
    """The designed latent of one cell (see the module docstring)."""
    if colour is None:
        return np.array([0.0, 0.0, 0.0, -1.0, -1.0, -1.0], np.float32)
    rgb = np.array(world.COLOURS[colour], np.float32) / 127.5 - 1.0
    return np.concatenate([rgb, [1.0 if s == shape else -1.0 for s in world.SHAPES]]).astype(np.float32)


def scene_latent(scene: Sequence[world.Obj]) -> np.ndarray:
    """[LATENT_CHANNELS, GRID, GRID] for a scene."""
    out = np.repeat(cell_code(None, None)[:, None, None], world.GRID, 1).repeat(world.GRID, 2)
    for o in scene:
        out[:, o.row, o.col] = cell_code(o.colour, o.shape)
    return out


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1] (the VAE's range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ------------------------------------------------------------------------------------------- model
def build_processor(examples: Sequence[tuple[str, Sequence[str]]], question_style: str = "named"):
    """A LlavaProcessor over a word-level tokenizer of every word the toy's stages write."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    request = question_request("a red circle", examples)
    numbers = " ".join(str(i) for i in range(1, 21))
    words = text_words([request, *world.VOCAB_TEXT, world.STYLE_WORDS[question_style], numbers, "yes no empty",
                        ANSWER_SUFFIX])
    tokenizer = build_word_tokenizer(words, 0, extra_special_tokens={"image_token": IMAGE_TOKEN})
    # written text reads "is there a red circle? 2. is ...", not "circle ? 2 .": the questions stage's parser
    # splits numbered questions at "? 2."
    from tokenizers import decoders

    tokenizer.backend_tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    # the toy's 32x32 images pass unchanged (no resize or crop); CLIP's normalisation
    image_processor = CLIPImageProcessorPil(do_resize=False, do_center_crop=False, do_convert_rgb=False)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=world.CELL,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def build_models(processor, toy: ToyConfig, seed: int):
    """(LLaVA, dream head + its config, UNet, VAE, scheduler), random, deterministic from ``seed``."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    p, c = toy.pretrain, toy.continuous
    tok = processor.tokenizer
    vision = CLIPVisionConfig(hidden_size=c.vision_hidden, intermediate_size=2 * c.vision_hidden,
                              num_hidden_layers=c.vision_layers + 1, num_attention_heads=4, image_size=world.SIZE,
                              patch_size=world.CELL, projection_dim=c.vision_hidden)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=p.hidden, intermediate_size=3 * p.hidden,
                       num_hidden_layers=p.layers, num_attention_heads=p.heads, num_key_value_heads=p.heads,
                       max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_select_strategy="default", vision_feature_layer=-2,
                         projector_hidden_act="gelu", tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lmm = LlavaForConditionalGeneration(config)
        head_cfg = DreamHeadConfig(num_queries=c.num_queries, hidden_size=p.hidden,
                                   cross_attention_dim=c.cross_attention_dim, **TEMPLATES)
        head = DreamHead(head_cfg)
        nn.init.normal_(head.queries, std=0.02)
        width = c.unet_channels
        unet = UNet2DConditionModel(
            sample_size=world.GRID, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1,
            block_out_channels=(width, 2 * width), down_block_types=("CrossAttnDownBlock2D",) * 2,
            up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=c.cross_attention_dim,
            attention_head_dim=16, norm_num_groups=16)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, layers_per_block=1,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(16, 16, 32, 32), norm_num_groups=8, sample_size=world.SIZE,
                            scaling_factor=1.0, mid_block_add_attention=False)
    # the clean latent is predicted directly and clipped to the codes' range [-1, 1]; a fine end (alpha 1)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                              clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True)
    return lmm, head, head_cfg, unet, vae, scheduler


def backend_of(processor, lmm, head, head_cfg, unet, vae, scheduler, path, sampling: SamplingConfig | None = None):
    """The modules as a DreamBackend (training switches gradients back on), so pretraining composes H and
    reads images exactly as the SILMM stages will."""
    from silmm.config import Backend

    return DreamBackend(ModelConfig(backend=Backend.dream, path=str(path), device="cpu"),
                        sampling or SamplingConfig(), path, lmm, processor, head, head_cfg, unet, vae, scheduler)


# ------------------------------------------------------------------------------------------ corpus
class Corpus:
    """Endless, seeded toy-world examples in the dream backend's formats."""

    def __init__(self, processor, toy: ToyConfig, examples: Sequence[tuple[str, Sequence[str]]], style: str):
        self.processor, self.tok, self.toy, self.examples, self.style = processor, processor.tokenizer, toy, examples, style
        self.bos, self.eos, self.pad = self.tok.bos_token_id, self.tok.eos_token_id, self.tok.pad_token_id
        self.image_id = self.tok.convert_tokens_to_ids(IMAGE_TOKEN)
        self.tokens_per_image = world.GRID * world.GRID
        self._words: dict[str, list[int]] = {}

    def words(self, text: str) -> list[int]:
        if text not in self._words:
            self._words[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._words[text]

    def _prompt(self, rng: random.Random) -> world.Spec:
        return world.parse_prompt(world.compose(rng.choice(world.CATEGORIES), rng, self.toy.held_out_fraction))

    def rng(self, kind: str, seed: int, step: int) -> random.Random:
        return random.Random(derive_seed(seed, 0, step, KINDS.index(kind), "pretrain-continuous"))

    def generate(self, size: int, seed: int, step: int) -> tuple[list[str], torch.Tensor]:
        """(prompts, clean latents [B, C, GRID, GRID]); an emptied prompt's scene is a random one."""
        rng, p, c = self.rng("generate", seed, step), self.toy.pretrain, self.toy.continuous
        layout = getattr(c.layout, "value", c.layout)
        prompts, latents = [], []
        for _ in range(size):
            spec = self._prompt(rng)
            if rng.random() < c.uncond_p:
                prompts.append("")
                scene = world.random_scene(rng)
            else:
                prompts.append(spec.text())
                scene = (world.near_miss(spec, rng, layout) if rng.random() < c.caption_noise else
                         world.scene_for(spec, rng, distractors=int(rng.random() < p.distractor_p), layout=layout))
            latents.append(scene_latent(scene))
        return prompts, torch.from_numpy(np.stack(latents))

    def answer(self, size: int, seed: int, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """(processor inputs, [B, Q] positions of answer tokens (-1: none), [B, Q] labels 1 yes / 0 no). One image,
        then up to four questions each followed by its answer; the first sits where the scores stage asks."""
        rng = self.rng("answer", seed, step)
        noise_std = self.toy.continuous.answer_pixel_noise
        images, rows, where, labels = [], [], [], []
        prefix = TEMPLATES["question_template"].split("{question}")[0]
        head = [*self.words(prefix.replace(IMAGE_TOKEN, ""))]  # "<s>" then the image, expanded below
        for _ in range(size):
            spec = self._prompt(rng)
            u = rng.random()
            scene = (world.scene_for(spec, rng, distractors=int(rng.random() < 0.3)) if u < 0.35 else
                     world.near_miss(spec, rng) if u < 0.85 else world.random_scene(rng))
            image = world.render(scene)
            if noise_std:
                noise = np.random.default_rng(rng.getrandbits(63)).normal(0, noise_std, image.shape)
                image = np.clip(image + noise, 0, 255).round().astype(np.uint8)
            images.append(image)
            objects = world.parse(world.render(scene))
            asked = world.self_checks(spec, self.style) + world.self_checks(self._prompt(rng), self.style)
            rng.shuffle(asked)
            ids = [*head, *[self.image_id] * self.tokens_per_image]
            pos, lab = [], []
            for check in asked[:4]:
                ids += self.words(f"{check.question()} {ANSWER_SUFFIX}")
                pos.append(len(ids) - 1)  # the logits here answer
                yes = check.holds(objects)
                ids += self.words("yes" if yes else "no")
                lab.append(int(yes))
            rows.append(ids)
            where.append(pos)
            labels.append(lab)
        width, q = max(map(len, rows)), max(map(len, where))
        ids = torch.full((size, width), self.pad)
        mask = torch.zeros((size, width), dtype=torch.long)
        pos_t = torch.full((size, q), -1)
        lab_t = torch.full((size, q), -1)
        for i, (row, pos, lab) in enumerate(zip(rows, where, labels, strict=True)):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
            pos_t[i, :len(pos)] = torch.tensor(pos)
            lab_t[i, :len(lab)] = torch.tensor(lab)
        pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}, pos_t, lab_t

    def questions(self, size: int, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded (input_ids, attention_mask, labels): the request (as the dream backend's chat template
        frames it) -> the numbered decomposition and end of text."""
        rng = self.rng("questions", seed, step)
        rows = []
        for _ in range(size):
            prompt = self._prompt(rng).text()
            qs = world.questions(prompt, self.style)
            head = self.words(TEMPLATES["chat_template"].format(prompt=question_request(prompt, self.examples)))
            body = self.words(qs[0] + "".join(f"\n{i}. {q}" for i, q in enumerate(qs[1:], 2))) + [self.eos]
            rows.append((head + body, len(head)))
        width = max(len(r) for r, _ in rows)
        ids = torch.full((size, width), self.pad)
        mask = torch.zeros((size, width), dtype=torch.long)
        labels = torch.full((size, width), -100)
        for i, (row, start) in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
            labels[i, start:len(row)] = torch.tensor(row[start:])
        return ids, mask, labels


def caption_batch(corpus: Corpus, size: int, seed: int, step: int) -> dict[str, torch.Tensor]:
    """Processor inputs with labels: ``<s> <image>x16`` -> the scene's objects in reading order, then end of text."""
    rng = corpus.rng("caption", seed, step)
    head = [*corpus.words("<s>"), *[corpus.image_id] * corpus.tokens_per_image]
    images, rows = [], []
    for _ in range(size):
        scene = sorted(world.random_scene(rng, max_objects=8))
        images.append(world.render(scene))
        text = " and ".join(world.Phrase(o.shape, o.colour).with_article() for o in scene) or "empty"
        rows.append(head + corpus.words(text) + [corpus.eos])
    width = max(map(len, rows))
    ids = torch.full((size, width), corpus.pad)
    mask = torch.zeros((size, width), dtype=torch.long)
    labels = torch.full((size, width), -100)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        labels[i, len(head):len(row)] = torch.tensor(row[len(head):])
    pixels = corpus.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "labels": labels}


def answer_loss(lmm, inputs: dict[str, torch.Tensor], where: torch.Tensor, labels: torch.Tensor,
                yes_id: int, no_id: int) -> torch.Tensor:
    """Cross-entropy of "yes" against "no" at every asked position (the scores stage compares the two)."""
    logits = lmm(**inputs).logits
    rows, cols = (where >= 0).nonzero(as_tuple=True)
    at = logits[rows, where[rows, cols]][:, [no_id, yes_id]]
    return nn.functional.cross_entropy(at.float(), labels[rows, cols])


def diffusion_loss(backend: DreamBackend, prompts: list[str], latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x0-prediction loss of the UNet conditioned on the projected H of ``prompts`` at random noise levels."""
    cond = backend.head.project(backend._dream_forward(prompts).float())
    noise = torch.randn(latents.shape, generator=generator)
    # uniform noise levels: with canonical layouts they learnt to follow prompts faster than levels drawn
    # towards the high end (density ~ t): 0.44 against 0.28 of images meeting their prompt after 1000
    # generation-only steps without near misses, as the last steps of sampling need a sharp low-noise prediction
    steps = backend.scheduler.config.num_train_timesteps
    t = torch.randint(0, steps, (len(prompts),), generator=generator)
    noisy = backend.scheduler.add_noise(latents, noise, t)
    predicted = backend.unet(noisy, t, encoder_hidden_states=cond).sample
    return nn.functional.mse_loss(predicted, latents)


def autoencoder_loss(vae, size: int, seed: int, step: int) -> torch.Tensor:
    """Phase 1: the VAE decodes designed codes to renderings and encodes renderings to the codes."""
    rng = random.Random(derive_seed(seed, 0, step, 0, "pretrain-vae"))
    scenes = [world.random_scene(rng, max_objects=10) for _ in range(size)]
    latents = torch.from_numpy(np.stack([scene_latent(s) for s in scenes]))
    pixels = to_pixels(np.stack([world.render(s) for s in scenes]))
    decoded = vae.decode(latents).sample
    encoded = vae.encode(pixels).latent_dist.mean
    return nn.functional.mse_loss(decoded, pixels) + nn.functional.mse_loss(encoded, latents)


# ------------------------------------------------------------------------------------------ quality
@torch.no_grad()
def answer_accuracy(backend: DreamBackend, prompts: Sequence[str], style: str, seed: int, batch: int = 32) -> float:
    """Accuracy of the backend's own yes/no answers (the scores stage's path: p(yes) > p(no)) about fresh
    renderings that fit the prompts or nearly do."""
    rng = random.Random(seed)
    images, questions, truth = [], [], []
    for prompt in prompts:
        spec = world.parse_prompt(prompt)
        scene = world.scene_for(spec, rng) if rng.random() < 0.5 else world.near_miss(spec, rng)
        objects = world.parse(world.render(scene))
        cs = world.self_checks(spec, style)
        images.append(world.render(scene))
        questions.append([c.question() for c in cs])
        truth += [c.holds(objects) for c in cs]
    said = []
    for start in range(0, len(images), batch):
        for p_yes, p_no in backend.yes_no(np.stack(images[start:start + batch]), questions[start:start + batch]):
            said += (p_yes > p_no).tolist()
    return float(np.mean(np.array(said) == np.array(truth)))


@torch.no_grad()
def vae_cell_accuracy(vae, seed: int, scenes: int = 64) -> float:
    """Share of cells the VAE decodes, from their designed codes, to what world.parse reads back as the cell."""
    rng = random.Random(seed)
    batch = [world.random_scene(rng, max_objects=10) for _ in range(scenes)]
    pixels = vae.decode(torch.from_numpy(np.stack([scene_latent(s) for s in batch]))).sample
    images = ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    right = 0
    for scene, image in zip(batch, images, strict=True):
        want = {(o.row, o.col): (o.colour, o.shape) for o in scene}
        got = {(o.row, o.col): (o.colour, o.shape) for o in world.parse(image)}
        right += sum(want.get(cell) == got.get(cell) for cell in np.ndindex(world.GRID, world.GRID))
    return right / (scenes * world.GRID * world.GRID)

