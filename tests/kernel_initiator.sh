#!/usr/bin/env bash
# Linux-kernel interoperability test: the kernel's NVMe/TCP host (Debian
# kernel in a QEMU/TCG guest) against stagerd running on this machine.
#
#   tests/kernel_initiator.sh              stagerd on 127.0.0.1:PORT, guest reaches it at 10.0.2.2
#   tests/kernel_initiator.sh --self-test  no stagerd: the guest runs the kernel target (nvmet)
#                                          on its own 127.0.0.1 and tests against it; validates
#                                          the harness itself
#
# Environment:
#   STAGERD          stagerd binary (default build/release/stagerd; built with
#                    `cargo build --release -p stager-target` if missing)
#   STAGER_PORT      TCP port on 127.0.0.1 (default 4420; if 4420 is busy and
#                    STAGER_PORT is unset, the next free port up to 4499 is used)
#   GUEST_TIMEOUT    seconds for the whole guest run (default 600)
#   GUEST_MEM        guest memory in MiB (default 1024, max 1024)
#   GUEST_CONNECT    nvme-cli | fabrics  (how the guest connects; default nvme-cli)
#   GUEST_APPEND     extra kernel command-line words (e.g. stager.regions=0:4)
#   GUEST_VERBOSE=1  stream the guest console to stdout while it runs
#   KEEP_TMP=1       keep the temp dir (stagerd config and namespace image)
# Logs go to build/guest/logs/<mode>-<timestamp>/ (console.log, stagerd.log).
# Exit status: 0 = GUEST-RESULT: PASS seen; 1 = anything else.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"

SELFTEST=0
for a in "$@"; do
    case $a in
        --self-test | --selftest) SELFTEST=1 ;;
        -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "kernel_initiator: unknown argument $a (try --help)" >&2; exit 2 ;;
    esac
done

SUBNQN=nqn.2026-11.dev.stager:kernel-test
HOSTNQN=nqn.2026-11.dev.stager:guest-host
GUEST_TIMEOUT=${GUEST_TIMEOUT:-600}
GUEST_MEM=${GUEST_MEM:-1024}
[ "$GUEST_MEM" -le 1024 ] || { echo "kernel_initiator: GUEST_MEM must be <= 1024" >&2; exit 2; }

log() { echo "kernel_initiator: $*"; }

MODE=$([ "$SELFTEST" = 1 ] && echo selftest || echo stagerd)
LOGDIR=$REPO_ROOT/build/guest/logs/$MODE-$(date +%Y%m%d-%H%M%S)-$$
mkdir -p "$LOGDIR"
# keep the 20 newest run logs
# shellcheck disable=SC2012
ls -1dt "$REPO_ROOT"/build/guest/logs/*-*/ 2>/dev/null | tail -n +21 | xargs -r rm -rf
CONSOLE=$LOGDIR/console.log
STAGERD_LOG=$LOGDIR/stagerd.log
TMP=$(mktemp -d /tmp/stager-kernel-initiator.XXXXXX)

STAGERD_PID=""
QEMU_PID=""
# shellcheck disable=SC2317  # invoked through trap
cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    if [ -n "$QEMU_PID" ] && kill -0 "$QEMU_PID" 2>/dev/null; then
        log "stopping guest (pid $QEMU_PID)"
        kill -TERM "$QEMU_PID" 2>/dev/null || true
        wait "$QEMU_PID" 2>/dev/null || true
    fi
    stop_stagerd
    if [ "${KEEP_TMP:-0}" = 1 ]; then
        log "keeping $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
stop_stagerd() {
    [ -n "$STAGERD_PID" ] || return 0
    if kill -0 "$STAGERD_PID" 2>/dev/null; then
        log "stopping stagerd (pid $STAGERD_PID, SIGTERM)"
        kill -TERM "$STAGERD_PID" 2>/dev/null || true
        local n=0
        while kill -0 "$STAGERD_PID" 2>/dev/null && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
        if kill -0 "$STAGERD_PID" 2>/dev/null; then
            log "stagerd did not exit 10 s after SIGTERM; sending SIGKILL"
            kill -KILL "$STAGERD_PID" 2>/dev/null || true
        fi
    fi
    local src=0
    wait "$STAGERD_PID" 2>/dev/null || src=$?
    log "stagerd exited with status $src"
    STAGERD_PID=""
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM HUP

port_busy() { grep -q . <<< "$(ss -Hltn "sport = :$1" 2>/dev/null)"; }

# ---------------------------------------------------------------- build --
T_START=$(date +%s.%N)
log "guest: building kernel + initramfs (scripts/guest/build.sh)..."
bash scripts/guest/build.sh
# shellcheck disable=SC1091
. build/guest/guest.env
T_BUILT=$(date +%s.%N)

# -------------------------------------------------------------- stagerd --
if [ "$SELFTEST" = 1 ]; then
    PORT=${STAGER_PORT:-4420}
    ADDR=127.0.0.1
    log "self-test mode: no stagerd; the guest's kernel target (nvmet) serves $SUBNQN on its own $ADDR:$PORT"
    EXTRA="stager.selftest=1"
else
    STAGERD=${STAGERD:-build/release/stagerd}
    if [ ! -x "$STAGERD" ]; then
        log "stagerd not found at $STAGERD; building it (cargo build --release -p stager-target)..."
        cargo build --release -p stager-target
        [ -x "$STAGERD" ] || { log "FAIL: cargo build did not produce $STAGERD"; exit 1; }
    fi
    if [ -n "${STAGER_PORT:-}" ]; then
        PORT=$STAGER_PORT
        ! port_busy "$PORT" || { log "FAIL: port $PORT on 127.0.0.1 is already in use"; exit 1; }
    else
        PORT=4420
        while port_busy "$PORT"; do
            PORT=$((PORT + 1))
            [ "$PORT" -le 4499 ] || { log "FAIL: no free port in 4420..4499"; exit 1; }
        done
    fi
    ADDR=10.0.2.2 # QEMU user networking: the host's 127.0.0.1 seen from the guest

    truncate -s 256M "$TMP/ns1.img"
    cat >"$TMP/stagerd.yaml" <<EOF
reactors:
  cores: [0]
logging:
  level: info
listeners:
  - name: tcp0
    transport: tcp
    address: 127.0.0.1:$PORT
subsystems:
  - nqn: $SUBNQN
    serial: STAGERKT0001
    allow_any_host: false
    hosts: [$HOSTNQN]
    namespaces:
      - nsid: 1
        backend: { kind: file, path: $TMP/ns1.img, size: 256MiB }
EOF
    cp "$TMP/stagerd.yaml" "$LOGDIR/stagerd.yaml"
    log "starting $STAGERD --config $TMP/stagerd.yaml (listening on 127.0.0.1:$PORT, log $STAGERD_LOG)"
    "$STAGERD" --config "$TMP/stagerd.yaml" >"$STAGERD_LOG" 2>&1 </dev/null &
    STAGERD_PID=$!
    n=0
    until port_busy "$PORT"; do
        if ! kill -0 "$STAGERD_PID" 2>/dev/null; then
            log "FAIL: stagerd exited before listening on 127.0.0.1:$PORT; its log:"
            tail -n 40 "$STAGERD_LOG" | sed 's/^/  stagerd| /'
            exit 1
        fi
        n=$((n + 1))
        if [ $n -gt 300 ]; then
            log "FAIL: stagerd not listening on 127.0.0.1:$PORT after 30 s; its log:"
            tail -n 40 "$STAGERD_LOG" | sed 's/^/  stagerd| /'
            exit 1
        fi
        sleep 0.1
    done
    log "stagerd is listening on 127.0.0.1:$PORT"
    EXTRA=""
fi

# ---------------------------------------------------------------- guest --
APPEND="console=ttyS0 panic=-1 quiet stager.addr=$ADDR stager.port=$PORT stager.subnqn=$SUBNQN"
APPEND="$APPEND stager.hostnqn=$HOSTNQN stager.connect=${GUEST_CONNECT:-nvme-cli} $EXTRA ${GUEST_APPEND:-}"
log "guest: booting $GUEST_KVER (TCG, ${GUEST_MEM} MiB, 2 vCPUs, timeout ${GUEST_TIMEOUT}s), console -> $CONSOLE"
T_BOOT=$(date +%s.%N)
: >"$CONSOLE"
# No -enable-kvm: it hangs on these machines; TCG only.
timeout -k 10 "$GUEST_TIMEOUT" qemu-system-x86_64 \
    -accel tcg -cpu max -m "$GUEST_MEM" -smp 2 \
    -kernel "$GUEST_VMLINUZ" -initrd "$GUEST_INITRD" -append "$APPEND" \
    -display none -monitor none -parallel none -serial "file:$CONSOLE" \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0 \
    -no-reboot </dev/null >"$LOGDIR/qemu.log" 2>&1 &
QEMU_PID=$!
if [ "${GUEST_VERBOSE:-0}" = 1 ]; then
    tail -n +1 -f "$CONSOLE" --pid="$QEMU_PID" | sed -u 's/^/  guest| /' &
fi
QRC=0
wait "$QEMU_PID" || QRC=$?
QEMU_PID=""
T_END=$(date +%s.%N)
sleep 0.2 # let the console tail (if any) drain

stop_stagerd

fmt() { awk "BEGIN{printf \"%.1f\", $2 - $1}"; }
log "timings: build $(fmt "$T_START" "$T_BUILT")s, guest run $(fmt "$T_BOOT" "$T_END")s, total $(fmt "$T_START" "$T_END")s"

RESULT=$(tr -d '\r' <"$CONSOLE" | grep -a -E '^GUEST-RESULT: ' | tail -n1 || true)
if [ "$RESULT" = "GUEST-RESULT: PASS" ]; then
    log "PASS ($MODE): Linux $GUEST_KVER NVMe/TCP host wrote, reconnected and verified data (logs: $LOGDIR)"
    exit 0
fi

if [ "$QRC" = 124 ] || [ "$QRC" = 137 ]; then
    why="guest timed out after ${GUEST_TIMEOUT}s"
elif [ -n "$RESULT" ]; then
    why=${RESULT#GUEST-RESULT: FAIL }
else
    why="no GUEST-RESULT marker on the console (qemu exit status $QRC)"
fi
log "FAIL ($MODE): $why"
log "---- last 60 lines of the guest console ($CONSOLE) ----"
tr -d '\r' <"$CONSOLE" | tail -n 60 | sed 's/^/  guest| /'
if [ -s "$LOGDIR/qemu.log" ]; then
    log "---- qemu stderr ----"
    tail -n 20 "$LOGDIR/qemu.log" | sed 's/^/  qemu| /'
fi
if [ "$SELFTEST" = 0 ]; then
    log "---- last 60 lines of stagerd's log ($STAGERD_LOG) ----"
    tail -n 60 "$STAGERD_LOG" | sed 's/^/  stagerd| /'
fi
exit 1
