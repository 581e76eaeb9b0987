#!/usr/bin/env bash
# Replication end to end with real parts (issue 9): the replica's copy is real and sufficient.
#   tgtd serves two file-backed iSCSI LUNs on 127.0.0.1 (the volumes' SANs). Three stagerd nodes
#   on 127.0.0.1 talk over the tcp fabric: node-a owns volume 1 (write-back+1, copy on node-b)
#   and volume 2 (write-back+2, copies on node-b and node-c).
#   1. write-back+1: stager-perf --verify writes to volume 1; node-a is killed with SIGKILL
#      mid-run; node-b is stopped; `stagerctl flash inspect` on node-b's flash lists the copy;
#      `stagerctl flash destage` of node-b's flash (with node-a's configuration, which names the
#      SAN) destages the copy; a fresh write-through stagerd over the same SAN verifies every
#      acknowledged block — node-a's own flash, still holding dirty data, is never used.
#   2. write-back+2: the same for volume 2 with node-a AND node-b killed: node-c's copy alone.
# Needs tgtd/tgtadm and binaries built with the iscsi feature. BIN=dir overrides where the
# binaries are (default build/release). Prints PASS/FAIL lines; exits non-zero on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-build/release}
for b in stagerd stagerctl stager-perf; do
    [[ -x $BIN/$b ]] || { echo "replication_kill: $BIN/$b missing"; exit 1; }
done
command -v tgtd > /dev/null || { echo "replication_kill: tgtd missing (apt-get install tgt)"; exit 1; }

work=$(mktemp -d /tmp/stager-replkill.XXXXXX)
tgtd_pid=""
declare -A pid=()
cleanup() {
    for n in "${!pid[@]}"; do kill -9 "${pid[$n]}" 2> /dev/null || true; done
    [[ -n $tgtd_pid ]] && kill -9 "$tgtd_pid" 2> /dev/null || true
    wait 2> /dev/null || true
    if [[ ${KEEP:-0} == 1 ]]; then echo "replication_kill: kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
fail() {
    echo "FAIL: $*"
    for f in "$work"/*.log; do echo "--- $f"; tail -25 "$f"; done
    exit 1
}
source tests/lib/san.sh
source tests/lib/nodes.sh
ctl() { "$BIN/stagerctl" "$@"; }

iqn=iqn.2026-11.dev.stager:replkill
truncate -s 128M "$work/lun1.img" "$work/lun2.img"
start_tgtd "$iqn" 77 "$work/lun1.img" "$work/lun2.img"
echo "replication_kill: tgtd on 127.0.0.1:$iscsi_port serving two LUNs"

declare -A nvme fabric
for n in a b c; do nvme[$n]=$(free_port); fabric[$n]=$(free_port); done
secret="replication kill test secret"
cores=(0 1 1)
i=0
for n in a b c; do
    peers=""
    for p in a b c; do
        [[ $p == "$n" ]] || peers+="    - { id: node-$p, address: 127.0.0.1:${fabric[$p]} }"$'\n'
    done
    cat > "$work/node-$n.yaml" <<EOF
reactors: { cores: [${cores[$i]}], idle_poll_us: 200 }
destage: { idle_poll_us: 50 }
listeners: [{ name: tcp0, address: "127.0.0.1:${nvme[$n]}" }]
management: { socket: $work/$n.sock }
node:
  id: node-$n
  fabric: { listen: "127.0.0.1:${fabric[$n]}", secret: "$secret", peer_timeout_ms: 1000, ring_size: 8MiB }
  peers:
$peers
flash:
  - { name: flash0, path: $work/flash-$n.img, size: 96MiB, cache_percent: 10 }
EOF
    i=$((i + 1))
done
cat >> "$work/node-a.yaml" <<EOF
subsystems:
  - nqn: nqn.2026-11.dev.stager:replkill
    allow_any_host: true
    namespaces:
      - nsid: 1
        backend: { kind: volume, id: 1, flash: flash0, policy: write-back+1, replicas: [node-b],
                   san: { kind: iscsi, url: "iscsi://127.0.0.1:$iscsi_port/$iqn/1" } }
      - nsid: 2
        backend: { kind: volume, id: 2, flash: flash0, policy: write-back+2, replicas: [node-b, node-c],
                   san: { kind: iscsi, url: "iscsi://127.0.0.1:$iscsi_port/$iqn/2" } }
EOF
# The SAN alone, behind a fresh flash device, write-through without read cache.
cat > "$work/check.yaml" <<EOF
reactors: { cores: [0] }
listeners: [{ name: tcp0, address: "127.0.0.1:${nvme[a]}" }]
management: { socket: $work/check.sock }
flash:
  - { name: flash0, path: $work/flash-check.img, size: 64MiB }
subsystems:
  - nqn: nqn.2026-11.dev.stager:replkill
    allow_any_host: true
    namespaces:
      - nsid: 1
        backend: { kind: volume, id: 1, flash: flash0, policy: write-through, read_cache: false,
                   san: { kind: iscsi, url: "iscsi://127.0.0.1:$iscsi_port/$iqn/1" } }
      - nsid: 2
        backend: { kind: volume, id: 2, flash: flash0, policy: write-through, read_cache: false,
                   san: { kind: iscsi, url: "iscsi://127.0.0.1:$iscsi_port/$iqn/2" } }
EOF
target="tcp://127.0.0.1:${nvme[a]}/nqn.2026-11.dev.stager:replkill"

volume_json() { # $1 volume id: node-a's status of it
    ctl status --json --socket "$work/a.sock" | python3 -c "import json,sys; print(json.dumps([v for d in json.load(sys.stdin)['devices'] for v in d['volumes'] if v['id']==$1][0]))"
}
wait_write_back() { # $1 volume id
    for _ in $(seq 200); do
        grep -q '"effective_policy": "write-back"' <<< "$(volume_json "$1")" && return 0
        sleep 0.1
    done
    volume_json "$1"
    fail "volume $1 never ran write-back with its replicas in sync"
}
# $1 nsid, $2 label: writes with verification until node-a is killed under it.
write_and_kill_a() {
    "$BIN/stager-perf" run --target "$target" --nsid "$1" -q 16 -w randwrite -s 4k --range 0:64MiB -t 30 \
        --verify-state "$work/state-$1.json" --quiet --name "$2" > "$work/perf-$2.log" 2>&1 &
    local wpid=$!
    sleep 4
    stop a KILL
    wait "$wpid" || true
    grep -q "verify state saved" "$work/perf-$2.log" || { cat "$work/perf-$2.log"; fail "stager-perf did not save its state ($2)"; }
    echo "replication_kill: node-a killed with SIGKILL during $2"
}
verify_from_san() { # $1 nsid, $2 what
    mv "$work/check.yaml" "$work/node-check.yaml" 2> /dev/null || true
    rm -f "$work/flash-check.img"
    start check
    "$BIN/stager-perf" verify --target "$target" --nsid "$1" --verify-state "$work/state-$1.json" > "$work/verify-$1.log" 2>&1 || {
        cat "$work/verify-$1.log"
        fail "$2: the SAN does not hold every acknowledged write"
    }
    tail -1 "$work/verify-$1.log"
    stop check TERM
}

# 1. write-back+1: the copy on node-b is enough.
start b
start a
wait_write_back 1
write_and_kill_a 1 plus1
inspect=$(ctl flash inspect "$work/flash-a.img")
grep -qE "volume 1: [0-9.]+ [KMG]?i?B dirty" <<< "$inspect" || true
stop b TERM
inspect=$(ctl flash inspect "$work/flash-b.img")
echo "$inspect"
grep -qE "copy of volume 1 for node node-a" <<< "$inspect" || fail "node-b's flash does not list its copy of volume 1"
echo "PASS: stagerctl flash inspect on the replica lists the copy of volume 1"
ctl flash destage "$work/flash-b.img" --config "$work/node-a.yaml" > "$work/destage-b.log" 2>&1 || {
    cat "$work/destage-b.log"
    fail "destaging node-b's copy failed"
}
cat "$work/destage-b.log"
verify_from_san 1 "write-back+1"
echo "PASS: write-back+1 — node-a killed, node-b's copy destaged: the SAN holds every acknowledged write"

# 2. write-back+2: node-a and node-b lost, node-c's copy alone. node-a restarts on its flash
# (volume 1 is clean on the SAN now, volume 2 never had writes), then the run and the kill.
start b
start c
start a
wait_write_back 2
write_and_kill_a 2 plus2
stop b KILL
stop c TERM
grep -qE "copy of volume 2 for node node-a" <<< "$(ctl flash inspect "$work/flash-c.img")" || fail "node-c's flash does not list its copy of volume 2"
ctl flash destage "$work/flash-c.img" --config "$work/node-a.yaml" > "$work/destage-c.log" 2>&1 || {
    cat "$work/destage-c.log"
    fail "destaging node-c's copy failed"
}
cat "$work/destage-c.log"
verify_from_san 2 "write-back+2"
echo "PASS: write-back+2 — node-a and node-b killed, node-c's copy destaged: the SAN holds every acknowledged write"
echo "replication_kill: PASS"
