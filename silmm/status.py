"""`silmm status RUN` and `silmm cancel RUN`: what is done, running, failed or missing, from the disk
(the truth) and the driver's jobs.json (what was submitted), with Slurm states where Slurm is used."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from silmm.driver import STAGE_ORDER, JobBook, read_driver_job, request_cancel
from silmm.inspection import stage_status
from silmm.lease import SLURM_ACTIVE, process_alive, slurm_state, slurm_states
from silmm.progress import record_path, stage_line
from silmm.rundir import RunDir
from silmm.tasks import StageTask, log_path


def _slurm_state(states: dict[str, str], job_id: str, recorded: str) -> str:
    """A recorded job's Slurm state (an unsplit array task answers through its array), else what was recorded."""
    return states.get(job_id) or states.get(job_id.split("_")[0]) or recorded


def _in_flight(state: str) -> bool:
    """Submitted and not ended: the driver's pending/running, or a Slurm state that still runs or will run
    again (REQUEUED, REQUEUE_HOLD, SUSPENDED, ... count as running/pending, not as failed)."""
    return state.lower() in ("pending", "running") or state.upper() in SLURM_ACTIVE


def _driver_job_line(run: RunDir) -> str | None:
    """'driver job 123: RUNNING (log ...)' for a detached run (driver_job.json), else None."""
    info = read_driver_job(run)
    if not info:
        return None
    state = slurm_state(str(info["job_id"])) or "unknown to Slurm (long finished?)"
    return f"driver job {info['job_id']}: {state}  log {info.get('log', run.logs_dir / 'driver.log')}"


def _stats_seconds(run: RunDir, iteration: int, stage: str) -> list[float]:
    folder = run.logs_dir / f"iter_{iteration:02d}"
    secs = []
    for f in folder.glob(f"{stage}_*.stats.json"):
        try:
            secs.append(float(json.loads(f.read_text())["seconds"]))
        except (ValueError, KeyError, OSError):
            continue
    return secs


def describe_status(run: RunDir) -> str:
    book = JobBook.load(run).entries
    ids = [str(e["job_id"]) for e in book.values() if e.get("kind") == "slurm" and e.get("job_id")]
    sl = slurm_states(ids)
    lines = [f"run {run.path}  config {run.config_hash}  executor {run.config.executor.kind.value}"]
    lock = run.path / "driver.lock"
    if lock.is_file():
        lines.append(f"driver: {lock.read_text().strip()}")
    driver_job = _driver_job_line(run)
    if driver_job:
        lines.append(driver_job)
    pretraining = _progress_text(run, 0, "pretrain", [False]) if run.config.toy.enabled else ""
    if pretraining:  # the toy LMM's pretraining, before iteration 1
        lines.append(f"pretrain {pretraining.strip()}")
    for it in range(1, run.config.run.iterations + 1):
        lines.append(f"iter_{it:02d}")
        for stage in STAGE_ORDER:
            entries = {k: v for k, v in book.items() if k.startswith(f"iter_{it:02d}/{stage}/")}
            removed = 0  # shards `silmm gc` removed once the iteration was finished (iter_K/gc.json)
            if stage == "train":
                done, expected = int((run.model_dir(it) / "DONE").is_file()), 1
            else:
                st = stage_status(run, it, stage)
                done, expected, removed = len(st.done), st.expected, len(st.removed)
            running = failed = 0
            jobs = []
            for e in entries.values():
                state = _slurm_state(sl, str(e["job_id"]), e["state"]) if e.get("kind") == "slurm" else e["state"]
                running += _in_flight(state)
                failed += state.lower() in ("failed", "cancelled", "timeout", "out_of_memory", "node_fail")
                job = f"{e['job_id']}:{state}"
                if e.get("job_id") and state.lower() not in ("done", "completed") and job not in jobs:
                    jobs.append(job)  # once: the shards of a multi-shard task share their job
            secs = _stats_seconds(run, it, stage)
            # a running stage: units done of total, rate and ETA from its tasks' records; else the serial guess
            eta = _progress_text(run, it, stage, [s in st.done for s in _shard_files(run, it, stage, expected)]
                                 if stage != "train" else [bool(done)])
            if not eta and secs and done + removed < expected:
                eta = f"  ~{sum(secs) / len(secs):.0f}s/task, eta {(expected - done) * sum(secs) / len(secs):.0f}s serial"
            missing = max(expected - done - removed - running, 0)
            gone = f"  removed by gc {removed}" if removed else ""
            lines.append(f"  {stage:9s} done {done}/{expected}  running {running}  failed {failed}  missing {missing}"
                         f"{gone}{eta}{'  jobs ' + ' '.join(jobs[:8]) if jobs else ''}")
    lines += _eval_status(run)
    return "\n".join(lines)


def _shard_files(run: RunDir, iteration: int, stage: str, expected: int) -> list[Path]:
    """Where each shard's output lands (stage_status lists those done)."""
    if stage == "pairs":
        return [run.pairs_path(iteration)]
    return [run.shard_path(iteration, stage, s) for s in range(expected)]


def _progress_text(run: RunDir, iteration: int, stage: str, complete: list[bool]) -> str:
    """"  120/512 prompts, 3.2 prompts/s, eta 02:03" while a task of the stage runs (silmm.progress), else ""."""
    paths = [record_path(log_path(run, StageTask(str(run.path), iteration, stage, s))) for s in range(len(complete))]
    return stage_line(paths, complete)


def _eval_status(run: RunDir) -> list[str]:
    """Benchmark evaluation (eval.benchmarks): per benchmark and evaluated iteration, current shards and
    whether results.json is written (iterations with nothing on disk are left out, except 0)."""
    from silmm.eval import stage as E
    from silmm.eval.results import is_current

    if not run.config.eval.benchmarks:
        return []
    lines = ["eval"]
    for name in run.config.eval.benchmarks:
        for it in range(0, run.config.run.iterations + 1):
            if it and not (run.path / "eval" / name / f"iter_{it:02d}").is_dir():
                continue
            try:
                plan = E.plan(run, it, name)
                digest = plan.eval_hash()
            except (ValueError, RuntimeError, OSError) as exc:  # unreadable benchmark, missing model: say so
                lines.append(f"  {name} iter_{it:02d}: cannot plan ({exc})")
                continue
            done = sum(E.shard_is_current(plan, s, digest) for s in range(plan.shard_count))
            results = "written" if is_current(plan.results_path, digest) else "missing"
            lines.append(f"  {name:14s} iter_{it:02d}  shards {done}/{plan.shard_count}  results {results}")
    return lines


def cancel(run: RunDir, wait_s: float | None = None) -> list[str]:
    """Stop the run: the driver first (so it submits nothing more), then every job it submitted that Slurm
    still runs or queues (REQUEUED included; arrays by their base id) and its local jobs on this host.
    A process on another host is never signalled from here: the line says what to run there. The run
    stays as it is on disk, so the next `silmm run` resumes it (the cancelled tasks' leases are stale and
    taken over). Returns one line per action."""
    request_cancel(run)  # the driver reads it: its SIGTERM is a cancel, not a preemption
    done = _stop_driver(run)
    if (run.path / "driver.lock").exists():  # its last submissions must be in jobs.json before it is read
        # a driver on another host stops too: it sees the cancel request at its next poll
        _wait_for_driver(run, wait_s if wait_s is not None else 2 * run.config.executor.poll_interval_s + 15)
    book = JobBook.load(run).entries
    here = socket.gethostname()
    slurm_ids = [str(e["job_id"]) for e in book.values() if e.get("kind") == "slurm" and e.get("job_id")]
    states = slurm_states(slurm_ids)
    live = sorted({j.split("_")[0] for j in slurm_ids if _slurm_state(states, j, "") in SLURM_ACTIVE}, key=int)
    if live:
        subprocess.run(["scancel", *live], check=False)
        done += [f"slurm job {j}" for j in live]
    signalled: set[str] = set()  # the shards of a multi-shard task share their job: signal it once
    for e in book.values():
        jid = str(e.get("job_id", ""))
        if e.get("kind") != "local" or e.get("state") not in ("pending", "running") or not jid.isdigit() \
                or jid in signalled:
            continue
        signalled.add(jid)
        if e.get("host", here) != here:
            done.append(f"local job {jid} runs on {e['host']}: not signalled from here; run there: kill -INT {jid}")
        elif process_alive(int(jid), e.get("pid_start")):
            os.kill(int(jid), signal.SIGINT)  # as submitit's LocalJob.cancel: its jobs ignore SIGTERM
            done.append(f"local job {jid}")
    return done


def _stop_driver(run: RunDir) -> list[str]:
    """scancel a detached driver's job; SIGTERM a driver process on this host; for one on another host,
    say what to run there."""
    done = []
    job = read_driver_job(run)
    job_live = bool(job) and (slurm_state(str(job["job_id"])) or "") in SLURM_ACTIVE
    if job_live:
        subprocess.run(["scancel", str(job["job_id"])], check=False)
        done.append(f"driver job {job['job_id']}")
    lock = run.path / "driver.lock"
    try:
        info = json.loads(lock.read_text())
        pid, host = int(info["pid"]), str(info["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return done
    if host == socket.gethostname():
        if process_alive(pid):
            os.kill(pid, signal.SIGTERM)
            done.append(f"driver pid {pid}")
    elif not job_live:  # scancel reaches a detached driver wherever it runs; another process is not ours to signal
        done.append(f"driver pid {pid} runs on {host}: not signalled from here; run there: kill -TERM {pid}")
    return done


def _wait_for_driver(run: RunDir, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while (run.path / "driver.lock").exists() and time.time() < deadline:
        time.sleep(0.2)
