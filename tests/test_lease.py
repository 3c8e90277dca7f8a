"""Per-output leases (silmm/lease.py) without Slurm: one writer per shard, takeover of provably gone holders."""

import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from silmm import lease as L
from silmm import store as S
from silmm.tasks import StageTask, run_task
from tests.helpers import tiny_run
from tests.test_store import content as shard_content

HOLD = """
import sys, time
from silmm import lease
with lease.lease(sys.argv[1], "test holder"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder_process(output: Path, seconds: float) -> subprocess.Popen:
    """Another process that takes `output`'s lease and keeps it for `seconds`."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(output), str(seconds)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.stdout.readline().strip() == "held"
    return proc


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lease(output: Path, **fields) -> None:
    me = L.Holder.me("someone else")
    L.lease_path(output).write_text(json.dumps({**asdict(me), **fields}))


def test_lease_is_exclusive_names_its_holder_and_is_released_on_exceptions(tmp_path):
    out = tmp_path / "shard_00000.h5"
    with L.lease(out, "t") as path:
        assert path == tmp_path / "shard_00000.h5.lease"
        held = json.loads(path.read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["task"] == "t"
        assert L.holds(out) and L.foreign_holder(out) is None
    assert not path.exists() and not L.holds(out)
    with pytest.raises(RuntimeError, match="boom"):
        with L.lease(out, "t"):
            raise RuntimeError("boom")
    assert not L.lease_path(out).exists()

    holder = _holder_process(out, 30)
    try:
        with pytest.raises(L.LeaseHeld, match=f"held by pid {holder.pid} on {socket.gethostname()}"):
            L.acquire(out, "second writer")
        assert L.foreign_holder(out).pid == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_provably_gone_holders_are_taken_over(tmp_path, monkeypatch, caplog):
    out = tmp_path / "shard.h5"
    caplog.set_level(logging.WARNING, logger="silmm.lease")
    _write_lease(out, pid=_dead_pid(), pid_start=None)  # a dead process of this host
    with L.lease(out, "me"):
        assert json.loads(L.lease_path(out).read_text())["pid"] == os.getpid()
    assert "taking over the lease" in caplog.text and "is gone" in caplog.text
    _write_lease(out, pid=os.getpid(), pid_start="0")  # the pid now names another process (reused)
    L.release(L.acquire(out, "me"))

    # a Slurm job on another host: gone only when Slurm says it no longer runs
    other = {"host": "node-b", "pid": 1, "pid_start": None, "job_kind": "slurm", "job_id": "77_3"}
    for state, gone in (("RUNNING", False), ("COMPLETING", False), ("CANCELLED", True), ("PENDING", True),
                        (None, False)):
        monkeypatch.setattr(L, "slurm_state", lambda job, s=state: s)
        _write_lease(out, **other)
        if gone:
            L.release(L.acquire(out, "me"))
        else:
            with pytest.raises(L.LeaseHeld, match=r"node-b \(Slurm job 77_3\)"):
                L.acquire(out, "me")
    # a requeued array task (same job id, new process, any host) takes over its own lease
    monkeypatch.setattr(L, "slurm_state", lambda job: "RUNNING")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    L.release(L.acquire(out, "me"))
    # a lease on another host without a job cannot be proved gone
    _write_lease(out, host="node-c", pid=1, job_kind="", job_id="")
    with pytest.raises(L.LeaseHeld):
        L.acquire(out, "me")


def test_slurm_state_lines_are_parsed_with_unsplit_arrays():
    text = "123_[2-4,7%2]|PENDING\n123_0|RUNNING\n123_1|COMPLETED\n125|CANCELLED by 0\n126|REQUEUED\n"
    assert L._parse_states(text) == {"123_2": "PENDING", "123_3": "PENDING", "123_4": "PENDING", "123_7": "PENDING",
                                     "123_0": "RUNNING", "123_1": "COMPLETED", "125": "CANCELLED", "126": "REQUEUED"}


def test_holder_identity():
    me = L.Holder.me("t")
    assert me.pid_start == L.process_start(os.getpid()) and L.process_alive(os.getpid(), me.pid_start)
    assert not L.process_alive(_dead_pid())
    slurm = replace(me, job_kind="slurm", job_id="5")
    assert slurm.same_job(replace(slurm, host="other", pid=2)) and not slurm.same_job(replace(slurm, job_id="6"))
    local = replace(me, job_kind="local", job_id="9")
    assert not local.same_job(replace(local, host="other"))  # a local job id is a pid: only on its host
    assert not me.same_job(me)  # a plain process has no job to be requeued as


def test_shard_writer_never_deletes_another_writers_files(tmp_path):
    path = tmp_path / "shard_00000.h5"
    meta = S.ShardMeta("prompts", 1, 0, 1, "h")
    progress = path.with_name(path.name + ".progress")
    progress.mkdir()
    tmp = progress / ".part_00000.h5.tmp-4242"
    tmp.write_bytes(b"half")
    holder = _holder_process(path, 30)
    try:
        with pytest.raises(S.ShardError, match=f"being written by pid {holder.pid}"):
            S.ShardWriter(path, meta)
        assert tmp.exists()  # not ours to delete
    finally:
        holder.kill()
        holder.wait()
    with L.lease(path, "me"):  # the holder died: under our own lease the leftover goes
        S.ShardWriter(path, meta)
        assert not tmp.exists()


@pytest.mark.slow
def test_two_writers_on_one_shard_one_writes_the_other_says_who_holds_it(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints("janus")
    overrides = ("prompts.count=4", "sharding.prompts_per_shard=4", "sampling.samples_per_prompt=4",
                 "sampling.batch_size=2")
    ref, run = tiny_run(tmp_path / "ref", ckpt, "janus", *overrides), tiny_run(tmp_path / "run", ckpt, "janus", *overrides)
    for r in (ref, run):
        run_task(StageTask(str(r.path), 1, "prompts", 0))
    run_task(StageTask(str(ref.path), 1, "samples", 0))
    code = ("import json, sys; from silmm.tasks import StageTask, run_task; "
            f"print(json.dumps(run_task(StageTask({str(run.path)!r}, 1, 'samples', 0))))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    held = [r for r in results if "held_by" in r]
    wrote = [r for r in results if "held_by" not in r]
    if not held:  # the second started after the first had finished: it found the shard complete
        assert any(r.get("skipped") for r in results)
    else:
        assert len(held) == 1 and len(wrote) == 1 and "seconds" in wrote[0]
        assert held[0]["held_by"].startswith("pid ") and held[0]["lease"].endswith("shard_00000.h5.lease")
    assert shard_content(run.shard_path(1, "samples", 0)) == shard_content(ref.shard_path(1, "samples", 0))
    assert not L.lease_path(run.shard_path(1, "samples", 0)).exists()


def test_run_task_returns_held_then_takes_over_a_dead_holder(tiny_checkpoints, tmp_path):
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus")
    task = StageTask(str(run.path), 1, "prompts", 0)
    out = run.shard_path(1, "prompts", 0)
    out.parent.mkdir(parents=True, exist_ok=True)
    holder = _holder_process(out, 30)
    t0 = time.time()
    result = run_task(task)
    assert result["held_by"].startswith(f"pid {holder.pid} ") and not out.exists() and time.time() - t0 < 30
    holder.kill()  # dies holding the lease: the next writer takes it over
    holder.wait()
    assert L.read_holder(L.lease_path(out)).pid == holder.pid
    result = run_task(task)
    assert "held_by" not in result and S.is_complete(out) and not L.lease_path(out).exists()


def test_slurm_states_ask_squeue_first_then_sacct_for_the_rest(tmp_path, monkeypatch):
    """squeue knows live jobs at once (sacct lags); sacct answers for jobs squeue has forgotten."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    for name, text in (("squeue", "10_0|RUNNING\\n10_[1-2]|PENDING\\n11|REQUEUED\\n"), ("sacct", "12|CANCELLED by 0\\n")):
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\necho {name} \"$@\" >> {calls}\nprintf '{text}'\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert L.slurm_states(["10_0", "10_2", "11", "12", "13"]) == {"10_0": "RUNNING", "10_2": "PENDING",
                                                                  "11": "REQUEUED", "12": "CANCELLED"}
    asked = calls.read_text().splitlines()
    assert asked[0].startswith("squeue") and asked[0].endswith("-j 10,11,12,13")
    assert asked[1].startswith("sacct") and asked[1].endswith("-j 12,13")  # only what squeue did not know
    assert L.slurm_state("10_1") == "PENDING"
