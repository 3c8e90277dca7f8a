#!/usr/bin/env bash
# Stop the single-node Slurm cluster started by slurm/start_local_slurm.sh.
#
#   slurm/stop_local_slurm.sh [BASE] [--purge]
#
# BASE defaults to /tmp/silmm_slurm (or $SLURM_LOCAL_BASE), as for the start script.
#
#   1. Cancels every job of the cluster and waits (up to 30 s) for them to go, so that no
#      slurmstepd or job process outlives slurmd.
#   2. Sends SIGTERM to slurmd, slurmctld, slurmdbd, mariadbd and munged, in that order,
#      each by the pid in BASE/run/*.pid after checking the process name (SIGKILL after
#      20 s). A zombie counts as stopped. All of it takes 2-3 s.
#   3. Kills what is left of the cluster (found by SLURM_CONF=BASE/etc/slurm.conf in the
#      process environment): a daemon whose pid file was lost, a job that outlived slurmd.
#   4. Removes /etc/slurm/slurm.conf if it is the symlink into BASE the start script made.
#   --purge also deletes BASE (state, accounting database, logs).
# Safe to run when nothing is running or BASE does not exist. Exits 1 if a daemon or job
# process of this cluster is still alive at the end.
set -uo pipefail

BASE=${SLURM_LOCAL_BASE:-/tmp/silmm_slurm}
PURGE=0
for arg in "$@"; do
  case "$arg" in
    --purge) PURGE=1 ;;
    -h | --help) sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "unknown option $arg" >&2; exit 2 ;;
    *) BASE=$arg ;;
  esac
done
export PATH=$PATH:/usr/sbin:/sbin
log() { printf '[stop_local_slurm %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
[ -d "$BASE" ] || { log "nothing to stop: no directory $BASE"; exit 0; }
BASE=$(cd "$BASE" && pwd -P)
RUN=$BASE/run
export SLURM_CONF=$BASE/etc/slurm.conf

alive() {  # alive PID: the process exists and is not a zombie waiting for its parent
  local state
  read -r _ _ state _ 2>/dev/null < "/proc/$1/stat" && [ "$state" != Z ]
}
pid_of() {  # pid_of NAME COMM: print the pid in RUN/NAME.pid if it is alive and named COMM
  local pf=$RUN/$1.pid pid
  [ -s "$pf" ] || return 1
  pid=$(tr -dc '0-9' < "$pf")
  [ -n "$pid" ] && alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
  echo "$pid"
}
stop_one() {  # stop_one NAME COMM
  local pid
  pid=$(pid_of "$1" "$2") || { log "$2 not running"; return 0; }
  log "stopping $2 (pid $pid)"
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 1 100); do
    alive "$pid" || { rm -f "$RUN/$1.pid"; return 0; }
    sleep 0.2
  done
  log "$2 (pid $pid) still alive after 20 s, sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null
  rm -f "$RUN/$1.pid"
}

# 1. jobs. %F is the array master id (or the plain job id): an id like "43_[1-3%2]" would
#    make scancel fail for all the ids given.
if pid_of slurmctld slurmctld >/dev/null && [ -f "$SLURM_CONF" ]; then
  jobs=$(squeue -h -o %F 2>/dev/null | sort -u | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    log "cancelling all jobs: $jobs"
    # shellcheck disable=SC2086  # one argument per id
    scancel --quiet $jobs 2>/dev/null || true
    if pid_of slurmd slurmd >/dev/null; then  # without slurmd they stay COMPLETING
      for _ in $(seq 1 60); do
        [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
        sleep 0.5
      done
    fi
    left=$(squeue -h -o '%i %T' 2>/dev/null | tr '\n' ' ')
    [ -n "$left" ] && log "WARNING: jobs still listed: $left"
  fi
fi

# 2. daemons, compute side first (slurmctld's helper slurmscriptd exits with it)
stop_one slurmd slurmd
stop_one slurmctld slurmctld
stop_one slurmdbd slurmdbd
stop_one mysqld mariadbd
stop_one munged munged

# 3. leftovers of this cluster, found by SLURM_CONF=BASE/etc/slurm.conf in their environment
#    (the daemons inherit it from the start script, jobs get it from slurmd): a daemon whose
#    pid file was lost, or a slurmstepd or job process (SLURM_JOB_ID set) that outlived
#    slurmd. They get SIGTERM, then SIGKILL after 5 s.
leftovers() {
  local f pid comm
  grep -lszxF "SLURM_CONF=$SLURM_CONF" /proc/[0-9]*/environ | while read -r f; do
    pid=${f#/proc/}; pid=${pid%/environ}
    alive "$pid" || continue
    read -r comm 2>/dev/null < "/proc/$pid/comm" || continue
    case "$comm" in
      munged | mariadbd | slurmdbd | slurmctld | slurmscriptd | slurmd | slurmstepd) echo "$pid" ;;
      *) if grep -qsz '^SLURM_JOB_ID=' "$f"; then echo "$pid"; fi ;;
    esac
  done
  return 0
}
pids=$(leftovers)
if [ -n "$pids" ]; then
  for p in $pids; do
    log "WARNING: killing leftover pid $p: $(tr '\0' ' ' 2>/dev/null < "/proc/$p/cmdline" | cut -c1-80)"
  done
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null
  for _ in $(seq 1 25); do
    pids=$(leftovers); [ -z "$pids" ] && break
    sleep 0.2
  done
  # shellcheck disable=SC2086
  [ -n "$pids" ] && kill -KILL $pids 2>/dev/null && sleep 0.5
fi

if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$BASE/etc/slurm.conf" ]; then
  rm -f /etc/slurm/slurm.conf
fi
pids=$(leftovers)
if [ -n "$pids" ]; then
  log "ERROR: processes of this cluster still alive: $pids"
  exit 1
fi
if [ "$PURGE" = 1 ]; then
  log "removing $BASE"
  rm -rf "$BASE"
fi
log "done"
