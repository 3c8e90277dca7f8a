#!/usr/bin/env bash
# DPO / KC-DPO training of one iteration with DeepSpeed: one task per GPU, started by srun; each task
# sets up torch.distributed from the Slurm environment (silmm/distributed.py). Usage:
#   sbatch --dependency=afterok:<pairs job> slurm/sbatch/train.sh RUN_DIR ITERATION
# On USR2 the trainer saves a DeepSpeed checkpoint and exits; the job is requeued and resumes.
#SBATCH --job-name=silmm-train
#SBATCH --requeue
#SBATCH --signal=B:USR2@300
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --mem=256G
#SBATCH --time=12:00:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
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
