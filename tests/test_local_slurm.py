"""submitit against the real local Slurm cluster (fixture ``slurm_cluster``, tests/slurm_cluster.py).

These check the behaviour the batch jobs of silmm rely on: job arrays, errors coming back,
a cancelled job ending the wait instead of hanging (this needs sacct, hence accounting),
and a Checkpointable task resuming from its checkpoint after preemption and requeue.
About 50 s on 2 cores, most of it in the Slurm requeue delay and the sacct lag.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

pytestmark = pytest.mark.slurm

# The jobs unpickle the functions below in a fresh interpreter that cannot import this test
# module by name (pytest puts tests/ on sys.path only in its own process), so ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---------------------------------------------------------------- job functions
def square_in_array(x: int) -> tuple[int, str]:
    return x * x, os.environ.get("SLURM_ARRAY_JOB_ID", "")


def fail_with(message: str) -> None:
    raise ValueError(message)


class CountWithCheckpoints(submitit.helpers.Checkpointable):
    """Counts to n_steps; the whole object (count so far included) is the checkpoint.

    ``starts`` records the count at which each run began, so the result shows whether the
    requeued run resumed from the checkpoint or started again from zero.
    """

    def __init__(self, progress_file: str) -> None:
        self.progress_file = progress_file
        self.count = 0
        self.starts: list[int] = []

    def __call__(self, n_steps: int, step_s: float) -> tuple[int, list[int]]:
        self.starts.append(self.count)
        while self.count < n_steps:
            time.sleep(step_s)
            self.count += 1
            Path(self.progress_file).write_text(str(self.count))
        return self.count, self.starts


# ---------------------------------------------------------------- helpers
def make_executor(cluster, folder: Path, **params: Any) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")  # no silent local fallback
    executor.update_parameters(slurm_partition=cluster.partition, timeout_min=5, cpus_per_task=1, **params)
    return executor


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)


def squeue_state(job_id: str) -> str:
    """State from slurmctld directly (sacct lags about 5 s behind new jobs)."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return out.stdout.strip()


def sacct_states(job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State"],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(line.split("|", 1) for line in out.stdout.splitlines() if line)


def result_within(job: submitit.Job, timeout_s: float) -> Any:
    """job.result(), but fail the test instead of hanging if it does not return in time."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = job.result()
        except Exception as error:  # re-raised in the test thread
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        pytest.fail(f"job {job.job_id}: result() still waiting after {timeout_s:.0f} s (state {job.state})")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# ---------------------------------------------------------------- tests
def test_map_array_returns_results_and_sacct_knows_the_tasks(slurm_cluster, tmp_path):
    executor = make_executor(slurm_cluster, tmp_path, slurm_array_parallelism=2)
    jobs = executor.map_array(square_in_array, [1, 2, 3, 4])

    results = [result_within(job, 60) for job in jobs]

    assert [value for value, _ in results] == [1, 4, 9, 16]
    array_id = jobs[0].job_id.split("_")[0]
    assert {array_job for _, array_job in results} == {array_id}  # ran as tasks of one array
    expected = {job.job_id: "COMPLETED" for job in jobs}
    wait_until(lambda: sacct_states(array_id) == expected, 30, f"sacct to list {expected}")


def test_exception_in_job_raises_failed_job_error(slurm_cluster, tmp_path):
    job = make_executor(slurm_cluster, tmp_path).submit(fail_with, "boom from the job 4711")

    with pytest.raises(FailedJobError, match="boom from the job 4711"):
        result_within(job, 60)


def test_cancelled_job_raises_instead_of_hanging(slurm_cluster, tmp_path):
    job = make_executor(slurm_cluster, tmp_path).submit(time.sleep, 300)
    wait_until(lambda: squeue_state(job.job_id) == "RUNNING", 30, f"job {job.job_id} to run")

    job.cancel()

    # submitit learns of the cancellation only from sacct (no result file is written);
    # it polls less and less often, so this takes 15-25 s
    with pytest.raises(UncompletedJobError, match="CANCELLED"):
        result_within(job, 90)


def test_checkpointable_task_resumes_after_preemption(slurm_cluster, tmp_path):
    progress = tmp_path / "progress"
    task = CountWithCheckpoints(str(progress))
    job = make_executor(slurm_cluster, tmp_path).submit(task, 12, 0.5)

    def counted_to_3() -> bool:
        return progress.exists() and int(progress.read_text() or 0) >= 3

    wait_until(counted_to_3, 30, "the task to count to 3")
    job._interrupt()  # what a preemption does: SIGTERM, then USR2 -> checkpoint + requeue

    # the requeued job may start only after cred_expire (10 s)
    count, starts = result_within(job, 120)

    assert count == 12
    assert len(starts) == 2 and starts[0] == 0 and starts[1] >= 3, starts
    restarts = subprocess.run(
        ["scontrol", "show", "job", "-o", job.job_id], capture_output=True, text=True, check=True
    ).stdout
    assert " Restarts=1 " in restarts
