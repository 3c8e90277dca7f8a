"""The toy run's report: Markdown, plots and image grids from the eval files of every iteration so far.

    <run>/report/report.md              alignment table per iteration and category, agreement, questions
    <run>/report/alignment.png          oracle alignment per category per iteration
    <run>/report/score_distributions.png  per-prompt alignment and self-scores, per iteration
    <run>/report/grid.png               the same held-out prompts across iterations (one row per prompt)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # batch nodes have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from silmm.eval.results import find_results  # noqa: E402
from silmm.fsutil import atomic_write_text  # noqa: E402
from silmm.rundir import RunDir  # noqa: E402
from silmm.toy import world  # noqa: E402


def eval_path(run: RunDir, iteration: int) -> Path:
    return run.path / "eval" / f"iter_{iteration:02d}.json"


def load_evals(run_path: Path) -> dict[int, dict]:
    """The toy evaluation of each iteration (eval/iter_KK.json), with the oracle alignment (overall, per
    category, strict, partial) taken from the eval stage's `toy` benchmark results where they exist
    (eval/toy/iter_KK/results.json: the same images and numbers); the self-feedback agreement comes from
    the toy evaluation."""
    out = {}
    for path in sorted((run_path / "eval").glob("iter_??.json")):
        data = json.loads(path.read_text())
        out[int(data["iteration"])] = data
    for (benchmark, iteration), res in find_results(run_path).items():
        if benchmark == "toy" and iteration in out and {"strict", "partial"} <= set(res.tables):
            out[iteration].update(overall=res.overall, per_category=res.per_category,
                                  strict=res.tables["strict"]["overall"], partial=res.tables["partial"]["overall"],
                                  alignment_source=f"eval/toy/iter_{iteration:02d}/results.json")
    return out


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _plot_alignment(evals: dict[int, dict], out: Path) -> None:
    its = sorted(evals)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    for cat in world.CATEGORIES:
        ax.plot(its, [evals[i]["per_category"].get(cat, np.nan) for i in its], marker="o", label=cat)
    ax.plot(its, [evals[i]["overall"] for i in its], marker="s", color="black", linewidth=2, label="overall")
    ax.plot(its, [evals[i].get("strict", np.nan) for i in its], marker="s", color="black", linestyle="--",
            label="strict (nothing extra)")
    ax.set_xlabel("iteration (0 = pretrained)")
    ax.set_ylabel("oracle alignment (held-out)")
    ax.set_xticks(its)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _plot_distributions(evals: dict[int, dict], out: Path) -> None:
    its = sorted(evals)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), dpi=120)
    bins = np.linspace(0, 1, 11)
    for i in its:
        per_prompt = [np.mean(r["oracle"]) for r in evals[i]["results"]]
        axes[0].hist(per_prompt, bins=bins, histtype="step", linewidth=1.5, label=f"iter {i}")
        selfs = [x for r in evals[i]["results"] for x in r["self_score"]]
        axes[1].hist(selfs, bins=np.linspace(-1, 1, 21), histtype="step", linewidth=1.5, label=f"iter {i}")
    axes[0].set_xlabel("per-prompt oracle alignment")
    axes[1].set_xlabel("self-score per image (mean p(yes) - p(no))")
    for ax in axes:
        ax.set_ylabel("count")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _grid(run_path: Path, evals: dict[int, dict], out: Path, scale: int = 3, per_iter: int = 2) -> None:
    """Rows: prompts; column blocks: iterations (first `per_iter` samples each), with a label strip."""
    its = sorted(evals)
    blocks = {}
    for i in its:
        with np.load(run_path / "eval" / f"iter_{i:02d}_images.npz", allow_pickle=False) as data:
            blocks[i] = (list(data["prompts"]), data["images"])
    prompts = blocks[its[0]][0]
    cell, pad, label_w, head_h = world.SIZE * scale, 4, 260, 16
    width = label_w + len(its) * (per_iter * (cell + pad) + 2 * pad)
    canvas = Image.new("RGB", (width, head_h + len(prompts) * (cell + pad)), (200, 200, 200))
    draw = ImageDraw.Draw(canvas)
    for k, i in enumerate(its):
        draw.text((label_w + k * (per_iter * (cell + pad) + 2 * pad), 2), f"iteration {i}", fill=(0, 0, 0))
    for r, prompt in enumerate(prompts):
        y = head_h + r * (cell + pad)
        draw.text((4, y + cell // 2 - 6), prompt[:42], fill=(0, 0, 0))
        for k, i in enumerate(its):
            names, images = blocks[i]
            row = names.index(prompt)
            for j in range(min(per_iter, images.shape[1])):
                x = label_w + k * (per_iter * (cell + pad) + 2 * pad) + j * (cell + pad)
                ok = world.score(prompt, images[row, j]).overall == 1.0
                draw.rectangle([x - 2, y - 2, x + cell + 1, y + cell + 1], fill=(40, 160, 40) if ok else (200, 40, 40))
                canvas.paste(Image.fromarray(images[row, j]).resize((cell, cell), Image.NEAREST), (x, y))
    canvas.save(out)


def _source_note(evals: dict[int, dict]) -> str:
    staged = [i for i in sorted(evals) if "alignment_source" in evals[i]]
    if not staged:
        return ""
    return (" Alignment columns of iteration(s) " + ", ".join(map(str, staged)) + ": the eval stage's `toy` benchmark "
            "scored by the `oracle` (`eval/toy/iter_KK/results.json`); self-feedback columns: the toy evaluation.")


def write_report(run: RunDir) -> Path:
    evals = load_evals(run.path)
    out = run.path / "report"
    out.mkdir(parents=True, exist_ok=True)
    _plot_alignment(evals, out / "alignment.png")
    _plot_distributions(evals, out / "score_distributions.png")
    _grid(run.path, evals, out / "grid.png")
    cfg = run.config
    lines = [f"# Toy SILMM report: {cfg.run.name}", "",
             f"Run `{run.path}`, seed {cfg.run.seed}, feedback `{cfg.feedback.method.value}`, loss "
             f"`{cfg.train.loss.value}`, questions `{cfg.questions.method.value}`; {cfg.prompts.count} prompts x "
             f"{cfg.sampling.samples_per_prompt} samples per iteration. Evaluation: {cfg.toy.eval_prompts} held-out "
             f"prompts (never used for pretraining or training) x {cfg.toy.eval_samples} images, scored by the exact "
             "oracle. Alignment = share of images where every check of the prompt holds; strict = and the image "
             "holds no object beyond those the prompt names." + _source_note(evals), "",
             "| iteration | overall | " + " | ".join(world.CATEGORIES) + " | strict | checks held | self-score | "
             "self/oracle pairwise agreement | mean Spearman (prompts) | questions exact |",
             "|---" * (8 + len(world.CATEGORIES)) + "|"]
    for i in sorted(evals):
        e = evals[i]
        lines.append(f"| {i} | {_fmt(e['overall'])} | " + " | ".join(_fmt(e["per_category"].get(c)) for c in world.CATEGORIES)
                     + f" | {_fmt(e.get('strict'))} | {_fmt(e['partial'])} | {_fmt(e['self_score'])} | {_fmt(e['agreement_pairwise'])} "
                     f"({e['agreement_pairs']} pairs) | {_fmt(e['spearman_mean'])} ({e['spearman_prompts']}) | "
                     f"{_fmt(e['questions_exact'])} |")
    lines += ["", "![alignment](alignment.png)", "", "![distributions](score_distributions.png)", "",
              "Held-out prompts across iterations (green frame: the oracle accepts the image):", "", "![grid](grid.png)", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
