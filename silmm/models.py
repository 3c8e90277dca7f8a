"""Which model a stage of an iteration uses, and loading it through its backend.

Iteration 1 starts from `model.path`; iteration K > 1 from iteration K-1's merged model, which is both
the policy's starting point and the reference (the trained model becomes the next reference).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import shutil
import time
from pathlib import Path

from silmm.backends.base import LMMBackend
from silmm.config import Backend, SilmmConfig
from silmm.rundir import RunDir

log = logging.getLogger(__name__)

# backend -> (module, class, tiny-checkpoint builder, tokenizer sub-folder)
BACKENDS: dict[Backend, tuple[str, str, str, str]] = {
    Backend.janus: ("silmm.backends.janus", "JanusBackend", "build_tiny_janus", "."),
    Backend.dream: ("silmm.backends.dream", "DreamBackend", "build_tiny_dream", "lmm"),
}


def build_tiny(backend: Backend | str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build a tiny random checkpoint atomically (a temporary sibling directory, then a rename)."""
    module, _, builder, _ = BACKENDS[Backend(backend)]
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    getattr(importlib.import_module(module), builder)(tmp, seed=seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, out_dir)
    except OSError:  # another task built it first: theirs is identical (same seed)
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_base_model(cfg: SilmmConfig) -> None:
    path = Path(cfg.model.path)
    if cfg.model.build_tiny_if_missing and not path.exists():
        t0 = time.time()
        build_tiny(cfg.model.backend, path, seed=cfg.run.seed)
        log.info("built tiny %s checkpoint at %s in %.1f s", cfg.model.backend.value, path, time.time() - t0)


def model_path(run: RunDir, iteration: int) -> Path:
    return Path(run.config.model.path) if iteration == 1 else run.model_dir(iteration - 1)


def load_backend(run: RunDir, iteration: int) -> LMMBackend:
    """The iteration's starting model (policy start = reference) through its backend."""
    cfg = run.config
    if iteration == 1:
        ensure_base_model(cfg)
    model_cfg = dataclasses.replace(cfg.model, path=str(model_path(run, iteration)))
    module, cls_name, _, _ = BACKENDS[cfg.model.backend]
    cls = getattr(importlib.import_module(module), cls_name)
    kwargs = {"logprob_mode": cfg.train.logprob_mode} if cfg.discrete else {}
    t0 = time.time()
    backend = cls.load(model_cfg, cfg.sampling, **kwargs)
    log.info("loaded %s from %s on %s/%s in %.1f s", cls_name, model_cfg.path, backend.device,
             str(backend.dtype).removeprefix("torch."), time.time() - t0)
    return backend


def load_tokenizer(run: RunDir, iteration: int):
    """The model's tokenizer alone (counting prompt tokens needs no weights)."""
    from transformers import AutoTokenizer

    if iteration == 1:
        ensure_base_model(run.config)
    sub = BACKENDS[run.config.model.backend][3]
    return AutoTokenizer.from_pretrained(str(model_path(run, iteration) / sub),
                                         trust_remote_code=run.config.model.trust_remote_code)
