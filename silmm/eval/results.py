"""Benchmark results of one (benchmark, iteration): `RUN/eval/<benchmark>/iter_KK/results.json`.

Written by the eval stage's last step (jobs/eval_results.py) once every shard of the pair is complete; read
by the report (silmm/eval/report.py) and by anyone comparing runs. One JSON object:

    benchmark, display      registry name and the benchmark's own name ("T2I-CompBench++")
    iteration               0 = the base model (model.path); K = the model iteration K ends with
    scorer                  "self" | "oracle" | ...
    official_recipe         true only when the scorer is the benchmark's official one (never for `self`)
    deviations              every way this evaluation departs from the benchmark's official protocol
    notes                   the benchmark's own remarks on its numbers (from aggregate) and on reading its files
    model, model_hash       the generating model's directory and content fingerprint
    silmm_version, config_hash, eval_hash   code version, the run's config hash, the eval settings' hash
    prompts, images_per_prompt, max_prompts  what was evaluated (max_prompts null: the whole set)
    benchmark_prompts       prompts in the whole benchmark as read (prompts < benchmark_prompts: a subset)
    overall, per_category   the benchmark's numbers (Benchmark.aggregate); NaN is written as null
    tables                  the benchmark's extra tables {name: {key: float}}
    export                  the official-layout export, relative to this file's folder ("export/")
    finished                UTC time, ISO 8601

The file is written atomically and last: it exists only when the export beside it is complete, and its
``eval_hash`` tells whether it still matches the run's eval settings.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from silmm.fsutil import atomic_write_text

RESULTS_FILE = "results.json"
EXPORT_DIR = "export"


class ResultsError(ValueError):
    """A results file is missing, malformed or from other settings; the message names the file."""


@dataclass
class BenchmarkResults:
    benchmark: str
    display: str
    iteration: int
    scorer: str
    official_recipe: bool
    deviations: list[str]
    model: str
    model_hash: str
    silmm_version: str
    config_hash: str
    eval_hash: str
    prompts: int
    images_per_prompt: int
    max_prompts: int | None
    overall: float
    per_category: dict[str, float]
    tables: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    benchmark_prompts: int | None = None
    scorer_identity: dict[str, Any] = field(default_factory=dict)  # its version, judges' checkpoints and hashes
    deviating_categories: list[str] = field(default_factory=list)  # judged by a substitute for the official judge
    export: str = EXPORT_DIR + "/"
    finished: str = ""


def eval_dir(run_path: str | Path, benchmark: str, iteration: int) -> Path:
    """`RUN/eval/<benchmark>/iter_KK/`: the shards, results.json and export/ of one (benchmark, iteration)."""
    return Path(run_path) / "eval" / benchmark / f"iter_{iteration:02d}"


def results_path(run_path: str | Path, benchmark: str, iteration: int) -> Path:
    return eval_dir(run_path, benchmark, iteration) / RESULTS_FILE


def _clean(value: Any) -> Any:
    """NaN/inf -> null (strict JSON), recursively."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _unclean(value: Any) -> Any:
    """null -> NaN inside the numeric tables (the inverse of _clean for numbers)."""
    if value is None:
        return math.nan
    if isinstance(value, dict):
        return {k: _unclean(v) for k, v in value.items()}
    return float(value)


def write_results(path: str | Path, results: BenchmarkResults) -> Path:
    """Write atomically (a temporary sibling, then a rename); sets ``finished``."""
    path = Path(path)
    results.finished = results.finished or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(_clean(asdict(results)), indent=1, allow_nan=False) + "\n")
    return path


def read_results(path: str | Path, eval_hash: str | None = None) -> BenchmarkResults:
    """Load and check a results file (all keys present; the eval hash, when given, must match)."""
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{path}: no results (the benchmark's evaluation has not finished)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ResultsError(f"{path}: not valid JSON: {exc}") from exc
    names = {f.name for f in fields(BenchmarkResults)}
    required = names - {"tables", "notes", "benchmark_prompts", "export", "finished"}
    missing = sorted(required - set(data))
    if missing:
        raise ResultsError(f"{path}: missing keys {missing}")
    data = {k: v for k, v in data.items() if k in names}
    data["overall"] = _unclean(data["overall"])
    data["per_category"] = _unclean(data["per_category"])
    data["tables"] = _unclean(data.get("tables", {}))
    res = BenchmarkResults(**data)
    if eval_hash is not None and res.eval_hash != eval_hash:
        raise ResultsError(f"{path}: eval hash {res.eval_hash} differs from the current settings' {eval_hash}")
    return res


def is_current(path: str | Path, eval_hash: str) -> bool:
    """A results file exists, reads, and matches ``eval_hash`` (the final step's completion test)."""
    try:
        read_results(path, eval_hash)
    except ResultsError:
        return False
    return True


def find_results(run_path: str | Path) -> dict[tuple[str, int], BenchmarkResults]:
    """Every readable results file of a run: (benchmark, iteration) -> results, sorted by both."""
    out: dict[tuple[str, int], BenchmarkResults] = {}
    for path in sorted(Path(run_path).glob(f"eval/*/iter_*/{RESULTS_FILE}")):
        try:
            res = read_results(path)
        except ResultsError:
            continue
        out[(res.benchmark, res.iteration)] = res
    return dict(sorted(out.items()))
