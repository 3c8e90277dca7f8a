"""Continuous backend, DreamLLM-style, composed from library parts.

A LLaVA model (vision tower + projector + Llama) understands images and writes text. For generation, L
learnable *dream queries* are appended to the prompt's input embeddings (after the embedding of a
``dream_start_token`` where the head config names one, as DreamLLM's ``<dream_start>``); the last hidden states
(after the final norm) at those positions form the feature matrix H [L, D]. A linear *dream projector* (DreamLLM's
has no bias) maps H to the cross-attention conditioning of a diffusers decoder (UNet + VAE + scheduler), which
renders the image. DreamLLM also feeds ``<dream_end>`` after the queries; under causal attention it cannot change H,
so it is left out.

Checkpoint layout (one directory, loaded by :meth:`DreamBackend.load`, written by ``merge_and_save``)::

    lmm/         LlavaForConditionalGeneration + its processor/tokenizer (``from_pretrained``)
    decoder/     unet/, vae/, scheduler/ sub-folders (a Stable Diffusion pipeline directory works as is)
    dream_head/  model.safetensors (queries [L, D], projector.weight [C, D], projector.bias [C])
                 config.json (sizes and the prompt templates)

Diversity (SILMM step 2): ``dropdiv`` puts dropout after the MLPs of chosen Llama layers through forward
hooks, registered only while sampling (Llama MLPs have no dropout, and swapping modules would change
state-dict keys and LoRA target names); ``noisy_queries`` adds Gaussian noise to the dream queries
(the paper's "Noisy DreamEmb" ablation). Masks and noise come from one CPU generator per sample, drawn
over that sample's own (unpadded) positions, so a sample does not depend on its batch neighbours.

Classifier-free guidance in ``decode``, as DreamLLM's pipeline does it: the unconditional H is the features of the
empty prompt (``prompt_template`` formatted with ""), computed by the current model without DropDiv, so it is the
same whenever the same model decodes (the samples stage, and the scores stage re-decoding kept H).

The modules stay in eval mode: the only randomness is DropDiv/noise while sampling, so ``features`` is
deterministic (LoRA dropout is inactive unless a caller switches ``train()`` on itself).
"""

from __future__ import annotations

import copy
import inspect
import json
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from silmm.backends.base import (
    DIFFUSERS_WEIGHT_FILES,
    CheckpointError,
    LMMBackend,
    check_safetensors_weights,
    resolve_device,
)
from silmm.backends.common import (
    apply_lora,
    build_tiny_tokenizer,
    enable_gradient_checkpointing,
    make_generators,
    multinomial_per_sample,
    randn_per_sample,
    yes_no_token_ids,
)
from silmm.backends.lora import Master, adapter_state_dict, merged_state_dict, own_values, stored_dtype
from silmm.config import Diversity, DropDivPlacement, LoraConfig, ModelConfig, SamplingConfig

LMM_DIR, DECODER_DIR, HEAD_DIR = "lmm", "decoder", "dream_head"
DECODER_PARTS = ("unet", "vae", "scheduler")
HEAD_WEIGHTS, HEAD_CONFIG = "model.safetensors", "config.json"
ADAPTER_DIR = "adapter"


# ------------------------------------------------------------------------------------- dream head
@dataclass
class DreamHeadConfig:
    num_queries: int
    hidden_size: int  # the LLM's hidden size D
    cross_attention_dim: int  # the UNet's conditioning size C
    # what the LLM sees before the dream queries; LLaVA-1.5's conversation format by default
    prompt_template: str = "USER: Generate an image of {prompt} ASSISTANT:"
    chat_template: str = "USER: {prompt} ASSISTANT:"
    # split at {question}: the part before it (with the processor's image token) is encoded once per image
    question_template: str = "USER: <image>\n{question} Answer yes or no. ASSISTANT:"
    projector_bias: bool = True  # DreamLLM's projector into the UNet has none
    dream_start_token: str = ""  # a token whose embedding precedes the queries (DreamLLM: "<dream_start>")

    @classmethod
    def read(cls, path: Path) -> DreamHeadConfig:
        try:
            cfg = cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: malformed dream head config: {exc}") from exc
        if "{question}" not in cfg.question_template:
            raise CheckpointError(f"{path}: question_template needs '{{question}}'")
        return cfg

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")


class DreamHead(nn.Module):
    """The learnable dream queries and the projector from the LLM's hidden size to the UNet's."""

    def __init__(self, cfg: DreamHeadConfig):
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(cfg.num_queries, cfg.hidden_size))
        self.projector = nn.Linear(cfg.hidden_size, cfg.cross_attention_dim, bias=cfg.projector_bias)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features.float())

    def save(self, out_dir: Path, cfg: DreamHeadConfig, master: Master = own_values) -> None:
        """float32 weights, from ``master`` (the optimizer's copy when training ran in bf16)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: master(p).cpu().contiguous() for k, p in self.named_parameters()}, str(out_dir / HEAD_WEIGHTS))
        cfg.write(out_dir / HEAD_CONFIG)


def load_head(head_dir: Path) -> tuple[DreamHead, DreamHeadConfig]:
    for name in (HEAD_CONFIG, HEAD_WEIGHTS):
        if not (head_dir / name).is_file():
            raise CheckpointError(f"{head_dir}: missing {HEAD_DIR}/{name}")
    cfg = DreamHeadConfig.read(head_dir / HEAD_CONFIG)
    head = DreamHead(cfg)
    try:
        head.load_state_dict(load_file(str(head_dir / HEAD_WEIGHTS)), strict=True)
    except (RuntimeError, OSError) as exc:  # wrong keys/shapes, or not a safetensors file
        raise CheckpointError(f"{head_dir / HEAD_WEIGHTS}: does not fit {HEAD_CONFIG}: {exc}") from exc
    return head, cfg


# ------------------------------------------------------------------------------------------ DropDiv
def dropdiv_layer_indices(placement: DropDivPlacement, num_layers: int, last_k: int) -> list[int]:
    """Which decoder layers get dropout after their MLP (paper: the last few; ablation: halves, all)."""
    half = num_layers // 2
    if placement is DropDivPlacement.last:
        return list(range(max(num_layers - last_k, 0), num_layers))
    if placement is DropDivPlacement.first_half:
        return list(range(half))
    if placement is DropDivPlacement.second_half:
        return list(range(half, num_layers))
    return list(range(num_layers))


def _dropout_masks(generators: Sequence[torch.Generator], lengths: Sequence[int], seq_len: int, width: int,
                   rate: float) -> torch.Tensor:
    """[B, T, D] inverted-dropout masks; row b is drawn over its own last ``lengths[b]`` positions only,
    so that padding (i.e. the batch's other prompts) does not shift a sample's random stream."""
    masks = torch.ones(len(generators), seq_len, width)
    for b, (g, n) in enumerate(zip(generators, lengths, strict=True)):
        keep = torch.rand(n, width, generator=g) >= rate
        masks[b, seq_len - n:] = keep.float() / (1.0 - rate)
    return masks


@contextmanager
def dropdiv_hooks(mlps: Sequence[nn.Module], rate: float, generators: Sequence[torch.Generator],
                  lengths: Sequence[int]) -> Iterator[None]:
    """Dropout on the outputs of ``mlps`` while inside; the hooks are removed on exit."""

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        mask = _dropout_masks(generators, lengths, output.shape[1], output.shape[2], rate)
        return output * mask.to(device=output.device, dtype=output.dtype)

    handles = [m.register_forward_hook(hook) for m in mlps]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------- text sampling
def _next_tokens(logits: torch.Tensor, generators: Sequence[torch.Generator], temperature: float,
                 top_p: float) -> torch.Tensor:
    """Greedy at temperature 0, else nucleus sampling with one generator per row."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return multinomial_per_sample(probs.cpu(), generators).to(logits.device)


def _positions(mask: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Position ids that skip left padding, so a row's positions do not depend on its neighbours."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0) + offset


# ------------------------------------------------------------------------------------------- backend
class DreamBackend(LMMBackend):
    """LLaVA + dream queries + diffusion decoder; see the module docstring for the layout."""

    family = "continuous"

    def __init__(self, model_cfg: ModelConfig, sampling: SamplingConfig, path: Path, lmm: nn.Module,
                 processor, head: DreamHead, head_cfg: DreamHeadConfig, unet: nn.Module, vae: nn.Module,
                 scheduler):
        super().__init__(model_cfg, sampling)
        self.path, self.processor, self.head_cfg = path, processor, head_cfg
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.base = lmm.to(self.device).eval().requires_grad_(False)  # the LlavaForConditionalGeneration
        self.lmm: nn.Module = self.base  # the PeftModel once add_lora ran
        self.language_model = self.base.model.language_model
        self.layers = self.language_model.layers
        self.head = head.to(self.device)
        self._reference_head = copy.deepcopy(head).to(self.device).requires_grad_(False)
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.scheduler = scheduler
        self.yes_ids, self.no_ids = yes_no_token_ids(self.tokenizer)
        self.dream_start_id = _special_token_id(self.tokenizer, head_cfg.dream_start_token, path)
        image_token = getattr(processor, "image_token", "<image>")
        if image_token not in self.question_parts()[0]:
            raise CheckpointError(f"{path / HEAD_DIR / HEAD_CONFIG}: question_template needs the processor's image "
                                  f"token {image_token!r} before '{{question}}'")

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, model_cfg: ModelConfig, sampling: SamplingConfig) -> DreamBackend:
        path = Path(model_cfg.path)
        _check_layout(path)
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        head, head_cfg = load_head(path / HEAD_DIR)
        dtype = resolve_device(model_cfg)[1]
        trust = model_cfg.trust_remote_code
        try:
            lmm = LlavaForConditionalGeneration.from_pretrained(str(path / LMM_DIR), dtype=dtype,
                                                                use_safetensors=True)
            processor = AutoProcessor.from_pretrained(str(path / LMM_DIR), trust_remote_code=trust)
            decoder = str(path / DECODER_DIR)
            unet = UNet2DConditionModel.from_pretrained(decoder, subfolder="unet", torch_dtype=dtype,
                                                        use_safetensors=True)
            vae = AutoencoderKL.from_pretrained(decoder, subfolder="vae", torch_dtype=dtype, use_safetensors=True)
            scheduler = _load_scheduler(path / DECODER_DIR / "scheduler")
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: cannot load the dream checkpoint: {exc}") from exc
        _check_sizes(path, head_cfg, lmm, unet)
        return cls(model_cfg, sampling, path, lmm, processor, head, head_cfg, unet, vae, scheduler)

    # ---------------------------------------------------------------------------------- writing
    @torch.no_grad()
    def write_text(self, prompts: list[str], seeds: list[int], max_new_tokens: int,
                   temperature: float = 1.0, top_p: float = 1.0) -> list[str]:
        texts = [self.head_cfg.chat_template.format(prompt=p) for p in prompts]
        enc = self.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        generators = make_generators(seeds)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        out = self.base(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True,
                        logits_to_keep=1)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=self.device)
        written: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            token = _next_tokens(out.logits[:, -1], generators, temperature, top_p)
            token = torch.where(done, torch.full_like(token, pad), token)
            written.append(token)
            done |= token == eos
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = self.base(input_ids=token[:, None], attention_mask=mask, cache=out.cache,
                            position_ids=_positions(mask)[:, -1:], use_cache=True, logits_to_keep=1)
        if not written:
            return ["" for _ in prompts]
        rows = torch.stack(written, dim=1).tolist()
        return [self.tokenizer.decode(_until(row, eos), skip_special_tokens=True).strip() for row in rows]

    # ----------------------------------------------------------------------------------- features
    def _dream_forward(self, prompts: list[str], query_noise: torch.Tensor | None = None,
                       dropout: tuple[float, list[torch.Generator]] | None = None) -> torch.Tensor:
        """Prompt + dream queries through the Llama model -> last hidden states at the queries [B, L, D]."""
        texts = [self.head_cfg.prompt_template.format(prompt=p) for p in prompts]
        enc = self.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
        ids = enc["input_ids"]
        if self.dream_start_id is not None:
            ids = torch.cat([ids, ids.new_full((len(prompts), 1), self.dream_start_id)], dim=1)
        embeds = self.base.get_input_embeddings()(ids)
        num_q = self.head.queries.shape[0]
        queries = self.head.queries.to(embeds.dtype).expand(len(prompts), -1, -1)
        if query_noise is not None:
            queries = queries + query_noise.to(queries)
        embeds = torch.cat([embeds, queries], dim=1)
        text_mask = enc["attention_mask"]
        appended = ids.shape[1] - text_mask.shape[1] + num_q  # the dream start token, if any, and the queries
        mask = torch.cat([text_mask, text_mask.new_ones(len(prompts), appended)], dim=1)
        hooks = nullcontext()
        if dropout is not None:
            rate, generators = dropout
            mlps = [self.layers[i].mlp for i in self.dropdiv_layers()]
            hooks = dropdiv_hooks(mlps, rate, generators, mask.sum(-1).tolist())
        with hooks:
            out = self.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=_positions(mask),
                                      use_cache=False)
        return out.last_hidden_state[:, -num_q:]

    def dropdiv_layers(self) -> list[int]:
        s = self.sampling
        return dropdiv_layer_indices(s.dropdiv_placement, len(self.layers), s.dropdiv_layers)

    def features(self, prompts: list[str]) -> torch.Tensor:
        return self._dream_forward(prompts).float()

    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        s = self.sampling
        generators = make_generators(seeds)
        if s.diversity is Diversity.noisy_queries:
            noise = randn_per_sample(generators, tuple(self.head.queries.shape)) * s.query_noise_std
            features = self._dream_forward(prompts, query_noise=noise)
        else:
            features = self._dream_forward(prompts, dropout=(s.dropdiv_rate, generators))
        return features.float().cpu()

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        # H is deterministic: one forward per distinct prompt (evaluation draws several images of each);
        # the seeds drive the decoder's noise only (decode)
        distinct = list(dict.fromkeys(prompts))
        row = {p: i for i, p in enumerate(distinct)}
        return self.features(distinct).cpu()[[row[p] for p in prompts]]

    # ------------------------------------------------------------------------------------ decoding
    @torch.no_grad()
    def decode(self, samples: torch.Tensor, seeds: list[int]) -> np.ndarray:
        s = self.sampling
        cond = self.head.project(samples.to(self.device))
        guided = s.decoder_guidance_scale > 1.0
        if guided:  # unconditional branch: the empty prompt's H (see the module docstring)
            uncond = self.head.project(self._dream_forward([""]).float()).expand(len(samples), -1, -1)
            cond = torch.cat([uncond, cond])
        cond = cond.to(self.dtype)
        generators = make_generators(seeds)
        latents = self._initial_latents(generators)
        self.scheduler.set_timesteps(s.decoder_steps, device=self.device)
        step_kwargs = {"generator": generators} if "generator" in inspect.signature(self.scheduler.step).parameters \
            else {}
        for t in self.scheduler.timesteps:
            x = torch.cat([latents, latents]) if guided else latents
            x = self.scheduler.scale_model_input(x, t)
            eps = self.unet(x, t, encoder_hidden_states=cond).sample
            if guided:
                uncond, text = eps.chunk(2)
                eps = uncond + s.decoder_guidance_scale * (text - uncond)
            latents = self.scheduler.step(eps, t, latents, **step_kwargs).prev_sample
        return self._latents_to_images(latents)

    def _initial_latents(self, generators: list[torch.Generator]) -> torch.Tensor:
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (self.unet.config.in_channels, *size)
        noise = randn_per_sample(generators, shape, dtype=torch.float32, device=self.device)
        return (noise * self.scheduler.init_noise_sigma).to(self.dtype)

    def _latents_to_images(self, latents: torch.Tensor) -> np.ndarray:
        cfg = self.vae.config
        latents = latents / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        pixels = self.vae.decode(latents.to(self.dtype)).sample.float()
        pixels = ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).cpu().numpy()

    # ------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def yes_no(self, images: np.ndarray, questions: list[list[str]]) -> list[tuple[np.ndarray, np.ndarray]]:
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} question lists")
        pairs = [(i, q) for i, qs in enumerate(questions) for q in qs]
        if not pairs:
            return [(np.zeros(0, np.float32), np.zeros(0, np.float32)) for _ in questions]
        cache, prefix_len = self._image_prefix(images)
        # one cache row per (image, question): the image's prefix is encoded once and shared
        cache.reorder_cache(torch.tensor([i for i, _ in pairs], device=self.device))
        ids, mask = self._question_suffixes([q for _, q in pairs])
        full_mask = torch.cat([mask.new_ones(len(pairs), prefix_len), mask], dim=1)
        out = self.base(input_ids=ids, attention_mask=full_mask, cache=cache,
                        position_ids=_positions(mask, prefix_len), use_cache=True, logits_to_keep=1)
        probs = torch.softmax(out.logits[:, -1].float(), dim=-1)
        p_yes = probs[:, self.yes_ids].sum(-1).cpu().numpy()
        p_no = probs[:, self.no_ids].sum(-1).cpu().numpy()
        return _split_by_image(p_yes, p_no, questions)

    def question_parts(self) -> tuple[str, str]:
        """The question template split at {question}: (prefix with the image, suffix format)."""
        prefix, rest = self.head_cfg.question_template.split("{question}", 1)
        return prefix, "{question}" + rest

    def _image_prefix(self, images: np.ndarray):
        prefix, _ = self.question_parts()
        enc = self.processor(text=[prefix] * len(images), images=list(images), return_tensors="pt")
        out = self.base(input_ids=enc["input_ids"].to(self.device),
                        attention_mask=enc["attention_mask"].to(self.device),
                        pixel_values=enc["pixel_values"].to(self.device, self.dtype),
                        use_cache=True, logits_to_keep=1)
        return out.cache, enc["input_ids"].shape[1]

    def _question_suffixes(self, questions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        _, suffix = self.question_parts()
        enc = self.tokenizer([suffix.format(question=q) for q in questions], padding=True,
                             add_special_tokens=False, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    # ------------------------------------------------------------------------------------ training
    @contextmanager
    def reference(self) -> Iterator[None]:
        live = self.head
        self.head = self._reference_head
        adapter_off = self.lmm.disable_adapter() if self.has_adapter else nullcontext()
        try:
            with adapter_off:
                yield
        finally:
            self.head = live

    @property
    def has_adapter(self) -> bool:
        return self.lmm is not self.base

    def add_lora(self, lora: LoraConfig) -> None:
        if self.has_adapter:
            raise RuntimeError("a LoRA adapter is already attached")
        self.lmm = apply_lora(self.base, lora)
        self.base.eval()  # DropDiv is the only intended randomness; see the module docstring

    def enable_gradient_checkpointing(self) -> None:
        """Activation checkpointing of the LLaVA model's decoder layers (non-reentrant, because the layers'
        inputs are frozen under LoRA; see :func:`~silmm.backends.common.enable_gradient_checkpointing`).
        transformers checkpoints only modules in training mode: the modules stay in eval mode here (see
        the module docstring) until the trainer switches them to train mode (``engine.train()``)."""
        enable_gradient_checkpointing(self.base)

    def trainable_parameters(self) -> list[nn.Parameter]:
        lora = [p for p in self.lmm.parameters() if p.requires_grad] if self.has_adapter else []
        return lora + list(self.head.parameters())

    def save_adapter(self, out_dir: str | Path, master: Master = own_values) -> None:
        """LoRA adapter and dream head in float32, from ``master`` (silmm.backends.lora)."""
        out = Path(out_dir)
        if self.has_adapter:
            self.lmm.save_pretrained(str(out / ADAPTER_DIR), state_dict=adapter_state_dict(self.lmm, master),
                                     safe_serialization=True)
        self.head.save(out / HEAD_DIR, self.head_cfg, master)

    def load_adapter(self, in_dir: str | Path) -> None:
        """Restore what ``save_adapter`` wrote (call ``add_lora`` with the same config first)."""
        from peft import set_peft_model_state_dict

        src = Path(in_dir)
        adapter_file = src / ADAPTER_DIR / "adapter_model.safetensors"
        if adapter_file.is_file():
            if not self.has_adapter:
                raise RuntimeError(f"{src}: holds a LoRA adapter; call add_lora before load_adapter")
            result = set_peft_model_state_dict(self.lmm, load_file(str(adapter_file), device=str(self.device)))
            if result.unexpected_keys:
                raise CheckpointError(f"{adapter_file}: unexpected keys {result.unexpected_keys[:5]}")
        head, _ = load_head(src / HEAD_DIR)
        self.head.load_state_dict(head.state_dict())

    def merge_and_save(self, out_dir: str | Path, master: Master = own_values) -> None:
        """Merged LMM + current dream head + the decoder's files, written to a temporary sibling and
        renamed, so that ``out_dir`` exists only complete (an existing ``out_dir`` is replaced)."""
        out = Path(out_dir)
        if out.resolve() == self.path.resolve():
            raise ValueError(f"{out}: refusing to overwrite the checkpoint this backend was loaded from")
        tmp = out.parent / f".{out.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # merged in float32, written in the loaded checkpoint's dtype; the live model is not modified, so
        # the adapter and the reference stay usable after saving
        state = merged_state_dict(self.base, stored_dtype(self.path / LMM_DIR), master)
        self.base.save_pretrained(str(tmp / LMM_DIR), state_dict=state)
        self.processor.save_pretrained(str(tmp / LMM_DIR))
        self.head.save(tmp / HEAD_DIR, self.head_cfg, master)
        _copy_decoder(self.path / DECODER_DIR, tmp / DECODER_DIR)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)


# ------------------------------------------------------------------------------------------ helpers
def _special_token_id(tokenizer, token: str, path: Path) -> int | None:
    if not token:
        return None
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise CheckpointError(f"{path / HEAD_DIR / HEAD_CONFIG}: dream_start_token {token!r} is not one token of "
                              f"the tokenizer in {LMM_DIR}/")
    return ids[0]


def _until(row: list[int], eos: int | None) -> list[int]:
    return row[:row.index(eos)] if eos is not None and eos in row else row


def _split_by_image(p_yes: np.ndarray, p_no: np.ndarray,
                    questions: list[list[str]]) -> list[tuple[np.ndarray, np.ndarray]]:
    out, start = [], 0
    for qs in questions:
        end = start + len(qs)
        out.append((p_yes[start:end].astype(np.float32), p_no[start:end].astype(np.float32)))
        start = end
    return out


def _load_scheduler(folder: Path):
    """The scheduler class named in its config (DDIM, DPM-Solver, ...), as a pipeline would pick it."""
    import diffusers

    config = folder / "scheduler_config.json"
    if not config.is_file():
        raise CheckpointError(f"{folder}: missing scheduler_config.json")
    name = json.loads(config.read_text()).get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise CheckpointError(f"{config}: unknown scheduler class {name!r}")
    return cls.from_pretrained(str(folder))


def _check_layout(path: Path) -> None:
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    for sub in (LMM_DIR, DECODER_DIR, HEAD_DIR):
        if not (path / sub).is_dir():
            raise CheckpointError(f"{path}: missing sub-folder '{sub}/' (expected {LMM_DIR}/, {DECODER_DIR}/, "
                                  f"{HEAD_DIR}/)")
    if not (path / LMM_DIR / "config.json").is_file():
        raise CheckpointError(f"{path}: missing {LMM_DIR}/config.json")
    check_safetensors_weights(path / LMM_DIR)
    for part in DECODER_PARTS:
        if not (path / DECODER_DIR / part).is_dir():
            raise CheckpointError(f"{path}: missing sub-folder '{DECODER_DIR}/{part}/'")
        if part in ("unet", "vae"):
            check_safetensors_weights(path / DECODER_DIR / part, DIFFUSERS_WEIGHT_FILES)


def _check_sizes(path: Path, head_cfg: DreamHeadConfig, lmm: nn.Module, unet: nn.Module) -> None:
    hidden = lmm.config.text_config.hidden_size
    if head_cfg.hidden_size != hidden:
        raise CheckpointError(f"{path}: {HEAD_DIR} hidden_size {head_cfg.hidden_size} != LLM hidden size {hidden}")
    cross = unet.config.cross_attention_dim
    if head_cfg.cross_attention_dim != cross:
        raise CheckpointError(f"{path}: {HEAD_DIR} cross_attention_dim {head_cfg.cross_attention_dim} != "
                              f"UNet cross_attention_dim {cross}")


def _copy_decoder(src: Path, dst: Path) -> None:
    """The decoder is frozen: copy the parts we load byte for byte (no dtype round trip). A pipeline's
    model_index.json is left out, as it would name a text encoder that is not copied."""
    dst.mkdir(parents=True)
    for part in DECODER_PARTS:
        shutil.copytree(src / part, dst / part)


# ------------------------------------------------------------------------------------ tiny builder
def build_tiny_dream(out_dir: str | Path, seed: int = 0, image_size: int = 32, num_queries: int = 8) -> Path:
    """A tiny random checkpoint in the layout :meth:`DreamBackend.load` reads, deterministic from ``seed``.

    Tiny CLIP vision + tiny Llama LLaVA, a tiny UNet/VAE for ``image_size`` pixels (32 or 64), a DDIM
    scheduler, and the offline tokenizer from ``common``. The global RNG is left as it was.
    """
    if image_size not in (32, 64):
        raise ValueError(f"image_size must be 32 or 64, got {image_size}")
    out = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        processor = _tiny_processor()
        lmm = _tiny_llava(processor.tokenizer)
        unet, vae, scheduler = _tiny_decoder(image_size)
        head_cfg = DreamHeadConfig(num_queries=num_queries, hidden_size=lmm.config.text_config.hidden_size,
                                   cross_attention_dim=unet.config.cross_attention_dim)
        head = DreamHead(head_cfg)
        nn.init.normal_(head.queries, std=0.02)  # like token embeddings
    return save_checkpoint(out, processor, lmm, head, head_cfg, unet, vae, scheduler)


def save_checkpoint(out_dir: str | Path, processor, lmm: nn.Module, head: DreamHead, head_cfg: DreamHeadConfig,
                    unet: nn.Module, vae: nn.Module, scheduler) -> Path:
    """Modules in memory -> the layout :meth:`DreamBackend.load` reads (builders and pretraining write this)."""
    out = Path(out_dir)
    lmm.save_pretrained(str(out / LMM_DIR))
    processor.save_pretrained(str(out / LMM_DIR))
    unet.save_pretrained(str(out / DECODER_DIR / "unet"), safe_serialization=True)
    vae.save_pretrained(str(out / DECODER_DIR / "vae"), safe_serialization=True)
    scheduler.save_pretrained(str(out / DECODER_DIR / "scheduler"))
    head.save(out / HEAD_DIR, head_cfg)
    return out


_VISION_SIZE, _PATCH = 32, 8


def _tiny_processor():
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    tokenizer = build_tiny_tokenizer(extra_special_tokens={"image_token": "<image>"}, vocab_size=512)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": _VISION_SIZE},
                                            crop_size={"height": _VISION_SIZE, "width": _VISION_SIZE})
    # LLaVA-1.5's processor settings: one CLS token that "default" feature selection drops
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=_PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def _tiny_llava(tokenizer) -> nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=_VISION_SIZE, patch_size=_PATCH, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    return LlavaForConditionalGeneration(config).eval()


def _tiny_decoder(image_size: int):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        block_out_channels=(32, 32, 32), norm_num_groups=32, sample_size=image_size)
    unet = UNet2DConditionModel(sample_size=image_size // 4, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False)
    return unet, vae, scheduler
