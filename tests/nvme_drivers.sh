#!/usr/bin/env bash
# Stager's local flash drivers against a real kernel and an emulated NVMe controller: boots
# Debian's kernel in a QEMU guest (TCG, q35 with a virtual Intel IOMMU so VFIO works) with one
# emulated NVMe controller, and runs stagerd, stagerctl and stager-perf inside it
# (scripts/guest/nvme-drivers-test.sh): a write-back volume's flash log on /dev/ng0n1 through
# io_uring passthrough, then on the VFIO driver after the controller is bound to vfio-pci;
# kill -9 under verified writes, restart and verify, inspect and offline destage; plain
# namespaces on each driver checked through the kernel's NVMe/TCP host. See
# docs/nvme-drivers.md for what the guest setup needs and why.
#
# Environment:
#   BIN             directory with stagerd, stagerctl and stager-perf (default build/release;
#                   built with `cargo build --release --workspace --bins` if missing)
#   GUEST_TIMEOUT   seconds for the whole guest run (default 900)
#   GUEST_VERBOSE=1 stream the guest console while it runs
# Logs go to build/guest/logs/nvme-drivers-<timestamp>/ (console.log, qemu.log).
# Exit status: 0 = GUEST-RESULT: PASS seen; 1 = anything else.
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"
BIN=${BIN:-build/release}
GUEST_TIMEOUT=${GUEST_TIMEOUT:-900}
log() { echo "nvme_drivers: $*"; }

for b in stagerd stagerctl stager-perf; do
    if [[ ! -x $BIN/$b ]]; then
        log "$BIN/$b missing; building (cargo build --release --workspace --bins)"
        cargo build --release --workspace --bins --quiet
        BIN=build/release
        break
    fi
done

LOGDIR=$REPO_ROOT/build/guest/logs/nvme-drivers-$(date +%Y%m%d-%H%M%S)-$$
mkdir -p "$LOGDIR"
TMP=$(mktemp -d /tmp/stager-nvme-drivers.XXXXXX)
QEMU_PID=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    if [[ -n $QEMU_PID ]] && kill -0 "$QEMU_PID" 2> /dev/null; then
        kill -TERM "$QEMU_PID" 2> /dev/null || true
        wait "$QEMU_PID" 2> /dev/null || true
    fi
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM HUP

T_START=$(date +%s)
log "guest: building kernel + initramfs (scripts/guest/build.sh)..."
bash scripts/guest/build.sh
# shellcheck disable=SC1091
. build/guest/guest.env

# The drivers' own test against a real device (nvme/tests/real_device.rs), as a binary.
log "building the real-device test (cargo test --release -p stager-nvme --test real_device --no-run)"
REAL_DEVICE_TEST=$(cargo test --release -p stager-nvme --test real_device --no-run --message-format=json 2> /dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "real_device":
        print(m["executable"])' | tail -n1)
[[ -x $REAL_DEVICE_TEST ]] || { log "FAIL: could not build nvme/tests/real_device.rs"; exit 1; }

# Our binaries (stripped: debug info would triple the initramfs) and the libraries they link,
# as one more archive after the base and test-script archives the guest build made.
STAGE=$TMP/stage
mkdir -p "$STAGE/usr/local/bin"
for b in stagerd stagerctl stager-perf; do
    strip -o "$STAGE/usr/local/bin/$b" "$BIN/$b" 2> /dev/null || cp "$BIN/$b" "$STAGE/usr/local/bin/$b"
done
strip -o "$STAGE/usr/local/bin/real-device-test" "$REAL_DEVICE_TEST" 2> /dev/null ||
    cp "$REAL_DEVICE_TEST" "$STAGE/usr/local/bin/real-device-test"
mapfile -t LIBS < <(for b in "$STAGE"/usr/local/bin/*; do ldd "$b"; done | awk '
    /=>/ && $3 ~ /^\// { print $3; next }
    $1 ~ /^\// { print $1 }' | sort -u)
for l in "${LIBS[@]}"; do
    mkdir -p "$STAGE$(dirname "$l")"
    cp -L "$l" "$STAGE$l"
done
(cd "$STAGE" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet --owner=0:0 | gzip -1n) > "$TMP/bins.cpio.gz"
cat "$GUEST_INITRD" "$TMP/bins.cpio.gz" > "$TMP/initrd.img"
log "initramfs with stagerd, stagerctl, stager-perf, the real-device test and ${#LIBS[@]} libraries: $(du -h "$TMP/initrd.img" | cut -f1)"

# The emulated controller's namespace: 256 MiB, sparse. discard=unmap makes QEMU really
# deallocate on Dataset Management (it reports DLFEAT "reads zeroes" either way).
truncate -s 256M "$TMP/nvme.img"
APPEND="console=ttyS0 panic=-1 quiet stager.net=0 stager.test=/guest/nvme-drivers-test.sh"
log "guest: booting $GUEST_KVER (TCG, q35 + intel-iommu, 1024 MiB, 2 vCPUs, one emulated NVMe controller; timeout ${GUEST_TIMEOUT}s)"
CONSOLE=$LOGDIR/console.log
: > "$CONSOLE"
# No -enable-kvm: it hangs on these machines. intel-iommu needs q35; intremap=on lets VFIO set
# up its IOMMU without allow_unsafe_interrupts.
timeout -k 10 "$GUEST_TIMEOUT" qemu-system-x86_64 \
    -machine q35 -accel tcg -cpu max -m 1024 -smp 2 \
    -device intel-iommu,intremap=on \
    -kernel "$GUEST_VMLINUZ" -initrd "$TMP/initrd.img" -append "$APPEND" \
    -drive "file=$TMP/nvme.img,if=none,id=nvm,format=raw,discard=unmap" \
    -device nvme,serial=STAGER0001,drive=nvm,max_ioqpairs=4 \
    -display none -monitor none -parallel none -serial "file:$CONSOLE" -net none \
    -no-reboot < /dev/null > "$LOGDIR/qemu.log" 2>&1 &
QEMU_PID=$!
if [[ ${GUEST_VERBOSE:-0} == 1 ]]; then
    tail -n +1 -f "$CONSOLE" --pid="$QEMU_PID" | sed -u 's/^/  guest| /' &
fi
QRC=0
wait "$QEMU_PID" || QRC=$?
QEMU_PID=""
sleep 0.2

tr -d '\r' < "$CONSOLE" | grep -a -E '^test: (PASS|FAIL)' | sed 's/^test: /  /' || true
RESULT=$(tr -d '\r' < "$CONSOLE" | grep -a -E '^GUEST-RESULT: ' | tail -n1 || true)
if [[ $RESULT == "GUEST-RESULT: PASS" ]]; then
    log "PASS: passthrough and VFIO drivers under stagerd in a $GUEST_KVER guest ($(($(date +%s) - T_START)) s; logs $LOGDIR)"
    exit 0
fi
if [[ $QRC == 124 || $QRC == 137 ]]; then
    why="guest timed out after ${GUEST_TIMEOUT}s"
elif [[ -n $RESULT ]]; then
    why=${RESULT#GUEST-RESULT: FAIL }
else
    why="no GUEST-RESULT marker on the console (qemu exit status $QRC)"
fi
log "FAIL: $why"
log "---- last 80 lines of the guest console ($CONSOLE) ----"
tr -d '\r' < "$CONSOLE" | tail -n 80 | sed 's/^/  guest| /'
[[ -s $LOGDIR/qemu.log ]] && tail -n 20 "$LOGDIR/qemu.log" | sed 's/^/  qemu| /'
exit 1
