"""Toy-world figures for the README: oracle alignment per iteration, mean and spread over seeds, for SILMM
and the paper's controls, plus self/oracle agreement and wall time. Runs `silmm run configs/toy.yaml` once
per (variant, seed); the pretrained toy LMM is shared (cached at model.path), so the seed varies everything
SILMM draws: prompts, samples, training order and LoRA initialisation.

    python bench/toy_seeds.py                                 # SILMM and random-score feedback, seeds 0 1 2
    python bench/toy_seeds.py --variants silmm ratio_yes sft --seeds 0
    python bench/toy_seeds.py --report-only                   # tables from runs already on disk

Finished runs are not recomputed (the driver skips done work), so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "silmm": [],
    "base_judge": ["feedback.judge=base"],  # SILMM with iteration 0's judge (see feedback.judge)
    "random": ["feedback.method=random"],
    "ratio_yes": ["feedback.method=ratio_yes"],
    "sft": ["train.loss=sft"],
}
CATEGORIES = ("color", "numeracy", "spatial")


def run_one(config: str, root: str, variant: str, seed: int, extra: list[str]) -> float:
    name = f"toy_{variant}_s{seed}"
    args = [sys.executable, "-m", "silmm", "run", config, f"run.root={root}", f"run.name={name}", f"run.seed={seed}",
            *VARIANTS[variant], *extra]
    t0 = time.time()
    print(f"$ {' '.join(args[2:])}", flush=True)
    subprocess.run(args, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    seconds = time.time() - t0
    timing = Path(root) / name / "bench_wall_s.json"
    if not timing.exists():  # the first, complete run's time (a re-run that skips everything is not timed)
        timing.write_text(json.dumps({"seconds": seconds}) + "\n")
    return seconds


def load(root: str, variant: str, seed: int) -> dict[int, dict]:
    evals = {}
    for path in sorted((Path(root) / f"toy_{variant}_s{seed}" / "eval").glob("iter_??.json")):
        data = json.loads(path.read_text())
        evals[data["iteration"]] = data
    return evals


def fmt(values: list[float]) -> str:
    values = [v for v in values if v is not None and not np.isnan(v)]
    if not values:
        return "n/a"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def table(root: str, variants: list[str], seeds: list[int]) -> str:
    lines = ["| variant | iteration | seeds | overall | " + " | ".join(CATEGORIES) +
             " | strict | self/oracle pairwise agreement | mean Spearman |", "|---" * (7 + len(CATEGORIES)) + "|"]
    for variant in variants:
        runs = [load(root, variant, s) for s in seeds]
        iterations = sorted(set().union(*[r.keys() for r in runs]))
        for it in iterations:
            have = [r[it] for r in runs if it in r]
            lines.append(f"| {variant} | {it} | {len(have)} | {fmt([e['overall'] for e in have])} | "
                         + " | ".join(fmt([e["per_category"].get(c) for e in have]) for c in CATEGORIES)
                         + f" | {fmt([e.get('strict') for e in have])}"
                         + f" | {fmt([e['agreement_pairwise'] for e in have])} | {fmt([e['spearman_mean'] for e in have])} |")
    walls = []
    for variant in variants:
        for s in seeds:
            f = Path(root) / f"toy_{variant}_s{s}" / "bench_wall_s.json"
            if f.exists():
                walls.append(f"{variant} seed {s}: {json.loads(f.read_text())['seconds'] / 60:.1f} min")
    return "\n".join(lines) + ("\n\nWall time per run (2 CPU cores): " + "; ".join(walls) if walls else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/toy.yaml")
    p.add_argument("--root", default="shards/toy_bench")
    p.add_argument("--variants", nargs="+", default=["silmm", "random"], choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--report-only", action="store_true")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = p.parse_args()
    if not args.report_only:
        for seed in args.seeds:
            for variant in args.variants:
                run_one(args.config, args.root, variant, seed, args.overrides)
    print(table(args.root, args.variants, args.seeds))


if __name__ == "__main__":
    main()
