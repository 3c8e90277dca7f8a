"""Progress records: what a running task has done, written by the task, read by the driver and `silmm status`.

Every task writes one small JSON record beside its log, ``<run>/logs/iter_KK/<stage>_<shard>.progress.json``
(:func:`record_path`): units done of total ("prompts", "steps"), counting what an earlier attempt already
recorded, the attempt's start, its last update and its rate over the recent window. It is replaced whole
(never half-written), at most every :data:`WRITE_EVERY_S` and at the end. Reading needs nothing from the
task's process, so the figures are the same on every executor and for a detached run.

:func:`aggregate` sums a stage's records (pure: records and a clock in, figures out); :class:`LiveStatus` is
the driver's console view of them: a bar rewritten in place on a terminal, a log line every
:data:`LOG_EVERY_S` otherwise (batch logs, a piped `make run`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".progress.json"
WRITE_EVERY_S = 2.0  # a record is rewritten at most this often (and at the end): cheap on a cluster filesystem
RATE_WINDOW_S = 60.0  # the rate is measured over about this much recent time, so a slow start fades out
STALE_AFTER_S = 600.0  # a running record not updated for this long adds no rate (its task may be dead)
LOG_EVERY_S = 30.0  # the driver's progress line in a log that is not a terminal
# tqdm's default bar, but "0.50 prompts/s" below 1/s too (tqdm would write "2.00s/ prompts")
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"

Clock = Callable[[], float]
_NAME = re.compile(r"^iter_(\d+)/(.+)_(\d+)$")  # tasks.log_path's layout: iter_KK/<stage>[_<benchmark>]_<shard>


def record_path(log_file: Path) -> Path:
    """A task's progress record: beside its log (tasks.log_path), ``scores_00003.log`` -> ``scores_00003.progress.json``."""
    return log_file.with_suffix(RECORD_SUFFIX)


@dataclass(frozen=True)
class Record:
    task: str  # iter_KK/<stage>[_<benchmark>]_<shard>, the name of the task's log
    iteration: int
    stage: str  # with the benchmark for the eval stages (eval_<benchmark>)
    shard: int
    unit: str  # prompts, steps, images
    done: int  # units done, counting those recorded by earlier attempts
    total: int
    resumed: int  # units already done when this attempt started
    start: float  # this attempt's start (epoch seconds)
    updated: float
    rate: float | None  # units/s over the recent window; None before a second measurement
    host: str
    pid: int

    @property
    def finished(self) -> bool:
        return self.done >= self.total


def read_record(path: Path) -> Record | None:
    """The record at ``path``; None when there is none yet, or it is not one (a reader never fails a run)."""
    try:
        return Record(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


# ------------------------------------------------------------------------------------------- writing
class Recorder:
    """Writes one task's record: at once (the bar shows a resumed count before the first new unit), then at
    most every ``every_s`` and when the last unit is done. ``path`` None: records nothing (outside a task,
    or a rank other than 0). A write that fails is logged once and stops the records, never the task."""

    def __init__(self, path: Path | None, unit: str, total: int, done: int = 0, clock: Clock = time.time,
                 every_s: float = WRITE_EVERY_S, window_s: float = RATE_WINDOW_S):
        self.path, self.unit, self.total, self.resumed, self.done = path, unit, total, done, done
        self.clock, self.every_s, self.window_s = clock, every_s, window_s
        self.start = clock()
        self._samples: deque[tuple[float, int]] = deque([(self.start, done)])  # (time, done) at each write
        self._written = -float("inf")
        self.write(self.start)

    def update(self, done: int) -> None:
        self.done = done
        now = self.clock()
        if done >= self.total or now - self._written >= self.every_s:
            self.write(now)

    def rate(self, now: float) -> float | None:
        """Units per second since the oldest measurement in the window; None until time has passed."""
        t0, d0 = self._samples[0]
        return (self.done - d0) / (now - t0) if now > t0 else None

    def record(self, now: float) -> Record:
        name = "/".join(self.path.parts[-2:]).removesuffix(RECORD_SUFFIX) if self.path else ""
        m = _NAME.match(name)
        return Record(task=name, iteration=int(m[1]) if m else -1, stage=m[2] if m else "",
                      shard=int(m[3]) if m else -1, unit=self.unit, done=self.done, total=self.total,
                      resumed=self.resumed, start=self.start, updated=now, rate=self.rate(now),
                      host=socket.gethostname(), pid=os.getpid())

    def write(self, now: float) -> None:
        if self.path is None:
            return
        while len(self._samples) > 1 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()  # the rate's base: the newest measurement at least a window old
        text = json.dumps(asdict(self.record(now))) + "\n"
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:  # replaced whole; no fsync: a record lost in a crash costs nothing, and it is rewritten every few s
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot write the progress record %s (%s): no more records from this task", self.path, exc)
            tmp.unlink(missing_ok=True)
            self.path = None
            return
        self._written = now
        self._samples.append((now, self.done))


_current: Path | None = None  # the record of the task running in this process (set by tasks.task_log)


@contextmanager
def recording(log_file: Path) -> Iterator[None]:
    """While a task runs: its records go beside its log ``log_file`` (see :func:`task_recorder`)."""
    global _current
    saved, _current = _current, record_path(log_file)
    try:
        yield
    finally:
        _current = saved


def task_recorder(unit: str, total: int, done: int = 0, enabled: bool = True) -> Recorder:
    """A recorder for the task running in this process; records nothing outside a task or when not
    ``enabled`` (ranks other than 0 of a multi-task job: one record per task)."""
    return Recorder(_current if enabled else None, unit, total, done)


# ------------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class StageProgress:
    unit: str
    done: int
    total: int
    estimated: bool  # some shards have no record yet: their totals are the mean of the known ones
    rate: float | None  # units/s: the sum of the running tasks' recent rates
    eta_s: float | None
    shards: int
    finished: int  # shards complete (on disk, or their record says so)
    running: int  # shards with an unfinished record (started, maybe preempted and waiting)
    stalled: int  # running shards whose record has not changed for STALE_AFTER_S


def aggregate(records: Sequence[Record | None], complete: Sequence[bool], now: float,
              stale_after_s: float = STALE_AFTER_S) -> StageProgress | None:
    """One stage's figures from its shards' records (None where a shard has none) and whether each shard is
    complete (its output is on disk: the truth, whatever its record says). None when no shard has a record."""
    known = [r for r in records if r is not None]
    if not known:
        return None
    mean_total = round(sum(r.total for r in known) / len(known))  # shards are split evenly
    done = total = finished = running = stalled = 0
    rate = 0.0
    for rec, is_complete in zip(records, complete, strict=True):
        shard_total = rec.total if rec is not None else mean_total
        total += shard_total
        if is_complete or (rec is not None and rec.finished):
            done, finished = done + shard_total, finished + 1
        elif rec is not None:
            done, running = done + rec.done, running + 1
            if now - rec.updated > stale_after_s:
                stalled += 1
            elif rec.rate:
                rate += rec.rate
    eta = (total - done) / rate if rate > 0 else None
    return StageProgress(unit=known[0].unit, done=done, total=total, estimated=len(known) < len(records),
                         rate=rate if rate > 0 else None, eta_s=eta, shards=len(records), finished=finished,
                         running=running, stalled=stalled)


def read_stage(paths: Sequence[Path], complete: Sequence[bool], now: float) -> StageProgress | None:
    """:func:`aggregate` of the records at ``paths`` (one per shard)."""
    return aggregate([read_record(p) for p in paths], complete, now)


def describe(p: StageProgress) -> str:
    """"120/~512 prompts, 3.21 prompts/s, eta 02:03" (~: a total that counts shards not started yet)."""
    rate = f"{p.rate:.3g} {p.unit}/s" if p.rate else f"? {p.unit}/s"
    eta = tqdm.format_interval(p.eta_s) if p.eta_s is not None else "?"
    stalled = f", {p.stalled} stalled" if p.stalled else ""
    return f"{p.done}/{'~' if p.estimated else ''}{p.total} {p.unit}, {rate}, eta {eta}{stalled}"


# ------------------------------------------------------------------------------------ the live view
STATES = ("done", "running", "pending", "failed")


class LiveStatus:
    """The driver's view of the stage it waits for. On a terminal: one line rewritten in place, a tqdm bar
    of the units done when the tasks write records (else the task counts); elsewhere: the same figures as a
    log line every ``log_every_s`` (not every poll). Records of finished tasks are read once."""

    def __init__(self, stream: TextIO, clock: Clock = time.time, log_every_s: float = LOG_EVERY_S):
        self.stream, self.clock, self.log_every_s = stream, clock, log_every_s
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._final: dict[Path, Record | None] = {}
        self._next_log: float | None = None
        self._drawn = False

    def update(self, label: str, tasks: Sequence[tuple[Path, str]], t0: float) -> None:
        """``tasks``: (record path, driver state: done, running, pending, missing or failed) per task."""
        now = self.clock()
        progress, figures, tasks_text = self._figures(tasks, now)
        if self.tty:
            self._draw(label, progress, tasks_text, now - t0)
        elif self._due(now):
            log.info("%s: %s; %s; %s elapsed", label, figures, tasks_text, tqdm.format_interval(now - t0))

    def update_stages(self, label: str, stages: Sequence[tuple[str, Sequence[tuple[Path, str]]]], t0: float) -> None:
        """Several stages waited for together (questions and samples): each one's figures, side by side on one
        line (``stages``: (stage, its tasks as for :meth:`update`))."""
        now = self.clock()
        parts = []
        for stage, tasks in stages:
            _, figures, tasks_text = self._figures(tasks, now)
            parts.append(f"{stage}: {figures}; {tasks_text}")
        line = f"{label} " + " | ".join(parts) + f"; {tqdm.format_interval(now - t0)} elapsed"
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.stream.write("\r" + line[:width] + "\x1b[K")
            self.stream.flush()
            self._drawn = True
        elif self._due(now):
            log.info("%s", line)

    def _figures(self, tasks: Sequence[tuple[Path, str]], now: float) -> tuple[StageProgress | None, str, str]:
        """A stage's aggregate (None without records), its figures as text, and its task counts as text."""
        counts = {s: sum(state == s or (s == "pending" and state == "missing") for _, state in tasks) for s in STATES}
        progress = aggregate([self._record(path, state) for path, state in tasks],
                             [state == "done" for _, state in tasks], now)
        tasks_text = (f"tasks {counts['done']}/{len(tasks)} done, {counts['running']} running, {counts['pending']} pending"
                      + (f", {counts['failed']} FAILED" if counts["failed"] else ""))
        figures = describe(progress) if progress else f"{counts['done']}/{len(tasks)} tasks done"
        return progress, figures, tasks_text

    def end(self) -> None:
        """The stage is over (or failed): keep its last line, start the next stage's afresh."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
        self._final.clear()
        self._next_log, self._drawn = None, False

    def _record(self, path: Path, state: str) -> Record | None:
        if path in self._final:
            return self._final[path]
        rec = read_record(path)
        if state in ("done", "failed"):  # it will not change any more
            self._final[path] = rec
        return rec

    def _due(self, now: float) -> bool:
        if self._next_log is None:  # the stage's first poll: its submission was just logged
            self._next_log = now + self.log_every_s
            return False
        if now < self._next_log:
            return False
        self._next_log = now + self.log_every_s
        return True

    def _draw(self, label: str, p: StageProgress | None, tasks_text: str, elapsed: float) -> None:
        width = shutil.get_terminal_size((100, 20)).columns - 1
        if p is None:
            line = f"{label}  {tasks_text}  {tqdm.format_interval(elapsed)}"
        else:
            form = BAR_FORMAT.replace("/{total_fmt}", "/~{total_fmt}") if p.estimated else BAR_FORMAT
            line = tqdm.format_meter(min(p.done, p.total), p.total, elapsed, ncols=width, prefix=label,
                                     unit=f" {p.unit}", rate=p.rate, postfix=tasks_text, bar_format=form)
            if p.stalled:
                line += f" ({p.stalled} stalled)"
        self.stream.write("\r" + line[:width] + "\x1b[K")  # clear what a longer earlier line left
        self.stream.flush()
        self._drawn = True


def stage_line(paths: Sequence[Path], complete: Sequence[bool], now: float | None = None) -> str:
    """`silmm status`'s figures for a stage with a running task ("" when none is running)."""
    p = read_stage(paths, complete, time.time() if now is None else now)
    return f"  {describe(p)}" if p is not None and p.running else ""

