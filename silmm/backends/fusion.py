"""The early-fusion discrete backend: one causal LM over one vocabulary of words and image tokens.

This is the form Chameleon, Emu3 and Lumina-mGPT take: an image is a sequence of codes from a VQ image
tokenizer, spliced into the text between ``<boi>`` and ``<eoi>``; the same next-token head writes text,
draws image tokens (its logits restricted to the image codes, as those models do when generating images)
and answers questions about an image given as tokens. Any ``AutoModelForCausalLM`` checkpoint works;
the image tokenizer is a :class:`PatchCodec` stored beside it.

Checkpoint layout (what :meth:`FusionBackend.merge_and_save` writes back, so iteration K+1 loads it):
    config.json, model.safetensors      a transformers causal LM
    tokenizer.json, tokenizer_config.json
    fusion_config.json                  special tokens and the question suffix
    image_codec/codec.json, image_codec/codebook.safetensors

Sequences: generation ``<s> {prompt} <boi> z_1 .. z_T``; understanding
``<s> <boi> z_1 .. z_T <eoi> {question} {answer_suffix}`` -> next token yes/no; text ``<s> {request}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from silmm.backends.base import CheckpointError, LMMBackend, check_safetensors_weights
from silmm.backends.common import (
    ImageSamples,
    InPlaceLora,
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

FUSION_CONFIG = "fusion_config.json"
CODEC_DIR = "image_codec"


# ------------------------------------------------------------------------------------- image codec
class PatchCodec:
    """A VQ image tokenizer with a fixed codebook of pixel patches (the grid of an image -> codes).

    encode: each patch -> the index of the nearest codebook entry (squared L2, ties to the lowest index);
    decode: codes -> the entries pasted in row-major order. Encoding a decoded image gives back its codes.
    """

    def __init__(self, codebook: np.ndarray, grid: int):
        if codebook.ndim != 4 or codebook.shape[1] != codebook.shape[2] or codebook.shape[3] != 3:
            raise ValueError(f"codebook must be [K, p, p, 3], got {codebook.shape}")
        self.codebook = np.ascontiguousarray(codebook, dtype=np.uint8)
        self.grid = grid
        self.patch = codebook.shape[1]
        self._flat = torch.from_numpy(self.codebook.reshape(len(codebook), -1).astype(np.float32))

    @property
    def num_codes(self) -> int:
        return len(self.codebook)

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def image_size(self) -> int:
        return self.grid * self.patch

    def _patches(self, images: np.ndarray) -> torch.Tensor:
        b, g, p = len(images), self.grid, self.patch
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).float()
        return x.reshape(b, g, p, g, p, 3).permute(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p * 3)

    def encode(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> int64 codes [B, grid*grid]."""
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"images must be [B, {self.image_size}, {self.image_size}, 3], got {images.shape}")
        patches = self._patches(images)
        dist = (patches.unsqueeze(2) - self._flat).pow(2).sum(-1)  # [B, N, K]
        return dist.argmin(-1)

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        codes = codes.cpu().numpy()
        if codes.ndim != 2 or codes.shape[1] != self.num_tokens or codes.min() < 0 or codes.max() >= self.num_codes:
            raise ValueError(f"codes must be [B, {self.num_tokens}] in [0, {self.num_codes}), got {codes.shape}")
        b, g, p = len(codes), self.grid, self.patch
        tiles = self.codebook[codes]  # [B, N, p, p, 3]
        return tiles.reshape(b, g, g, p, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * p, g * p, 3).copy()

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({"codebook": self.codebook}, str(out / "codebook.safetensors"))
        (out / "codec.json").write_text(json.dumps({"type": "patch_vq", "grid": self.grid}) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PatchCodec:
        path = Path(path)
        try:
            meta = json.loads((path / "codec.json").read_text())
            codebook = load_file(str(path / "codebook.safetensors"))["codebook"]
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            raise CheckpointError(f"{path}: cannot read the image codec: {exc}") from exc
        if meta.get("type") != "patch_vq":
            raise CheckpointError(f"{path / 'codec.json'}: unknown codec type {meta.get('type')!r}")
        return cls(codebook, int(meta["grid"]))


# ---------------------------------------------------------------------------------------- tokenizer
@dataclass
class FusionSpec:
    """The special tokens of an early-fusion checkpoint (fusion_config.json)."""

    boi_token: str = "<boi>"
    eoi_token: str = "<eoi>"
    image_token: str = "<img_{}>"  # formatted with the code index
    answer_suffix: str = "Answer:"


def text_words(texts: Iterable[str]) -> list[str]:
    """The word-level vocabulary of some texts, as the tokenizer below splits them (lowercased)."""
    split = pre_tokenizers.Whitespace()
    return sorted({w.lower() for t in texts for w, _ in split.pre_tokenize_str(t)})


def build_word_tokenizer(words: Iterable[str], num_codes: int, spec: FusionSpec | None = None,
                         extra_special_tokens: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """A lowercase word-level tokenizer (unknown words -> <unk>) with <boi>, <eoi> and one token per code, and
    ``extra_special_tokens`` (attribute -> token, e.g. a LLaVA processor's ``image_token``) after them.
    Deterministic: the same words give the same ids (specials first, then words sorted)."""
    spec = spec or FusionSpec()
    extra = dict(extra_special_tokens or {})
    specials = ["<unk>", "<s>", "</s>", "<pad>", spec.boi_token, spec.eoi_token, *extra.values()]
    images = [spec.image_token.format(i) for i in range(num_codes)]
    vocab = {t: i for i, t in enumerate(specials + images + sorted(set(words) - set(specials) - set(images)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    named = {"extra_special_tokens": extra} if extra else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=specials[4:] + images,
                                   padding_side="left", **named)


def save_checkpoint(out_dir: str | Path, model, tokenizer, codec: PatchCodec, spec: FusionSpec,
                    state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    out = Path(out_dir)
    model.save_pretrained(out, state_dict=state_dict)
    tokenizer.save_pretrained(str(out))
    codec.save(out / CODEC_DIR)
    (out / FUSION_CONFIG).write_text(json.dumps(asdict(spec), indent=1) + "\n")
    return out


def tiny_llama_config(tokenizer, hidden: int = 32, layers: int = 2, heads: int = 4, intermediate: int = 64,
                      max_positions: int = 512, initializer_range: float = 0.02) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
        initializer_range=initializer_range, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def build_tiny_fusion(out_dir: str | Path, codec: PatchCodec, texts: Sequence[str], seed: int = 0) -> Path:
    """A tiny random early-fusion checkpoint over ``codec``, whose vocabulary is the words of ``texts`` plus
    those the stages themselves write (the question request, yes/no answers); a model family supplies both
    (the toy world's: silmm/toy/plugin.py). initializer_range 0.3 makes a wrong position or mask change the
    outputs measurably."""
    from silmm.questions import BUILTIN_EXAMPLES, question_request

    spec = FusionSpec()
    words = text_words([question_request("", BUILTIN_EXAMPLES), f"yes no {spec.answer_suffix}", *texts])
    tok = build_word_tokenizer(words, codec.num_codes, spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(tok, initializer_range=0.3))
    return save_checkpoint(out_dir, model, tok, codec, spec)


def check_checkpoint(path: Path) -> None:
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    for name, what in (("config.json", "model config"), (FUSION_CONFIG, "early-fusion token config"),
                       (f"{CODEC_DIR}/codec.json", "image codec")):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: no {name} ({what})")
    check_safetensors_weights(path)
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"{path}: no tokenizer.json")


_SPACE_BEFORE_PUNCT = re.compile(r"\s+([?.,:;!)])")


# ------------------------------------------------------------------------------------------ backend
class FusionBackend(InPlaceLora, LMMBackend):
    """An early-fusion LM as a SILMM policy. ``logprob_mode`` as for Janus: ``conditional`` scores the
    text-conditioned distribution over image codes, ``cfg`` the guidance mix (when guidance_scale != 1)."""

    family = "discrete"
    logprob_chunk = 64  # image positions per head chunk in sequence_logprobs

    def __init__(self, model_cfg: ModelConfig, sampling: SamplingConfig,
                 logprob_mode: LogprobMode | str = LogprobMode.conditional, score_batch_size: int = 64):
        super().__init__(model_cfg, sampling)
        self.logprob_mode = LogprobMode(logprob_mode)
        self.score_batch_size = score_batch_size
        path = Path(model_cfg.path)
        check_checkpoint(path)
        trust = model_cfg.trust_remote_code
        try:
            self.spec = FusionSpec(**json.loads((path / FUSION_CONFIG).read_text()))
            self.tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=self.dtype, use_safetensors=True,
                                                         trust_remote_code=trust)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            raise CheckpointError(f"{path}: cannot load the early-fusion checkpoint: {exc}") from exc
        self.codec = PatchCodec.load(path / CODEC_DIR)
        self.model = model.to(self.device).eval()
        self.model.requires_grad_(False)
        self._init_tokens(path)

    @classmethod
    def load(cls, model_cfg: ModelConfig, sampling: SamplingConfig, **kwargs) -> FusionBackend:
        return cls(model_cfg, sampling, **kwargs)

    def _init_tokens(self, path: Path) -> None:
        tok = self.tokenizer
        ids = tok.convert_tokens_to_ids([self.spec.boi_token, self.spec.eoi_token]
                                        + [self.spec.image_token.format(i) for i in range(self.codec.num_codes)])
        if tok.unk_token_id in ids:
            raise CheckpointError(f"{path}: the tokenizer lacks <boi>/<eoi> or one of {self.codec.num_codes} "
                                  f"image tokens ({self.spec.image_token})")
        self.boi_id, self.eoi_id = ids[:2]
        self.image_ids = torch.tensor(ids[2:], device=self.device)
        # contiguous image ids (Chameleon, Emu3, ours): the head's image rows are a view, not a copy
        lo = ids[2]
        self._image_rows = slice(lo, lo + len(ids) - 2) if ids[2:] == list(range(lo, lo + len(ids) - 2)) else None
        self.bos_id, self.eos_id, self.pad_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        text_ok = torch.ones(len(tok), dtype=torch.bool)
        text_ok[ids] = False
        text_ok[[self.bos_id, self.pad_id]] = False
        self.text_bias = torch.zeros(len(tok), device=self.device).masked_fill(~text_ok.to(self.device), float("-inf"))
        yes, no = yes_no_token_ids(tok)
        self.yes_ids = torch.tensor(yes, device=self.device)
        self.no_ids = torch.tensor(no, device=self.device)
        self._words: dict[str, list[int]] = {}

    # ------------------------------------------------------------------------------- sequences
    @property
    def num_image_tokens(self) -> int:
        return self.codec.num_tokens

    def words(self, text: str) -> list[int]:
        """Token ids of a text without specials (cached: training asks for the same prompts again)."""
        if text not in self._words:
            if len(self._words) > 100_000:
                self._words.clear()
            self._words[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._words[text]

    def generation_row(self, prompt: str) -> list[int]:
        return [self.bos_id, *self.words(prompt), self.boi_id]

    def question_row(self, image_ids: Sequence[int], question: str) -> list[int]:
        """``image_ids``: the image's token ids (``image_ids[codes]``), not its codes."""
        return [self.bos_id, self.boi_id, *image_ids, self.eoi_id, *self.words(f"{question} {self.spec.answer_suffix}")]

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache=None):
        return self.model.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)

    def _generation_batch(self, prompts: Sequence[str], uncond: bool) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.generation_row(p) for p in prompts]
        if uncond:  # classifier-free guidance: the same start without the prompt
            rows += [[self.bos_id, self.boi_id]] * len(prompts)
        ids, mask = left_pad(rows, self.pad_id)
        return ids.to(self.device), mask.to(self.device)

    def _image_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the image codes only [..., K] in the model's dtype (Chameleon/Emu3 mask text tokens
        when drawing an image): the head's image-code rows alone, ``F.linear(hidden, W[image_ids], b[...])``,
        not the whole vocabulary then a selection (Emu3: 32k codes of a 184k vocabulary). Read from
        ``lm_head.weight`` at every call, so tied embeddings, training and merges are always current."""
        head = self.model.lm_head
        weight = getattr(head, "weight", None)
        # The restricted product needs a plain Linear with its weight materialised. A head that peft wraps
        # (LoRA or modules_to_save on lm_head) adds its own terms in forward, and a ZeRO-3 partitioned weight
        # (ds_id; gathered only by the module's forward hooks) is empty outside forward: those run the
        # full head, then select -- the same values, at the full head's cost.
        if not isinstance(head, torch.nn.Linear) or weight is None or hasattr(weight, "ds_id"):
            return head(hidden)[..., self.image_ids]
        rows = self._image_rows if self._image_rows is not None else self.image_ids
        bias = head.bias[rows] if head.bias is not None else None
        return F.linear(hidden, weight[rows], bias)

    def _image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """:meth:`_image_head` in float32 (what sampling draws from)."""
        return self._image_head(hidden).float()

    @property
    def _cfg(self) -> bool:
        return self.sampling.guidance_scale != 1.0

    # ------------------------------------------------------------------------------- text
    @torch.no_grad()
    def write_text(self, prompts: list[str], seeds: list[int], max_new_tokens: int,
                   temperature: float = 1.0, top_p: float = 1.0) -> list[str]:
        rows = [[self.bos_id, *self.words(p)] for p in prompts]
        written = write_tokens(self._forward, lambda h: self.model.lm_head(h).float() + self.text_bias, rows, seeds,
                               max_new_tokens, temperature, top_p, self.pad_id, self.eos_id, self.device)
        texts = self.tokenizer.batch_decode(written, skip_special_tokens=True)
        return [_SPACE_BEFORE_PUNCT.sub(r"\1", t).strip() for t in texts]

    # ------------------------------------------------------------------------------- images
    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        return self.sample_with_logprobs(prompts, seeds).tokens

    @torch.no_grad()
    def sample_with_logprobs(self, prompts: list[str], seeds: list[int]) -> ImageSamples:
        """Image codes [B, T] (indices into the codebook), one generator per sample, KV cache."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        s, n = self.sampling, len(prompts)
        ids, mask = self._generation_batch(prompts, self._cfg)
        pos = positions(mask)
        out = self._forward(ids, mask, pos)
        pos = pos[:, -1:]
        gens = make_generators(seeds, self.device)
        codes = torch.zeros((n, self.num_image_tokens), dtype=torch.long, device=self.device)
        logp = {k: torch.zeros(n, device=self.device) for k in ("sampling", "cfg", "conditional")}
        for t in range(self.num_image_tokens):
            logits = self._image_logits(out.last_hidden_state[:, -1])
            cond = logits[:n]
            mixed = logits[n:] + s.guidance_scale * (cond - logits[n:]) if self._cfg else cond
            warped = warp_logits(mixed, s.temperature, s.top_k, s.top_p)
            nxt = multinomial_per_sample(warped.softmax(-1), gens)
            codes[:, t] = nxt
            logp["sampling"] += token_logprobs(warped, nxt)
            logp["cfg"] += token_logprobs(mixed, nxt)
            logp["conditional"] += token_logprobs(cond, nxt)
            if t + 1 == self.num_image_tokens:
                break
            step = self.image_ids[nxt].repeat(2 if self._cfg else 1)[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos + 1
            out = self._forward(step, mask, pos, out.cache)
        return ImageSamples(codes.cpu(), logp["sampling"].cpu(), logp["cfg"].cpu(), logp["conditional"].cpu())

    def decode(self, samples: torch.Tensor, seeds: list[int] | None = None) -> np.ndarray:
        """Codes -> images through the codec (deterministic: seeds unused)."""
        return self.codec.decode(samples)

    # ------------------------------------------------------------------------------- yes / no
    @torch.no_grad()
    def yes_no(self, images: np.ndarray, questions: list[list[str]],
               batch_size: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """p(yes), p(no) at the last position of ``<s> <boi> image <eoi> question Answer:`` (softmax over
        the whole vocabulary, summed over spelling variants), ``batch_size`` rows per forward."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} question lists")
        batch = batch_size or self.score_batch_size
        image_ids = self.image_ids[self.codec.encode(np.asarray(images)).to(self.device)].tolist() if len(images) else []
        rows = [self.question_row(image_ids[i], q) for i, qs in enumerate(questions) for q in qs]
        p_yes, p_no = torch.zeros(len(rows)), torch.zeros(len(rows))
        for start in range(0, len(rows), batch):
            ids, mask = left_pad(rows[start:start + batch], self.pad_id)
            ids, mask = ids.to(self.device), mask.to(self.device)
            hidden = self.model.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                                      use_cache=False).last_hidden_state
            probs = self.model.lm_head(hidden[:, -1]).float().softmax(-1)
            p_yes[start:start + batch] = probs[:, self.yes_ids].sum(-1).cpu()
            p_no[start:start + batch] = probs[:, self.no_ids].sum(-1).cpu()
        return per_image(p_yes, p_no, questions)

    # ------------------------------------------------------------------------------- training
    def sequence_logprobs(self, prompts: list[str], tokens: torch.Tensor,
                          entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """sum_t log pi(z_t | x, z_<t) over the image codes [B, T] -> [B] (teacher forcing, no KV cache,
        differentiable). The head runs on the image-code rows only, ``logprob_chunk`` positions at a time,
        with a float32 log-sum-exp (:func:`~silmm.backends.common.image_code_logprobs`). ``entropy=True``
        returns ``(logps, mean per-token entropy [B], no grad)`` of the same (conditional or CFG) distribution.
        """
        tokens = tokens.to(self.device, torch.long)
        n = len(prompts)
        uncond = self._cfg and self.logprob_mode is LogprobMode.cfg
        ids, mask = self._generation_batch(prompts, uncond)
        image_in = self.image_ids[tokens[:, :-1]].repeat(2 if uncond else 1, 1)
        full_ids = torch.cat([ids, image_in], 1)
        full = torch.cat([mask, torch.ones_like(image_in)], 1)
        hidden = self.model.model(input_ids=full_ids, attention_mask=full, position_ids=positions(full),
                                  use_cache=False).last_hidden_state
        hidden = hidden[:, ids.shape[1] - 1:]  # <boi> predicts the first code
        if not uncond:
            return image_code_logprobs(hidden, self._image_head, tokens, self.logprob_chunk, entropy)
        scale = self.sampling.guidance_scale

        def mixed(c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:  # mixed in float32, as when sampling
            c, u = self._image_logits(c), self._image_logits(u)
            return u + scale * (c - u)

        return image_code_logprobs((hidden[:n], hidden[n:]), mixed, tokens, self.logprob_chunk, entropy)

    def enable_gradient_checkpointing(self) -> None:
        """Activation checkpointing of the causal LM's decoder layers (non-reentrant: the inputs are frozen
        under LoRA; see :func:`~silmm.backends.common.enable_gradient_checkpointing`). Active only while
        the model is in training mode."""
        enable_gradient_checkpointing(self.model)

    def merge_and_save(self, out_dir: str | Path, master: Master = own_values) -> None:
        """Merge in float32, write in the loaded checkpoint's dtype (silmm.backends.lora)."""
        state = self.merge_adapter(master)
        save_checkpoint(out_dir, self.model, self.tokenizer, self.codec, self.spec, state_dict=state)
