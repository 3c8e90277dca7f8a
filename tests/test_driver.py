"""The driver with the debug (in-process) and local (submitit subprocess) executors."""

import json
import os
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
            "sampling.decoder_steps=20", "executor.poll_interval_s=0.2"]
    driver = subprocess.Popen([sys.executable, "-m", "silmm", "run", "configs/tiny_dream.yaml", *args], cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
    _, err = driver.communicate(timeout=60)
    assert driver.returncode == 1 and "driver stopped by a signal" in err
    deadline = time.time() + 30
    while time.time() < deadline and os.path.exists(f"/proc/{job_pid}") and \
            open(f"/proc/{job_pid}/stat").read().split()[2] != "Z":
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{job_pid}") or open(f"/proc/{job_pid}/stat").read().split()[2] == "Z"
    assert not (tmp_path / "c" / "driver.lock").exists()
    assert not (tmp_path / "c" / "iter_01" / "samples" / "shard_00000.h5").exists()
