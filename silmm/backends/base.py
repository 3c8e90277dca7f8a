"""The one interface every stage uses to talk to a model. A new model family is one new subclass.

Contract (tests in tests/test_backend_*.py hold every backend to it):
- Reproducibility: a sample depends only on its seed, its prompt and the model, for a fixed batch size
  and device. Backends use one ``torch.Generator`` per sample, never the global RNG.
- Shapes: discrete samples are int64 token ids [B, T]; continuous samples are float32 features [B, L, D];
  images are uint8 numpy arrays [B, H, W, 3].
- Reference: inside ``with backend.reference():`` the model computes exactly what it computed before any
  LoRA adapter was added (the adapter is disabled, not removed).
- Saving: ``merge_and_save(dir)`` writes a checkpoint in the same layout as the one loaded, so the next
  iteration loads it with the same code, as both policy and reference.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from silmm.backends.lora import Master, own_values
from silmm.config import Device, Dtype, LoraConfig, ModelConfig, SamplingConfig


class CheckpointError(ValueError):
    """A checkpoint directory is missing or malformed; the message names the path and what is missing."""


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
DIFFUSERS_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")


def check_safetensors_weights(path: Path, names: tuple[str, ...] = WEIGHT_FILES) -> None:
    """Raise CheckpointError naming ``path`` unless it holds safetensors weights (one of ``names``) and its
    config.json does not point transformers at another file (``transformers_weights``, which transformers
    follows even with ``use_safetensors=True``). Every model load also passes ``use_safetensors=True``: a
    pickled ``pytorch_model.bin`` is never read, whatever else the directory holds."""
    import json

    if not any((path / name).is_file() for name in names):
        pickled = [p.name for p in sorted(path.glob("*")) if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        found = f"; found {', '.join(pickled)}, pickle files are not loaded" if pickled else ""
        raise CheckpointError(f"{path}: no weights ({' or '.join(names)}; only safetensors are loaded{found})")
    config = path / "config.json"
    if config.is_file():
        try:
            explicit = json.loads(config.read_text()).get("transformers_weights")
        except (json.JSONDecodeError, AttributeError) as exc:
            raise CheckpointError(f"{config}: not a valid JSON object: {exc}") from exc
        if explicit is not None and not str(explicit).endswith((".safetensors", ".safetensors.index.json")):
            raise CheckpointError(f"{config}: transformers_weights={explicit!r} is not a safetensors file "
                                  "(only safetensors are loaded)")


def check_transformers_checkpoint(path: Path, model_type: str, backend: str) -> None:
    """Raise CheckpointError naming the path and the first missing piece of a transformers multimodal
    checkpoint directory: config.json of ``model_type``, safetensors weights, a tokenizer and a processor."""
    import json

    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json (not a transformers checkpoint directory)")
    try:
        found = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(f"{config_file}: not a valid JSON object: {exc}") from exc
    if found != model_type:
        raise CheckpointError(f"{config_file}: model_type is {found!r}, the {backend} backend needs '{model_type}'")
    check_safetensors_weights(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise CheckpointError(f"{path}: no tokenizer (tokenizer.json / tokenizer_config.json)")
    if not (path / "processor_config.json").is_file() and not (path / "preprocessor_config.json").is_file():
        raise CheckpointError(f"{path}: no processor (processor_config.json / preprocessor_config.json)")


def resolve_device(model: ModelConfig) -> tuple[torch.device, torch.dtype]:
    """auto -> CUDA with bf16 when present, else CPU with fp32."""
    cuda = torch.cuda.is_available()
    if model.device is Device.cuda and not cuda:
        raise RuntimeError("model.device=cuda but no CUDA device is available")
    device = torch.device("cuda" if (model.device is Device.cuda or (model.device is Device.auto and cuda)) else "cpu")
    if model.dtype is Dtype.auto:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, model.dtype.value)
    return device, dtype


class LMMBackend(ABC):
    """An LMM that writes text, samples visual outputs, decodes them, and answers yes/no questions."""

    family: str  # "discrete" | "continuous"

    def __init__(self, model_cfg: ModelConfig, sampling: SamplingConfig):
        self.model_cfg = model_cfg
        self.sampling = sampling
        self.device, self.dtype = resolve_device(model_cfg)

    # --- Steps 1 and 3 -------------------------------------------------------------------------
    @abstractmethod
    def write_text(self, prompts: list[str], seeds: list[int], max_new_tokens: int,
                   temperature: float = 1.0, top_p: float = 1.0) -> list[str]:
        """Continue each text prompt (chat-formatted by the backend); temperature 0 means greedy."""

    # --- Step 2 --------------------------------------------------------------------------------
    @abstractmethod
    def sample(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """One visual sample per (prompt, seed): tokens [B, T] int64 or features [B, L, D] float32 (CPU)."""

    def generate(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """What the model draws when it is used rather than trained: the samples evaluation decodes. For a
        discrete backend that is ``sample`` (nucleus sampling is its generation). A continuous backend
        overrides it to draw H without the training-time diversity (DropDiv, noisy queries), as the paper
        evaluates DreamLLM: its images then differ by the decoder's noise alone."""
        return self.sample(prompts, seeds)

    @abstractmethod
    def decode(self, samples: torch.Tensor, seeds: list[int]) -> np.ndarray:
        """Samples -> images, uint8 [B, H, W, 3]. Seeds drive any decoder noise (diffusion)."""

    # --- Step 4 --------------------------------------------------------------------------------
    @abstractmethod
    def yes_no(self, images: np.ndarray, questions: list[list[str]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """For image i and its questions: (p_yes [Q_i], p_no [Q_i]) float32, from one prefill per batch
        reading the last position (never ``generate``), probabilities summed over "yes"/"no" variants."""

    # --- Step 5 (training) ---------------------------------------------------------------------
    def sequence_logprobs(self, prompts: list[str], tokens: torch.Tensor,
                          entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Discrete only: sum of log pi(z_t | x, z_<t) over image positions, [B] float32 (differentiable).

        ``entropy=True`` returns ``(logps [B], entropy [B])`` instead: the entropy (nats) of the policy's
        distribution over image codes, averaged over the image positions, without gradient (the trainer
        logs it as ``entropy/image_tokens``)."""
        raise TypeError(f"{type(self).__name__} is not a discrete backend")

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the language model's layer activations in the backward instead of keeping them
        (transformers' non-reentrant activation checkpointing; only in training mode). Every built-in
        backend implements it; a backend that cannot says so here rather than silently training without."""
        raise NotImplementedError(f"{type(self).__name__} does not implement enable_gradient_checkpointing; "
                                  "set train.gradient_checkpointing=false")

    def features(self, prompts: list[str]) -> torch.Tensor:
        """Continuous only: deterministic features H [B, L, D] (DropDiv off; differentiable)."""
        raise TypeError(f"{type(self).__name__} is not a continuous backend")

    @abstractmethod
    @contextmanager
    def reference(self) -> Iterator[None]:
        """Inside: the model as loaded (LoRA adapter disabled)."""

    @abstractmethod
    def add_lora(self, lora: LoraConfig) -> None:
        """Wrap the language model's targeted linear layers with a trainable LoRA adapter."""

    @abstractmethod
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer updates: LoRA weights (+ dream queries and projector for continuous)."""

    @abstractmethod
    def save_adapter(self, out_dir: str | Path, master: Master = own_values) -> None:
        """Trainable weights only (safetensors, float32 from ``master``), for inspection and resuming."""

    @abstractmethod
    def merge_and_save(self, out_dir: str | Path, master: Master = own_values) -> None:
        """Merge the adapter into the weights in float32 (trainable values from ``master``) and write a full
        checkpoint in the input's layout and dtype (silmm.backends.lora)."""
