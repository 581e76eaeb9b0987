#!/usr/bin/env bash
# Issue 10, the resource manager killed while a replica is being replaced, end to end, under
# verified load, nothing done by hand.
#
#   etcd and tgtd (a file-backed iSCSI LUN) on 127.0.0.1; four stagerd nodes. node-m starts
#   first and is elected resource manager; it has no flash, so it is never a replica. node-a owns
#   volume 1, write-back+1, its copy on node-b; node-c is the spare.
#   node-b is killed (SIGKILL): node-a's volume runs write-through at once, and its copy is to
#   be replaced once node-b's lease expires (3 s). Right away — before that — the manager
#   node-m is killed too. Its election key goes with its lease; node-a or node-c is elected and
#   does the replacement: node-c placed with a new epoch, write-back+1 again.
# Every write succeeds; every acknowledged block reads back through node-a and, drained, from
# the SAN alone. Prints the times from the kills: write-through, new manager, node-c placed,
# write-back+1 again.
# Needs tgtd, etcd, etcdctl, python3 and binaries built with the iscsi and cluster features
# (BIN=dir, default build/release). KEEP=1 keeps the work dir. Exit status 0 = pass.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-build/release}

work=$(mktemp -d /tmp/stager-mgrfail.XXXXXX)
source tests/lib/cluster.sh
cluster_test cluster_manager_failover

start_etcd mgrfail
prefix=/stager/mgrfail
iqn=iqn.2026-11.dev.stager:mgrfail
truncate -s 128M "$work/lun1.img"
start_tgtd "$iqn" 61 "$work/lun1.img"
san="iscsi://127.0.0.1:$iscsi_port/$iqn/1"
nqn=nqn.2026-11.dev.stager:mgrfail

declare -A nvme fabric
for n in m a b c check; do nvme[$n]=$(free_port); fabric[$n]=$(free_port); done
declare -A core=([m]=0 [a]=0 [b]=1 [c]=1)
# node-m keeps no copies and has no volume: no flash, so no peers either.
FLASH=0 cluster_node_yaml m "${core[m]}"
for n in a b c; do
    peers=()
    for p in a b c; do [[ $p == "$n" ]] || peers+=("$p"); done
    cluster_node_yaml "$n" "${core[$n]}" "${peers[@]}"
done
cat >> "$work/node-a.yaml" << YAML
subsystems:
  - nqn: $nqn
    allow_any_host: true
    namespaces:
      - nsid: 1
        backend: { kind: volume, id: 1, flash: flash0, policy: write-back+1, replicas: [node-b],
                   san: { kind: iscsi, url: "$san" } }
YAML
check_node_yaml "${nvme[check]}" "$nqn" "$san" > "$work/node-check.yaml"
target="tcp://127.0.0.1:${nvme[a]}/$nqn"
san_only="tcp://127.0.0.1:${nvme[check]}/$nqn"
manager_is() { grep -q "cluster: node $1 is the resource manager" "$work/stagerd-${1#node-}.log"; }
new_manager() { manager_is node-a || manager_is node-c; }
unprotected() { [[ $(vol effective_policy) == '"write-through"' ]]; }

start m
wait_for 20 "node-m elected resource manager" manager_is node-m
start b
start c
start a
wait_for 30 "volume 1 write-back+1 with node-b in sync" protected node-b
echo "cluster_manager_failover: node-m manages; volume 1 write-back+1 on node-a, copy on node-b, node-c spare"

"$BIN/stager-perf" run --target "$target" --nsid 1 -q 8 -w randwrite -s 4k --range 0:32MiB -t 20 \
    --verify-state "$work/state.json" --quiet --name manager-failover > "$work/perf.log" 2>&1 &
writer=$!
sleep 3

# The replica dies, and the manager with the replacement still pending (node-b's lease is alive).
t0=$(now)
stop b KILL
stop m KILL
[[ $(field replicas) == '["node-b"]' ]] || fail "the replacement was not pending when node-m died: $(record)"
wait_for 10 "write-through once node-b is lost" unprotected
wt=$(since "$t0")
wait_for 15 "another node elected resource manager" new_manager
elected=$(since "$t0")
wait_for 20 "the new manager places the copy on node-c" replicas_are node-c
placed=$(since "$t0")
wait_for 30 "write-back+1 again with node-c in sync" protected node-c
back=$(since "$t0")
who=$(grep -l 'is the resource manager' "$work"/stagerd-[ac].log | sed 's/.*stagerd-/node-/; s/.log//')
grep -q "node-b: its node is gone" <<< "$(record)" || fail "the record's history does not say why node-b was replaced: $(record)"
grep -q "resource manager: volume 1: epoch 2: replicas \[node-b\] → \[node-c\]" "$work/stagerd-${who#node-}.log" ||
    fail "$who's log does not show it made the replacement"
echo "PASS: manager killed with a replacement pending: write-through after ${wt} s, $who elected after ${elected} s, node-c placed after ${placed} s, write-back+1 again after ${back} s"

writer_done_and_verified "$target" "$san_only"
echo "cluster_manager_failover: PASS"
