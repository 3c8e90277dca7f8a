#!/usr/bin/env bash
# One stage of one iteration as a plain Slurm array job: one array task per shard.
# For people who drive stages with sbatch instead of `silmm run`. Usage:
#
#   sbatch --array=0-63%16 slurm/sbatch/stage.sh RUN_DIR ITERATION STAGE [--benchmark NAME]
#
# STAGE is prompts, questions, samples or scores (pairs and train: see pairs.sh, train.sh), or eval with
# --benchmark NAME (a key of eval.benchmarks; ITERATION 0 is the base model), followed by its results step:
#   sbatch --array=0 --dependency=afterok:<eval job id> slurm/sbatch/stage.sh RUN_DIR ITERATION eval_results --benchmark NAME
# `silmm status RUN_DIR` prints the eval shard counts.
# The number of shards is ceil(prompts.count / sharding.prompts_per_shard); `silmm inspect RUN_DIR`
# prints it. Stages depend on each other: chain them with --dependency=afterok:<job id>.
# Each task resumes its shard from on-disk progress, so requeue (preemption, time limit) is safe.
#SBATCH --job-name=silmm-stage
#SBATCH --requeue
#SBATCH --signal=B:USR2@120
#SBATCH --time=04:00:00
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --gpus-per-node=1
#SBATCH --output=slurm-%x-%A_%a.out
set -euo pipefail
run_dir=$1 iteration=$2 stage=$3
shift 3  # the rest (--benchmark NAME) goes to the job as it is

# On USR2 (sent 120 s before the time limit, or on preemption) the task flushes its progress and
# exits; then this array task is put back in the queue and resumes where it stopped.
python -m jobs."$stage" --run "$run_dir" --iteration "$iteration" --shard "$SLURM_ARRAY_TASK_ID" "$@" &
pid=$!
requeue() {
  echo "silmm: USR2 received, checkpointing shard $SLURM_ARRAY_TASK_ID and requeueing"
  kill -USR2 "$pid" 2>/dev/null || true
  wait "$pid" || true
  scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  exit 0
}
trap requeue USR2
wait "$pid"
