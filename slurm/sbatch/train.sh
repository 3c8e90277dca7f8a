#!/usr/bin/env bash
# DPO / KC-DPO training of one iteration with DeepSpeed: one task per rank (per GPU on a GPU node),
# started by srun; each task sets up torch.distributed from the Slurm environment (silmm/distributed.py).
# Usage (`silmm init` prints it with the run's resources):
#   sbatch --dependency=afterok:<pairs job> slurm/sbatch/train.sh RUN_DIR ITERATION
# The #SBATCH lines are CPU-safe defaults (one task, 1 CPU, 4 GB, no GPU); on GPUs, e.g.
#   sbatch --ntasks-per-node=4 --gpus-per-node=4 -c 8 --mem=256G --time=12:00:00 slurm/sbatch/train.sh RUN K
# (the batch is train.batch_size x grad_accum x ranks: the run's config must agree with the ranks).
# On USR2 the trainer saves a DeepSpeed checkpoint and exits; the job is requeued and resumes.
#SBATCH --job-name=silmm-train
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR2@300
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=1
#SBATCH --mem=4G
#SBATCH --time=01:00:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: sbatch slurm/sbatch/train.sh RUN_DIR ITERATION" >&2
  exit 2
fi
srun python -m jobs.train --run "$1" --iteration "$2" &
pid=$!
requeue() {
  echo "silmm: USR2 received, checkpointing and requeueing"
  kill -USR2 "$pid" 2>/dev/null || true   # srun forwards it to every task
  wait "$pid" || true
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
trap requeue USR2
wait "$pid"
