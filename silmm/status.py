"""`silmm status RUN` and `silmm cancel RUN`: what is done, running, failed or missing, from the disk
(the truth) and the driver's jobs.json (what was submitted), with Slurm states where Slurm is used."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

from silmm.driver import STAGE_ORDER, JobBook
from silmm.inspection import stage_status
from silmm.rundir import RunDir


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """job id -> state from sacct (accounting) or squeue; {} where Slurm is not installed."""
    if not job_ids or not shutil.which("sacct"):
        return {}
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(sorted(set(job_ids)))],
                         capture_output=True, text=True, check=False)
    states = {}
    for line in out.stdout.splitlines():
        if "|" in line:
            jid, state = line.split("|", 1)
            states[jid] = state.split()[0]
    return states


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
    for it in range(1, run.config.run.iterations + 1):
        lines.append(f"iter_{it:02d}")
        for stage in STAGE_ORDER:
            entries = {k: v for k, v in book.items() if k.startswith(f"iter_{it:02d}/{stage}/")}
            if stage == "train":
                done, expected = int((run.model_dir(it) / "DONE").is_file()), 1
            else:
                st = stage_status(run, it, stage)
                done, expected = len(st.done), st.expected
            running = failed = 0
            jobs = []
            for e in entries.values():
                state = sl.get(str(e["job_id"]), e["state"]) if e.get("kind") == "slurm" else e["state"]
                running += state.lower() in ("running", "pending")
                failed += state.lower() in ("failed", "cancelled", "timeout", "out_of_memory", "node_fail")
                if e.get("job_id") and state.lower() not in ("done", "completed"):
                    jobs.append(f"{e['job_id']}:{state}")
            secs = _stats_seconds(run, it, stage)
            eta = ""
            if secs and done < expected:
                eta = f"  ~{sum(secs) / len(secs):.0f}s/task, eta {(expected - done) * sum(secs) / len(secs):.0f}s serial"
            missing = max(expected - done - running, 0)
            lines.append(f"  {stage:9s} done {done}/{expected}  running {running}  failed {failed}  missing {missing}"
                         f"{eta}{'  jobs ' + ' '.join(jobs[:8]) if jobs else ''}")
    lines += _eval_status(run)
    return "\n".join(lines)


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


def cancel(run: RunDir) -> list[str]:
    """Cancel every job the driver submitted that has not finished, and stop the driver if it runs here."""
    book = JobBook.load(run).entries
    cancelled = []
    slurm_ids = sorted({str(e["job_id"]).split("_")[0] for e in book.values()
                        if e.get("kind") == "slurm" and e.get("job_id") and e["state"] in ("pending", "running")})
    if slurm_ids and shutil.which("scancel"):
        subprocess.run(["scancel", *slurm_ids], check=False)
        cancelled += [f"slurm job {j}" for j in slurm_ids]
    for e in book.values():
        if e.get("kind") == "local" and e["state"] in ("pending", "running") and str(e.get("job_id", "")).isdigit():
            try:
                os.kill(int(e["job_id"]), signal.SIGINT)  # as submitit's LocalJob.cancel: jobs ignore SIGTERM
                cancelled.append(f"local job {e['job_id']}")
            except ProcessLookupError:
                pass
    lock = Path(run.path / "driver.lock")
    if lock.is_file():
        info = json.loads(lock.read_text())
        try:
            os.kill(int(info["pid"]), signal.SIGTERM)
            cancelled.append(f"driver pid {info['pid']}")
        except (ProcessLookupError, PermissionError, KeyError, ValueError):
            pass
    return cancelled

