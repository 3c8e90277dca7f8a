"""The driver with the debug (in-process) and local (submitit subprocess) executors."""

import json
import os
import signal
import subprocess
import sys

import pytest

from silmm import store as S
from silmm.driver import Driver, DriverError, JobBook, driver_lock
from silmm.executors import split_arrays
from silmm.inspection import verify_run
from silmm.status import describe_status
from tests.helpers import break_prompts_shard, tiny_run

FAST = ("executor.poll_interval_s=0.1",)


def test_debug_executor_runs_stages_through_pairs(tiny_checkpoints, tmp_path):
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus", "executor.kind=debug", *FAST)
    driver = Driver(run)
    for stage in ("prompts", "questions", "samples", "scores", "pairs"):
        driver.run_stage(1, stage)
    assert verify_run(run) == [] and run.pairs_path(1).is_file()
    book = JobBook.load(run).entries
    assert len(book) == 2 * 4 + 1 and all(e["state"] == "done" for e in book.values())


def test_local_executor_submits_only_missing_shards(tiny_checkpoints, tmp_path):
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus", "executor.kind=local",
                   "executor.local_parallelism=2", *FAST)
    driver = Driver(run)
    from silmm.tasks import StageTask, run_task

    run_task(StageTask(str(run.path), 1, "prompts", 1))  # shard 1 exists before the driver starts
    before = run.shard_path(1, "prompts", 1).stat().st_mtime_ns
    driver.run_stage(1, "prompts")
    book = JobBook.load(run).entries
    assert list(book) == ["iter_01/prompts/00000"]  # only the missing shard was submitted
    assert book["iter_01/prompts/00000"]["job_id"].isdigit()  # a local process
    assert run.shard_path(1, "prompts", 1).stat().st_mtime_ns == before
    assert all(S.is_complete(run.shard_path(1, "prompts", i)) for i in range(2))
    text = describe_status(run)
    assert "prompts   done 2/2" in text and "questions done 0/2" in text and "missing 2" in text


def test_failing_task_is_retried_then_reported_with_its_log(tiny_checkpoints, tmp_path):
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus", "executor.kind=local", "executor.retries=1",
                   *FAST)
    break_prompts_shard(run)
    from silmm.tasks import StageTask, run_task

    run_task(StageTask(str(run.path), 1, "prompts", 1))
    with pytest.raises(DriverError) as err:
        Driver(run).run_stage(1, "questions")
    msg = str(err.value)
    assert "iter_01/questions/shard_00000: failed after 2 attempt(s)" in msg
    assert "not a readable HDF5 file" in msg and "task log:" in msg and "questions_00000.log" in msg
    assert JobBook.load(run).entries["iter_01/questions/00000"]["state"] == "failed"
    assert S.is_complete(run.shard_path(1, "questions", 1))  # the healthy shard still finished


def test_second_driver_is_refused_and_stale_lock_taken_over(tiny_checkpoints, tmp_path):
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus")
    with driver_lock(run):
        with pytest.raises(DriverError, match="another driver is running on this run: pid"):
            with driver_lock(run):
                pass
    assert not (run.path / "driver.lock").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (run.path / "driver.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "x"}))
    with driver_lock(run):
        assert json.loads((run.path / "driver.lock").read_text())["pid"] == os.getpid()
    (run.path / "driver.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "x"}))
    with pytest.raises(DriverError, match="on another host"):
        with driver_lock(run):
            pass
    with driver_lock(run, break_lock=True):
        pass


def test_split_arrays():
    assert split_arrays(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert split_arrays([1], 1000) == [[1]]


def test_cli_run_refuses_bad_config_before_writing(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "silmm", "run", "configs/tiny_discrete.yaml",
                           f"run.root={tmp_path}", "feedback.method=oracle"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 2 and "feedback.method" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_cancel_stops_the_driver_and_its_local_jobs(tiny_checkpoints, tmp_path):
    root = os.path.dirname(os.path.dirname(__file__))
    args = [f"run.root={tmp_path}", "run.name=c", f"model.path={tiny_checkpoints('dream')}", "model.backend=dream",
            "prompts.count=64", "sharding.prompts_per_shard=64", "sampling.samples_per_prompt=8",
            "sampling.decoder_steps=200", "executor.poll_interval_s=0.2"]  # a samples task far longer than a cancel
    # the driver starts with SIGINT ignored, as `nohup silmm run ... &` in a script leaves it: children inherit
    # that, and the local jobs' controllers (submitit) then took no notice of cancel's SIGINT
    driver = subprocess.Popen([sys.executable, "-m", "silmm", "run", "configs/tiny_dream.yaml", *args], cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    book = tmp_path / "c" / "jobs.json"
    import time

    deadline = time.time() + 120
    while time.time() < deadline and driver.poll() is None:
        if book.exists() and "samples" in book.read_text():
            break
        time.sleep(0.2)
    job_pid = int(json.loads(book.read_text())["iter_01/samples/00000"]["job_id"])
    proc = subprocess.run([sys.executable, "-m", "silmm", "cancel", str(tmp_path / "c")], cwd=root,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and f"local job {job_pid}" in proc.stdout and "driver pid" in proc.stdout
    # communicate also waits for the pipes, which the local job's controller holds too: it ends with the job
    _, err = driver.communicate(timeout=120)
    assert driver.returncode == 1 and "driver stopped: the run was cancelled (silmm cancel on" in err
    assert "the next `silmm run` resumes it" in err
    deadline = time.time() + 30
    while time.time() < deadline and os.path.exists(f"/proc/{job_pid}") and \
            open(f"/proc/{job_pid}/stat").read().split()[2] != "Z":
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{job_pid}") or open(f"/proc/{job_pid}/stat").read().split()[2] == "Z"
    assert not (tmp_path / "c" / "driver.lock").exists()
    assert not (tmp_path / "c" / "iter_01" / "samples" / "shard_00000.h5").exists()


def test_driver_waits_for_a_lease_holder_then_runs_the_task(tiny_checkpoints, tmp_path, caplog):
    """A task whose output another writer leases exits without failing; the driver waits for that writer
    (here it dies holding the lease) and submits the task again, which takes the stale lease over."""
    import logging
    import time

    from tests.test_lease import _holder_process

    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus", "executor.kind=debug", *FAST)
    out = run.shard_path(1, "prompts", 0)
    out.parent.mkdir(parents=True, exist_ok=True)
    holder = _holder_process(out, 3)
    caplog.set_level(logging.INFO, logger="silmm")
    t0 = time.time()
    Driver(run).run_stage(1, "prompts")
    holder.wait()
    assert time.time() - t0 >= 2  # it waited for the holder, it did not write beside it
    assert f"being written by pid {holder.pid}" in caplog.text
    assert all(S.is_complete(run.shard_path(1, "prompts", i)) for i in range(2))
    entry = JobBook.load(run).entries["iter_01/prompts/00000"]
    assert entry["state"] == "done" and entry["attempts"] == 1  # waiting is not a failed attempt


def test_restarted_driver_adopts_a_live_local_job_and_corrects_ended_entries(tiny_checkpoints, tmp_path, caplog):
    import logging

    from silmm.driver import Tracked
    from silmm.executors import make_executor
    from silmm.tasks import StageTask, run_task

    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus", "executor.kind=local", *FAST)
    task0, task1 = (StageTask(str(run.path), 1, "prompts", s) for s in range(2))
    run_task(task1)
    # what a killed driver leaves: shard 0's job still running, and shard 1 recorded as running although
    # its process is long gone (and its shard finished)
    job = make_executor(run, 1, "prompts").submit(task0)
    book = JobBook.load(run)
    book.record(Tracked(task0, job, attempts=1, state="running"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    book.entries["iter_01/prompts/00001"] = {**book.entries["iter_01/prompts/00000"], "job_id": str(dead.pid)}
    book.save()
    caplog.set_level(logging.INFO, logger="silmm")
    driver = Driver(run)  # while the job's process starts: it is alive
    assert JobBook.load(run).entries["iter_01/prompts/00001"]["state"] == "ended"  # no stale "running" entry
    driver.run_stage(1, "prompts")
    assert f"adopted local job {job.job_id}" in caplog.text and "task(s) as" not in caplog.text
    entries = JobBook.load(run).entries
    assert entries["iter_01/prompts/00000"]["job_id"] == job.job_id and entries["iter_01/prompts/00000"]["attempts"] == 1
    assert {e["state"] for e in entries.values()} == {"done"}
    assert all(S.is_complete(run.shard_path(1, "prompts", i)) for i in range(2))


def test_status_counts_requeued_tasks_as_running_and_shows_the_driver_job(tiny_checkpoints, tmp_path, monkeypatch):
    import silmm.status as ST
    from silmm.driver import record_driver_job

    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus")
    entry = {"job_id": "41_0", "state": "running", "attempts": 1, "kind": "slurm", "log": "x", "error": ""}
    (run.path / "jobs.json").write_text(json.dumps({"iter_01/prompts/00000": entry,
                                                    "iter_01/prompts/00001": {**entry, "job_id": "41_1"}}))
    record_driver_job(run, "40", log="driver.log")
    states = {"40": "RUNNING", "41_0": "REQUEUED", "41_1": "PENDING"}
    monkeypatch.setattr(ST, "slurm_states", lambda ids: {i: states[i] for i in ids if i in states})
    monkeypatch.setattr(ST, "slurm_state", lambda i: states.get(i))
    text = describe_status(run)
    assert "driver job 40: RUNNING" in text
    assert "prompts   done 0/2  running 2  failed 0  missing 0" in text and "41_0:REQUEUED" in text
