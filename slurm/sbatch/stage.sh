#!/usr/bin/env bash
# One stage of one iteration as a plain Slurm array job: one array task per shard, or per SILMM_SHARDS_PER_TASK
# shards (run in one process, in order, the model loaded once).
# For people who drive stages with sbatch instead of `silmm run`. `silmm init CONFIG` creates the run
# and prints every command of an iteration (job names, logs under the run, resources, afterok chain);
# by hand:
#
#   sbatch --array=0-63%16 slurm/sbatch/stage.sh RUN_DIR ITERATION STAGE [--benchmark NAME]
#
# STAGE is prompts, questions, samples or scores (pairs and train: see pairs.sh, train.sh), or eval with
# --benchmark NAME (a key of eval.benchmarks; ITERATION 0 is the base model), followed by its results step:
#   sbatch --array=0 --dependency=afterok:<eval job id> slurm/sbatch/stage.sh RUN_DIR ITERATION eval_results --benchmark NAME
# `silmm shards RUN_DIR ITERATION STAGE` prints a stage's shard count. A task whose index is at or past
# it exits 0 with a message (so an array sized by an upper bound, e.g. for prompt files, still lets an
# afterok chain go on). Arrays whose indices would reach the cluster's MaxArraySize take an offset:
# sbatch --export=ALL,SILMM_SHARD_OFFSET=1000 --array=0-999 ... runs shards 1000-1999. With
# SILMM_SHARDS_PER_TASK=K (the stage's executor shards_per_task; `silmm init` prints it) array index I runs
# shards OFFSET + I*K to OFFSET + I*K + K-1 (the last task fewer when the count is not a multiple of K):
# sbatch --export=ALL,SILMM_SHARDS_PER_TASK=4 --array=0-15 ... runs shards 0-63, four per task.
#
# Resources: the #SBATCH lines below are CPU-safe defaults (1 CPU, 4 GB, 1 h, no GPU). sbatch options on
# the command line override them (-c 8 --mem=64G --gpus-per-node=1 --time=04:00:00 -p gpu), and so do
# sbatch's input variables (SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_QOS, SBATCH_TIMELIMIT,
# SBATCH_MEM_PER_NODE, SBATCH_GPUS_PER_NODE). Torch uses the task's CPUs (SLURM_CPUS_PER_TASK).
# Each task resumes its shard from on-disk progress, so requeue (preemption, time limit) is safe; the
# log is appended to, so a requeued task keeps its earlier attempt's lines.
#SBATCH --job-name=silmm-stage
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR2@120
#SBATCH --time=01:00:00
#SBATCH --cpus-per-task=1
#SBATCH --mem=4G
#SBATCH --output=slurm-%x-%A_%a.out
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: sbatch --array=0-N slurm/sbatch/stage.sh RUN_DIR ITERATION STAGE [--benchmark NAME]" >&2
  exit 2
fi
run_dir=$1 iteration=$2 stage=$3
shift 3  # the rest (--benchmark NAME) goes to the job as it is
per_task=${SILMM_SHARDS_PER_TASK:-1}
if ! [ "$per_task" -ge 1 ] 2>/dev/null; then
  echo "silmm: SILMM_SHARDS_PER_TASK=$per_task: expected a whole number >= 1" >&2
  exit 2
fi
shard=$(( ${SLURM_ARRAY_TASK_ID:?run this script as an array job: sbatch --array=...} * per_task + ${SILMM_SHARD_OFFSET:-0} ))
last=$(( shard + per_task - 1 ))

# the stage's shard count (unknown only for prompts read from files before their first shard exists)
if count=$(python -m silmm shards "$run_dir" "$iteration" "$stage" "$@"); then
  if [ "$shard" -ge "$count" ]; then
    echo "silmm: shard $shard of $stage (iteration $iteration) is out of range: the stage has $count shard(s); nothing to do"
    exit 0
  fi
  if [ "$last" -ge "$count" ]; then
    last=$(( count - 1 ))
  fi
fi
if [ "$last" -gt "$shard" ]; then
  shards=(--shards "$shard-$last")
else
  shards=(--shard "$shard")
fi

# On USR2 (sent 120 s before the time limit, or on preemption) the task flushes its progress and
# exits; then this array task is put back in the queue and resumes where it stopped (shards done are skipped).
python -m jobs."$stage" --run "$run_dir" --iteration "$iteration" "${shards[@]}" "$@" &
pid=$!
requeue() {
  echo "silmm: USR2 received, checkpointing shard(s) ${shards[*]:1} and requeueing"
  kill -USR2 "$pid" 2>/dev/null || true
  wait "$pid" || true
  scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  exit 0
}
trap requeue USR2
wait "$pid"
