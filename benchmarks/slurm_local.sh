#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for sweep.py's SLURM executor and its test (docs/studies.md).
#
#   bash benchmarks/slurm_local.sh install            # Debian's slurm-wlm and munge, if missing (root, apt)
#   bash benchmarks/slurm_local.sh start [STATE]      # install if missing, write slurm.conf, start the daemons
#   export SLURM_CONF=STATE/slurm.conf                # what `start` prints last: every SLURM client reads it
#   bash benchmarks/slurm_local.sh stop [STATE]       # stop the daemons this script started in STATE
#
# STATE (default /tmp/dali-slurm) holds everything: slurm.conf, the munge key and socket, the daemons'
# state, spool, pid and log files. Nothing is written to /etc, so a real cluster's configuration on the
# same machine is never touched. No systemd: munged, slurmctld and slurmd run as plain daemons (as root).
# The node is this machine with its real CPUs and memory (`slurmd -C`); jobs are tracked by process tree
# (proctrack/linuxproc) without cgroups (task/none). JobRequeue=0, as many sites set it: a job may be
# requeued only if it asks for it (sbatch --requeue), which sweep.py's jobs must do.
set -euo pipefail

cmd=${1:-}
state=$(realpath -m "${2:-/tmp/dali-slurm}")

install() {
  if command -v slurmctld > /dev/null && command -v slurmd > /dev/null && command -v sbatch > /dev/null && command -v munged > /dev/null; then
    return 0
  fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get > /dev/null; then
    echo "error: SLURM is not installed, and installing it needs root and apt-get (Debian's slurm-wlm and munge)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # slurm-wlm is the metapackage of slurmctld, slurmd and slurm-client; their services are not started here
  apt-get install -y -qq --no-install-recommends slurm-wlm munge > /dev/null
}

port_used() { (exec 3<> "/dev/tcp/127.0.0.1/$1") 2> /dev/null; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2> /dev/null; }

stop() {
  # Only the daemons whose pid files are in STATE: never anything started by someone else.
  for name in slurmd slurmctld munged; do
    if pid_alive "$state/$name.pid"; then
      pid=$(cat "$state/$name.pid")
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2> /dev/null || break; sleep 0.2; done
      kill -0 "$pid" 2> /dev/null && kill -9 "$pid"
    fi
    rm -f "$state/$name.pid"
  done
}

start() {
  install
  if pid_alive "$state/slurmctld.pid" || pid_alive "$state/slurmd.pid" || pid_alive "$state/munged.pid"; then
    echo "error: daemons from $state are running already; run: bash $0 stop $state" >&2
    exit 1
  fi
  rm -rf "$state"
  mkdir -p "$state"/{munge,ctld,spool}
  chmod 700 "$state/munge"

  # munge: a fresh key, its socket in STATE (slurm.conf's AuthInfo points every SLURM program at it)
  dd if=/dev/urandom of="$state/munge/munge.key" bs=1 count=1024 status=none
  chmod 400 "$state/munge/munge.key"
  munged --force --key-file="$state/munge/munge.key" --socket="$state/munge/munge.socket.2" \
    --pid-file="$state/munged.pid" --log-file="$state/munged.log" --seed-file="$state/munge/munge.seed"

  # The node: this machine as slurmd sees it (CPUs, sockets, cores, threads, RealMemory)
  node=$(slurmd -C | head -1)
  # Two free ports for slurmctld and slurmd, from SLURM's defaults up (another cluster here may hold those)
  port=6817
  while port_used $port || port_used $((port + 1)); do port=$((port + 2)); done
  host=$(hostname -s)
  cat > "$state/slurm.conf" << EOF
ClusterName=dali
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$state/munge/munge.socket.2
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
JobRequeue=0
ReturnToService=2
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
KillWait=30
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF="$state/slurm.conf"
  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF"

  # Ready when the node takes jobs
  for _ in $(seq 60); do
    if sinfo -h -N -o %t 2> /dev/null | grep -qE '^(idle|mix|alloc)'; then
      echo "SLURM is up: $(sinfo -h -N -o '%N %c CPUs %m MB %t')"
      echo "export SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    sleep 0.5
  done
  echo "error: the node did not come up; the logs are in $state" >&2
  tail -n 20 "$state/slurmctld.log" "$state/slurmd.log" >&2 || true
  stop
  exit 1
}

case "$cmd" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  *)
    echo "usage: $0 install | start [STATE] | stop [STATE]" >&2
    exit 2
    ;;
esac
