"""`silmm report RUN`, benchmark and self-feedback parts: our numbers beside the paper's, and what the judge saw.

    <run>/report/benchmarks.md           per benchmark: a table per category x iteration in the layout of the
                                         paper's Tables 4-6 (and of Table 1), with the paper's SEED-LLaMA,
                                         DreamLLM and Emu3 rows labelled "(paper)"; each of our rows says its
                                         scorer, images per prompt, prompts (smoke test or whole set) and whether
                                         it follows the benchmark's official recipe
    <run>/report/benchmark_<name>.png    score per category per iteration (one panel per category, + overall),
                                         the paper's per-iteration rows dashed
    <run>/report/grid_<name>.png         the same benchmark images across iterations (rows: images; columns:
                                         iterations), read from each iteration's export folder
    <run>/report/self_feedback.md, .png  training side: the self-score distribution of every iteration's samples
                                         (iter_KK/scores/shard_*.h5) and the chosen - rejected score gap of its
                                         pairs (iter_KK/pairs.h5)
    <run>/report/index.md                links every part written (training.md from silmm/report.py too)

Reads   <run>/eval/<benchmark>/iter_KK/results.json (the eval stage's last step, jobs/eval_results.py; schema in
        silmm/eval/results.py): scores there are fractions in [0, 1]; the tables and plots show them in percent, as
        the paper prints them (its numbers are kept as printed, silmm/eval/paper.py). A value the benchmark could
        not compute (null in the file) shows as n/a.
A results file that is not valid JSON, lacks a field, or sits under the wrong benchmark or iteration folder is an
error naming the file (a report that silently drops data would mislead more than none).

The grid needs no knowledge of a benchmark's export layout: every iteration exports the same prompt ids with the
same seeds under the same relative names, so a relative path found in every iteration's export is one image
of one prompt across iterations. Rows are spread evenly over the sorted common paths.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # batch nodes have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageOps  # noqa: E402

from silmm.eval import paper  # noqa: E402
from silmm.eval.results import RESULTS_FILE, BenchmarkResults, ResultsError, read_results  # noqa: E402
from silmm.fsutil import atomic_write_text  # noqa: E402
from silmm.report import REPORT_DIR, ReportError, _save_figure_atomic, expected_iterations  # noqa: E402
from silmm.rundir import RunDir  # noqa: E402
from silmm.store import read_shard  # noqa: E402

EVAL_DIR = "eval"
BENCHMARKS_TABLE = "benchmarks.md"
FEEDBACK_TABLE, FEEDBACK_FIGURE = "self_feedback.md", "self_feedback.png"
INDEX = "index.md"
TOY_REPORT = "report.md"  # silmm/toy/report.py's, linked when present
GRID_ROWS, GRID_CELL = 6, 128  # images shown per benchmark; cell side in pixels
OVERALL = "overall"
_DIR = re.compile(r"iter_(\d+)$")


# ------------------------------------------------------------------------------------------ results.json
@dataclass
class EvalResult:
    """One results.json (silmm/eval/results.py's BenchmarkResults) and where it lies."""

    path: Path
    res: BenchmarkResults

    @property
    def benchmark(self) -> str:
        return self.res.benchmark

    @property
    def display(self) -> str:
        return self.res.display or self.res.benchmark

    @property
    def per_category(self) -> dict[str, float]:
        return self.res.per_category

    @property
    def overall(self) -> float:
        return self.res.overall

    @property
    def set_size(self) -> int | None:
        """The benchmark's whole prompt set, when results.json records it (``benchmark_prompts``)."""
        return getattr(self.res, "benchmark_prompts", None)

    @property
    def smoke_test(self) -> bool:
        """Fewer prompts than the whole set: max_prompts cut it. Without the set size on record, a max_prompts
        that the evaluated count reaches is taken as a cut (the eval stage takes the whole set when
        max_prompts exceeds it)."""
        if self.set_size is not None:
            return self.res.prompts < self.set_size
        return self.res.max_prompts is not None and self.res.prompts >= self.res.max_prompts

    @property
    def export_dir(self) -> Path | None:
        return None if not self.res.export else self.path.parent / self.res.export


def read_result(path: Path) -> EvalResult:
    """Read one results.json (silmm.eval.results.read_results) and check that it lies where it says it
    belongs; ReportError naming the file."""
    try:
        res = read_results(path)
    except (ResultsError, TypeError) as exc:  # TypeError: a key BenchmarkResults does not know how to take
        raise ReportError(str(exc) if isinstance(exc, ResultsError) else f"{path}: {exc}") from exc
    if not isinstance(res.iteration, int) or not isinstance(res.per_category, dict):
        raise ReportError(f"{path}: iteration {res.iteration!r} or per_category {res.per_category!r} malformed")
    folder = path.parent
    m = _DIR.match(folder.name)
    if m is None or int(m.group(1)) != res.iteration or folder.parent.name != res.benchmark:
        raise ReportError(f"{path}: says benchmark {res.benchmark!r} iteration {res.iteration} but lies "
                          f"in {folder.parent.name}/{folder.name}")
    return EvalResult(path, res)


def find_results(run_path: Path) -> dict[str, dict[int, EvalResult]]:
    """benchmark -> iteration -> its results, for every results.json of the run (benchmarks sorted by name).
    Unlike silmm.eval.results.find_results, a file that does not read is an error, not skipped."""
    out: dict[str, dict[int, EvalResult]] = {}
    for path in sorted((run_path / EVAL_DIR).glob(f"*/iter_*/{RESULTS_FILE}")):
        r = read_result(path)
        out.setdefault(r.benchmark, {})[r.res.iteration] = r
    return {b: dict(sorted(its.items())) for b, its in out.items()}


# ------------------------------------------------------------------------------------------ our values
def _norm(key: str) -> str:
    """Category names compared loosely: '3D Spatial', '3d_spatial' and '3d-spatial' are one category."""
    return re.sub(r"[^a-z0-9]", "", key.lower())


def our_value(result: EvalResult, benchmark: str, key: str) -> float | None:
    """The value of a paper column's key in our results: a category, a group mean (the paper's way), overall."""
    if key == OVERALL:
        return result.overall
    group = paper.GROUPS.get(benchmark, {}).get(key, ())
    if len(group) > 1:  # a one-category group (Non-spatial) is that category
        values = [our_value(result, benchmark, c) for c in group]
        return None if any(v is None for v in values) else float(np.mean(values))
    by_norm = {_norm(c): v for c, v in result.per_category.items()}
    return by_norm.get(_norm(key))


def category_titles(benchmark: str) -> dict[str, str]:
    """The benchmark's own column titles (Benchmark.category_titles), through the registry; {} if unknown."""
    from silmm.eval.benchmarks import BENCHMARKS, get_benchmark

    if benchmark not in BENCHMARKS:
        return {}
    return dict(getattr(get_benchmark(benchmark), "category_titles", None) or {})


@dataclass(frozen=True)
class Column:
    header: str
    key: str
    paper_index: int | None  # the paper table's column, None for a column the paper does not have


def table_columns(benchmark: str, results: Mapping[int, EvalResult], table: paper.PaperTable | None) -> list[Column]:
    """The paper table's columns for this benchmark (in its order); with the per-iteration table (or none),
    our categories the paper lacks and our overall follow."""
    cols = [] if table is None else [Column(h, k, i) for i, h, k in table.columns_of(benchmark)]
    if table is not None and table is not paper.tables_for(benchmark)[0]:
        return cols  # Table 1: its layout only
    known = {_norm(c.key) for c in cols}
    titles = category_titles(benchmark)
    for r in results.values():
        for cat in r.per_category:
            if _norm(cat) not in known:
                known.add(_norm(cat))
                cols.append(Column(titles.get(cat, cat), cat, None))
    if OVERALL not in {c.key for c in cols}:
        cols.append(Column("overall" if table is None else "overall (ours only)", OVERALL, None))
    return cols


# ------------------------------------------------------------------------------------------ markdown
def _pct(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.2f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def prompts_cell(r: EvalResult) -> str:
    if not r.smoke_test:
        return str(r.res.prompts)
    if r.set_size is not None:
        return f"smoke test: {r.res.prompts} of {r.set_size} prompts"
    return f"smoke test: {r.res.prompts} prompts (max_prompts={r.res.max_prompts}; the whole set not recorded)"


def recipe_cell(r: EvalResult) -> str:
    if r.res.official_recipe and not r.res.deviations:
        return "official"
    return "deviates: " + ("; ".join(r.res.deviations) if r.res.deviations else "(no deviation recorded)")


def _dagger(r: EvalResult, benchmark: str, key: str) -> str:
    """" †" on a value judged by a substitute for the benchmark's own judge (results' deviating_categories),
    so nobody mistakes it for the official number; a group or the overall is marked when any part is."""
    bad = set(r.res.deviating_categories)
    if not bad:
        return ""
    parts = set(paper.GROUPS.get(benchmark, {}).get(key, (key,)))
    return " †" if "*" in bad or key == OVERALL or parts & bad else ""


def _iteration_label(k: int | None) -> str:
    return "+ Ours (final)" if k is None else ("0 (base)" if k == 0 else str(k))


def _paper_rows(table: paper.PaperTable, benchmark: str) -> list[paper.PaperRow]:
    """The LMM rows of a table that have a number for this benchmark (not the %Improvment rows)."""
    idx = [i for i, _, _ in table.columns_of(benchmark)]
    return [row for row in table.rows if row.model in paper.LMM_MODELS and row.kind == "score"
            and any(row.values()[i] is not None for i in idx)]


def comparison_table(benchmark: str, results: Mapping[int, EvalResult], table: paper.PaperTable | None) -> list[str]:
    """Markdown lines: the paper's rows (labelled) then ours, one row per iteration, in the table's layout."""
    cols = table_columns(benchmark, results, table)
    tail = ["scorer", "images/prompt", "prompts", "recipe"]
    header = ["model", "iteration", *[c.header for c in cols], *tail]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|---" * len(header) + "|"]
    short = table.source.removeprefix(f"{paper.PAPER} ") if table is not None else ""
    for row in _paper_rows(table, benchmark) if table is not None else []:
        cells = [f"{row.model} (paper, {short})", _iteration_label(row.iteration)]
        cells += [row.cells()[c.paper_index] if c.paper_index is not None else "-" for c in cols]
        cells += ["expert (paper)", "-", "-", "-"]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    for k, r in results.items():
        cells = ["this run", _iteration_label(k),
                 *[_pct(our_value(r, benchmark, c.key)) + _dagger(r, benchmark, c.key) for c in cols],
                 f"`{r.res.scorer}`", str(r.res.images_per_prompt), prompts_cell(r), recipe_cell(r)]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def _extra_tables(results: Mapping[int, EvalResult]) -> list[str]:
    """The benchmark's own further tables (results.json "tables"), as raw values, one column per iteration."""
    names = list(dict.fromkeys(n for r in results.values() for n in r.res.tables))
    lines: list[str] = []
    for name in names:
        keys = list(dict.fromkeys(k for r in results.values() for k in r.res.tables.get(name, {})))
        its = list(results)
        lines += ["", f"Table `{name}` (as the benchmark's scoring wrote it, not rescaled):", "",
                  "| key | " + " | ".join(f"iteration {k}" for k in its) + " |", "|---" * (len(its) + 1) + "|"]
        for key in keys:
            vals = [results[k].res.tables.get(name, {}).get(key) for k in its]
            lines.append(f"| {_cell(key)} | " + " | ".join("n/a" if v is None else f"{v:.6g}" for v in vals) + " |")
    return lines


def benchmark_section(benchmark: str, results: Mapping[int, EvalResult], out_dir: Path,
                      figure: Path | None, grid: GridInfo | None) -> list[str]:
    display = next(iter(results.values())).display
    tables = paper.tables_for(benchmark)
    lines = [f"## {display} (`{benchmark}`)", ""]
    if tables:
        lines += [f"In the layout of {tables[0].source}: {tables[0].title}. Scores in percent. Rows marked "
                  "(paper) are the paper's published numbers, as printed, scored with the expert models the "
                  "benchmark recommends at its default settings; rows marked `this run` are ours, scored by the "
                  "scorer named in the row (results.json holds fractions; shown x100).", ""]
    else:
        lines += ["The SILMM paper reports no numbers for this benchmark; our rows only. Scores in percent "
                  "(results.json holds fractions; shown x100).", ""]
    for i, table in enumerate(tables or (None,)):
        if i > 0 and table is not None:
            lines += ["", f"In the layout of {table.source} (base model vs. the final SILMM model):", ""]
        lines += comparison_table(benchmark, results, table)
        if table is not None and table.note:
            lines += ["", f"Note ({table.source.removeprefix(paper.PAPER + ' ')}): {table.note}"]
    if any(r.res.deviating_categories for r in results.values()):
        lines += ["", "† judged by a substitute for the benchmark's recommended model (see the recipe column); not "
                  "comparable with the paper's numbers as they stand."]
    if benchmark in paper.GROUPS:
        groups = "; ".join(f"{g} = mean({', '.join(c)})" for g, c in paper.GROUPS[benchmark].items() if len(c) > 1)
        lines += ["", f"Our group columns are computed as the paper does: {groups}."]
    lines += _extra_tables(results)
    lines += ["", "Our evaluations:", ""]
    for k, r in results.items():
        x = r.res
        lines.append(f"- iteration {k}: `{r.path.relative_to(out_dir.parent)}`; model `{x.model or 'n/a'}` "
                     f"(hash {x.model_hash or 'n/a'}); eval hash {x.eval_hash or 'n/a'}; scorer `{x.scorer}`; "
                     f"{x.images_per_prompt} images per prompt; prompts: {prompts_cell(r)}; {recipe_cell(r)}"
                     + (f"; finished {x.finished}" if x.finished else ""))
    notes = list(dict.fromkeys(n for r in results.values() for n in r.res.notes))
    if notes:
        lines += ["", "The benchmark's notes on these numbers:", "", *[f"- {n}" for n in notes]]
    if figure is not None:
        lines += ["", f"![{display} per category per iteration]({figure.name})"]
    if grid is not None:
        lines += ["", f"The same images across iterations ({len(grid.paths)} of {grid.common} exported images "
                  "found in every iteration; rows: export path, columns: iterations " +
                  ", ".join(str(k) for k in grid.iterations) + "):", "", f"![{display} grid]({grid.path.name})"]
    else:
        lines += ["", "No image grid: no iteration has PNG images in its export folder, or the exports share no "
                  "image path."]
    return lines + [""]


# ------------------------------------------------------------------------------------------ figures
def _save_image_atomic(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def plot_benchmark(benchmark: str, results: Mapping[int, EvalResult], out: Path) -> list[str]:
    """One panel per category of the per-iteration table (+ overall): ours solid, the paper's rows dashed.
    Returns the panel titles, in order."""
    tables = paper.tables_for(benchmark)
    table = tables[0] if tables else None
    cols = table_columns(benchmark, results, table)
    ncols = min(4, len(cols))
    nrows = math.ceil(len(cols) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows), dpi=110, squeeze=False)
    its = list(results)
    paper_rows = _paper_rows(table, benchmark) if table is not None else []
    models = list(dict.fromkeys(r.model for r in paper_rows if r.iteration is not None))
    scorers = "scorer " + ", ".join(dict.fromkeys(r.res.scorer for r in results.values()))
    try:
        flat = list(axes.flat)
        for ax, col in zip(flat, cols, strict=False):
            ours = [our_value(results[k], benchmark, col.key) for k in its]
            ax.plot(its, [np.nan if v is None else 100 * v for v in ours], color="black", marker="o",
                    linewidth=1.8, label=f"this run ({scorers})")
            for m, model in enumerate(models):
                if col.paper_index is None:
                    continue
                pts = [(r.iteration, r.values()[col.paper_index]) for r in paper_rows
                       if r.model == model and r.iteration is not None and r.values()[col.paper_index] is not None]
                ax.plot([x for x, _ in pts], [y for _, y in pts], color=f"C{m}", linestyle="--", marker=".",
                        linewidth=1, label=f"{model} (paper)")
            ax.set_title(col.header, fontsize=9)
            ax.set_xlabel("iteration", fontsize=8)
            ax.set_ylabel("score (%)", fontsize=8)
            ax.set_ylim(0, 100)
            ax.set_xticks(sorted(set(its) | {r.iteration for r in paper_rows if r.iteration is not None}))
            ax.grid(alpha=0.3)
        for ax in flat[len(cols):]:
            ax.set_visible(False)
        handles, labels = flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
        fig.suptitle(f"{next(iter(results.values())).display}: score per category per iteration", fontsize=10)
        fig.tight_layout(rect=(0, 0.06, 1, 0.95))
        _save_figure_atomic(fig, out)
    finally:
        plt.close(fig)
    return [c.header for c in cols]


@dataclass
class GridInfo:
    path: Path
    iterations: list[int]
    paths: list[str]  # the export-relative image paths shown, one row each
    common: int  # images found in every iteration's export


def _exported_pngs(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*.png") if p.is_file()}


def write_grid(results: Mapping[int, EvalResult], out: Path, rows: int = GRID_ROWS,
               cell: int = GRID_CELL) -> GridInfo | None:
    """The same exported images across iterations; None when no iteration has exported PNGs."""
    exports = {k: r.export_dir for k, r in results.items() if r.export_dir is not None and r.export_dir.is_dir()}
    found = {k: _exported_pngs(d) for k, d in exports.items()}
    found = {k: names for k, names in found.items() if names}
    if not found:
        return None
    its = sorted(found)
    common = sorted(set.intersection(*found.values()))
    if not common:
        return None
    picks = sorted({int(round(i)) for i in np.linspace(0, len(common) - 1, min(rows, len(common)))})
    names = [common[i] for i in picks]
    pad, label_w, head_h = 4, 300, 18
    canvas = Image.new("RGB", (label_w + len(its) * (cell + pad), head_h + len(names) * (cell + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, k in enumerate(its):
        draw.text((label_w + c * (cell + pad), 3), f"iteration {k}", fill=(0, 0, 0))
    for r, name in enumerate(names):
        y = head_h + r * (cell + pad)
        text = name if len(name) <= 46 else name[:21] + "..." + name[-22:]
        draw.text((4, y + cell // 2 - 6), text, fill=(0, 0, 0))
        for c, k in enumerate(its):
            with Image.open(exports[k] / name) as im:
                tile = ImageOps.contain(im.convert("RGB"), (cell, cell))  # up or down, aspect ratio kept
            x = label_w + c * (cell + pad)
            canvas.paste(tile, (x, y))
            # a frame: benchmark images often have white backgrounds that would merge across cells
            draw.rectangle((x - 1, y - 1, x + tile.width, y + tile.height), outline=(160, 160, 160))
    _save_image_atomic(canvas, out)
    return GridInfo(out, its, names, len(common))


# ------------------------------------------------------------------------------------------ entry: benchmarks
@dataclass
class BenchmarkReport:
    table: Path  # <run>/report/benchmarks.md
    figures: dict[str, Path]  # benchmark -> benchmark_<name>.png
    panels: dict[str, list[str]]  # benchmark -> panel titles, in order
    grids: dict[str, GridInfo]  # benchmark -> grid (absent: nothing exported)
    results: dict[str, dict[int, EvalResult]]


def write_benchmark_report(run: RunDir) -> BenchmarkReport | None:
    """Write benchmarks.md, the plots and grids under <run>/report/; None (nothing written) without results."""
    found = find_results(run.path)
    if not found:
        return None
    out = run.path / REPORT_DIR
    rep = BenchmarkReport(out / BENCHMARKS_TABLE, {}, {}, {}, found)
    lines = [f"# Benchmarks: {run.config.run.name}", "",
             f"Run `{run.path}`. Iteration 0 is the base model (`model.path`), iteration K the model after K "
             "SILMM iterations. Paper numbers: " + ", ".join(t.source for t in paper.TABLES) + ".", ""]
    for name, results in found.items():
        figure = out / f"benchmark_{name}.png"
        rep.panels[name] = plot_benchmark(name, results, figure)
        rep.figures[name] = figure
        grid = write_grid(results, out / f"grid_{name}.png")
        if grid is not None:
            rep.grids[name] = grid
        lines += benchmark_section(name, results, out, figure, grid)
    atomic_write_text(rep.table, "\n".join(lines))
    return rep


# ------------------------------------------------------------------------------------------ self-feedback
@dataclass
class ScoreStats:
    """The self-scores s(x, y) of one iteration's samples (population std; spread: max - min within a prompt)."""

    iteration: int
    shards: int
    shards_expected: int | None
    samples: int
    prompts: int
    mean: float
    std: float
    min: float
    median: float
    max: float
    spread: float  # mean over prompts of (max - min) of its samples' scores: what pair selection can use


@dataclass
class GapStats:
    """The chosen and rejected scores of one iteration's pairs."""

    iteration: int
    pairs: int
    chosen: float  # mean chosen score
    rejected: float  # mean rejected score
    gap: float  # mean of chosen - rejected
    gap_median: float
    gap_min: float
    ties: float  # share of pairs whose gap is <= 0


def score_stats(iteration: int, prompt_ids: np.ndarray, scores: np.ndarray, shards: int,
                expected: int | None) -> ScoreStats:
    s = scores.astype(np.float64)
    spreads = [np.ptp(s[prompt_ids == p]) for p in np.unique(prompt_ids)]
    return ScoreStats(iteration, shards, expected, len(s), len(spreads), float(s.mean()), float(s.std()),
                      float(s.min()), float(np.median(s)), float(s.max()), float(np.mean(spreads)))


def gap_stats(iteration: int, chosen: np.ndarray, rejected: np.ndarray) -> GapStats:
    c, r = chosen.astype(np.float64), rejected.astype(np.float64)
    gap = c - r
    return GapStats(iteration, len(gap), float(c.mean()), float(r.mean()), float(gap.mean()),
                    float(np.median(gap)), float(gap.min()), float((gap <= 0).mean()))


@dataclass
class FeedbackData:
    scores: dict[int, np.ndarray]  # iteration -> every sample's self-score
    stats: dict[int, ScoreStats]
    gaps: dict[int, np.ndarray]  # iteration -> chosen - rejected of every pair
    gap_stats: dict[int, GapStats]


def load_feedback(run: RunDir) -> FeedbackData:
    """Every finished scores shard and pairs file (shards are checked against the run's config hash)."""
    data = FeedbackData({}, {}, {}, {})
    for k in expected_iterations(run):
        paths = sorted(p for p in run.stage_dir(k, "scores").glob("shard_*.h5") if p.is_file())
        if paths:
            shards = [read_shard(p, "scores", run.config_hash, k, columns=("prompt_id", "score")) for p in paths]
            ids = np.concatenate([s["prompt_id"] for s in shards])
            scores = np.concatenate([s["score"] for s in shards])
            if len(scores):
                data.scores[k] = scores
                data.stats[k] = score_stats(k, ids, scores, len(paths), shards[0].meta.shard_count)
        pairs_path = run.pairs_path(k)
        if pairs_path.is_file():
            pairs = read_shard(pairs_path, "pairs", run.config_hash, k, columns=("chosen_score", "rejected_score"))
            if len(pairs["chosen_score"]):
                data.gaps[k] = pairs["chosen_score"].astype(np.float64) - pairs["rejected_score"]
                data.gap_stats[k] = gap_stats(k, pairs["chosen_score"], pairs["rejected_score"])
    return data


def _f(x: float) -> str:
    return f"{x:.4f}"


def feedback_table(run: RunDir, data: FeedbackData, figure: Path) -> str:
    lines = [f"# Self-feedback: {run.config.run.name}", "",
             f"Run `{run.path}`, feedback `{run.config.feedback.method.value}`. Self-scores s(x, y) of every "
             "sample of each iteration (`iter_KK/scores/shard_*.h5`, column `score`); std is the population "
             "standard deviation; spread is the mean over prompts of (max - min) of the prompt's sample scores.", ""]
    if data.stats:
        lines += ["| iteration | shards | samples | prompts | mean | std | min | median | max | spread |",
                  "|---" * 10 + "|"]
        for k, s in data.stats.items():
            shards = f"{s.shards} of {s.shards_expected}" if s.shards_expected else str(s.shards)
            lines.append(f"| {k} | {shards} | {s.samples} | {s.prompts} | {_f(s.mean)} | {_f(s.std)} | "
                         f"{_f(s.min)} | {_f(s.median)} | {_f(s.max)} | {_f(s.spread)} |")
    else:
        lines.append("No scores shard yet.")
    lines += ["", "Chosen and rejected scores of the selected pairs (`iter_KK/pairs.h5`); gap = chosen - "
              "rejected; ties = share of pairs with gap <= 0.", ""]
    if data.gap_stats:
        lines += ["| iteration | pairs | chosen mean | rejected mean | gap mean | gap median | gap min | ties |",
                  "|---" * 8 + "|"]
        for k, g in data.gap_stats.items():
            lines.append(f"| {k} | {g.pairs} | {_f(g.chosen)} | {_f(g.rejected)} | {_f(g.gap)} | "
                         f"{_f(g.gap_median)} | {_f(g.gap_min)} | {_f(g.ties)} |")
    else:
        lines.append("No pairs file yet.")
    lines += ["", f"![self-score distributions and pair gaps]({figure.name})", ""]
    return "\n".join(lines)


def plot_feedback(data: FeedbackData, out: Path) -> list[str]:
    """Two panels: the self-score histogram of each iteration, and the chosen - rejected gap histogram."""
    panels = [("self-score per sample", "s(x, y)", data.scores), ("chosen - rejected score gap", "gap", data.gaps)]
    panels = [p for p in panels if p[2]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.3), dpi=110, squeeze=False)
    try:
        for ax, (title, xlabel, series) in zip(axes.flat, panels, strict=True):
            values = np.concatenate(list(series.values()))
            lo, hi = float(values.min()), float(values.max())
            bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 31)
            for c, (k, v) in enumerate(series.items()):
                ax.hist(v, bins=bins, histtype="step", linewidth=1.5, color=f"C{c}", label=f"iter {k}")
            ax.set_title(title)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("count")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        _save_figure_atomic(fig, out)
    finally:
        plt.close(fig)
    return [p[0] for p in panels]


@dataclass
class FeedbackReport:
    table: Path
    figure: Path
    panels: list[str]
    data: FeedbackData


def write_feedback_report(run: RunDir) -> FeedbackReport | None:
    """self_feedback.md and .png under <run>/report/; None (nothing written) before any scores or pairs exist."""
    data = load_feedback(run)
    if not data.scores and not data.gaps:
        return None
    out = run.path / REPORT_DIR
    figure, table = out / FEEDBACK_FIGURE, out / FEEDBACK_TABLE
    panels = plot_feedback(data, figure)
    atomic_write_text(table, feedback_table(run, data, figure))
    return FeedbackReport(table, figure, panels, data)


# ------------------------------------------------------------------------------------------ index
def write_index(run: RunDir, parts: Sequence[tuple[str, Path | None]], notes: Sequence[str] = ()) -> Path:
    """<run>/report/index.md: a link to each part written now (title, path), a line for each part not written,
    the toy world's own report when it exists, and ``notes`` (why a part is missing)."""
    out = run.path / REPORT_DIR
    lines = [f"# Report: {run.config.run.name}", "", f"Run `{run.path}` (config {run.config_hash}).", ""]
    for title, path in parts:
        lines.append(f"- [{title}]({path.relative_to(out).as_posix()})" if path is not None
                     else f"- {title}: not written (nothing on disk yet)")
    if (out / TOY_REPORT).is_file():
        lines.append(f"- [toy world evaluation]({TOY_REPORT})")
    if notes:
        lines += ["", *[f"Note: {n}" for n in notes]]
    path = out / INDEX
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path

