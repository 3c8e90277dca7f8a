"""Executors: the same stage tasks run in-process, on this machine, or on Slurm by changing
`executor.kind` (debug | local | slurm). Built on submitit; resources come from `executor.default`
with per-stage overrides (`executor.stages.<stage>`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import submitit

from silmm.config import ExecutorKind, StageResources
from silmm.rundir import RunDir

T = TypeVar("T")


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
        "additional_parameters": dict(res.additional_parameters),
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
        ex = submitit.LocalExecutor(folder)
        ex.update_parameters(timeout_min=res.time_min, tasks_per_node=res.tasks_per_node, nodes=1,
                             signal_delay_s=cfg.executor.signal_delay_s)
        return ex
    ex = submitit.SlurmExecutor(folder)
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
    return 1 << 30  # Slurm throttles arrays itself (%array_parallelism)


def split_arrays(items: list[T], max_array_size: int) -> list[list[T]]:
    """Arrays larger than the cluster's MaxArraySize are submitted as several arrays."""
    return [items[i: i + max_array_size] for i in range(0, len(items), max_array_size)]
