#!/usr/bin/env bash
# A real single-node SLURM cluster on loopback, for tests (recipe: shared/design/SLURM.md).
#
#   cluster.sh start DIR   install SLURM if missing, write /etc/slurm/slurm.conf with its state
#                          under DIR, start munged (unless one answers), slurmctld and slurmd,
#                          wait until the node is idle.
#   cluster.sh stop DIR    cancel the jobs, stop by process id only the daemons this DIR started,
#                          put /etc/slurm/slurm.conf back as it was found. Safe to call twice.
#
# Exit status of start: 0 the cluster is idle; 77 it cannot run here (not root, no apt-get,
# install failed, another cluster already on the ports): the caller should skip; anything else
# is a failure, and start has already undone what it did.
# SLURM reads only /etc/slurm/slurm.conf inside jobs (the executor plugin drops SLURM_CONF),
# and its ports are fixed, so the cluster is machine-wide: one at a time, never a stranger's.
set -Eeuo pipefail

readonly CONF=/etc/slurm/slurm.conf
readonly PACKAGES=(slurmctld slurmd slurm-client munge)
readonly SKIP=77

say() { echo "cluster.sh: $*" >&2; }
# Undo what start did so far (at most creating /etc/slurm), then tell the caller to skip.
skip() { say "unavailable: $*"; stop_cluster; exit "$SKIP"; }

usage() { say "usage: $0 start|stop DIR"; exit 2; }
[[ $# -eq 2 ]] || usage
action=$1
dir=$(realpath -m "$2")

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

install_if_missing() {
  local missing=0 tool
  for tool in slurmctld slurmd sinfo sbatch munged munge; do
    command -v "$tool" >/dev/null || missing=1
  done
  ((missing)) || return 0
  command -v apt-get >/dev/null || skip "SLURM is not installed and there is no apt-get"
  say "installing ${PACKAGES[*]}"
  apt-get update -qq >"$dir/log/apt.log" 2>&1 \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${PACKAGES[@]}" >>"$dir/log/apt.log" 2>&1 \
    || skip "apt-get could not install ${PACKAGES[*]} (see $dir/log/apt.log)"
}

write_conf() {
  # The node line is what slurmd sees on this machine, so the node never drains for
  # claiming more CPUs or memory than it has.
  local hardware
  hardware=$(slurmd -C | head -1 | sed -E 's/^NodeName=[^ ]+ //')
  cat >"$dir/slurm.conf" <<EOF
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$dir/state/ctld
SlurmdSpoolDir=$dir/state/d
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=localhost NodeAddr=127.0.0.1 $hardware State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  if [[ -e $CONF ]]; then
    cp -p "$CONF" "$dir/slurm.conf.found"
  else
    : >"$dir/slurm.conf.created"
  fi
  cp "$dir/slurm.conf" "$CONF.tmp.$$"
  mv "$CONF.tmp.$$" "$CONF"
}

# Daemons write their pid file after forking; record the id at once, because slurmd
# deletes its pid file as soon as it is signalled.
wait_pid_file() {
  local file=$1 name=$2 i
  for ((i = 0; i < 100; i++)); do
    if [[ -s $file ]]; then
      echo "$name $(cat "$file")" >>"$dir/started.pids"
      return 0
    fi
    sleep 0.1
  done
  say "$name wrote no pid file ($file)"
  return 1
}

start_daemons() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "reusing the munged already running"
  else
    if [[ ! -d /run/munge ]]; then
      install -d -o munge -g munge -m 755 /run/munge
      : >"$dir/munge_rundir.created"
    fi
    runuser -u munge -- /usr/sbin/munged
    wait_pid_file /run/munge/munged.pid munged
  fi
  slurmctld -f "$CONF"
  wait_pid_file "$dir/run/slurmctld.pid" slurmctld
  slurmd -f "$CONF" -N localhost
  wait_pid_file "$dir/run/slurmd.pid" slurmd
}

wait_idle() {
  local i
  for ((i = 0; i < 300; i++)); do
    sinfo -h -o %t 2>/dev/null | grep -q '^idle' && return 0
    sleep 0.1
  done
  say "the node never became idle: $(sinfo -h -o '%t %E' 2>&1 | head -1)"
  return 1
}

start() {
  [[ $(id -u) -eq 0 ]] || skip "needs root (daemons, /etc/slurm/slurm.conf)"
  [[ ! -e $dir/started.pids ]] || { say "$dir already holds a cluster; stop it first"; exit 1; }
  mkdir -p "$dir"/{state/ctld,state/d,run,log}
  install_if_missing
  if [[ ! -d /etc/slurm ]]; then
    mkdir /etc/slurm
    : >"$dir/etc_slurm.created"
  fi
  # One test cluster at a time on this machine: hold a lock on /etc/slurm (nothing left
  # behind) from the port check until the daemons own the ports.
  exec 9</etc/slurm
  flock -w 120 9 || skip "another process holds the lock on /etc/slurm"
  local port
  for port in 6817 6818; do
    port_in_use "$port" && skip "port $port is taken: a SLURM cluster already runs here"
  done
  trap 'say "start failed; undoing"; stop_cluster; exit 1' ERR
  : >"$dir/started.pids"
  write_conf
  start_daemons
  wait_idle
  trap - ERR
  flock -u 9
  say "cluster idle (state under $dir)"
}

alive() { [[ -d /proc/$1 ]] && [[ $(cat "/proc/$1/comm" 2>/dev/null) == "$2" ]]; }

stop_daemon() {
  local name=$1 pid=$2 i
  alive "$pid" "$name" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 200; i++)); do
    alive "$pid" "$name" || return 0
    sleep 0.1
  done
  say "$name ($pid) ignored SIGTERM for 20 s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
}

cancel_jobs() {
  # Only jobs of the cluster this DIR started: its controller is ours.
  grep -q '^slurmctld ' "$dir/started.pids" 2>/dev/null || return 0
  local ids i
  ids=$(squeue -h -o %A 2>/dev/null || true)
  [[ -n $ids ]] || return 0
  # shellcheck disable=SC2086
  scancel $ids 2>/dev/null || true
  for ((i = 0; i < 150; i++)); do
    [[ -z $(squeue -h -t PD,R,CG,S -o %A 2>/dev/null) ]] && return 0
    sleep 0.2
  done
  say "jobs still listed after scancel: $(squeue -h 2>&1 | head -3)"
}

stop_cluster() {
  [[ -d $dir ]] || return 0
  cancel_jobs
  local name pid
  # Reverse start order: slurmd, slurmctld, then munged (which they authenticate through).
  if [[ -e $dir/started.pids ]]; then
    while read -r name pid; do
      stop_daemon "$name" "$pid"
    done < <(tac "$dir/started.pids")
    rm -f "$dir/started.pids"
  fi
  if [[ -e $dir/munge_rundir.created ]]; then
    rm -rf /run/munge
    rm -f "$dir/munge_rundir.created"
  fi
  if [[ -e $dir/slurm.conf.found ]]; then
    mv "$dir/slurm.conf.found" "$CONF"
  elif [[ -e $dir/slurm.conf.created ]]; then
    rm -f "$CONF" "$dir/slurm.conf.created"
  fi
  if [[ -e $dir/etc_slurm.created ]]; then
    rmdir /etc/slurm 2>/dev/null || say "left /etc/slurm: something else was put in it"
    rm -f "$dir/etc_slurm.created"
  fi
}

case $action in
  start) start ;;
  stop) stop_cluster ;;
  *) usage ;;
esac
