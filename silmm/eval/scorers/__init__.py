"""Scorer registry and interface: a judge that looks at a prompt's images and answers per image.

A scorer turns (a benchmark prompt, its N images) into one :class:`~silmm.eval.records.ImageAnswers` per
image; the benchmark's ``aggregate`` turns those into its numbers. A benchmark asks a scorer, never the
other way round. The registry below knows every scorer by module path, so generic code never imports a
particular model family; the built-in ones are

    self     silmm/eval/scorers/self_vqa.py   the iteration's LMM (or the base model, feedback.judge=base)
                                              answers the benchmark's own questions, or its decomposition
    expert   silmm/eval/scorers/expert.py     the benchmarks' recommended expert models from transformers

and plug-ins add theirs by name (silmm/plugins.py; the toy world's exact oracle, ``oracle``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from silmm import plugins
from silmm.eval.records import BenchmarkError, BenchmarkPrompt, ImageAnswers

SCORERS: dict[str, str] = {
    "self": "silmm.eval.scorers.self_vqa:SelfVQA",
    "expert": "silmm.eval.scorers.expert:ExpertScorer",
    **plugins.entries("scorers"),
}


@dataclass
class ScorerContext:
    """What a scorer may use: the run, the iteration evaluated (0 = base model), and the backend that drew
    the images (None when the scorer is built without one, e.g. to read its identity)."""

    run: Any  # silmm.rundir.RunDir
    iteration: int
    backend: Any = None  # silmm.backends.base.LMMBackend


class Scorer(ABC):
    name: str
    benchmarks: tuple[str, ...] | None = None  # the benchmarks it can score; None = any
    official_for: tuple[str, ...] = ()  # benchmarks whose official recipe this scorer is
    version: str = "1"  # bump when the scorer's answers change for the same inputs (part of the eval hash)

    def __init__(self, ctx: ScorerContext):
        self.ctx = ctx

    @abstractmethod
    def score(self, prompts: Sequence[BenchmarkPrompt], images: Sequence[np.ndarray]) -> list[list[ImageAnswers]]:
        """For each prompt and its images (uint8 [N, H, W, 3]): one ImageAnswers per image. Prompts come in
        the stage's fixed groups, so a resumed task asks in the same batches as an uninterrupted one."""

    # what the eval hash and results.json record -------------------------------------------------
    @classmethod
    def identity_of(cls, run: Any) -> dict[str, Any]:
        """What the scorer's answers depend on beyond the run's config hash and the models."""
        return {"scorer": cls.name, "version": cls.version}

    @classmethod
    def model_paths(cls, run: Any, iteration: int) -> dict[str, Path]:
        """Models the scorer loads besides the one that drew the images: role -> checkpoint directory."""
        return {}

    @classmethod
    def deviations(cls, benchmark: str, prompts: Sequence[BenchmarkPrompt]) -> list[str]:
        """How scoring ``prompts`` of ``benchmark`` this way departs from the benchmark's official protocol."""
        return []


def scorer_class(name: str) -> type[Scorer]:
    if name not in SCORERS:
        raise BenchmarkError(f"unknown scorer {name!r}; known: {', '.join(sorted(SCORERS))}")
    return plugins.resolve(SCORERS[name])


def get_scorer(name: str, ctx: ScorerContext) -> Scorer:
    return scorer_class(name)(ctx)


__all__ = ["SCORERS", "Scorer", "ScorerContext", "get_scorer", "scorer_class"]
