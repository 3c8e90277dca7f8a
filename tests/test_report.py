"""`silmm report` (training part): figure, table, skipped iterations, corrupt lines, CLI exit codes.

The run directories are real RunDirs from a tiny config; metrics.jsonl files are written by hand, as
jobs/train.py would, so no model is built or trained here.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from PIL import Image

from silmm import cli
from silmm import report as R
from silmm.rundir import RunDir
from tests.helpers import tiny_run

DISCRETE_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected", "logps/chosen_drift", "logps/rejected_drift", "kl/reference",
                 "entropy/image_tokens", "lr", "grad_norm", "pairs_per_second")
CONTINUOUS_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                   "distance/policy_chosen", "distance/ref_chosen", "distance/policy_rejected",
                   "distance/ref_rejected", "distance/policy_ref", "distance/chosen_rejected", "lr", "grad_norm",
                   "pairs_per_second")
EVAL_KEYS = ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins")
DISCRETE_PANELS = ["loss", "reward accuracy", "reward margin", "KL to reference", "entropy", "log-prob drift",
                   "learning rate"]


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    # The report reads no weights: build_tiny_if_missing lets the config name a checkpoint that is never built.
    return tiny_run(tmp_path / "runs", tmp_path / "never_built", "janus", "run.iterations=3",
                    "model.build_tiny_if_missing=true")


def make_rows(seed: int, steps: list[int], keys: tuple[str, ...], eval_steps: set[int]) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for step in steps:
        row: dict = {"step": step, **{k: rng.uniform(-3, 3) for k in keys}}
        if step in eval_steps:
            row |= {k: rng.uniform(0, 1) for k in EVAL_KEYS}
        rows.append(row)
    return rows


def write_metrics(run: RunDir, iteration: int, rows: list[dict]) -> Path:
    path = run.train_dir(iteration) / "metrics.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def discrete_iterations(run: RunDir) -> dict[int, list[dict]]:
    """Two iterations; iteration 1's last line lacks kl/reference and its last eval is not on its last line."""
    it1 = make_rows(1, [10, 20, 30, 40, 50], DISCRETE_KEYS, eval_steps={20, 40})
    del it1[-1]["kl/reference"]
    it2 = make_rows(2, [10, 20, 30], DISCRETE_KEYS, eval_steps={30})
    for k, rows in ((1, it1), (2, it2)):
        write_metrics(run, k, rows)
    return {1: it1, 2: it2}


def parse_table(md: str) -> dict[int, dict[str, str]]:
    """training.md's table as {iteration: {column: cell}}."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| iteration |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    out = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        out[int(cells["iteration"])] = cells
    return out


def expected_last(rows: list[dict], key: str) -> float:
    return [r[key] for r in rows if key in r][-1]


def assert_valid_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 0 and im.height > 0


# ------------------------------------------------------------------------------------------ tests
def test_discrete_table_holds_the_last_values(run):
    its = discrete_iterations(run)
    rep = R.write_training_report(run)
    assert rep.table == run.path / "report" / "training.md"
    table = parse_table(rep.table.read_text())
    assert sorted(table) == [1, 2]
    main = ("loss", "rewards/accuracies", "rewards/margins", "kl/reference", "entropy/image_tokens",
            "logps/chosen_drift", "logps/rejected_drift", "lr")
    for k, rows in its.items():
        cells = table[k]
        assert int(cells["steps"]) == rows[-1]["step"]
        for key in main:
            assert float(cells[key]) == pytest.approx(expected_last(rows, key), rel=1e-5), (k, key)
        last_eval = [r for r in rows if "eval/loss" in r][-1]
        assert int(cells["eval step"]) == last_eval["step"]
        assert float(cells["eval/loss"]) == pytest.approx(last_eval["eval/loss"], rel=1e-5)
        assert float(cells["eval/rewards/accuracies"]) == pytest.approx(last_eval["eval/rewards/accuracies"],
                                                                        rel=1e-5)
        assert not any(c.startswith("distance/") for c in cells)  # the other family's columns stay out
    # iteration 1's kl/reference is the one of step 40, not absent: its last line lacked the key
    assert float(table[1]["kl/reference"]) == pytest.approx(its[1][-2]["kl/reference"], rel=1e-5)
    assert int(table[1]["eval step"]) == 40
    md = rep.table.read_text()
    assert str(rep.figure) in md and "![training metrics](training.png)" in md


def test_discrete_figure_panels(run):
    discrete_iterations(run)
    rep = R.write_training_report(run)
    assert rep.figure == run.path / "report" / "training.png"
    assert rep.panels == DISCRETE_PANELS
    assert_valid_png(rep.figure)
    assert not list(rep.figure.parent.glob(".*tmp*"))  # the atomic writes left no temporary file


def test_plot_training_returns_panel_titles(tmp_path):
    its = {1: make_rows(1, [10, 20], DISCRETE_KEYS, eval_steps={20})}
    out = tmp_path / "fig.png"
    assert R.plot_training(its, out) == DISCRETE_PANELS
    assert_valid_png(out)


def test_continuous_run_panels_and_no_heldout(run):
    for k in (1, 2):
        write_metrics(run, k, make_rows(k, [5, 10], CONTINUOUS_KEYS, eval_steps=set()))
    rep = R.write_training_report(run)
    assert rep.panels == ["loss", "reward accuracy", "reward margin", "kernel distances", "learning rate"]
    assert_valid_png(rep.figure)
    md = rep.table.read_text()
    table = parse_table(md)
    assert "eval/loss" not in table[1] and "kl/reference" not in table[1]
    for key in ("distance/policy_ref", "distance/chosen_rejected"):  # how far H went, against the pairs' spread
        assert float(table[2][key]) == pytest.approx(expected_last(make_rows(2, [5, 10], CONTINUOUS_KEYS, set()), key),
                                                     rel=1e-5)
    assert "No held-out metrics" in md


def test_older_run_with_only_basic_keys(run):
    write_metrics(run, 1, [{"step": 1, "loss": 0.7, "lr": 1e-5}, {"step": 2, "loss": 0.6, "lr": 2e-5}])
    rep = R.write_training_report(run)
    assert rep.panels == ["loss", "learning rate"]
    table = parse_table(rep.table.read_text())
    assert table[1]["loss"] == "0.6" and table[1]["lr"] == "2e-05" and table[1]["steps"] == "2"


def test_missing_and_empty_iterations_are_reported(run):
    discrete_iterations(run)  # iterations 1 and 2; run.iterations=3 so 3 is missing
    empty = run.train_dir(4) / "metrics.jsonl"  # an iteration beyond the config, started but nothing logged
    empty.parent.mkdir(parents=True)
    empty.write_text("")
    rep = R.write_training_report(run)
    assert rep.skipped == {3: "missing", 4: "empty"}
    md = rep.table.read_text()
    assert "- iteration 3: `iter_03/train/metrics.jsonl` missing" in md
    assert "- iteration 4: `iter_04/train/metrics.jsonl` empty" in md
    assert sorted(parse_table(md)) == [1, 2]


def test_corrupt_line_names_file_and_line(run):
    discrete_iterations(run)
    path = run.train_dir(2) / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:25]  # a truncated second line
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(R.ReportError, match=re.escape(f"{path}:2: not valid JSON")):
        R.write_training_report(run)


def test_line_without_step_is_an_error(run):
    path = write_metrics(run, 1, [{"step": 1, "loss": 0.5}, {"loss": 0.4}])
    with pytest.raises(R.ReportError, match=re.escape(f"{path}:2: ") + ".*'step'"):
        R.write_training_report(run)


def test_no_metrics_at_all(run):
    with pytest.raises(R.NoMetricsError, match="no training metrics"):
        R.write_training_report(run)
    assert not (run.path / "report" / "training.md").exists()


def test_cli_report_writes_and_prints_paths(run, capsys):
    discrete_iterations(run)
    assert cli.main(["report", str(run.path)]) == 0
    out = capsys.readouterr().out
    assert str(run.path / "report" / "training.png") in out
    assert str(run.path / "report" / "training.md") in out
    assert "iteration 3: no metrics (missing)" in out


def test_cli_report_without_metrics_exits_1(run, capsys):
    assert cli.main(["report", str(run.path)]) == 1
    assert "no training metrics" in capsys.readouterr().err


def test_cli_report_corrupt_line_exits_1(run, capsys):
    path = write_metrics(run, 1, [{"step": 1, "loss": 0.5}])
    path.write_text(path.read_text() + "{not json\n")
    assert cli.main(["report", str(run.path)]) == 1
    assert f"{path}:2" in capsys.readouterr().err


def test_cli_report_missing_directory_exits_2(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "no_such_run")]) == 2
    assert "not a run directory" in capsys.readouterr().err
