#!/usr/bin/env bash
# Pair selection of one iteration (one task, CPU only). Usage:
#   sbatch --dependency=afterok:<scores job> slurm/sbatch/pairs.sh RUN_DIR ITERATION
#SBATCH --job-name=silmm-pairs
#SBATCH --time=01:00:00
#SBATCH --cpus-per-task=4
#SBATCH --mem=32G
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
exec python -m jobs.pairs --run "$1" --iteration "$2" --shard 0
