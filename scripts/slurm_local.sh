#!/usr/bin/env bash
# A one-node Slurm cluster on loopback (Debian's slurm-wlm + munge), for testing psr's sbatch
# templates, array jobs and requeue for real. Needs root (it writes /etc/slurm and starts daemons).
#   bash scripts/slurm_local.sh install   # apt-get install slurm-wlm munge (once per machine)
#   bash scripts/slurm_local.sh start     # write config, start munged, slurmctld, slurmd; wait until idle
#   bash scripts/slurm_local.sh stop      # stop the daemons
#   bash scripts/slurm_local.sh status
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
  for _ in $(seq 60); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qE 'idle|mixed|allocated'; then
      echo "slurm: one-node cluster up ($(sinfo -h -o '%N %c CPUs %T'))"
      return 0
    fi
    sleep 1
  done
  echo "slurm: cluster did not become idle in 60 s; last log lines:" >&2
  tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
  return 1
}

stop() {
  local name
  for name in slurmd slurmctld munged; do
    pkill -x "$name" 2>/dev/null || true
    # wait for the exit, or an immediate start would see the old daemon and not start a new one
    for _ in $(seq 100); do pgrep -x "$name" >/dev/null || break; sleep 0.1; done
  done
  echo "slurm: stopped"
}

status() { sinfo && squeue; }

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
