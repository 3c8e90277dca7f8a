"""The SEED-LLaMA backend: LLaMA over words and 8,192 SEED image tokens, decoded by Stable unCLIP.

SEED-LLaMA (Ge et al. 2023, AILab-CVC/SEED) is a ``LlamaForCausalLM`` whose vocabulary holds, after the 32,000
words, one token per SEED code (``<img_00000>`` .. ``<img_08191>``) and the image delimiters ``<img>`` /
``</img>``. An image is 32 codes (the SEED tokenizer: EVA-CLIP ViT-g -> causal Q-Former with 32 queries -> VQ
codebook of 8,192), written between the delimiters. The codes map back to an unCLIP image embedding that
Stable Diffusion 2.1 unCLIP renders (:mod:`silmm.backends.seed_tokenizer` holds the tokenizer).

Sequences, in the released inference's format (``scripts/seed_llama_inference_8B.py``)::

    generation     <s>USER: {prompt}\\nASSISTANT:<img> z_1 .. z_32 </img>
    understanding  <s>USER: <img> z_1 .. z_32 </img>{question}\\nASSISTANT:   -> next token yes / no
    text           <s>USER: {request}\\nASSISTANT:

Sampling writes ``<img>`` itself (the released model writes it as its first answer token) and then draws the
32 codes with the head restricted to the image-token rows, so every sample decodes; one ``torch.Generator``
per sample; temperature, top-k, top-p (the release samples with top-p 0.5, temperature 1). No
classifier-free guidance: the released inference has none (``sampling.guidance_scale`` must be 1).

Decoding follows the release's ``ImageTokenizer.decode``: unCLIP with the codes' image embeddings,
``noise_level=0``, the pipeline's own guidance (``sampling.decoder_guidance_scale``, 10 in the release, against
a zero image embedding and the empty prompt) over ``sampling.decoder_steps`` steps (20 in the release). The
release draws one latent at start-up for every image; here each image's latent (and the small noise unCLIP
adds to the embedding at noise level 0) comes from a generator seeded by its own seed.

Our layout (what :meth:`SeedLlamaBackend.merge_and_save` writes back)::

    llm/         LlamaForCausalLM (config.json, safetensors) + its tokenizer with the image tokens
    tokenizer/   the SEED image tokenizer (SeedImageTokenizer.save_pretrained)
    decoder/     a diffusers StableUnCLIPImg2ImgPipeline (save_pretrained)

:func:`convert_seed_llama` turns the released directories into it; :func:`build_tiny_seed_llama_released`
writes a tiny random model in the released layout (``silmm make-tiny seed_llama`` converts it).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache

from silmm.backends.base import DIFFUSERS_WEIGHT_FILES, CheckpointError, LMMBackend, check_safetensors_weights
from silmm.backends.common import (
    ImageSamples,
    InPlaceLora,
    build_tiny_tokenizer,
    enable_gradient_checkpointing,
    image_code_logprobs,
    left_pad,
    make_generators,
    multinomial_per_sample,
    per_image,
    positions,
    randn_per_sample,
    token_logprobs,
    warp_logits,
    write_tokens,
    yes_no_token_ids,
)
from silmm.backends.lora import Master, own_values
from silmm.config import LogprobMode, ModelConfig, SamplingConfig

log = logging.getLogger(__name__)

# the released token strings (scripts/seed_llama_inference_8B.py)
BOI_TOKEN = "<img>"
EOI_TOKEN = "</img>"
IMG_TOKEN = "<img_{:05d}>"
USER, ASSISTANT, SEP = "USER:", "ASSISTANT:", "\n"
NUM_IMAGE_TOKENS = 32

LLM_DIR, TOKENIZER_DIR, DECODER_DIR = "llm", "tokenizer", "decoder"
# the released directories (AILab-CVC/SEED on the Hugging Face hub, README "Model Weights")
RELEASED_LLM, RELEASED_TOKENIZER, RELEASED_DECODER = "seed_llama_8b_sft", "seed_tokenizer", "seed_tokenizer/diffusion_model"
RELEASED_QUANTIZER = "seed_quantizer.pt"
# LoRA on LlamaForCausalLM's decoder layers (its module names have no language_model / text_model)
LORA_TARGETS = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def image_tokenizer_module():
    """silmm.backends.seed_tokenizer, imported on use (it pulls in the vision tower classes)."""
    from silmm.backends import seed_tokenizer

    return seed_tokenizer


# ------------------------------------------------------------------------------------------ checks
def check_checkpoint(path: Path) -> None:
    """Raise CheckpointError naming the first missing piece of our layout."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    for sub, what in ((LLM_DIR, "the LLaMA model and its tokenizer"), (TOKENIZER_DIR, "the SEED image tokenizer"),
                      (DECODER_DIR, "the unCLIP decoder pipeline")):
        if not (path / sub).is_dir():
            raise CheckpointError(f"{path}: no {sub}/ ({what}; see silmm.backends.seed_llama for the layout)")
    llm = path / LLM_DIR
    if not (llm / "config.json").is_file():
        raise CheckpointError(f"{llm}: no config.json")
    check_safetensors_weights(llm)
    if not (llm / "tokenizer.json").is_file() and not (llm / "tokenizer_config.json").is_file():
        raise CheckpointError(f"{llm}: no tokenizer (tokenizer.json / tokenizer_config.json)")
    if not (path / DECODER_DIR / "model_index.json").is_file():
        raise CheckpointError(f"{path / DECODER_DIR}: no model_index.json (not a diffusers pipeline directory)")
    for part in ("unet", "vae"):
        check_safetensors_weights(path / DECODER_DIR / part, DIFFUSERS_WEIGHT_FILES)


def image_token_ids(tokenizer, num_codes: int, where: Path | str) -> tuple[int, int, list[int]]:
    """(BOI id, EOI id, ids of ``<img_00000>`` .. ``<img_{num_codes-1}>``); CheckpointError naming the first
    token the tokenizer lacks."""
    vocab = tokenizer.get_vocab()
    names = [BOI_TOKEN, EOI_TOKEN] + [IMG_TOKEN.format(i) for i in range(num_codes)]
    missing = [n for n in names if n not in vocab]
    if missing:
        raise CheckpointError(f"{where}: the tokenizer lacks {len(missing)} of SEED-LLaMA's image tokens, "
                              f"first {missing[0]!r} (needs {BOI_TOKEN}, {EOI_TOKEN} and {num_codes} codes)")
    ids = [vocab[n] for n in names]
    return ids[0], ids[1], ids[2:]


# ------------------------------------------------------------------------------------------ backend
class SeedLlamaBackend(InPlaceLora, LMMBackend):
    """SEED-LLaMA as a SILMM policy (see the module docstring). LoRA goes on the LLaMA decoder layers that
    ``train.lora.target_regex`` selects (:data:`LORA_TARGETS` for the usual attention + MLP projections);
    the image tokenizer and the decoder stay frozen."""

    family = "discrete"
    logprob_chunk = 64  # image positions per head chunk in sequence_logprobs
    peft = None

    def __init__(self, model_cfg: ModelConfig, sampling: SamplingConfig,
                 logprob_mode: LogprobMode | str = LogprobMode.conditional, score_batch_size: int = 64,
                 decode_batch_size: int = 8):
        super().__init__(model_cfg, sampling)
        if sampling.guidance_scale != 1.0:
            raise ValueError(f"sampling.guidance_scale={sampling.guidance_scale}: SEED-LLaMA samples without "
                             "classifier-free guidance (its released inference has none); set it to 1")
        self.logprob_mode = LogprobMode(logprob_mode)  # conditional = cfg here: there is one distribution
        self.score_batch_size = score_batch_size
        self.decode_batch_size = decode_batch_size
        path = Path(model_cfg.path)
        check_checkpoint(path)
        self.image_tokenizer = image_tokenizer_module().SeedImageTokenizer.from_pretrained(path / TOKENIZER_DIR)
        self.image_tokenizer.to(self.device, self.dtype).eval()
        self.model = self._load_llm(path / LLM_DIR)
        self.decoder = self._load_decoder(path / DECODER_DIR)
        self._init_tokens(path / LLM_DIR)

    @classmethod
    def load(cls, model_cfg: ModelConfig, sampling: SamplingConfig, **kwargs) -> SeedLlamaBackend:
        return cls(model_cfg, sampling, **kwargs)

    def _load_llm(self, llm: Path) -> LlamaForCausalLM:
        trust = self.model_cfg.trust_remote_code
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(llm), trust_remote_code=trust)
            model = LlamaForCausalLM.from_pretrained(str(llm), dtype=self.dtype, use_safetensors=True)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            raise CheckpointError(f"{llm}: cannot load the SEED-LLaMA language model: {exc}") from exc
        model = model.to(self.device).eval()
        model.requires_grad_(False)
        return model

    def _load_decoder(self, decoder: Path):
        from diffusers import StableUnCLIPImg2ImgPipeline

        try:
            pipe = StableUnCLIPImg2ImgPipeline.from_pretrained(str(decoder), dtype=self.dtype,
                                                               use_safetensors=True)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            raise CheckpointError(f"{decoder}: cannot load the unCLIP pipeline: {exc}") from exc
        pipe = pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
        unet_embeds = pipe.unet.config.projection_class_embeddings_input_dim
        if unet_embeds is not None and unet_embeds != 2 * self.image_tokenizer.embed_dim:
            raise CheckpointError(f"{decoder / 'unet' / 'config.json'}: projection_class_embeddings_input_dim is "
                                  f"{unet_embeds}, the SEED tokenizer's embeddings need 2 x "
                                  f"{self.image_tokenizer.embed_dim} (embedding + noise level)")
        return pipe

    def _init_tokens(self, llm: Path) -> None:
        tok = self.tokenizer
        num_codes = int(self.image_tokenizer.codebook_size)
        self.boi_id, self.eoi_id, ids = image_token_ids(tok, num_codes, llm)
        if max(ids + [self.boi_id, self.eoi_id]) >= self.model.config.vocab_size:
            raise CheckpointError(f"{llm / 'config.json'}: vocab_size {self.model.config.vocab_size} is smaller "
                                  f"than the tokenizer's image token ids (up to {max(ids)})")
        self.image_ids = torch.tensor(ids, device=self.device)  # code -> vocabulary id
        lo = ids[0]  # contiguous in the release (32000 + code): the head's image rows are a view
        self._image_rows = slice(lo, lo + num_codes) if ids == list(range(lo, lo + num_codes)) else self.image_ids
        self.bos_id, self.eos_id = tok.bos_token_id, tok.eos_token_id
        # the release pads with <unk> (SeedLlamaTokenizer sets pad_token = unk_token)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.unk_token_id
        if self.bos_id is None or self.pad_id is None:
            raise CheckpointError(f"{llm}: the tokenizer has no bos token or no pad/unk token")
        banned = torch.zeros(self.model.config.vocab_size, dtype=torch.bool)
        banned[ids + [self.boi_id, self.eoi_id, self.bos_id]] = True
        self.text_bias = torch.zeros(len(banned), device=self.device).masked_fill(banned.to(self.device), float("-inf"))
        yes, no = yes_no_token_ids(tok)
        self.yes_ids = torch.tensor(yes, device=self.device)
        self.no_ids = torch.tensor(no, device=self.device)

    # ------------------------------------------------------------------------------- sequences
    @property
    def num_image_tokens(self) -> int:
        return int(self.image_tokenizer.num_queries)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat(self, text: str) -> str:
        """The released single-turn format, without the bos token: ``USER: {text}\\nASSISTANT:``."""
        return f"{USER} {text}{SEP}{ASSISTANT}"

    def generation_row(self, prompt: str) -> list[int]:
        """``<s>USER: {prompt}\\nASSISTANT:<img>``: the image codes follow."""
        return [self.bos_id, *self._ids(self.chat(prompt)), self.boi_id]

    def _lm(self):
        return self.model.model

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache=None):
        return self._lm()(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache,
                          use_cache=True)

    def _image_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the image codes only [..., K] in the model's dtype: the head's image-token rows alone.
        A head that peft wraps or a ZeRO-3 partitioned weight runs the full head, then selects."""
        head = self.model.lm_head
        weight = getattr(head, "weight", None)
        if not isinstance(head, torch.nn.Linear) or weight is None or hasattr(weight, "ds_id"):
            return head(hidden)[..., self.image_ids]
        bias = head.bias[self._image_rows] if head.bias is not None else None
        return F.linear(hidden, weight[self._image_rows], bias)

    # ------------------------------------------------------------------------------- text
    @torch.no_grad()
    def write_text(self, prompts: list[str], seeds: list[int], max_new_tokens: int,
                   temperature: float = 1.0, top_p: float = 1.0) -> list[str]:
        """Continue ``<s>USER: {prompt}\\nASSISTANT:``; image tokens are never written. Temperature 0 is greedy."""
        rows = [[self.bos_id, *self._ids(self.chat(p))] for p in prompts]
        written = write_tokens(self._forward, lambda h: self.model.lm_head(h).float() + self.text_bias, rows, seeds,
                               max_new_tokens, temperature, top_p, self.pad_id, self.eos_id, self.device)
        texts = self.tokenizer.batch_decode(written, skip_special_tokens=True)
        return [t.strip() for t in texts]

    # ------------------------------------------------------------------------------- images
    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """SEED codes [B, 32] int64 (CPU). A row depends only on its prompt, seed and the model."""
        return self.sample_with_logprobs(prompts, seeds).tokens

    @torch.no_grad()
    def sample_with_logprobs(self, prompts: list[str], seeds: list[int]) -> ImageSamples:
        """The 32 codes after ``<img>``, drawn from the image-token rows of the head (temperature, top-k,
        top-p), KV cache, one generator per sample. Without guidance the ``cfg`` and ``conditional`` views
        are the same distribution."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        s, n, t_max = self.sampling, len(prompts), self.num_image_tokens
        ids, mask = left_pad([self.generation_row(p) for p in prompts], self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = positions(mask)
        out = self._forward(ids, mask, pos)
        pos = pos[:, -1:]
        gens = make_generators(seeds, self.device)
        codes = torch.zeros((n, t_max), dtype=torch.long, device=self.device)
        logp_sampling, logp_model = torch.zeros(n, device=self.device), torch.zeros(n, device=self.device)
        for t in range(t_max):
            logits = self._image_head(out.last_hidden_state[:, -1]).float()
            warped = warp_logits(logits, s.temperature, s.top_k, s.top_p)
            nxt = multinomial_per_sample(warped.softmax(-1), gens)
            codes[:, t] = nxt
            logp_sampling += token_logprobs(warped, nxt)
            logp_model += token_logprobs(logits, nxt)
            if t + 1 == t_max:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos + 1
            out = self._forward(self.image_ids[nxt][:, None], mask, pos, out.cache)
        return ImageSamples(codes.cpu(), logp_sampling.cpu(), logp_model.cpu(), logp_model.cpu())

    def initial_latents(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """[B, C, h, w] starting latents, row b from generators[b], scaled by the scheduler's initial sigma
        (the pipeline does not scale latents it is given)."""
        unet = self.decoder.unet
        side = unet.config.sample_size
        shape = (unet.config.in_channels, side, side)
        noise = randn_per_sample(generators, shape, dtype=self.dtype, device=self.device)
        return noise * self.decoder.scheduler.init_noise_sigma

    @torch.no_grad()
    def decode(self, samples: torch.Tensor, seeds: list[int]) -> np.ndarray:
        """Codes [B, 32] -> uint8 images [B, H, W, 3]: the codes' unCLIP image embeddings
        (``codes_to_image_embeds``) rendered by the unCLIP pipeline, ``decode_batch_size`` images per call,
        each image's noise from a generator seeded by its seed (so an image depends on its codes and seed
        only, for a fixed batch size and device)."""
        if len(samples) != len(seeds):
            raise ValueError(f"{len(samples)} samples but {len(seeds)} seeds")
        s, out = self.sampling, []
        for start in range(0, len(samples), self.decode_batch_size):
            codes = samples[start:start + self.decode_batch_size].to(self.device, torch.long)
            gens = make_generators(seeds[start:start + len(codes)], self.device)
            embeds = self.image_tokenizer.codes_to_image_embeds(codes).to(self.dtype)
            images = self.decoder(prompt=[""] * len(codes), image_embeds=embeds, latents=self.initial_latents(gens),
                                  generator=gens, noise_level=0, guidance_scale=s.decoder_guidance_scale,
                                  num_inference_steps=s.decoder_steps, output_type="np").images
            out.append(np.clip(np.round(np.asarray(images, dtype=np.float32) * 255), 0, 255).astype(np.uint8))
        return np.concatenate(out)

    # ------------------------------------------------------------------------------- yes / no
    def question_rows(self, questions: Sequence[str]) -> tuple[list[int], list[int], list[list[int]]]:
        """(the shared prefix ``<s>USER: <img> z_1 .. z_32 </img>`` with placeholder codes, the prefix
        positions of the codes, the per-question suffix ids ``{question}\\nASSISTANT:``). Each full prompt is
        tokenized whole and cut after ``</img>`` (a special token: tokenization restarts there anyway)."""
        block = BOI_TOKEN + IMG_TOKEN.format(0) * self.num_image_tokens + EOI_TOKEN
        prefix: list[int] | None = None
        suffixes = []
        for q in questions:
            row = [self.bos_id, *self._ids(self.chat(block + q))]
            cut = row.index(self.eoi_id) + 1
            if prefix is None:
                prefix = row[:cut]
            elif row[:cut] != prefix:
                raise ValueError("the image block does not tokenize the same before every question")
            suffixes.append(row[cut:])
        prefix = prefix or []
        slots = [i for i, tok in enumerate(prefix) if tok == int(self.image_ids[0])]
        if len(slots) != self.num_image_tokens:
            raise ValueError(f"the image block holds {len(slots)} image tokens, not {self.num_image_tokens}")
        return prefix, slots, suffixes

    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> SEED codes [N, 32] (the tokenizer's own preprocessing)."""
        pixels = self.image_tokenizer.preprocess(list(images)).to(self.device, self.dtype)
        return self.image_tokenizer.encode(pixels).to(self.device, torch.long)

    def _prefill(self, prefix: list[int], slots: list[int], codes: torch.Tensor) -> DynamicCache:
        """Run the image prefix once per image; return its KV cache."""
        ids = torch.tensor([prefix], device=self.device).repeat(len(codes), 1)
        ids[:, slots] = self.image_ids[codes]
        mask = torch.ones_like(ids)
        return self._forward(ids, mask, positions(mask)).cache

    def _answer(self, cache: DynamicCache, prefix_len: int, rows: torch.Tensor,
                suffixes: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward of question suffixes on copies of their images' prefix caches -> p_yes, p_no."""
        picked = DynamicCache(ddp_cache_data=[(k[rows], v[rows]) for k, v, *_ in cache], config=self.model.config)
        ids, smask = left_pad(suffixes, self.pad_id)
        ids, smask = ids.to(self.device), smask.to(self.device)
        mask = torch.cat([torch.ones((len(suffixes), prefix_len), dtype=smask.dtype, device=self.device), smask], 1)
        out = self._forward(ids, mask, positions(smask, prefix_len), picked)
        probs = self.model.lm_head(out.last_hidden_state[:, -1]).float().softmax(-1)  # last position only
        return probs[:, self.yes_ids].sum(-1), probs[:, self.no_ids].sum(-1)

    @torch.no_grad()
    def yes_no(self, images: np.ndarray, questions: list[list[str]],
               batch_size: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """p("yes"), p("no") for each image's questions: softmax over the whole vocabulary at the last
        position of ``<s>USER: <img> codes </img>{question}\\nASSISTANT:``, summed over spelling variants.
        The images are SEED-encoded and their prefix prefilled once per call; the prefix KV cache is copied
        to the questions, at most ``batch_size`` (image, question) rows per forward."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} question lists")
        batch = batch_size or self.score_batch_size
        flat = [(i, q) for i, qs in enumerate(questions) for q in qs]
        p_yes, p_no = torch.zeros(len(flat)), torch.zeros(len(flat))
        if flat:
            prefix, slots, suffixes = self.question_rows([q for _, q in flat])
            owners = sorted({i for i, _ in flat})
            for first in range(0, len(owners), batch):
                group = owners[first:first + batch]
                cache = self._prefill(prefix, slots, self.encode_images(np.asarray(images)[group]))
                where = {img: k for k, img in enumerate(group)}
                chunk = [j for j, (i, _) in enumerate(flat) if i in where]
                for sub in (chunk[k:k + batch] for k in range(0, len(chunk), batch)):
                    rows = torch.tensor([where[flat[j][0]] for j in sub], device=self.device)
                    y, n = self._answer(cache, len(prefix), rows, [suffixes[j] for j in sub])
                    p_yes[sub], p_no[sub] = y.cpu(), n.cpu()
        return per_image(p_yes, p_no, questions)

    # ------------------------------------------------------------------------------- training
    def sequence_logprobs(self, prompts: list[str], tokens: torch.Tensor,
                          entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """sum_t log pi(z_t | x, z_<t) over the 32 codes [B, 32] -> [B] float32 (teacher forcing: one plain
        forward of ``prompt <img> z_1 .. z_31``, no KV cache, differentiable), over the image-token rows of
        the head (the distribution the sampler draws from before temperature / top-k / top-p), chunked with
        a float32 log-sum-exp (:func:`~silmm.backends.common.image_code_logprobs`)."""
        tokens = tokens.to(self.device, torch.long)
        ids, mask = left_pad([self.generation_row(p) for p in prompts], self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        image_in = self.image_ids[tokens[:, :-1]]
        full_ids = torch.cat([ids, image_in], 1)
        full = torch.cat([mask, torch.ones_like(image_in)], 1)
        hidden = self._lm()(input_ids=full_ids, attention_mask=full, position_ids=positions(full),
                            use_cache=False).last_hidden_state
        hidden = hidden[:, ids.shape[1] - 1:]  # <img> predicts the first code
        return image_code_logprobs(hidden, self._image_head, tokens, self.logprob_chunk, entropy)

    def enable_gradient_checkpointing(self) -> None:
        """Activation checkpointing of the LLaMA decoder layers (non-reentrant; training mode only)."""
        enable_gradient_checkpointing(self.model)

    def train(self, mode: bool = True) -> None:
        """Training mode switches LoRA dropout on; the image tokenizer and the decoder stay in eval mode."""
        self.model.train(mode)

    # ------------------------------------------------------------------------------- LoRA
    # reference, add_lora, load/save_adapter, merge_adapter: InPlaceLora's, on the LLaMA in llm/
    def weights_dir(self) -> Path:
        return Path(self.model_cfg.path) / LLM_DIR

    def merge_and_save(self, out_dir: str | Path, master: Master = own_values) -> None:
        """Merge in float32 and write our layout: ``llm/`` (merged, in the loaded dtype, with its tokenizer);
        ``tokenizer/`` and ``decoder/`` copied unchanged from the loaded checkpoint (they are frozen)."""
        state = self.merge_adapter(master)
        out, src = Path(out_dir), Path(self.model_cfg.path)
        self.model.save_pretrained(out / LLM_DIR, state_dict=state)
        self.tokenizer.save_pretrained(str(out / LLM_DIR))
        for sub in (TOKENIZER_DIR, DECODER_DIR):
            shutil.copytree(src / sub, out / sub, dirs_exist_ok=True)


# ------------------------------------------------------------------------------------ conversion
def convert_llm(src: Path, tokenizer_src: Path, dst: Path, num_codes: int) -> None:
    """The released LLaMA directory -> ``dst`` (config.json, safetensors weights, generation config) and the
    released text tokenizer -> ``dst`` as well. Safetensors shards are copied; pickled ``pytorch_model*.bin``
    shards (read with ``torch.load(weights_only=True)``) are rewritten one shard at a time as safetensors."""
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src}: no config.json (the released SEED-LLaMA directory, e.g. {RELEASED_LLM}/)")
    config = json.loads((src / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise CheckpointError(f"{src / 'config.json'}: model_type is {config.get('model_type')!r}, expected 'llama'")
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "config.json", dst / "config.json")
    if (src / "generation_config.json").is_file():
        shutil.copy2(src / "generation_config.json", dst / "generation_config.json")
    safetensors = sorted(src.glob("*.safetensors"))
    if safetensors:
        for name in [*safetensors, *src.glob("model.safetensors.index.json")]:
            shutil.copy2(name, dst / name.name)
    else:
        _bin_to_safetensors(src, dst)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_src))
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        raise CheckpointError(f"{tokenizer_src}: cannot read the SEED-LLaMA text tokenizer (a sentencepiece "
                              f"tokenizer.model needs the sentencepiece package to convert): {exc}") from exc
    image_token_ids(tokenizer, num_codes, tokenizer_src)
    if len(tokenizer) > int(config.get("vocab_size", 0)):
        raise CheckpointError(f"{src / 'config.json'}: vocab_size {config.get('vocab_size')} is smaller than the "
                              f"tokenizer at {tokenizer_src} ({len(tokenizer)} tokens)")
    tokenizer.save_pretrained(str(dst))


def _bin_to_safetensors(src: Path, dst: Path) -> None:
    shards = sorted(src.glob("pytorch_model*.bin"))
    if not shards:
        raise CheckpointError(f"{src}: no weights (*.safetensors or pytorch_model*.bin)")
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        try:
            state = torch.load(shard, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"{shard}: cannot read the pickled weights: {exc}") from exc
        name = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        state = {key: value.contiguous().clone() for key, value in state.items()}  # no shared storage
        save_file(state, str(dst / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(state, name))
        total += sum(v.numel() * v.element_size() for v in state.values())
        del state
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")


def convert_decoder(src: Path, dst: Path) -> None:
    """The unCLIP pipeline directory (diffusers layout, safetensors) -> ``dst``, validated by loading it."""
    from diffusers import StableUnCLIPImg2ImgPipeline

    try:
        pipe = StableUnCLIPImg2ImgPipeline.from_pretrained(str(src), use_safetensors=True)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise CheckpointError(f"{src}: cannot load the unCLIP pipeline (stable-diffusion-2-1-unclip, diffusers "
                              f"layout with safetensors): {exc}") from exc
    pipe.save_pretrained(str(dst))


def convert_seed_llama(src: str | Path, dst: str | Path, llm: str | Path | None = None,
                       tokenizer: str | Path | None = None, decoder: str | Path | None = None) -> Path:
    """The released SEED-LLaMA directories -> our layout in ``dst`` (refused if ``dst`` exists).

    ``src`` holds them as the release's README arranges them (``seed_llama_8b_sft/``, ``seed_tokenizer/``
    with ``seed_quantizer.pt`` and the text tokenizer, ``seed_tokenizer/diffusion_model/``); ``llm``,
    ``tokenizer`` and ``decoder`` override each path."""
    src, dst = Path(src), Path(dst)
    llm_src = Path(llm) if llm else src / RELEASED_LLM
    tok_src = Path(tokenizer) if tokenizer else src / RELEASED_TOKENIZER
    dec_src = Path(decoder) if decoder else src / RELEASED_DECODER
    if dst.exists():
        raise FileExistsError(f"{dst} exists; convert into a new directory")
    quantizer = tok_src / RELEASED_QUANTIZER
    if not quantizer.is_file():
        raise CheckpointError(f"{tok_src}: no {RELEASED_QUANTIZER} (the released SEED image tokenizer)")
    tmp = dst.with_name(f".{dst.name}.converting")
    shutil.rmtree(tmp, ignore_errors=True)
    seed_tokenizer = image_tokenizer_module()
    seed_tokenizer.convert_seed_tokenizer(quantizer, tmp / TOKENIZER_DIR)
    codes = int(seed_tokenizer.SeedImageTokenizer.from_pretrained(tmp / TOKENIZER_DIR).codebook_size)
    convert_llm(llm_src, tok_src, tmp / LLM_DIR, codes)
    convert_decoder(dec_src, tmp / DECODER_DIR)
    check_checkpoint(tmp)
    tmp.rename(dst)
    return dst


# ------------------------------------------------------------------------------------ tiny model
def build_tiny_text_tokenizer(num_codes: int):
    """A tiny byte-level tokenizer with the release's additions after its words: ``<img_00000>`` ..
    ``<img_{num_codes-1}>`` (contiguous, as 32000 + code in the release), then ``<img>`` and ``</img>``."""
    tok = build_tiny_tokenizer(vocab_size=512)
    tok.add_tokens([IMG_TOKEN.format(i) for i in range(num_codes)] + [BOI_TOKEN, EOI_TOKEN], special_tokens=True)
    return tok


def tiny_llm(tokenizer, seed: int) -> LlamaForCausalLM:
    """A 2-layer LLaMA of width 32, untied head as the release; initializer_range 0.3 so that a wrong
    position or mask changes the outputs measurably."""
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         initializer_range=0.3, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def _tiny_clip_tokenizer():
    """A CLIP tokenizer over single byte-level characters (no merges): enough for unCLIP's empty prompt."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def build_tiny_unclip(out_dir: str | Path, embed_dim: int, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random StableUnCLIPImg2ImgPipeline (the components of stable-diffusion-2-1-unclip, saved with
    ``save_pretrained``): UNet conditioned on ``embed_dim``-wide image embeddings, ``image_size`` pixels."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableUnCLIPImg2ImgPipeline,
        UNet2DConditionModel,
    )
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
        StableUnCLIPImageNormalizer,
    )
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                            sample_size=image_size)
        unet = UNet2DConditionModel(
            sample_size=image_size // 2, in_channels=4, out_channels=4, block_out_channels=(16, 32),
            layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
            norm_num_groups=8, class_embed_type="projection", projection_class_embeddings_input_dim=2 * embed_dim)
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=514, hidden_size=16, intermediate_size=32,
                                                    num_hidden_layers=1, num_attention_heads=2,
                                                    max_position_embeddings=77, bos_token_id=512, eos_token_id=513))
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
            patch_size=8, projection_dim=embed_dim))
        normalizer = StableUnCLIPImageNormalizer(embedding_dim=embed_dim)
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32}),
        image_encoder=image_encoder, image_normalizer=normalizer,
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=_tiny_clip_tokenizer(), text_encoder=text_encoder, unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1,
                                clip_sample=False),
        vae=vae)
    pipe.save_pretrained(str(out_dir))
    return Path(out_dir)


def build_tiny_seed_llama_released(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random SEED-LLaMA in the released layout: ``seed_llama_8b_sft/`` (config.json and a pickled
    ``pytorch_model.bin``, as the release ships it), ``seed_tokenizer/`` (the text tokenizer with the image
    tokens and ``seed_quantizer.pt``, from :func:`make_tiny_seed_tokenizer_released`) and
    ``seed_tokenizer/diffusion_model/`` (a tiny unCLIP pipeline)."""
    out = Path(out_dir)
    seed_tokenizer = image_tokenizer_module()
    tok_dir = out / RELEASED_TOKENIZER
    tok_dir.mkdir(parents=True, exist_ok=True)
    seed_tokenizer.make_tiny_seed_tokenizer_released(tok_dir, seed=seed)
    if not (tok_dir / RELEASED_QUANTIZER).is_file():
        raise RuntimeError(f"make_tiny_seed_tokenizer_released wrote no {tok_dir / RELEASED_QUANTIZER}")
    probe = out / ".probe"
    seed_tokenizer.convert_seed_tokenizer(tok_dir / RELEASED_QUANTIZER, probe)
    image_tokenizer = seed_tokenizer.SeedImageTokenizer.from_pretrained(probe)
    shutil.rmtree(probe)
    text = build_tiny_text_tokenizer(int(image_tokenizer.codebook_size))
    text.save_pretrained(str(tok_dir))
    llm = tiny_llm(text, seed)
    (out / RELEASED_LLM).mkdir(parents=True, exist_ok=True)
    llm.config.save_pretrained(str(out / RELEASED_LLM))
    torch.save(llm.state_dict(), out / RELEASED_LLM / "pytorch_model.bin")
    build_tiny_unclip(out / RELEASED_DECODER, int(image_tokenizer.embed_dim), seed=seed)
    return out


def build_tiny_seed_llama(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random SEED-LLaMA in our layout: built in the released layout, then converted (what
    ``silmm make-tiny seed_llama`` writes)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        released = build_tiny_seed_llama_released(Path(tmp) / "released", seed=seed)
        return convert_seed_llama(released, out_dir)
