"""What the expert judges (detector, segmenter, depth) return, shared by their modules and the benchmarks'
rules: plain records, so the rules can be tested on hand-made boxes and masks without any model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Detection:
    """One object found in an image: a label from the query list, a confidence, a box in pixels
    (x0, y0, x1, y1; x to the right, y down) and, for segmenters, its mask (bool [H, W])."""

    label: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(x1 - x0, 0.0) * max(y1 - y0, 0.0)
