#!/usr/bin/env bash
# A real Slurm cluster on this one machine, for the tests: munge, MariaDB + slurmdbd
# (accounting: submitit reads job states with sacct), slurmctld and two slurmd that pose as
# two nodes (node1, node2) on distinct ports. Debian's packages, daemons started directly
# (no systemd), everything under $SLURM_LOCAL_DIR.
#
#   slurm/local_cluster.sh up     install what is missing, start, wait until both nodes are idle
#   slurm/local_cluster.sh down   stop every daemon it started and remove its state
#   slurm/local_cluster.sh env    print the export line clients need (SLURM_CONF)
#
# Clients find the cluster through SLURM_CONF=$SLURM_LOCAL_DIR/slurm.conf, so a machine's own
# /etc/slurm is never touched. Needs root: it installs packages and maps the two node names to
# 127.0.0.1 in /etc/hosts (torch.distributed reaches the first node by name).
# Exit status 3: the packages cannot be installed here (the tests skip on it).
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/difftron-slurm}
CONF=$DIR/slurm.conf
CLUSTER=difftron
NODES=(node1 node2)
CTLD_PORT=16817
DBD_PORT=16819
NODE_PORTS=(16821 16822)
DB_PORT=16306
HOSTS_MARK="# difftron local slurm"
PACKAGES=(slurm-wlm slurm-client slurmdbd mariadb-server munge)

log() { echo "local_cluster: $*" >&2; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null \
        && command -v mariadbd >/dev/null && command -v munged >/dev/null && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        log "Slurm is not installed and cannot be (needs root and apt-get)"; exit 3
    fi
    log "installing ${PACKAGES[*]}"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "${PACKAGES[@]}"; } >"$DIR/apt.log" 2>&1; then
        log "apt-get install failed (see $DIR/apt.log)"; exit 3
    fi
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2; shift 2
    for _ in $(seq $((seconds * 5))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    log "timed out waiting for $what (logs: $DIR/log)"; exit 1
}

write_configs() {
    local host; host=$(hostname -s)
    cat >"$CONF" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Short credential lifetime: a requeued job's new credential is not refused as a replay.
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# No cgroups in a container: track processes by parent id, bind no tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Schedule every couple of seconds so a requeued job starts again at once.
SchedulerParameters=bf_interval=1,sched_interval=2
ReturnToService=2
# The two fake nodes share this machine's cores: trust the declared counts.
SlurmdParameters=config_overrides
# A preempted job gets SIGTERM, then SIGKILL after this many seconds.
KillWait=5
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP
EOF
    for i in "${!NODES[@]}"; do
        echo "NodeName=${NODES[$i]} NodeHostname=$host NodeAddr=127.0.0.1 Port=${NODE_PORTS[$i]} CPUs=2 RealMemory=2000 State=UNKNOWN" >>"$CONF"
    done
    cat >"$DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$DIR/slurmdbd.conf"  # slurmdbd refuses a readable file (it holds a password)
}

start_munge() {
    mkdir -p /run/munge && chown munge:munge /run/munge
    if [ ! -S /run/munge/munge.socket.2 ] || ! munge -n >/dev/null 2>&1; then
        [ -s /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || create-munge-key; chown munge:munge /etc/munge/munge.key; }
        runuser -u munge -- munged --force </dev/null >/dev/null 2>&1
        touch "$DIR/started-munge"
    fi
    wait_for 10 munge munge -n
}

start_database() {
    if [ ! -d "$DIR/mysql/mysql" ]; then
        mariadb-install-db --user=root --datadir="$DIR/mysql" --auth-root-authentication-method=socket \
            >"$DIR/log/mariadb-install.log" 2>&1
    fi
    mariadbd --user=root --datadir="$DIR/mysql" --socket="$DIR/mysql.sock" --port=$DB_PORT \
        --bind-address=127.0.0.1 --pid-file="$DIR/mariadb.pid" --innodb-buffer-pool-size=32M \
        --log-error="$DIR/log/mariadb.log" </dev/null >>"$DIR/log/mariadb.log" 2>&1 &
    wait_for 60 MariaDB mariadb --socket="$DIR/mysql.sock" -e "select 1"
    mariadb --socket="$DIR/mysql.sock" -e "
        CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

up() {
    mkdir -p "$DIR"/{state,log} "${NODES[@]/#/$DIR/spool/}"
    install_packages
    if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
        log "already up ($CONF)"; return 0
    fi
    for port in $CTLD_PORT $DBD_PORT "${NODE_PORTS[@]}" $DB_PORT; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            log "port $port is taken (another local cluster up? SLURM_LOCAL_DIR=... $0 down)"; exit 1
        fi
    done
    write_configs
    grep -q "$HOSTS_MARK" /etc/hosts || echo "127.0.0.1 ${NODES[*]} $HOSTS_MARK" >>/etc/hosts
    export SLURM_CONF=$CONF
    start_munge
    start_database
    slurmdbd </dev/null >>"$DIR/log/slurmdbd.log" 2>&1  # reads slurmdbd.conf beside SLURM_CONF
    wait_for 30 slurmdbd sacctmgr -n list cluster
    sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
    slurmctld </dev/null >>"$DIR/log/slurmctld.log" 2>&1
    wait_for 30 slurmctld scontrol ping
    for node in "${NODES[@]}"; do
        slurmd -N "$node" </dev/null >>"$DIR/log/slurmd-$node.log" 2>&1
    done
    wait_for 60 "both nodes idle" bash -c "[ \"\$(sinfo -h -N -t idle -o %N | sort -u | wc -l)\" = ${#NODES[@]} ]"
    log "up: ${NODES[*]} in partition debug; export SLURM_CONF=$CONF"
}

stop_daemons() {  # stop_daemons PIDFILE...: TERM them all at once, wait (then KILL) for each
    local file pids=()
    for file in "$@"; do
        [ -f "$file" ] || continue
        pids+=("$(cat "$file")")
        kill "${pids[-1]}" 2>/dev/null || true
        rm -f "$file"
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    done
}

down() {
    [ -d "$DIR" ] || return 0
    export SLURM_CONF=$CONF
    [ -f "$CONF" ] && scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    local node slurmds=()
    for node in "${NODES[@]}"; do slurmds+=("$DIR/slurmd-$node.pid"); done
    stop_daemons "${slurmds[@]}" "$DIR/slurmctld.pid"
    stop_daemons "$DIR/slurmdbd.pid" "$DIR/mariadb.pid"
    if [ -f "$DIR/started-munge" ]; then stop_daemons /run/munge/munged.pid; fi
    # Rewritten in place, not renamed: /etc/hosts is often a bind mount.
    local hosts; hosts=$(grep -v "$HOSTS_MARK" /etc/hosts || true)
    printf '%s\n' "$hosts" >/etc/hosts
    rm -rf "$DIR"
    log "down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
