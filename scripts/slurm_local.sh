#!/usr/bin/env bash
# A one-node Slurm cluster on loopback (Debian's slurm-wlm + munge), for testing psr's sbatch
# templates, array jobs and requeue for real. Needs root (it writes /etc/slurm and starts daemons).
#   bash scripts/slurm_local.sh install   # apt-get install slurm-wlm munge (once per machine)
#   bash scripts/slurm_local.sh start     # write config, start munged, slurmctld, slurmd; wait until idle
#   bash scripts/slurm_local.sh stop      # stop the daemons
#   bash scripts/slurm_local.sh status    # which daemons run, and sinfo when the cluster answers
#   bash scripts/slurm_local.sh with CMD ARGS...   # `make test`: run CMD with the cluster up (see with_cluster)
set -euo pipefail
STATE=${PSR_SLURM_STATE:-/var/tmp/psr-slurm}
CONF=/etc/slurm/slurm.conf
HOST=$(hostname -s)

install() {
  if command -v slurmctld >/dev/null && command -v munged >/dev/null; then return 0; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  mkdir -p /etc/slurm "$STATE"/{ctld,d} /var/log/slurm
  cat > "$CONF" <<CONF
ClusterName=psrlocal
SlurmctldHost=${HOST}(127.0.0.1)
AuthType=auth/munge
# a requeued job may start again after cred_expire + 1 s (default 120 s); short here so requeue tests are quick
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# schedule every few seconds (defaults 30-60 s), so a requeued job restarts soon after it is eligible
SchedulerParameters=bf_interval=2,sched_interval=2
ReturnToService=2
JobRequeue=1
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=${STATE}/ctld
SlurmdSpoolDir=${STATE}/d
SlurmctldPidFile=${STATE}/slurmctld.pid
SlurmdPidFile=${STATE}/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmUser=root
SlurmdUser=root
KillWait=10
MinJobAge=300
InactiveLimit=0
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
  # proctrack/linuxproc + task/none need no cgroups (containers often have none to give)
  rm -f /etc/slurm/cgroup.conf
}

start() {
  install
  write_conf
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  fi
  chown -R munge:munge /etc/munge 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown -R munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  pgrep -x munged >/dev/null || su -s /bin/sh munge -c munged 2>/dev/null || munged --force
  pgrep -x slurmctld >/dev/null || slurmctld -c -i
  pgrep -x slurmd >/dev/null || slurmd -c
  local name
  for _ in $(seq 60); do
    if cluster_up; then
      echo "slurm: one-node cluster up ($(sinfo -h -o '%N %c CPUs %T'))"
      return 0
    fi
    for name in munged slurmctld slurmd; do
      if ! pgrep -x "$name" >/dev/null; then  # it exited (bad config, port taken): waiting cannot help
        echo "slurm: $name is not running; last log lines:" >&2
        tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
        return 1
      fi
    done
    sleep 1
  done
  echo "slurm: cluster did not become idle in 60 s; last log lines:" >&2
  tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
  return 1
}

DAEMONS=(slurmd slurmctld munged)  # stop order: the node daemon first, munge (their authentication) last

pid_file() {
  case "$1" in
    slurmd) echo "$STATE/slurmd.pid" ;;
    slurmctld) echo "$STATE/slurmctld.pid" ;;
    munged) echo /run/munge/munged.pid ;;
  esac
}

# stop [DAEMON...]: stop the named daemons (default: all three), each by the pid in its pid file when
# that process is the daemon, else by its exact name; wait for each to exit, or an immediate start
# would see the old daemon and not start a new one.
stop() {
  local name file pid
  local names=("$@")
  [ ${#names[@]} -gt 0 ] || names=("${DAEMONS[@]}")
  for name in "${DAEMONS[@]}"; do
    [[ " ${names[*]} " == *" $name "* ]] || continue
    file=$(pid_file "$name")
    pid=$(cat "$file" 2>/dev/null || true)
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
      kill "$pid" 2>/dev/null || true
    else
      pkill -x "$name" 2>/dev/null || true
    fi
    for _ in $(seq 100); do pgrep -x "$name" >/dev/null || break; sleep 0.1; done
  done
  echo "slurm: stopped ${names[*]}"
}

running() {
  local name out=()
  for name in "${DAEMONS[@]}"; do pgrep -x "$name" >/dev/null && out+=("$name"); done
  echo "${out[*]}"
}

# whether the cluster takes jobs now (what tests/slurm/slurm_helpers.py:cluster_problem checks); a
# timeout because sinfo retries for a long time when slurmctld is down
cluster_up() {
  command -v sinfo >/dev/null && timeout 10 sinfo -h -o '%T' 2>/dev/null | grep -qE 'idle|mixed|allocated'
}

status() {
  local up
  up=$(running)
  if ! command -v slurmctld >/dev/null; then
    echo "slurm: not installed"
  elif [ -z "$up" ]; then
    echo "slurm: stopped (no munged, slurmctld or slurmd running)"
  else
    echo "slurm: running: $up"
    if cluster_up; then sinfo && squeue; else echo "slurm: the cluster takes no jobs (sinfo shows no idle node)"; fi
  fi
}

# with CMD ARGS...: run CMD with the one-node cluster up and return CMD's exit status. A cluster that
# already takes jobs is used as it is and left running. Otherwise it is installed (apt, once per
# machine) and started, and afterwards exactly the daemons this call started are stopped, even when
# CMD fails or is interrupted: the machine is left as it was found (installed packages and
# /etc/slurm, /etc/munge stay). When install or start fails, CMD still runs, with PSR_SLURM_ERROR
# saying why: the slurm-marked tests then fail with that reason instead of a bare "sinfo not found".
with_cluster() {
  if [ $# -eq 0 ]; then echo "usage: $0 with CMD [ARGS...]" >&2; return 2; fi
  if cluster_up; then
    echo "slurm: using the running cluster ($(sinfo -h -o '%N %T'))" >&2
    "$@"
    return
  fi
  local log
  BEFORE=" $(running) "
  # set before starting anything, so an interrupted start is cleaned up too
  # shellcheck disable=SC2317  # called by the trap; keeps CMD's status whatever stop returns
  cleanup() {
    local status=$? name started=()
    for name in "${DAEMONS[@]}"; do
      [[ "$BEFORE" == *" $name "* ]] || ! pgrep -x "$name" >/dev/null || started+=("$name")
    done
    if [ ${#started[@]} -gt 0 ]; then stop "${started[@]}" >&2 || true; fi
    exit "$status"
  }
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  log=$(mktemp)
  # a file, not $(...): the daemons inherit the output and a command substitution would wait for them
  if ! { install && start; } >"$log" 2>&1; then
    PSR_SLURM_ERROR="scripts/slurm_local.sh install/start failed: $(tail -n 5 "$log" | tr '\n' ' ')"
    export PSR_SLURM_ERROR
  fi
  cat "$log" >&2
  rm -f "$log"
  local rc=0
  "$@" || rc=$?
  return "$rc"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) shift; stop "$@" ;;
  status) status ;;
  with) shift; with_cluster "$@" ;;
  *) echo "usage: $0 install|start|stop [DAEMON...]|status|with CMD [ARGS...]" >&2; exit 2 ;;
esac
