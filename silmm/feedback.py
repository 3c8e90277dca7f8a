"""Step 4: alignment scores from VQA answers (the paper's Eq. 1 and its ablation variants)."""

from __future__ import annotations

import numpy as np


def vqa_score(p_yes: np.ndarray, p_no: np.ndarray) -> float:
    """s(x, y) = 1/N * sum_i [ p(yes | y, q_i) - p(no | y, q_i) ]   (SILMM Eq. 1), in [-1, 1]."""
    if len(p_yes) == 0:
        raise ValueError("no questions to score")
    return float(np.mean(np.asarray(p_yes, np.float64) - np.asarray(p_no, np.float64)))


def ratio_yes_score(p_yes: np.ndarray, p_no: np.ndarray) -> float:
    """Ablation: the fraction of questions answered 'yes' (p(yes) > p(no))."""
    if len(p_yes) == 0:
        raise ValueError("no questions to score")
    return float(np.mean(np.asarray(p_yes) > np.asarray(p_no)))


def random_score(seed: int) -> float:
    """Ablation control: a score that ignores the image, uniform in [-1, 1], from the sample's seed."""
    return float(np.random.default_rng(seed).uniform(-1.0, 1.0))
