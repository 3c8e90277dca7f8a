"""Integrity end to end: damaged shards of every kind are refused, named, moved aside and regenerated.

The corruption matrix runs every kind of damage on every shard kind (prompts, questions, samples, scores,
pairs) against `silmm verify` and the stage that consumes the shard; the driver's regeneration runs once
per shard kind (a model is loaded for it) and must give the same pairs as before the damage.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from silmm import store as S
from silmm.driver import Driver
from silmm.fsutil import file_manifest
from silmm.inspection import verify_run
from silmm.rundir import RunDir
from silmm.tasks import StageTask, settle
from tests.helpers import tiny_run
from tests.test_store import content

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("prompts", "questions", "samples", "scores", "pairs")
# a numeric dataset of each kind whose stored bytes a flip reaches (samples and pairs: gzip'ed chunks)
DATA_COLUMN = {"prompts": "prompt_id", "questions": "question_count", "samples": "tokens", "scores": "p_yes",
               "pairs": "chosen_tokens"}
REQUIRED_COLUMN = {"prompts": "text", "questions": "question", "samples": "seed", "scores": "score",
                   "pairs": "rejected_index"}


@pytest.fixture(scope="module")
def pristine(tiny_checkpoints, tmp_path_factory):
    """A tiny Janus run through pair selection (2 shards per stage), made by the debug driver."""
    run = tiny_run(tmp_path_factory.mktemp("integrity"), tiny_checkpoints("janus"), "janus", "executor.kind=debug")
    driver = Driver(run)
    for stage in KINDS:
        driver.run_stage(1, stage)
    assert verify_run(run) == []
    return run, content(run.pairs_path(1))


def copy_run(run: RunDir, dest: Path) -> RunDir:
    shutil.copytree(run.path, dest)
    return RunDir.open(dest)


def target(run: RunDir, kind: str) -> Path:
    return run.pairs_path(1) if kind == "pairs" else run.shard_path(1, kind, 0)


# ---------------------------------------------------------------------------------------- damage
def truncate(run: RunDir, path: Path, kind: str) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])


def flip_data(run: RunDir, path: Path, kind: str) -> None:
    """One byte of a dataset's stored data (inside a compressed chunk for tokens)."""
    with h5py.File(path, "r") as f:
        d = f[DATA_COLUMN[kind]]
        if d.chunks:
            info = d.id.get_chunk_info(0)
            offset, size = info.byte_offset, info.size
            if d.compression is None:  # the first chunk may hold fewer rows than it has room for
                size = min(size, d.dtype.itemsize * int(np.prod(d.shape[1:])) * min(d.shape[0], d.chunks[0]))
        else:
            offset, size = d.id.get_offset(), d.id.get_storage_size()
    raw = bytearray(path.read_bytes())
    raw[offset + size // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def edit_value(run: RunDir, path: Path, kind: str) -> None:
    """A value changed in place through HDF5 (the damage that used to change the pairs silently)."""
    name = {"scores": "score", "pairs": "chosen_score"}.get(kind, DATA_COLUMN[kind])
    with h5py.File(path, "r+") as f:
        f[name][0] = f[name][0] + 1


def flip_attribute(run: RunDir, path: Path, kind: str) -> None:
    """One character of an attribute's stored bytes (the write time: still a valid string)."""
    with h5py.File(path, "r") as f:
        created = f.attrs["created"].encode()
    raw = bytes(path.read_bytes())
    assert raw.count(created) == 1
    at = raw.index(created) + len(created) - 2  # a digit of the seconds
    path.write_bytes(raw[:at] + bytes([raw[at] ^ 0x01]) + raw[at + 1:])


def remove_dataset(run: RunDir, path: Path, kind: str) -> None:
    with h5py.File(path, "r+") as f:
        del f[REQUIRED_COLUMN[kind]]


def copy_over(run: RunDir, path: Path, kind: str) -> None:
    """Another shard of the same stage copied over this one (pairs: a scores shard, another stage)."""
    other = run.shard_path(1, "scores", 1) if kind == "pairs" else run.shard_path(1, kind, 1)
    shutil.copyfile(other, path)


def _rewrite_attrs(path: Path, **values) -> None:
    """Attributes of another iteration or run, written consistently (the attribute checksum matches them)."""
    with h5py.File(path, "r+") as f:
        for k, v in values.items():
            f.attrs[k] = v
        f.attrs["attrs_checksum"] = S._attrs_crc(dict(f.attrs))


def other_iteration(run: RunDir, path: Path, kind: str) -> None:
    _rewrite_attrs(path, iteration=2)


def other_run(run: RunDir, path: Path, kind: str) -> None:
    _rewrite_attrs(path, config_hash="0123456789abcdef")


DAMAGE = {f.__name__: f for f in (truncate, flip_data, edit_value, flip_attribute, remove_dataset, copy_over,
                                  other_iteration, other_run)}


def consume(run: RunDir, kind: str) -> None:
    """What the next stage does first with the shard: read it (training opens pairs.h5)."""
    import importlib

    if kind == "pairs":
        from silmm.trainer import PairsFile

        PairsFile(run.pairs_path(1), run.config_hash, 1, S.StoreOptions()).close()
        return
    consumer = {"prompts": "questions", "questions": "scores", "samples": "scores", "scores": "pairs"}[kind]
    importlib.import_module(f"jobs.{consumer}").run(run, 1, 0)


# ------------------------------------------------------------------------------------------ matrix
@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("kind", KINDS)
def test_damage_is_refused_by_verify_and_by_the_consuming_stage(pristine, tmp_path, kind, damage):
    from silmm.trainer import TrainingError

    run = copy_run(pristine[0], tmp_path / "run")
    path = target(run, kind)
    DAMAGE[damage](run, path, kind)
    problems = dict(verify_run(run))
    assert list(problems) == [path], problems
    assert problems[path].startswith(f"bad: {path}")
    before = {p: p.stat().st_mtime_ns for p in run.path.rglob("*") if p.is_file()}
    with pytest.raises((S.ShardError, TrainingError)) as err:
        consume(run, kind)
    assert str(path) in str(err.value)
    after = {p: p.stat().st_mtime_ns for p in run.path.rglob("*") if p.is_file()}
    assert after == before  # the refusal wrote nothing


# a different damage for each kind: the driver regenerates, and the pairs come out as before
REGENERATE = {"prompts": "truncate", "questions": "flip_attribute", "samples": "flip_data", "scores": "edit_value",
              "pairs": "other_run"}


@pytest.mark.parametrize("kind", KINDS)
def test_driver_moves_a_bad_shard_aside_and_regenerates_it(pristine, tmp_path, kind, caplog):
    run = copy_run(pristine[0], tmp_path / "run")
    path = target(run, kind)
    DAMAGE[REGENERATE[kind]](run, path, kind)
    damaged = path.read_bytes()
    (run.path / "jobs.json").unlink()  # what the pristine run's driver submitted
    with caplog.at_level(logging.WARNING):
        driver = Driver(run)
        for stage in KINDS:
            driver.run_stage(1, stage)
    moved = list(path.parent.glob(f"{path.name}.bad-*"))
    assert len(moved) == 1 and moved[0].read_bytes() == damaged  # kept for inspection, as it was
    assert any(str(path) in r.getMessage() and "moved aside" in r.getMessage() for r in caplog.records)
    assert [problem for _, problem in verify_run(run)] == ["moved aside: found bad and replaced; inspect it, "
                                                           "then delete it"]
    assert content(run.pairs_path(1)) == pristine[1]  # regenerated to what it was: nothing downstream changed
    submitted = json.loads((run.path / "jobs.json").read_text())
    assert list(submitted) == [f"iter_01/{kind}/00000"]  # that shard only was redone


def test_a_stage_run_by_hand_names_the_bad_file_without_a_traceback(pristine, tmp_path):
    run = copy_run(pristine[0], tmp_path / "run")
    path = run.shard_path(1, "samples", 0)
    flip_data(run, path, "samples")
    run.shard_path(1, "scores", 0).unlink()  # so the scores task has work to do
    proc = subprocess.run([sys.executable, "-m", "jobs.scores", "--run", str(run.path), "--iteration", "1",
                           "--shard", "0"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and str(path) in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_damaged_model_is_moved_aside_and_retrained(pristine, tmp_path):
    run = copy_run(pristine[0], tmp_path / "run")
    model = run.model_dir(1)
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights" * 100)
    (model / "config.json").write_text("{}")
    (model / "DONE").write_text(json.dumps({"files": file_manifest(model)}))
    task = StageTask(str(run.path), 1, "train")
    assert settle(run, task)
    (model / "model.safetensors").write_bytes(b"weighs" + b"weights" * 99 + b"!")  # same size, other content
    assert "sha256 mismatch" in dict(verify_run(run))[model]
    assert not settle(run, task) and not model.exists()
    assert len(list(model.parent.glob("model.bad-*"))) == 1


def test_verify_lists_every_problem_in_one_pass(pristine, tmp_path):
    run = copy_run(pristine[0], tmp_path / "run")
    flip_data(run, run.shard_path(1, "scores", 1), "scores")
    run.shard_path(1, "questions", 1).unlink()
    leftover = run.shard_path(1, "samples", 7)
    shutil.copyfile(run.shard_path(1, "samples", 1), leftover)
    progress = run.stage_dir(1, "samples") / "shard_00001.h5.progress"
    progress.mkdir()
    tmp = run.stage_dir(1, "prompts") / ".shard_00000.h5.tmp-123"
    tmp.write_bytes(b"half")
    state = run.state()
    state["done"] = {"iter_01": "2026-01-01T00:00:00Z"}  # a finished iteration must have its model
    run.write_state(state)
    problems = dict(verify_run(run))
    assert problems.pop(run.shard_path(1, "scores", 1)).startswith("bad: ")
    assert problems.pop(run.shard_path(1, "questions", 1)) == "missing"
    assert problems.pop(leftover).startswith("leftover: not one of the run's 2 samples shards")
    assert problems.pop(progress) == "progress: left beside a finished shard"
    assert problems.pop(tmp) == "temporary: left by an interrupted write"
    assert problems.pop(run.model_dir(1)).startswith("model: ")
    assert problems == {}
    from silmm.cli import main

    assert main(["verify", str(run.path)]) == 1
