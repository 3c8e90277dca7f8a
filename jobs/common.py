"""Command-line entry shared by every stage job: `python -m jobs.<stage> --run RUN --iteration K --shard I`
(eval stages also `--benchmark NAME`)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys


def main(stage: str, argv: list[str] | None = None, benchmark: bool = False) -> int:
    from silmm.tasks import StageTask, run_task

    p = argparse.ArgumentParser(prog=f"python -m jobs.{stage}", description=f"run one shard of the {stage} stage")
    p.add_argument("--run", required=True, help="run directory (holds config.yaml)")
    p.add_argument("--iteration", type=int, required=True)
    if benchmark:  # eval, eval_results: one task per (iteration, benchmark, shard)
        p.add_argument("--benchmark", required=True, help="benchmark name (a key of eval.benchmarks)")
    p.add_argument("--shard", type=int, default=None,
                   help="shard index (default: $SLURM_ARRAY_TASK_ID, so sbatch arrays need no wrapper)")
    args = p.parse_args(argv)
    shard = args.shard
    if shard is None:
        import os

        if "SLURM_ARRAY_TASK_ID" not in os.environ:
            p.error("--shard is required outside a Slurm array job")
        shard = int(os.environ["SLURM_ARRAY_TASK_ID"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    signal.signal(signal.SIGUSR2, _preempted)  # slurm/sbatch/*.sh forward USR2 before the time limit
    signal.signal(signal.SIGTERM, _preempted)
    from silmm.store import ShardError

    try:
        run_task(StageTask(args.run, args.iteration, stage, shard, getattr(args, "benchmark", "")))
    except ShardError as exc:  # a missing or damaged input: the message names the file, a traceback adds nothing
        print(f"{stage}: shard error: {exc}", file=sys.stderr)
        return 1
    return 0


def _preempted(signum: int, _frame) -> None:
    """Keep what is computed, then exit; the re-run task resumes after the last flushed prompt."""
    from silmm import tasks

    writer = tasks._active_writer
    if writer is not None and not writer.flushing:
        writer.flush()
    logging.getLogger("jobs").warning("signal %d: progress flushed, exiting for requeue", signum)
    raise SystemExit(128 + signum)
