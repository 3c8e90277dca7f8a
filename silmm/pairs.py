"""Preference pair selection: rank each prompt's samples by score, pair the best with the worst."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class PairSelectionError(ValueError):
    pass


@dataclass(frozen=True)
class PairRule:
    top_k: int  # chosen: ranks 1..top_k
    bottom_k: int  # rejected: the last bottom_k ranks (unless rejected_ranks is set)
    rejected_ranks: tuple[int, int] | None = None  # 1-based inclusive rank range (paper Table 7)
    min_score_gap: float = 0.0  # a pair needs chosen - rejected > gap (strictly: ties never pair)


def rank(scores: np.ndarray) -> np.ndarray:
    """Sample indices from best to worst; equal scores keep sample-index order (deterministic)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def select_pairs(scores: np.ndarray, rule: PairRule, where: str = "") -> list[tuple[int, int]]:
    """(chosen sample index, rejected sample index) pairs for one prompt; [] when all scores tie.

    Chosen and rejected sets may overlap when k exceeds half the samples; a sample is never paired with
    itself, and a pair must beat the gap, so overlapping ranks only add valid pairs."""
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        bad = [i for i, s in enumerate(scores) if not np.isfinite(s)]
        raise PairSelectionError(f"{where}: non-finite scores at sample indices {bad}")
    n = len(scores)
    order = rank(scores)
    chosen = order[: min(rule.top_k, n)]
    if rule.rejected_ranks is not None:
        first, last = rule.rejected_ranks
        rejected = order[first - 1: min(last, n)]
    else:
        rejected = order[max(n - rule.bottom_k, 0):]
    pairs = []
    for c in chosen:
        for r in rejected:
            if c != r and scores[c] - scores[r] > rule.min_score_gap:
                pairs.append((int(c), int(r)))
    return pairs
