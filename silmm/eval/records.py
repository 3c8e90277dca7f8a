"""The records every benchmark, scorer and report shares.

A benchmark (silmm/eval/benchmarks/<name>.py) reads its own files into ``BenchmarkPrompt`` rows that keep the
benchmark's ids, categories, source lines and questions; a scorer answers per image with ``ImageAnswers``; the
benchmark's ``aggregate`` turns those answers into its published numbers by its own rules.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class BenchmarkQuestion:
    """One of the benchmark's own questions about a prompt's image."""

    id: str  # the benchmark's question id (DPG proposition_id, TIFA index in caption, GenEval "q<n>")
    text: str  # a yes/no question unless `choices` is set
    answer: str = "yes"  # the expected answer (TIFA: annotated; yes/no benchmarks: "yes")
    choices: tuple[str, ...] = ()  # multiple choice (TIFA); () = yes/no
    parents: tuple[str, ...] = ()  # ids of the questions this one depends on (DPG)
    category: str = ""  # DPG category (e.g. "entity", "attribute"...), TIFA element_type
    element: str = ""  # TIFA element


@dataclass(frozen=True)
class BenchmarkPrompt:
    """One prompt of a benchmark, with everything needed to trace it back to the benchmark's files."""

    benchmark: str  # registry name
    id: str  # the benchmark's own id, unique in the benchmark (see each module)
    text: str
    category: str
    subcategory: str = ""
    source: str = ""  # file, relative to the benchmark root
    line: int = 0  # 1-based line in `source` (0: not line-based)
    questions: tuple[BenchmarkQuestion, ...] = ()  # the benchmark's own questions; () = none
    metadata: str = ""  # the benchmark's own record, JSON text, verbatim (GenEval's metadata line)


@dataclass
class ImageAnswers:
    """What a scorer says about one image of one prompt."""

    score: float  # the scorer's own per-image score (self: mean p(yes)-p(no); oracle: 1.0 if every check holds)
    questions: list[str]  # the questions asked, in order (the benchmark's when it has them, else the scorer's own)
    p_yes: list[float]  # per question (NaN where not a yes/no question)
    p_no: list[float]
    answers: list[str]  # per question: "yes"/"no" or the chosen choice
    correct: list[float]  # per question: 1.0 if answers[i] matches the expected answer, else 0.0
    extra: dict[str, float] = field(default_factory=dict)  # scorer-specific per-image values (oracle: partial, strict)


class BenchmarkError(ValueError):
    """Bad benchmark input; the message names the file and line (or the id) at fault."""


class Benchmark(ABC):
    """One benchmark: how its files become prompts, how its official scorer wants images laid out, and how its
    per-image answers become its published numbers."""

    name: str
    display: str  # "T2I-CompBench++"
    default_images: int  # images per prompt by default
    categories: tuple[str, ...]  # in the paper's table order
    official_commands: str  # README text: the exact commands of the official scorer on an export
    category_titles: Mapping[str, str] = {}  # category -> its column title in the paper's tables (default: the name)

    def __init__(self) -> None:
        # what the last read() skipped or noticed (e.g. a DPG prompt without questions), each said once in the
        # log too: results files copy these so nothing is dropped silently
        self.notes: list[str] = []

    @abstractmethod
    def read(self, root: Path) -> list[BenchmarkPrompt]:
        """The whole set, every id kept; BenchmarkError on bad input."""

    @abstractmethod
    def export(self, out_dir: Path, prompts: Sequence[BenchmarkPrompt],
               images: Callable[[BenchmarkPrompt], np.ndarray]) -> None:
        """Write the official layout so the official scorer runs unchanged (images(p): uint8 [N, H, W, 3])."""

    @abstractmethod
    def aggregate(self, prompts: Sequence[BenchmarkPrompt], answers: Mapping[str, Sequence[ImageAnswers]]) -> dict:
        """The benchmark's scoring rules. ``answers`` maps a prompt id to one ImageAnswers per image (every prompt
        in ``prompts`` must have answers). Returns {"overall": float, "per_category": {cat: float},
        "tables": {name: {key: float}}, "notes": [str]}: scores in [0, 1] (DPG-Bench and TIFA papers print x100),
        extra tables as the benchmark's scripts print them, and notes on where a number departs from the
        official script or is not one the paper reports."""
