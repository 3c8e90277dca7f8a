"""Shared test helpers: tiny checkpoints (built once per session) and tiny runs."""

from __future__ import annotations

from pathlib import Path

from silmm import config as C
from silmm.rundir import RunDir

TINY_OVERRIDES = {
    "janus": ["sampling.samples_per_prompt=3", "sampling.batch_size=3"],
    "dream": ["sampling.samples_per_prompt=4", "sampling.batch_size=4", "sampling.decoder_steps=2",
              "sampling.dropdiv_layers=1", "pairs.top_k=2"],
}


def tiny_config(root: Path, ckpt: Path, backend: str, *overrides: str) -> C.SilmmConfig:
    base = [f"run.root={root}", "run.name=run", f"model.backend={backend}", f"model.path={ckpt}",
            "prompts.count=6", "sharding.prompts_per_shard=3", "sharding.flush_every=1",
            "questions.max_questions=3", "questions.max_new_tokens=12", "feedback.batch_size=8",
            "train.max_steps=2", "train.warmup_steps=0", "train.batch_size=2", "train.grad_accum=1",
            "train.lora.r=4", "train.lora.alpha=4", "logging.progress=false"]
    return C.load(None, base + TINY_OVERRIDES[backend] + list(overrides))


def tiny_run(root: Path, ckpt: Path, backend: str, *overrides: str) -> RunDir:
    return RunDir.create_or_open(tiny_config(root, ckpt, backend, *overrides))


def break_prompts_shard(run: RunDir, shard: int = 0) -> None:
    """Put garbage where a prompts shard belongs: the questions task of that shard then fails."""
    bad = run.shard_path(1, "prompts", shard)
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"not hdf5")
