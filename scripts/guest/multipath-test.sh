#!/bin/sh
# Runs INSIDE the QEMU guest (busybox sh), driven by tests/multipath.sh: the Linux kernel
# NVMe/TCP host with native multipath (CONFIG_NVME_MULTIPATH=y) against two stagerd nodes on
# the host that serve one subsystem NQN and one namespace:
#   node-a on STAGER_PORT_A, ANA group 1 optimized
#   node-b on STAGER_PORT_B, ANA group 1 inaccessible
# 1. connects both paths (/dev/nvme-fabrics), checks sysfs: one subsystem, two controllers,
#    one multipath namespace with two paths and their ANA states;
# 2. writes and verifies a region through the multipath device;
# 3. writes chunk after chunk; after a few it prints MULTIPATH-KILL-NOW, on which the host
#    kills node-a (kill -9) and sets node-b's group optimized (stagerctl ana set); every chunk
#    must still complete (the I/O waits, then continues through node-b), and all of it verify;
#    the longest write after the kill request is reported (MULTIPATH-WAIT) for the host to check
#    that the I/O waited for the change rather than going anywhere else;
# 4. prints the md5 of everything written (MULTIPATH-MD5) for the host to check against the
#    shared backing file, and deletes both controllers.
#
# Parameters (stager.KEY=VALUE on the kernel command line, exported as STAGER_KEY):
#   STAGER_ADDR STAGER_PORT_A STAGER_PORT_B STAGER_SUBNQN STAGER_HOSTNQN
#   STAGER_CHUNKS (MiB written in step 3, default 40), STAGER_KILL_AFTER (chunks before the
#   kill, default 6)
# Exit status 0 = pass; the reason of a failure goes to STAGER_RESULT_FILE.

ADDR=${STAGER_ADDR:-10.0.2.2}
PORT_A=${STAGER_PORT_A:?}
PORT_B=${STAGER_PORT_B:?}
SUBNQN=${STAGER_SUBNQN:?}
HOSTNQN=${STAGER_HOSTNQN:?}
CHUNKS=${STAGER_CHUNKS:-40}
KILL_AFTER=${STAGER_KILL_AFTER:-6}
RESULT_FILE=${STAGER_RESULT_FILE:-/run/guest-result}
HOSTID=6f1c2d3e-0000-4000-8000-0000000000aa
WORK=/tmp/multipath
# Step 2 writes MiB 0..FIRST_MIB; step 3 writes one MiB chunk after another from there.
FIRST_MIB=4

say() { echo "mp: $*"; }
fail() {
    say "FAIL: $*"
    echo "$*" >"$RESULT_FILE"
    say "---- sysfs ----"
    show_paths
    say "---- dmesg (nvme) ----"
    dmesg | grep -i nvme | tail -n 40
    exit 1
}
now() { cut -d' ' -f1 /proc/uptime; }

mkdir -p "$WORK" || fail "mkdir $WORK"
[ -e /dev/nvme-fabrics ] || fail "/dev/nvme-fabrics missing (nvme-tcp not loaded?)"
[ "$(cat /sys/module/nvme_core/parameters/multipath 2>/dev/null)" = Y ] ||
    fail "native NVMe multipath is off in this kernel (nvme_core.multipath=$(cat /sys/module/nvme_core/parameters/multipath 2>/dev/null))"

if dd --help 2>&1 | grep -q 'oflag=.*direct'; then
    WFLAG="oflag=direct"
    RFLAG="iflag=direct"
else
    WFLAG="conv=fsync"
    RFLAG=""
fi

# Controller (nvmeN) whose address has trsvcid=$1.
ctrl_on_port() {
    for c in /sys/class/nvme/nvme*; do
        [ "$(cat "$c/subsysnqn" 2>/dev/null)" = "$SUBNQN" ] || continue
        case ",$(cat "$c/address" 2>/dev/null)," in *",trsvcid=$1,"*) basename "$c"; return 0 ;; esac
    done
    return 1
}
# The path device (nvmeXcYn1) of namespace 1 through controller $1.
path_of() {
    for p in /sys/class/nvme/"$1"/nvme*c*n1; do
        [ -e "$p" ] && basename "$p" && return 0
    done
    return 1
}
show_paths() {
    for s in /sys/class/nvme-subsystem/nvme-subsys*; do
        [ "$(cat "$s/subsysnqn" 2>/dev/null)" = "$SUBNQN" ] || continue
        entries=""
        for e in "$s"/nvme*; do entries="$entries $(basename "$e")"; done
        say "  $(basename "$s"): iopolicy $(cat "$s/iopolicy" 2>/dev/null), entries:$entries"
    done
    for c in /sys/class/nvme/nvme*; do
        [ "$(cat "$c/subsysnqn" 2>/dev/null)" = "$SUBNQN" ] || continue
        n=$(basename "$c")
        p=$(path_of "$n")
        say "  $n: state $(cat "$c/state") cntlid $(cat "$c/cntlid") $(cat "$c/address")" \
            "path ${p:-none} ana_state $(cat /sys/block/"$p"/ana_state 2>/dev/null || cat "$c/$p/ana_state" 2>/dev/null)" \
            "ana_grpid $(cat "$c/$p/ana_grpid" 2>/dev/null)"
    done
}
ana_state() { cat "/sys/class/nvme/$1/$2/ana_state" 2>/dev/null; }
# Write I/Os completed through path device $2 of controller $1 (field 5 of its stat; shown
# for the log: the host checks which node served the data on the shared backing file).
path_writes() { awk '{ print $5 }' "/sys/class/nvme/$1/$2/stat" 2>/dev/null || echo '?'; }

connect() {
    # $1 = port. The kernel answers the write with instance=N,cntlid=M.
    line="transport=tcp,traddr=$ADDR,trsvcid=$1,nqn=$SUBNQN,hostnqn=$HOSTNQN,hostid=$HOSTID"
    exec 3<>/dev/nvme-fabrics || return 1
    echo "$line" >&3 || { exec 3>&-; return 1; }
    head -n1 <&3 | sed 's/^/mp: fabrics: /'
    exec 3>&-
}

# ------------------------------------------------------------------ connect --
say "step 1: connect node-a ($ADDR:$PORT_A) and node-b ($ADDR:$PORT_B) to $SUBNQN"
connect "$PORT_A" || fail "connecting node-a failed"
connect "$PORT_B" || fail "connecting node-b failed"
CA="" CB="" DEV="" n=0
while [ $n -lt 300 ]; do # 30 s
    CA=$(ctrl_on_port "$PORT_A")
    CB=$(ctrl_on_port "$PORT_B")
    if [ -n "$CA" ] && [ -n "$CB" ]; then
        PA=$(path_of "$CA")
        PB=$(path_of "$CB")
        if [ -n "$PA" ] && [ -n "$PB" ] && [ "$(ana_state "$CA" "$PA")" = optimized ] &&
            [ "$(ana_state "$CB" "$PB")" = inaccessible ]; then
            break
        fi
    fi
    sleep 0.1
    n=$((n + 1))
done
show_paths
{ [ -n "$CA" ] && [ -n "$CB" ]; } || fail "expected a controller on each port (node-a: '${CA}', node-b: '${CB}')"
[ "$(cat /sys/class/nvme/"$CA"/state)" = live ] || fail "$CA (node-a) is not live"
[ "$(cat /sys/class/nvme/"$CB"/state)" = live ] || fail "$CB (node-b) is not live"
[ "$(ana_state "$CA" "$PA")" = optimized ] || fail "node-a's path $PA: ana_state '$(ana_state "$CA" "$PA")', want optimized"
[ "$(ana_state "$CB" "$PB")" = inaccessible ] ||
    fail "node-b's path $PB: ana_state '$(ana_state "$CB" "$PB")', want inaccessible"
[ "$(cat /sys/class/nvme/"$CA"/cntlid)" != "$(cat /sys/class/nvme/"$CB"/cntlid)" ] || fail "both controllers have one cntlid"

# One subsystem holding both controllers and exactly one namespace head for them.
SUBSYS=""
for s in /sys/class/nvme-subsystem/nvme-subsys*; do
    [ "$(cat "$s/subsysnqn" 2>/dev/null)" = "$SUBNQN" ] || continue
    [ -z "$SUBSYS" ] || fail "two nvme-subsystems for $SUBNQN: the paths were not merged"
    SUBSYS=$s
done
[ -n "$SUBSYS" ] || fail "no /sys/class/nvme-subsystem entry for $SUBNQN"
{ [ -e "$SUBSYS/$CA" ] && [ -e "$SUBSYS/$CB" ]; } || fail "$SUBSYS does not hold both $CA and $CB"
HEADS=""
for h in "$SUBSYS"/nvme*n*; do
    case $(basename "$h") in *c*n*) continue ;; nvme*n*) [ -e "$h" ] && HEADS="$HEADS $(basename "$h")" ;; esac
done
# shellcheck disable=SC2086 # split on purpose: one word per head
set -- $HEADS
[ $# = 1 ] || fail "expected one multipath namespace in $SUBSYS, found:$HEADS"
DEV=$1
[ -b "/dev/$DEV" ] || fail "/dev/$DEV is not a block device"
say "multipath namespace /dev/$DEV: paths $PA (node-a, optimized), $PB (node-b, inaccessible)"
SIZE_MIB=$(($(cat /sys/block/"$DEV"/size) / 2048))
[ $((FIRST_MIB + CHUNKS)) -le "$SIZE_MIB" ] || fail "namespace of $SIZE_MIB MiB is too small for $((FIRST_MIB + CHUNKS)) MiB"

# ---------------------------------------------------------- write, verify --
say "step 2: write and verify $FIRST_MIB MiB through /dev/$DEV ($WFLAG)"
dd if=/dev/urandom of="$WORK/first" bs=1M count=$FIRST_MIB 2>/dev/null || fail "cannot make a pattern"
dd if="$WORK/first" of="/dev/$DEV" bs=1M count=$FIRST_MIB $WFLAG 2>"$WORK/dd.err" || { cat "$WORK/dd.err"; fail "write of $FIRST_MIB MiB failed"; }
[ -n "$RFLAG" ] || echo 3 >/proc/sys/vm/drop_caches
dd if="/dev/$DEV" of="$WORK/first.rb" bs=1M count=$FIRST_MIB $RFLAG 2>/dev/null || fail "read back failed"
cmp -s "$WORK/first" "$WORK/first.rb" || fail "data written through node-a does not read back"
say "  verified (md5 $(md5sum <"$WORK/first" | cut -d' ' -f1)); writes through node-a's path $(path_writes "$CA" "$PA"), node-b's $(path_writes "$CB" "$PB")"

# --------------------------------------------------------------- failover --
say "step 3: write $CHUNKS MiB chunk by chunk; node-a is killed after chunk $KILL_AFTER"
dd if=/dev/urandom of="$WORK/chunks" bs=1M count="$CHUNKS" 2>/dev/null || fail "cannot make a pattern"
i=0
T_KILL=""
# The longest write after the kill request, and which chunk: with node-b inaccessible until the
# host changes it, one write must have waited about FAILOVER_DELAY (the host checks it).
WAIT_MAX=0
WAIT_CHUNK=-1
while [ $i -lt "$CHUNKS" ]; do
    t0=$(now)
    if ! dd if="$WORK/chunks" of="/dev/$DEV" bs=1M skip=$i seek=$((FIRST_MIB + i)) count=1 $WFLAG 2>"$WORK/dd.err"; then
        cat "$WORK/dd.err"
        fail "write of chunk $i failed: the I/O did not fail over to node-b"
    fi
    t1=$(now)
    if [ -n "$T_KILL" ] && [ "$(awk "BEGIN { print ($t1 - $t0 > $WAIT_MAX) ? 1 : 0 }")" = 1 ]; then
        WAIT_MAX=$(awk "BEGIN { print $t1 - $t0 }")
        WAIT_CHUNK=$i
    fi
    slow=$(awk "BEGIN { print ($t1 - $t0 > 1.0) ? 1 : 0 }")
    if [ "$slow" = 1 ]; then
        say "  chunk $i took $(awk "BEGIN { print $t1 - $t0 }")s (waited for a path): node-a $(cat /sys/class/nvme/"$CA"/state), node-b path $(ana_state "$CB" "$PB")"
    fi
    i=$((i + 1))
    if [ $i = "$KILL_AFTER" ]; then
        T_KILL=$(now)
        # The host waits for this line, kills node-a and then sets node-b optimized.
        echo "MULTIPATH-KILL-NOW after $i chunks"
    fi
    # After the kill request the writes go on, paced a little.
    [ -z "$T_KILL" ] || sleep 0.05
done
T_DONE=$(now)
say "  all $CHUNKS chunks written ($(awk "BEGIN { print $T_DONE - $T_KILL }")s from the kill request to the last one)"
echo "MULTIPATH-WAIT $WAIT_MAX $WAIT_CHUNK"
show_paths
[ "$(ana_state "$CB" "$PB")" = optimized ] || fail "node-b's path is '$(ana_state "$CB" "$PB")' after the failover, want optimized"
st=$(cat /sys/class/nvme/"$CA"/state)
[ "$st" != live ] || fail "node-a's controller is still live after kill -9"
say "  node-a controller $st; node-b path $PB optimized; writes through node-b's path $(path_writes "$CB" "$PB")"

say "step 4: read everything back through node-b and verify"
[ -n "$RFLAG" ] || echo 3 >/proc/sys/vm/drop_caches
dd if="/dev/$DEV" of="$WORK/all.rb" bs=1M count=$((FIRST_MIB + CHUNKS)) $RFLAG 2>"$WORK/dd.err" || { cat "$WORK/dd.err"; fail "read back after failover failed"; }
cat "$WORK/first" "$WORK/chunks" >"$WORK/all"
if ! cmp "$WORK/all" "$WORK/all.rb" >"$WORK/cmp.out" 2>&1; then
    head -n 3 "$WORK/cmp.out" | sed 's/^/mp: /'
    fail "data mismatch after the failover"
fi
SUM=$(md5sum <"$WORK/all" | cut -d' ' -f1)
say "  $((FIRST_MIB + CHUNKS)) MiB verified through node-b"
echo "MULTIPATH-MD5 $((FIRST_MIB + CHUNKS)) $SUM"

for c in "$CA" "$CB"; do
    echo 1 >/sys/class/nvme/"$c"/delete_controller 2>/dev/null
done
say "all steps passed"
exit 0
