#!/usr/bin/env bash
# Install, non-interactively, the Debian packages the local Slurm cluster needs (slurmctld,
# slurmd, slurm-client, munge, slurmdbd, mariadb-server), so that the tests marked `slurm`
# do not spend their time in apt. .ci/run calls it before the tests.
#
# The package list lives in one place: this runs slurm/start_local_slurm.sh --install-only,
# which installs only what is missing (with a policy-rc.d so no system service starts) and
# starts nothing. Needs root, or passwordless sudo. Takes about 12 s on a 2-core VM.
set -euo pipefail

start_script="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/slurm/start_local_slurm.sh"
if [ "$(id -u)" = 0 ]; then
  exec "$start_script" --install-only
fi
exec sudo -n -E "$start_script" --install-only
