#!/usr/bin/env bash
# Failure handling end to end with real parts (issue 10, scenarios a, b and e, and rejoins):
#   etcd (Debian's etcd-server) on 127.0.0.1 holds the cluster state; tgtd serves the volume's
#   SAN (a file-backed iSCSI LUN); three stagerd nodes with `cluster:` sections run on 127.0.0.1.
#   node-a owns volume 1, write-back+1, its copy first on node-b. node-a reaches node-c's fabric
#   through tests/lib/tcp_proxy.py, so the link between those two alone can be cut.
#   Under stager-perf --verify on node-a, nothing done by hand:
#   a. node-b is killed with SIGKILL: the volume runs write-through at once; when node-b's lease
#      expires the resource manager places the copy on node-c with a new epoch; node-a follows
#      and is write-back+1 again once node-c is in sync. node-b is also the elected resource
#      manager, so another node must be elected to do it.
#   rejoin: node-b restarts; its stale copy of volume 1 is let go (never served).
#   b. the fabric between node-a and node-c is cut silently (both alive, both in etcd): the link
#      times out, node-a reports node-c unreachable, the manager moves the copy to node-b.
#   e. node-a, the owner, is killed with SIGKILL under load: node-b, whose copy the record names in
#      sync, is made the rescuer by the resource manager and destages its copy to the SAN; the
#      SAN alone then holds every acknowledged write. node-a comes back and is write-back+1 again.
#   Afterwards every acknowledged block verifies through node-a and, drained, on the SAN alone.
#   Prints per scenario: time to detect, time in write-through, time back to the requested policy.
# Needs tgtd, etcd, python3 and binaries built with the iscsi and cluster features (BIN=dir,
# default build/release). Prints PASS/FAIL lines; exits non-zero on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-build/release}
for b in stagerd stagerctl stager-perf; do
    [[ -x $BIN/$b ]] || { echo "cluster_failover: $BIN/$b missing"; exit 1; }
done
for c in tgtd etcd etcdctl python3; do
    command -v $c > /dev/null || { echo "cluster_failover: $c missing"; exit 1; }
done

work=$(mktemp -d /tmp/stager-failover.XXXXXX)
tgtd_pid=""
etcd_pid=""
proxy_pid=""
etcd_proxy_pid=""
writer=""
declare -A pid=()
cleanup() {
    for n in "${!pid[@]}"; do kill -9 "${pid[$n]}" 2> /dev/null || true; done
    for p in "$writer" "$proxy_pid" "$etcd_proxy_pid" "$tgtd_pid" "$etcd_pid"; do [[ -n $p ]] && kill -9 "$p" 2> /dev/null || true; done
    wait 2> /dev/null || true
    if [[ ${KEEP:-0} == 1 ]]; then echo "cluster_failover: kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
fail() {
    echo "FAIL: $*"
    for f in "$work"/*.log; do echo "--- $f"; tail -30 "$f"; done
    exit 1
}
source tests/lib/san.sh
source tests/lib/nodes.sh
source tests/lib/cluster.sh

# etcd
start_etcd failover
prefix=/stager/failover

# the SAN
iqn=iqn.2026-11.dev.stager:failover
truncate -s 128M "$work/lun1.img"
start_tgtd "$iqn" 91 "$work/lun1.img"
san="iscsi://127.0.0.1:$iscsi_port/$iqn/1"

declare -A nvme fabric
for n in a b c; do nvme[$n]=$(free_port); fabric[$n]=$(free_port); done
proxy_port=$(free_port)
python3 tests/lib/tcp_proxy.py "$proxy_port" "${fabric[c]}" > "$work/proxy.log" 2>&1 &
proxy_pid=$!
# node-a reaches etcd through a proxy of its own, so it alone can be cut from etcd (f).
etcd_proxy=$(free_port)
python3 tests/lib/tcp_proxy.py "$etcd_proxy" "$etcd_port" > "$work/etcd-proxy.log" 2>&1 &
etcd_proxy_pid=$!
nvme[check]=$(free_port)
declare -A core=([a]=0 [b]=1 [c]=1)
# node-a reaches etcd, and node-c's fabric, through proxies the test can cut.
ETCD=127.0.0.1:$etcd_proxy cluster_node_yaml a "${core[a]}" b c="$proxy_port"
cluster_node_yaml b "${core[b]}" a c
cluster_node_yaml c "${core[c]}" a b
cat >> "$work/node-a.yaml" <<EOF
subsystems:
  - nqn: nqn.2026-11.dev.stager:failover
    allow_any_host: true
    namespaces:
      - nsid: 1
        backend: { kind: volume, id: 1, flash: flash0, policy: write-back+1, replicas: [node-b],
                   san: { kind: iscsi, url: "$san" } }
EOF
check_node_yaml "${nvme[check]}" nqn.2026-11.dev.stager:failover "$san" > "$work/node-check.yaml"
target="tcp://127.0.0.1:${nvme[a]}/nqn.2026-11.dev.stager:failover"
# The check node: a write-through volume over the same LUN, to read the SAN alone.
san_only="tcp://127.0.0.1:${nvme[check]}/nqn.2026-11.dev.stager:failover"

unprotected() { [[ $(vol effective_policy) == '"write-through"' ]]; }
in_sync_is() { [[ $(field in_sync) == "$1" ]]; }

# node-b starts first and becomes the resource manager: killing it in (a) also tests the
# manager's failover (another node is elected and does the replacement).
start b
manager_is() { grep -q "cluster: node $1 is the resource manager" "$work/stagerd-${1#node-}.log"; }
wait_for 20 "node-b elected resource manager" manager_is node-b
start c
start a
wait_for 30 "volume 1's record created by node-a with node-b as replica" replicas_are node-b
wait_for 30 "volume 1 write-back+1 with node-b in sync" protected node-b
wait_for 5 "the record names node-b's copy in sync" in_sync_is '["node-b"]'
epoch0=$(field epoch)
echo "cluster_failover: volume 1 write-back+1 on node-a, copy on node-b (in sync in the record), epoch $epoch0"

"$BIN/stager-perf" run --target "$target" --nsid 1 -q 8 -w randwrite -s 4k --range 0:32MiB -t 45 \
    --verify-state "$work/state.json" --quiet --name failover > "$work/perf.log" 2>&1 &
writer=$!
sleep 3

# failover LABEL NEW-REPLICA: times, from t0, to write-through, to NEW-REPLICA in the record,
# and to write-back+1 with it in sync (detect, placed, back).
failover() {
    wait_for 10 "($1) write-through" unprotected
    detect=$(since "$t0")
    wait_for 30 "($1) the resource manager places the copy on $2" replicas_are "$2"
    placed=$(since "$t0")
    wait_for 30 "($1) write-back+1 again with $2 in sync" protected "$2"
    back=$(since "$t0")
}

# a. a replica node dies.
t0=$(now)
stop b KILL
failover a node-c
epoch1=$(field epoch)
((epoch1 > epoch0)) || fail "(a) the epoch did not move ($epoch0 → $epoch1)"
echo "PASS: (a) replica node killed: write-through after ${detect} s, node-c placed (epoch $epoch0 → $epoch1) after ${placed} s, write-back+1 again after ${back} s"
new_manager() { manager_is node-a || manager_is node-c; }
wait_for 5 "(a) a new resource manager after node-b's death" new_manager
echo "PASS: (a) the killed node was the resource manager; $(grep -l 'is the resource manager' "$work"/stagerd-[ac].log | sed 's/.*stagerd-/node-/; s/.log//') took over and made the replacement"

# rejoin: node-b comes back; its copy is stale and must go.
start b
grep_copy() { grep -q "this node is no longer its replica" "$work/stagerd-b.log"; }
wait_for 30 "node-b lets its stale copy of volume 1 go" grep_copy
echo "PASS: rejoin: node-b restarted and let go of its stale copy ($(grep -o 'its copy of [^ ]* [^ ]* let go' "$work/stagerd-b.log" | tail -1))"

# b. the fabric between node-a and node-c is cut; both stay alive and registered.
sleep 2
t0=$(now)
kill -USR1 "$proxy_pid"
failover b node-b
echo "PASS: (b) link cut: write-through after ${detect} s, node-b placed after ${placed} s, write-back+1 again after ${back} s"
grep -q node-c <<< "$(etcdctl --endpoints "127.0.0.1:$etcd_port" get "$prefix/nodes/node-c" --print-value-only)" \
    || fail "(b) node-c should still be alive in etcd"

# node-a served throughout: every write must have succeeded, not only the acknowledged ones read back.
wait "$writer" || { cat "$work/perf.log"; fail "writes failed on node-a during the failovers"; }
writer=""
grep -q "verify state saved" "$work/perf.log" || { cat "$work/perf.log"; fail "stager-perf did not save its state"; }
"$BIN/stager-perf" verify --target "$target" --nsid 1 --verify-state "$work/state.json" > "$work/verify-a.log" 2>&1 \
    || { cat "$work/verify-a.log"; fail "a block acknowledged during the failures does not read back through node-a"; }
echo "PASS: every acknowledged block reads back through node-a: $(tail -1 "$work/verify-a.log")"
view=$(ctl cluster --socket "$work/a.sock") || fail "stagerctl cluster failed"
echo "$view"
grep -q "volume 1: owner node-a, replicas \[node-b\]" <<< "$view" || fail "stagerctl cluster does not show the volume's owner and replica"
grep -q "epoch 3: replicas \[node-c\] → \[node-b\]" <<< "$view" || fail "stagerctl cluster does not show the transitions"
echo "PASS: stagerctl cluster shows the nodes, the manager, the record and its transitions"

# Each loss of an in-sync replica held node-a's write acknowledgements until the record no
# longer named that replica in sync (so a copy the record names never misses an acknowledged
# write): hold and release in node-a's log, the record written in between.
holds=$(python3 tests/lib/acks_held.py "$work/stagerd-a.log") || fail "write acknowledgements were not held as they must be: $holds"
echo "PASS: an in-sync replica lost → acknowledgements held until the record said so: $holds"

# e. the owner dies (kill -9) under load. Nothing by hand: when its lease expires the resource
#    manager makes node-b, whose copy the record names in sync, the rescuer; node-b destages its
#    copy to the SAN while it keeps running and records when it is all there. Then the SAN alone
#    must hold every write node-a ever acknowledged.
wait_for 30 "(e) write-back+1 with node-b in sync before the owner is killed" protected node-b
wait_for 5 "(e) the record names node-b's copy in sync" in_sync_is '["node-b"]'
"$BIN/stager-perf" run --target "$target" --nsid 1 -q 8 -w randwrite -s 4k --range 0:32MiB -t 30 \
    --verify-state "$work/state.json" --quiet --name owner-kill > "$work/perf-e.log" 2>&1 &
writer=$!
sleep 3
dirty_at_kill=$(vol dirty_bytes)
t0=$(now)
stop a KILL
wait "$writer" || true
writer=""
grep -q "verify state saved" "$work/perf-e.log" || { cat "$work/perf-e.log"; fail "(e) stager-perf did not save its state"; }
rescuer_is() { [[ $(field rescuer) == "\"$1\"" ]]; }
rescued() { [[ $(field rescued_unix_ms) =~ ^[1-9][0-9]*$ ]]; }
wait_for 30 "(e) the resource manager makes node-b the rescuer of volume 1" rescuer_is node-b
chosen=$(since "$t0")
wait_for 60 "(e) node-b's copy all on the SAN" rescued
done_after=$(since "$t0")
epoch_e=$(field epoch)
echo "PASS: (e) owner killed with $dirty_at_kill dirty bytes: node-b chosen to destage its copy after ${chosen} s (epoch $epoch_e), all on the SAN after ${done_after} s"
grep -q "destaging this node's copy" "$work/stagerd-b.log" || fail "(e) node-b does not say it destages its copy"
shows_rescue() { grep -q "RESCUE by node-b: its copy is on the SAN" <<< "$(ctl cluster --socket "$work/b.sock" 2> /dev/null)"; }
wait_for 5 "(e) stagerctl cluster on node-b shows the rescue done" shows_rescue
start check
"$BIN/stager-perf" verify --target "$san_only" --nsid 1 --verify-state "$work/state.json" > "$work/verify-rescue.log" 2>&1 \
    || { cat "$work/verify-rescue.log"; fail "(e) after the rescue the SAN alone does not hold every acknowledged write"; }
echo "PASS: (e) the SAN alone holds every write the killed owner acknowledged: $(tail -1 "$work/verify-rescue.log")"
stop check TERM

# The old owner comes back: it replays its log (the same data, destaged again once it may
# write the SAN); the rescue ends, node-b's copy takes the owner's link again.
start a
rescue_over() { [[ $(field rescuer) == '""' || $(field rescuer) == null ]]; }
wait_for 30 "(e) the rescue ends once the owner is back" rescue_over
wait_for 30 "(e) write-back+1 again with node-b in sync after the owner's return" protected node-b
echo "PASS: (e) the owner came back after the rescue and is write-back+1 again with node-b"
grep -q "the rescue of this node's copy is over" "$work/stagerd-b.log" || fail "(e) node-b did not end its rescue"
"$BIN/stager-perf" verify --target "$target" --nsid 1 --verify-state "$work/state.json" > "$work/verify-a2.log" 2>&1 \
    || { cat "$work/verify-a2.log"; fail "(e) a block acknowledged before the owner was killed does not read back through it"; }
echo "PASS: every acknowledged block reads back through the returned owner: $(tail -1 "$work/verify-a2.log")"

# f. fencing: node-a is cut from etcd alone (a partition: it keeps its hosts and its link to
#    node-b). Its lease expires, the manager makes node-b the rescuer, node-b refuses node-a's
#    link and destages its copy. node-a, stale, must by then neither write the SAN (its gate
#    closed at its lease's local deadline) nor acknowledge a write (its replica is gone and it
#    cannot record that): the SAN alone, read while node-a still runs cut off, holds every write
#    it acknowledged. Then the partition heals and node-a is write-back+1 again.
wait_for 30 "(f) write-back+1 with node-b in sync before the partition" protected node-b
"$BIN/stager-perf" run --target "$target" --nsid 1 -q 8 -w randwrite -s 4k --range 0:32MiB -t 40 --timeout 5 \
    --verify-state "$work/state.json" --quiet --name partition > "$work/perf-f.log" 2>&1 &
writer=$!
sleep 3
t0=$(now)
kill -USR1 "$etcd_proxy_pid"
wait_for 30 "(f) the resource manager makes node-b the rescuer of the cut-off owner's volume" rescuer_is node-b
chosen=$(since "$t0")
wait_for 60 "(f) node-b's copy all on the SAN" rescued
done_after=$(since "$t0")
wait "$writer" && fail "(f) every write succeeded on the cut-off owner: it kept acknowledging"
writer=""
grep -q "verify state saved" "$work/perf-f.log" || { cat "$work/perf-f.log"; fail "(f) stager-perf did not save its state"; }
kill -0 "${pid[a]}" || fail "(f) node-a should still run, cut off"
grep -q "lease is lost" "$work/stagerd-a.log" || fail "(f) node-a does not say its lease is lost"
start check
"$BIN/stager-perf" verify --target "$san_only" --nsid 1 --verify-state "$work/state.json" > "$work/verify-fence.log" 2>&1 \
    || { cat "$work/verify-fence.log"; fail "(f) the SAN alone misses a write the cut-off owner acknowledged"; }
stop check TERM
echo "PASS: (f) owner cut from etcd: node-b chosen after ${chosen} s, its copy on the SAN after ${done_after} s; the fenced owner's writes failed, and the SAN alone holds every write it acknowledged: $(tail -1 "$work/verify-fence.log")"
kill -USR2 "$etcd_proxy_pid"
wait_for 60 "(f) the rescue ends once the owner is back in etcd" rescue_over
wait_for 60 "(f) write-back+1 again with node-b in sync after the partition" protected node-b
"$BIN/stager-perf" verify --target "$target" --nsid 1 --verify-state "$work/state.json" > "$work/verify-a3.log" 2>&1 \
    || { cat "$work/verify-a3.log"; fail "(f) an acknowledged block does not read back through node-a after the partition"; }
echo "PASS: (f) the partition healed: node-a is write-back+1 again and every acknowledged block reads back through it"

# Drain and check the SAN alone.
ctl volume set-policy 1 write-through --socket "$work/a.sock" > /dev/null
wait_for 60 "node-a drains volume 1" drained
stop a TERM
rm -f "$work/flash-check.img"
start check
"$BIN/stager-perf" verify --target "$san_only" --nsid 1 --verify-state "$work/state.json" > "$work/verify-san.log" 2>&1 \
    || { cat "$work/verify-san.log"; fail "the SAN alone does not hold every acknowledged write"; }
echo "PASS: the SAN alone holds every acknowledged write: $(tail -1 "$work/verify-san.log")"
stop check TERM
echo "cluster_failover: PASS"
