#!/usr/bin/env bash
# Pair selection of one iteration (one task, CPU only). Usage (`silmm init` prints it with the run's resources):
#   sbatch --dependency=afterok:<scores job> slurm/sbatch/pairs.sh RUN_DIR ITERATION
# The #SBATCH lines are defaults; sbatch options on the command line (or SBATCH_* variables) override them.
#SBATCH --job-name=silmm-pairs
#SBATCH --time=01:00:00
#SBATCH --cpus-per-task=1
#SBATCH --mem=4G
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: sbatch slurm/sbatch/pairs.sh RUN_DIR ITERATION" >&2
  exit 2
fi
exec python -m jobs.pairs --run "$1" --iteration "$2" --shard 0
