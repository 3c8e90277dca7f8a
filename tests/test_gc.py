"""`silmm gc` and store.gc_after_iteration (silmm/gc.py): exactly what no later stage reads is removed.

One finished tiny Janus iteration is made once by the debug driver; each test collects a copy of it, with
leftovers planted where interrupted writers and moved-aside outputs leave them, beside others that must
stay (a live lease, an unfinished iteration).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
from dataclasses import asdict
from pathlib import Path

import pytest

from silmm import config as C
from silmm import gc as G
from silmm import lease as L
from silmm.cli import main
from silmm.driver import Driver, run_driver
from silmm.inspection import REMOVED_BY_GC, verify_run
from silmm.rundir import RunDir
from silmm.status import describe_status
from silmm.tasks import model_problem
from tests.helpers import tiny_run


@pytest.fixture(scope="module")
def finished(tiny_checkpoints, tmp_path_factory) -> RunDir:
    """Iteration 1 of a tiny Janus run, finished by the driver (marked done, model exported, checkpoint kept)."""
    run = tiny_run(tmp_path_factory.mktemp("gc"), tiny_checkpoints("janus"), "janus", "executor.kind=debug")
    run_driver(run)
    assert (run.train_dir(1) / "checkpoints" / "latest").is_file() and verify_run(run) == []
    return run


def copy_run(run: RunDir, dest: Path) -> RunDir:
    shutil.copytree(run.path, dest)
    return RunDir.open(dest)


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` -> sha256 of its bytes ("dir" for a folder)."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*")}


def du(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write(path: Path, data: bytes = b"leftover") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def lease_of(output: Path, alive: bool) -> Path:
    """A lease held by this (live) process, or by a process that is gone (same pid, another start time)."""
    holder = L.Holder.me("test") if alive else L.Holder(socket.gethostname(), os.getpid(), "0", "", "", "dead", "x")
    return write(L.lease_path(output), json.dumps(asdict(holder)).encode())


def plant(run: RunDir) -> tuple[set[Path], set[Path]]:
    """Leftovers in the finished run: (those gc must list, those it must never list)."""
    it1, it2 = run.iter_dir(1), run.iter_dir(2)
    listed = {
        write(it1 / "scores" / "shard_00001.h5.bad-20260101T000000Z"),  # bad: moved aside
        write(it2 / "prompts" / "shard_00000.h5.bad-20260101T000000Z"),  # bad, even in an unfinished iteration
        run.train_dir(1) / "checkpoints",  # checkpoints of a finished model
        run.shard_path(1, "samples", 0), run.shard_path(1, "samples", 1),  # samples of a finished iteration
        # progress: beside complete, verified outputs whose writers are gone
        write(it1 / "questions" / "shard_00000.h5.progress" / "part_00000.h5").parent,
        write(it1 / "prompts" / ".shard_00001.h5.tmp-4242"),
        lease_of(run.pairs_path(1), alive=False),
        lease_of(run.model_dir(1), alive=False),
    }
    # a moved-aside part inside a listed progress folder goes with the folder
    write(it1 / "questions" / "shard_00000.h5.progress" / "part_00001.h5.bad-20260101T000000Z")
    never = {
        lease_of(run.shard_path(1, "scores", 0), alive=True),  # a live writer: its output's files stay too
        write(it1 / "scores" / "shard_00000.h5.progress" / "part_00000.h5").parent,
        write(it1 / "scores" / ".shard_00000.h5.tmp-99"),
        # no single output owns it, so the whole iteration does, and a live writer is in it
        write(it1 / ".vocabulary.json.tmp-77"),
        # iteration 2, unfinished: no model yet
        write(it2 / "samples" / "shard_00000.h5", run.shard_path(1, "samples", 0).read_bytes()),
        write(it2 / "samples" / "shard_00001.h5.progress" / "part_00000.h5").parent,
        write(it2 / "samples" / ".shard_00001.h5.tmp-9"),
        write(run.train_dir(2) / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt").parent.parent,
        lease_of(run.shard_path(2, "prompts", 1), alive=False),  # a dead writer's lease of an unfinished shard
        write(it2 / ".vocabulary.json.tmp-5"),
    }
    return listed, never


def test_dry_run_lists_exactly_what_goes_with_sizes_and_changes_nothing(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    listed, never = plant(run)
    plan = G.plan(run)
    assert {r.path for r in plan.removals} == listed
    assert all(r.bytes == du(r.path) for r in plan.removals)
    assert {r.category for r in plan.removals if r.path == run.train_dir(1) / "checkpoints"} == {"checkpoints"}
    assert {r.path for r in plan.removals if r.category == "samples"} == {run.shard_path(1, "samples", i)
                                                                          for i in (0, 1)}

    before = tree(run.path)
    assert main(["gc", str(run.path)]) == 0
    assert tree(run.path) == before  # a dry run writes nothing, not even gc.json
    out = capsys.readouterr().out
    for path in listed:
        assert str(path.relative_to(run.path)) in out
    for path in never:
        assert str(path.relative_to(run.path)) not in out
    assert f"total: {len(listed)} path(s)" in out and f"({sum(du(p) for p in listed)} bytes)" in out
    assert "iter_02 samples: kept" in out and "iter_02 checkpoints: kept" in out

    only = G.plan(run, G.select("samples,bad", "bad"))  # --only samples,bad --keep bad
    assert {r.path for r in only.removals} == {run.shard_path(1, "samples", i) for i in (0, 1)}

    state = run.state()
    state["done"] = {}  # model exported, iteration not marked done: a driver re-runs its stages, samples included
    run.write_state(state)
    assert [r.path for r in G.plan(run, ["samples", "checkpoints"]).removals] == [run.train_dir(1) / "checkpoints"]


def test_yes_removes_exactly_the_listed_paths_and_records_them(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    listed, _ = plant(run)
    before = tree(run.path)
    sizes = {str(p.relative_to(run.path)): du(p) for p in listed}
    assert main(["gc", str(run.path), "--yes"]) == 0
    gone = {k for k in before if any(k == r or k.startswith(r + "/") for r in sizes)}
    after = tree(run.path)
    assert after.pop("iter_01/gc.json") and after.pop("iter_02/gc.json")  # the record, where things went
    assert after == {k: v for k, v in before.items() if k not in gone}
    records = {k: json.loads((run.iter_dir(k) / "gc.json").read_text())["collections"] for k in (1, 2)}
    removed = {item["path"]: item["bytes"] for k in (1, 2) for c in records[k] for item in c["removed"]}
    assert removed == sizes
    assert records[1][0]["bytes"] == sum(v for k, v in sizes.items() if k.startswith("iter_01/"))
    assert G.plan(run).removals == []  # nothing left to collect: a second run removes nothing


def test_collected_run_verifies_and_a_restarted_driver_submits_nothing(finished, tmp_path, monkeypatch, capsys):
    run = copy_run(finished, tmp_path / "run")
    vocabulary_tmp = write(run.iter_dir(1) / ".vocabulary.json.tmp-77")  # finished iteration, no live writer
    assert main(["gc", str(run.path), "--yes"]) == 0
    samples = [run.shard_path(1, "samples", i) for i in (0, 1)]
    assert not any(p.exists() for p in samples) and not (run.train_dir(1) / "checkpoints").exists()
    assert not vocabulary_tmp.exists()
    notes = verify_run(run)
    assert [p for p, _ in notes] == samples and all(n.startswith(REMOVED_BY_GC) for _, n in notes)
    capsys.readouterr()
    assert main(["verify", str(run.path)]) == 0
    assert f"{samples[0]}: {REMOVED_BY_GC} at " in capsys.readouterr().out
    status = describe_status(run)
    assert "samples   done 0/2  running 0  failed 0  missing 0  removed by gc 2" in status

    before = tree(run.path)

    def refuse(*_args, **_kwargs):
        raise AssertionError("a task was submitted on a collected, finished run")

    monkeypatch.setattr(Driver, "_submit", refuse)
    run_driver(run)
    after = tree(run.path)
    assert after.pop("state.json") and before.pop("state.json")  # the driver stamps the iteration done again
    assert after == before and set(run.state()["done"]) == {"iter_01"}  # jobs.json, shards, model: untouched


def test_a_running_driver_allows_only_the_safe_categories(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    progress = write(run.iter_dir(1) / "questions" / "shard_00000.h5.progress" / "part_00000.h5").parent
    lock = write(run.path / "driver.lock", json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                       "since": "now"}).encode())
    before = tree(run.path)
    assert main(["gc", str(run.path), "--yes"]) == 1
    assert "add --keep progress" in capsys.readouterr().err and tree(run.path) == before
    assert main(["gc", str(run.path), "--yes", "--keep", "progress"]) == 0
    assert progress.is_dir() and lock.is_file() and not run.shard_path(1, "samples", 0).exists()
    assert main(["gc", str(run.path), "--only", "samples,everything"]) == 2  # an unknown category: usage error


def test_gc_after_iteration_frees_iteration_1_and_iteration_2_trains(finished, tmp_path, caplog):
    run = copy_run(finished, tmp_path / "run")
    new = C.load(run.path / "config.yaml", [f"run.root={tmp_path}", "run.name=run", "run.iterations=2",
                                            "store.gc_after_iteration=[checkpoints,samples]"], frozen=True)
    run._accept(new)  # mutable keys: the same run, extended
    with caplog.at_level(logging.INFO, logger="silmm.gc"):
        run_driver(run)
    for k in (1, 2):
        assert model_problem(run.model_dir(k)) is None
        assert not (run.train_dir(k) / "checkpoints").exists() and not list(run.stage_dir(k, "samples").iterdir())
        assert (run.train_dir(k) / "metrics.jsonl").is_file() and run.pairs_path(k).is_file()
    assert "iter 2: gc (store.gc_after_iteration: checkpoints, samples) removed 3 path(s)" in caplog.text
    notes = verify_run(run)
    assert len(notes) == 4 and all(n.startswith(REMOVED_BY_GC) for _, n in notes)
