#!/usr/bin/env bash
# ANA multipath failover with the Linux kernel host (native NVMe multipath, Debian kernel in a
# QEMU/TCG guest) against two stagerd nodes on this machine:
#
#   node-a  127.0.0.1:PORT_A  ANA group 1 optimized     controller ids 1..999
#   node-b  127.0.0.1:PORT_B  ANA group 1 inaccessible  controller ids 1000..1999
#
# Both serve the same subsystem NQN and namespace 1 (same NSID, NGUID, UUID: derived from the
# NQN) from ONE shared file on this machine (`kind: file`, O_DIRECT). A file both processes
# open is the simplest backing that stays consistent whichever node a write goes through: a
# write acknowledged by node-a is in the file, so node-b reads it. (A write-through volume over
# one shared SAN file would not do: each node keeps its own flash read cache, which the other
# node's writes would leave stale.)
#
# The guest (scripts/guest/multipath-test.sh) connects both paths, checks sysfs (one
# subsystem, two controllers, one multipath namespace, paths optimized/inaccessible), writes
# and verifies data, then writes chunk after chunk; after a few it asks for the failover and
# this script kills node-a (kill -9) mid-write, waits FAILOVER_DELAY seconds (the I/O must wait,
# not fail: node-b is still inaccessible) and sets node-b's group optimized with
# `stagerctl ana set 1 optimized`. node-b sends the ANA change notice, the host re-reads the ANA
# log and its I/O continues through node-b; the guest verifies everything, and this script
# checks the md5 the guest reports against the shared file itself.
#
# Environment:
#   BIN              where stagerd and stagerctl are (default build/release; built if missing)
#   GUEST_TIMEOUT    seconds for the guest run (default 100)
#   FAILOVER_DELAY   seconds between the kill and `stagerctl ana set` (default 2)
#   GUEST_VERBOSE=1  stream the guest console while it runs
#   KEEP_TMP=1       keep the temp dir (configs, shared namespace file)
# Logs go to build/guest/logs/multipath-<timestamp>/ (console.log, node-a.log, node-b.log).
# Exit status: 0 = pass; 1 = anything else (with the logs' tails printed).
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"
for a in "$@"; do
    case $a in
        -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "multipath: unknown argument $a (try --help)" >&2; exit 2 ;;
    esac
done

SUBNQN=nqn.2026-11.dev.stager:multipath-test
HOSTNQN=nqn.2026-11.dev.stager:guest-host
GUEST_TIMEOUT=${GUEST_TIMEOUT:-100}
FAILOVER_DELAY=${FAILOVER_DELAY:-2}
BIN=${BIN:-build/release}
CHUNKS=40
KILL_AFTER=6

log() { echo "multipath: $*"; }

LOGDIR=$REPO_ROOT/build/guest/logs/multipath-$(date +%Y%m%d-%H%M%S)-$$
mkdir -p "$LOGDIR"
# keep the 20 newest run logs
# shellcheck disable=SC2012
ls -1dt "$REPO_ROOT"/build/guest/logs/*-*/ 2>/dev/null | tail -n +21 | xargs -r rm -rf
CONSOLE=$LOGDIR/console.log
TMP=$(mktemp -d /tmp/stager-multipath.XXXXXX)

PID_A="" PID_B="" QEMU_PID="" TAIL_PID=""
stop_pid() {
    # $1 = pid, $2 = name: SIGTERM, then SIGKILL after 10 s.
    [ -n "$1" ] || return 0
    if kill -0 "$1" 2>/dev/null; then
        kill -TERM "$1" 2>/dev/null || true
        local n=0
        while kill -0 "$1" 2>/dev/null && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
        kill -0 "$1" 2>/dev/null && { log "$2 did not exit 10 s after SIGTERM; SIGKILL"; kill -KILL "$1" 2>/dev/null || true; }
    fi
    wait "$1" 2>/dev/null || true
}
# shellcheck disable=SC2317  # invoked through trap
cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    [ -z "$QEMU_PID" ] || stop_pid "$QEMU_PID" qemu
    [ -z "$TAIL_PID" ] || kill "$TAIL_PID" 2>/dev/null || true
    stop_pid "$PID_A" node-a
    stop_pid "$PID_B" node-b
    if [ "${KEEP_TMP:-0}" = 1 ]; then log "keeping $TMP"; else rm -rf "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM HUP

show_logs() {
    log "---- last 60 lines of the guest console ($CONSOLE) ----"
    tr -d '\r' <"$CONSOLE" 2>/dev/null | tail -n 60 | sed 's/^/  guest| /'
    for n in a b; do
        log "---- last 30 lines of node-$n's log ($LOGDIR/node-$n.log) ----"
        tail -n 30 "$LOGDIR/node-$n.log" 2>/dev/null | sed "s/^/  node-$n| /"
    done
}
die() {
    log "FAIL: $*"
    show_logs
    exit 1
}

port_busy() { grep -q . <<< "$(ss -Hltn "sport = :$1" 2>/dev/null)"; }
free_port() {
    # $1 = first candidate
    local p=$1
    while port_busy "$p"; do
        p=$((p + 1))
        [ "$p" -le 4499 ] || { log "FAIL: no free port in 4420..4499"; exit 1; }
    done
    echo "$p"
}

# ---------------------------------------------------------------- build --
T_START=$(date +%s.%N)
log "guest: building kernel + initramfs (scripts/guest/build.sh)..."
bash scripts/guest/build.sh
# shellcheck disable=SC1091
. build/guest/guest.env
if [ ! -x "$BIN/stagerd" ] || [ ! -x "$BIN/stagerctl" ]; then
    log "stagerd/stagerctl not in $BIN; building them (cargo build --release -p stager-target)..."
    cargo build --release -p stager-target
    BIN=build/release
fi

# ---------------------------------------------------------------- nodes --
PORT_A=$(free_port 4420)
PORT_B=$(free_port $((PORT_A + 1)))
truncate -s 64M "$TMP/shared.img"
node_config() {
    # $1 = name, $2 = port, $3 = ANA state, $4 = first cntlid, $5 = last cntlid, $6 = core
    cat <<EOF
reactors:
  cores: [$6]
logging:
  level: info
management:
  socket: $TMP/$1.sock
ana:
  cntlid_min: $4
  cntlid_max: $5
  transition_time_s: 10
listeners:
  - name: tcp-$1
    address: 127.0.0.1:$2
subsystems:
  - nqn: $SUBNQN
    allow_any_host: false
    hosts: [$HOSTNQN]
    ana_groups:
      - { id: 1, state: $3 }
    namespaces:
      - nsid: 1
        backend: { kind: file, path: $TMP/shared.img, size: 64MiB }
EOF
}
CORE_B=$(($(nproc) > 1 ? 1 : 0))
node_config node-a "$PORT_A" optimized 1 999 0 >"$TMP/node-a.yaml"
node_config node-b "$PORT_B" inaccessible 1000 1999 "$CORE_B" >"$TMP/node-b.yaml"
cp "$TMP"/node-?.yaml "$LOGDIR/"
start_node() {
    # $1 = name, $2 = port; prints the pid
    "$BIN/stagerd" --config "$TMP/$1.yaml" >"$LOGDIR/$1.log" 2>&1 </dev/null &
    echo $!
}
wait_listening() {
    # $1 = pid, $2 = port, $3 = name
    local n=0
    until port_busy "$2"; do
        kill -0 "$1" 2>/dev/null || die "$3 exited before listening on 127.0.0.1:$2"
        n=$((n + 1))
        [ $n -le 300 ] || die "$3 not listening on 127.0.0.1:$2 after 30 s"
        sleep 0.1
    done
}
PID_A=$(start_node node-a "$PORT_A")
PID_B=$(start_node node-b "$PORT_B")
wait_listening "$PID_A" "$PORT_A" node-a
wait_listening "$PID_B" "$PORT_B" node-b
log "node-a (pid $PID_A) on 127.0.0.1:$PORT_A optimized; node-b (pid $PID_B) on 127.0.0.1:$PORT_B inaccessible"
log "shared namespace file $TMP/shared.img"

# ---------------------------------------------------------------- guest --
APPEND="console=ttyS0 panic=-1 quiet stager.test=/guest/multipath-test.sh stager.addr=10.0.2.2"
APPEND="$APPEND stager.port_a=$PORT_A stager.port_b=$PORT_B stager.subnqn=$SUBNQN stager.hostnqn=$HOSTNQN"
APPEND="$APPEND stager.chunks=$CHUNKS stager.kill_after=$KILL_AFTER"
log "guest: booting $GUEST_KVER (TCG, 1024 MiB, 2 vCPUs, timeout ${GUEST_TIMEOUT}s), console -> $CONSOLE"
T_BOOT=$(date +%s.%N)
: >"$CONSOLE"
# No -enable-kvm: it hangs on these machines; TCG only.
timeout -k 5 "$GUEST_TIMEOUT" qemu-system-x86_64 \
    -accel tcg -cpu max -m 1024 -smp 2 \
    -kernel "$GUEST_VMLINUZ" -initrd "$GUEST_INITRD" -append "$APPEND" \
    -display none -monitor none -parallel none -serial "file:$CONSOLE" \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0 \
    -no-reboot </dev/null >"$LOGDIR/qemu.log" 2>&1 &
QEMU_PID=$!
if [ "${GUEST_VERBOSE:-0}" = 1 ]; then
    tail -n +1 -f "$CONSOLE" --pid="$QEMU_PID" | sed -u 's/^/  guest| /' &
    TAIL_PID=$!
fi

# ------------------------------------------------------------- failover --
KILLED=0
while kill -0 "$QEMU_PID" 2>/dev/null; do
    if [ $KILLED = 0 ] && grep -qa '^MULTIPATH-KILL-NOW' "$CONSOLE"; then
        KILLED=1
        T_KILL=$(date +%s.%N)
        log "guest asked for the failover: kill -9 node-a (pid $PID_A) mid-write"
        kill -KILL "$PID_A"
        wait "$PID_A" 2>/dev/null || true
        PID_A=""
        sleep "$FAILOVER_DELAY"
        if grep -qa 'all [0-9]* chunks written' "$CONSOLE"; then
            die "the guest finished writing before node-b became optimized: its I/O did not wait for a path"
        fi
        log "after ${FAILOVER_DELAY}s: $BIN/stagerctl ana set 1 optimized (node-b)"
        out=$("$BIN/stagerctl" ana set 1 optimized --socket "$TMP/node-b.sock" 2>&1) || die "stagerctl ana set failed: $out"
        log "  $out"
        "$BIN/stagerctl" ana show --socket "$TMP/node-b.sock" 2>&1 | sed 's/^/  /'
    fi
    sleep 0.1
done
QRC=0
wait "$QEMU_PID" || QRC=$?
QEMU_PID=""
T_END=$(date +%s.%N)

fmt() { awk "BEGIN{printf \"%.1f\", $2 - $1}"; }
RESULT=$(tr -d '\r' <"$CONSOLE" | grep -a -E '^GUEST-RESULT: ' | tail -n1 || true)
if [ "$RESULT" != "GUEST-RESULT: PASS" ]; then
    if [ "$QRC" = 124 ] || [ "$QRC" = 137 ]; then
        why="guest timed out after ${GUEST_TIMEOUT}s"
    elif [ -n "$RESULT" ]; then
        why=${RESULT#GUEST-RESULT: FAIL }
    else
        why="no GUEST-RESULT marker on the console (qemu exit status $QRC)"
    fi
    die "$why"
fi
[ $KILLED = 1 ] || die "the guest passed without asking for the failover"

# The data the guest verified is on the shared file itself.
read -r _ MIB WANT < <(tr -d '\r' <"$CONSOLE" | grep -a '^MULTIPATH-MD5 ' | tail -n1) || die "no MULTIPATH-MD5 line from the guest"
GOT=$(head -c $((MIB << 20)) "$TMP/shared.img" | md5sum | cut -d' ' -f1)
[ "$GOT" = "$WANT" ] || die "the shared file's first $MIB MiB have md5 $GOT, the guest wrote $WANT"
grep -q "ANA change notice sent" "$LOGDIR/node-b.log" || die "node-b's log does not show the ANA change notice"
# A write in flight at the kill (or issued after it) waited for node-b's path to become usable:
# about FAILOVER_DELAY, the time between the kill and `stagerctl ana set`. Much less would mean
# the I/O went through a path it should not have used.
read -r _ WAIT_S WAIT_CHUNK < <(tr -d '\r' <"$CONSOLE" | grep -a '^MULTIPATH-WAIT ' | tail -n1) || die "no MULTIPATH-WAIT line from the guest"
awk "BEGIN { exit !($WAIT_S >= $FAILOVER_DELAY - 0.5) }" ||
    die "the longest write after the kill took ${WAIT_S}s (chunk $WAIT_CHUNK): it did not wait ~${FAILOVER_DELAY}s for the ANA change"
tr -d '\r' <"$CONSOLE" | grep -a -E '^mp: ' | sed 's/^/  /'
log "timings: guest run $(fmt "$T_BOOT" "$T_END")s, kill to guest done $(fmt "$T_KILL" "$T_END")s, total $(fmt "$T_START" "$T_END")s;" \
    "chunk $WAIT_CHUNK waited ${WAIT_S}s for a path (${FAILOVER_DELAY}s from the kill to stagerctl ana set)"
log "PASS: Linux $GUEST_KVER native multipath failed over from node-a (killed) to node-b (ANA optimized); $MIB MiB verified in the guest and on the shared file (logs: $LOGDIR)"
