"""Benchmark results -- one task per (iteration, benchmark), after every eval shard of the pair is done.

Reads   eval/<benchmark>/iter_KK/shard_*.h5 (all of them, checksums verified, each from the current eval
        settings: the same eval hash)
Writes  eval/<benchmark>/iter_KK/export/        the benchmark's official layout (Benchmark.export), so its
                                                 official scorer runs unchanged on our images
        eval/<benchmark>/iter_KK/results.json   the benchmark's numbers by its own rules (Benchmark.aggregate)
                                                 with what was evaluated and how (silmm/eval/results.py)
The story: rebuild the prompts and the scorer's answers from the shards (checked against the benchmark as
read), aggregate, export (into a temporary folder, then swapped in), and write results.json last, atomically:
its presence with the current eval hash marks the step done. Running it again rewrites the same files.
Run directly: python -m jobs.eval_results --run RUN --iteration K --benchmark NAME --shard 0
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from silmm import __version__
from silmm.eval import stage as E
from silmm.eval.records import BenchmarkPrompt
from silmm.eval.results import BenchmarkResults, write_results
from silmm.images import from_png
from silmm.rundir import RunDir
from silmm.store import StoreOptions, read_shard

log = logging.getLogger("jobs.eval_results")


def run(run: RunDir, iteration: int, shard: int, benchmark: str) -> dict[str, Any]:
    plan = E.plan(run, iteration, benchmark)
    eval_hash = plan.eval_hash()
    options = StoreOptions.from_config(run.config.store)

    # the prompts and answers, as the shards hold them
    prompts: list[BenchmarkPrompt] = []
    answers, where, truncated = {}, {}, 0
    for s in range(plan.shard_count):
        path = plan.shard_path(s)
        if not E.shard_is_current(plan, s, eval_hash):
            raise E.EvalError(f"{path}: missing, or from other eval settings; run its eval task first "
                              f"(`silmm eval {run.path} --iterations {iteration} --benchmarks {benchmark}`)")
        data = read_shard(path, stage="eval", config_hash=run.config_hash, iteration=iteration,
                          verify_checksums=True, options=options,
                          columns=[c for c in _columns() if c != "image_png"])
        for sp in E.read_prompts(data):
            prompts.append(sp.prompt)
            answers[sp.prompt.id] = sp.answers
            where[sp.prompt.id] = (s, sp.image_rows)
            truncated += sp.model_text != sp.prompt.text
    expected = [plan.prompts[i] for i in plan.selected]
    if prompts != expected:
        bad = next((a.id for a, b in zip(prompts, expected, strict=False) if a != b), "(count)")
        raise E.EvalError(f"{plan.dir}: the shards' prompts differ from the benchmark as read (first at {bad})")

    agg = plan.bench.aggregate(prompts, answers)
    plan.bench.export(plan.export_dir, prompts, _ShardImages(plan, where, options))

    scorer = plan.scorer_class()
    deviations = list(scorer.deviations(benchmark, prompts))
    n_all, n = len(plan.prompts), len(prompts)
    if n < n_all:
        deviations.append(f"a subset: {n} of the benchmark's {n_all} prompts (eval.benchmarks.{benchmark}.max_prompts)")
    if plan.images_per_prompt != plan.bench.default_images:
        deviations.append(f"{plan.images_per_prompt} images per prompt instead of the benchmark's "
                          f"{plan.bench.default_images}")
    if truncated:
        deviations.append(f"{truncated} prompt(s) truncated to the model's context (overlong=truncate)")
    tables = {k: v for k, v in agg.get("tables", {}).items() if isinstance(v, dict)}
    tables.update({k: v for k, v in agg.items() if k not in ("overall", "per_category", "tables", "notes")
                   and isinstance(v, dict)})
    results = BenchmarkResults(
        benchmark=benchmark, display=plan.bench.display, iteration=iteration, scorer=plan.settings.scorer,
        official_recipe=benchmark in scorer.official_for and len(deviations) == 0, deviations=deviations,
        model=str(plan.model_dir()), model_hash=E.model_fingerprint(plan.model_dir()), silmm_version=__version__,
        config_hash=run.config_hash, eval_hash=eval_hash, prompts=n, images_per_prompt=plan.images_per_prompt,
        max_prompts=plan.settings.max_prompts, overall=float(agg["overall"]),
        per_category={k: float(v) for k, v in agg["per_category"].items()}, tables=tables,
        notes=[*agg.get("notes", []), *plan.read_notes], benchmark_prompts=n_all,
        scorer_identity=scorer.identity_of(run),
        deviating_categories=list(getattr(scorer, "deviating_categories", lambda b: [])(benchmark)))
    path = write_results(plan.results_path, results)  # last: marks the step done
    log.info("%s iteration %d: overall %.4f (%s) -> %s", benchmark, iteration, results.overall,
             ", ".join(f"{k} {v:.3f}" for k, v in results.per_category.items()), path)
    return {"benchmark": benchmark, "overall": results.overall, "prompts": n, "results": str(path)}


def _columns() -> list[str]:
    from silmm.store import SCHEMAS

    return [c.name for c in SCHEMAS["eval"].columns]


class _ShardImages:
    """images(prompt) for Benchmark.export, read lazily one shard at a time (exports walk prompts in order)."""

    def __init__(self, plan: E.EvalPlan, where: dict[str, tuple[int, list[int]]], options: StoreOptions):
        self.plan, self.where, self.options = plan, where, options
        self.loaded: tuple[int, np.ndarray] | None = None

    def __call__(self, prompt: BenchmarkPrompt) -> np.ndarray:
        shard, rows = self.where[prompt.id]
        if self.loaded is None or self.loaded[0] != shard:
            data = read_shard(self.plan.shard_path(shard), stage="eval", options=self.options, columns=("image_png",))
            self.loaded = (shard, data["image_png"])
        return np.stack([from_png(self.loaded[1][r], f"{self.plan.shard_path(self.loaded[0])}: image row {r}")
                         for r in rows])


if __name__ == "__main__":
    from jobs.common import main

    raise SystemExit(main("eval_results", benchmark=True))
