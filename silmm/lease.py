"""Who is alive, and per-output leases: one writer per shard, whatever the driver or the cluster does.

A stage task takes a lease before it writes anything: ``<output>.lease`` beside its output (a directory
output -- a model -- is leased as one unit, ``<dir>.lease``), created with O_EXCL, holding JSON (host, pid
and its start time, the Slurm or local job, the task, since). A second writer of the same output finds
the lease, does not touch the output, its progress or its temporary files, and exits cleanly saying who
holds it (the driver then waits for that holder). A lease whose holder is provably gone is taken over
with a warning:

- the holder is this task's own job before a requeue (same Slurm job / array task id);
- the holder ran on this host and its process is dead (or the pid now names another process);
- the holder is a Slurm job that Slurm says is no longer running.

Anything that cannot be proved (another host, Slurm unreachable) counts as alive: never two writers.
The holder removes its lease at the end, also on an exception. Liveness of processes and Slurm jobs
lives here too (one home): the driver uses it to adopt jobs and `silmm cancel` to find what still runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Slurm states of a job that exists and may still run (REQUEUED and friends come back as PENDING)
SLURM_ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                "SUSPENDED", "RESIZING", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD")
# ... of those, the states where the job's processes are running now
SLURM_RUNNING = ("RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "STOPPED", "SIGNALING",
                 "STAGE_OUT")


# ------------------------------------------------------------------------------------ processes
def process_start(pid: int) -> str | None:
    """The start time of a live process of this host (clock ticks since boot, /proc/<pid>/stat field 22);
    None when there is no such process or it is a zombie. Pid and start time together name one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
    return None if fields[0] in ("Z", "X") else fields[19]


def process_alive(pid: int, start: str | None = None) -> bool:
    """True when `pid` runs on this host (and, given `start`, is still the process that started then)."""
    now = process_start(pid)
    return now is not None and (start is None or now == start)


# ------------------------------------------------------------------------------------ Slurm jobs
def _expand(job_id: str) -> list[str]:
    """'123_[0-2,5%2]' (a pending array's unsplit tasks, as sacct and squeue print them) -> 123_0 .. 123_5."""
    m = re.fullmatch(r"(\d+)_\[([\d,\-]+)(?:%\d+)?\]", job_id)
    if not m:
        return [job_id]
    out = []
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        out += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def _parse_states(text: str) -> dict[str, str]:
    states = {}
    for line in text.splitlines():
        if "|" in line:
            jid, state = line.split("|", 1)
            for one in _expand(jid.strip()):
                states[one] = state.split()[0].rstrip("+") if state.split() else "UNKNOWN"
    return states


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """job id (``123`` or array task ``123_4``) -> Slurm state, upper case; {} without Slurm. squeue first
    (live: sacct lags ~5 s behind new jobs and requeues), then sacct for the jobs squeue no longer lists.
    An array's base id also answers for its tasks. A job neither knows is left out: not proof of anything."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids or not shutil.which("squeue"):
        return {}
    bases = sorted({j.split("_")[0] for j in ids})
    states: dict[str, str] = {}
    # --states=all: also jobs that ended in the last MinJobAge seconds; -r: one line per array task
    out = subprocess.run(["squeue", "-h", "-r", "--states=all", "-o", "%i|%T", "-j", ",".join(bases)],
                         capture_output=True, text=True, check=False)
    if out.returncode == 0:
        states.update(_parse_states(out.stdout))
    missing = [b for b in bases if not any(k == b or k.startswith(b + "_") for k in states)]
    if missing and shutil.which("sacct"):
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(missing)],
                             capture_output=True, text=True, check=False)
        states.update(_parse_states(out.stdout))
    return {j: s for j, s in states.items() if j in ids or j.split("_")[0] in ids}


def slurm_state(job_id: str) -> str | None:
    """One job's state (an array task falls back to its array's line while unsplit); None if unknown."""
    states = slurm_states([job_id])
    return states.get(job_id) or states.get(job_id.split("_")[0])


# ------------------------------------------------------------------------------------ holders
def current_job() -> tuple[str, str]:
    """(kind, id) of the job this process belongs to: ("slurm", "123" or array task "123_4"), ("local",
    submitit's controller pid) or ("", "") in a plain process (the debug executor, a test). The ranks of a
    multi-task job share it; a requeued Slurm task keeps it."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return "slurm", f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return "slurm", env["SLURM_JOB_ID"]
    if env.get("SUBMITIT_LOCAL_JOB_ID"):
        return "local", env["SUBMITIT_LOCAL_JOB_ID"]
    return "", ""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    pid_start: str | None
    job_kind: str  # slurm | local | "" (a plain process)
    job_id: str
    task: str
    since: str

    @classmethod
    def me(cls, task: str) -> Holder:
        kind, job = current_job()
        return cls(socket.gethostname(), os.getpid(), process_start(os.getpid()), kind, job, task,
                   time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def describe(self) -> str:
        job = f" (Slurm job {self.job_id})" if self.job_kind == "slurm" else \
            f" (local job {self.job_id})" if self.job_kind == "local" else ""
        return f"pid {self.pid} on {self.host}{job} since {self.since}"

    def same_job(self, other: Holder) -> bool:
        return bool(self.job_kind) and (self.job_kind, self.job_id) == (other.job_kind, other.job_id) and \
            (self.job_kind == "slurm" or self.host == other.host)


def gone_reason(holder: Holder, me: Holder) -> str | None:
    """Why `holder` provably writes no more (None: it may still be writing)."""
    if holder.same_job(me):
        return "it is this job before a requeue"
    if holder.host == me.host and not process_alive(holder.pid, holder.pid_start):
        return f"process {holder.pid} is gone"
    if holder.job_kind == "slurm":
        state = slurm_state(holder.job_id)
        if state is not None and state not in SLURM_RUNNING:
            return f"Slurm says job {holder.job_id} is {state}"
    return None


# ------------------------------------------------------------------------------------ leases
class LeaseHeld(RuntimeError):
    """Another live writer holds the lease; the message names it."""

    def __init__(self, path: Path, holder: Holder):
        super().__init__(f"{path}: held by {holder.describe()} ({holder.task})")
        self.path = path
        self.holder = holder


_HELD: set[Path] = set()  # the leases this process holds (ShardWriter asks before it deletes anything)


def lease_path(output: str | Path) -> Path:
    """The lease of an output file or directory: ``<output>.lease`` beside it."""
    output = Path(output)
    return output.with_name(output.name + ".lease")


def read_holder(path: Path) -> Holder | None:
    """The lease's holder; None when there is no lease. A lease being written (empty) or unreadable is
    reported as an unknown holder on no host, which nothing can prove gone."""
    try:
        data = json.loads(path.read_text())
        return Holder(**{k: data.get(k) for k in Holder.__dataclass_fields__})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        return Holder("?", -1, None, "", "", "?", "?")


def holds(output: str | Path) -> bool:
    """True when this process holds the lease of `output`."""
    return lease_path(output).resolve() in _HELD


def foreign_holder(output: str | Path) -> Holder | None:
    """The holder of `output`'s lease when it is not this process (None: unleased, or leased by us)."""
    if holds(output):
        return None
    return read_holder(lease_path(output))


def acquire(output: str | Path, task: str) -> Path:
    """Take the lease of `output` (taking over one whose holder is provably gone) or raise LeaseHeld."""
    path = lease_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)  # the lease comes before anything else is written
    me = Holder.me(task)
    for _ in range(3):  # a takeover races with other takers: O_EXCL decides who wins
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_holder(path)
            if holder is None:
                continue  # released in between
            reason = gone_reason(holder, me)
            if reason is None and holder.host == "?" and time.time() - _mtime(path) > _UNREADABLE_AFTER_S:
                reason = f"unreadable for over {_UNREADABLE_AFTER_S} s (its writer died while writing it)"
            if reason is None:
                raise LeaseHeld(path, holder) from None
            log.warning("%s: taking over the lease of %s: %s", path, holder.describe(), reason)
            _remove_if(path, holder)
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(me), fh)
            fh.flush()
            os.fsync(fh.fileno())
        _HELD.add(path.resolve())
        return path
    raise LeaseHeld(path, read_holder(path) or me)


_UNREADABLE_AFTER_S = 60


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


def _remove_if(path: Path, holder: Holder) -> None:
    """Remove the lease only if it still names `holder` (another taker may have replaced it already)."""
    if read_holder(path) == holder:
        path.unlink(missing_ok=True)


def release(path: Path) -> None:
    path = path.resolve()
    if path in _HELD:
        _HELD.discard(path)
        path.unlink(missing_ok=True)


@contextmanager
def lease(output: str | Path, task: str) -> Iterator[Path]:
    """Hold `output`'s lease for the block; released at its end, also on an exception."""
    path = acquire(output, task)
    try:
        yield path
    finally:
        release(path)


def wait_for_job_lease(output: str | Path, timeout_s: float = 300.0, poll_s: float = 0.5) -> None:
    """For the ranks > 0 of a multi-task job: rank 0 alone takes the lease (only it writes). Wait until the
    lease names this job (go on), or a live other writer holds it (LeaseHeld: rank 0 gives up as well, so
    this rank must not wait at a rendezvous that never comes)."""
    path = lease_path(output)
    me = Holder.me("")
    deadline = time.time() + timeout_s
    while True:
        holder = read_holder(path)
        if holder is not None and holder.same_job(me):
            return
        if holder is not None and holder.host != "?" and gone_reason(holder, me) is None:
            raise LeaseHeld(path, holder)
        if time.time() > deadline:
            raise TimeoutError(f"{path}: rank 0 of job {me.job_id} did not take the lease in {timeout_s:.0f} s")
        time.sleep(poll_s)
