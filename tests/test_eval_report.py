"""`silmm report`, benchmark and self-feedback parts, and the paper's numbers (silmm/eval/report.py, paper.py).

results.json files, export folders, scores shards and pairs files are written here by hand, as the eval,
scores and pairs stages would write them; no model is built.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from silmm import cli
from silmm.eval import paper as P
from silmm.eval import report as ER
from silmm.eval.results import BenchmarkResults, results_path
from silmm.eval.results import write_results as write_results_file
from silmm.report import ReportError
from silmm.rundir import RunDir
from silmm.store import ShardMeta, write_shard
from tests.helpers import tiny_run
from tests.test_report import assert_valid_png, discrete_iterations

T2I_CATS = ("color", "shape", "texture", "spatial", "3d_spatial", "numeracy", "non_spatial", "complex")
DPG_CATS = ("global", "entity", "attribute", "relation", "other")


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    # The report reads no weights: build_tiny_if_missing lets the config name a checkpoint that is never built.
    return tiny_run(tmp_path / "runs", tmp_path / "never_built", "janus", "run.iterations=3",
                    "model.build_tiny_if_missing=true")


def write_results(run: RunDir, benchmark: str, iteration: int, per_category: dict[str, float], overall: float,
                  **fields) -> Path:
    """A results.json as jobs/eval_results.py writes it (silmm.eval.results)."""
    data = dict(benchmark=benchmark, display={"t2i_compbench": "T2I-CompBench++", "dpg_bench": "DPG-Bench"}
                .get(benchmark, benchmark), iteration=iteration, scorer="self", official_recipe=False,
                deviations=["scorer self instead of the benchmark's expert models"], model=f"iter_{iteration}",
                model_hash=f"h{iteration}", silmm_version="0", config_hash=run.config_hash, eval_hash="e1",
                prompts=2400, images_per_prompt=10, max_prompts=None, overall=overall, per_category=per_category)
    return write_results_file(results_path(run.path, benchmark, iteration), BenchmarkResults(**{**data, **fields}))


def synthetic_results(run: RunDir) -> dict[str, dict[int, dict[str, float]]]:
    """T2I-CompBench++ and DPG-Bench at iterations 0..2, distinct values everywhere; DPG iteration 2 a smoke test."""
    rng = np.random.default_rng(0)
    values: dict[str, dict[int, dict[str, float]]] = {}
    for name, cats in (("t2i_compbench", T2I_CATS), ("dpg_bench", DPG_CATS)):
        values[name] = {}
        for k in range(3):
            per = {c: float(rng.uniform(0.05, 0.95)) for c in cats}
            overall = float(np.mean(list(per.values())))
            extra = {"max_prompts": 7, "prompts": 7, "images_per_prompt": 4} if name == "dpg_bench" and k == 2 \
                else ({"prompts": 1065, "images_per_prompt": 4} if name == "dpg_bench" else {})
            write_results(run, name, k, per, overall, **extra)
            values[name][k] = {**per, "overall": overall}
    return values


def md_tables(md: str, heading: str) -> list[list[dict[str, str]]]:
    """The Markdown tables of one `## heading` section, each as a list of {column: cell} rows."""
    section = md.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    tables, current, header = [], None, None
    for line in section.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if header is None:
                header, current = cells, []
            elif not line.startswith("|---"):
                current.append(dict(zip(header, cells, strict=True)))
        elif header is not None:
            tables.append(current)
            header = current = None
    if header is not None:
        tables.append(current)
    return tables


def write_exports(run: RunDir, benchmark: str, iterations: range, names: list[str]) -> None:
    for k in iterations:
        folder = results_path(run.path, benchmark, k).parent / "export"
        for j, name in enumerate(names):
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), (40 * k, 20 * j, 100)).save(path)


# ------------------------------------------------------------------------------------------ paper numbers
def test_paper_tables_have_sources_and_one_number_per_column():
    for table in P.TABLES:
        assert table.source.startswith("SILMM (arXiv 2412.05818) Table ")
        assert table.unit == "percent"
        for row in table.rows:
            assert len(row.values()) == len(table.columns)  # also checked at import
    with pytest.raises(ValueError, match="Table 9, row 'X'"):
        P.PaperTable("Table 9", "t", ("a", "b"), (("x", "a"), ("x", "b")), (P.PaperRow("X", "X", 0, "1.0"),))


def _row(table: P.PaperTable, model: str, iteration: int | None, label: str | None = None) -> P.PaperRow:
    return next(r for r in table.rows if r.model == model and r.iteration == iteration and r.kind == "score"
                and (label is None or r.label == label))


@pytest.mark.parametrize("model", ["SEED-LLaMA", "DreamLLM"])
def test_table1_groups_are_means_of_table4(model):
    """Table 1's T2I-CompBench++ columns are Table 4's category means (base = iteration 0, + Ours = iteration 3)."""
    for t1_row, k in ((_row(P.TABLE_1, model, 0), 0), (_row(P.TABLE_1, model, None), 3)):
        t4_row = _row(P.TABLE_4, model, k)
        for group, cats in P.T2I_COMPBENCH_GROUPS.items():
            mean = np.mean([P.TABLE_4.value(t4_row, "t2i_compbench", c) for c in cats])
            assert P.TABLE_1.value(t1_row, "t2i_compbench", group) == pytest.approx(mean, abs=0.006), (model, k, group)


@pytest.mark.parametrize("model", ["SEED-LLaMA", "DreamLLM"])
def test_table5_is_dpg_bench_as_in_table1(model):
    """Table 5's misprinted header: its rows are Table 1's DPG-Bench columns (within the paper's rounding)."""
    for t1_row, k in ((_row(P.TABLE_1, model, 0), 0), (_row(P.TABLE_1, model, None), 3)):
        t5_row = _row(P.TABLE_5, model, k)
        for _, _, key in P.TABLE_5.columns_of("dpg_bench"):
            assert P.TABLE_5.value(t5_row, "dpg_bench", key) == pytest.approx(
                P.TABLE_1.value(t1_row, "dpg_bench", key), abs=0.05), (model, key)
    assert P.TABLE_5.columns == ("Global", "Entity", "Attribute", "Relation", "Other", "All")
    assert "Color Shape Texture Spatial 3D Spatial All" in P.TABLE_5.note


def test_table6_all_matches_table1_tifa():
    for model in ("SEED-LLaMA", "DreamLLM"):
        assert P.TABLE_6.value(_row(P.TABLE_6, model, 0), "tifa", "overall") == P.TABLE_1.value(
            _row(P.TABLE_1, model, 0), "tifa", "overall")
        assert P.TABLE_6.value(_row(P.TABLE_6, model, 3), "tifa", "overall") == P.TABLE_1.value(
            _row(P.TABLE_1, model, None), "tifa", "overall")


def test_table1_improvement_rows_follow_from_base_and_ours():
    for model in P.LMM_MODELS:
        base, ours = _row(P.TABLE_1, model, 0), _row(P.TABLE_1, model, None)
        gain = next(r for r in P.TABLE_1.rows if r.model == model and r.kind == "improvement")
        for b, o, g in zip(base.values(), ours.values(), gain.values(), strict=True):
            # from the printed (rounded) numbers; the paper computed from unrounded ones
            assert 100 * (o - b) / b == pytest.approx(g, abs=0.06), (model, b, o, g)


def test_printed_text_is_kept():
    seed = _row(P.TABLE_6, "SEED-LLaMA", 0)
    assert seed.cells()[6] == "71.9" and seed.values()[6] == 71.9
    assert _row(P.TABLE_1, "Emu3", None).cells()[-1] == "85.11"
    assert P.TABLE_1.rows[1].values()[1] is None  # DALL-E 2 reports T2I-CompBench++ Attribute only
    assert P.tables_for("geneval") == ()


# ------------------------------------------------------------------------------------------ benchmarks.md
def test_tables_hold_our_numbers_and_labelled_paper_rows(run):
    values = synthetic_results(run)
    rep = ER.write_benchmark_report(run)
    assert rep is not None and rep.table == run.path / "report" / "benchmarks.md"
    md = rep.table.read_text()
    assert list(rep.results) == ["dpg_bench", "t2i_compbench"]

    t4_layout, t1_layout = md_tables(md, "T2I-CompBench++ (`t2i_compbench`)")
    ours = [r for r in t4_layout if r["model"] == "this run"]
    assert [r["iteration"] for r in ours] == ["0 (base)", "1", "2"]
    headers = ["Color", "Shape", "Texture", "Spatial", "3D Spatial", "Numeracy", "Non-spatial", "Complex"]
    for k, row in enumerate(ours):
        for header, cat in zip(headers, T2I_CATS, strict=True):
            assert row[header] == f"{100 * values['t2i_compbench'][k][cat]:.2f}"
        assert row["overall (ours only)"] == f"{100 * values['t2i_compbench'][k]['overall']:.2f}"
        assert (row["scorer"], row["images/prompt"], row["prompts"]) == ("`self`", "10", "2400")
        assert row["recipe"] == "deviates: scorer self instead of the benchmark's expert models"
    # the paper's rows, exactly as printed and labelled as the paper's
    papers = [r for r in t4_layout if r["model"] != "this run"]
    assert len(papers) == 8 and all("(paper, Table 4)" in r["model"] for r in papers)
    seed3 = next(r for r in papers if r["model"] == "SEED-LLaMA (paper, Table 4)" and r["iteration"] == "3")
    assert [seed3[h] for h in headers] == list(_row(P.TABLE_4, "SEED-LLaMA", 3).cells())
    assert seed3["overall (ours only)"] == "-"
    # Table 1 layout: Emu3 appears, and our Attribute is the mean of our colour, shape and texture
    assert {r["model"] for r in t1_layout} >= {"Emu3 (paper, Table 1)", "DreamLLM (paper, Table 1)"}
    emu3 = next(r for r in t1_layout if r["model"] == "Emu3 (paper, Table 1)" and r["iteration"] == "+ Ours (final)")
    assert emu3["T2I-CompBench++ Attribute"] == "59.71"
    for k, row in enumerate(r for r in t1_layout if r["model"] == "this run"):
        v = values["t2i_compbench"][k]
        assert row["T2I-CompBench++ Attribute"] == f"{100 * np.mean([v['color'], v['shape'], v['texture']]):.2f}"
        assert row["T2I-CompBench++ Non-spatial"] == f"{100 * v['non_spatial']:.2f}"

    t5_layout, _ = md_tables(md, "DPG-Bench (`dpg_bench`)")
    for k, row in enumerate(r for r in t5_layout if r["model"] == "this run"):
        for header, cat in zip(["Global", "Entity", "Attribute", "Relation", "Other", "All"],
                               (*DPG_CATS, "overall"), strict=True):
            assert row[header] == f"{100 * values['dpg_bench'][k][cat]:.2f}"
    assert sum("(paper, Table 5)" in r["model"] for r in t5_layout) == 8
    assert "SILMM (arXiv 2412.05818) Table 5" in md


def test_smoke_test_note_only_when_max_prompts_cut_the_set(run):
    synthetic_results(run)
    write_results(run, "t2i_compbench", 1, {"color": 0.5}, 0.5, max_prompts=5000)  # more than the set: whole set
    md = ER.write_benchmark_report(run).table.read_text()
    dpg = {r["iteration"]: r for r in md_tables(md, "DPG-Bench (`dpg_bench`)")[0] if r["model"] == "this run"}
    assert dpg["2"]["prompts"] == "smoke test: 7 prompts (max_prompts=7; the whole set not recorded)"
    assert dpg["0 (base)"]["prompts"] == dpg["1"]["prompts"] == "1065"
    t2i = {r["iteration"]: r for r in md_tables(md, "T2I-CompBench++ (`t2i_compbench`)")[0] if r["model"] == "this run"}
    assert t2i["1"]["prompts"] == "2400" and t2i["1"]["Shape"] == "n/a"
    assert md.count("smoke test:") == 3  # the DPG row in both layouts and the DPG evaluation list


def test_official_recipe_and_benchmark_without_paper_numbers(run):
    write_results(run, "geneval", 0, {"single_object": 0.9, "two_object": 0.4}, 0.65, official_recipe=True,
                  deviations=[], display="GenEval", tables={"per_tag_images": {"single_object": 320.0}})
    md = ER.write_benchmark_report(run).table.read_text()
    (table,) = md_tables(md, "GenEval (`geneval`)")[:1]
    assert [r["model"] for r in table] == ["this run"]
    assert table[0]["Single object"] == "90.00" and table[0]["Two object"] == "40.00"  # GenEval's own titles
    assert table[0]["overall"] == "65.00"
    assert table[0]["recipe"] == "official"
    assert "reports no numbers for this benchmark" in md
    assert "| single_object | 320 |" in md


def test_plots_have_a_panel_per_category(run):
    synthetic_results(run)
    rep = ER.write_benchmark_report(run)
    assert rep.panels["t2i_compbench"] == ["Color", "Shape", "Texture", "Spatial", "3D Spatial", "Numeracy",
                                           "Non-spatial", "Complex", "overall (ours only)"]
    assert rep.panels["dpg_bench"] == ["Global", "Entity", "Attribute", "Relation", "Other", "All"]
    for name in ("t2i_compbench", "dpg_bench"):
        assert rep.figures[name] == run.path / "report" / f"benchmark_{name}.png"
        assert_valid_png(rep.figures[name])
    assert not list((run.path / "report").glob(".*tmp*"))


def test_grid_shows_the_same_exported_images_across_iterations(run):
    synthetic_results(run)
    names = [f"samples/a red_cube_{j:06d}.png" for j in range(8)]
    write_exports(run, "t2i_compbench", range(3), names)
    (results_path(run.path, "t2i_compbench", 2).parent / "export" / "samples" / "extra_000000.png").write_bytes(
        (results_path(run.path, "t2i_compbench", 0).parent / "export" / names[0]).read_bytes())
    rep = ER.write_benchmark_report(run)
    grid = rep.grids["t2i_compbench"]
    assert grid.iterations == [0, 1, 2] and grid.common == 8  # the extra image of iteration 2 only is left out
    assert grid.paths == [names[i] for i in (0, 1, 3, 4, 6, 7)]  # six rows spread over the sorted common paths
    assert_valid_png(grid.path)
    with Image.open(grid.path) as im:
        assert im.size == (300 + 3 * (ER.GRID_CELL + 4), 18 + 6 * (ER.GRID_CELL + 4))
        # iteration 1's first image, scaled, sits in the second column of the first row
        assert im.getpixel((300 + ER.GRID_CELL + 4 + 5, 18 + 5)) == (40, 0, 100)
    assert "dpg_bench" not in rep.grids  # nothing exported
    md = rep.table.read_text()
    assert "![T2I-CompBench++ grid](grid_t2i_compbench.png)" in md and "No image grid" in md


def test_bad_results_file_is_named(run):
    path = write_results(run, "dpg_bench", 1, {"global": 0.5}, 0.5)
    data = json.loads(path.read_text())
    del data["scorer"]
    path.write_text(json.dumps(data))
    with pytest.raises(ReportError, match=re.escape(f"{path}: missing keys ['scorer']")):
        ER.write_benchmark_report(run)
    path.write_text(json.dumps({**data, "scorer": "self", "iteration": 2}))
    with pytest.raises(ReportError, match="says benchmark 'dpg_bench' iteration 2 but lies in dpg_bench/iter_01"):
        ER.write_benchmark_report(run)
    path.write_text("{")
    with pytest.raises(ReportError, match=re.escape(f"{path}: not valid JSON")):
        ER.write_benchmark_report(run)
    assert not (run.path / "report" / "benchmarks.md").exists()


def test_nan_category_and_benchmark_notes(run):
    write_results(run, "dpg_bench", 0, {"global": float("nan"), "entity": 0.25}, 0.25,
                  notes=["overall = mean of prompt scores", "dpg_bench.csv: 2 rows skipped"])
    md = ER.write_benchmark_report(run).table.read_text()
    row = next(r for r in md_tables(md, "DPG-Bench (`dpg_bench`)")[0] if r["model"] == "this run")
    assert (row["Global"], row["Entity"], row["Relation"], row["All"]) == ("n/a", "25.00", "n/a", "25.00")
    assert "- overall = mean of prompt scores\n- dpg_bench.csv: 2 rows skipped" in md


def test_run_without_eval_results_has_no_benchmarks_file(run, capsys):
    assert ER.write_benchmark_report(run) is None
    discrete_iterations(run)
    assert cli.main(["report", str(run.path)]) == 0
    report = run.path / "report"
    assert (report / "training.md").is_file() and not (report / "benchmarks.md").exists()
    index = (report / "index.md").read_text()
    assert "- [training](training.md)" in index and "- benchmarks: not written" in index
    assert "index:" in capsys.readouterr().out


def test_cli_writes_benchmarks_and_index(run, capsys):
    discrete_iterations(run)
    synthetic_results(run)
    assert cli.main(["report", str(run.path)]) == 0
    out = capsys.readouterr().out
    assert f"benchmarks:      {run.path / 'report' / 'benchmarks.md'} (dpg_bench, t2i_compbench)" in out
    index = (run.path / "report" / "index.md").read_text()
    assert "- [training](training.md)" in index and "- [benchmarks](benchmarks.md)" in index
    assert (run.path / "report" / "training.md").is_file()


def test_cli_benchmarks_without_training_metrics(run, capsys):
    """Only the base model evaluated: no training metrics yet is a note, not a failure."""
    write_results(run, "dpg_bench", 0, {"global": 0.5}, 0.5)
    assert cli.main(["report", str(run.path)]) == 0
    assert "note: " in capsys.readouterr().out
    assert (run.path / "report" / "benchmarks.md").is_file()
    assert "no training metrics" in (run.path / "report" / "index.md").read_text()


def test_cli_bad_results_exits_1_but_writes_training(run, capsys):
    discrete_iterations(run)
    path = write_results(run, "dpg_bench", 0, {"global": 0.5}, 0.5)
    path.write_text("[]")
    assert cli.main(["report", str(run.path)]) == 1
    assert f"{path}: missing keys" in capsys.readouterr().err
    assert (run.path / "report" / "training.md").is_file()


# ------------------------------------------------------------------------------------------ self-feedback
SCORES = {  # iteration -> shard -> (prompt ids, scores) ; 2 prompts per shard, 3 samples per prompt
    1: [([0, 0, 0, 1, 1, 1], [0.5, -0.25, 0.0, 1.0, 1.0, 0.75]), ([2, 2, 2, 3, 3, 3], [0.0, 0.0, 0.0, -1.0, 0.5, 0.25])],
    2: [([0, 0, 0, 1, 1, 1], [0.75, 0.5, 0.25, 1.0, 0.5, 1.0])],  # one of two shards finished
}
PAIRS = {1: ([0.5, 1.0, 0.0, 0.5], [-0.25, 0.75, 0.0, -1.0])}  # chosen, rejected


def write_feedback_shards(run: RunDir) -> None:
    for k, shards in SCORES.items():
        for i, (ids, scores) in enumerate(shards):
            n = len(ids)
            write_shard(run.shard_path(k, "scores", i), ShardMeta("scores", k, i, 2, run.config_hash),
                        {"prompt_id": np.array(ids), "sample_index": np.tile(np.arange(3, dtype=np.int32), n // 3),
                         "score": np.array(scores, np.float32), "question_count": np.ones(n, np.int32),
                         "p_yes": np.full(n, 0.5, np.float32), "p_no": np.full(n, 0.5, np.float32)})
    for k, (chosen, rejected) in PAIRS.items():
        n = len(chosen)
        write_shard(run.pairs_path(k), ShardMeta("pairs", k, 0, 1, run.config_hash),
                    {"prompt_id": np.arange(n), "text": ["p"] * n, "category": ["color"] * n,
                     "chosen_index": np.zeros(n, np.int32), "rejected_index": np.ones(n, np.int32),
                     "chosen_score": np.array(chosen, np.float32), "rejected_score": np.array(rejected, np.float32)})


def feedback_rows(md: str, first_header: str) -> dict[str, dict[str, str]]:
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        rows[cells["iteration"]] = cells
    return rows


def test_score_distribution_and_gap_tables_by_hand(run):
    write_feedback_shards(run)
    rep = ER.write_feedback_report(run)
    assert rep.table == run.path / "report" / "self_feedback.md"
    md = rep.table.read_text()
    table = feedback_rows(md, "iteration | shards")
    # iteration 1, by hand: 12 scores summing to 2.75; sorted ... 0.0, 0.25 ... -> median 0.125
    # prompt spreads: 0.75, 0.25, 0.0, 1.5 -> mean 0.625; population std of the 12 scores
    s1 = [0.5, -0.25, 0.0, 1.0, 1.0, 0.75, 0.0, 0.0, 0.0, -1.0, 0.5, 0.25]
    var = sum((x - 2.75 / 12) ** 2 for x in s1) / 12
    assert table["1"] == {"iteration": "1", "shards": "2 of 2", "samples": "12", "prompts": "4",
                          "mean": f"{2.75 / 12:.4f}", "std": f"{var ** 0.5:.4f}", "min": "-1.0000",
                          "median": "0.1250", "max": "1.0000", "spread": "0.6250"}
    # iteration 2: one shard of two; spreads 0.5 and 0.5
    assert table["2"]["shards"] == "1 of 2" and table["2"]["mean"] == f"{4.0 / 6:.4f}"
    assert table["2"]["median"] == "0.6250" and table["2"]["spread"] == "0.5000"
    assert "3" not in table
    # pairs of iteration 1: gaps 0.75, 0.25, 0.0, 1.5
    gaps = feedback_rows(md, "iteration | pairs")
    assert gaps["1"] == {"iteration": "1", "pairs": "4", "chosen mean": "0.5000", "rejected mean": "-0.1250",
                         "gap mean": "0.6250", "gap median": "0.5000", "gap min": "0.0000", "ties": "0.2500"}
    assert rep.panels == ["self-score per sample", "chosen - rejected score gap"]
    assert_valid_png(rep.figure)


def test_no_feedback_before_any_scores(run):
    assert ER.write_feedback_report(run) is None
    assert not (run.path / "report").exists()


def test_cli_links_self_feedback(run, capsys):
    discrete_iterations(run)
    write_feedback_shards(run)
    assert cli.main(["report", str(run.path)]) == 0
    assert "self-feedback:" in capsys.readouterr().out
    index = (run.path / "report" / "index.md").read_text()
    assert "- [self-feedback](self_feedback.md)" in index


def test_values_of_a_substitute_judge_are_marked(run):
    per = {c: 0.5 for c in T2I_CATS}
    write_results(run, "t2i_compbench", 0, per, 0.5, scorer="expert", deviating_categories=["spatial", "numeracy"])
    md = ER.write_benchmark_report(run).table.read_text()
    t4_layout, t1_layout = md_tables(md, "T2I-CompBench++ (`t2i_compbench`)")
    ours = next(r for r in t4_layout if r["model"] == "this run")
    assert ours["Spatial"] == "50.00 †" and ours["Numeracy"] == "50.00 †" and ours["Color"] == "50.00"
    assert ours["overall (ours only)"] == "50.00 †"
    mine = next(r for r in t1_layout if r["model"] == "this run")
    assert mine["T2I-CompBench++ Layout"].endswith("†") and not mine["T2I-CompBench++ Attribute"].endswith("†")
    assert "† judged by a substitute" in md
