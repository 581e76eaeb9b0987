#!/bin/sh
# Runs INSIDE the QEMU guest (busybox sh): the Linux kernel NVMe/TCP host
# against a target (stagerd on the host, or nvmet inside the guest with
# stager.selftest=1).
#
# Parameters (environment; /init exports stager.KEY=VALUE from the kernel
# command line as STAGER_KEY):
#   STAGER_ADDR      target address            (default 10.0.2.2 = host's 127.0.0.1)
#   STAGER_PORT      target TCP port           (default 4420)
#   STAGER_SUBNQN    subsystem NQN             (default nqn.2026-11.dev.stager:kernel-test)
#   STAGER_HOSTNQN   host NQN                  (default nqn.2026-11.dev.stager:guest-host)
#   STAGER_CONNECT   nvme-cli | fabrics        (default nvme-cli; fabrics = write
#                                               the option line to /dev/nvme-fabrics)
#   STAGER_RESULT_FILE  where the failure reason is written (default /run/guest-result)
# Exit status 0 = pass.

ADDR=${STAGER_ADDR:-10.0.2.2}
PORT=${STAGER_PORT:-4420}
SUBNQN=${STAGER_SUBNQN:-nqn.2026-11.dev.stager:kernel-test}
HOSTNQN=${STAGER_HOSTNQN:-nqn.2026-11.dev.stager:guest-host}
CONNECT=${STAGER_CONNECT:-nvme-cli}
RESULT_FILE=${STAGER_RESULT_FILE:-/run/guest-result}
WORK=/tmp/nvme-tcp-test
# Regions written and verified: comma/space separated offset_MiB:length_MiB
# (STAGER_REGIONS / stager.regions=...; the default needs a namespace >= 256 MiB).
REGIONS=$(echo "${STAGER_REGIONS:-0:4,37:1,200:3,250:5}" | tr , " ")

say() { echo "test: $*"; }
# run_logged PREFIX CMD...: run CMD, show its output prefixed, return its status.
run_logged() {
    _p=$1
    shift
    "$@" >"$WORK/cmd.out" 2>&1
    _rc=$?
    sed "s/^/test: $_p: /" "$WORK/cmd.out"
    return $_rc
}
fail() {
    say "FAIL: $*"
    echo "$*" >"$RESULT_FILE"
    say "---- dmesg (nvme) ----"
    dmesg | grep -i nvme | grep -v 'ommand line' | tail -n 40
    exit 1
}

mkdir -p "$WORK" || fail "mkdir $WORK"
say "target $ADDR:$PORT subnqn=$SUBNQN hostnqn=$HOSTNQN connect=$CONNECT"
[ -e /dev/nvme-fabrics ] || fail "/dev/nvme-fabrics missing (nvme-tcp/nvme-fabrics not loaded?)"

# nvme-cli wants a host NQN/ID; give it ours so nothing is generated at random.
mkdir -p /etc/nvme
echo "$HOSTNQN" >/etc/nvme/hostnqn
[ -s /etc/nvme/hostid ] || cat /proc/sys/kernel/random/uuid >/etc/nvme/hostid

# ---------------------------------------------------------------- helpers --
# Controller names (nvmeN) connected to $SUBNQN over tcp.
ctrls_for_subsys() {
    for c in /sys/class/nvme/nvme*; do
        [ -e "$c/subsysnqn" ] || continue
        [ "$(cat "$c/subsysnqn")" = "$SUBNQN" ] || continue
        [ "$(cat "$c/transport" 2>/dev/null)" = tcp ] || continue
        basename "$c"
    done
}

# Block device (nvmeXnY) of namespace 1 of $SUBNQN.  With native multipath
# (CONFIG_NVME_MULTIPATH=y) it is the ns-head disk of the subsystem; without,
# the controller's namespace disk.
find_ns_dev() {
    for b in /sys/block/nvme*n*; do
        [ -e "$b" ] || continue
        name=$(basename "$b")
        case $name in *c*n*) continue ;; esac # hidden per-path disks
        nqn=""
        for f in "$b/device/subsysnqn" "$b/device/../subsysnqn"; do
            if [ -r "$f" ]; then nqn=$(cat "$f"); break; fi
        done
        if [ "$nqn" = "$SUBNQN" ] && [ "$(cat "$b/nsid" 2>/dev/null || echo 1)" = 1 ]; then
            echo "$name"
            return 0
        fi
    done
    return 1
}

do_connect() {
    case $CONNECT in
        fabrics)
            say "connect: writing option line to /dev/nvme-fabrics"
            line="transport=tcp,traddr=$ADDR,trsvcid=$PORT,nqn=$SUBNQN,hostnqn=$HOSTNQN"
            # The kernel answers the write by returning instance=N,cntlid=M on read.
            exec 3<>/dev/nvme-fabrics || return 1
            echo "$line" >&3 || { exec 3>&-; return 1; }
            head -n1 <&3 | sed 's/^/test: fabrics: /'
            exec 3>&-
            ;;
        *)
            say "connect: nvme connect -t tcp -a $ADDR -s $PORT -n $SUBNQN -q $HOSTNQN"
            run_logged nvme nvme connect -t tcp -a "$ADDR" -s "$PORT" -n "$SUBNQN" -q "$HOSTNQN" || return 1
            ;;
    esac
    return 0
}

connect_and_wait() {
    # $1 = label.  Sets CTRL and DEV.
    t0=$(cut -d' ' -f1 /proc/uptime)
    do_connect || true
    CTRL=$(ctrls_for_subsys | head -n1)
    if [ -z "$CTRL" ] && [ "$CONNECT" != fabrics ]; then
        say "nvme connect did not create a controller; falling back to /dev/nvme-fabrics"
        CONNECT=fabrics do_connect || true
        CTRL=$(ctrls_for_subsys | head -n1)
    fi
    [ -n "$CTRL" ] || fail "$1: connect created no controller for $SUBNQN"
    DEV=""
    n=0
    while [ $n -lt 300 ]; do # 30 s
        st=$(cat /sys/class/nvme/"$CTRL"/state 2>/dev/null)
        DEV=$(find_ns_dev)
        if [ "$st" = live ] && [ -n "$DEV" ] && [ -b "/dev/$DEV" ]; then break; fi
        DEV=""
        sleep 0.1
        n=$((n + 1))
    done
    [ -n "$DEV" ] || fail "$1: no namespace block device for $SUBNQN on $CTRL after 30s (state=$(cat /sys/class/nvme/"$CTRL"/state 2>/dev/null))"
    t1=$(cut -d' ' -f1 /proc/uptime)
    say "$1: controller $CTRL live, namespace /dev/$DEV (connect took $(awk "BEGIN{print $t1-$t0}")s)"
    for a in transport address subsysnqn state cntlid model serial firmware_rev queue_count sqsize hostnqn; do
        [ -r /sys/class/nvme/"$CTRL"/$a ] && say "  sysfs $CTRL/$a = $(cat /sys/class/nvme/"$CTRL"/$a | tr '\n' ' ')"
    done
    say "  /dev/$DEV size = $(cat /sys/block/"$DEV"/size) sectors, logical_block_size = $(cat /sys/block/"$DEV"/queue/logical_block_size)"
}

disconnect() {
    say "$1: nvme disconnect -n $SUBNQN"
    if ! run_logged nvme nvme disconnect -n "$SUBNQN"; then
        say "nvme disconnect failed; deleting controllers through sysfs"
    fi
    for c in $(ctrls_for_subsys); do
        echo 1 >/sys/class/nvme/"$c"/delete_controller 2>/dev/null
    done
    n=0
    while [ -n "$(ctrls_for_subsys)" ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
    [ -z "$(ctrls_for_subsys)" ] || fail "$1: controller for $SUBNQN still present after disconnect"
    say "$1: disconnected"
}

# dd with O_DIRECT if this dd supports it, otherwise buffered + fsync and
# dropped caches (the disconnect/reconnect below defeats the page cache anyway).
if dd --help 2>&1 | grep -q 'oflag=.*direct'; then
    WFLAG="oflag=direct"
    RFLAG="iflag=direct"
else
    WFLAG="conv=fsync"
    RFLAG=""
fi

# ------------------------------------------------------------- discovery --
say "step 1: discovery"
run_logged discover nvme discover -t tcp -a "$ADDR" -s "$PORT" -q "$HOSTNQN" ||
    fail "nvme discover -t tcp -a $ADDR -s $PORT failed (status $?)"
cp "$WORK/cmd.out" "$WORK/discover.log"
grep -q -F "$SUBNQN" "$WORK/discover.log" || fail "subsystem $SUBNQN not in discovery log page"
grep -q -E 'trtype: *tcp' "$WORK/discover.log" || fail "discovery log entry has no trtype tcp"
say "discovery log lists $SUBNQN"

# --------------------------------------------------------------- connect --
say "step 2: connect"
connect_and_wait "connect #1"
DEV1=$DEV
SIZE_MIB=$(($(cat /sys/block/"$DEV"/size) / 2048))

say "---- nvme list ----"
run_logged list nvme list || fail "nvme list failed"
say "---- nvme list-subsys ----"
run_logged list-subsys nvme list-subsys || fail "nvme list-subsys failed"
say "---- nvme id-ctrl /dev/$CTRL ----"
run_logged id-ctrl nvme id-ctrl "/dev/$CTRL" || fail "nvme id-ctrl /dev/$CTRL failed"
say "---- nvme id-ns /dev/$DEV ----"
run_logged id-ns nvme id-ns "/dev/$DEV" || fail "nvme id-ns /dev/$DEV failed"

# ----------------------------------------------------------------- write --
say "step 3: write patterns ($REGIONS, MiB offset:length) to /dev/$DEV ($SIZE_MIB MiB) with $WFLAG"
for r in $REGIONS; do
    off=${r%%:*}
    len=${r#*:}
    [ $((off + len + 1)) -le "$SIZE_MIB" ] || fail "region $r (+1 MiB guard) beyond namespace size ${SIZE_MIB} MiB"
done
for r in $REGIONS; do
    off=${r%%:*}
    len=${r#*:}
    # Random pattern saved in tmpfs (different for each region, so misplaced
    # writes are caught), plus the 1 MiB guard just after the region as it
    # was before the write (an overlong write would change it).
    dd if=/dev/urandom of="$WORK/pat-$off" bs=1M count="$len" 2>/dev/null || fail "cannot generate pattern"
    dd if="/dev/$DEV" of="$WORK/guard-$off" bs=1M skip=$((off + len)) count=1 $RFLAG 2>/dev/null ||
        fail "read of guard region after $r failed"
    if ! dd if="$WORK/pat-$off" of="/dev/$DEV" bs=1M seek="$off" count="$len" $WFLAG 2>"$WORK/dd.err"; then
        cat "$WORK/dd.err"
        fail "write of $len MiB at $off MiB failed"
    fi
    say "  wrote $len MiB at $off MiB, md5 $(md5sum <"$WORK/pat-$off" | cut -d' ' -f1)"
done
sync

# ------------------------------------------------------ disconnect/again --
say "step 4: disconnect and reconnect"
disconnect "disconnect #1"
echo 3 >/proc/sys/vm/drop_caches
connect_and_wait "connect #2"

# ------------------------------------------------------------ read back --
say "step 5: read back and compare with $RFLAG"
for r in $REGIONS; do
    off=${r%%:*}
    len=${r#*:}
    if ! dd if="/dev/$DEV" of="$WORK/rb-$off" bs=1M skip="$off" count="$len" $RFLAG 2>"$WORK/dd.err"; then
        cat "$WORK/dd.err"
        fail "read of $len MiB at $off MiB failed"
    fi
    want=$(md5sum <"$WORK/pat-$off" | cut -d' ' -f1)
    got=$(md5sum <"$WORK/rb-$off" | cut -d' ' -f1)
    if ! cmp "$WORK/pat-$off" "$WORK/rb-$off" >"$WORK/cmp.out" 2>&1; then
        head -n 3 "$WORK/cmp.out" | sed 's/^/test: /'
        fail "data mismatch in $len MiB at $off MiB (want md5 $want, got $got)"
    fi
    say "  $len MiB at $off MiB matches (md5 $got)"
    dd if="/dev/$DEV" of="$WORK/rbg-$off" bs=1M skip=$((off + len)) count=1 $RFLAG 2>/dev/null ||
        fail "read of guard region after $r failed"
    cmp -s "$WORK/guard-$off" "$WORK/rbg-$off" ||
        fail "guard MiB at $((off + len)) MiB changed (write past region $r?)"
done
say "  guard regions after each region unchanged"

say "step 6: final disconnect"
disconnect "disconnect #2"
say "all steps passed (first connect /dev/$DEV1, second /dev/$DEV)"
exit 0
