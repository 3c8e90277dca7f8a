"""The toy world as a plug-in (silmm/plugins.py): what it adds to the generic registries, by name.

Configs name these entries as they name any other: ``eval.benchmarks.toy: {scorer: oracle}``,
``prompts.source: toy``, ``model.backend: fusion`` (the tiny checkpoint over the toy's codec), and
``toy.enabled`` (the pretrain stage, whose cached model is checked with ``cache_key`` before a run starts).
This module imports nothing heavy at load time: the registries read its table when they are imported.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from random import Random

PLUGIN: dict[str, dict[str, str]] = {
    "benchmarks": {"toy": "silmm.toy.benchmark:ToyBenchmark"},
    "scorers": {"oracle": "silmm.toy.oracle_scorer:OracleScorer"},
    "tiny_builders": {"fusion": "silmm.toy.plugin:build_tiny_fusion"},
    "prompt_sources": {"toy": "silmm.toy.plugin:compose_fn"},
    "pretraining": {"toy": "silmm.toy.plugin:cache_key"},
}


def build_tiny_fusion(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random early-fusion checkpoint over the toy world's codec and words (tests, `silmm make-tiny`)."""
    from silmm.backends.fusion import build_tiny_fusion as build
    from silmm.toy import world

    return build(out_dir, world.codec(), world.VOCAB_TEXT, seed=seed)


def compose_fn(cfg) -> Callable[[str, Random], str]:
    """The toy grammar for `prompts.source: toy`; held-out combinations are never drawn."""
    from silmm.toy import world

    return lambda category, rng: world.compose(category, rng, cfg.toy.held_out_fraction)


def cache_key(cfg) -> dict:
    """What the pretrained toy LMM depends on (silmm/toy/pretrain.py, recorded in its pretrain.json)."""
    from silmm.questions import load_examples
    from silmm.toy.pretrain import cache_key as key

    continuous = getattr(cfg.model.backend, "value", cfg.model.backend) == "dream"
    return key(cfg.toy, load_examples(cfg.questions.icl_examples), continuous=continuous)
