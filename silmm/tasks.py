"""A stage task: one shard of one stage of one iteration (the datatrove executor shape), or a group of them.

`StageTask` is what submitit pickles and runs: paths and small values only, never models. A task that
finds its output complete does nothing; otherwise it logs to its own file, runs the stage's job
function (`jobs.<stage>.run`), and writes its stats as JSON beside the log. It is checkpointable: on
preemption or time-out (USR2) submitit calls :meth:`StageTask.checkpoint`, which flushes the shard's
progress, and the requeued task resumes from it. A `ShardGroup` (`shards_per_task` > 1) runs several shards'
tasks in one process, one after another, and loads their model once.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import submitit
from tqdm import tqdm

from silmm import lease
from silmm.eval.results import eval_dir, is_current, results_path
from silmm.executors import set_task_threads
from silmm.fsutil import atomic_write_text, manifest_problem
from silmm.progress import BAR_FORMAT, recording, task_recorder
from silmm.rundir import MODEL_DONE, SHARD_STAGES, RunDir
from silmm.store import (
    Shard,
    ShardMeta,
    ShardWriter,
    StoreOptions,
    indexed_samples,
    quarantine,
    read_shard,
    validate_shard,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# the writer of the task running in this process, flushed by checkpoint() on preemption
_active_writer: ShardWriter | None = None


@dataclass
class StageTask(submitit.helpers.Checkpointable):
    run_dir: str
    iteration: int
    stage: str
    shard: int = 0
    benchmark: str = ""  # eval, eval_results: the benchmark evaluated ("" for every other stage)

    def __call__(self) -> dict[str, Any]:
        return run_task(self)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        _flush_active_writer()
        return super().checkpoint(*args, **kwargs)

    @property
    def name(self) -> str:
        bench = f"/{self.benchmark}" if self.benchmark else ""
        return f"iter_{self.iteration:02d}/{self.stage}{bench}/shard_{self.shard:05d}"


class ShardsFailed(RuntimeError):
    """Several shards of one ShardGroup failed; the message names each shard and its error (one line)."""


@dataclass
class ShardGroup(submitit.helpers.Checkpointable):
    """Several shards of one stage as one task (`shards_per_task`): each shard runs as its own StageTask would
    (its lease, skip when done, resume from its progress, its log, stats and progress record), in order, and
    the model is loaded once for all of them (models.shared_models). A shard that is done, or whose output
    another writer holds, is passed over; a shard that fails does not stop the others: the group raises once
    all were tried (the error itself when one shard failed, ShardsFailed naming each when several did), so
    the driver retries only the shards not done. On preemption it flushes the shard in progress and is
    requeued whole: the shards done by then are skipped."""

    run_dir: str
    iteration: int
    stage: str
    shards: tuple[int, ...]
    benchmark: str = ""

    def tasks(self) -> list[StageTask]:
        return [StageTask(self.run_dir, self.iteration, self.stage, s, self.benchmark) for s in self.shards]

    def __call__(self) -> dict[str, Any]:
        return run_group(self)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        _flush_active_writer()
        return super().checkpoint(*args, **kwargs)

    @property
    def name(self) -> str:
        tasks = self.tasks()
        return f"{tasks[0].name}..{tasks[-1].shard:05d}" if len(tasks) > 1 else tasks[0].name


def run_group(group: ShardGroup) -> dict[str, Any]:
    """The shards of ``group`` one after another, models shared; their results by shard index."""
    global _active_writer
    from silmm.models import shared_models

    results: dict[int, dict[str, Any]] = {}
    errors: list[tuple[StageTask, Exception]] = []
    with shared_models():
        for task in group.tasks():
            try:
                results[task.shard] = run_task(task)
            except Exception as exc:  # reported below, after the other shards had their turn
                log.error("%s failed, going on with the group's next shard: %s: %s", task.name, type(exc).__name__,
                          exc, exc_info=True)
                errors.append((task, exc))
            finally:  # its lease is released: a preemption from now on must not flush its writer
                _active_writer = None
    if len(errors) == 1:
        raise errors[0][1]
    if errors:
        raise ShardsFailed(f"{len(errors)} of {len(group.shards)} shards failed: " + "; ".join(
            f"{t.name}: {type(e).__name__}: {' '.join(str(e).split())}" for t, e in errors))
    return {"task": group.name, "shards": results}


def _flush_active_writer() -> None:
    writer = _active_writer
    if writer is not None and not writer.flushing:
        writer.flush()  # keep what is computed; the requeued task resumes after it
        log.warning("preempted: flushed progress of %s (%d prompts done)", writer.path, len(writer.done))


def output_path(run: RunDir, task: StageTask) -> Path:
    if task.stage == "pretrain":
        return Path(run.config.model.path) / "pretrain.json"
    if task.stage == "evaluate":
        return run.path / "eval" / f"iter_{task.iteration:02d}.json"
    if task.stage == "pairs":
        return run.pairs_path(task.iteration)
    if task.stage == "train":
        return run.model_dir(task.iteration) / MODEL_DONE
    if task.stage == "eval":
        return eval_dir(run.path, task.benchmark, task.iteration) / f"shard_{task.shard:05d}.h5"
    if task.stage == "eval_results":
        return results_path(run.path, task.benchmark, task.iteration)
    return run.shard_path(task.iteration, task.stage, task.shard)


def expectations(run: RunDir, iteration: int, stage: str, shard: int = 0) -> dict[str, Any]:
    """What a shard of this run must say about itself (read_shard's checks): stage, iteration, shard index
    and count, config hash, model family. One home for the driver's completion check and the stages' reads."""
    count = run.num_shards(iteration) if stage in SHARD_STAGES else 1
    return {"stage": stage, "config_hash": run.config_hash, "iteration": iteration, "shard_index": shard,
            "shard_count": count, "family": "discrete" if run.config.discrete else "continuous",
            "options": StoreOptions.from_config(run.config.store)}


def model_problem(model_dir: Path) -> str | None:
    """None when an exported model is complete: its DONE marker lists every file written before it (size and
    sha256) and each is there unchanged. A model that fails is not done, so it is never loaded."""
    done = model_dir / MODEL_DONE
    if not done.is_file():
        return f"{done}: missing (training not finished)"
    try:
        files = json.loads(done.read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return f"{done}: not the JSON the train job writes (corrupt)"
    if not isinstance(files, dict) or not files:
        return f"{done}: lists no files (written by an older silmm, or by hand)"
    return manifest_problem(model_dir, files)


def output_problem(run: RunDir, task: StageTask) -> str | None:
    """None when the task's output is complete and valid; else what is wrong (naming the file), or
    "missing". A task whose output has a problem is not done."""
    out = output_path(run, task)
    if task.stage == "train":
        return model_problem(out.parent) if out.parent.exists() else "missing"
    if not out.exists():
        return "missing"
    if task.stage in ("pretrain", "evaluate"):  # written last, atomically
        return None
    if task.stage in ("eval", "eval_results"):  # complete, and from the current eval settings (eval hash)
        from silmm.eval import stage as E

        plan = E.plan(run, task.iteration, task.benchmark)
        if task.stage == "eval":
            problem = validate_shard(out, stage="eval", config_hash=run.config_hash, iteration=task.iteration,
                                     options=StoreOptions.from_config(run.config.store))
            if problem:
                return problem
            return None if E.shard_is_current(plan, task.shard, plan.eval_hash()) else "stale"
        return None if is_current(out, plan.eval_hash()) else "stale"
    problem = validate_shard(out, **expectations(run, task.iteration, task.stage, task.shard))
    return problem or (_indexed_samples_problem(run, out) if task.stage == "pairs" else None)


def _indexed_samples_problem(run: RunDir, pairs_path: Path) -> str | None:
    """Continuous pairs index rows of the samples shards: pairs selected from samples that were regenerated
    or replaced since are stale (moved aside and selected again), not a training failure later."""
    options = StoreOptions.from_config(run.config.store)
    pairs = read_shard(pairs_path, columns=(), verify_checksums=False, options=options)
    if "samples_shards" not in pairs.meta.extra:  # discrete pairs hold their tokens
        return None
    _, problems = indexed_samples(pairs, options)
    return f"stale: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "") \
        if problems else None


def is_done(run: RunDir, task: StageTask) -> bool:
    """A task's completion test: its output exists and validates (train: the exported model's manifest)."""
    return output_problem(run, task) is None


def settle(run: RunDir, task: StageTask) -> bool:
    """The driver's completion check: True when done. A damaged output is moved aside (kept for inspection
    as ``<name>.bad-<time>``, logged) so the task regenerates it and nothing downstream reads it."""
    problem = output_problem(run, task)
    if problem is None:
        return True
    if problem not in ("missing", "stale"):
        out = output_path(run, task)
        target = out.parent if task.stage == "train" else out
        if target.exists():
            moved = quarantine(target)
            log.warning("%s: %s\n  moved aside to %s; the task will regenerate it", task.name, problem, moved)
    return False


def task_rank() -> int:
    """This process's rank in a multi-task job (training); 0 otherwise."""
    for var in ("RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def log_path(run: RunDir, task: StageTask, rank: int = 0) -> Path:
    suffix = f".rank{rank}" if rank else ""  # one log per rank of a multi-task job
    bench = f"_{task.benchmark}" if task.benchmark else ""
    return run.logs_dir / f"iter_{task.iteration:02d}" / f"{task.stage}{bench}_{task.shard:05d}{suffix}.log"


@contextmanager
def task_log(path: Path) -> Iterator[None]:
    global _active_writer
    _active_writer = None  # one left by an earlier task of this process (debug executor) is not this task's
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    try:
        with recording(path):  # the task's progress records go beside its log (silmm.progress)
            yield
    finally:
        root.removeHandler(handler)
        handler.close()


def run_task(task: StageTask) -> dict[str, Any]:
    set_task_threads()  # first: the task's allocated CPUs, the same on every executor (bit-identical shards)
    run = RunDir.open(task.run_dir)
    out = output_path(run, task)
    if is_done(run, task):  # a damaged output is moved aside below, under the lease: its writer may be alive
        log.info("%s: already complete at %s, skipping", task.name, out)
        return {"task": task.name, "skipped": True, "output": str(out)}
    job = importlib.import_module(f"jobs.{task.stage}")
    rank = task_rank()
    target = out.parent if task.stage in ("train", "pretrain") else out  # a model directory is one unit
    try:  # one writer per output: rank 0 takes the lease, the other ranks of its job work under it
        held = lease.lease(target, task.name) if rank == 0 else _job_lease(target)
        with held, task_log(log_path(run, task, rank)):
            return _run_leased(run, task, job, out, rank)
    except lease.LeaseHeld as exc:  # not a failure: the driver waits for the holder
        log.warning("%s: not started, another writer holds its output: %s", task.name, exc)
        return {"task": task.name, "held_by": exc.holder.describe(), "lease": str(exc.path), "output": str(out)}


@contextmanager
def _job_lease(target: Path) -> Iterator[None]:
    lease.wait_for_job_lease(target)
    yield


def _run_leased(run: RunDir, task: StageTask, job: Any, out: Path, rank: int) -> dict[str, Any]:
    """The task's work, under the lease of its output."""
    if (settle(run, task) if rank == 0 else is_done(run, task)):  # completed by the lease's earlier holder
        log.info("%s: completed by an earlier writer at %s, skipping", task.name, out)
        return {"task": task.name, "skipped": True, "output": str(out)}
    env = {k: os.environ[k] for k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID",
                                      "SLURM_RESTART_COUNT") if k in os.environ}
    log.info("%s: start on %s %s -> %s", task.name, socket.gethostname(), env, out)
    t0 = time.time()
    kwargs = {"benchmark": task.benchmark} if task.benchmark else {}
    stats = job.run(run, task.iteration, task.shard, **kwargs)
    stats.update(task=task.name, output=str(out), seconds=round(time.time() - t0, 3),
                 host=socket.gethostname(), **env)
    if rank == 0:
        atomic_write_text(log_path(run, task).with_suffix(".stats.json"), json.dumps(stats, indent=2) + "\n")
    log.info("%s: done in %.1f s: %s", task.name, stats["seconds"], stats)
    return stats


def read_input(run: RunDir, iteration: int, stage: str, shard: int, columns: Iterable[str] | None = None,
               verify_checksums: bool = True) -> Shard:
    """An earlier stage's shard, verified (checksums) and checked against this run and its place.
    ``verify_checksums=False`` only for a quick look at what is there before the verified read."""
    return read_shard(run.shard_path(iteration, stage, shard), columns=columns, verify_checksums=verify_checksums,
                      **expectations(run, iteration, stage, shard))


def open_writer(run: RunDir, iteration: int, stage: str, shard: int, shard_count: int,
                extra: dict[str, Any] | None = None, path: Path | None = None,
                flush_every: int | None = None) -> ShardWriter:
    """The stage's resumable writer, registered so a preemption flushes it. ``path`` and ``flush_every``
    default to the run's layout and `sharding.flush_every` (the eval stage gives its own)."""
    global _active_writer
    meta = ShardMeta(stage, iteration, shard, shard_count, run.config_hash, extra or {})
    writer = ShardWriter(path or run.shard_path(iteration, stage, shard), meta,
                         flush_every or run.config.sharding.flush_every, StoreOptions.from_config(run.config.store))
    if writer.done:
        log.info("resuming %s: %d prompts already recorded", writer.path, len(writer.done))
    _active_writer = writer
    return writer


def progress(items: Iterable[T], total: int, desc: str, enabled: bool = True, unit: str = "prompts") -> Iterator[T]:
    """Iterate ``items`` (``total`` of them) and say how far the task is: its progress record (silmm.progress:
    the driver's live bar and `silmm status` read it), a log line every ~10% of the items (batch logs; the
    debug executor's console), and tqdm on a terminal when ``enabled``. An item that is a list or tuple (a
    batch of prompts) counts as its length in ``unit``s; what the shard's writer already holds (a resumed
    task) counts as done, so the figures go on from where an earlier attempt stopped."""
    items = list(items)
    units = [len(x) if isinstance(x, (list, tuple)) else 1 for x in items]
    writer = _active_writer
    earlier = len(writer.done) if writer is not None else 0
    record = task_recorder(unit, earlier + sum(units), earlier)
    step = max(total // 10, 1)
    bar = tqdm(total=record.total, initial=earlier, desc=desc, unit=f" {unit}", mininterval=2.0,
               disable=not enabled or not os.isatty(2), bar_format=BAR_FORMAT)
    try:
        for i, (item, n) in enumerate(zip(items, units, strict=True), 1):
            yield item
            record.update(record.done + n)
            bar.update(n)
            if i % step == 0 or i == total:
                rate = record.rate(time.time())
                eta = tqdm.format_interval((record.total - record.done) / rate) if rate else "?"
                log.info("%s: %d/%d (%d/%d %s, %.3g %s/s, eta %s)", desc, i, total, record.done, record.total,
                         unit, rate or 0.0, unit, eta)
    finally:
        bar.close()
