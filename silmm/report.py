"""`silmm report RUN`, training part: the training metrics of every iteration as one figure and one table.

This module is the training part of `silmm report`; the benchmark tables (a later issue) will join it,
written next to these files and linked from the same command.

    <run>/report/training.png   one panel per metric group the run logged (x = step, one line per iteration)
    <run>/report/training.md    per iteration: the last logged value of each main metric, the held-out
                                loss/accuracy at the last evaluation, the steps, and where the figure is

Reads   <run>/iter_KK/train/metrics.jsonl, as jobs/train.py writes it: one JSON object per logged step,
        always with "step"; any other key may be absent (older runs, the other model family, a held-out
        split that is off, or a step without an evaluation), so every lookup here tolerates a missing key.
An iteration whose file is missing or empty is skipped and named in the table; a line that is not a JSON
object with a step is an error naming the file and the line (a report that silently drops data would
mislead more than none).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # batch nodes have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from silmm.fsutil import atomic_write_text  # noqa: E402
from silmm.rundir import RunDir  # noqa: E402

REPORT_DIR = "report"
TRAINING_FIGURE = "training.png"
TRAINING_TABLE = "training.md"

Row = dict[str, float]  # one metrics.jsonl line: "step" plus whatever was logged at that step


class ReportError(Exception):
    """The report cannot be written from what is on disk (the message names the file)."""


class NoMetricsError(ReportError):
    """Not a single iteration has training metrics yet."""


# ------------------------------------------------------------------------------------------ what is plotted
@dataclass(frozen=True)
class Series:
    key: str  # the metrics.jsonl key
    label: str  # legend text for the line style, when a panel holds more than one series


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    series: tuple[Series, ...]
    ylim: tuple[float, float] | None = None


# Line styles tell the series of a panel apart; colours tell the iterations apart (the same in every panel).
_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 4)))

# In display order; a panel is drawn when any iteration logged any of its keys.
PANELS: tuple[Panel, ...] = (
    Panel("loss", "loss", (Series("loss", "train"), Series("eval/loss", "held-out"))),
    Panel("reward accuracy", "share chosen > rejected",
          (Series("rewards/accuracies", "train"), Series("eval/rewards/accuracies", "held-out")), (-0.02, 1.02)),
    Panel("reward margin", "reward chosen - rejected",
          (Series("rewards/margins", "train"), Series("eval/rewards/margins", "held-out"))),
    Panel("KL to reference", "KL(ref || policy) per image token", (Series("kl/reference", "KL"),)),
    Panel("entropy", "policy entropy per image token", (Series("entropy/image_tokens", "entropy"),)),
    Panel("log-prob drift", "policy - reference log-prob",
          (Series("logps/chosen_drift", "chosen"), Series("logps/rejected_drift", "rejected"))),
    Panel("kernel distances", "kernel distance",
          (Series("distance/policy_chosen", "policy-chosen"), Series("distance/ref_chosen", "ref-chosen"),
           Series("distance/policy_rejected", "policy-rejected"), Series("distance/ref_rejected", "ref-rejected"),
           Series("distance/policy_ref", "policy-ref"), Series("distance/chosen_rejected", "chosen-rejected"))),
    Panel("learning rate", "lr", (Series("lr", "lr"),)),
)

# Table columns (when any iteration logged them): the last logged value per iteration.
TABLE_KEYS: tuple[str, ...] = (
    "loss", "rewards/accuracies", "rewards/margins", "kl/reference", "entropy/image_tokens",
    "logps/chosen_drift", "logps/rejected_drift", "distance/policy_chosen", "distance/policy_rejected",
    "distance/policy_ref", "distance/chosen_rejected", "lr",  # policy-ref far above chosen-rejected: H left the samples
)
EVAL_LOSS, EVAL_ACCURACY = "eval/loss", "eval/rewards/accuracies"


# ------------------------------------------------------------------------------------------ reading
@dataclass
class TrainingMetrics:
    rows: dict[int, list[Row]]  # iteration -> its metrics lines in file order (only iterations that have some)
    skipped: dict[int, str] = field(default_factory=dict)  # iteration -> why it has none ("missing", "empty")


def metrics_path(run: RunDir, iteration: int) -> Path:
    return run.train_dir(iteration) / "metrics.jsonl"


def read_metrics_file(path: Path) -> list[Row]:
    """The lines of one metrics.jsonl; blank lines are skipped (as MetricsLog does on resume)."""
    rows: list[Row] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ReportError(f"{path}:{lineno}: not valid JSON ({exc.msg}): {line.strip()[:80]!r}") from exc
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ReportError(f"{path}:{lineno}: not a metrics object with an integer 'step': "
                                  f"{line.strip()[:80]!r}")
            rows.append(row)
    return rows


def expected_iterations(run: RunDir) -> list[int]:
    """The configured iterations plus any found on disk (run.iterations may have been lowered or raised)."""
    return sorted(set(range(1, run.config.run.iterations + 1)) | {k for k in run.iterations_on_disk() if k >= 1})


def load_training_metrics(run: RunDir) -> TrainingMetrics:
    out = TrainingMetrics(rows={})
    for k in expected_iterations(run):
        path = metrics_path(run, k)
        if not path.is_file():
            out.skipped[k] = "missing"
            continue
        rows = read_metrics_file(path)
        if rows:
            out.rows[k] = rows
        else:
            out.skipped[k] = "empty"
    return out


def last_value(rows: Sequence[Row], key: str) -> tuple[int, float] | None:
    """(step, value) of the last line that holds ``key``: lines may lack keys that earlier ones had."""
    for row in reversed(rows):
        if key in row:
            return row["step"], row[key]
    return None


def _has_key(metrics: dict[int, list[Row]], key: str) -> bool:
    return any(key in row for rows in metrics.values() for row in rows)


# ------------------------------------------------------------------------------------------ figure
def panels_present(metrics: dict[int, list[Row]]) -> list[Panel]:
    return [p for p in PANELS if any(_has_key(metrics, s.key) for s in p.series)]


def _iteration_colors(iterations: Sequence[int]) -> dict[int, Any]:
    # tab10 keeps neighbouring iterations distinct; past ten a sequential map still orders them
    if len(iterations) <= 10:
        return {k: f"C{i}" for i, k in enumerate(iterations)}
    cmap = plt.get_cmap("viridis")
    return {k: cmap(i / (len(iterations) - 1)) for i, k in enumerate(iterations)}


def _draw_panel(ax: Any, panel: Panel, metrics: dict[int, list[Row]], colors: dict[int, Any]) -> None:
    drawn: list[tuple[Series, Any]] = []
    for i, series in enumerate(panel.series):
        style = _STYLES[i]  # PANELS holds at most len(_STYLES) series per panel
        if not _has_key(metrics, series.key):
            continue
        drawn.append((series, style))
        for k, rows in metrics.items():
            points = [(r["step"], r[series.key]) for r in rows if series.key in r]
            if not points:
                continue
            xs, ys = [x for x, _ in points], [y for _, y in points]
            # held-out values come every eval_every steps only: markers keep a sparse line readable
            marker = "o" if series.key.startswith("eval/") else None
            ax.plot(xs, ys, color=colors[k], linestyle=style, marker=marker, markersize=3, linewidth=1.2)
    handles = [Line2D([], [], color=colors[k], label=f"iter {k}") for k in metrics]
    if len(drawn) > 1:  # a key to the line styles, in black so that it is not read as an iteration
        handles += [Line2D([], [], color="black", linestyle=style, label=s.label) for s, style in drawn]
    ax.legend(handles=handles, fontsize=7)
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel, fontsize=8)
    if panel.ylim is not None:
        ax.set_ylim(*panel.ylim)
    ax.grid(alpha=0.3)


def _save_figure_atomic(fig: Figure, path: Path) -> None:
    """savefig to a temporary name in the same directory, then rename: a reader never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")  # explicit: the temporary suffix does not say png
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def plot_training(metrics: dict[int, list[Row]], out: Path) -> list[str]:
    """Write the figure to ``out``; returns the panel titles, in order."""
    panels = panels_present(metrics)
    if not panels:
        raise NoMetricsError(f"no known metric in any iteration; nothing to plot for {out}")
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 3.4 * nrows), dpi=120, squeeze=False)
    colors = _iteration_colors(sorted(metrics))
    try:
        flat = list(axes.flat)
        for ax, panel in zip(flat, panels, strict=False):  # the grid may have one cell more
            _draw_panel(ax, panel, metrics, colors)
        for ax in flat[len(panels):]:  # an odd panel count leaves one empty cell
            ax.set_visible(False)
        fig.tight_layout()
        _save_figure_atomic(fig, out)
    finally:
        plt.close(fig)
    return [p.title for p in panels]


# ------------------------------------------------------------------------------------------ table
def _fmt(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return f"{x:.6g}"  # six significant digits: enough for lr (5e-05) and for losses alike


def training_table(run: RunDir, data: TrainingMetrics, figure: Path) -> str:
    """The Markdown of training.md; columns only for the keys some iteration logged."""
    keys = [k for k in TABLE_KEYS if _has_key(data.rows, k)]
    has_eval = _has_key(data.rows, EVAL_LOSS) or _has_key(data.rows, EVAL_ACCURACY)
    t = run.config.train
    header = ["iteration", "steps", *keys] + (["eval step", EVAL_LOSS, EVAL_ACCURACY] if has_eval else [])
    lines = [f"# Training: {run.config.run.name}", "",
             f"Run `{run.path}`, loss `{t.loss.value if t.loss is not None else 'default'}`, "
             f"train.max_steps={t.max_steps} per iteration. Each cell is the last value logged in "
             "`iter_KK/train/metrics.jsonl`; steps is the last logged step."
             + (" The eval columns are the held-out split at the last step that evaluated it "
                f"(every train.eval_every={t.eval_every} steps)." if has_eval else
                " No held-out metrics were logged."), "",
             "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for k in sorted(data.rows):
        rows = data.rows[k]
        cells = [str(k), str(rows[-1]["step"])]
        cells += [_fmt(v[1]) if (v := last_value(rows, key)) else "n/a" for key in keys]
        if has_eval:
            # the held-out loss and accuracy of one and the same evaluation: the last line with eval/loss
            last_eval = next((r for r in reversed(rows) if EVAL_LOSS in r or EVAL_ACCURACY in r), None)
            cells += (["n/a"] * 3 if last_eval is None else
                      [str(last_eval["step"]), _fmt(last_eval.get(EVAL_LOSS)), _fmt(last_eval.get(EVAL_ACCURACY))])
        lines.append("| " + " | ".join(cells) + " |")
    if data.skipped:
        lines += ["", "Iterations without training metrics:", ""]
        lines += [f"- iteration {k}: `{metrics_path(run, k).relative_to(run.path)}` {why}"
                  for k, why in sorted(data.skipped.items())]
    lines += ["", f"Figure: `{figure}`", "", f"![training metrics]({figure.name})", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ entry point
@dataclass
class TrainingReport:
    figure: Path  # <run>/report/training.png
    table: Path  # <run>/report/training.md
    panels: list[str]  # panel titles of the figure, in order
    skipped: dict[int, str]  # iterations without metrics, and why


def write_training_report(run: RunDir) -> TrainingReport:
    """Write training.png and training.md under <run>/report/; NoMetricsError when no iteration has any."""
    data = load_training_metrics(run)
    if not data.rows:
        looked = ", ".join(f"{k} ({why})" for k, why in sorted(data.skipped.items())) or "none"
        raise NoMetricsError(f"{run.path}: no training metrics yet (iter_KK/train/metrics.jsonl; iterations "
                             f"looked at: {looked})")
    out = run.path / REPORT_DIR
    figure, table = out / TRAINING_FIGURE, out / TRAINING_TABLE
    panels = plot_training(data.rows, figure)
    atomic_write_text(table, training_table(run, data, figure))
    return TrainingReport(figure, table, panels, data.skipped)
