#!/usr/bin/env bash
# One-node SLURM test cluster on this machine (Debian/Ubuntu, root, no systemd needed).
#
#   slurm/cluster.sh up [--gpus N] [--cpus N]   install if missing, configure, start, wait until idle
#   slurm/cluster.sh down                        cancel jobs, stop slurmd/slurmctld/munged, wipe state
#   slurm/cluster.sh status                      sinfo; exit 0 if the node is usable, 1 if not
#
# --gpus N : N fake GPUs exposed as GRES gpu (character devices /dev/fakegpuK, copies of
#            /dev/null), so `--gpus`/`--gpus-per-node` requests schedule and SLURM sets
#            CUDA_VISIBLE_DEVICES per job. Default 2; 0 = no GRES.
# --cpus N : CPUs the node advertises. Default: what `slurmd -C` reports. More than the machine
#            has is allowed (SlurmdParameters=config_overrides).
#
# Files: /etc/slurm/{slurm.conf,gres.conf}, logs /var/log/slurm/{slurmctld,slurmd}.log,
#        state /var/spool/slurmctld and /var/spool/slurmd, munge key /etc/munge/munge.key.
# Environment: CLUSTER_UP_TIMEOUT (seconds `up` waits for the node to go idle, default 60).
set -euo pipefail

readonly PROG=${0##*/}
readonly CONF_DIR=/etc/slurm
readonly SLURM_CONF=$CONF_DIR/slurm.conf
readonly GRES_CONF=$CONF_DIR/gres.conf
readonly LOG_DIR=/var/log/slurm
readonly CTLD_STATE=/var/spool/slurmctld
readonly SLURMD_STATE=/var/spool/slurmd
readonly CTLD_PID=/run/slurmctld.pid
readonly SLURMD_PID=/run/slurmd.pid
readonly MUNGE_PID=/run/munge/munged.pid
readonly MUNGE_KEY=/etc/munge/munge.key
readonly PACKAGES=(munge slurmctld slurmd slurm-client)
readonly UP_TIMEOUT=${CLUSTER_UP_TIMEOUT:-60}
readonly PARTITION=debug

usage() {
    cat >&2 <<EOF
usage: $PROG up [--gpus N] [--cpus N]   start a one-node SLURM cluster (default 2 fake GPUs)
       $PROG down                        stop it and wipe its job state
       $PROG status                      show it; exit 0 if up, 1 if not
EOF
    exit 2
}

log() { echo "[$PROG] $*" >&2; }
die() { echo "[$PROG] error: $*" >&2; exit 1; }

need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root"; }

node_name() { hostname -s; }

# --- processes ---------------------------------------------------------------------------------

# live_pids NAME: pids of live (not zombie) processes whose command name is exactly NAME.
live_pids() {
    local pid state
    for pid in $(pgrep -x "$1" || true); do
        state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)
        [[ -n $state && $state != Z ]] && echo "$pid"
    done
    return 0
}

# pid_of NAME PIDFILE: print the pid of a running NAME (from its pid file, else by exact name).
pid_of() {
    local name=$1 pidfile=$2 pid
    if [[ -s $pidfile ]]; then
        pid=$(<"$pidfile")
        if [[ $pid =~ ^[0-9]+$ ]] && live_pids "$name" | grep -qx "$pid"; then
            echo "$pid"; return 0
        fi
    fi
    pid=$(live_pids "$name" | head -n1)
    [[ -n $pid ]] && { echo "$pid"; return 0; }
    return 1
}

running() { pid_of "$1" "$2" >/dev/null; }

# stop_daemons NAME...: SIGTERM every live process called NAME, SIGKILL what is left after 10 s.
stop_daemons() {
    local name i pids=()
    mapfile -t pids < <(for name in "$@"; do live_pids "$name"; done)
    if ((${#pids[@]})); then
        log "stopping $* (pids ${pids[*]})"
        kill -TERM "${pids[@]}" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            mapfile -t pids < <(for name in "$@"; do live_pids "$name"; done)
            ((${#pids[@]})) || break
            sleep 0.1
        done
        if ((${#pids[@]})); then
            log "still running after SIGTERM, sending SIGKILL: ${pids[*]}"
            kill -KILL "${pids[@]}" 2>/dev/null || true
            sleep 0.5
        fi
    fi
    for name in "$@"; do
        case $name in
            slurmctld) rm -f "$CTLD_PID" ;;
            slurmd) rm -f "$SLURMD_PID" ;;
            munged) rm -f "$MUNGE_PID" ;;
        esac
    done
}

# --- installation ------------------------------------------------------------------------------

missing_packages() {
    local p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
    done
}

install_packages() {
    local missing=()
    mapfile -t missing < <(missing_packages)
    ((${#missing[@]})) || return 0
    command -v apt-get >/dev/null || die "packages missing (${missing[*]}) and no apt-get to install them"
    log "installing ${missing[*]} (log: /tmp/cluster-apt.log)"
    export DEBIAN_FRONTEND=noninteractive
    # Keep package scripts from starting daemons; this script starts them itself.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
    fi
    local ok=0
    : >/tmp/cluster-apt.log
    # apt-get update only when the package lists are absent or too old to install from.
    if compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null &&
        apt-get install -y -q "${missing[@]}" >>/tmp/cluster-apt.log 2>&1; then
        ok=1
    else
        log "apt-get update"
        if apt-get update -q >>/tmp/cluster-apt.log 2>&1 &&
            apt-get install -y -q "${missing[@]}" >>/tmp/cluster-apt.log 2>&1; then
            ok=1
        fi
    fi
    ((made_policy)) && rm -f "$policy"
    if ((!ok)); then
        tail -n 20 /tmp/cluster-apt.log >&2
        die "installing ${missing[*]} failed (full log: /tmp/cluster-apt.log)"
    fi
    mapfile -t missing < <(missing_packages)
    ((${#missing[@]} == 0)) || die "still missing after install: ${missing[*]}"
}

# --- configuration -----------------------------------------------------------------------------

# hw_field KEY: a KEY=value field of `slurmd -C` (the hardware this node really has).
HW_LINE=
hw_field() {
    if [[ -z $HW_LINE ]]; then
        HW_LINE=$(slurmd -C 2>/dev/null | grep -m1 '^NodeName=') ||
            die "'slurmd -C' failed: $(slurmd -C 2>&1 | tail -n 3)"
    fi
    tr ' ' '\n' <<<"$HW_LINE" | sed -n "s/^$1=//p"
}

# render_config GPUS CPUS: write slurm.conf and gres.conf into $NEW_DIR.
render_config() {
    local gpus=$1 cpus=$2 node mem topo
    node=$(node_name)
    mem=$(hw_field RealMemory)
    [[ $mem =~ ^[0-9]+$ ]] || mem=1000
    if [[ -z $cpus ]]; then
        # Exactly the topology slurmd detects.
        topo="CPUs=$(hw_field CPUs) Boards=$(hw_field Boards) SocketsPerBoard=$(hw_field SocketsPerBoard)"
        topo+=" CoresPerSocket=$(hw_field CoresPerSocket) ThreadsPerCore=$(hw_field ThreadsPerCore)"
    else
        topo="CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1"
    fi
    local gres_node=
    ((gpus > 0)) && gres_node=" Gres=gpu:$gpus"

    cat >"$NEW_DIR/slurm.conf" <<EOF
# Written by slurm/cluster.sh (one-node test cluster): gpus=$gpus cpus=${cpus:-auto}
ClusterName=gen-local
SlurmctldHost=$node
AuthType=auth/munge
# Requeued jobs are held until now + cred_expire + 1 s (default 120 s); 10 s keeps requeue tests quick.
AuthInfo=cred_expire=10
SlurmUser=root
SlurmdUser=root
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
StateSaveLocation=$CTLD_STATE
SlurmdSpoolDir=$SLURMD_STATE
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,batch_sched_delay=0,bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Use the node definition below even where it differs from the hardware (e.g. --cpus).
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=300
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
MaxArraySize=1001
MailProg=/bin/true
EOF
    if ((gpus > 0)); then
        echo "GresTypes=gpu" >>"$NEW_DIR/slurm.conf"
    fi
    cat >>"$NEW_DIR/slurm.conf" <<EOF
NodeName=$node $topo RealMemory=$mem$gres_node State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF

    {
        echo "# Written by slurm/cluster.sh: $gpus fake GPUs (character devices, copies of /dev/null)"
        echo "AutoDetect=off"
        local k
        for ((k = 0; k < gpus; k++)); do
            echo "NodeName=$node Name=gpu File=/dev/fakegpu$k"
        done
    } >"$NEW_DIR/gres.conf"
}

make_fake_gpus() {
    local gpus=$1 k
    for ((k = 0; k < gpus; k++)); do
        if [[ ! -c /dev/fakegpu$k ]]; then
            rm -f "/dev/fakegpu$k"
            mknod -m 666 "/dev/fakegpu$k" c 1 3 || die "mknod /dev/fakegpu$k failed"
        fi
    done
}

# --- daemons -----------------------------------------------------------------------------------

start_munge() {
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    chown munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
    chmod 700 /etc/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating $MUNGE_KEY"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY" --force
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 400 "$MUNGE_KEY"
    if running munged "$MUNGE_PID" && munge -n </dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    stop_daemons munged
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged --force ||
        die "munged failed to start (see /var/log/munge/munged.log)"
    local i
    for ((i = 0; i < 50; i++)); do
        munge -n </dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munge does not work: $(munge -n </dev/null 2>&1 | unmunge 2>&1 | tail -n 2)"
}

ctld_responds() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

start_slurmctld() {
    running slurmctld "$CTLD_PID" && return 0
    log "starting slurmctld"
    slurmctld || { log_tails; die "slurmctld failed to start"; }
}

start_slurmd() {
    running slurmd "$SLURMD_PID" && return 0
    log "starting slurmd"
    slurmd || { log_tails; die "slurmd failed to start"; }
}

# node_state: compact state of the node, e.g. idle, mixed, drained, down* (empty if unreachable).
node_state() { sinfo -h -n "$(node_name)" -o '%t' 2>/dev/null | head -n1 || true; }

node_usable() {
    case $(node_state) in
        idle | mix | alloc | comp) return 0 ;;
        *) return 1 ;;
    esac
}

log_tails() {
    local f
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log"; do
        echo "---- tail $f" >&2
        tail -n 25 "$f" >&2 2>/dev/null || echo "(missing)" >&2
    done
}

wait_node_usable() {
    local deadline=$((SECONDS + UP_TIMEOUT)) resumed=0 state
    while ((SECONDS < deadline)); do
        if ctld_responds; then
            state=$(node_state)
            case $state in
                idle | mix | alloc | comp) return 0 ;;
                drain* | drng | down)
                    # Left over from an earlier run (e.g. changed node definition): resume once.
                    if ((!resumed)); then
                        scontrol update NodeName="$(node_name)" State=RESUME >/dev/null 2>&1 || true
                        resumed=1
                    fi
                    ;;
            esac
        fi
        sleep 0.5
    done
    echo "[$PROG] error: node not idle after ${UP_TIMEOUT}s (state: '$(node_state)')" >&2
    sinfo -N -l >&2 2>/dev/null || true
    scontrol show node "$(node_name)" 2>/dev/null | grep -iE 'State|Reason' >&2 || true
    log_tails
    exit 1
}

# --- commands ----------------------------------------------------------------------------------

cmd_up() {
    local gpus=2 cpus=
    while (($#)); do
        case $1 in
            --gpus) [[ $# -ge 2 ]] || usage; gpus=$2; shift 2 ;;
            --gpus=*) gpus=${1#*=}; shift ;;
            --cpus) [[ $# -ge 2 ]] || usage; cpus=$2; shift 2 ;;
            --cpus=*) cpus=${1#*=}; shift ;;
            -h | --help) usage ;;
            *) echo "[$PROG] unknown option: $1" >&2; usage ;;
        esac
    done
    [[ $gpus =~ ^[0-9]+$ ]] || die "--gpus wants a whole number, got '$gpus'"
    [[ -z $cpus || ($cpus =~ ^[0-9]+$ && $cpus -gt 0) ]] || die "--cpus wants a positive whole number, got '$cpus'"
    need_root
    install_packages

    NEW_DIR=$(mktemp -d)
    trap 'rm -rf "$NEW_DIR"' EXIT
    render_config "$gpus" "$cpus"

    make_fake_gpus "$gpus"
    local changed=0
    cmp -s "$NEW_DIR/slurm.conf" "$SLURM_CONF" || changed=1
    cmp -s "$NEW_DIR/gres.conf" "$GRES_CONF" || changed=1

    if ((!changed)) && running munged "$MUNGE_PID" && running slurmctld "$CTLD_PID" &&
        running slurmd "$SLURMD_PID" && ctld_responds && node_usable; then
        log "already up (gpus=$gpus cpus=${cpus:-auto})"
        sinfo
        return 0
    fi

    mkdir -p "$CONF_DIR" "$LOG_DIR" "$CTLD_STATE" "$SLURMD_STATE"
    if ((changed)); then
        if running slurmctld "$CTLD_PID" || running slurmd "$SLURMD_PID"; then
            log "configuration changed: restarting slurmctld and slurmd"
            stop_daemons slurmd slurmctld
        fi
        install -m 644 "$NEW_DIR/slurm.conf" "$SLURM_CONF"
        install -m 644 "$NEW_DIR/gres.conf" "$GRES_CONF"
        log "wrote $SLURM_CONF and $GRES_CONF (gpus=$gpus cpus=${cpus:-auto})"
    fi

    start_munge
    start_slurmctld
    local i
    for ((i = 0; i < 100; i++)); do
        ctld_responds && break
        running slurmctld "$CTLD_PID" || { log_tails; die "slurmctld exited"; }
        sleep 0.2
    done
    start_slurmd
    wait_node_usable
    log "up: node $(node_name), partition $PARTITION, gpus=$gpus"
    sinfo
}

cmd_down() {
    (($# == 0)) || usage
    need_root
    if command -v scontrol >/dev/null && ctld_responds; then
        local jobs=()
        mapfile -t jobs < <(squeue -h -o '%A' 2>/dev/null | sort -un)
        if ((${#jobs[@]})); then
            log "cancelling jobs: ${jobs[*]}"
            scancel "${jobs[@]}" 2>/dev/null || true
            local i
            for ((i = 0; i < 50; i++)); do
                [[ -z $(squeue -h -t R,CG -o '%A' 2>/dev/null) ]] && break
                sleep 0.2
            done
        fi
    fi
    # Job steps outliving slurmd (their slurmstepd) would hold CPUs from the next cluster.
    stop_daemons slurmd slurmctld slurmstepd
    stop_daemons munged
    # Fresh state for the next `up`: no old jobs, job ids start again at 1.
    rm -rf "${CTLD_STATE:?}"/* "${SLURMD_STATE:?}"/* 2>/dev/null || true
    log "down"
}

cmd_status() {
    (($# == 0)) || usage
    if ! command -v sinfo >/dev/null; then
        echo "SLURM is not installed"; return 1
    fi
    local d stopped=()
    for d in munged:$MUNGE_PID slurmctld:$CTLD_PID slurmd:$SLURMD_PID; do
        if running "${d%%:*}" "${d#*:}"; then
            echo "${d%%:*}: running (pid $(pid_of "${d%%:*}" "${d#*:}"))"
        else
            echo "${d%%:*}: not running"
            stopped+=("${d%%:*}")
        fi
    done
    if ! ctld_responds; then
        echo "cluster is down (slurmctld not responding)"; return 1
    fi
    sinfo
    if ((${#stopped[@]})); then
        echo "cluster is not usable: ${stopped[*]} not running (run: $PROG up)"; return 1
    fi
    if node_usable; then
        echo "cluster is up"; return 0
    fi
    echo "cluster is not usable: node $(node_name) is '$(node_state)'"
    return 1
}

main() {
    (($#)) || usage
    local cmd=$1; shift
    case $cmd in
        up) cmd_up "$@" ;;
        down) cmd_down "$@" ;;
        status) cmd_status "$@" ;;
        -h | --help | help) usage ;;
        *) echo "[$PROG] unknown command: $cmd" >&2; usage ;;
    esac
}

main "$@"
