#!/usr/bin/env bash
# Issue 10, scenario c, end to end: a replica loses its connection to the volume's SAN (it stays
# alive, linked to its owner and registered), under verified load, nothing done by hand.
#
#   etcd (Debian's etcd-server) and tgtd (a file-backed iSCSI LUN) on 127.0.0.1; three stagerd
#   nodes. node-a owns volume 1, write-back+1, its copy on node-b. Each node logs in to other
#   nodes' SANs with its own initiator IQN (`node.san_initiator`), and tgtd admits initiators by
#   name, so one node alone can be cut from the SAN: `tgtadm --op unbind --initiator-name` of
#   node-b's IQN.
#   node-b's next SAN probe fails (`CLUSTER_SAN_PROBE`, 10 s), it stops listing volume 1 as
#   reachable; the resource manager takes it out of the replica candidates and places the copy
#   on node-c with a new epoch (node-b could no longer destage it were node-a lost); node-a
#   follows: write-through while node-c syncs (if only for a moment), then write-back+1 again.
# Under stager-perf --verify on node-a throughout: every write succeeds, every acknowledged block
# reads back through node-a and, drained, from the SAN alone. Prints the times from the cut:
# detected (node-b's registration), node-c placed, write-back+1 again.
# Needs tgtd, etcd, etcdctl, python3 and binaries built with the iscsi and cluster features
# (BIN=dir, default build/release). KEEP=1 keeps the work dir. Exit status 0 = pass.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-build/release}

work=$(mktemp -d /tmp/stager-sanloss.XXXXXX)
source tests/lib/cluster.sh
cluster_test cluster_san_loss

start_etcd sanloss
prefix=/stager/sanloss

# The SAN, admitting initiators by name: node-a's volume and the check node log in as the
# default IQN; node-b and node-c probe (and would rescue) as their own.
iqn=iqn.2026-11.dev.stager:sanloss
default_iqn=iqn.2026-11.dev.stager:stagerd
truncate -s 128M "$work/lun1.img"
start_tgtd "$iqn" 73 "$work/lun1.img"
adm --op unbind --mode target --tid 1 -I ALL
for i in "$default_iqn" "$iqn-node-b" "$iqn-node-c"; do adm --op bind --mode target --tid 1 --initiator-name "$i"; done
san="iscsi://127.0.0.1:$iscsi_port/$iqn/1"

declare -A nvme fabric
for n in a b c check; do nvme[$n]=$(free_port); fabric[$n]=$(free_port); done
declare -A core=([a]=0 [b]=1 [c]=1)
for n in a b c; do
    peers=()
    for p in a b c; do [[ $p == "$n" ]] || peers+=("$p"); done
    NODE_LINES="  san_initiator: $iqn-node-$n"$'\n' cluster_node_yaml "$n" "${core[$n]}" "${peers[@]}"
done
cat >> "$work/node-a.yaml" << EOF
subsystems:
  - nqn: nqn.2026-11.dev.stager:sanloss
    allow_any_host: true
    namespaces:
      - nsid: 1
        backend: { kind: volume, id: 1, flash: flash0, policy: write-back+1, replicas: [node-b],
                   san: { kind: iscsi, url: "$san" } }
EOF
check_node_yaml "${nvme[check]}" nqn.2026-11.dev.stager:sanloss "$san" > "$work/node-check.yaml"
target="tcp://127.0.0.1:${nvme[a]}/nqn.2026-11.dev.stager:sanloss"
san_only="tcp://127.0.0.1:${nvme[check]}/nqn.2026-11.dev.stager:sanloss"

reaches() { # node volume: whether the node's registration lists the volume's SAN as reachable
    etcdctl --endpoints "127.0.0.1:$etcd_port" get "$prefix/nodes/$1" --print-value-only 2> /dev/null |
        python3 -c "import json,sys; sys.exit(0 if $2 in json.load(sys.stdin)['sans_reachable'] else 1)" 2> /dev/null
}
cut_off() { ! reaches node-b 1; }

start b
start c
start a
wait_for 30 "volume 1 write-back+1 with node-b in sync" protected node-b
both_reach() { reaches node-b 1 && reaches node-c 1; }
wait_for 30 "node-b and node-c register volume 1's SAN as reachable" both_reach
echo "cluster_san_loss: volume 1 write-back+1 on node-a, copy on node-b; node-b and node-c reach its SAN"

"$BIN/stager-perf" run --target "$target" --nsid 1 -q 8 -w randwrite -s 4k --range 0:32MiB -t 40 \
    --verify-state "$work/state.json" --quiet --name san-loss > "$work/perf.log" 2>&1 &
writer=$!
sleep 3

# c. node-b loses the SAN (tgtd stops admitting its IQN); it keeps its link and its lease.
t0=$(now)
adm --op unbind --mode target --tid 1 --initiator-name "$iqn-node-b"
wait_for 25 "(c) node-b registers volume 1's SAN as unreachable" cut_off
detect=$(since "$t0")
wait_for 20 "(c) the resource manager places the copy on node-c" replicas_are node-c
placed=$(since "$t0")
wait_for 30 "(c) write-back+1 again with node-c in sync" protected node-c
back=$(since "$t0")
grep -q "node-b: it cannot reach the volume's SAN" <<< "$(record)" || fail "(c) the record's history does not say why node-b was replaced: $(record)"
grep -q node-b <<< "$(etcdctl --endpoints "127.0.0.1:$etcd_port" get "$prefix/nodes/node-b" --print-value-only)" ||
    fail "(c) node-b should still be alive in etcd"
# The copy moves with a short stretch of write-through while node-c syncs (the record's history
# has it when the owner's tick saw it).
echo "PASS: (c) replica cut from the SAN: detected after ${detect} s (its SAN probe), node-c placed after ${placed} s, write-back+1 with node-c in sync after ${back} s"

writer_done_and_verified "$target" "$san_only"
echo "cluster_san_loss: PASS"
