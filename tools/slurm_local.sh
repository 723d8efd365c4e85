#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for the `slurm` tests and for trying `oapl-launch slurm`.
#
#   tools/slurm_local.sh start    # install (apt, once) + start munged, slurmctld and two slurmd (node1, node2)
#   tools/slurm_local.sh status   # exit 0 when every node answers and is usable
#   tools/slurm_local.sh stop     # cancel the cluster's jobs, stop only the daemons this script started
#   tools/slurm_local.sh kick     # make the scheduler look at the queue now (see below)
#
# Idempotent: `start` on a running cluster only checks it. Two slurmd processes on one host are needed because
# heterogeneous jobs need two nodes (the backfill scheduler, which alone starts het jobs, never places both
# components on one node). No systemd, no cgroups (proctrack/linuxproc, task/none), no accounting.
# Needs root and apt (Debian 12: Slurm 22.05, munge 0.5). State, logs and pid files: $OAPL_SLURM_DIR
# (default /var/lib/oapl-slurm). The config is written there and to /etc/slurm/slurm.conf unless that file exists
# and was not written by this script (then export SLURM_CONF=$OAPL_SLURM_DIR/slurm.conf to use this cluster).
# A requeued heterogeneous job becomes eligible ≈ 11 s after the requeue, but only the backfill scheduler starts
# het jobs and it runs only after some state change; on this otherwise idle cluster nothing changes, so `kick`
# (a no-op `scontrol setdebug`) makes it look again. Busy real clusters have such events all the time.
# Exit codes: 0 ok; 3 cannot start here (not root, no apt, install failed); 4 started but nodes not usable.
set -euo pipefail

DIR="${OAPL_SLURM_DIR:-/var/lib/oapl-slurm}"
CONF="$DIR/slurm.conf"
MARK="# written by oapl_megatron tools/slurm_local.sh"
CPUS="${OAPL_SLURM_CPUS:-$(nproc)}"
MEM_MB="$(awk '/MemTotal/ {print int($2 / 1024 / 2)}' /proc/meminfo)"   # each fake node claims half
HOST="$(hostname -s)"
export SLURM_CONF="$CONF"

log() { echo "[slurm_local] $*" >&2; }

alive() {  # alive PIDFILE: the process in PIDFILE runs and is not a zombie (PID 1 may reap late)
    local pid state
    [[ -s "$1" ]] || return 1
    pid="$(cat "$1")"
    state="$(ps -o stat= -p "$pid" 2>/dev/null || true)"
    [[ -n "$state" && "$state" != Z* ]]
}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return 0
    fi
    if [[ "$(id -u)" != 0 ]]; then log "not root: cannot install Slurm"; exit 3; fi
    if ! command -v apt-get >/dev/null; then log "no apt-get: cannot install Slurm"; exit 3; fi
    log "installing slurmctld slurmd slurm-client munge (apt)"
    local pkgs=(slurmctld slurmd slurm-client munge)
    if ! DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q "${pkgs[@]}" >"$DIR/apt.log" 2>&1; then
        DEBIAN_FRONTEND=noninteractive timeout 300 apt-get update -q >>"$DIR/apt.log" 2>&1 || true
        if ! DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q "${pkgs[@]}" >>"$DIR/apt.log" 2>&1; then
            log "apt-get install failed (see $DIR/apt.log)"; exit 3
        fi
    fi
}

write_conf() {
    mkdir -p "$DIR/state" "$DIR/log" "$DIR/spool"
    cat >"$CONF.tmp" <<EOF
$MARK
ClusterName=oapl
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,bf_hetjob_immediate,bf_continue,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=300
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
NodeName=node1 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
NodeName=node2 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17002 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    mv "$CONF.tmp" "$CONF"
    mkdir -p /etc/slurm
    if [[ ! -e /etc/slurm/slurm.conf ]] || head -1 /etc/slurm/slurm.conf | grep -qF "$MARK"; then
        cp "$CONF" /etc/slurm/slurm.conf   # plain `sbatch` works for a user who follows the README
    else
        log "/etc/slurm/slurm.conf belongs to someone else: export SLURM_CONF=$CONF to use this cluster"
    fi
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi   # someone's munged answers: use it
    mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
    [[ -s /etc/munge/munge.key ]] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
    chown -R munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge
    chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do
        if [[ -s /run/munge/munged.pid ]]; then cp /run/munge/munged.pid "$DIR/munged.ours.pid"; break; fi
        sleep 0.1
    done
    munge -n | unmunge >/dev/null || { log "munged does not answer"; exit 3; }
}

nodes_ready() {  # both nodes idle/mixed/allocated (not down, drained or unknown)
    local states
    states="$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u)" || return 1
    [[ "$(grep -cE '^node[12] (idle|mix|alloc)' <<<"$states")" == 2 ]]
}

start() {
    mkdir -p "$DIR"
    install
    write_conf
    start_munge
    if ! alive "$DIR/slurmctld.pid"; then
        /usr/sbin/slurmctld -c -f "$CONF"   # -c: a fresh cluster, no jobs from an earlier life
        cp "$DIR/slurmctld.pid" "$DIR/slurmctld.ours.pid" 2>/dev/null || true
    fi
    for n in node1 node2; do
        if ! alive "$DIR/slurmd.$n.pid"; then
            /usr/sbin/slurmd -N "$n" -f "$CONF"
            for _ in $(seq 50); do [[ -s "$DIR/slurmd.$n.pid" ]] && break; sleep 0.1; done
            cp "$DIR/slurmd.$n.pid" "$DIR/slurmd.$n.ours.pid" 2>/dev/null || true
        fi
    done
    for _ in $(seq 150); do
        if nodes_ready; then log "cluster up: $(sinfo -h -N -o '%N:%t' | tr '\n' ' ')(SLURM_CONF=$CONF)"; return 0; fi
        scontrol update nodename=node1,node2 state=resume >/dev/null 2>&1 || true
        sleep 0.2
    done
    log "nodes not usable after 30 s: $(sinfo -h -N -o '%N:%t:%E' 2>&1 | tr '\n' ' ')"; exit 4
}

stop_pid() {  # stop_pid OURS_PIDFILE NAME: TERM, wait ≤ 10 s, KILL; only if the pid is still that daemon
    local f="$1" name="$2" pid
    [[ -s "$f" ]] || return 0
    pid="$(cat "$f")"
    if ps -o comm= -p "$pid" 2>/dev/null | grep -q "$name"; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do alive "$f" || break; sleep 0.1; done
        alive "$f" && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

stop() {
    if alive "$DIR/slurmctld.pid"; then scancel --full --signal=KILL --user=root >/dev/null 2>&1 || true; sleep 1; fi
    for n in node1 node2; do stop_pid "$DIR/slurmd.$n.ours.pid" slurmd; done
    stop_pid "$DIR/slurmctld.ours.pid" slurmctld
    stop_pid "$DIR/munged.ours.pid" munged
    log "stopped what this script started"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) nodes_ready ;;
    kick) scontrol setdebug "$(scontrol show config | awk -F'= ' '/^SlurmctldDebug/ {print $2}')" ;;
    *) echo "usage: $0 start|stop|status|kick" >&2; exit 2 ;;
esac
