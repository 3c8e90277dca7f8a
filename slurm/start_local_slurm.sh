#!/usr/bin/env bash
# Start a real single-node Slurm cluster on 127.0.0.1 (Debian/Ubuntu, run as root).
#
#   slurm/start_local_slurm.sh [BASE]          install what is missing, configure, start
#   slurm/start_local_slurm.sh --install-only  only install the packages (for CI images)
#
# BASE defaults to /tmp/silmm_slurm (or $SLURM_LOCAL_BASE). It must be 80 characters or
# fewer, because the munge and MariaDB unix sockets live under it.
#
# What it does:
#   1. apt-get installs the missing packages: slurmctld slurmd slurm-client munge, plus
#      slurmdbd mariadb-server for accounting. A temporary /usr/sbin/policy-rc.d
#      (exit 101) keeps the packages from starting their system-wide services.
#   2. Writes slurm.conf, slurmdbd.conf and a munge key under BASE/ (nothing in /etc/munge
#      or /run/munge is used) and starts, without systemd, munged -> mariadbd -> slurmdbd
#      -> slurmctld -> slurmd, each with its pid file in BASE/run and its log in BASE/log.
#   3. Registers the cluster, an account "default" and root in the accounting database,
#      then waits until the node is idle.
# Safe to run again: it only starts the daemons that are not running. If the generated
# configuration differs from the running one (other env vars), it stops the cluster first.
# Stop with slurm/stop_local_slurm.sh.
#
# Use the cluster:
#   source BASE/env.sh                 # exports SLURM_CONF=BASE/etc/slurm.conf
#   sbatch -p debug --wrap 'hostname'; squeue; sacct
# With SLURM_LOCAL_LINK_ETC=1 (default) /etc/slurm/slurm.conf is also a symlink to the
# generated file, so the Slurm commands work without SLURM_CONF.
#
# Environment variables (all optional):
#   SLURM_LOCAL_BASE=/tmp/silmm_slurm  BASE when no argument is given.
#   SLURM_LOCAL_ACCOUNTING=1   1: MariaDB + slurmdbd, so `sacct` works. submitit needs it:
#                              without sacct, job.result() hangs forever on a cancelled,
#                              killed or timed-out job. 0: no accounting (starts in <1 s).
#   SLURM_LOCAL_CPUS=<n>       CPUs advertised for the node (default: the real count). A
#                              larger value oversubscribes (SlurmdParameters=config_overrides).
#   SLURM_LOCAL_MEM_MB=<n>     RealMemory of the node (default: what `slurmd -C` reports).
#   SLURM_LOCAL_PARTITION=debug  name of the single (default) partition.
#   SLURM_LOCAL_CLUSTER=localcluster
#   SLURM_LOCAL_PORT_BASE=6817 slurmctld=PORT_BASE, slurmd=+1, slurmdbd=+2, mariadb=+3.
#                              Two clusters can run side by side with different values
#                              (and SLURM_LOCAL_LINK_ETC=0).
#   SLURM_LOCAL_CRED_EXPIRE=10 seconds; a requeued job waits this long before it may run
#                              again (Slurm's default is 120).
#   SLURM_LOCAL_MAX_ARRAY_SIZE=100000  MaxArraySize: array indices must be below it (real
#                              clusters often have 1001); a small value tests array splitting.
#   SLURM_LOCAL_MAX_JOB_COUNT=100000   MaxJobCount: jobs slurmctld holds at once.
#   SLURM_LOCAL_JOB_REQUEUE=1  JobRequeue: 0 makes jobs non-requeueable unless they ask (--requeue).
#   SLURM_LOCAL_LINK_ETC=1     symlink /etc/slurm/slurm.conf -> BASE/etc/slurm.conf (only if
#                              that path is absent or already a symlink). 0: leave /etc alone.
#   SLURM_LOCAL_SKIP_INSTALL=0 1: never call apt-get; exit 3 if a package is missing.
#
# Exit status: 0 cluster up (or packages installed), 1 start failed, 2 usage error,
# 3 packages missing and not installable (SLURM_LOCAL_SKIP_INSTALL=1, no apt-get, apt failed).
set -euo pipefail

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }

INSTALL_ONLY=0
BASE=${SLURM_LOCAL_BASE:-/tmp/silmm_slurm}
for arg in "$@"; do
  case "$arg" in
    --install-only) INSTALL_ONLY=1 ;;
    -h | --help) usage; exit 0 ;;
    -*) usage >&2; exit 2 ;;
    *) BASE=$arg ;;
  esac
done

ACCOUNTING=${SLURM_LOCAL_ACCOUNTING:-1}
PORT_BASE=${SLURM_LOCAL_PORT_BASE:-6817}
PARTITION=${SLURM_LOCAL_PARTITION:-debug}
CLUSTER=${SLURM_LOCAL_CLUSTER:-localcluster}
CRED_EXPIRE=${SLURM_LOCAL_CRED_EXPIRE:-10}
LINK_ETC=${SLURM_LOCAL_LINK_ETC:-1}
SKIP_INSTALL=${SLURM_LOCAL_SKIP_INSTALL:-0}
MAX_ARRAY_SIZE=${SLURM_LOCAL_MAX_ARRAY_SIZE:-100000}
MAX_JOB_COUNT=${SLURM_LOCAL_MAX_JOB_COUNT:-100000}
JOB_REQUEUE=${SLURM_LOCAL_JOB_REQUEUE:-1}
for limit in "$MAX_ARRAY_SIZE" "$MAX_JOB_COUNT" "$JOB_REQUEUE"; do
  [[ "$limit" =~ ^[0-9]+$ ]] || { echo "SLURM_LOCAL_MAX_ARRAY_SIZE, _MAX_JOB_COUNT, _JOB_REQUEUE: numbers, got '$limit'" >&2; exit 2; }
done
NODE=localhost  # NodeName/SlurmctldHost; works whatever the machine's hostname is

CTLD_PORT=$PORT_BASE
SLURMD_PORT=$((PORT_BASE + 1))
DBD_PORT=$((PORT_BASE + 2))
MYSQL_PORT=$((PORT_BASE + 3))
DB_USER=slurm
DB_PASS=slurm_local_pw
DB_NAME=slurm_acct_db

export PATH=$PATH:/usr/sbin:/sbin
T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
log() { printf '[start_local_slurm %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit "${2:-1}"; }

[ "$(id -u)" = 0 ] || die "must run as root"

# ---------------------------------------------------------------- 1. packages
# package -> a binary it provides; a package counts as present when the binary is found
PACKAGES=(slurmctld:slurmctld slurmd:slurmd slurm-client:sbatch munge:munged)
[ "$ACCOUNTING" = 1 ] && PACKAGES+=(slurmdbd:slurmdbd mariadb-server:mariadbd)

install_packages() {
  local missing=() entry
  for entry in "${PACKAGES[@]}"; do
    command -v "${entry#*:}" >/dev/null || missing+=("${entry%%:*}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$SKIP_INSTALL" = 1 ] && die "missing packages: ${missing[*]} (SLURM_LOCAL_SKIP_INSTALL=1)" 3
  command -v apt-get >/dev/null || die "missing packages: ${missing[*]}, and no apt-get" 3
  log "installing: ${missing[*]}"
  local own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    # keep the postinst scripts from starting system-wide munge/mariadb/slurm services
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    own_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT  # also on failure
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed" 3
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed" 3
  if [ "$own_policy" = 1 ]; then
    rm -f /usr/sbin/policy-rc.d
    trap - EXIT
  fi
  log "installed ($(elapsed)s)"
}
install_packages
if [ "$INSTALL_ONLY" = 1 ]; then
  exit 0
fi

mkdir -p "$BASE"
BASE=$(cd "$BASE" && pwd -P)
[ ${#BASE} -le 80 ] || die "BASE is longer than 80 characters (unix socket paths): $BASE" 2

# ---------------------------------------------------------------- helpers
# is_running PIDFILE COMM: the pid in PIDFILE is alive (not a zombie) and named COMM
is_running() {
  local pf=$1 comm=$2 pid state
  [ -s "$pf" ] || return 1
  pid=$(tr -dc '0-9' < "$pf")
  [ -n "$pid" ] && read -r _ _ state _ 2>/dev/null < "/proc/$pid/stat" && [ "$state" != Z ] &&
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]
}
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_for() {  # wait_for SECONDS WHAT CMD...: poll CMD every 0.2 s
  local t=$1 what=$2; shift 2
  local end=$(( $(date +%s) + t ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || return 1
    sleep 0.2
  done
  log "$what ready ($(elapsed)s)"
}

ETC=$BASE/etc RUN=$BASE/run LOGD=$BASE/log
mkdir -p "$ETC" "$RUN" "$LOGD" "$BASE/state" "$BASE/spool" "$BASE/munge"
chmod 711 "$BASE" "$BASE/munge" "$RUN"  # munged insists on o+x for its socket directory
export SLURM_CONF=$ETC/slurm.conf       # the daemons and clients below read this

# ---------------------------------------------------------------- 2. config
read -r HW_CPUS HW_SOCK HW_CORES HW_THREADS HW_MEM < <(
  slurmd -C | head -1 | tr ' ' '\n' | awk -F= '
    $1=="CPUs"{c=$2} $1=="SocketsPerBoard"{s=$2} $1=="CoresPerSocket"{k=$2}
    $1=="ThreadsPerCore"{t=$2} $1=="RealMemory"{m=$2}
    END{print c, s, k, t, m}')
CPUS=${SLURM_LOCAL_CPUS:-$HW_CPUS}
MEM=${SLURM_LOCAL_MEM_MB:-$HW_MEM}
if [ "$CPUS" = "$HW_CPUS" ]; then
  NODE_HW="CPUs=$CPUS Boards=1 SocketsPerBoard=$HW_SOCK CoresPerSocket=$HW_CORES ThreadsPerCore=$HW_THREADS"
  OVERRIDES=""
else
  NODE_HW="CPUs=$CPUS"
  OVERRIDES="SlurmdParameters=config_overrides"
fi
# CR_Core_Memory needs a default, or a job without --mem takes the whole node's memory
DEF_MEM=$(( MEM / CPUS )); [ "$DEF_MEM" -gt 1024 ] && DEF_MEM=1024

MUNGE_SOCK=$BASE/munge/munge.sock
if [ ! -s "$BASE/munge/munge.key" ]; then
  dd if=/dev/urandom of="$BASE/munge/munge.key" bs=1024 count=1 status=none
fi
chmod 400 "$BASE/munge/munge.key"

if [ "$ACCOUNTING" = 1 ]; then
  # AccountingStorageEnforce is left out on purpose ("none" is invalid in 22.05): jobs of
  # users without an association are still accepted and recorded.
  ACCT_CONF="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# with auth/munge, AccountingStoragePass names the munge socket used towards slurmdbd
# (AuthInfo=socket= is NOT used for that connection)
AccountingStoragePass=$MUNGE_SOCK
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
  ACCT_CONF="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

# batch_sched_delay=0: Slurm's default of 3 s would delay every sbatch.
# cred_expire: also the delay before a requeued job may run again.
# proctrack/linuxproc + task/none: no cgroups (they usually fail inside containers).
cat > "$ETC/slurm.conf.new" <<EOF
# generated by start_local_slurm.sh: single-node Slurm on 127.0.0.1, no cgroups
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK,cred_expire=$CRED_EXPIRE
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGD/slurmctld.log
SlurmdLogFile=$LOGD/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEF_MEM
MaxArraySize=$MAX_ARRAY_SIZE
MaxJobCount=$MAX_JOB_COUNT
JobRequeue=$JOB_REQUEUE
MinJobAge=300
KillWait=5
InactiveLimit=0
JobCompType=jobcomp/none
$ACCT_CONF
$OVERRIDES
NodeName=$NODE NodeAddr=127.0.0.1 $NODE_HW RealMemory=$MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
: > "$ETC/plugstack.conf"  # no SPANK plugins (Slurm looks for plugstack.conf next to slurm.conf)

if [ "$ACCOUNTING" = 1 ]; then
  # umask: slurmdbd refuses a group- or world-readable file
  (umask 077; cat > "$ETC/slurmdbd.conf.new" <<EOF
# generated by start_local_slurm.sh
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$LOGD/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF
  )
fi

# A running cluster whose configuration changes (ports, CPUs, accounting, ...) is stopped
# first, while the old files are still in place: `scontrol reconfigure` cannot move ports.
if ! cmp -s "$ETC/slurm.conf.new" "$ETC/slurm.conf" ||
   { [ -f "$ETC/slurmdbd.conf.new" ] && ! cmp -s "$ETC/slurmdbd.conf.new" "$ETC/slurmdbd.conf"; }; then
  if [ -f "$ETC/slurm.conf" ] && ls "$RUN"/*.pid >/dev/null 2>&1; then
    log "configuration changed: restarting the cluster (its jobs are cancelled)"
    "$(dirname "${BASH_SOURCE[0]}")/stop_local_slurm.sh" "$BASE"
  fi
fi
# fail before changing anything if a port of a daemon that is not running yet is taken
preflight=("slurmctld.pid slurmctld $CTLD_PORT" "slurmd.pid slurmd $SLURMD_PORT")
[ "$ACCOUNTING" = 1 ] && preflight+=("slurmdbd.pid slurmdbd $DBD_PORT" "mysqld.pid mariadbd $MYSQL_PORT")
for entry in "${preflight[@]}"; do
  read -r pidfile comm port <<< "$entry"
  if ! is_running "$RUN/$pidfile" "$comm" && port_busy "$port"; then
    die "port $port ($comm) already in use; choose another SLURM_LOCAL_PORT_BASE"
  fi
done
mv "$ETC/slurm.conf.new" "$ETC/slurm.conf"
[ -f "$ETC/slurmdbd.conf.new" ] && mv "$ETC/slurmdbd.conf.new" "$ETC/slurmdbd.conf"

echo "export SLURM_CONF=$ETC/slurm.conf" > "$BASE/env.sh"

if [ "$LINK_ETC" = 1 ]; then
  mkdir -p /etc/slurm
  if [ ! -e /etc/slurm/slurm.conf ] || [ -L /etc/slurm/slurm.conf ]; then
    ln -sfn "$ETC/slurm.conf" /etc/slurm/slurm.conf
  else
    log "WARNING: /etc/slurm/slurm.conf is a real file; not replacing it. Use: source $BASE/env.sh"
  fi
fi

# ---------------------------------------------------------------- 3. daemons
# munged: private instance, running as root with its key and socket under BASE/munge
if ! is_running "$RUN/munged.pid" munged; then
  rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
  /usr/sbin/munged --force --socket="$MUNGE_SOCK" --key-file="$BASE/munge/munge.key" \
    --log-file="$LOGD/munged.log" --pid-file="$RUN/munged.pid" --seed-file="$BASE/munge/munged.seed"
  wait_for 10 munged bash -c "munge -S '$MUNGE_SOCK' -n | unmunge -S '$MUNGE_SOCK'" \
    || die "munged did not start; see $LOGD/munged.log"
fi

if [ "$ACCOUNTING" = 1 ]; then
  # mariadbd: private datadir under BASE/mysql, TCP on 127.0.0.1:MYSQL_PORT for slurmdbd
  MYSQL_SOCK=$BASE/mysql/mysqld.sock
  mysql_root() { mariadb --no-defaults -S "$MYSQL_SOCK" -u root "$@"; }
  if ! is_running "$RUN/mysqld.pid" mariadbd; then
    if [ ! -d "$BASE/mysql/data/mysql" ]; then
      mkdir -p "$BASE/mysql/data"
      mariadb-install-db --no-defaults --datadir="$BASE/mysql/data" --user=root \
        --auth-root-authentication-method=socket --skip-test-db >"$LOGD/mariadb-install.log" 2>&1 \
        || die "mariadb-install-db failed; see $LOGD/mariadb-install.log"
      log "mariadb datadir initialised ($(elapsed)s)"
    fi
    setsid /usr/sbin/mariadbd --no-defaults --user=root --datadir="$BASE/mysql/data" \
      --socket="$MYSQL_SOCK" --port="$MYSQL_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
      --pid-file="$RUN/mysqld.pid" --log-error="$LOGD/mariadb.err" \
      --innodb-buffer-pool-size=256M --innodb-log-file-size=64M \
      --innodb-lock-wait-timeout=900 --max-allowed-packet=16M \
      </dev/null >/dev/null 2>&1 &
    wait_for 60 mariadb mariadb-admin --no-defaults -S "$MYSQL_SOCK" -u root ping \
      || die "mariadb did not start; see $LOGD/mariadb.err"
  fi
  mysql_root -e "CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
                 CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
                 GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'127.0.0.1';
                 GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';"

  if ! is_running "$RUN/slurmdbd.pid" slurmdbd; then
    /usr/sbin/slurmdbd  # daemonizes; reads slurmdbd.conf next to $SLURM_CONF
    wait_for 120 slurmdbd sacctmgr -n list cluster \
      || die "slurmdbd did not come up; see $LOGD/slurmdbd.log"
  fi
  # cluster, account "default" and root's association (other users need none: no enforcement)
  if [ -z "$(sacctmgr -n -P list cluster "$CLUSTER" format=cluster 2>/dev/null)" ]; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
  if [ -z "$(sacctmgr -n -P list account default format=account 2>/dev/null)" ]; then
    sacctmgr -i add account default description=local organization=local cluster="$CLUSTER" >/dev/null
  fi
  if [ -z "$(sacctmgr -n -P list assoc cluster="$CLUSTER" account=default user=root format=user 2>/dev/null)" ]; then
    sacctmgr -i add user root account=default defaultaccount=default cluster="$CLUSTER" >/dev/null
  fi
fi

if ! is_running "$RUN/slurmctld.pid" slurmctld; then
  /usr/sbin/slurmctld
  wait_for 60 slurmctld bash -c "scontrol ping | grep -q UP" \
    || die "slurmctld did not start; see $LOGD/slurmctld.log"
fi
if ! is_running "$RUN/slurmd.pid" slurmd; then
  /usr/sbin/slurmd -N "$NODE"
fi
node_ok() { sinfo -h -n "$NODE" -o '%t' | grep -Eq '^(idle|mix|alloc)$'; }
if ! wait_for 30 "node $NODE" node_ok; then
  log "node state: $(sinfo -h -n "$NODE" -o '%t %E')"
  scontrol update nodename="$NODE" state=resume 2>/dev/null || true
  wait_for 30 "node $NODE" node_ok || die "node not idle; see $LOGD/slurmd.log"
fi

log "cluster up in $(elapsed)s, partition $PARTITION; use it with: source $BASE/env.sh"
sinfo
