#!/bin/sh
# Runs INSIDE the QEMU guest (busybox sh) in self-test mode (stager.selftest=1):
# sets up the Linux kernel's own NVMe/TCP target (nvmet + nvmet-tcp) through
# configfs so that nvme-tcp-test.sh can be validated without stagerd.
#
# It mirrors what tests/kernel_initiator.sh configures stagerd with: one
# subsystem, allow_any_host=0 with one allowed host NQN, namespace 1 of
# 256 MiB backed by a sparse file in a guest tmpfs, TCP port on
# STAGER_ADDR:STAGER_PORT (default 127.0.0.1:4420).
#   STAGER_NS_MIB    namespace size in MiB (default 256)
#   STAGER_NS_BACKEND  file | null_blk   (default file; null_blk is memory
#                      backed through its configfs interface)

ADDR=${STAGER_ADDR:-127.0.0.1}
PORT=${STAGER_PORT:-4420}
SUBNQN=${STAGER_SUBNQN:-nqn.2026-11.dev.stager:kernel-test}
HOSTNQN=${STAGER_HOSTNQN:-nqn.2026-11.dev.stager:guest-host}
NS_MIB=${STAGER_NS_MIB:-256}
BACKEND=${STAGER_NS_BACKEND:-file}
RESULT_FILE=${STAGER_RESULT_FILE:-/run/guest-result}
CFG=/sys/kernel/config

say() { echo "nvmet: $*"; }
fail() {
    say "FAIL: $*"
    echo "self-test target setup: $*" >"$RESULT_FILE"
    dmesg | grep -i nvme | grep -v 'ommand line' | tail -n 20
    exit 1
}
w() { # w VALUE FILE
    echo "$1" >"$2" 2>/dev/null || fail "cannot write '$1' to $2"
}

for m in nvmet nvmet-tcp; do
    modprobe "$m" || fail "modprobe $m failed"
done
grep -q " $CFG " /proc/mounts || mount -t configfs configfs $CFG || fail "cannot mount configfs"
[ -d $CFG/nvmet ] || fail "$CFG/nvmet missing after modprobe nvmet"

# Backing store.
case $BACKEND in
    file)
        mkdir -p /srv
        grep -q " /srv " /proc/mounts || mount -t tmpfs -o size=$((NS_MIB + 16))m tmpfs /srv || fail "mount tmpfs /srv"
        # Sparse: only written blocks take guest memory.
        dd if=/dev/zero of=/srv/ns1.img bs=1M count=0 seek="$NS_MIB" 2>/dev/null || fail "create /srv/ns1.img"
        DEVPATH=/srv/ns1.img
        ;;
    null_blk)
        modprobe null_blk nr_devices=0 || fail "modprobe null_blk"
        nb=$CFG/nullb/nullb0
        mkdir $nb || fail "mkdir $nb"
        w "$NS_MIB" $nb/size
        w 1 $nb/memory_backed
        w 512 $nb/blocksize
        w 1 $nb/power
        n=0
        while [ ! -b /dev/nullb0 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
        [ -b /dev/nullb0 ] || fail "/dev/nullb0 did not appear"
        DEVPATH=/dev/nullb0
        ;;
    *) fail "unknown STAGER_NS_BACKEND=$BACKEND" ;;
esac

S=$CFG/nvmet/subsystems/$SUBNQN
mkdir "$S" || fail "mkdir $S"
w 0 "$S/attr_allow_any_host"
[ -e "$S/attr_serial" ] && w STAGERKT0001 "$S/attr_serial"
mkdir "$CFG/nvmet/hosts/$HOSTNQN" || fail "mkdir hosts/$HOSTNQN"
ln -s "$CFG/nvmet/hosts/$HOSTNQN" "$S/allowed_hosts/$HOSTNQN" || fail "allow host $HOSTNQN"

mkdir "$S/namespaces/1" || fail "mkdir namespace 1"
w "$DEVPATH" "$S/namespaces/1/device_path"
# tmpfs has no O_DIRECT on this kernel: use buffered I/O for a file backend.
[ "$BACKEND" = file ] && [ -e "$S/namespaces/1/buffered_io" ] && w 1 "$S/namespaces/1/buffered_io"
w 1 "$S/namespaces/1/enable"

P=$CFG/nvmet/ports/1
mkdir "$P" || fail "mkdir $P"
w tcp "$P/addr_trtype"
w ipv4 "$P/addr_adrfam"
w "$ADDR" "$P/addr_traddr"
w "$PORT" "$P/addr_trsvcid"
ln -s "$S" "$P/subsystems/$SUBNQN" || fail "link subsystem to port"

n=0
while ! netstat -ltn 2>/dev/null | grep -q ":$PORT " && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
say "kernel target: $SUBNQN (ns 1 = $DEVPATH, $NS_MIB MiB, host $HOSTNQN) on tcp $ADDR:$PORT"
netstat -ltn 2>/dev/null | grep ":$PORT " | sed 's/^/nvmet: /'
exit 0
