"""The toy benchmark's paired view (bench/toy_seeds.py): held-out prompts gained and lost, with a sign test."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("toy_seeds", ROOT / "bench" / "toy_seeds.py")
toy_seeds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy_seeds)


def _write_eval(run: Path, iteration: int, per_prompt: list[list[float]]) -> None:
    (run / "eval").mkdir(parents=True, exist_ok=True)
    results = [{"prompt": f"p{i}", "oracle": scores} for i, scores in enumerate(per_prompt)]
    (run / "eval" / f"iter_{iteration:02d}.json").write_text(json.dumps({"iteration": iteration, "results": results}))


def test_flips_pool_prompts_gained_and_lost_between_iteration_0_and_each_runs_last(tmp_path):
    # seed 0: prompt 0 gains (mean 0 -> 0.5), prompt 1 loses, prompt 2 stays; iteration 1 is not the last
    s0 = tmp_path / toy_seeds.run_name("oracle", 0, None)
    _write_eval(s0, 0, [[0, 0], [1, 1], [1, 0]])
    _write_eval(s0, 1, [[0, 0], [0, 0], [0, 0]])
    _write_eval(s0, 2, [[1, 0], [1, 0], [0, 1]])
    # seed 1: two gains; seed 2 has iteration 0 only and counts for nothing
    s1 = tmp_path / toy_seeds.run_name("oracle", 1, None)
    _write_eval(s1, 0, [[0], [0], [1]])
    _write_eval(s1, 1, [[1], [1], [1]])
    _write_eval(tmp_path / toy_seeds.run_name("oracle", 2, None), 0, [[0], [0], [0]])
    table = toy_seeds.flips_table(str(tmp_path), ["oracle", "random"], [0, 1, 2])
    rows = [line for line in table.splitlines() if line.startswith("| oracle")]
    # 3 gained, 1 lost: P(a split of 4 at least as uneven) = 2 x (C(4,0) + C(4,1)) / 2^4 = 0.625
    assert rows == ["| oracle | 2 | 1/2 | 3 | 1 | +2 | 0.62 |"]
    assert "| random" not in table  # no runs: no row
