"""Toy-world figures for the README: oracle alignment per iteration, mean and spread over seeds, for SILMM
and the paper's controls, plus self/oracle agreement, wall time, and the held-out prompts each variant gained
and lost since iteration 0 (pooled over runs, with an exact sign test). Runs `silmm run configs/toy.yaml` once
per (variant, seed); the pretrained toy LMM is shared (cached at model.path), so the seed varies everything
SILMM draws: prompts, samples, training order and LoRA initialisation.

    python bench/toy_seeds.py                                 # SILMM and random-score feedback, seeds 0 1 2
    python bench/toy_seeds.py --variants silmm ratio_yes sft --seeds 0
    python bench/toy_seeds.py --pretrain-seeds 0 1 2 --seeds 0  # the spread a new user sees: pretraining too
    python bench/toy_seeds.py run.iterations=1 --config configs/toy_continuous.yaml --root shards/toyc_bench \
        --variants silmm kernel_none_euclidean kernel_maxpool_cosine --seeds 0    # continuous ablations
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
    "oracle": ["feedback.method=scorer", "feedback.scorer=oracle"],  # the exact oracle judges: the learner alone
    "ratio_yes": ["feedback.method=ratio_yes"],
    "sft": ["train.loss=sft"],
    # the continuous toy (--config configs/toy_continuous.yaml): the paper's ablations in miniature
    **{f"kernel_{a}_{d}": [f"train.kernel_aggregation={a}", f"train.kernel_distance={d}"]  # Table 3
       for a in ("none", "avgpool", "maxpool") for d in ("euclidean", "cosine")},
    **{f"dropdiv_{p}": [f"sampling.dropdiv_placement={p}"] for p in ("first_half", "second_half", "all")},
    **{f"dropdiv_rate_{r}": [f"sampling.dropdiv_rate={r}"] for r in ("0.05", "0.2", "0.4")},
    "noisy_queries": ["sampling.diversity=noisy_queries"],
    **{f"rejected_{a}_{b}": [f"pairs.rejected_ranks=[{a},{b}]"] for a, b in ((11, 20), (16, 25))},  # Table 7
}
CATEGORIES = ("color", "numeracy", "spatial")


def run_name(variant: str, seed: int, pretrain_seed: int | None) -> str:
    return f"toy_{variant}_s{seed}" if pretrain_seed is None else f"toy_{variant}_p{pretrain_seed}_s{seed}"


def pretrain_overrides(config: str, pretrain_seed: int | None) -> list[str]:
    """Each pretraining seed gets its own cached toy LMM (seed 0 keeps the config's model.path)."""
    if pretrain_seed is None:
        return []
    from omegaconf import OmegaConf

    path = OmegaConf.load(REPO / config).model.path + (f"_p{pretrain_seed}" if pretrain_seed else "")
    return [f"toy.pretrain.seed={pretrain_seed}", f"model.path={path}"]


def run_one(config: str, root: str, variant: str, seed: int, extra: list[str], pretrain_seed: int | None = None) -> float:
    name = run_name(variant, seed, pretrain_seed)
    args = [sys.executable, "-m", "silmm", "run", config, f"run.root={root}", f"run.name={name}", f"run.seed={seed}",
            *VARIANTS[variant], *pretrain_overrides(config, pretrain_seed), *extra]
    t0 = time.time()
    print(f"$ {' '.join(args[2:])}", flush=True)
    subprocess.run(args, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    seconds = time.time() - t0
    timing = Path(root) / name / "bench_wall_s.json"
    if not timing.exists():  # the first, complete run's time (a re-run that skips everything is not timed)
        timing.write_text(json.dumps({"seconds": seconds}) + "\n")
    return seconds


def load(root: str, variant: str, seed: int, pretrain_seed: int | None = None) -> dict[int, dict]:
    evals = {}
    for path in sorted((Path(root) / run_name(variant, seed, pretrain_seed) / "eval").glob("iter_??.json")):
        data = json.loads(path.read_text())
        evals[data["iteration"]] = data
    return evals


def fmt(values: list[float]) -> str:
    values = [v for v in values if v is not None and not np.isnan(v)]
    if not values:
        return "n/a"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def table(root: str, variants: list[str], seeds: list[int], pretrain_seeds: list[int | None] = (None,)) -> str:
    lines = ["| variant | iteration | seeds | overall | " + " | ".join(CATEGORIES) +
             " | strict | self/oracle pairwise agreement | mean Spearman |", "|---" * (7 + len(CATEGORIES)) + "|"]
    for variant in variants:
        runs = [load(root, variant, s, ps) for ps in pretrain_seeds for s in seeds]
        iterations = sorted(set().union(*[r.keys() for r in runs]))
        for it in iterations:
            have = [r[it] for r in runs if it in r]
            lines.append(f"| {variant} | {it} | {len(have)} | {fmt([e['overall'] for e in have])} | "
                         + " | ".join(fmt([e["per_category"].get(c) for e in have]) for c in CATEGORIES)
                         + f" | {fmt([e.get('strict') for e in have])}"
                         + f" | {fmt([e['agreement_pairwise'] for e in have])} | {fmt([e['spearman_mean'] for e in have])} |")
    walls = []
    for variant in variants:
        for ps in pretrain_seeds:
            for s in seeds:
                f = Path(root) / run_name(variant, s, ps) / "bench_wall_s.json"
                if f.exists():
                    walls.append(f"{run_name(variant, s, ps)}: {json.loads(f.read_text())['seconds'] / 60:.1f} min")
    return "\n".join(lines) + ("\n\nWall time per run: " + "; ".join(walls) if walls else "")


def sign_test_p(gained: int, lost: int) -> float:
    """Two-sided exact sign test: the chance of a split at least this uneven if gains and losses were equally
    likely (prompts that did not change are left out)."""
    from scipy.stats import binomtest

    return 1.0 if gained + lost == 0 else float(binomtest(gained, gained + lost, 0.5).pvalue)


def flips_table(root: str, variants: list[str], seeds: list[int], pretrain_seeds: list[int | None] = (None,)) -> str:
    """Held-out prompts whose oracle alignment (mean over its images) rose or fell between iteration 0 and
    each run's last, pooled over runs: a paired view that a difference of a few prompts in the mean hides."""
    lines = ["| variant | runs | last iteration | held-out prompts gained | lost | net | sign test p |",
             "|---|---|---|---|---|---|---|"]
    for variant in variants:
        gained = lost = runs = 0
        last_its = set()
        for ps in pretrain_seeds:
            for s in seeds:
                evals = load(root, variant, s, ps)
                if 0 not in evals or len(evals) < 2:
                    continue
                last = max(evals)
                before = [np.mean(r["oracle"]) for r in evals[0]["results"]]
                after = [np.mean(r["oracle"]) for r in evals[last]["results"]]
                gained += int(sum(b > a for a, b in zip(before, after, strict=True)))
                lost += int(sum(b < a for a, b in zip(before, after, strict=True)))
                runs, last_its = runs + 1, last_its | {last}
        if runs:
            its = "/".join(str(i) for i in sorted(last_its))
            lines.append(f"| {variant} | {runs} | {its} | {gained} | {lost} | {gained - lost:+d} | "
                         f"{sign_test_p(gained, lost):.2g} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/toy.yaml")
    p.add_argument("--root", default="shards/toy_bench")
    p.add_argument("--variants", nargs="+", default=["silmm", "random"], choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--pretrain-seeds", nargs="+", type=int, default=None,
                   help="also vary the toy LMM's pretraining seed (each is pretrained once and cached); "
                        "the tables then pool every (pretraining seed, seed)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = p.parse_args()
    pretrain_seeds = args.pretrain_seeds or [None]
    if not args.report_only:
        for ps in pretrain_seeds:
            for seed in args.seeds:
                for variant in args.variants:
                    run_one(args.config, args.root, variant, seed, args.overrides, ps)
    print(table(args.root, args.variants, args.seeds, pretrain_seeds))
    print("\n" + flips_table(args.root, args.variants, args.seeds, pretrain_seeds))
    if args.pretrain_seeds:
        print("\n" + pretrained_table(args.config, args.overrides, args.pretrain_seeds))


def pretrained_table(config: str, extra: list[str], pretrain_seeds: list[int]) -> str:
    """What each pretraining seed gave: yes/no accuracy and pretraining time (from its pretrain.json)."""
    lines = ["| pretraining seed | yes/no accuracy (training / held-out prompts) | pretraining min |", "|---|---|---|"]
    for ps in pretrain_seeds:
        path = next(o.split("=", 1)[1] for o in pretrain_overrides(config, ps) if o.startswith("model.path="))
        f = REPO / path / "pretrain.json"
        if f.exists():
            rec = json.loads(f.read_text())
            q = rec["quality"]
            lines.append(f"| {ps} | {q['answer_accuracy']:.3f} / {q['held_out_answer_accuracy']:.3f} | "
                         f"{rec['seconds'] / 60:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
