"""Executors: the same stage tasks run in-process, on this machine, or on Slurm by changing
`executor.kind` (debug | local | slurm). Built on submitit; resources come from `executor.default`
with per-stage overrides (`executor.stages.<stage>`).

Also what a cluster imposes on submissions: its limits (`scontrol show config`: MaxArraySize, MaxJobCount,
JobRequeue), arrays split to fit them with the `%N` throttle shared across the pieces, sbatch errors turned
into one line with the fix; and the torch thread count of every task (its allocated CPUs, on every executor).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import submitit
from submitit.core.utils import FailedJobError, FailedSubmissionError

from silmm.config import ExecutorConfig, ExecutorKind, StageResources
from silmm.rundir import SHARD_STAGES, RunDir

log = logging.getLogger(__name__)
T = TypeVar("T")

# Set by the driver for local tasks (their share of this machine's cores); read by set_task_threads.
TASK_THREADS_ENV = "SILMM_TASK_THREADS"


def submitit_folder(run: RunDir, iteration: int, stage: str) -> Path:
    return run.logs_dir / "submitit" / f"iter_{iteration:02d}" / stage


def slurm_parameters(res: StageResources, job_name: str, signal_delay_s: int) -> dict[str, Any]:
    """StageResources -> submitit SlurmExecutor parameters (sbatch options)."""
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": res.time_min,
        "nodes": res.nodes,
        "ntasks_per_node": res.tasks_per_node,
        "cpus_per_task": res.cpus_per_task,
        "mem": f"{int(res.mem_gb * 1024)}M",
        "array_parallelism": res.array_parallelism,
        "signal_delay_s": signal_delay_s,  # USR2 this long before the limit: tasks checkpoint and requeue
        "setup": list(res.setup),
        # a preempted or timed-out task goes back to the queue (also where JobRequeue=0 makes that opt-in);
        # its log keeps the earlier attempt (submitit writes --open-mode=append itself)
        "additional_parameters": {"requeue": True, **res.additional_parameters},
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(res, key):
            params[key] = getattr(res, key)
    return params


def make_executor(run: RunDir, iteration: int, stage: str) -> submitit.Executor:
    cfg = run.config
    res = cfg.resources(stage)
    folder = submitit_folder(run, iteration, stage)
    kind = cfg.executor.kind
    if kind is ExecutorKind.debug:
        return submitit.DebugExecutor(folder)
    if kind is ExecutorKind.local:
        ex = LocalExecutor(folder)
        ex.update_parameters(timeout_min=res.time_min, tasks_per_node=res.tasks_per_node, nodes=1,
                             signal_delay_s=cfg.executor.signal_delay_s)
        return ex
    ex = SlurmExecutor(folder)
    ex.stage = stage
    ex.update_parameters(**slurm_parameters(res, f"silmm-{cfg.run.name}-{stage}-{iteration}",
                                            cfg.executor.signal_delay_s))
    return ex


def parallelism(run: RunDir, stage: str) -> int:
    """How many tasks of a stage may be submitted and running at once."""
    cfg = run.config
    if cfg.executor.kind is ExecutorKind.local:
        return cfg.executor.local_parallelism
    if cfg.executor.kind is ExecutorKind.debug:
        return 1
    return 1 << 30  # Slurm throttles arrays itself (%array_parallelism, shared by the pieces of a split array)


def stages_side_by_side(ex: ExecutorConfig) -> bool:
    """Whether stages that do not depend on each other (questions and samples) run at once: on Slurm (each
    its own throttled array) and locally when several tasks may run (sharing local_parallelism); not in
    the debug executor or when one local task runs at a time."""
    return ex.kind is ExecutorKind.slurm or (ex.kind is ExecutorKind.local and ex.local_parallelism > 1)


def split_arrays(items: list[T], max_array_size: int) -> list[list[T]]:
    """Arrays larger than the cluster's MaxArraySize are submitted as several arrays."""
    return [items[i: i + max_array_size] for i in range(0, len(items), max_array_size)]


def share_throttle(throttle: int, chunks: int) -> list[int]:
    """The `%N` of each of `chunks` arrays so that together they run at most `throttle` tasks at once (an
    array runs at least one task: more pieces than `throttle` run one each)."""
    return [max(1, throttle // chunks + (1 if i < throttle % chunks else 0)) for i in range(chunks)]


# ------------------------------------------------------------------------------------ cluster limits
@dataclass(frozen=True)
class SlurmLimits:
    """What `scontrol show config` says about submissions; None: not known (no scontrol, or not set)."""

    max_array_size: int | None = None  # array indices must be below it: an array holds at most this many tasks
    max_job_count: int | None = None  # jobs slurmctld holds at once (each array task counts once started)
    job_requeue: bool | None = None  # JobRequeue: whether batch jobs are requeueable by default


def parse_scontrol_config(text: str) -> SlurmLimits:
    """`scontrol show config` output ("Key = value" lines) -> the limits silmm plans with."""
    values = dict(m.groups() for m in re.finditer(r"^\s*(\w+)\s*=\s*(\S+)", text, re.MULTILINE))

    def number(key: str) -> int | None:
        value = values.get(key, "")
        return int(value) if value.isdigit() else None

    requeue = number("JobRequeue")
    return SlurmLimits(number("MaxArraySize"), number("MaxJobCount"), None if requeue is None else requeue != 0)


@functools.lru_cache(maxsize=8)
def _limits_for(slurm_conf: str | None) -> SlurmLimits:
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:  # no scontrol here, or slurmctld not answering
        log.warning("scontrol show config failed (%s): arrays are split by executor.max_array_size only", exc)
        return SlurmLimits()
    limits = parse_scontrol_config(out.stdout)
    log.info("Slurm limits (scontrol show config): MaxArraySize=%s MaxJobCount=%s JobRequeue=%s",
             limits.max_array_size, limits.max_job_count, limits.job_requeue)
    if limits.job_requeue is False:
        log.warning("this cluster has JobRequeue=0 (scontrol show config): jobs are not requeued unless they ask; "
                    "silmm's stage jobs ask (--requeue). If a preempted task still does not come back (`scontrol "
                    "show job ID` says Requeue=0: the site refuses it), the driver counts it as a failure and "
                    "resubmits it up to executor.retries times; its flushed progress is kept")
    return limits


def slurm_limits() -> SlurmLimits:
    """The limits of the cluster SLURM_CONF points at, asked once per process (per driver) and cluster."""
    return _limits_for(os.environ.get("SLURM_CONF"))


def array_size_limit(max_array_size: int, limits: SlurmLimits) -> int:
    """Tasks per array: executor.max_array_size, within the cluster's MaxArraySize and MaxJobCount."""
    bounds = [max_array_size] + [v for v in (limits.max_array_size, limits.max_job_count) if v]
    return max(1, min(bounds))


def array_chunks(executor: submitit.Executor, run: RunDir, stage: str, batch: list[T]) -> Iterator[list[T]]:
    """`batch` as arrays that the cluster accepts: no larger than MaxArraySize (read from Slurm, so no setting
    is needed) or executor.max_array_size; on Slurm each piece gets its share of the stage's
    `array_parallelism` (set on `executor` before the piece is yielded for submission), so the pieces together
    run no more tasks at once than one array would."""
    cfg = run.config
    if cfg.executor.kind is not ExecutorKind.slurm:
        yield from split_arrays(batch, cfg.executor.max_array_size)
        return
    chunks = split_arrays(batch, array_size_limit(cfg.executor.max_array_size, slurm_limits()))
    for chunk, throttle in zip(chunks, share_throttle(cfg.resources(stage).array_parallelism, len(chunks)),
                               strict=True):
        executor.update_parameters(array_parallelism=throttle)
        yield chunk


# ------------------------------------------------------------------------------------ sbatch errors
class SubmissionError(RuntimeError):
    """sbatch refused a job; the message is one line: what Slurm said and what to change."""


# (pattern in sbatch's stderr, the fix); {name} fields come from the job's parameters and the cluster's limits
_SBATCH_FIXES = (
    ("invalid job array specification", "set executor.max_array_size below MaxArraySize={max_array_size} "
     "(`scontrol show config | grep MaxArraySize`)"),
    ("invalid partition", "set executor.default.partition (or executor.stages.{stage}.partition) to one of "
     "`sinfo -s`; it was {partition}"),
    ("invalid account", "set executor.default.account to one of yours (`sacctmgr show assoc user=$USER "
     "format=account,partition`); it was {account}"),
    ("invalid qos", "set executor.default.qos to one your account may use (`sacctmgr show assoc user=$USER "
     "format=qos`); it was {qos}"),
    ("time limit", "lower executor.stages.{stage}.time_min (or executor.default.time_min) to the partition's "
     "MaxTime (`sinfo -o '%P %l'`); it was {time} min"),
    ("node configuration is not available", "ask for what a node of the partition has: lower "
     "executor.stages.{stage}.cpus_per_task / mem_gb / gpus_per_node (`sinfo -N -o '%N %c %m %G'`)"),
    ("memory", "lower executor.stages.{stage}.mem_gb to what a node has (`sinfo -N -o '%N %m'`); it was {mem}"),
    ("qosmaxsubmitjob", "too many jobs queued for your QOS: lower executor.max_array_size, or wait and run "
     "the same command again (it submits only what is missing)"),
    ("unable to accept job", "slurmctld is at MaxJobCount={max_job_count} or busy: wait and run the same "
     "command again (it submits only what is missing)"),
    ("maxjobcount", "the cluster holds at most MaxJobCount={max_job_count} jobs: wait and run the same command "
     "again (it submits only what is missing)"),
)


def explain_sbatch_error(stderr: str, params: dict[str, Any], stage: str, limits: SlurmLimits) -> str:
    """sbatch's error -> "<job>: <Slurm's error line> -> <fix>" (one line)."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    said = next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else "sbatch failed (no message)")
    fields = {"stage": stage, "max_array_size": limits.max_array_size or "?", "max_job_count": limits.max_job_count
              or "?", **{k: params.get(k) for k in ("partition", "account", "qos", "time", "mem")}}
    fix = next((f.format(**fields) for pattern, f in _SBATCH_FIXES if pattern in said.lower()),
               "check the stage's resources (executor.default / executor.stages." + stage + ") against `sinfo`")
    return f"sbatch refused job {params.get('job_name', '?')}: {said} -> {fix}"


class LocalExecutor(submitit.LocalExecutor):
    """submitit's LocalExecutor whose job controllers stop on SIGINT (submitit's LocalJob.cancel, `silmm cancel`)
    even when the driver was started with SIGINT ignored, as `nohup silmm run ... &` in a script leaves it: an
    ignored signal stays ignored in every child, so a cancelled local job ran on, orphaned."""

    def _submit_command(self, command: str):
        with default_sigint():
            return super()._submit_command(command)


@contextlib.contextmanager
def default_sigint() -> Iterator[None]:
    """SIGINT at its default while the block starts processes (an exec resets handlers, not SIG_IGN)."""
    ignored = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        yield
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


class SlurmExecutor(submitit.SlurmExecutor):
    """submitit's SlurmExecutor whose submission errors are one line naming the fix (SubmissionError)."""

    stage = "?"  # named in the fix (executor.stages.<stage>.*); make_executor sets it

    def _internal_process_submissions(self, delayed_submissions: list[Any]) -> list[Any]:
        try:
            return super()._internal_process_submissions(delayed_submissions)
        except (FailedJobError, FailedSubmissionError) as exc:
            raise SubmissionError(explain_sbatch_error(str(exc), self.parameters, self.stage, slurm_limits())) from None


# ------------------------------------------------------------------------------------ task threads
def local_threads(run: RunDir, stage: str, cpus: int | None = None) -> int:
    """Torch threads of each local task of a stage: this machine's cores shared by the tasks that may run at
    once (local_parallelism for sharded stages, one task otherwise) and by each task's ranks. Fixed by the
    config and the machine, never by how many tasks happen to be running, so a resumed stage computes
    exactly what an uninterrupted one would (thread counts change float reductions)."""
    cfg = run.config
    at_once = cfg.executor.local_parallelism if stage in (*SHARD_STAGES, "eval") else 1
    return max(1, (cpus or os.cpu_count() or 1) // (at_once * cfg.resources(stage).tasks_per_node))


def allocated_cpus(environ: dict[str, str] | os._Environ = os.environ) -> tuple[int, str]:
    """The CPUs this task may use and where that number comes from: a local executor task, the driver's share
    of the machine; a Slurm task (submitit or a plain sbatch script), SLURM_CPUS_PER_TASK (Slurm's default
    of one CPU without it); in-process (debug executor, `python -m jobs.<stage>` by hand), OMP_NUM_THREADS
    when the user set it, else the CPUs this process may run on."""
    executor = environ.get("SUBMITIT_EXECUTOR", "")
    if executor == "local" and environ.get(TASK_THREADS_ENV, "").isdigit():
        return int(environ[TASK_THREADS_ENV]), "the local driver's share of this machine"
    if executor != "local" and "SLURM_JOB_ID" in environ:
        cpus = environ.get("SLURM_CPUS_PER_TASK", "")
        return (int(cpus), "SLURM_CPUS_PER_TASK") if cpus.isdigit() else (1, "Slurm's default of one CPU a task")
    if environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    return len(os.sched_getaffinity(0)), "this process's CPU affinity"


def set_task_threads() -> int:
    """First thing in every task: torch (and OpenMP in child processes) use exactly the task's CPUs. The same
    count on every executor is what makes a shard bit-identical wherever it was computed."""
    import torch

    threads, source = allocated_cpus()
    threads = max(1, threads)
    if "SUBMITIT_EXECUTOR" in os.environ or "SLURM_JOB_ID" in os.environ:  # the task's own process
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for the processes it starts (OpenMP reads it at start)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    log.info("torch threads: %d (%s)", threads, source)
    return threads


# ------------------------------------------------------------------------------------ plain sbatch path
def sbatch_options(res: StageResources, signal_delay_s: int | None, ranks: bool = False) -> list[str]:
    """A stage's resources as sbatch command-line options (they override the scripts' #SBATCH defaults).
    `signal_delay_s`: the USR2 the scripts trap to checkpoint (None: the script has no handler); `ranks`:
    the train job's nodes and tasks (the array stages run one task per shard)."""
    opts = [f"--{k}={getattr(res, k)}" for k in ("partition", "account", "qos", "constraint") if getattr(res, k)]
    opts += [f"--cpus-per-task={res.cpus_per_task}", f"--mem={int(res.mem_gb * 1024)}M", f"--time={res.time_min}"]
    if res.gpus_per_node:
        opts.append(f"--gpus-per-node={res.gpus_per_node}")
    if ranks:
        opts += [f"--nodes={res.nodes}", f"--ntasks-per-node={res.tasks_per_node}"]
    if signal_delay_s is not None:
        opts.append(f"--signal=B:USR2@{signal_delay_s}")
    opts += [f"--{k}" if v is True else f"--{k}={v}" for k, v in res.additional_parameters.items()]
    return opts


def _array_jobs(name: str, count: int, first: int, limit: int, throttle: int,
                per_task: int = 1) -> list[tuple[str, int, int, int]]:
    """(shell variable, offset, size, %N) of the arrays that run shards first..count-1, ``per_task`` shards per
    array task: indices start at 0 in each array (they must stay below MaxArraySize), the offset is the first
    shard of its array (index i runs shards offset + i * per_task onwards); %N shared (share_throttle)."""
    tasks = -(-(count - first) // per_task)  # array tasks in all, the last one maybe with fewer shards
    starts = list(range(0, tasks, limit))
    throttles = share_throttle(throttle, len(starts))
    return [(f"{name}_{i}" if len(starts) > 1 else name, first + start * per_task, min(limit, tasks - start), t)
            for i, (start, t) in enumerate(zip(starts, throttles, strict=True))]


# the sharded stages each one reads (the sbatch chain's afterok dependencies)
_INPUTS = {"prompts": (), "questions": ("prompts",), "samples": ("prompts",), "scores": ("questions", "samples")}


def sbatch_iteration(run: RunDir, iteration: int, limits: SlurmLimits, scripts: str = "slurm/sbatch") -> str:
    """The shell commands that run one iteration with plain sbatch and afterok dependencies: each sharded stage
    as arrays over its shards (`shards_per_task` shards per array task; split within MaxArraySize, the
    throttle shared), questions and samples side by side after prompts, scores after both, then pairs, then
    train; job names after run/stage/iteration, logs under the run, the run's resources
    (executor.default/stages)."""
    from silmm.config import PromptSource

    cfg = run.config
    count = cfg.num_shards  # with prompt files an upper bound (prompts.count): tasks past the real count exit 0
    files = cfg.prompts.source is PromptSource.files
    limit = array_size_limit(cfg.executor.max_array_size, limits)
    lines = [f"# iteration {iteration} of run {run.path} (config {run.config_hash}), printed by `silmm init`.",
             "# Run it from the silmm checkout (the scripts are in slurm/sbatch) with silmm's Python environment",
             "# active: sbatch passes this environment on to the jobs. `silmm status RUN` follows it.",
             "set -euo pipefail", f"RUN={run.path}", 'mkdir -p "$RUN/logs/slurm"']
    setup = sorted({line for s in (*SHARD_STAGES, "pairs", "train") for line in cfg.resources(s).setup})
    if setup:
        lines.insert(3, "# the run's executor setup lines, to run first in this shell: " + "; ".join(setup))
    after: list[str] = []

    def submit(var: str, stage: str, script: str, args: str, extra: list[str]) -> None:
        res = cfg.resources(stage)
        signal = None if stage == "pairs" else cfg.executor.signal_delay_s
        dep = [f"--dependency=afterok:{':'.join('$' + v for v in after)}"] if after else []
        log = "%x-%A_%a.out" if "--array" in " ".join(extra) else "%x-%j.out"
        opts = [f"--job-name=silmm-{cfg.run.name}-{stage}-{iteration}", f'--output="$RUN/logs/slurm/{log}"',
                *dep, *extra, *sbatch_options(res, signal, ranks=stage == "train")]
        lines.append(f"{var}=$(sbatch --parsable {' '.join(opts)} {scripts}/{script} \"$RUN\" {iteration}{args} "
                     "| cut -d';' -f1)")

    jobs: dict[str, list[str]] = {}  # stage -> its array jobs' shell variables
    for stage in SHARD_STAGES:
        # questions and samples read only the prompts: both wait for them, side by side; scores waits for both
        after = [v for s in _INPUTS[stage] for v in jobs[s]]
        jobs[stage] = []
        res = cfg.resources(stage)
        first = 1 if stage == "prompts" and files else 0
        if first:  # prompt files: shard 0 first; the files' shard count is known once it is written
            submit("prompts_first", stage, "stage.sh", " prompts", ["--array=0"])
            after, jobs[stage] = ["prompts_first"], ["prompts_first"]
        for var, offset, size, pct in _array_jobs(stage, count, first, limit, res.array_parallelism,
                                                  res.shards_per_task):
            env = [f"SILMM_SHARD_OFFSET={offset}"] if offset else []
            if res.shards_per_task > 1:  # stage.sh: array index i runs shards offset + i * per_task onwards
                env.append(f"SILMM_SHARDS_PER_TASK={res.shards_per_task}")
            export = [f"--export=ALL,{','.join(env)}"] if env else []
            submit(var, stage, "stage.sh", f" {stage}", [f"--array=0-{size - 1}%{pct}", *export])
            jobs[stage].append(var)
    after = jobs["scores"]
    submit("pairs", "pairs", "pairs.sh", "", [])
    after = ["pairs"]
    submit("train", "train", "train.sh", "", [])
    lines.append('echo "iteration ' + str(iteration) + ' submitted: train job $train (afterok chain)"')
    return "\n".join(lines) + "\n"
