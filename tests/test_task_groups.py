"""Several shards per array task (`shards_per_task`): one model load per task, per-shard resumability and leases
kept, the driver's retries, adoption and the sbatch chain; questions and samples side by side (issue #17)."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from silmm import store as S
from silmm.driver import Driver, DriverError, JobBook, StageRun, Tracked
from silmm.executors import TASK_THREADS_ENV, SlurmLimits, _array_jobs, make_executor, sbatch_iteration
from silmm.tasks import ShardGroup, ShardsFailed, StageTask, log_path, run_group, run_task
from tests.helpers import break_prompts_shard, tiny_run
from tests.test_sbatch import SCRIPTS, _env
from tests.test_store import content as shard_content

ROOT = Path(__file__).resolve().parents[1]
FAST = ("executor.poll_interval_s=0.1",)
# 4 shards of one prompt, 2 samples each; Prompt-Q questions (no model): the stages that load one are timed
FOUR_SHARDS = ("prompts.count=4", "sharding.prompts_per_shard=1", "sampling.samples_per_prompt=2",
               "sampling.batch_size=2", "questions.method=prompt_q")


def metadata(path: Path) -> dict:
    """Every attribute of a shard but its write time (and the checksum that covers it)."""
    return {k: v for k, v in S.read_shard(path, columns=()).attrs.items() if k not in ("created", "attrs_checksum")}


def assert_same_shards(run, ref, stage: str, shards) -> None:
    for s in shards:
        got, want = run.shard_path(1, stage, s), ref.shard_path(1, stage, s)
        assert shard_content(got) == shard_content(want), (stage, s)
        assert metadata(got) == metadata(want), (stage, s)


def count_loads(monkeypatch, backend_cls) -> list[str]:
    """Each real load of ``backend_cls`` (what load_backend calls to read the weights), by checkpoint."""
    loads: list[str] = []
    real = backend_cls.load.__func__

    def counted(cls, model_cfg, *args, **kwargs):
        loads.append(model_cfg.path)
        return real(cls, model_cfg, *args, **kwargs)

    monkeypatch.setattr(backend_cls, "load", classmethod(counted))
    return loads


# ------------------------------------------------------------------------------------- model loads
def test_two_tasks_of_two_shards_load_the_model_twice_and_write_what_single_shard_tasks_write(
        tiny_checkpoints, tmp_path, monkeypatch):
    from silmm.backends.janus import JanusBackend

    ckpt = tiny_checkpoints("janus")
    ref = tiny_run(tmp_path / "ref", ckpt, "janus", *FOUR_SHARDS)
    run = tiny_run(tmp_path / "grouped", ckpt, "janus", *FOUR_SHARDS, "executor.kind=debug",
                   "executor.default.shards_per_task=2", *FAST)
    assert run.config_hash == ref.config_hash  # executor keys do not change what a run computes
    stages = ("prompts", "questions", "samples", "scores")
    for stage in stages:  # the reference: one task per shard
        for s in range(4):
            run_task(StageTask(str(ref.path), 1, stage, s))
    loads = count_loads(monkeypatch, JanusBackend)
    driver = Driver(run)
    per_stage = {}
    for stage in stages:
        loads.clear()
        driver.run_stage(1, stage)
        per_stage[stage] = len(loads)
    # samples (the policy) and scores (the judge, which also decodes): one load per task of 2 shards
    assert (per_stage["samples"], per_stage["scores"]) == (2, 2)
    for stage in stages:
        assert_same_shards(run, ref, stage, range(4))
    book = JobBook.load(run).entries
    for stage in stages:  # one entry per shard (status, adoption), the job shared by the shards of a task
        jobs = [book[f"iter_01/{stage}/{s:05d}"]["job_id"] for s in range(4)]
        assert jobs[0] == jobs[1] != jobs[2] == jobs[3], stage
        assert {book[f"iter_01/{stage}/{s:05d}"]["state"] for s in range(4)} == {"done"}
    # each shard keeps its own log and stats; the task's second shard says it shares the first one's model
    logs = [log_path(run, StageTask(str(run.path), 1, "samples", s)).read_text() for s in range(4)]
    assert [("loaded JanusBackend" in t, "loaded already by this task, shared" in t) for t in logs] == \
        [(True, False), (False, True)] * 2
    assert all(log_path(run, StageTask(str(run.path), 1, "samples", s)).with_suffix(".stats.json").is_file()
               for s in range(4))


@pytest.mark.parametrize("backend", ["dream", "emu3"])  # continuous (DropDiv, H_r) and another discrete family
def test_a_shared_model_writes_what_a_fresh_one_writes(backend, tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints(backend)
    ref = tiny_run(tmp_path / "ref", ckpt, backend, "prompts.count=4", "sharding.prompts_per_shard=2")
    run = tiny_run(tmp_path / "grouped", ckpt, backend, "prompts.count=4", "sharding.prompts_per_shard=2")
    for stage in ("prompts", "questions", "samples", "scores"):
        for s in range(2):
            run_task(StageTask(str(ref.path), 1, stage, s))
        result = run_group(ShardGroup(str(run.path), 1, stage, (0, 1)))
        assert sorted(result["shards"]) == [0, 1]
        assert_same_shards(run, ref, stage, range(2))
    # (shard 1 really had shard 0's model)
    assert "loaded already by this task, shared" in log_path(run, StageTask(str(run.path), 1, "samples", 1)).read_text()


def test_models_are_shared_only_inside_a_group(tiny_checkpoints, tmp_path, monkeypatch):
    from silmm.backends.janus import JanusBackend
    from silmm.models import load_backend, shared_models

    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus")
    loads = count_loads(monkeypatch, JanusBackend)
    with shared_models():
        a, b = load_backend(run, 1), load_backend(run, 1)
        with shared_models():  # nested: the outer group's models
            c = load_backend(run, 1)
    d = load_backend(run, 1)
    assert a is b is c and d is not a and len(loads) == 2


# ------------------------------------------------------------------------------------- kill, resume
@pytest.mark.slow
def test_killed_multi_shard_task_resumes_to_the_single_shard_tasks_shards(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints("janus")
    overrides = ("prompts.count=12", "sharding.prompts_per_shard=6", "sampling.samples_per_prompt=4",
                 "sampling.batch_size=2")
    ref = tiny_run(tmp_path / "ref", ckpt, "janus", *overrides)
    run = tiny_run(tmp_path / "killed", ckpt, "janus", *overrides)
    for r in (ref, run):
        for s in range(2):
            run_task(StageTask(str(r.path), 1, "prompts", s))
    for s in range(2):
        run_task(StageTask(str(ref.path), 1, "samples", s))

    # one process for shards 0-1 (as stage.sh runs it with SILMM_SHARDS_PER_TASK=2), killed inside shard 1
    progress_dir = run.stage_dir(1, "samples") / "shard_00001.h5.progress"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.samples", "--run", str(run.path), "--iteration", "1",
                             "--shards", "0-1"], env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not (progress_dir / "part_00001.h5").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert S.is_complete(run.shard_path(1, "samples", 0))
    assert not run.shard_path(1, "samples", 1).exists(), "the task finished before it could be interrupted"
    done_before = len(list(progress_dir.glob("part_*.h5")))
    assert 2 <= done_before < 6
    # the requeued task: shard 0 is skipped, shard 1 resumes from its progress
    result = run_group(ShardGroup(str(run.path), 1, "samples", (0, 1)))
    assert result["shards"][0]["skipped"] and result["shards"][1]["computed"] == 6 - done_before
    assert_same_shards(run, ref, "samples", range(2))


def test_preempted_group_flushes_its_shard_and_requeues_itself(tiny_checkpoints, tmp_path):
    from silmm.tasks import open_writer

    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus", "sharding.flush_every=4")
    writer = open_writer(run, 1, "questions", 1, 2)
    writer.add(3, {"prompt_id": [3], "question_count": [1], "fallback": [False], "question": ["Is it red?"]})
    group = ShardGroup(str(run.path), 1, "questions", (0, 1))
    resubmission = group.checkpoint()
    assert not writer.pending and len(writer.parts) == 1
    assert resubmission.function is group  # the whole group: its finished shards are skipped when it runs again
    assert group.name == "iter_01/questions/shard_00000..00001"


# ------------------------------------------------------------------------------- failures, leases
def test_a_failing_shard_does_not_stop_its_group_and_only_it_is_retried(tiny_checkpoints, tmp_path, caplog):
    # (the local executor: a failing debug job drops into pdb)
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus", "executor.kind=local",
                   "executor.default.shards_per_task=2", "executor.retries=1", "questions.method=prompt_q", *FAST)
    run_task(StageTask(str(run.path), 1, "prompts", 1))
    break_prompts_shard(run, 0)
    caplog.set_level(logging.INFO, logger="silmm")
    with pytest.raises(DriverError) as err:
        Driver(run).run_stage(1, "questions")
    msg = str(err.value)
    assert "iter_01/questions/shard_00000: failed after 2 attempt(s)" in msg and "not a readable HDF5 file" in msg
    assert "shard_00001" not in msg
    assert S.is_complete(run.shard_path(1, "questions", 1))  # done by the first attempt, after shard 0 failed
    # the second attempt ran shard 0 alone: shard 1's log shows one start
    assert log_path(run, StageTask(str(run.path), 1, "questions", 1)).read_text().count(": start on ") == 1
    assert "iter 1 questions: submitted 1 task(s) for 2 shards" in caplog.text
    assert "iter 1 questions: submitted 1 task(s) as" in caplog.text
    book = JobBook.load(run).entries
    assert (book["iter_01/questions/00000"]["state"], book["iter_01/questions/00000"]["attempts"]) == ("failed", 2)
    assert (book["iter_01/questions/00001"]["state"], book["iter_01/questions/00001"]["attempts"]) == ("done", 1)


def test_several_failed_shards_are_named_in_one_error(tiny_checkpoints, tmp_path):
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus", "questions.method=prompt_q")
    for s in range(2):
        break_prompts_shard(run, s)
    with pytest.raises(ShardsFailed) as err:
        run_group(ShardGroup(str(run.path), 1, "questions", (0, 1)))
    msg = str(err.value)
    assert msg.startswith("2 of 2 shards failed: iter_01/questions/shard_00000: ShardError: ") and "\n" not in msg
    assert "; iter_01/questions/shard_00001: ShardError: " in msg and "prompts/shard_00001.h5" in msg


def test_a_leased_shard_is_passed_over_and_waited_for(tiny_checkpoints, tmp_path, caplog):
    from tests.test_lease import _holder_process

    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus", "executor.kind=debug",
                   "executor.default.shards_per_task=2", *FAST)
    out = run.shard_path(1, "prompts", 0)
    out.parent.mkdir(parents=True, exist_ok=True)
    holder = _holder_process(out, 3)
    caplog.set_level(logging.INFO, logger="silmm")
    Driver(run).run_stage(1, "prompts")
    holder.wait()
    assert f"being written by pid {holder.pid}" in caplog.text
    assert all(S.is_complete(run.shard_path(1, "prompts", s)) for s in range(2))
    book = JobBook.load(run).entries
    assert [(book[f"iter_01/prompts/{s:05d}"]["state"], book[f"iter_01/prompts/{s:05d}"]["attempts"])
            for s in range(2)] == [("done", 1), ("done", 1)]  # waiting is not a failed attempt


def test_restarted_driver_adopts_a_live_multi_shard_job(tiny_checkpoints, tmp_path, caplog):
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus", "executor.kind=local",
                   "executor.default.shards_per_task=2", *FAST)
    tasks = [StageTask(str(run.path), 1, "prompts", s) for s in range(2)]
    job = make_executor(run, 1, "prompts").submit(ShardGroup(str(run.path), 1, "prompts", (0, 1)))
    book = JobBook.load(run)  # what a driver killed right after the submission leaves
    for t in tasks:
        book.record(Tracked(t, job, attempts=1, state="running"))
    book.save()
    caplog.set_level(logging.INFO, logger="silmm")
    Driver(run).run_stage(1, "prompts")
    assert caplog.text.count(f"adopted local job {job.job_id}") == 2 and "task(s)" not in caplog.text
    entries = JobBook.load(run).entries
    assert {(e["job_id"], e["state"], e["attempts"]) for e in entries.values()} == {(job.job_id, "done", 1)}
    assert all(S.is_complete(run.shard_path(1, "prompts", s)) for s in range(2))


# --------------------------------------------------------------------------- questions and samples together
def _span(log_file: Path) -> tuple[datetime, datetime]:
    """When a task's work started and ended, from its log's "start on" and "done in" lines."""
    stamps = {}
    for line in log_file.read_text().splitlines():
        for key in (": start on ", ": done in "):
            if key in line:
                stamps.setdefault(key, datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f"))
    return stamps[": start on "], stamps[": done in "]


@pytest.mark.slow
def test_questions_and_samples_run_side_by_side_on_the_local_executor(tiny_checkpoints, tmp_path):
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus", "executor.kind=local", "executor.local_parallelism=2",
                   "executor.default.shards_per_task=2", "prompts.count=12", "sharding.prompts_per_shard=6", *FAST)
    driver = Driver(run)
    assert driver.stage_steps()[1] == ("questions", "samples")
    driver.run_stage(1, "prompts")
    t0 = time.time()
    driver.run_stages(1, ("questions", "samples"))
    assert all(S.is_complete(run.shard_path(1, stage, s)) for stage in ("questions", "samples") for s in range(2))
    # one task per stage (2 shards each), running at once: the first shard of each started before the last
    # shard of the other ended
    q0, q1 = (_span(log_path(run, StageTask(str(run.path), 1, "questions", s))) for s in range(2))
    s0, s1 = (_span(log_path(run, StageTask(str(run.path), 1, "samples", s))) for s in range(2))
    assert q0[0] < s1[1] and s0[0] < q1[1], (q0, q1, s0, s1)
    assert max(q1[1], s1[1]).timestamp() - t0 < 300
    # each task got its share of the cores, cores // local_parallelism, whichever stage it belongs to (and
    # _fill keeps at most local_parallelism tasks running: test_stages_waited_for_together_share_the_room)
    if not driver._user_threads:  # (an OMP_NUM_THREADS of the user's own wins)
        assert os.environ[TASK_THREADS_ENV] == str(max(1, (os.cpu_count() or 1) // 2))


def test_stages_waited_for_together_share_the_room_taking_turns(tiny_checkpoints, tmp_path, monkeypatch):
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus", *FOUR_SHARDS, "executor.kind=local",
                   "executor.local_parallelism=3", "executor.stages.samples.shards_per_task=2")
    driver = Driver(run)
    submitted = []

    def submit(iteration, stage, groups):
        for group in groups:
            job = object()
            for t in group:
                t.job, t.state = job, "pending"
            submitted.append((stage, [t.task.shard for t in group]))

    monkeypatch.setattr(driver, "_submit", submit)
    runs = [StageRun(1, stage, "", tracked, list(tracked), run.config.resources(stage).shards_per_task)
            for stage in ("questions", "samples")
            for tracked in [[Tracked(StageTask(str(run.path), 1, stage, s)) for s in range(4)]]]
    driver._fill(runs, 3)
    # one task per stage in turn until 3 run: questions 1 shard per task, samples 2
    assert submitted == [("questions", [0]), ("questions", [1]), ("samples", [0, 1])]
    assert [r.in_flight() for r in runs] == [2, 1]
    driver._fill(runs, 3)  # no room: nothing more
    assert len(submitted) == 3
    runs[1].tracked[0].state = runs[1].tracked[1].state = "done"  # the samples task ended: room for one
    driver._fill(runs, 3)
    assert submitted[3:] == [("questions", [2])]


@pytest.mark.slow
def test_a_failing_questions_task_is_reported_while_samples_runs(tiny_checkpoints, tmp_path):
    empty = tmp_path / "no_model"
    empty.mkdir()  # a judge checkpoint directory with nothing in it: the questions task fails loading it
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus", "executor.kind=local", "executor.local_parallelism=2",
                   "executor.retries=0", f"feedback.judge_path={empty}", "prompts.count=16",
                   "sharding.prompts_per_shard=8", "executor.stages.samples.shards_per_task=2",
                   "sampling.samples_per_prompt=48", "sampling.batch_size=8", *FAST)  # samples: long (killed below)
    for s in range(2):
        run_task(StageTask(str(run.path), 1, "prompts", s))
    try:
        with pytest.raises(DriverError) as err:
            Driver(run).run_stages(1, ("questions", "samples"))
        samples_done = [S.is_complete(run.shard_path(1, "samples", s)) for s in range(2)]
        msg = str(err.value)
        assert "iter_01/questions/shard_0000" in msg and "failed after 1 attempt(s)" in msg
        assert not all(samples_done), "samples finished before the failure was reported"
        book = JobBook.load(run).entries
        assert book["iter_01/samples/00000"]["state"] in ("pending", "running")
    finally:  # the samples task this test started (through the driver) goes on without a driver: stop it
        for key in ("iter_01/samples/00000",):
            pid = json.loads((run.path / "jobs.json").read_text())[key]["job_id"]
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_two_stages_share_one_live_line(tiny_checkpoints, tmp_path, monkeypatch):
    import io

    from silmm.progress import LiveStatus

    class TTY(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("COLUMNS", "300")  # the line is cut at the terminal's width
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus")
    driver = Driver(run, status_stream=TTY())
    driver._progress_view = LiveStatus(driver.status_stream)
    runs = []
    for stage, states in (("questions", ("done", "running")), ("samples", ("pending", "missing"))):
        tracked = [Tracked(StageTask(str(run.path), 1, stage, s), state=st) for s, st in enumerate(states)]
        runs.append(StageRun(1, stage, "", tracked, [], 1))
    driver._status(runs)
    line = driver.status_stream.getvalue().split("\r")[-1]
    assert line.startswith("iter 1 questions: 1/2 tasks done; tasks 1/2 done, 1 running, 0 pending | "
                           "samples: 0/2 tasks done; tasks 0/2 done, 0 running, 2 pending; ")


# ----------------------------------------------------------------------------------------- sbatch
def test_sbatch_arrays_cover_the_shards_per_task_and_run_questions_beside_samples(tiny_checkpoints, tmp_path):
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus", "prompts.count=10", "sharding.prompts_per_shard=2",
                   "executor.stages.samples.shards_per_task=2", "executor.max_array_size=2")
    # 5 shards, 2 per task: 3 tasks, in arrays of at most 2 (the second starts at shard 4)
    assert _array_jobs("samples", 5, 0, 2, 8, per_task=2) == [("samples_0", 0, 2, 4), ("samples_1", 4, 1, 4)]
    assert _array_jobs("x", 7, 1, 1000, 8, per_task=3) == [("x", 1, 2, 8)]  # shards 1-3 and 4-6
    lines = [ln for ln in sbatch_iteration(run, 1, SlurmLimits()).splitlines() if "sbatch" in ln and "#" not in ln[:1]]
    samples = [ln for ln in lines if "-samples-1 " in ln]
    assert len(samples) == 2 and "--array=0-1%" in samples[0] and "--array=0-0%" in samples[1]
    assert "--export=ALL,SILMM_SHARDS_PER_TASK=2 " in samples[0]
    assert "--export=ALL,SILMM_SHARD_OFFSET=4,SILMM_SHARDS_PER_TASK=2 " in samples[1]
    questions = [ln for ln in lines if "-questions-1 " in ln]
    assert len(questions) == 3 and "SILMM_SHARDS_PER_TASK" not in " ".join(questions)  # one shard per task
    prompts_dep = "--dependency=afterok:$prompts_0:$prompts_1:$prompts_2 "
    assert prompts_dep in questions[0] and prompts_dep in samples[0]  # both wait for the prompts only
    scores = next(ln for ln in lines if "-scores-1 " in ln)
    assert "--dependency=afterok:$questions_0:$questions_1:$questions_2:$samples_0:$samples_1 " in scores


def test_stage_script_runs_the_shard_range_of_its_array_index(tiny_checkpoints, tmp_path):
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus", "prompts.count=9")  # 3 shards of 3

    def stage_sh(index: int) -> subprocess.CompletedProcess:
        env = _env(SLURM_ARRAY_TASK_ID=str(index), SILMM_SHARDS_PER_TASK="2")
        env.pop("SILMM_SHARD_OFFSET", None)
        return subprocess.run(["bash", str(SCRIPTS / "stage.sh"), str(run.path), "1", "prompts"], env=env,
                              capture_output=True, text=True, timeout=120)

    first = stage_sh(0)  # shards 0-1 in one process
    assert first.returncode == 0, first.stderr
    assert [S.is_complete(run.shard_path(1, "prompts", s)) for s in range(3)] == [True, True, False]
    assert re.search(r"start on .*shard_00000\.h5", first.stderr) and "shard_00001.h5" in first.stderr
    last = stage_sh(1)  # shards 2-3, of which only 2 exists
    assert last.returncode == 0, last.stderr
    assert S.is_complete(run.shard_path(1, "prompts", 2)) and not run.shard_path(1, "prompts", 3).exists()
    past = stage_sh(2)
    assert past.returncode == 0 and "shard 4 of prompts (iteration 1) is out of range" in past.stdout
    bad = subprocess.run(["bash", str(SCRIPTS / "stage.sh"), str(run.path), "1", "prompts"], capture_output=True,
                         text=True, env=_env(SLURM_ARRAY_TASK_ID="0", SILMM_SHARDS_PER_TASK="two"), timeout=60)
    assert bad.returncode == 2 and "SILMM_SHARDS_PER_TASK=two: expected a whole number >= 1" in bad.stderr
