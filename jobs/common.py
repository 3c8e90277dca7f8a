"""Command-line entry shared by every stage job: `python -m jobs.<stage> --run RUN --iteration K --shard I`
(eval stages also `--benchmark NAME`), or `--shards FIRST-LAST` for several shards in one process."""

from __future__ import annotations

import argparse
import logging
import signal
import sys


def main(stage: str, argv: list[str] | None = None, benchmark: bool = False) -> int:
    from silmm.tasks import ShardGroup, StageTask, run_group, run_task

    p = argparse.ArgumentParser(prog=f"python -m jobs.{stage}", description=f"run one shard of the {stage} stage")
    p.add_argument("--run", required=True, help="run directory (holds config.yaml)")
    p.add_argument("--iteration", type=int, required=True)
    if benchmark:  # eval, eval_results: one task per (iteration, benchmark, shard)
        p.add_argument("--benchmark", required=True, help="benchmark name (a key of eval.benchmarks)")
    p.add_argument("--shard", type=int, default=None,
                   help="shard index (default: $SLURM_ARRAY_TASK_ID, so sbatch arrays need no wrapper)")
    p.add_argument("--shards", default=None, metavar="FIRST-LAST",
                   help="several shards in one process, in order, the model loaded once (slurm/sbatch/stage.sh "
                        "with shards_per_task > 1)")
    args = p.parse_args(argv)
    shard = args.shard
    if args.shards is not None:
        first, _, last = args.shards.partition("-")
        if args.shard is not None or not (first.isdigit() and last.isdigit() and int(first) <= int(last)):
            p.error(f"--shards {args.shards}: expected FIRST-LAST (e.g. 4-7), without --shard")
        shard = int(first)
    elif shard is None:
        import os

        if "SLURM_ARRAY_TASK_ID" not in os.environ:
            p.error("--shard is required outside a Slurm array job")
        shard = int(os.environ["SLURM_ARRAY_TASK_ID"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    signal.signal(signal.SIGUSR2, _preempted)  # slurm/sbatch/*.sh forward USR2 before the time limit
    signal.signal(signal.SIGTERM, _preempted)
    from silmm.store import ShardError

    bench = getattr(args, "benchmark", "")
    try:
        if args.shards is not None:
            run_group(ShardGroup(args.run, args.iteration, stage, tuple(range(shard, int(last) + 1)), bench))
        else:
            run_task(StageTask(args.run, args.iteration, stage, shard, bench))
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
