"""Process-group set-up for training: one rank per process, world size taken from the launcher.

Launchers, in the order they are recognised (the first match wins):

- ``torchrun`` (or any launcher that sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``): used as is.
- Slurm tasks started by ``srun`` (also submitit's Slurm executor with ``tasks_per_node > 1``) with
  ``SLURM_NTASKS > 1``: ``RANK = SLURM_PROCID``, ``WORLD_SIZE = SLURM_NTASKS``, ``LOCAL_RANK = SLURM_LOCALID``,
  ``MASTER_ADDR`` = the first host of ``SLURM_JOB_NODELIST`` and a port derived from the job id (every
  rank must compute the same one without talking to the others).
- submitit's local executor with several tasks (``SUBMITIT_LOCAL_NTASKS > 1``): the same from its variables.
- Anything else is world size 1: ``RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1`` and a free port.
  DeepSpeed would otherwise try MPI discovery (and fail without ``mpi4py``).

The backend is gloo on CPU and NCCL on CUDA. A process group, once initialised, is reused by later calls
in the same process (tests train several tiny runs in one process).

No C++ extension is built: on CPU, ``deepspeed.init_distributed`` would JIT-compile its shared-memory op
(``deepspeed_shm_comm``) into ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions/py3X_cpu``, shared by
every job of the user. torch guards that build with an empty ``<dir>/deepspeed_shm_comm/lock`` file and
waits, without a time-out, until it is gone: a build killed midway made every later job hang. The op
serves only DeepSpeed's ``inference_all_reduce`` (tensor-parallel inference); training all-reduces go
through gloo/NCCL. :func:`init` marks it not compatible (``deepspeed.ops.__compatible_ops__``, the
cached dict DeepSpeed itself reads), so nothing is built and no lock is waited on.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port nobody listens on right now (only safe for world size 1: no other rank needs it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_port(job_id: str) -> int:
    """A port every rank of one job derives alike, spread over 20000-39999 so concurrent jobs rarely meet."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 20000 + int(digits) % 20000


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``scontrol show hostnames`` when present, else parsed here
    (``node[03-05,9],gpu1`` -> ``node03``), so that a login-node-less container still works."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=False)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise RuntimeError(f"cannot read a host name from SLURM_JOB_NODELIST={nodelist!r}")
    prefix, _, ranges = head.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def launcher_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT this process should use."""
    env = dict(os.environ if env is None else env)
    if "WORLD_SIZE" in env and "RANK" in env:
        out = {k: env[k] for k in ("RANK", "WORLD_SIZE")}
        out["LOCAL_RANK"] = env.get("LOCAL_RANK", env["RANK"])
        out["MASTER_ADDR"] = env.get("MASTER_ADDR", "127.0.0.1")
        out["MASTER_PORT"] = env.get("MASTER_PORT") or str(free_port())
        return out
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
                "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
                "MASTER_ADDR": first_host(env["SLURM_JOB_NODELIST"]),
                "MASTER_PORT": env.get("MASTER_PORT") or str(job_port(env.get("SLURM_JOB_ID", "0")))}
    if int(env.get("SUBMITIT_LOCAL_NTASKS", "1")) > 1:
        return {"RANK": env["SUBMITIT_LOCAL_GLOBALID"], "WORLD_SIZE": env["SUBMITIT_LOCAL_NTASKS"],
                "LOCAL_RANK": env.get("SUBMITIT_LOCAL_LOCALID", "0"), "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": env.get("MASTER_PORT") or str(job_port(env.get("SUBMITIT_LOCAL_JOB_ID", "0")))}
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": env.get("MASTER_PORT") or str(free_port())}


SHM_OP = "deepspeed_shm_comm"  # the op DeepSpeed's CPU communication backend would compile at init


def skip_extension_builds() -> None:
    """Make DeepSpeed's communication backend skip its JIT-built op (see the module docstring); call before
    ``deepspeed.init_distributed``, which builds it when its accelerator has the op (CPU) marked compatible.
    Other accelerators have no such op: nothing is touched (reading the dict would probe every op)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().create_op_builder("ShareMemCommBuilder") is not None:
        deepspeed.ops.__compatible_ops__[SHM_OP] = False


def init(device: torch.device) -> DistEnv:
    """Export the launcher's rank variables and initialise the process group (once per process)."""
    if device.type == "cpu":
        # before DeepSpeed picks its accelerator: avoids the CUDA probe and its warning
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    skip_extension_builds()
    if not dist.is_initialized():
        os.environ.update(launcher_env())
        if device.type == "cuda":  # before NCCL starts, and before the model lands on "cuda"
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        deepspeed.init_distributed(dist_backend="gloo" if device.type == "cpu" else "nccl")
    else:
        # a group this process joined earlier, whose variables may have gone since (submitit's debug executor
        # restores the environment after each in-process job); DeepSpeed reads them again on every engine
        os.environ.setdefault("RANK", str(dist.get_rank()))
        os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
        os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    return DistEnv(dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_world_size())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; returns ``t`` (a no-op at world size 1, but always a valid call)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
