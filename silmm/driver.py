"""The iteration driver: looks at what is on disk, submits only what is missing, waits, retries, reports.

For each iteration: prompts -> questions and samples (side by side where tasks run at once) -> scores, each an
array over its shards (`shards_per_task` shards per array task, the model loaded once per task) -> pairs -> train; with
`eval.after_each_iteration`, benchmark evaluation (eval shards, then eval_results) of the base model before
iteration 1 and of each iteration's model after it (`silmm eval` runs the same by hand).
Re-running the same command resumes exactly where things stand on disk; a finished shard is never
redone. One driver per run, enforced by a lock file (a stale lock of a dead process is reported and
taken over). The driver writes `<run>/jobs.json` (what it submitted and their states) for `silmm status`
and `silmm cancel`. A driver that starts on a run with recorded jobs adopts those Slurm (or this host)
still runs or queues instead of submitting their shards again; each task holds its output's lease
(silmm/lease.py), so even a duplicate writer only waits. A detached driver (`--detach`) is itself a Slurm
job, recorded in `<run>/driver_job.json`; it logs to `<run>/logs/driver.log`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from silmm import lease as L
from silmm.config import DRIVER_TIME_CAP_MIN, ExecutorKind, PromptSource
from silmm.executors import (
    TASK_THREADS_ENV,
    array_chunks,
    local_threads,
    make_executor,
    parallelism,
    stages_side_by_side,
)
from silmm.fsutil import atomic_write_text
from silmm.gc import after_iteration as gc_after_iteration
from silmm.models import ensure_base_model
from silmm.progress import LiveStatus, record_path
from silmm.rundir import SHARD_STAGES, RunDir
from silmm.store import ShardError
from silmm.tasks import ShardGroup, StageTask, log_path, model_problem, settle

log = logging.getLogger(__name__)

STAGE_ORDER = (*SHARD_STAGES, "pairs", "train")
_USER_OMP_THREADS = os.environ.get("OMP_NUM_THREADS")  # as set before any driver changed it


_GROUP_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextmanager
def _without_process_group_env() -> Iterator[None]:
    """Local jobs inherit this process's environment when they start, Slurm jobs when sbatch exports it. If
    this process joined a process group itself (a debug-executor train, or a test), its RANK/WORLD_SIZE would
    make a two-task Slurm train job two world-size-1 jobs, and its MASTER_PORT send every local train job to
    a port this process still holds (EADDRINUSE). The driver is not a rank: its jobs start without those
    variables, and this process gets them back (its own group still needs them)."""
    joined = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    saved = {k: os.environ.pop(k) for k in _GROUP_ENV if joined and k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


class DriverError(RuntimeError):
    """A task failed for good, or the run is locked; the message is the report for the user."""


# ------------------------------------------------------------------------------------------- lock
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def driver_lock(run: RunDir, break_lock: bool = False) -> Iterator[None]:
    """Exclusive per run. A lock left by a dead process on this host is reported and replaced; one
    from another host cannot be checked, so it is refused unless `break_lock`."""
    path = run.path / "driver.lock"
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                other = json.loads(path.read_text())
            except (OSError, ValueError):
                other = {}
            same_host = other.get("host") == me["host"]
            if break_lock or (same_host and not _alive(int(other.get("pid", -1)))):
                log.warning("removing stale driver lock %s (pid %s on %s since %s)", path, other.get("pid"),
                            other.get("host"), other.get("since"))
                path.unlink(missing_ok=True)
                continue
            where = "" if same_host else " (on another host: if it is dead, re-run with --break-lock)"
            raise DriverError(f"{path}: another driver is running on this run: pid {other.get('pid')} on "
                              f"{other.get('host')} since {other.get('since')}{where}") from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------- cancel request, detached driver job
def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def request_cancel(run: RunDir) -> None:
    """`silmm cancel` leaves this before it signals the driver, so the driver knows the SIGTERM is a cancel."""
    atomic_write_text(run.path / "cancel.json", json.dumps({"host": socket.gethostname(), "since": _now()}) + "\n")


def cancel_requested(run: RunDir) -> str | None:
    """'silmm cancel on HOST at TIME' while a cancel is asked for, else None."""
    try:
        info = json.loads((run.path / "cancel.json").read_text())
    except (OSError, ValueError):
        return None
    return f"silmm cancel on {info.get('host')} at {info.get('since')}"


def clear_cancel(run: RunDir) -> None:
    """A new driver starts: an earlier cancel is over."""
    (run.path / "cancel.json").unlink(missing_ok=True)


def driver_job_path(run: RunDir) -> Path:
    return run.path / "driver_job.json"


def record_driver_job(run: RunDir, job_id: str, **info: Any) -> None:
    """The detached driver's Slurm job, for `silmm status` and `silmm cancel` (which scancels it)."""
    old = read_driver_job(run) or {}
    atomic_write_text(driver_job_path(run), json.dumps({**old, "job_id": str(job_id), **info}, indent=1) + "\n")


def read_driver_job(run: RunDir) -> dict[str, Any] | None:
    try:
        return json.loads(driver_job_path(run).read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------ job tracking
@dataclass
class Tracked:
    task: StageTask
    job: Any = None
    attempts: int = 0
    state: str = "missing"  # missing | pending | running | done | failed
    error: str = ""


@dataclass
class JobBook:
    """What the driver submitted, persisted to jobs.json for `silmm status` and `silmm cancel`."""

    run: RunDir
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    @staticmethod
    def key(task: StageTask) -> str:
        bench = f"{task.benchmark}/" if task.benchmark else ""
        return f"iter_{task.iteration:02d}/{task.stage}/{bench}{task.shard:05d}"

    def record(self, t: Tracked) -> None:
        job_id = getattr(t.job, "job_id", None)
        kind = getattr(t.job, "kind", None) or self.run.config.executor.kind.value
        entry = {"job_id": job_id, "state": t.state, "attempts": t.attempts, "kind": kind, "host": socket.gethostname(),
                 "updated": time.time(), "log": str(log_path(self.run, t.task)), "error": t.error[-2000:]}
        if kind == "local" and str(job_id).isdigit():  # a pid names a process only together with its start time
            old = self.entries.get(self.key(t.task), {})
            entry["pid_start"] = (getattr(t.job, "pid_start", None) or old.get("pid_start") if old.get("job_id") ==
                                  job_id else None) or L.process_start(int(job_id))
        self.entries[self.key(t.task)] = entry

    def mark(self, key: str, state: str, note: str = "") -> None:
        """Correct a recorded entry (a job that ended while no driver watched it; an output found done)."""
        entry = self.entries[key]
        entry.update(state=state, updated=time.time(), **({"note": note} if note else {}))

    def active(self) -> dict[str, dict[str, Any]]:
        """The entries recorded as submitted and not ended."""
        return {k: e for k, e in self.entries.items() if e.get("state") in ("pending", "running") and e.get("job_id")}

    def save(self) -> None:
        atomic_write_text(self.run.path / "jobs.json", json.dumps(self.entries, indent=1) + "\n")

    @classmethod
    def load(cls, run: RunDir) -> JobBook:
        path = run.path / "jobs.json"
        return cls(run, json.loads(path.read_text()) if path.is_file() else {})


def _job_state(job: Any) -> str:
    if job.done():
        return "finished"
    state = str(getattr(job, "state", "UNKNOWN")).upper()
    return "running" if state in ("RUNNING", "COMPLETING") else "pending" if state == "PENDING" else "running"


def _failure_text(t: Tracked) -> str:
    lines = []
    try:
        exc = t.job.exception()
        if exc is not None:
            last = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
            if last.startswith(f"{ShardError.__module__}.{ShardError.__name__}: "):
                return last.split(": ", 1)[1]  # names the file and what is wrong: the traceback adds nothing
            lines.append(last)
    except Exception as exc:  # the job died without a result (killed, OOM, cancelled)
        lines.append(f"{type(exc).__name__}: {str(exc).strip()[:500]}")
    stderr = getattr(getattr(t.job, "paths", None), "stderr", None)
    if stderr is not None and Path(stderr).is_file():
        tail = Path(stderr).read_text(errors="replace").strip().splitlines()[-15:]
        lines.append(f"last lines of {stderr}:\n    " + "\n    ".join(tail))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- adoption
class AdoptedLocalJob:
    """A local job of an earlier driver on this host: its process is not our child, so submitit cannot
    poll it; it is running while that process (pid and start time) lives. Results come from submitit's
    files as for any local job."""

    kind = "local"

    def __init__(self, folder: Path, job_id: str, pid_start: str | None):
        self._job = submitit.LocalJob(folder, job_id)
        self.job_id, self.pid_start, self.paths = job_id, pid_start, self._job.paths

    def done(self) -> bool:
        return not L.process_alive(int(self.job_id), self.pid_start)

    @property
    def state(self) -> str:
        return "FINISHED" if self.done() else "RUNNING"

    def result(self) -> Any:
        return self._job.result()

    def exception(self) -> Any:
        return self._job.exception()


class LeaseWait:
    """Stands for the writer that holds a task's lease (the task's own job found it held and exited): the
    driver waits for that holder as for its own job, then looks at the output again."""

    def __init__(self, lease_path: Path, holder: L.Holder, paths: Any = None):
        self.lease_path, self.holder, self.paths = lease_path, holder, paths
        self.kind = holder.job_kind or "local"
        self.job_id = holder.job_id or str(holder.pid)
        self.pid_start = holder.pid_start if not holder.job_id else None
        self._me = L.Holder.me("driver")

    def done(self) -> bool:
        now = L.read_holder(self.lease_path)
        return now != self.holder or L.gone_reason(self.holder, self._me) is not None

    @property
    def state(self) -> str:
        return "FINISHED" if self.done() else "RUNNING"

    def result(self) -> Any:
        return None

    def exception(self) -> Any:
        return None


def recorded_job_states(book: JobBook) -> dict[str, str]:
    """key -> the live state ("pending" | "running") of every recorded job Slurm or this host still runs or
    queues; the entries of jobs that ended while no driver watched them are corrected in the book."""
    active = book.active()
    slurm = L.slurm_states([str(e["job_id"]) for e in active.values() if e.get("kind") == "slurm"])
    here = socket.gethostname()
    live = {}
    for key, e in active.items():
        jid = str(e["job_id"])
        if e.get("kind") == "slurm":
            state = slurm.get(jid) or slurm.get(jid.split("_")[0])
            if state in L.SLURM_ACTIVE:
                live[key] = "running" if state in L.SLURM_RUNNING else "pending"
                continue
            book.mark(key, "ended", f"Slurm: {state or 'unknown to squeue and sacct'}")
        elif e.get("kind") == "local" and jid.isdigit() and e.get("host") == here and \
                L.process_alive(int(jid), e.get("pid_start")):
            live[key] = "running"
        else:  # a debug job lived in its driver's process; a local one on another host cannot be watched
            book.mark(key, "ended", "its process is gone")
    return live


def adopt(run: RunDir, t: Tracked, entry: dict[str, Any], state: str, jobs: dict[str, Any] | None = None) -> None:
    """Track a job an earlier driver submitted as if this driver had submitted it; ``jobs``: the job objects
    made so far by job id (the shards of one multi-shard task get the same one)."""
    from silmm.executors import submitit_folder

    folder = submitit_folder(run, t.task.iteration, t.task.stage)
    jid = str(entry["job_id"])
    jobs = {} if jobs is None else jobs
    if jid not in jobs:
        jobs[jid] = submitit.SlurmJob(folder, jid) if entry["kind"] == "slurm" else \
            AdoptedLocalJob(folder, jid, entry.get("pid_start"))
    t.job = jobs[jid]
    t.state, t.attempts = state, int(entry.get("attempts", 1))


def _held_result(t: Tracked) -> dict[str, Any] | None:
    """The result of a task that found its output leased by another writer (tasks.run_task), else None; for a
    shard of a multi-shard task (tasks.run_group), that shard's result."""
    try:
        result = t.job.result()
    except Exception:
        return None
    if isinstance(result, dict) and isinstance(result.get("shards"), dict):
        result = result["shards"].get(t.task.shard)
    return result if isinstance(result, dict) and "held_by" in result else None


def _task_of(group: list[Tracked]) -> StageTask | ShardGroup:
    """What one array task runs for these shards: the shard's StageTask, or a ShardGroup of several."""
    if len(group) == 1:
        return group[0].task
    first = group[0].task
    return ShardGroup(first.run_dir, first.iteration, first.stage, tuple(t.task.shard for t in group), first.benchmark)


@dataclass
class StageRun:
    """One stage's shards the driver waits for (Driver._start, Driver._wait)."""

    iteration: int
    stage: str
    benchmark: str
    tracked: list[Tracked]
    queue: list[Tracked]  # shards to submit, in order
    per_task: int  # shards per array task (executor.*.shards_per_task)
    t0: float = field(default_factory=time.time)

    @property
    def label(self) -> str:
        return f"{self.stage} {self.benchmark}" if self.benchmark else self.stage

    def in_flight(self) -> int:
        """Tasks submitted and not ended: a task of several shards counts once."""
        return len({id(t.job) for t in self.tracked if t.state in ("pending", "running")})

    def take(self) -> list[Tracked]:
        """The next task's shards, out of the queue."""
        group, self.queue = self.queue[:self.per_task], self.queue[self.per_task:]
        return group


# ------------------------------------------------------------------------------------------ stages
class Driver:
    def __init__(self, run: RunDir, status_stream=sys.stderr):
        self.run = run
        self.cfg = run.config
        clear_cancel(run)  # a driver starts: an earlier `silmm cancel` is over
        self.book = JobBook.load(run)
        self._live = recorded_job_states(self.book)  # recorded jobs still running or queued: adopted, not resubmitted
        if self.book.entries:  # corrected entries; a run nothing was submitted for gets no jobs.json yet
            self.book.save()
        self.status_stream = status_stream
        self._stop = False
        self.detached = False  # a detached driver ignores a bare SIGTERM (preemption): see request_stop
        self._user_threads = _USER_OMP_THREADS is not None  # the user's own setting wins

    # the public story --------------------------------------------------------------------------
    def run_all(self) -> None:
        toy = self.cfg.toy.enabled
        if toy:  # the toy LMM is pretrained once (cached at model.path)
            self._run_tasks(0, "pretrain", [0])
        ensure_base_model(self.cfg)  # once, before any task could race to build it
        self.evaluate(0)  # the base model, before any training
        for iteration in range(1, self.cfg.run.iterations + 1):
            if self._finished(iteration):
                # nothing reads a finished iteration's shards again: verifying them (hundreds of GB at paper
                # scale) at every restart would cost the driver hours; `silmm verify` checks them
                log.info("iter %d: finished earlier, its model %s verified", iteration, self.run.model_dir(iteration))
            else:
                for stages in self.stage_steps():
                    self.run_stages(iteration, stages)
            self.evaluate(iteration)
            self._mark_done(iteration)
            gc_after_iteration(self.run, iteration)  # store.gc_after_iteration: what no later stage reads
        if toy:
            log.info("toy report: %s", self.run.path / "report" / "report.md")
        log.info("run %s: all %d iteration(s) done; final model in %s", self.run.path, self.cfg.run.iterations,
                 self.run.model_dir(self.cfg.run.iterations))

    def stage_steps(self) -> list[tuple[str, ...]]:
        """An iteration's stages in order. Questions and samples both read only the prompts: they run side by
        side where tasks can run at once (Slurm; the local executor with local_parallelism > 1, sharing it),
        one after the other in-process (debug) or when one local task runs at a time."""
        if stages_side_by_side(self.cfg.executor):
            return [("prompts",), ("questions", "samples"), ("scores",), ("pairs",), ("train",)]
        return [(stage,) for stage in STAGE_ORDER]

    def run_stages(self, iteration: int, stages: tuple[str, ...]) -> None:
        """Stages that depend on none of each other, waited for together (a failure in any stops the wait)."""
        if len(stages) == 1:
            self.run_stage(iteration, stages[0])
            return
        assert "prompts" not in stages, "the prompts stage decides the shard count: it runs on its own"
        runs = [self._start(iteration, stage, list(range(self.run.num_shards(iteration)))) for stage in stages]
        runs = [r for r in runs if r is not None]
        if runs:
            self._wait(runs)

    def run_stage(self, iteration: int, stage: str) -> None:
        if stage == "prompts" and self.cfg.prompts.source is PromptSource.files:
            from silmm.models import load_tokenizer
            from silmm.prompts import select_file_prompts, token_counter

            # prompt files edited under the run, or giving no prompt: stop here, before any job is submitted
            select_file_prompts(self.cfg.prompts, self.cfg.run.seed, iteration,
                                token_counter(load_tokenizer(self.run, iteration)))
            self._run_tasks(iteration, stage, [0])  # the files decide how many shards there are
        shards = list(range(self.run.num_shards(iteration))) if stage in SHARD_STAGES else [0]
        self._run_tasks(iteration, stage, shards)

    def evaluate(self, iteration: int) -> None:
        """The model iteration K ends with (0: the base model): the configured benchmarks when
        eval.after_each_iteration is set, then the toy evaluation, whose report reads their results."""
        if self.cfg.eval.after_each_iteration and self.cfg.eval.benchmarks:
            self.run_eval(iteration)
        if self.cfg.toy.enabled:
            self._run_tasks(iteration, "evaluate", [0])

    def run_eval(self, iteration: int, benchmarks: list[str] | None = None) -> None:
        """Benchmark evaluation of the model iteration K ends with (0: the base model): for each benchmark
        the missing eval shards (an array), then its results step (aggregate, export, results.json)."""
        from silmm.eval import stage as E

        problem = model_problem(self.run.model_dir(iteration)) if iteration > 0 else None
        if problem:
            raise DriverError(f"iteration {iteration} has no finished model ({problem}): train it first (silmm run)")
        for name in benchmarks if benchmarks is not None else list(self.cfg.eval.benchmarks):
            shards = list(range(E.plan(self.run, iteration, name).shard_count))
            self._run_tasks(iteration, "eval", shards, benchmark=name)
            self._run_tasks(iteration, "eval_results", [0], benchmark=name)

    # submission, polling, retries ---------------------------------------------------------------
    def _run_tasks(self, iteration: int, stage: str, shards: list[int], benchmark: str = "") -> None:
        run = self._start(iteration, stage, shards, benchmark)
        if run is not None:
            self._wait([run])

    def _start(self, iteration: int, stage: str, shards: list[int], benchmark: str = "") -> StageRun | None:
        """A stage's shards to wait for: recorded jobs still running adopted, the shards not done queued; None
        when every shard is done."""
        tracked = [Tracked(StageTask(str(self.run.path), iteration, stage, s, benchmark)) for s in shards]
        adopted = self._adopt(tracked)
        # a damaged output is moved aside; an adopted job's output is its writer's until the job ends
        todo = [t for t in tracked if t not in adopted and not settle(self.run, t.task)]
        for t in tracked:
            if t not in adopted:
                t.state = "missing" if t in todo else "done"
            key = JobBook.key(t.task)
            if t.state == "done" and self.book.entries.get(key, {}).get("state") not in (None, "done"):
                self.book.mark(key, "done")  # finished while no driver watched it: jobs.json says so
        self.book.save()
        per_task = self.cfg.resources(stage).shards_per_task
        run = StageRun(iteration, stage, benchmark, tracked, list(todo), per_task)
        if not todo and not adopted:
            log.info("iter %d %s: all %d done", iteration, run.label, len(tracked))
            return None
        grouped = f" in tasks of {per_task} shards" if per_task > 1 and len(todo) > 1 else ""
        log.info("iter %d %s: %d of %d to run%s%s", iteration, run.label, len(todo) + len(adopted), len(tracked),
                 grouped, f" ({len(adopted)} adopted: still running from an earlier driver)" if adopted else "")
        return run

    def _wait(self, runs: list[StageRun]) -> None:
        """Submit the stages' queued shards as room allows, poll, retry, until every shard of every stage is
        done; a shard failed for good stops the wait with its report, whatever the other stages are doing.
        Stages waited for together share the executor's room (local_parallelism: one share of the cores each
        task), taking turns so that each of them progresses."""
        limit = min(parallelism(self.run, r.stage) for r in runs)
        active = list(runs)
        while active:
            self._fill(active, limit)
            for r in active:
                self._poll(r.tracked, r.queue)
            self._status(active)
            failed = [t for r in active for t in r.tracked if t.state == "failed"]
            if failed:
                self._report_failure(failed)
            for r in [r for r in active if all(t.state == "done" for t in r.tracked)]:
                self._end_status_line()
                log.info("iter %d %s: done in %.1f s", r.iteration, r.label, time.time() - r.t0)
                active.remove(r)
            if not active:
                break
            if self._stop or cancel_requested(self.run):  # a signal, or `silmm cancel` from any host
                raise DriverError(self._stop_message())
            waiting = any(isinstance(t.job, LeaseWait) and t.state == "running" for r in active for t in r.tracked)
            # debug tasks ran inside _submit: no need to wait, unless for another writer (no busy loop)
            time.sleep(self.cfg.executor.poll_interval_s if self.cfg.executor.kind is not ExecutorKind.debug
                       else 0.2 if waiting else 0)

    def _fill(self, runs: list[StageRun], limit: int) -> None:
        """Submit queued shards, grouped into tasks of each stage's shards_per_task, while fewer than ``limit``
        tasks are in flight, one task per stage in turn."""
        room = limit - sum(r.in_flight() for r in runs)
        groups: dict[int, list[list[Tracked]]] = {id(r): [] for r in runs}
        while room > 0 and any(r.queue for r in runs):
            for r in runs:
                if room > 0 and r.queue:
                    groups[id(r)].append(r.take())
                    room -= 1
        for r in runs:
            if groups[id(r)]:
                self._submit(r.iteration, r.stage, groups[id(r)])

    def _adopt(self, tracked: list[Tracked]) -> list[Tracked]:
        """Track the recorded jobs of these tasks that still run or queue (an earlier driver submitted them);
        the shards of one multi-shard job share one job object."""
        adopted = []
        jobs: dict[str, Any] = {}
        for t in tracked:
            key = JobBook.key(t.task)
            state = self._live.pop(key, None)
            if state is None:
                continue
            entry = self.book.entries[key]
            adopt(self.run, t, entry, state, jobs)
            self.book.record(t)
            adopted.append(t)
            log.info("%s: adopted %s job %s (%s), submitted by an earlier driver", t.task.name, entry["kind"],
                     entry["job_id"], state)
        return adopted

    def _submit(self, iteration: int, stage: str, groups: list[list[Tracked]]) -> None:
        """One task per group of shards (a StageTask for one shard, a ShardGroup for several), as arrays."""
        if self.cfg.executor.kind is ExecutorKind.local and not self._user_threads:
            # local tasks share this machine's cores (more torch threads than cores makes every task crawl);
            # each task reads its share when it starts (executors.set_task_threads)
            os.environ[TASK_THREADS_ENV] = str(local_threads(self.run, stage))
        executor = make_executor(self.run, iteration, stage)
        for chunk in array_chunks(executor, self.run, stage, groups):  # within the cluster's limits
            calls = [_task_of(group) for group in chunk]
            # local jobs inherit this environment when they start, Slurm jobs when sbatch exports it
            with _without_process_group_env() if self.cfg.executor.kind is not ExecutorKind.debug else nullcontext():
                if len(calls) == 1:
                    jobs = [executor.submit(calls[0])]
                else:
                    with executor.batch():
                        jobs = [executor.submit(c) for c in calls]
            for group, job in zip(chunk, jobs, strict=True):
                for t in group:
                    t.job, t.state, t.error = job, "pending", ""
                    t.attempts += 1
                    self.book.record(t)
                if self.cfg.executor.kind is ExecutorKind.debug:
                    try:  # debug jobs run in this process, when their result is asked for
                        job.result()
                    except Exception:
                        pass  # recorded by _poll: the output is not complete
            shards = sum(map(len, chunk))
            log.info("iter %d %s: submitted %d task(s)%s as %s", iteration, stage, len(chunk),
                     f" for {shards} shards" if shards > len(chunk) else "",
                     ", ".join(sorted({str(j.job_id).split("_")[0] for j in jobs})))
        self.book.save()

    def _poll(self, tracked: list[Tracked], queue: list[Tracked]) -> None:
        for t in tracked:
            if t.state not in ("pending", "running"):
                continue
            state = _job_state(t.job)
            if state != "finished":
                t.state = state
            elif settle(self.run, t.task):
                t.state = "done"
            elif isinstance(t.job, LeaseWait):  # the holder ended without finishing: the task runs again
                log.info("%s: the writer holding it (%s) ended; submitting it", t.task.name, t.job.holder.describe())
                t.state = "missing"
                queue.append(t)
            elif held := _held_result(t):
                # not a failure: another writer (a duplicate job, a job of an earlier driver) holds the output
                log.info("%s: its output is being written by %s; waiting for that writer", t.task.name,
                         held["held_by"])
                holder = L.read_holder(Path(held["lease"]))
                if holder is None:  # released meanwhile: look again at once
                    t.state = "missing"
                    queue.append(t)
                else:
                    t.job, t.state = LeaseWait(Path(held["lease"]), holder, getattr(t.job, "paths", None)), "running"
                t.attempts -= 1  # it did not run
            else:
                t.error = _failure_text(t)
                if t.attempts <= self.cfg.executor.retries:
                    log.warning("%s failed (attempt %d of %d), retrying:\n%s", t.task.name, t.attempts,
                                self.cfg.executor.retries + 1, t.error)
                    t.state = "missing"
                    queue.append(t)
                else:
                    t.state = "failed"
            self.book.record(t)
        self.book.save()

    def _report_failure(self, failed: list[Tracked]) -> None:
        self._end_status_line()
        parts = []
        for t in failed:
            stderr = getattr(getattr(t.job, "paths", None), "stderr", "")
            parts.append(f"{t.task.name}: failed after {t.attempts} attempt(s)\n  task log: "
                         f"{log_path(self.run, t.task)}\n  job output: {stderr}\n  {t.error}")
        raise DriverError("a task failed for good:\n" + "\n".join(parts))

    # status ------------------------------------------------------------------------------------
    _progress_view: LiveStatus | None = None  # the console view of the stage waited for, made on first use

    def _status_line(self, iteration: int, stage: str, tracked: list[Tracked], t0: float) -> None:
        """The stage's figures from its tasks' progress records (silmm.progress.LiveStatus): units done of
        total, rate, ETA and task counts, as a bar rewritten in place on a terminal, else a log line every
        30 s. Debug tasks run inside _submit, before this is called: their own log lines show progress."""
        if self._progress_view is None:
            self._progress_view = LiveStatus(self.status_stream)
        tasks = [(record_path(log_path(self.run, t.task)), t.state) for t in tracked]
        self._progress_view.update(f"iter {iteration} {stage}", tasks, t0)

    def _status(self, runs: list[StageRun]) -> None:
        """The live view of the stages waited for: one stage as _status_line, several side by side."""
        if len(runs) == 1:
            r = runs[0]
            self._status_line(r.iteration, r.label, r.tracked, r.t0)
            return
        if self._progress_view is None:
            self._progress_view = LiveStatus(self.status_stream)
        stages = [(r.label, [(record_path(log_path(self.run, t.task)), t.state) for t in r.tracked]) for r in runs]
        self._progress_view.update_stages(f"iter {runs[0].iteration}", stages, min(r.t0 for r in runs))

    def _end_status_line(self) -> None:
        if self._progress_view is not None:
            self._progress_view.end()

    def _finished(self, iteration: int) -> bool:
        """Marked done by an earlier driver, and its model is intact (else the iteration is resumed: the
        damaged model is moved aside and retrained from the iteration's verified shards)."""
        return f"iter_{iteration:02d}" in self.run.state().get("done", {}) and settle(
            self.run, StageTask(str(self.run.path), iteration, "train"))

    def _mark_done(self, iteration: int) -> None:
        state = self.run.state()
        state.setdefault("done", {})[f"iter_{iteration:02d}"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.run.write_state(state)

    def request_stop(self, *_: Any) -> None:
        """SIGTERM. A detached driver gets one before a preemption too (then USR2 requeues it, and its
        successor adopts the jobs): it stops only when `silmm cancel` asked for it."""
        if self.detached and not cancel_requested(self.run):
            log.warning("SIGTERM without `silmm cancel`: a preemption or a time limit; going on until requeued")
            return
        self._stop = True

    def _stop_message(self) -> str:
        asked = cancel_requested(self.run)
        if asked:
            return (f"driver stopped: the run was cancelled ({asked}); the next `silmm run` resumes it from "
                    f"what is on disk")
        return "driver stopped by a signal; submitted jobs keep running (silmm cancel RUN)"


def run_driver(run: RunDir, break_lock: bool = False, lock_held: bool = False, detached: bool = False) -> None:
    """The whole run under the run's lock (``lock_held``: the caller took it, before writing the config)."""
    with nullcontext() if lock_held else driver_lock(run, break_lock):
        driver = Driver(run)
        driver.detached = detached
        old = signal.signal(signal.SIGTERM, driver.request_stop)
        try:
            driver.run_all()
        finally:
            signal.signal(signal.SIGTERM, old)


def run_eval_driver(run: RunDir, iterations: list[int], benchmarks: list[str], break_lock: bool = False,
                    lock_held: bool = False) -> None:
    """`silmm eval`: the eval stage of the given iterations and benchmarks on an existing run, through the
    run's executor, submitting only what is missing (under the run's driver lock)."""
    with nullcontext() if lock_held else driver_lock(run, break_lock):
        driver = Driver(run)
        old = signal.signal(signal.SIGTERM, driver.request_stop)
        try:
            if 0 in iterations:
                try:
                    ensure_base_model(run.config)
                except FileNotFoundError as exc:  # a toy run whose LMM is not pretrained yet
                    raise DriverError(str(exc)) from exc
            for iteration in iterations:
                driver.run_eval(iteration, benchmarks)
        finally:
            signal.signal(signal.SIGTERM, old)


# ------------------------------------------------------------------------------------------ detach
@contextmanager
def driver_log(path: Path) -> Iterator[None]:
    """The detached driver logs what the foreground one prints (submissions, retries, times) to `path`, and
    to stderr (submitit's job log)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.FileHandler(path), logging.StreamHandler(sys.stderr)]
    root = logging.getLogger()
    saved = root.level
    root.setLevel(logging.INFO)
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    try:
        yield
    finally:
        root.setLevel(saved)
        for h in handlers:
            root.removeHandler(h)
            h.close()


@dataclass
class DetachedDriver(submitit.helpers.Checkpointable):
    """The driver as a small Slurm job that resubmits itself before its time limit."""

    config_path: str
    overrides: list[str]
    profiles: list[str] = field(default_factory=list)

    def __call__(self) -> str:
        from silmm import config as C

        cfg = C.load(self.config_path, self.overrides, self.profiles)
        run_path = RunDir.location(cfg)
        with driver_log(run_path / "logs" / "driver.log"):
            job = os.environ.get("SLURM_JOB_ID", "")
            log.info("detached driver: Slurm job %s (restart %s) on %s", job,
                     os.environ.get("SLURM_RESTART_COUNT", "0"), socket.gethostname())
            try:
                # the lock before the config is written; a requeued driver takes over its own predecessor's lock
                with driver_lock(RunDir.prepare(cfg), break_lock=True):
                    run = RunDir.create_or_open(cfg)
                    if job:
                        record_driver_job(run, job, host=socket.gethostname(), started=_now())
                    run_driver(run, lock_held=True, detached=True)
            except DriverError as exc:
                log.error("%s", exc)
                if cancel_requested(RunDir.open(run_path)):  # an accurate last line, not a traceback
                    return f"silmm driver cancelled: {exc}"
                raise
            log.info("detached driver: run %s finished", run_path)
        return str(run.path)


def submit_detached(run: RunDir, config_path: str, overrides: list[str], profiles: list[str] = ()) -> str:
    """The driver as a Slurm job with `executor.stages.driver`'s resources (its time capped at a day: it
    resubmits itself); its job id goes to driver_job.json for `silmm status` and `silmm cancel`."""
    from silmm.executors import slurm_parameters

    res = run.config.resources("driver")
    ex = submitit.SlurmExecutor(folder=run.logs_dir / "submitit" / "driver")
    params = slurm_parameters(res, f"silmm-driver-{run.config.run.name}", run.config.executor.signal_delay_s)
    params.pop("gpus_per_node", None)  # one process that computes nothing
    params.pop("array_parallelism", None)
    params.update(nodes=1, ntasks_per_node=1, time=min(res.time_min, DRIVER_TIME_CAP_MIN))
    ex.update_parameters(**params)
    with _without_process_group_env():  # sbatch exports this environment to the driver, and it to its jobs
        job = ex.submit(DetachedDriver(str(Path(config_path).resolve()), list(overrides),
                                       [str(Path(p).resolve()) for p in profiles]))
    record_driver_job(run, str(job.job_id), submitted=_now(), log=str(run.logs_dir / "driver.log"),
                      cpus=res.cpus_per_task, mem_gb=res.mem_gb, time_min=params["time"])
    return str(job.job_id)
