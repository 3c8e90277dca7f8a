"""The driver and stage tasks on a real local Slurm cluster (slurm/start_local_slurm.sh)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from silmm import store as S
from silmm.driver import Driver, DriverError, JobBook
from silmm.executors import make_executor
from silmm.inspection import verify_run
from silmm.status import describe_status
from silmm.tasks import StageTask, run_task
from tests.helpers import break_prompts_shard, tiny_config, tiny_run
from tests.test_store import content as shard_content

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ("executor.kind=slurm", "executor.default.partition=debug", "executor.default.mem_gb=2",
           "executor.default.time_min=10", "executor.poll_interval_s=1", "executor.signal_delay_s=30")


def test_stages_through_slurm_arrays_split_by_max_array_size(slurm_cluster, tiny_checkpoints, tmp_path):
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus", *PROFILE, "prompts.count=6",
                   "sharding.prompts_per_shard=2", "executor.max_array_size=2")
    driver = Driver(run)
    for stage in ("prompts", "questions", "samples", "scores", "pairs"):
        driver.run_stage(1, stage)
    assert verify_run(run) == [] and S.is_complete(run.pairs_path(1))
    book = JobBook.load(run).entries
    prompt_arrays = {e["job_id"].split("_")[0] for k, e in book.items() if "/prompts/" in k}
    assert len(prompt_arrays) == 2  # 3 shards, at most 2 per array
    assert all(e["kind"] == "slurm" and e["state"] == "done" for e in book.values())
    # Slurm accounting knows the array tasks as completed
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(prompt_arrays)],
                         capture_output=True, text=True, check=True).stdout
    assert out.count("COMPLETED") == 3
    assert "prompts   done 3/3" in describe_status(run)


def test_preempted_samples_task_requeues_and_resumes_to_identical_shard(slurm_cluster, tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints("janus")
    overrides = (*PROFILE, "prompts.count=12", "sharding.prompts_per_shard=12", "sampling.samples_per_prompt=6",
                 "sampling.batch_size=2")
    ref = tiny_run(tmp_path / "ref", ckpt, "janus", *overrides)
    run = tiny_run(tmp_path / "pre", ckpt, "janus", *overrides)
    for r in (ref, run):
        run_task(StageTask(str(r.path), 1, "prompts", 0))
    run_task(StageTask(str(ref.path), 1, "samples", 0))
    job = make_executor(run, 1, "samples").submit(StageTask(str(run.path), 1, "samples", 0))
    progress = run.stage_dir(1, "samples") / "shard_00000.h5.progress"
    deadline = time.time() + 120
    while not list(progress.glob("part_00001.h5")) and time.time() < deadline and not job.done():
        time.sleep(0.01)
    assert not job.done(), "finished before the preemption"
    # USR2 -> checkpoint() flushes, requeue: the signal a time limit sends (--signal=USR2@delay), and the same
    # checkpoint and requeue path a preemption takes. Not _interrupt()'s preemption form, SIGTERM and USR2 back
    # to back: this Slurm cancels the step on that SIGTERM, and the USR2 handler's `scontrol requeue` was
    # sometimes killed with it (a race of the test's two signals, not of a real preemption)
    job._interrupt(timeout=True)
    job.result()
    restarts = subprocess.run(["scontrol", "show", "job", str(job.job_id)], capture_output=True, text=True).stdout
    assert "Restarts=1" in restarts
    log = (run.logs_dir / "iter_01" / "samples_00000.log").read_text()
    assert "resuming" in log  # the requeued task started from the flushed progress
    assert shard_content(run.shard_path(1, "samples", 0)) == shard_content(ref.shard_path(1, "samples", 0))


def test_killed_driver_rerun_redoes_nothing_finished(slurm_cluster, tiny_checkpoints, tmp_path):
    cfg = tiny_config(tmp_path, tiny_checkpoints("janus"), "janus", *PROFILE)
    args = [f"run.root={tmp_path}", "run.name=run", f"model.path={cfg.model.path}", *PROFILE,
            "prompts.count=6", "sharding.prompts_per_shard=3", "sampling.samples_per_prompt=3",
            "sampling.batch_size=3", "questions.max_new_tokens=12"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "silmm", "run", "configs/tiny_discrete.yaml", *args]
    driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_path = tmp_path / "run"
    questions = [run_path / "iter_01" / "questions" / f"shard_{i:05d}.h5" for i in range(2)]
    deadline = time.time() + 180
    while not all(q.exists() for q in questions) and time.time() < deadline and driver.poll() is None:
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert all(q.exists() for q in questions)
    mtimes = {p: p.stat().st_mtime_ns for p in (run_path / "iter_01").glob("*/shard_*.h5")}
    from silmm.rundir import RunDir

    run = RunDir.open(run_path)
    stats_before = len(list((run_path / "logs" / "iter_01").glob("prompts_*.stats.json")))
    Driver(run).run_stage(1, "samples")  # resume the iteration where it stopped
    Driver(run).run_stage(1, "scores")
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # nothing finished was rewritten
    assert len(list((run_path / "logs" / "iter_01").glob("prompts_*.stats.json"))) == stats_before
    assert verify_run(run) == []


def test_failing_task_reported_with_slurm_log(slurm_cluster, tiny_checkpoints, tmp_path):
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus", *PROFILE, "executor.retries=1")
    break_prompts_shard(run)
    run_task(StageTask(str(run.path), 1, "prompts", 1))
    with pytest.raises(DriverError) as err:
        Driver(run).run_stage(1, "questions")
    msg = str(err.value)
    assert "iter_01/questions/shard_00000: failed after 2 attempt(s)" in msg
    assert "not a readable HDF5 file" in msg and "job output:" in msg and "_0_log.err" in msg


def test_detached_driver_runs_a_full_iteration_with_two_task_training(slurm_cluster, tiny_checkpoints, tmp_path):
    """`silmm run --detach`: the driver is itself a Slurm job; stages run as arrays, training as 2 tasks
    (srun, gloo), and its losses match a world-size-1 run on the same pairs."""
    import json
    import shutil

    ckpt = tiny_checkpoints("janus")
    args = [f"run.root={tmp_path}", "run.name=run", f"model.path={ckpt}", *PROFILE, "executor.default.time_min=20",
            "prompts.count=4", "sharding.prompts_per_shard=2", "sampling.samples_per_prompt=3",
            "sampling.batch_size=3", "questions.max_new_tokens=12", "train.max_steps=3", "train.warmup_steps=1",
            "train.batch_size=2", "train.grad_accum=1", "train.log_every=1", "train.lora.r=4",
            "train.lora.alpha=4", "train.lora.dropout=0", "executor.stages.train.tasks_per_node=2"]
    proc = subprocess.run([sys.executable, "-m", "silmm", "run", "configs/tiny_discrete.yaml", *args, "--detach"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "driver submitted as Slurm job" in proc.stdout
    run_path = tmp_path / "run"
    deadline = time.time() + 600

    def finished() -> bool:  # the driver marks the iteration done after its last stage
        state = run_path / "state.json"
        return state.exists() and "iter_01" in json.loads(state.read_text()).get("done", {})

    while not finished() and time.time() < deadline:
        time.sleep(2)
    assert finished() and (run_path / "iter_01" / "model" / "DONE").exists(), (run_path / "jobs.json").read_text()
    from silmm.rundir import RunDir

    run = RunDir.open(run_path)
    assert verify_run(run) == []
    book = JobBook.load(run).entries
    assert all(e["kind"] == "slurm" and e["state"] == "done" for e in book.values())
    status = describe_status(run)
    assert all(f"{stage:9s} done" in status for stage in ("prompts", "samples", "pairs", "train"))
    assert "failed 1" not in status
    # both ranks of the training job ran: one log per rank
    logs = sorted(p.name for p in (run_path / "logs" / "iter_01").glob("train_00000*.log"))
    assert logs == ["train_00000.log", "train_00000.rank1.log"]

    # world size 1 on the same pairs (same config hash: only executor keys differ)
    from silmm import config as C

    local = RunDir.create_or_open(C.load(ROOT / "configs" / "tiny_discrete.yaml",
                                         [*args, f"run.root={tmp_path / 'ws1'}", "executor.kind=local"]))
    assert local.config_hash == run.config_hash
    local.iter_dir(1).mkdir(parents=True)
    shutil.copy(run.pairs_path(1), local.pairs_path(1))
    run_task(StageTask(str(local.path), 1, "train"))

    def losses(r):
        return [json.loads(line)["loss"] for line in (r.train_dir(1) / "metrics.jsonl").read_text().splitlines()]

    assert len(losses(run)) == 3
    np_losses = list(zip(losses(run), losses(local), strict=True))
    assert all(abs(a - b) < 1e-5 for a, b in np_losses), np_losses


def _our_jobs(name_part: str, since: str) -> dict[str, str]:
    """JobID -> JobName of the jobs (arrays as one line each task) whose name holds `name_part`, per sacct."""
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-S", since, "-o", "JobID,JobName%200"], capture_output=True,
                         text=True, check=True).stdout
    return {jid: name for jid, name in (line.split("|", 1) for line in out.splitlines() if "|" in line)
            if name_part in name}


def test_killed_driver_restarted_adopts_the_running_array(slurm_cluster, tiny_checkpoints, tmp_path, caplog):
    """SIGKILL the driver while the samples array runs; a new driver adopts the array (no second submission
    of those shards) and the shards equal an uninterrupted run's."""
    import logging
    import uuid

    from silmm.rundir import RunDir

    ckpt = tiny_checkpoints("janus")
    name = f"adopt{uuid.uuid4().hex[:6]}"
    args = [f"run.root={tmp_path}", f"run.name={name}", f"model.path={ckpt}", *PROFILE, "prompts.count=4",
            "sharding.prompts_per_shard=2", "sampling.samples_per_prompt=4", "sampling.batch_size=2",
            "questions.max_new_tokens=12"]
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen([sys.executable, "-m", "silmm", "run", "configs/tiny_discrete.yaml", *args], cwd=ROOT,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    book_path = tmp_path / name / "jobs.json"
    deadline = time.time() + 180
    while time.time() < deadline and driver.poll() is None:
        if book_path.exists() and '"iter_01/samples/00001"' in book_path.read_text():
            break
        time.sleep(0.1)
    driver.send_signal(signal.SIGKILL)  # the samples array is submitted, its tasks are starting
    driver.wait()
    run = RunDir.open(tmp_path / name)
    before = {k: e["job_id"] for k, e in JobBook.load(run).entries.items() if "/samples/" in k}
    assert len(before) == 2
    caplog.set_level(logging.INFO, logger="silmm")
    Driver(run).run_stage(1, "samples")
    assert "adopted slurm job" in caplog.text and "task(s) as" not in caplog.text
    after = JobBook.load(run).entries
    assert {k: e["job_id"] for k, e in after.items() if "/samples/" in k} == before
    assert all(after[k]["state"] == "done" and after[k]["attempts"] == 1 for k in before)
    samples_jobs = [j for j, n in _our_jobs(name, since).items() if "samples" in n]
    assert sorted(samples_jobs) == sorted(before.values())  # sacct: the shards were submitted once
    # the same shards an uninterrupted run writes (in this process: the same config, the same seeds)
    from silmm import config as C

    ref = RunDir.create_or_open(C.load(ROOT / "configs" / "tiny_discrete.yaml", [*args, f"run.root={tmp_path / 'ref'}"]))
    assert ref.config_hash == run.config_hash
    for shard in range(2):
        for stage in ("prompts", "questions", "samples"):
            run_task(StageTask(str(ref.path), 1, stage, shard))
        assert shard_content(run.shard_path(1, "samples", shard)) == shard_content(ref.shard_path(1, "samples", shard))
    assert not list((tmp_path / name).rglob("*.lease"))


def test_cancel_of_a_detached_run_empties_the_queue_and_the_next_run_resumes(slurm_cluster, tiny_checkpoints,
                                                                            tmp_path):
    import json
    import uuid

    from silmm.rundir import RunDir

    name = f"cancel{uuid.uuid4().hex[:6]}"
    args = [f"run.root={tmp_path}", f"run.name={name}", f"model.path={tiny_checkpoints('janus')}", *PROFILE,
            "prompts.count=4", "sharding.prompts_per_shard=2", "sampling.samples_per_prompt=4",
            "sampling.batch_size=2", "questions.max_new_tokens=12", "executor.stages.driver.mem_gb=1.5"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "silmm", "run", "configs/tiny_discrete.yaml", *args, "--detach"],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    run_path = tmp_path / name
    driver_job = json.loads((run_path / "driver_job.json").read_text())["job_id"]
    assert driver_job in proc.stdout
    sbatch = next((run_path / "logs" / "submitit" / "driver").glob(f"{driver_job}_submission.sh")).read_text()
    assert "--mem=1536M" in sbatch  # executor.stages.driver, not a hard-coded 2 GB
    book_path = run_path / "jobs.json"
    deadline = time.time() + 180
    while time.time() < deadline and not (book_path.exists() and "/questions/" in book_path.read_text()):
        time.sleep(0.2)
    run = RunDir.open(run_path)
    assert f"driver job {driver_job}: RUNNING" in describe_status(run)
    proc = subprocess.run([sys.executable, "-m", "silmm", "cancel", str(run_path)], cwd=ROOT, capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0 and f"driver job {driver_job}" in proc.stdout, proc.stdout + proc.stderr
    ids = {driver_job, *(e["job_id"].split("_")[0] for e in JobBook.load(run).entries.values())}
    deadline = time.time() + 60
    while time.time() < deadline:
        queued = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(ids)], capture_output=True, text=True).stdout
        if not queued.strip():
            break
        time.sleep(1)
    assert not queued.strip(), queued
    log = (run_path / "logs" / "driver.log").read_text()
    assert "submitted" in log and "the run was cancelled (silmm cancel on" in log  # its own log, and why it ended
    assert not (run_path / "driver.lock").exists()
    # the next run resumes: the cancelled tasks' leases are stale and taken over
    Driver(run).run_stage(1, "prompts")
    Driver(run).run_stages(1, ("questions", "samples"))  # on Slurm they started side by side
    assert verify_run(run) == [] and not list(run_path.rglob("*.lease"))
