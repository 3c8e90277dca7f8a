"""Which model a stage of an iteration uses, and loading it through its backend.

Iteration 1 starts from `model.path`; iteration K > 1 from iteration K-1's merged model, which is both
the policy's starting point and the reference (the trained model becomes the next reference).
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from silmm import plugins
from silmm.backends.base import LMMBackend
from silmm.config import Backend, ConfigError, Judge, SilmmConfig
from silmm.rundir import RunDir

log = logging.getLogger(__name__)
PRETRAIN_RECORD = "pretrain.json"  # in a pretrained base model: {"key": what it depends on, ...}

# backend -> (module, class, tiny-checkpoint builder, tokenizer sub-folder); builder None: a plug-in's
# tiny_builders entry (silmm/plugins.py) supplies it -- fusion needs an image codec and words to build one
BACKENDS: dict[Backend, tuple[str, str, str | None, str]] = {
    Backend.janus: ("silmm.backends.janus", "JanusBackend", "build_tiny_janus", "."),
    Backend.dream: ("silmm.backends.dream", "DreamBackend", "build_tiny_dream", "lmm"),
    Backend.fusion: ("silmm.backends.fusion", "FusionBackend", None, "."),
    Backend.emu3: ("silmm.backends.emu3", "Emu3Backend", "build_tiny_emu3", "."),
    Backend.seed_llama: ("silmm.backends.seed_llama", "SeedLlamaBackend", "build_tiny_seed_llama", "llm"),
}


def build_tiny(backend: Backend | str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build a tiny random checkpoint atomically (a temporary sibling directory, then a rename)."""
    backend = Backend(backend)
    module, _, builder, _ = BACKENDS[backend]
    build = (plugins.get("tiny_builders", backend.value) if builder is None
             else getattr(importlib.import_module(module), builder))
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp, seed=seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, out_dir)
    except OSError:  # another task built it first: theirs is identical (same seed)
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_base_model(cfg: SilmmConfig) -> None:
    path = Path(cfg.model.path)
    if pretraining(cfg):
        check_pretrained(cfg)
        if not path.exists():
            raise FileNotFoundError(f"{path}: the toy LMM is not pretrained yet (the driver's pretrain stage writes it)")
        return
    if cfg.model.build_tiny_if_missing and not path.exists():
        t0 = time.time()
        build_tiny(cfg.model.backend, path, seed=cfg.run.seed)
        log.info("built tiny %s checkpoint at %s in %.1f s", cfg.model.backend.value, path, time.time() - t0)


def pretraining(cfg: SilmmConfig) -> str | None:
    """The plug-in whose pretrain stage writes the base model at model.path (the driver runs it before
    iteration 1), or None: the base model is a checkpoint on disk. Only the toy world pretrains today."""
    return "toy" if cfg.toy.enabled else None


def check_pretrained(cfg: SilmmConfig) -> None:
    """A base model written by a pretrain stage records the key of its settings in pretrain.json; reusing it
    for a config whose pretraining has another key (the plug-in's pretraining ``cache_key``) is a ConfigError
    naming what differs. Nothing to check without a pretraining or before the model exists."""
    name = pretraining(cfg)
    record = Path(cfg.model.path) / PRETRAIN_RECORD
    if name is None or not record.is_file():
        return
    have = json.loads(record.read_text()).get("key", {})
    # through JSON, as stored: tuples become lists
    want = json.loads(json.dumps(plugins.get("pretraining", name)(cfg)))
    diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    if diff:
        raise ConfigError(f"{record}: the cached toy LMM at model.path was pretrained with other settings "
                          f"({', '.join(diff)} differ); delete {cfg.model.path} or choose another model.path")


def model_path(run: RunDir, iteration: int) -> Path:
    return Path(run.config.model.path) if iteration == 1 else run.model_dir(iteration - 1)


# The models loaded by the task running in this process, while it works through several shards (shared_models);
# None otherwise: every load_backend loads.
_shared: dict[str, LMMBackend] | None = None


@contextmanager
def shared_models() -> Iterator[None]:
    """Inside, load_backend hands out the model it already loaded for the same checkpoint and settings, so a
    task working through several shards (tasks.ShardGroup) reads the weights once; on exit they are released.
    The stages use a model read-only (every draw seeded by its own arguments), so a shard computed with a
    model shared with earlier shards is the shard a fresh model writes (tested byte for byte)."""
    global _shared
    if _shared is not None:  # nested: the outer task owns the models
        yield
        return
    _shared = {}
    try:
        yield
    finally:
        _shared = None
        gc.collect()  # the weights go now, not whenever the collector next runs
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def load_backend(run: RunDir, iteration: int, path: str | Path | None = None) -> LMMBackend:
    """The iteration's starting model (policy start = reference) through its backend; ``path``: another
    checkpoint of the same backend (a separate judge). Within shared_models(), loaded once per checkpoint."""
    cfg = run.config
    if iteration == 1 and path is None:
        ensure_base_model(cfg)
    model_cfg = dataclasses.replace(cfg.model, path=str(path if path is not None else model_path(run, iteration)))
    module, cls_name, _, _ = BACKENDS[cfg.model.backend]
    kwargs = {"logprob_mode": cfg.train.logprob_mode} if cfg.discrete else {}
    key = repr((cls_name, model_cfg, cfg.sampling, kwargs))  # everything the load below depends on
    if _shared is not None and key in _shared:
        log.info("%s from %s: loaded already by this task, shared", cls_name, model_cfg.path)
        return _shared[key]
    cls = getattr(importlib.import_module(module), cls_name)
    t0 = time.time()
    backend = cls.load(model_cfg, cfg.sampling, **kwargs)
    log.info("loaded %s from %s on %s/%s in %.1f s", cls_name, model_cfg.path, backend.device,
             str(backend.dtype).removeprefix("torch."), time.time() - t0)
    if _shared is not None:
        _shared[key] = backend
    return backend


def separate_judge(cfg: SilmmConfig) -> bool:
    """Whether another model than the iteration's own judges it (feedback.judge=base or judge_path)."""
    return cfg.feedback.judge_path is not None or cfg.feedback.judge is Judge.base


def judge_path(run: RunDir, iteration: int) -> Path:
    fb = run.config.feedback
    if fb.judge_path is not None:
        return Path(fb.judge_path)
    return model_path(run, 1 if fb.judge is Judge.base else iteration)


def load_judge(run: RunDir, iteration: int) -> LMMBackend:
    """The model that writes questions and answers them in ``iteration``: its start model (the paper), the
    model at model.path when ``feedback.judge=base``, or ``feedback.judge_path`` when set."""
    if run.config.feedback.judge_path is not None:
        return load_backend(run, iteration, run.config.feedback.judge_path)
    return load_backend(run, 1 if run.config.feedback.judge is Judge.base else iteration)


def load_tokenizer(run: RunDir, iteration: int):
    """The model's tokenizer alone (counting prompt tokens needs no weights)."""
    from transformers import AutoTokenizer

    if iteration == 1:
        ensure_base_model(run.config)
    sub = BACKENDS[run.config.model.backend][3]
    return AutoTokenizer.from_pretrained(str(model_path(run, iteration) / sub),
                                         trust_remote_code=run.config.model.trust_remote_code)
