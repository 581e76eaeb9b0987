#!/bin/sh
# Runs INSIDE the QEMU guest (busybox sh), started by tests/nvme_drivers.sh: Stager's local
# flash drivers against QEMU's emulated NVMe controller, with stagerd, stagerctl and
# stager-perf running in the guest.
#
#   0. On each driver first: the drivers' own test binary (nvme/tests/real_device.rs) —
#      gathered FUA writes over several commands, 64 in flight, zeroes and deallocate next to
#      data, two channels at once — with STAGER_TEST_DEVICE naming the device.
#   1. nvme-passthru (/dev/ng0n1, the kernel's nvme driver bound):
#      a write-back volume's flash log on it takes verified writes, stagerd is killed with
#      kill -9, `stagerctl flash inspect` reads the log, a restarted stagerd replays it and
#      every acknowledged block verifies; a second kill -9, `stagerctl flash destage` offline,
#      and the SAN file alone holds every acknowledged block. Then a plain namespace on the
#      device passes read/write/compare/flush/write-zeroes/deallocate checks through the
#      kernel's NVMe/TCP host (nvme-cli), like a file backend on the same controller's block
#      device /dev/nvme0n1 (checked first, as the control).
#   2. The controller is moved to vfio-pci, and all of 1. runs again on the VFIO driver.
#   Plus the errors a wrong setup gets: vfio on a controller still bound to nvme, passthrough
#   on a device that is gone.
#
# The volume's SAN is a file in the guest's tmpfs (without O_DIRECT: tmpfs refuses it). Exit status 0 = pass; the reason of a
# failure goes to $STAGER_RESULT_FILE.

RESULT_FILE=${STAGER_RESULT_FILE:-/run/guest-result}
W=/tmp/nvme-drivers
BIN=/usr/local/bin
NQN=nqn.2026-11.dev.stager:nvme-drivers
HOSTNQN=nqn.2026-11.dev.stager:guest-host
PORT=4420
TARGET=tcp://127.0.0.1:$PORT/$NQN
SOCK=$W/stagerd.sock
STAGERD_PID=""
mkdir -p "$W"
export RUST_BACKTRACE=1

say() { echo "test: $*"; }
fail() {
    say "FAIL: $*"
    echo "$*" >"$RESULT_FILE"
    [ -n "$STAGERD_PID" ] && kill -9 "$STAGERD_PID" 2>/dev/null
    for f in "$W"/stagerd-*.log; do
        [ -f "$f" ] || continue
        say "---- last lines of $f"
        tail -n 25 "$f" | sed 's/^/test:   /'
    done
    say "---- dmesg (nvme, vfio, DMAR)"
    dmesg | grep -iE "nvme|vfio|dmar" | tail -n 20 | sed 's/^/test:   /'
    exit 1
}
pass() { say "PASS: $*"; }
elapsed() { cut -d' ' -f1 /proc/uptime; }

# ------------------------------------------------------------------ configs --
# $1 file, $2 the flash device's YAML (kind and path or pci).
volume_config() {
    cat >"$1" <<EOF
reactors: { cores: [0], idle_poll_us: 200 }
destage: { idle_poll_us: 50 }
logging: { level: info }
listeners: [{ name: tcp0, address: "127.0.0.1:$PORT" }]
management: { socket: $SOCK }
flash:
  - { name: flash0, $2, cache_percent: 20 }
subsystems:
  - nqn: $NQN
    allow_any_host: true
    namespaces:
      - nsid: 1
        backend: { kind: volume, id: 1, flash: flash0, policy: write-back, san: { kind: file, path: $W/san.img, size: 64MiB, direct: false } }
EOF
}
# $1 file, $2 the namespace backend's YAML.
namespace_config() {
    cat >"$1" <<EOF
reactors: { cores: [0], idle_poll_us: 200 }
logging: { level: info }
listeners: [{ name: tcp0, address: "127.0.0.1:$PORT" }]
subsystems:
  - nqn: $NQN
    allow_any_host: true
    namespaces:
      - nsid: 1
        backend: $2
EOF
}

# ---------------------------------------------------------------- processes --
# $1 config, $2 log name. Waits until it listens (and answers on its socket if it has one).
start_stagerd() {
    "$BIN/stagerd" --config "$1" >"$W/stagerd-$2.log" 2>&1 &
    STAGERD_PID=$!
    n=0
    while [ $n -lt 600 ]; do
        if grep -q "stagerd is serving" "$W/stagerd-$2.log" 2>/dev/null; then
            return 0
        fi
        kill -0 "$STAGERD_PID" 2>/dev/null || fail "stagerd exited at start ($2)"
        sleep 0.1
        n=$((n + 1))
    done
    fail "stagerd did not come up in 60 s ($2)"
}
stop_stagerd() {
    [ -n "$STAGERD_PID" ] || return 0
    kill -TERM "$STAGERD_PID" 2>/dev/null
    n=0
    while kill -0 "$STAGERD_PID" 2>/dev/null && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
    kill -0 "$STAGERD_PID" 2>/dev/null && fail "stagerd did not stop within 30 s of SIGTERM"
    wait "$STAGERD_PID" 2>/dev/null
    STAGERD_PID=""
}
kill9_stagerd() {
    kill -9 "$STAGERD_PID"
    wait "$STAGERD_PID" 2>/dev/null
    STAGERD_PID=""
}
# Verified random writes until stagerd is killed under them: $1 label.
write_and_kill() {
    "$BIN/stager-perf" run --target "$TARGET" -q 8 -w randwrite -s 8k --range 0:48MiB -t 60 \
        --verify-state "$W/state.json" --quiet --name "$1" >"$W/perf-$1.log" 2>&1 &
    wpid=$!
    sleep 5
    kill9_stagerd
    wait "$wpid"
    grep -q "verify state saved" "$W/perf-$1.log" || { cat "$W/perf-$1.log"; fail "stager-perf saved no verify state ($1)"; }
    say "$1: stagerd killed with SIGKILL under verified writes ($(grep -oE "[0-9]+ written" "$W/perf-$1.log" | head -n1) blocks)"
}
verify_all() { # $1 label
    if ! "$BIN/stager-perf" verify --target "$TARGET" --verify-state "$W/state.json" >"$W/verify-$1.log" 2>&1; then
        cat "$W/verify-$1.log"
        fail "$1: acknowledged blocks lost or stale"
    fi
    tail -n 1 "$W/verify-$1.log" | sed 's/^/test:   /'
}

# ------------------------------------------------------ the drivers' test --
# $1 label, $2 the device as STAGER_TEST_DEVICE names it.
device_test() {
    if ! STAGER_TEST_DEVICE="$2" "$BIN/real-device-test" --nocapture --test-threads=1 >"$W/real-device-$1.log" 2>&1; then
        cat "$W/real-device-$1.log"
        fail "$1: nvme/tests/real_device.rs failed on $2"
    fi
    grep -q "all verified" "$W/real-device-$1.log" || { cat "$W/real-device-$1.log"; fail "$1: the device test did not run"; }
    pass "$1: driver test on $2: gathered FUA write over several commands, 64 in flight, zeroes, deallocate, two channels"
}

# ------------------------------------------------------- write-back volume --
# $1 label (passthru/vfio), $2 flash YAML, $3 the device as stagerctl names it.
writeback_volume() {
    t0=$(elapsed)
    rm -f "$W/san.img" "$W/state.json"
    volume_config "$W/wb-$1.yaml" "$2"
    namespace_config "$W/san-$1.yaml" "{ kind: file, path: $W/san.img, direct: false }"
    start_stagerd "$W/wb-$1.yaml" "$1-1"
    grep -qE "no superblock; formatting|replaying its log" "$W/stagerd-$1-1.log" || fail "$1: stagerd did not open its flash log"
    write_and_kill "$1-first"
    "$BIN/stagerctl" flash inspect "$3" >"$W/inspect-$1.log" 2>&1 || { cat "$W/inspect-$1.log"; fail "$1: stagerctl flash inspect $3 failed"; }
    sed 's/^/test:   /' "$W/inspect-$1.log"
    grep -q "volume 1:" "$W/inspect-$1.log" || fail "$1: flash inspect does not list volume 1"
    pass "$1: stagerctl flash inspect $3 replays the log read-only after kill -9"
    start_stagerd "$W/wb-$1.yaml" "$1-2"
    grep -q "replaying its log" "$W/stagerd-$1-2.log" || fail "$1: the restarted stagerd did not replay its log"
    verify_all "$1-restart"
    pass "$1: after kill -9 and restart every acknowledged block verifies (write-back log on $3)"
    "$BIN/stagerctl" flash destage "$3" --config "$W/wb-$1.yaml" >"$W/refused-$1.log" 2>&1 &&
        fail "$1: stagerctl flash destage touched $3 while stagerd owns it"
    grep -q "in use by another process" "$W/refused-$1.log" || { cat "$W/refused-$1.log"; fail "$1: unexpected refusal"; }
    pass "$1: stagerctl flash destage refuses $3 while a stagerd owns it"
    write_and_kill "$1-second"
    if ! "$BIN/stagerctl" flash destage "$3" --config "$W/wb-$1.yaml" >"$W/destage-$1.log" 2>&1; then
        cat "$W/destage-$1.log"
        fail "$1: offline destage of $3 failed"
    fi
    tail -n 1 "$W/destage-$1.log" | sed 's/^/test:   /'
    "$BIN/stagerctl" flash inspect "$3" | grep -q "nothing to destage" || fail "$1: dirty data left after the offline destage"
    # The SAN file alone, as a plain file namespace: every acknowledged block is there.
    start_stagerd "$W/san-$1.yaml" "$1-san"
    verify_all "$1-san"
    stop_stagerd
    pass "$1: stagerctl flash destage $3 drained the log; the SAN alone holds every acknowledged block ($(awk "BEGIN{print $(elapsed) - $t0}") s)"
}

# ------------------------------------------------------- plain namespace --
ctrl_for_nqn() {
    for c in /sys/class/nvme/nvme*; do
        [ "$(cat "$c/subsysnqn" 2>/dev/null)" = "$NQN" ] && { basename "$c"; return 0; }
    done
    return 1
}
ns_dev() {
    for b in /sys/block/nvme*n*; do
        name=$(basename "$b")
        case $name in *c*n*) continue ;; esac
        for f in "$b/device/subsysnqn" "$b/device/../subsysnqn"; do
            [ -r "$f" ] && [ "$(cat "$f")" = "$NQN" ] && { echo "$name"; return 0; }
        done
    done
    return 1
}
# nvme-cli on the namespace the kernel's NVMe/TCP host sees: $1 label, $2 backend YAML.
namespace_checks() {
    t0=$(elapsed)
    namespace_config "$W/ns-$1.yaml" "$2"
    start_stagerd "$W/ns-$1.yaml" "$1-ns"
    nvme connect -t tcp -a 127.0.0.1 -s "$PORT" -n "$NQN" -q "$HOSTNQN" >"$W/connect.log" 2>&1 ||
        { cat "$W/connect.log"; fail "$1: nvme connect failed"; }
    DEV=""
    n=0
    while [ -z "$DEV" ] && [ $n -lt 300 ]; do DEV=$(ns_dev); [ -n "$DEV" ] || sleep 0.1; n=$((n + 1)); done
    [ -n "$DEV" ] && [ -b "/dev/$DEV" ] || fail "$1: no namespace block device after nvme connect"
    D=/dev/$DEV
    bs=$(cat "/sys/block/$DEV/queue/logical_block_size")
    [ "$bs" = 4096 ] || fail "$1: namespace block size $bs, expected 4096"
    # 64 KiB of random data at block 100 with FUA, read back, compared.
    dd if=/dev/urandom of="$W/pat" bs=64k count=1 2>/dev/null
    nvme write "$D" -s 100 -c 15 -z 65536 -d "$W/pat" --force-unit-access >/dev/null 2>&1 || fail "$1: nvme write failed"
    nvme read "$D" -s 100 -c 15 -z 65536 -d "$W/back" >/dev/null 2>&1 || fail "$1: nvme read failed"
    cmp -s "$W/pat" "$W/back" || fail "$1: data read back differs from data written"
    nvme compare "$D" -s 100 -c 15 -z 65536 -d "$W/pat" >/dev/null 2>&1 || fail "$1: nvme compare of equal data failed"
    cp "$W/pat" "$W/other"
    # One byte made different for sure: writing a fixed 'X' left the data equal whenever the
    # random byte there already was one (1 run in 256 per namespace).
    old=$(od -An -tu1 -j 40000 -N 1 "$W/pat" | tr -d ' ')
    printf "\\$(printf %o $(((old + 1) % 256)))" | dd of="$W/other" bs=1 seek=40000 conv=notrunc 2>/dev/null
    cmp -s "$W/pat" "$W/other" && fail "$1: the test could not make different data"
    nvme compare "$D" -s 100 -c 15 -z 65536 -d "$W/other" >"$W/cmp.log" 2>&1 && fail "$1: nvme compare of different data succeeded"
    grep -q "Compare Failure" "$W/cmp.log" || { cat "$W/cmp.log"; fail "$1: a failed compare did not report Compare Failure"; }
    say "$1: nvme compare of different data: $(head -n 1 "$W/cmp.log")"
    nvme flush "$D" >/dev/null 2>&1 || fail "$1: nvme flush failed"
    # Write Zeroes on blocks 100-103, Deallocate on 104-107: both read back as zeroes; the
    # rest of the pattern is untouched.
    nvme write-zeroes "$D" -s 100 -c 3 >/dev/null 2>&1 || fail "$1: nvme write-zeroes failed"
    nvme dsm "$D" --ad -s 104 -b 4 >/dev/null 2>&1 || fail "$1: nvme dsm --ad (deallocate) failed"
    nvme read "$D" -s 100 -c 15 -z 65536 -d "$W/back" >/dev/null 2>&1 || fail "$1: nvme read after zeroes failed"
    dd if=/dev/zero of="$W/want" bs=32k count=1 2>/dev/null
    dd if="$W/pat" bs=32k skip=1 count=1 >>"$W/want" 2>/dev/null
    cmp -s "$W/want" "$W/back" || fail "$1: write-zeroes/deallocate left the wrong data"
    # Reads and writes across the namespace through the kernel's block layer, and random
    # verified I/O through our own host library.
    if ! "$BIN/stager-perf" run --target "$TARGET" -q 8 -w randrw -s 16k --range 1MiB:32MiB -t 3 --verify --quiet \
        >"$W/perf-ns-$1.log" 2>&1; then
        cat "$W/perf-ns-$1.log"
        fail "$1: stager-perf --verify found bad data"
    fi
    nvme disconnect -n "$NQN" >/dev/null 2>&1 || fail "$1: nvme disconnect failed"
    stop_stagerd
    pass "$1: plain namespace passes write/read/compare/flush/write-zeroes/deallocate through the kernel host ($(awk "BEGIN{print $(elapsed) - $t0}") s)"
}

# -------------------------------------------------------------------- main --
mkdir -p /etc/nvme
echo "$HOSTNQN" >/etc/nvme/hostnqn
cat /proc/sys/kernel/random/uuid >/etc/nvme/hostid
for b in stagerd stagerctl stager-perf real-device-test; do [ -x "$BIN/$b" ] || fail "$BIN/$b missing from the initramfs"; done
modprobe nvme || fail "modprobe nvme failed"
n=0
while [ ! -e /dev/ng0n1 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
[ -e /dev/ng0n1 ] || fail "no /dev/ng0n1 after modprobe nvme"
BDF=$(basename "$(readlink -f /sys/class/nvme/nvme0/device)")
say "emulated NVMe controller $BDF: $(cat /sys/class/nvme/nvme0/model | tr -s ' '), /dev/ng0n1 $(($(cat /sys/block/nvme0n1/size) / 2048)) MiB"

# The control: the same namespace checks on a file backend over the same controller's block
# device, through the kernel's block layer (tmpfs cannot be the control: it has no
# FALLOC_FL_ZERO_RANGE, so Write Zeroes on a tmpfs file fails).
device_test file /dev/nvme0n1
namespace_checks file "{ kind: file, path: /dev/nvme0n1 }"

# A VFIO device still bound to nvme: a clear error naming the key, and how to bind it.
volume_config "$W/vfio-unbound.yaml" "kind: vfio, pci: \"$BDF\""
"$BIN/stagerd" --check-config "$W/vfio-unbound.yaml" >"$W/check.log" 2>&1 && fail "vfio accepted a controller bound to nvme"
grep -q "flash\[0\].pci" "$W/check.log" && grep -q "bound to the \`nvme\` driver" "$W/check.log" && grep -q "vfio-pci" "$W/check.log" ||
    { cat "$W/check.log"; fail "unclear error for an unbound vfio device"; }
pass "vfio on a controller bound to nvme: $(cut -c1-160 "$W/check.log")..."

# 1. io_uring passthrough. (The device test writes from 1 MiB on: stagerd finds no superblock
# in the first 8 KiB and formats the device.)
device_test passthru /dev/ng0n1
writeback_volume passthru "kind: nvme-passthru, path: /dev/ng0n1" /dev/ng0n1
namespace_checks passthru "{ kind: nvme-passthru, path: /dev/ng0n1 }"

# 2. The VFIO driver, on a fresh log. The whole namespace is deallocated, not just its
# superblocks: the log entries of the passthrough phase would otherwise still be there, and
# the engine's replay accepts an earlier format's entries that sit where the new log's next
# entry would (same positions, sequence numbers and incarnation; entries carry no device id),
# which resurrects stale data (reported; reproduced without any NVMe driver on a plain file).
blkdiscard /dev/nvme0n1 || fail "blkdiscard /dev/nvme0n1 failed"
dd if=/dev/zero of=/dev/nvme0n1 bs=1M count=1 oflag=direct 2>/dev/null || fail "cannot clear the device's first MiB"
modprobe vfio_iommu_type1 || fail "modprobe vfio_iommu_type1 failed"
modprobe vfio-pci || fail "modprobe vfio-pci failed"
echo "$BDF" >"/sys/bus/pci/devices/$BDF/driver/unbind" || fail "cannot unbind $BDF from nvme"
echo vfio-pci >"/sys/bus/pci/devices/$BDF/driver_override"
echo "$BDF" >/sys/bus/pci/drivers/vfio-pci/bind || fail "cannot bind $BDF to vfio-pci"
GROUP=$(basename "$(readlink "/sys/bus/pci/devices/$BDF/iommu_group")")
[ -e "/dev/vfio/$GROUP" ] || fail "no /dev/vfio/$GROUP after binding $BDF to vfio-pci"
say "$BDF bound to vfio-pci, IOMMU group $GROUP"
volume_config "$W/gone.yaml" "kind: nvme-passthru, path: /dev/ng0n1"
"$BIN/stagerd" --check-config "$W/gone.yaml" >"$W/check.log" 2>&1 && fail "passthrough accepted a missing /dev/ng0n1"
grep -q "flash\[0\].path" "$W/check.log" || { cat "$W/check.log"; fail "unclear error for a missing passthrough device"; }
pass "nvme-passthru without the device: $(cut -c1-160 "$W/check.log")..."
device_test vfio "vfio:$BDF"
writeback_volume vfio "kind: vfio, pci: \"$BDF\"" "vfio:$BDF"
namespace_checks vfio "{ kind: vfio, pci: \"$BDF\" }"
dmesg | grep -q "DMAR: \[DMA" && { dmesg | grep "DMAR" | tail -n 5; fail "the IOMMU reported DMA faults"; }
pass "no IOMMU (DMAR) faults during the VFIO runs"
warnings=$(cat "$W"/stagerd-*.log | grep -cE " (WARN|ERROR) ")
say "stagerd logged $warnings warnings or errors in all runs:"
cat "$W"/stagerd-*.log | grep -E " (WARN|ERROR) " | cut -c1-200 | sort | uniq -c | sort -rn | head -n 10 | sed 's/^/test:   /'
say "all checks passed in $(elapsed) s of guest uptime"
exit 0
