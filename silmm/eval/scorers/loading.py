"""Loading an expert judge: device and dtype as the backends choose them, a checkpoint check that names what
is missing, and ``from_pretrained`` of a model class and its processor from a local directory (no network)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from silmm.backends.base import CheckpointError

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # released / transformers >= 5 names


def device_dtype(device: str | torch.device | None, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """``resolve_device`` semantics: CUDA when present, bf16 on CUDA and fp32 on CPU unless given."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, dtype


def require_checkpoint(path: str | Path, what: str,
                       files: Sequence[str | tuple[str, ...]] = ("config.json", PROCESSOR_FILES)) -> Path:
    """The directory exists and holds ``files`` (a tuple entry: any one of them); else CheckpointError naming
    the path and what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{what} checkpoint {path}: no such directory")
    missing = []
    for f in files:
        options = (f,) if isinstance(f, str) else f
        if not any((path / o).is_file() for o in options):
            missing.append(" or ".join(options))
    if missing:
        raise CheckpointError(f"{what} checkpoint {path}: missing {', '.join(missing)}")
    return path


def load_pretrained(model_cls: Any, processor_cls: Any, path: str | Path, what: str,
                    device: str | torch.device | None, dtype: torch.dtype | None
                    ) -> tuple[Any, Any, torch.device, torch.dtype, Path]:
    """(model in eval mode on its device, processor, device, dtype, path); CheckpointError names the path."""
    path = require_checkpoint(path, what)
    dev, dt = device_dtype(device, dtype)
    try:
        model = model_cls.from_pretrained(str(path), dtype=dt, use_safetensors=True)  # never a pickle
        processor = processor_cls.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{what} checkpoint {path}: cannot load ({e})") from e
    return model.to(dev).eval(), processor, dev, dt, path
