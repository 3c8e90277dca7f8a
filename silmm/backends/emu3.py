"""The Emu3 backend (``Emu3ForConditionalGeneration``, transformers): one causal LM over words and VQ image
tokens, the paper's third model.

Image tokens are ordinary vocabulary entries (``<|visual token 000123|>``), so the same next-token head
writes text, draws images and answers questions. An image of ``h x w`` tokens is the sequence Emu3 writes
after its generation prompt ``<bos>{prompt}<|image start|>{h}*{w}<|image token|>``::

    v(0,0) .. v(0,w-1) <eol>  v(1,0) .. <eol>  ...  v(h-1,w-1) <eol>  <eof> <|image end|> <eos>

(``<eol>`` = ``<|extra_200|>``, ``<eof>`` = ``<|extra_201|>``), which ``decode_image_tokens(seq, h, w)``
turns into pixels. transformers has no image mode for Emu3: its model card samples with ``generate`` and a
prefix-constrained logits processor. Here our own loop does the same with one ``torch.Generator`` per sample:

- **constrained decoding**: at a visual position only the visual tokens can be drawn (the head is computed
  on their rows alone); ``<eol>`` after each row of ``w`` and the closing tokens after the last row are
  written, not drawn, so every sample has exactly the grid the VQ decoder needs, whatever the weights;
- **classifier-free guidance** against Emu3's negative prompt (:data:`NEGATIVE_PROMPT`, in the same
  generation format), ``uncond + scale * (cond - uncond)`` on the visual-token logits. transformers'
  ``UnbatchedClassifierFreeGuidanceLogitsProcessor`` mixes log-softmaxes over the whole vocabulary; that
  differs from mixing the restricted logits by a per-row constant, so the distributions are the same;
- then temperature, top-k and top-p (the official Emu3-Gen recipe: guidance 3, top-k 2048).

Samples are stored as VQ codes ``[B, h*w]`` (indices into the codebook, row-major); the grid markers are
implicit and rebuilt for decoding and teacher forcing. DPO log-probs (:meth:`Emu3Backend.sequence_logprobs`)
are one plain forward over ``prompt + the image sequence``, summed over the visual positions only (the
``<eol>`` positions are written by the constraint and carry no choice).

Grid: ``sampling.image_height`` x ``sampling.image_width`` tokens (0: Emu3's default, a 720 x 720 image =
90 x 90 tokens, from the processor's ``image_area``); written into the prompt as Emu3 does.

Checkpoints: a directory in the layout of the released ``BAAI/Emu3-Gen-hf`` / ``Emu3-Chat-hf`` conversions
(``config.json`` with ``model_type: emu3``, safetensors weights, tokenizer, ``processor_config.json``);
:func:`build_tiny_emu3` writes a tiny random one. Emu3 releases generation (Gen) and understanding (Chat)
as separate checkpoints; this backend runs either for everything.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from transformers import (
    Emu3Config,
    Emu3ForConditionalGeneration,
    Emu3Processor,
    Emu3TextConfig,
    Emu3VQVAEConfig,
    GenerationConfig,
)
from transformers.cache_utils import DynamicCache
from transformers.models.emu3.image_processing_emu3 import Emu3ImageProcessor

from silmm.backends.base import CheckpointError, LMMBackend, check_transformers_checkpoint
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
    token_logprobs,
    warp_logits,
    write_tokens,
    yes_no_token_ids,
)
from silmm.backends.lora import Master, own_values
from silmm.config import LogprobMode, ModelConfig, SamplingConfig

# The special tokens Emu3's processor reads from its tokenizer (attribute -> token), as in the released
# conversions; <eol> is the vocabulary map's "<|extra_200|>", visual tokens "<|visual token 000000|>".
EMU3_SPECIAL_TOKENS = {
    "image_token": "<image>",
    "boi_token": "<|image start|>",
    "eoi_token": "<|image end|>",
    "image_wrapper_token": "<|image token|>",
    "eof_token": "<|extra_201|>",
}
EOL_TOKEN = "<|extra_200|>"
VISUAL_TOKEN = "<|visual token {:06d}|>"
# Emu3-Gen's negative prompt (the official generation recipe and transformers' model card)
NEGATIVE_PROMPT = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, "
                   "cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, "
                   "username, blurry.")
SYSTEM_PROMPT = "You are a helpful assistant."
# Emu3-Chat's template ("USER: <image>{text} ASSISTANT:"); used when a checkpoint carries none (Emu3-Gen)
EMU3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
DOWNSAMPLE = 8  # pixels per token side: Emu3Processor's fixed downsample_ratio


# ------------------------------------------------------------------------------------ tiny checkpoint
def build_tiny_emu3(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Emu3 checkpoint (config with the vocabulary map, safetensors weights, tokenizer,
    processor, generation config) to ``out_dir`` in the layout of a released Emu3 ``-hf`` directory.

    Deterministic: the same seed writes byte-identical weights. 64 VQ codes, 8 pixels per token (4
    resolutions, as the processor assumes), a 2-layer text model of width 32; run it with a small grid
    (``sampling.image_height=4 sampling.image_width=4``: 32 x 32 pixel images).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    num_codes = 64
    tok = build_tiny_tokenizer(None, EMU3_SPECIAL_TOKENS, add_bos=False)  # the processor writes <bos> itself
    tok.add_tokens([EOL_TOKEN] + [VISUAL_TOKEN.format(i) for i in range(num_codes)], special_tokens=True)
    text = Emu3TextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, attention_dropout=0.0,
        initializer_range=0.3,  # peaked logits: a wrong position or mask changes the outputs measurably
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    vq = Emu3VQVAEConfig(codebook_size=num_codes, embed_dim=4, latent_channels=4, base_channels=32,
                         channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[],
                         hidden_size=32, num_attention_heads=1)  # hidden_size: the mid-block attention width
    config = Emu3Config(text_config=text, vq_config=vq, vocabulary_map=tok.get_vocab())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Emu3ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    image_processor = Emu3ImageProcessor(min_pixels=32 * 32, max_pixels=64 * 64, spatial_factor=DOWNSAMPLE)
    Emu3Processor(image_processor=image_processor, tokenizer=tok, chat_template=EMU3_CHAT_TEMPLATE).save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------ loading checks
def check_checkpoint(path: Path) -> None:
    check_transformers_checkpoint(path, "emu3", "emu3")


def plan_groups(questions: Sequence[Sequence[str]], batch: int) -> Iterator[tuple[list[int], list[int]]]:
    """Groups of whole images with at most ``batch`` questions in all (an image with more questions forms
    its own group): (image indices, flat question indices). Each image is prefilled once."""
    owners: list[int] = []
    chunk: list[int] = []
    k = 0
    for i, qs in enumerate(questions):
        if chunk and len(chunk) + len(qs) > batch:
            yield owners, chunk
            owners, chunk = [], []
        if qs:
            owners.append(i)
            chunk.extend(range(k, k + len(qs)))
        k += len(qs)
    if chunk:
        yield owners, chunk


# ------------------------------------------------------------------------------------------ backend
class Emu3Backend(InPlaceLora, LMMBackend):
    """Emu3 as a SILMM policy. ``logprob_mode`` as for Janus: ``conditional`` scores the text-conditioned
    distribution over the visual tokens, ``cfg`` the guidance mix against the negative prompt (as sampled,
    before temperature/top-k/top-p)."""

    family = "discrete"
    logprob_chunk = 64  # visual positions per head chunk in sequence_logprobs
    decode_batch_size = 4  # images per VQ-decoder call (a 720 px decode is memory-heavy)

    def __init__(self, model_cfg: ModelConfig, sampling: SamplingConfig,
                 logprob_mode: LogprobMode | str = LogprobMode.conditional, score_batch_size: int = 16):
        super().__init__(model_cfg, sampling)
        self.logprob_mode = LogprobMode(logprob_mode)
        self.score_batch_size = score_batch_size
        path = Path(model_cfg.path)
        check_checkpoint(path)
        trust = model_cfg.trust_remote_code
        try:
            self.processor = Emu3Processor.from_pretrained(str(path), trust_remote_code=trust)
            model = Emu3ForConditionalGeneration.from_pretrained(
                str(path), dtype=self.dtype, use_safetensors=True, trust_remote_code=trust)
        except (OSError, ValueError, KeyError, AttributeError, SafetensorError) as exc:
            raise CheckpointError(f"{path}: cannot load the Emu3 checkpoint: {exc}") from exc
        self.model: Emu3ForConditionalGeneration = model.to(self.device).eval()
        self.model.requires_grad_(False)
        gen_file = path / "generation_config.json"
        self.generation_config = GenerationConfig.from_pretrained(str(path)) if gen_file.is_file() else None
        if self.processor.chat_template is None:
            self.processor.chat_template = EMU3_CHAT_TEMPLATE
        self._rows: dict[str, list[int]] = {}
        self._init_tokens(path)
        self._init_grid(path)

    @classmethod
    def load(cls, model_cfg: ModelConfig, sampling: SamplingConfig, **kwargs) -> Emu3Backend:
        return cls(model_cfg, sampling, **kwargs)

    def _init_tokens(self, path: Path) -> None:
        tok, mapping = self.tokenizer, self.model.vocabulary_mapping
        num_codes = self.model.config.vq_config.codebook_size
        img2bpe = mapping.img2bpe
        missing = [i for i in range(num_codes) if i not in img2bpe]
        if missing or mapping.eol_token_id is None:
            raise CheckpointError(f"{path}: the vocabulary map lacks {len(missing)} of {num_codes} visual tokens "
                                  f"or the end-of-line token {EOL_TOKEN}")
        ids = [img2bpe[i] for i in range(num_codes)]
        self.code_ids = torch.tensor(ids, device=self.device)  # VQ code -> vocabulary id
        lo = ids[0]
        # contiguous ids (the release): the head's visual rows are a view, not a copy
        self._code_rows = slice(lo, lo + num_codes) if ids == list(range(lo, lo + num_codes)) else self.code_ids
        self.eol_id = int(mapping.eol_token_id)
        special = {}
        for attr, token in EMU3_SPECIAL_TOKENS.items():
            name = getattr(tok, attr, None) or token
            special[attr] = tok.convert_tokens_to_ids(name)
            if special[attr] is None or special[attr] == tok.unk_token_id:
                raise CheckpointError(f"{path}: the tokenizer lacks Emu3's {attr} {name!r}")
        self.image_token_id, self.eoi_id, self.eof_id = (special["image_token"], special["eoi_token"],
                                                         special["eof_token"])
        self.bos_id, self.eos_id = tok.bos_token_id, tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        yes, no = yes_no_token_ids(tok)
        self.yes_ids = torch.tensor(yes, device=self.device)
        self.no_ids = torch.tensor(no, device=self.device)

    def _init_grid(self, path: Path) -> None:
        s = self.sampling
        if s.image_height and s.image_width:
            self.grid = (int(s.image_height), int(s.image_width))
        else:  # Emu3's default: image_area pixels at 1:1 (720 x 720 -> 90 x 90 tokens)
            self.grid = tuple(self.processor.calculate_generate_size("1:1", self.processor.image_area, DOWNSAMPLE))
        h, w = self.grid
        longest = len(self.generation_row(NEGATIVE_PROMPT)) + h * (w + 1) + 3
        limit = self.model.config.text_config.max_position_embeddings
        if longest > limit:
            raise ValueError(f"{path}: a {h} x {w} token image after the negative prompt needs {longest} positions, "
                             f"the model has {limit}: set sampling.image_height/image_width smaller")

    # ------------------------------------------------------------------------------- properties
    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per sample (h * w); the stored sample length."""
        return self.grid[0] * self.grid[1]

    @property
    def _lm(self):
        return self.model.model.text_model

    @property
    def _cfg(self) -> bool:
        return self.sampling.guidance_scale != 1.0

    # ------------------------------------------------------------------------------- sequences
    def generation_row(self, prompt: str) -> list[int]:
        """``<bos>{prompt}<|image start|>{h}*{w}<|image token|>`` as Emu3's processor writes it (cached:
        training asks for the same prompts again and again)."""
        if prompt not in self._rows:
            if len(self._rows) > 100_000:
                self._rows.clear()
            h, w = self.grid
            text = (f"{self.tokenizer.bos_token}{prompt}{self.processor.image_start_token}{h}*{w}"
                    f"{self.processor.fake_token_around_image}")
            self._rows[prompt] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._rows[prompt]

    def _generation_batch(self, prompts: Sequence[str], negative: bool) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.generation_row(p) for p in prompts]
        if negative:  # classifier-free guidance: the negative prompt, in the same generation format
            rows += [self.generation_row(NEGATIVE_PROMPT)] * len(prompts)
        ids, mask = left_pad(rows, self.pad_id)
        return ids.to(self.device), mask.to(self.device)

    def grid_sequence(self, codes: torch.Tensor, closing: bool = True) -> torch.Tensor:
        """VQ codes [B, h*w] -> the vocabulary ids Emu3 writes: each row of codes then ``<eol>``, and (with
        ``closing``) ``<eof> <|image end|> <eos>``: [B, h*(w+1) (+3)]."""
        h, w = self.grid
        codes = codes.to(self.device, torch.long)
        ids = self.code_ids[codes].view(-1, h, w)
        ids = torch.cat([ids, torch.full_like(ids[:, :, :1], self.eol_id)], dim=2).flatten(1)
        if closing:
            tail = torch.tensor([self.eof_id, self.eoi_id, self.eos_id], device=self.device)
            ids = torch.cat([ids, tail.expand(len(ids), 3)], dim=1)
        return ids

    def _visual_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the visual tokens only [..., K] in the model's dtype: the head's visual rows alone,
        ``F.linear(hidden, W[visual ids])`` instead of the whole 184k vocabulary then a selection. Read from
        ``lm_head.weight`` at every call (current under training and merges). A head that peft wraps or
        a ZeRO-3 partitioned weight runs the full head, then selects: the same values."""
        head = self.model.lm_head
        weight = getattr(head, "weight", None)
        if not isinstance(head, torch.nn.Linear) or weight is None or hasattr(weight, "ds_id"):
            return head(hidden)[..., self.code_ids]
        bias = head.bias[self._code_rows] if head.bias is not None else None
        return F.linear(hidden, weight[self._code_rows], bias)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache=None):
        return self._lm(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)

    def _chat(self, text: str, image: bool = False) -> str:
        content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
        messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
                    {"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    # ------------------------------------------------------------------------------- text
    @torch.no_grad()
    def write_text(self, prompts: list[str], seeds: list[int], max_new_tokens: int,
                   temperature: float = 1.0, top_p: float = 1.0) -> list[str]:
        """Chat-formatted continuation; temperature 0 is greedy. Row b draws only from seeds[b]."""
        rows = [self.tokenizer(self.tokenizer.bos_token + self._chat(p), add_special_tokens=False)["input_ids"]
                for p in prompts]
        written = write_tokens(self._forward, lambda h: self.model.lm_head(h).float(), rows, seeds, max_new_tokens,
                               temperature, top_p, self.pad_id, self.eos_id, self.device)
        texts = self.tokenizer.batch_decode(written, skip_special_tokens=True)
        return [t.strip() for t in texts]

    # ------------------------------------------------------------------------------- images
    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """VQ codes [B, h*w] int64 (CPU), row-major. A row depends only on its prompt, seed and the model
        (for a fixed batch size and device)."""
        return self.sample_with_logprobs(prompts, seeds).tokens

    @torch.no_grad()
    def sample_with_logprobs(self, prompts: list[str], seeds: list[int]) -> ImageSamples:
        """Constrained, classifier-free-guided sampling with a KV cache and one generator per sample.

        One forward per visual token: the last code of a row goes in together with its ``<eol>`` (both
        known), so a row of ``w`` codes costs ``w`` forwards. The log-probs are over the visual tokens
        (the constraint's support), under the three views of :class:`ImageSamples`.
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        s, n = self.sampling, len(prompts)
        (h, w), cfg = self.grid, self._cfg
        ids, mask = self._generation_batch(prompts, cfg)
        pos = positions(mask)
        out = self._forward(ids, mask, pos)
        pos = pos[:, -1:]
        gens = make_generators(seeds, self.device)
        codes = torch.zeros((n, h * w), dtype=torch.long, device=self.device)
        logp = {k: torch.zeros(n, device=self.device) for k in ("sampling", "cfg", "conditional")}
        eol = torch.full((2 * n if cfg else n, 1), self.eol_id, device=self.device)
        for t in range(h * w):
            logits = self._visual_head(out.last_hidden_state[:, -1]).float()
            cond = logits[:n]
            mixed = logits[n:] + s.guidance_scale * (cond - logits[n:]) if cfg else cond
            warped = warp_logits(mixed, s.temperature, s.top_k, s.top_p)
            nxt = multinomial_per_sample(warped.softmax(-1), gens)
            codes[:, t] = nxt
            logp["sampling"] += token_logprobs(warped, nxt)
            logp["cfg"] += token_logprobs(mixed, nxt)
            logp["conditional"] += token_logprobs(cond, nxt)
            if t + 1 == h * w:
                break
            step = self.code_ids[nxt].repeat(2 if cfg else 1)[:, None]
            if (t + 1) % w == 0:  # end of a row: the constraint writes <eol>
                step = torch.cat([step, eol], dim=1)
            mask = torch.cat([mask, torch.ones_like(step)], dim=1)
            step_pos = pos + torch.arange(1, step.shape[1] + 1, device=self.device)
            out = self._forward(step, mask, step_pos, out.cache)
            pos = step_pos[:, -1:]
        return ImageSamples(codes.cpu(), logp["sampling"].cpu(), logp["cfg"].cpu(), logp["conditional"].cpu())

    @torch.no_grad()
    def sample_unconstrained(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """What sampling without the grid constraint would write: h*(w+1) tokens drawn from the whole
        vocabulary (CFG mix, temperature/top-k/top-p), one forward each -> vocabulary ids [B, h*(w+1)].
        Only for comparison (bench/score.py, tests): a random model breaks the grid at once."""
        s, n = self.sampling, len(prompts)
        (h, w), cfg = self.grid, self._cfg
        ids, mask = self._generation_batch(prompts, cfg)
        pos = positions(mask)
        out = self._forward(ids, mask, pos)
        pos = pos[:, -1:]
        gens = make_generators(seeds, self.device)
        written = []
        for _ in range(h * (w + 1)):
            logits = self.model.lm_head(out.last_hidden_state[:, -1]).float()
            mixed = logits[n:] + s.guidance_scale * (logits[:n] - logits[n:]) if cfg else logits
            nxt = multinomial_per_sample(warp_logits(mixed, s.temperature, s.top_k, s.top_p).softmax(-1), gens)
            written.append(nxt)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos + 1
            out = self._forward(nxt.repeat(2 if cfg else 1)[:, None], mask, pos, out.cache)
        return torch.stack(written, 1).cpu()

    @torch.no_grad()
    def decode(self, samples: torch.Tensor, seeds: list[int] | None = None) -> np.ndarray:
        """VQ codes [B, h*w] -> uint8 images [B, 8h, 8w, 3] through ``decode_image_tokens`` (the VQ
        decoder, ``decode_batch_size`` images per call). Deterministic: seeds unused."""
        h, w = self.grid
        out = []
        for start in range(0, len(samples), self.decode_batch_size):
            seq = self.grid_sequence(samples[start:start + self.decode_batch_size])
            pixels = self.model.decode_image_tokens(image_tokens=seq, height=h, width=w)  # [b, 3, H, W] in [-1, 1]
            # PIL output: its numpy path flattens the channels into the batch (transformers 5.24)
            images = self.processor.image_processor.postprocess(
                list(pixels.float().cpu().numpy()), return_tensors="PIL.Image.Image", input_data_format="channels_first")
            out.extend(np.asarray(im, dtype=np.uint8) for im in images["pixel_values"])
        return np.stack(out)

    # ------------------------------------------------------------------------------- yes / no
    def _question_rows(self, questions: Sequence[str], n_image: int, hw: tuple[int, int]
                       ) -> tuple[list[int], list[list[int]]]:
        """(shared prefix ids up to and including ``<|image end|>``, with ``n_image`` ``<image>``
        placeholders for the image's tokens; per-question suffix ids). Each full prompt is tokenized
        whole, as the processor does, and cut after the image block (a special token, where
        tokenization restarts anyway)."""
        h, w = hw
        block = (f"{self.processor.image_start_token}{h}*{w}{self.processor.fake_token_around_image}"
                 f"{self.processor.image_token * n_image}{self.processor.eof_token}{self.processor.image_end_token}")
        prefix: list[int] | None = None
        suffixes = []
        for q in questions:
            text = self.tokenizer.bos_token + self._chat(q, image=True).replace(self.processor.image_token, block, 1)
            row = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            cut = len(row) - row[::-1].index(self.eoi_id)
            if prefix is None:
                prefix = row[:cut]
            elif row[:cut] != prefix:
                raise ValueError("the chat template puts question text before the image: no shared prefix")
            suffixes.append(row[cut:])
        return prefix or [], suffixes

    def _image_tokens(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, tuple[int, int]]:
        """VQ-encode images -> their vocabulary ids with <eol> per row [N, h*(w+1)], and the grid (h, w)."""
        inputs = self.processor.image_processor(list(images), return_tensors="pt")
        sizes = inputs["image_sizes"]
        if len({tuple(int(x) for x in s) for s in sizes}) != 1:
            raise ValueError("yes_no needs images of one size per call")
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        tokens = self.model.model.get_image_tokens(pixels, sizes.to(self.device))
        h, w = (int(sizes[0][0]) // DOWNSAMPLE, int(sizes[0][1]) // DOWNSAMPLE)
        return tokens.view(len(images), h * (w + 1)).to(self.device, torch.long), (h, w)

    def _prefill_images(self, prefix: torch.Tensor, image_ids: torch.Tensor) -> DynamicCache:
        """Run the shared prefix (system prompt, user tag, image block) once per image; return its cache."""
        ids = prefix.expand(len(image_ids), -1).clone()
        ids[ids == self.image_token_id] = image_ids.flatten()
        mask = torch.ones_like(ids)
        return self._forward(ids, mask, positions(mask)).cache

    def _answer(self, cache: DynamicCache, prefix_len: int, rows: torch.Tensor,
                suffixes: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward of question suffixes on copies of their images' prefix caches -> p_yes, p_no."""
        picked = DynamicCache(ddp_cache_data=[(k[rows], v[rows]) for k, v, *_ in cache],
                              config=self.model.config.text_config)
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
        position of ``<bos>{system} USER: {image block}{question} ASSISTANT:``, summed over spelling
        variants. Each image is VQ-encoded and prefilled once; its prefix KV cache is copied to its
        questions, at most ``batch_size`` (image, question) rows per forward."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} question lists")
        batch = batch_size or self.score_batch_size
        flat = [(i, q) for i, qs in enumerate(questions) for q in qs]
        p_yes, p_no = torch.zeros(len(flat)), torch.zeros(len(flat))
        if flat:
            prefix = suffixes = hw = None
            for owners, chunk in plan_groups(questions, batch):
                image_ids, grid = self._image_tokens([images[i] for i in owners])
                if prefix is None or grid != hw:
                    hw = grid
                    prefix, suffixes = self._question_rows([q for _, q in flat], image_ids.shape[1], hw)
                    prefix_ids = torch.tensor([prefix], device=self.device)
                cache = self._prefill_images(prefix_ids, image_ids)
                for sub in (chunk[k:k + batch] for k in range(0, len(chunk), batch)):
                    rows = torch.tensor([owners.index(flat[j][0]) for j in sub], device=self.device)
                    y, n = self._answer(cache, len(prefix), rows, [suffixes[j] for j in sub])
                    p_yes[sub], p_no[sub] = y.cpu(), n.cpu()
        return per_image(p_yes, p_no, questions)

    # ------------------------------------------------------------------------------- training
    def visual_positions(self, prompt_len: int) -> torch.Tensor:
        """Indices (in ``prompt + image sequence``) of the hidden states that predict each visual token:
        the position before it; <eol> and closing positions are left out (the constraint writes them)."""
        h, w = self.grid
        r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        return (prompt_len - 1 + r * (w + 1) + c).flatten().to(self.device)

    def sequence_logprobs(self, prompts: list[str], tokens: torch.Tensor,
                          entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """sum_t log pi(z_t | x, z_<t) over the visual tokens of codes [B, h*w] -> [B] (float32,
        differentiable): one forward of ``prompt + image sequence`` (with its <eol> tokens; no KV cache),
        hidden states gathered at the visual positions only, the head on the visual-token rows only,
        ``logprob_chunk`` positions at a time with a float32 log-sum-exp
        (:func:`~silmm.backends.common.image_code_logprobs`). This is the distribution the constrained
        sampler draws from. ``logprob_mode=cfg`` mixes in the negative prompt's branch as when sampling.
        ``entropy=True`` returns ``(logps, mean per-token entropy [B], no grad)`` of the same distribution.

        Chosen and rejected share their prompt's token ids; the prefix is recomputed in each row rather
        than shared through a KV cache (activation checkpointing drops a cache inside checkpointed layers,
        and the prompt is ~1% of a 90 x 90 image's 8,190 positions).
        """
        tokens = tokens.to(self.device, torch.long)
        n = len(prompts)
        negative = self._cfg and self.logprob_mode is LogprobMode.cfg
        ids, mask = self._generation_batch(prompts, negative)
        image_in = self.grid_sequence(tokens, closing=False)[:, :-2]  # up to the last code's predecessor
        image_in = image_in.repeat(2 if negative else 1, 1)
        full_ids = torch.cat([ids, image_in], 1)
        full = torch.cat([mask, torch.ones_like(image_in)], 1)
        hidden = self._lm(input_ids=full_ids, attention_mask=full, position_ids=positions(full),
                          use_cache=False).last_hidden_state
        hidden = hidden[:, self.visual_positions(ids.shape[1])]
        if not negative:
            return image_code_logprobs(hidden, self._visual_head, tokens, self.logprob_chunk, entropy)
        scale = self.sampling.guidance_scale

        def mixed(c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:  # mixed in float32, as when sampling
            c, u = self._visual_head(c).float(), self._visual_head(u).float()
            return u + scale * (c - u)

        return image_code_logprobs((hidden[:n], hidden[n:]), mixed, tokens, self.logprob_chunk, entropy)

    def enable_gradient_checkpointing(self) -> None:
        """Activation checkpointing of the text model's decoder layers (non-reentrant; see
        :func:`~silmm.backends.common.enable_gradient_checkpointing`). Active only in training mode."""
        enable_gradient_checkpointing(self.model)

    def train(self, mode: bool = True) -> None:
        """Training mode switches LoRA dropout on; the VQ model stays in eval mode (it is frozen)."""
        self.model.train(mode)
        self.model.model.vqmodel.eval()

    def merge_and_save(self, out_dir: str | Path, master: Master = own_values) -> None:
        """Merge the adapter into the weights in float32 and write model (in the loaded checkpoint's dtype),
        processor and generation config in the layout :meth:`load` reads."""
        state = self.merge_adapter(master)
        out = Path(out_dir)
        self.model.save_pretrained(out, state_dict=state)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(out)
        self.processor.save_pretrained(out)
