"""What a cluster imposes on submissions (silmm/executors.py): limits read from `scontrol show config`,
arrays split within them with the %N throttle shared, sbatch errors as one line with the fix, stage jobs
that requeue, and the torch thread count of every task. Unit tests without Slurm, then the local cluster."""

import os
import subprocess
import time
from pathlib import Path

import pytest

from silmm import config as C
from silmm import executors as X
from silmm.rundir import RunDir

# `scontrol show config` of Slurm 22.05 (excerpt, as printed)
SCONTROL = """Configuration data as of 2026-11-30T10:00:00
AccountingStorageType   = accounting_storage/slurmdbd
JobRequeue              = 0
MaxArraySize            = 1001
MaxJobCount             = 10000
MaxStepCount            = 40000
"""


def _run(tmp_path: Path, *overrides: str) -> RunDir:
    """A run directory (no checkpoint is needed: nothing is run)."""
    return RunDir.create_or_open(C.load(None, [f"run.root={tmp_path}", "run.name=r", "model.build_tiny_if_missing=true",
                                               f"model.path={tmp_path / 'ckpt'}", *overrides]))


def test_scontrol_config_parsed():
    limits = X.parse_scontrol_config(SCONTROL)
    assert limits == X.SlurmLimits(max_array_size=1001, max_job_count=10000, job_requeue=False)
    assert X.parse_scontrol_config("") == X.SlurmLimits()  # nothing known: nothing assumed
    assert X.parse_scontrol_config("JobRequeue = 1\n").job_requeue is True


def test_array_size_within_every_limit():
    assert X.array_size_limit(1000, X.SlurmLimits()) == 1000
    assert X.array_size_limit(1000, X.SlurmLimits(max_array_size=4)) == 4  # indices 0-3: all below 4
    assert X.array_size_limit(1000, X.SlurmLimits(max_array_size=5000, max_job_count=300)) == 300
    assert X.array_size_limit(2, X.SlurmLimits(max_array_size=4)) == 2


@pytest.mark.parametrize("throttle,chunks", [(64, 1), (64, 3), (5, 2), (2, 3), (1, 1), (7, 7)])
def test_throttle_shared_across_arrays(throttle, chunks):
    shares = X.share_throttle(throttle, chunks)
    assert len(shares) == chunks and min(shares) >= 1
    assert sum(shares) == max(throttle, chunks)  # together no more than one array would run (at least 1 each)


class _Recorder:
    def __init__(self):
        self.throttles: list[int] = []

    def update_parameters(self, **kw):
        self.throttles.append(kw["array_parallelism"])


def test_arrays_split_by_the_clusters_max_array_size_without_configuration(tmp_path, monkeypatch):
    run = _run(tmp_path, "executor.kind=slurm", "executor.default.array_parallelism=5")
    monkeypatch.setattr(X, "slurm_limits", lambda: X.SlurmLimits(max_array_size=4, max_job_count=100))
    ex = _Recorder()
    chunks = list(X.array_chunks(ex, run, "samples", list(range(10))))
    assert chunks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert ex.throttles == [2, 2, 1]  # %5 shared: at most 5 tasks at once over the three arrays
    # the local executor never asks Slurm; it splits by executor.max_array_size only
    local = _run(tmp_path / "l", "executor.max_array_size=3")
    assert list(X.array_chunks(_Recorder(), local, "samples", list(range(5)))) == [[0, 1, 2], [3, 4]]


def test_sbatch_error_is_one_line_with_the_fix():
    params = {"job_name": "silmm-r-samples-1", "partition": "gpu", "time": 60, "mem": "2048M"}
    limits = X.SlurmLimits(max_array_size=1001)
    msg = X.explain_sbatch_error("sbatch: error: Batch job submission failed: Invalid job array specification\n",
                                 params, "samples", limits)
    assert "\n" not in msg
    assert msg == ("sbatch refused job silmm-r-samples-1: sbatch: error: Batch job submission failed: Invalid job "
                   "array specification -> set executor.max_array_size below MaxArraySize=1001 "
                   "(`scontrol show config | grep MaxArraySize`)")
    msg = X.explain_sbatch_error("sbatch: error: invalid partition specified: gpu\n", params, "samples", limits)
    assert "executor.stages.samples.partition" in msg and "it was gpu" in msg
    msg = X.explain_sbatch_error("sbatch: error: Something new\n", params, "train", limits)
    assert msg.endswith("-> check the stage's resources (executor.default / executor.stages.train) against `sinfo`")


def test_stage_jobs_request_requeue_and_append_to_their_log(tmp_path):
    run = _run(tmp_path, "executor.kind=slurm", "executor.default.additional_parameters={exclusive: true}")
    ex = X.make_executor(run, 1, "samples")
    assert isinstance(ex, X.SlurmExecutor) and ex.stage == "samples"
    script = ex._make_submission_file_text("python -m x", "uid")
    assert "#SBATCH --requeue" in script and "#SBATCH --open-mode=append" in script
    assert "#SBATCH --exclusive" in script  # the config's own parameters are kept beside it


def test_allocated_cpus_on_every_executor():
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "3", "OMP_NUM_THREADS": "16",
             X.TASK_THREADS_ENV: "5"}  # the login node's variables come along with sbatch's export: ignored
    assert X.allocated_cpus(slurm) == (3, "SLURM_CPUS_PER_TASK")
    plain = {"SLURM_JOB_ID": "7"}  # slurm/sbatch/*.sh without --cpus-per-task
    assert X.allocated_cpus(plain)[0] == 1
    # a local task inside a Slurm allocation (salloc): the driver's share, not the allocation's
    local = {"SUBMITIT_EXECUTOR": "local", X.TASK_THREADS_ENV: "2", "SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "8"}
    assert X.allocated_cpus(local)[0] == 2
    assert X.allocated_cpus({"OMP_NUM_THREADS": "3"}) == (3, "OMP_NUM_THREADS")  # in-process: the user's
    assert X.allocated_cpus({}) == (len(os.sched_getaffinity(0)), "this process's CPU affinity")


def test_local_share_fixed_by_config_not_by_what_is_running(tmp_path):
    run = _run(tmp_path, "executor.local_parallelism=2", "executor.stages.train.tasks_per_node=2")
    assert X.local_threads(run, "scores", cpus=8) == 4  # two shards at once
    assert X.local_threads(run, "pairs", cpus=8) == 8  # one task
    assert X.local_threads(run, "train", cpus=8) == 4  # one task of two ranks
    assert X.local_threads(run, "scores", cpus=1) == 1


def test_task_threads_set_first_in_every_task(tmp_path, monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv(X.TASK_THREADS_ENV, "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    try:
        from silmm.tasks import StageTask, run_task

        with pytest.raises(C.ConfigError):  # not a run directory: fails after the threads are set
            run_task(StageTask(str(tmp_path), 1, "prompts"))
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------- local Slurm
def test_small_max_array_size_split_without_configuration(slurm_cluster, tmp_path):
    """A cluster whose MaxArraySize is 3: an array of 7 one-second tasks is submitted as 3 arrays (read
    from scontrol, no setting), their throttle %2 shared; every task runs."""
    from tests.slurm_cluster import cluster_limits

    run = _run(tmp_path, "executor.kind=slurm", "executor.default.partition=debug", "executor.default.mem_gb=0.5",
               "executor.default.time_min=5", "executor.default.array_parallelism=2")
    with cluster_limits(slurm_cluster, max_array_size=3):
        X._limits_for.cache_clear()
        assert X.slurm_limits().max_array_size == 3
        ex = X.make_executor(run, 1, "samples")
        jobs = []
        throttles = []
        for chunk in X.array_chunks(ex, run, "samples", list(range(7))):
            throttles.append(ex.parameters["array_parallelism"])
            with ex.batch():
                jobs += [ex.submit(time.sleep, 0.5) for _ in chunk]
    X._limits_for.cache_clear()
    assert throttles == [1, 1, 1] and len({j.job_id.split("_")[0] for j in jobs}) == 3
    deadline = time.time() + 90
    while time.time() < deadline and subprocess.run(["squeue", "-h", "-j", ",".join(
            sorted({j.job_id.split("_")[0] for j in jobs}))], capture_output=True, text=True).stdout.strip():
        time.sleep(1)
    assert all(j.result() is None for j in jobs)


def test_sbatch_refusal_reported_in_one_line_with_the_fix(slurm_cluster, tmp_path):
    """What the user sees when sbatch refuses an array (here one larger than MaxArraySize, submitted directly:
    the driver would have split it)."""
    from tests.slurm_cluster import cluster_limits

    run = _run(tmp_path, "executor.kind=slurm", "executor.default.partition=debug", "executor.default.mem_gb=0.5",
               "executor.default.time_min=5")
    ex = X.make_executor(run, 1, "samples")
    with cluster_limits(slurm_cluster, max_array_size=2), pytest.raises(X.SubmissionError) as err:
        X._limits_for.cache_clear()
        with ex.batch():
            for _ in range(3):
                ex.submit(time.sleep, 0)
    X._limits_for.cache_clear()
    assert "Invalid job array specification -> set executor.max_array_size below MaxArraySize=2" in str(err.value)


def test_scores_bit_identical_on_local_and_slurm_executors(slurm_cluster, tiny_checkpoints, tmp_path):
    """The same scores shards, byte for byte, from the local executor and from Slurm: both tasks use the same
    torch thread count (the local share of this machine = the Slurm job's cpus_per_task). Without it the
    Slurm task would take torch's default (every core) and differ in the last bits."""
    import shutil

    from silmm.driver import Driver
    from silmm.tasks import StageTask, run_task
    from tests.helpers import tiny_run
    from tests.test_store import content

    ckpt = tiny_checkpoints("janus")
    common = ("prompts.count=4", "sharding.prompts_per_shard=2", "executor.poll_interval_s=0.5")
    local = tiny_run(tmp_path / "local", ckpt, "janus", *common, "executor.kind=local", "executor.local_parallelism=2")
    threads = X.local_threads(local, "scores")
    slurm = tiny_run(tmp_path / "slurm", ckpt, "janus", *common, "executor.kind=slurm", "executor.default.partition=debug",
                     "executor.default.mem_gb=1", "executor.default.time_min=10",
                     f"executor.stages.scores.cpus_per_task={threads}")
    assert local.config_hash == slurm.config_hash
    for stage in ("prompts", "questions", "samples"):  # the inputs, once
        for shard in range(2):
            run_task(StageTask(str(local.path), 1, stage, shard))
    shutil.copytree(local.iter_dir(1), slurm.iter_dir(1))
    for run in (local, slurm):
        driver = Driver(run)
        driver._user_threads = False  # an OMP_NUM_THREADS of the shell running the tests must not decide here
        driver.run_stage(1, "scores")
    for shard in range(2):
        assert content(local.shard_path(1, "scores", shard)) == content(slurm.shard_path(1, "scores", shard))
