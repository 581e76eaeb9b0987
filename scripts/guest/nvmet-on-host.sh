#!/usr/bin/env bash
# Serve the Linux kernel's NVMe/TCP target (nvmet, in a QEMU/TCG guest) on
# this machine's 127.0.0.1:PORT, through a QEMU user-network port forward.
#
# Uses:
#  * a reference peer for our own initiator (perf/ tools) on 127.0.0.1;
#  * a stand-in for stagerd, to check tests/kernel_initiator.sh's host mode
#    (10.0.2.2 path, config writing, port wait, shutdown) without stagerd:
#        STAGERD=scripts/guest/nvmet-on-host.sh tests/kernel_initiator.sh
#    It accepts stagerd's `--config FILE` and takes the listener port, the
#    first subsystem NQN and its first allowed host NQN from that YAML.
#
#   nvmet-on-host.sh [--config stagerd.yaml] [--port N] [--subnqn NQN] [--hostnqn NQN]
# Defaults: port 4420, nqn.2026-11.dev.stager:kernel-test, host
# nqn.2026-11.dev.stager:guest-host, 256 MiB namespace (file in guest tmpfs).
# Runs until SIGTERM/SIGINT; the guest console goes to stdout.
# The port starts listening only once the kernel target is up.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
PORT=4420
SUBNQN=nqn.2026-11.dev.stager:kernel-test
HOSTNQN=nqn.2026-11.dev.stager:guest-host
while [ $# -gt 0 ]; do
    case $1 in
        --config)
            cfg=$2; shift 2
            p=$(sed -n 's/^ *address: *127\.0\.0\.1:\([0-9]\+\).*/\1/p' "$cfg" | head -n1)
            n=$(sed -n 's/^ *- *nqn: *\([^ ]\+\).*/\1/p' "$cfg" | head -n1)
            h=$(sed -n 's/^ *hosts: *\[ *\([^], ]\+\).*/\1/p' "$cfg" | head -n1)
            PORT=${p:-$PORT}; SUBNQN=${n:-$SUBNQN}; HOSTNQN=${h:-$HOSTNQN}
            ;;
        --port) PORT=$2; shift 2 ;;
        --subnqn) SUBNQN=$2; shift 2 ;;
        --hostnqn) HOSTNQN=$2; shift 2 ;;
        *) echo "nvmet-on-host: unknown argument $1" >&2; exit 2 ;;
    esac
done

echo "nvmet-on-host: kernel target $SUBNQN (host $HOSTNQN) on 127.0.0.1:$PORT"
bash "$SCRIPT_DIR/build.sh"
# shellcheck disable=SC1091
. "$REPO_ROOT/build/guest/guest.env"

D=$(mktemp -d /tmp/nvmet-on-host.XXXXXX)
QPID=""
cleanup() {
    trap - EXIT INT TERM HUP
    if [ -n "$QPID" ] && kill -0 "$QPID" 2>/dev/null; then
        kill -TERM "$QPID" 2>/dev/null || true
        wait "$QPID" 2>/dev/null || true
    fi
    exec 3>&- 2>/dev/null || true
    rm -rf "$D"
}
trap cleanup EXIT
trap 'exit 0' INT TERM HUP

mkfifo "$D/mon.in" "$D/mon.out"
: >"$D/console.log"
APPEND="console=ttyS0 panic=-1 quiet stager.selftest=1 stager.serve=1 stager.addr=10.0.2.15"
APPEND="$APPEND stager.port=4420 stager.subnqn=$SUBNQN stager.hostnqn=$HOSTNQN"
qemu-system-x86_64 -accel tcg -cpu max -m 1024 -smp 2 \
    -kernel "$GUEST_VMLINUZ" -initrd "$GUEST_INITRD" -append "$APPEND" \
    -display none -parallel none -serial "file:$D/console.log" -monitor "pipe:$D/mon" \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0 -no-reboot </dev/null &
QPID=$!
exec 3>"$D/mon.in"
cat "$D/mon.out" >/dev/null &
tail -n +1 -f "$D/console.log" --pid="$QPID" &

n=0
until grep -q GUEST-SERVING "$D/console.log"; do
    if grep -q 'GUEST-RESULT: FAIL' "$D/console.log" || ! kill -0 "$QPID" 2>/dev/null; then
        echo "nvmet-on-host: guest target failed to start" >&2
        exit 1
    fi
    n=$((n + 1))
    [ $n -le 1200 ] || { echo "nvmet-on-host: guest target not up after 120 s" >&2; exit 1; }
    sleep 0.1
done
# Only now open the host port, so "port listening" means "target ready".
echo "hostfwd_add n0 tcp:127.0.0.1:$PORT-10.0.2.15:4420" >&3
echo "nvmet-on-host: forwarding 127.0.0.1:$PORT -> guest nvmet 10.0.2.15:4420"
wait "$QPID" || true
