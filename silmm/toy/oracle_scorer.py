"""The `oracle` scorer: the toy world's exact oracle as a benchmark scorer (the toy benchmark only).

Per image: the oracle parses the image exactly (silmm/toy/world.py) and evaluates every check of the prompt;
the questions recorded are the checks as yes/no questions (world.questions), answered "yes" when the check
holds. score = 1.0 when every check holds (the toy evaluation's "overall"); extra: ``partial`` (the fraction
of checks that hold) and ``strict`` (every check holds and the image holds nothing beyond the named objects).
No probabilities: p_yes / p_no are NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from silmm.eval.records import BenchmarkPrompt, ImageAnswers
from silmm.eval.scorers import Scorer
from silmm.toy import world
from silmm.toy.evaluate import check_fraction


class OracleScorer(Scorer):
    name = "oracle"
    benchmarks = ("toy",)
    official_for = ("toy",)  # the toy world's alignment is defined by this oracle
    version = "1"

    @classmethod
    def identity_of(cls, run: Any) -> dict[str, Any]:
        return {"scorer": cls.name, "version": cls.version}

    def score(self, prompts: Sequence[BenchmarkPrompt], images: Sequence[np.ndarray]) -> list[list[ImageAnswers]]:
        return [[self.score_image(p.text, im) for im in imgs] for p, imgs in zip(prompts, images, strict=True)]

    @staticmethod
    def score_image(prompt: str, image: np.ndarray) -> ImageAnswers:
        spec = world.parse_prompt(prompt)
        objects = world.parse(image)
        holds = [c.holds(objects) for c in world.checks(spec)]
        overall = world.score(prompt, image).overall  # computed as the toy evaluation computes it
        n = len(holds)
        return ImageAnswers(score=overall, questions=world.questions(prompt), p_yes=[math.nan] * n,
                            p_no=[math.nan] * n, answers=["yes" if h else "no" for h in holds],
                            correct=[float(h) for h in holds],
                            extra={"partial": check_fraction(prompt, image),
                                   "strict": overall * world.nothing_extra(prompt, image)})
