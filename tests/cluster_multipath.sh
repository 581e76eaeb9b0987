#!/usr/bin/env bash
# Issue 10, scenario e with a real host: the owner of a write-back+1 volume is killed (kill -9)
# mid-write; its replica takes the volume over by itself and the Linux kernel host (native NVMe
# multipath, Debian kernel in a QEMU/TCG guest) carries on through it. Nothing is done by hand.
#
#   etcd (Debian's etcd-server) and tgtd (the SAN: a file-backed iSCSI LUN) on 127.0.0.1;
#   node-a  owns volume 1, write-back+1, its copy on node-b; NVMe/TCP on 127.0.0.1:PORT_A,
#           controller ids 1..999
#   node-b  keeps the copy and a `kind: standby` namespace for volume 1: same subsystem NQN,
#           NSID, size (so the same NGUID/UUID); controller ids 1000..1999
#   Both nodes' ANA group 1 starts inaccessible and is steered by each node's cluster thread:
#   optimized on the node that serves the volume, inaccessible on the other.
#
# The guest (scripts/guest/multipath-test.sh, as in tests/multipath.sh) connects both paths,
# checks one optimized and one inaccessible path, writes and verifies, then writes chunk after
# chunk (tgtd stopped meanwhile, so node-a's log holds them dirty); on its MULTIPATH-KILL-NOW
# this script kills node-a (kill -9), lets tgtd go on and only watches: node-a's
# lease expires, node-b (also elected resource manager) makes itself the rescuer, destages its
# copy to the SAN, serves the volume write-through and makes its path optimized; the guest's I/O,
# waiting meanwhile, continues through node-b and verifies. Then:
#   - the md5 the guest reports must be that of the SAN's LUN file itself (every acknowledged
#     write on the SAN: node-a's through node-b's rescue, node-b's written through);
#   - node-a restarts: it asks for the volume back, node-b closes its path and stops, node-a
#     drops its old log (the SAN holds newer writes), ends the rescue and serves again: its
#     path optimized, node-b's inaccessible, the record without rescuer or server; then the
#     volume read through node-a (a write-through check node reads the SAN alone) matches.
# Prints the times: kill → rescuer chosen, → copy on the SAN, → served by node-b, the guest's
# longest wait for a path; and handback times.
#
# Environment: BIN (default build/release; needs the iscsi and cluster features),
# GUEST_TIMEOUT (default 180), GUEST_VERBOSE=1, KEEP=1 (keep the work dir).
# Logs go to build/guest/logs/cluster-multipath-<timestamp>/. Exit status 0 = pass.
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"
BIN=${BIN:-build/release}
GUEST_TIMEOUT=${GUEST_TIMEOUT:-180}
CHUNKS=30
KILL_AFTER=6
SUBNQN=nqn.2026-11.dev.stager:cluster-multipath
HOSTNQN=nqn.2026-11.dev.stager:guest-host
for b in stagerd stagerctl stager-perf; do
    [[ -x $BIN/$b ]] || { echo "cluster_multipath: $BIN/$b missing"; exit 1; }
done
for c in tgtd etcd etcdctl python3; do
    command -v $c > /dev/null || { echo "cluster_multipath: $c missing"; exit 1; }
done

LOGDIR=$REPO_ROOT/build/guest/logs/cluster-multipath-$(date +%Y%m%d-%H%M%S)-$$
mkdir -p "$LOGDIR"
CONSOLE=$LOGDIR/console.log
work=$(mktemp -d /tmp/stager-cmp.XXXXXX)
tgtd_pid="" etcd_pid="" qemu_pid="" tail_pid=""
declare -A pid=()
cleanup() {
    local rc=$?
    trap - EXIT
    for p in "$qemu_pid" "$tail_pid"; do [[ -n $p ]] && kill -9 "$p" 2> /dev/null || true; done
    for n in "${!pid[@]}"; do kill -9 "${pid[$n]}" 2> /dev/null || true; done
    for p in "$tgtd_pid" "$etcd_pid"; do [[ -n $p ]] && kill -9 "$p" 2> /dev/null || true; done
    wait 2> /dev/null || true
    cp "$work"/*.log "$work"/*.yaml "$LOGDIR/" 2> /dev/null || true
    if [[ ${KEEP:-0} == 1 ]]; then echo "cluster_multipath: kept $work"; else rm -rf "$work"; fi
    exit "$rc"
}
trap cleanup EXIT
log() { echo "cluster_multipath: $*"; }
fail() {
    echo "FAIL: $*"
    log "---- last 40 lines of the guest console ----"
    tr -d '\r' < "$CONSOLE" 2> /dev/null | tail -n 40 | sed 's/^/  guest| /'
    for f in "$work"/stagerd-*.log "$work"/etcd.log; do echo "--- $f"; tail -30 "$f"; done
    exit 1
}
source tests/lib/san.sh
source tests/lib/nodes.sh
source tests/lib/cluster.sh

log "guest: building kernel + initramfs (scripts/guest/build.sh)..."
bash scripts/guest/build.sh
# shellcheck disable=SC1091
. build/guest/guest.env

# etcd
start_etcd cmp
prefix=/stager/cmp

# the SAN: 64 MiB, the namespace's size on both nodes
iqn=iqn.2026-11.dev.stager:cluster-multipath
truncate -s 64M "$work/lun1.img"
start_tgtd "$iqn" 57 "$work/lun1.img"
san="iscsi://127.0.0.1:$iscsi_port/$iqn/1"

declare -A nvme fabric cntl
for n in a b; do nvme[$n]=$(free_port); fabric[$n]=$(free_port); done
nvme[check]=$(free_port)
cntl[a]="cntlid_min: 1, cntlid_max: 999"
cntl[b]="cntlid_min: 1000, cntlid_max: 1999"
declare -A core=([a]=0 [b]=1)
for n in a b; do
    cluster_node_yaml "$n" "${core[$n]}" "$([[ $n == a ]] && echo b || echo a)"
    cat >> "$work/node-$n.yaml" << EOF
ana: { ${cntl[$n]} }
subsystems:
  - nqn: $SUBNQN
    allow_any_host: false
    hosts: [$HOSTNQN]
    ana_groups: [{ id: 1, state: inaccessible }]
    namespaces:
EOF
done
cat >> "$work/node-a.yaml" << EOF
      - nsid: 1
        backend: { kind: volume, id: 1, flash: flash0, policy: write-back+1, replicas: [node-b],
                   san: { kind: iscsi, url: "$san" } }
EOF
cat >> "$work/node-b.yaml" << EOF
      - nsid: 1
        backend: { kind: standby, id: 1, size: 64MiB }
EOF
# The check node: a write-through volume over the same LUN, to read the SAN alone.
check_node_yaml "${nvme[check]}" "$SUBNQN" "$san" > "$work/node-check.yaml"

ana_is() { # node state: node's ANA group 1 as `stagerctl ana show` prints it
    grep -q "^$SUBNQN .* $2 " <<< "$(ctl ana show --socket "$work/$1.sock" 2> /dev/null)"
}
field_is() { [[ $(field "$1") == "$2" ]]; }
manager_is() { grep -q "cluster: node $1 is the resource manager" "$work/stagerd-${1#node-}.log"; }

# node-b first: it is elected resource manager, so the one left when node-a dies.
start b
wait_for 20 "node-b elected resource manager" manager_is node-b
start a
wait_for 30 "volume 1 write-back+1 with node-b in sync" protected node-b
wait_for 10 "the record names node-b's copy in sync" field_is in_sync '["node-b"]'
wait_for 10 "node-a's path optimized" ana_is a optimized
wait_for 10 "node-b's path inaccessible" ana_is b inaccessible
log "volume 1 write-back+1 on node-a (path optimized), copy and standby namespace on node-b (path inaccessible)"

APPEND="console=ttyS0 panic=-1 quiet stager.test=/guest/multipath-test.sh stager.addr=10.0.2.2"
APPEND="$APPEND stager.port_a=${nvme[a]} stager.port_b=${nvme[b]} stager.subnqn=$SUBNQN stager.hostnqn=$HOSTNQN"
APPEND="$APPEND stager.chunks=$CHUNKS stager.kill_after=$KILL_AFTER"
log "guest: booting $GUEST_KVER (TCG, 1024 MiB, 2 vCPUs, timeout ${GUEST_TIMEOUT}s), console -> $CONSOLE"
: > "$CONSOLE"
timeout -k 5 "$GUEST_TIMEOUT" qemu-system-x86_64 \
    -accel tcg -cpu max -m 1024 -smp 2 \
    -kernel "$GUEST_VMLINUZ" -initrd "$GUEST_INITRD" -append "$APPEND" \
    -display none -monitor none -parallel none -serial "file:$CONSOLE" \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0 \
    -no-reboot < /dev/null > "$LOGDIR/qemu.log" 2>&1 &
qemu_pid=$!
if [[ ${GUEST_VERBOSE:-0} == 1 ]]; then
    tail -n +1 -f "$CONSOLE" --pid="$qemu_pid" | sed -u 's/^/  guest| /' &
    tail_pid=$!
fi

# While the guest writes its chunks the SAN is held (tgtd stopped), so that node-a's log still
# holds them dirty when it is killed: node-a, back, must not serve them over what node-b wrote.
held=0 killed=0 t_rescuer="" t_rescued="" t_served=""
while kill -0 "$qemu_pid" 2> /dev/null; do
    if [[ $held == 0 ]] && grep -qa '^mp: step 3' "$CONSOLE"; then
        held=1
        kill -STOP "$tgtd_pid"
    fi
    if [[ $killed == 0 ]] && grep -qa '^MULTIPATH-KILL-NOW' "$CONSOLE"; then
        killed=1
        dirty=$(vol dirty_bytes)
        t0=$(now)
        log "the guest asked for the failover: kill -9 node-a mid-write ($dirty bytes dirty in its log); nothing more by hand"
        stop a KILL
        sleep 0.5
        kill -CONT "$tgtd_pid"
        ((${dirty:-0} > 0)) || fail "node-a's log held nothing dirty at the kill: the test would not see it serve stale data"
    fi
    if [[ $killed == 1 ]]; then
        [[ -z $t_rescuer && $(field rescuer) == '"node-b"' ]] && t_rescuer=$(since "$t0")
        [[ -z $t_rescued && $(field rescued_unix_ms) =~ ^[1-9] ]] && t_rescued=$(since "$t0")
        [[ -z $t_served ]] && ana_is b optimized && t_served=$(since "$t0")
    fi
    sleep 0.1
done
qrc=0
wait "$qemu_pid" || qrc=$?
qemu_pid=""
result=$(tr -d '\r' < "$CONSOLE" | grep -a -E '^GUEST-RESULT: ' | tail -n1 || true)
if [[ $result != "GUEST-RESULT: PASS" ]]; then
    if [[ $qrc == 124 || $qrc == 137 ]]; then
        fail "the guest timed out after ${GUEST_TIMEOUT}s"
    fi
    fail "${result#GUEST-RESULT: }"
fi
[[ $killed == 1 ]] || fail "the guest passed without asking for the failover"
[[ -n $t_served ]] || fail "the guest passed but node-b's path was never seen optimized"
[[ $(field server) == '"node-b"' ]] || fail "the record does not name node-b as the server: $(record)"
tr -d '\r' < "$CONSOLE" | grep -a -E '^mp: ' | sed 's/^/  /'
read -r _ wait_s wait_chunk < <(tr -d '\r' < "$CONSOLE" | grep -a '^MULTIPATH-WAIT ' | tail -n1) || fail "no MULTIPATH-WAIT line"
log "PASS: kill → rescuer chosen ${t_rescuer}s, → copy on the SAN ${t_rescued}s, → node-b serving (optimized) ${t_served}s;" \
    "the guest's longest write after the kill waited ${wait_s}s (chunk $wait_chunk)"

# Every write the guest saw acknowledged is on the SAN: the LUN file itself.
read -r _ mib want < <(tr -d '\r' < "$CONSOLE" | grep -a '^MULTIPATH-MD5 ' | tail -n1) || fail "no MULTIPATH-MD5 line"
got=$(head -c $((mib << 20)) "$work/lun1.img" | md5sum | cut -d' ' -f1)
[[ $got == "$want" ]] || fail "the SAN's first $mib MiB have md5 $got, the guest wrote and read $want"
log "PASS: the SAN's LUN file holds the $mib MiB the guest verified (md5 $got)"

# While node-b serves: stager-perf writes verify-stamped blocks through it, over blocks node-a's
# log also holds (the guest's first chunks went there before the kill).
"$BIN/stager-perf" run --target "tcp://127.0.0.1:${nvme[b]}/$SUBNQN" --hostnqn "$HOSTNQN" --nsid 1 -q 8 \
    -w randwrite -s 4k --range 0:16MiB -t 3 --verify-state "$work/state.json" --quiet --name served \
    > "$work/perf.log" 2>&1 || fail "writes through node-b (serving) failed: $(tail -5 "$work/perf.log")"

# node-a comes back: it asks for the volume, node-b hands it back, node-a serves again.
t1=$(now)
start a
wait_for 30 "node-b handed the volume back (record without server)" field_is server '""'
t_handed=$(since "$t1")
wait_for 30 "node-a ended the rescue" field_is rescuer '""'
wait_for 10 "node-a's path optimized again" ana_is a optimized
t_back=$(since "$t1")
ana_is b inaccessible || fail "node-b's path is not inaccessible after the handback"
grep -q "handed back to its owner node-a" "$work/stagerd-b.log" || fail "node-b's log does not say it handed the volume back"
wait_for 30 "volume 1 write-back+1 again with node-b in sync" protected node-b
log "PASS: node-a back: node-b handed back after ${t_handed}s, node-a serving (optimized) after ${t_back}s, write-back+1 again"

# node-a serves what node-b wrote, not its own older log: every stamped block verifies through
# node-a, and (drained) on the SAN alone.
"$BIN/stager-perf" verify --target "tcp://127.0.0.1:${nvme[a]}/$SUBNQN" --hostnqn "$HOSTNQN" \
    --verify-state "$work/state.json" > "$work/verify-a.log" 2>&1 ||
    fail "blocks written through node-b do not read back through node-a: $(tail -5 "$work/verify-a.log")"
log "PASS: every block written through node-b reads back through node-a ($(grep -o '[0-9]* blocks' "$work/verify-a.log" | head -1))"
wait_for 60 "node-a drains volume 1" drained
start check
"$BIN/stager-perf" verify --target "tcp://127.0.0.1:${nvme[check]}/$SUBNQN" \
    --verify-state "$work/state.json" > "$work/verify-san.log" 2>&1 ||
    fail "blocks written through node-b are not on the SAN after node-a's drain: $(tail -5 "$work/verify-san.log")"
log "PASS: and on the SAN alone after node-a drained"
echo "PASS: cluster_multipath (logs: $LOGDIR)"
