#!/usr/bin/env bash
# The verbs fabric over real RDMA: boots Debian's kernel in TWO QEMU guests (TCG) joined by a
# QEMU socket network (one listens on 127.0.0.1:PORT, the other connects), loads Soft-RoCE
# (rdma_rxe) in each, and runs stager-fabric-probe built with `--features stager-rdma/verbs`:
# the server in one guest, the client in the other, over RDMA WRITE and WRITE WITH IMMEDIATE
# on RC queue pairs. Fails unless both sides verify (scripts/guest/rdma-verbs-test.sh runs in
# the guests; docs/fabric.md explains the set-up).
#
# As root it installs what it needs with apt-get (and says so): libibverbs-dev, librdmacm-dev,
# ibverbs-providers, libclang-dev, clang, pkg-config (to build rdma-sys), iproute2 (`rdma`);
# scripts/guest/build.sh installs QEMU, busybox, cpio and kmod and fetches the kernel.
#
# `tests/rdma_verbs.sh --packages-only` installs the build packages and stops (scripts/test runs
# it before linting the verbs backend).
#
# Environment:
#   GUEST_TIMEOUT   seconds for the guests (default 240)
#   GUEST_VERBOSE=1 stream both consoles while they run
#   PROBE_ARGS      client arguments (default: 40 rounds of 4 writes, 20 messages, 200 streamed)
# Logs go to build/guest/logs/rdma-verbs-<timestamp>/ (server.log, client.log, qemu-*.log).
# Exit status: 0 = both guests said GUEST-RESULT: PASS.
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"
GUEST_TIMEOUT=${GUEST_TIMEOUT:-240}
PROBE_ARGS=${PROBE_ARGS:-"--rounds 40 --batch 4 --size 4096 --messages 20 --stream 200"}
log() { echo "rdma_verbs: $*"; }
T_START=$(date +%s)

# ---- host packages for building the verbs backend -------------------------------------------
missing=()
for p in libibverbs-dev librdmacm-dev ibverbs-providers libclang-dev clang pkg-config iproute2; do
    dpkg -s "$p" > /dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    [[ $(id -u) == 0 ]] || { log "missing packages ${missing[*]}: run as root, or apt-get install them"; exit 1; }
    log "installing with apt-get: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" > /dev/null
fi

[[ ${1:-} == --packages-only ]] && exit 0

log "building stager-fabric-probe with the verbs backend (cargo build --release -p stager-rdma --features verbs)"
cargo build --release -p stager-rdma --features verbs --bin stager-fabric-probe --quiet
PROBE=build/release/stager-fabric-probe

log "guest: kernel + base initramfs (scripts/guest/build.sh)"
bash scripts/guest/build.sh > /dev/null
# shellcheck disable=SC1091
. build/guest/guest.env
KROOT=build/guest/kernel/$GUEST_KERNEL_PKG

LOGDIR=$REPO_ROOT/build/guest/logs/rdma-verbs-$(date +%Y%m%d-%H%M%S)-$$
mkdir -p "$LOGDIR"
TMP=$(mktemp -d /tmp/stager-rdma-verbs.XXXXXX)
PIDS=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2> /dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2> /dev/null || true; done
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM HUP

# ---- what the guests need beyond the base image ---------------------------------------------
STAGE=$TMP/stage
mkdir -p "$STAGE/usr/local/bin" "$STAGE/usr/bin" "$STAGE/rdma-modules" "$STAGE/guest" "$STAGE/etc/libibverbs.d"
strip -o "$STAGE/usr/local/bin/stager-fabric-probe" "$PROBE" 2> /dev/null || cp "$PROBE" "$STAGE/usr/local/bin/"
cp -L /usr/bin/rdma "$STAGE/usr/bin/rdma"
install -m 0755 scripts/guest/rdma-verbs-test.sh "$STAGE/guest/rdma-verbs-test.sh"
# libibverbs finds its providers through /etc/libibverbs.d/*.driver; rxe is the one we need.
PROVIDER=$(find /usr/lib/x86_64-linux-gnu/libibverbs -name 'librxe-rdmav*.so' | head -n1)
[[ -n $PROVIDER ]] || { log "FAIL: no rxe provider (ibverbs-providers)"; exit 1; }
mkdir -p "$STAGE$(dirname "$PROVIDER")"
cp -L "$PROVIDER" "$STAGE$PROVIDER"
cp /etc/libibverbs.d/rxe.driver "$STAGE/etc/libibverbs.d/"
mapfile -t LIBS < <(for b in "$STAGE/usr/local/bin/stager-fabric-probe" "$STAGE/usr/bin/rdma" "$PROVIDER" \
    /usr/lib/x86_64-linux-gnu/libibverbs.so.1; do ldd "$b"; done | awk '
    /=>/ && $3 ~ /^\// { print $3; next }
    $1 ~ /^\// { print $1 }' | sort -u)
LIBS+=(/usr/lib/x86_64-linux-gnu/libibverbs.so.1)
for l in "${LIBS[@]}"; do
    mkdir -p "$STAGE$(dirname "$l")"
    cp -L "$l" "$STAGE$l"
done
# Soft-RoCE modules, in load order: crc32 providers first (rxe asks the crypto API for "crc32"
# at run time, so modprobe's dependencies do not list them), then rdma_rxe and what it needs.
: > "$STAGE/rdma-modules/order"
for m in crc32_generic crc32-pclmul rdma_rxe; do
    modprobe -d "$KROOT" -S "$GUEST_KVER" --show-depends "$m" | awk '$1 == "insmod" { print $2 }'
done | awk '!seen[$0]++' | while read -r ko; do
    name=$(basename "$ko")
    case $name in
        *.ko.xz) xz -dc "$ko" > "$STAGE/rdma-modules/${name%.xz}"; name=${name%.xz} ;;
        *.ko.zst) zstd -qdc "$ko" > "$STAGE/rdma-modules/${name%.zst}"; name=${name%.zst} ;;
        *) cp "$ko" "$STAGE/rdma-modules/$name" ;;
    esac
    echo "$name" >> "$STAGE/rdma-modules/order"
done
(cd "$STAGE" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet --owner=0:0 | gzip -1n) > "$TMP/rdma.cpio.gz"
cat "$GUEST_INITRD" "$TMP/rdma.cpio.gz" > "$TMP/initrd.img"
log "initramfs with the probe, rdma, libibverbs + rxe provider, ${#LIBS[@]} libraries and $(wc -l < "$STAGE/rdma-modules/order") modules: $(du -h "$TMP/initrd.img" | cut -f1)"

# ---- two guests on one socket network --------------------------------------------------------
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
boot() { # ROLE IP PEERIP NETDEV MAC
    local role=$1 args=""
    [[ $role == client ]] && args=$(tr ' ' , <<< "$PROBE_ARGS")
    local append="console=ttyS0 panic=-1 quiet stager.net=0 stager.test=/guest/rdma-verbs-test.sh"
    append+=" stager.role=$role stager.ip=$2 stager.peerip=$3${args:+ stager.args=$args}"
    : > "$LOGDIR/$role.log"
    timeout -k 10 "$GUEST_TIMEOUT" qemu-system-x86_64 -accel tcg -cpu max -m 512 -smp 1 \
        -kernel "$GUEST_VMLINUZ" -initrd "$TMP/initrd.img" -append "$append" \
        -netdev "socket,id=n0,$4" -device "virtio-net-pci,netdev=n0,mac=$5" \
        -display none -monitor none -parallel none -serial "file:$LOGDIR/$role.log" \
        -no-reboot < /dev/null > "$LOGDIR/qemu-$role.log" 2>&1 &
    PIDS+=($!)
    if [[ ${GUEST_VERBOSE:-0} == 1 ]]; then
        tail -n +1 -f "$LOGDIR/$role.log" --pid=$! | sed -u "s/^/  $role| /" &
    fi
}
log "booting two $GUEST_KVER guests (TCG, 512 MiB, 1 vCPU each) on a socket network at 127.0.0.1:$PORT"
boot server 10.11.0.1 10.11.0.2 "listen=127.0.0.1:$PORT" 52:54:00:5a:00:01
n=0
until ss -Hltn "sport = :$PORT" 2> /dev/null | grep -q .; do
    ((n++ < 100)) || { log "FAIL: the server guest's QEMU never listened on $PORT"; exit 1; }
    sleep 0.1
done
boot client 10.11.0.2 10.11.0.1 "connect=127.0.0.1:$PORT" 52:54:00:5a:00:02
rcs=()
for p in "${PIDS[@]}"; do
    rc=0
    wait "$p" || rc=$?
    rcs+=("$rc")
done
PIDS=()

ok=1
for role in server client; do
    result=$(tr -d '\r' < "$LOGDIR/$role.log" | grep -a -E '^GUEST-RESULT: ' | tail -n1 || true)
    tr -d '\r' < "$LOGDIR/$role.log" | grep -a -E '^test: (probe-|PASS|FAIL)' | sed "s/^test: /  $role| /" || true
    if [[ $result != "GUEST-RESULT: PASS" ]]; then
        ok=0
        log "$role guest: ${result:-no GUEST-RESULT marker (qemu exit ${rcs[*]})}"
        log "---- last 40 lines of the $role console ($LOGDIR/$role.log)"
        tr -d '\r' < "$LOGDIR/$role.log" | tail -n 40 | sed "s/^/  $role| /"
    fi
done
if ((ok)); then
    log "PASS: verbs fabric over Soft-RoCE between two $GUEST_KVER guests ($(($(date +%s) - T_START)) s; logs $LOGDIR)"
    exit 0
fi
log "FAIL (logs $LOGDIR)"
exit 1
