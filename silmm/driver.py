"""The iteration driver: looks at what is on disk, submits only what is missing, waits, retries, reports.

For each iteration: prompts -> questions -> samples -> scores (arrays over shards) -> pairs -> train; with
`eval.after_each_iteration`, benchmark evaluation (eval shards, then eval_results) of the base model before
iteration 1 and of each iteration's model after it (`silmm eval` runs the same by hand).
Re-running the same command resumes exactly where things stand on disk; a finished shard is never
redone. One driver per run, enforced by a lock file (a stale lock of a dead process is reported and
taken over). The driver writes `<run>/jobs.json` (what it submitted and their states) for `silmm status`.
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

from silmm.config import DRIVER_TIME_CAP_MIN, ExecutorKind, PromptSource
from silmm.executors import make_executor, parallelism, split_arrays
from silmm.fsutil import atomic_write_text
from silmm.models import ensure_base_model
from silmm.rundir import SHARD_STAGES, RunDir
from silmm.store import ShardError
from silmm.tasks import StageTask, log_path, model_problem, settle

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

    def record(self, t: Tracked) -> None:
        bench = f"{t.task.benchmark}/" if t.task.benchmark else ""
        key = f"iter_{t.task.iteration:02d}/{t.task.stage}/{bench}{t.task.shard:05d}"
        self.entries[key] = {"job_id": getattr(t.job, "job_id", None), "state": t.state, "attempts": t.attempts,
                             "kind": self.run.config.executor.kind.value, "updated": time.time(),
                             "log": str(log_path(self.run, t.task)), "error": t.error[-2000:]}

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


# ------------------------------------------------------------------------------------------ stages
class Driver:
    def __init__(self, run: RunDir, status_stream=sys.stderr):
        self.run = run
        self.cfg = run.config
        self.book = JobBook.load(run)
        self.status_stream = status_stream
        self._stop = False
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
                for stage in STAGE_ORDER:
                    self.run_stage(iteration, stage)
            self.evaluate(iteration)
            self._mark_done(iteration)
        if toy:
            log.info("toy report: %s", self.run.path / "report" / "report.md")
        log.info("run %s: all %d iteration(s) done; final model in %s", self.run.path, self.cfg.run.iterations,
                 self.run.model_dir(self.cfg.run.iterations))

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
        tracked = [Tracked(StageTask(str(self.run.path), iteration, stage, s, benchmark)) for s in shards]
        todo = [t for t in tracked if not settle(self.run, t.task)]  # a damaged output is moved aside
        for t in tracked:
            t.state = "missing" if t in todo else "done"
        stage_label = f"{stage} {benchmark}" if benchmark else stage
        if not todo:
            log.info("iter %d %s: all %d done", iteration, stage_label, len(tracked))
            return
        log.info("iter %d %s: %d of %d to run", iteration, stage_label, len(todo), len(tracked))
        queue = list(todo)
        limit = parallelism(self.run, stage)
        t0 = time.time()
        while True:
            running = [t for t in tracked if t.state in ("pending", "running")]
            room = limit - len(running)
            if queue and room > 0:
                batch, queue = queue[:room], queue[room:]
                self._submit(iteration, stage, batch, at_once=len(running) + len(batch))
            self._poll(tracked, queue)
            self._status_line(iteration, stage_label, tracked, t0)
            failed = [t for t in tracked if t.state == "failed"]
            if failed:
                self._report_failure(failed)
            if all(t.state == "done" for t in tracked):
                break
            if self._stop:
                raise DriverError("driver stopped by a signal; submitted jobs keep running (silmm cancel RUN)")
            time.sleep(self.cfg.executor.poll_interval_s if self.cfg.executor.kind is not ExecutorKind.debug else 0)
        self._end_status_line()
        log.info("iter %d %s: done in %.1f s", iteration, stage_label, time.time() - t0)

    def _submit(self, iteration: int, stage: str, batch: list[Tracked], at_once: int = 1) -> None:
        if self.cfg.executor.kind is ExecutorKind.local:
            if not self._user_threads:
                # local tasks share this machine's cores; more torch threads than cores makes every task crawl
                os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(at_once, 1)))
        executor = make_executor(self.run, iteration, stage)
        for chunk in split_arrays(batch, self.cfg.executor.max_array_size):
            # local jobs inherit this environment when they start, Slurm jobs when sbatch exports it
            with _without_process_group_env() if self.cfg.executor.kind is not ExecutorKind.debug else nullcontext():
                if len(chunk) == 1:
                    jobs = [executor.submit(chunk[0].task)]
                else:
                    with executor.batch():
                        jobs = [executor.submit(t.task) for t in chunk]
            for t, job in zip(chunk, jobs, strict=True):
                t.job, t.state, t.error = job, "pending", ""
                t.attempts += 1
                self.book.record(t)
                if self.cfg.executor.kind is ExecutorKind.debug:
                    try:  # debug jobs run in this process, when their result is asked for
                        job.result()
                    except Exception:
                        pass  # recorded by _poll: the output is not complete
            log.info("iter %d %s: submitted %d task(s) as %s", iteration, stage, len(chunk),
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
    def _status_line(self, iteration: int, stage: str, tracked: list[Tracked], t0: float) -> None:
        counts = {s: sum(t.state == s for t in tracked) for s in ("done", "running", "pending", "missing", "failed")}
        text = (f"iter {iteration} {stage:9s} done {counts['done']}/{len(tracked)}  running {counts['running']}  "
                f"pending {counts['pending'] + counts['missing']}  failed {counts['failed']}  "
                f"{time.time() - t0:6.0f}s")
        if self.status_stream.isatty():
            self.status_stream.write("\r" + text)
            self.status_stream.flush()
        else:
            log.debug(text)

    def _end_status_line(self) -> None:
        if self.status_stream.isatty():
            self.status_stream.write("\n")

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
        self._stop = True


def run_driver(run: RunDir, break_lock: bool = False, lock_held: bool = False) -> None:
    """The whole run under the run's lock (``lock_held``: the caller took it, before writing the config)."""
    driver = Driver(run)
    with nullcontext() if lock_held else driver_lock(run, break_lock):
        old = signal.signal(signal.SIGTERM, driver.request_stop)
        try:
            driver.run_all()
        finally:
            signal.signal(signal.SIGTERM, old)


def run_eval_driver(run: RunDir, iterations: list[int], benchmarks: list[str], break_lock: bool = False,
                    lock_held: bool = False) -> None:
    """`silmm eval`: the eval stage of the given iterations and benchmarks on an existing run, through the
    run's executor, submitting only what is missing (under the run's driver lock)."""
    driver = Driver(run)
    with nullcontext() if lock_held else driver_lock(run, break_lock):
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
@dataclass
class DetachedDriver(submitit.helpers.Checkpointable):
    """The driver as a small Slurm job that resubmits itself before its time limit."""

    config_path: str
    overrides: list[str]
    profiles: list[str] = field(default_factory=list)

    def __call__(self) -> str:
        from silmm import config as C

        cfg = C.load(self.config_path, self.overrides, self.profiles)
        # the lock before the config is written; a requeued driver takes over its own predecessor's lock
        with driver_lock(RunDir.prepare(cfg), break_lock=True):
            run = RunDir.create_or_open(cfg)
            run_driver(run, lock_held=True)
        return str(run.path)


def submit_detached(run: RunDir, config_path: str, overrides: list[str], profiles: list[str] = ()) -> str:
    res = run.config.resources("driver")
    ex = submitit.AutoExecutor(folder=run.logs_dir / "submitit" / "driver", cluster="slurm")
    ex.update_parameters(timeout_min=min(res.time_min, DRIVER_TIME_CAP_MIN), slurm_partition=res.partition,
                         slurm_account=res.account, slurm_qos=res.qos, cpus_per_task=1, mem_gb=2,
                         slurm_job_name=f"silmm-driver-{run.config.run.name}", slurm_setup=list(res.setup),
                         slurm_signal_delay_s=run.config.executor.signal_delay_s)
    with _without_process_group_env():  # sbatch exports this environment to the driver, and it to its jobs
        job = ex.submit(DetachedDriver(str(Path(config_path).resolve()), list(overrides),
                                       [str(Path(p).resolve()) for p in profiles]))
    return str(job.job_id)
