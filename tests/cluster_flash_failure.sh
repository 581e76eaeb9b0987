#!/usr/bin/env bash
# Issue 10, scenario d, end to end: the owner's flash device fails while the owner keeps running,
# under verified load, and the race the issue names: writes that arrive meanwhile go to blocks
# whose older dirty data only the replica can still provide.
#
#   etcd and tgtd (a file-backed iSCSI LUN) on 127.0.0.1; node-a owns volume 1, write-back+1,
#   its copy on node-b. stager-perf writes 4 KiB blocks at random over 4 MiB (every block is
#   written again and again). tgtd is held (SIGSTOP) for a while so that node-a's log fills with
#   dirty data, then node-a's flash is failed (`stagerctl flash fail`: fault injection, every
#   command to it fails from then on) and tgtd resumes.
#   node-a's volume runs write-through at once (flash degraded); its log cannot be read back, so
#   after FLASH_HANDOVER_AFTER (2 s) it names node-b, whose copy the record says is in sync, the
#   rescuer (an epoch bump) and writes nothing to the SAN meanwhile; node-b destages its copy;
#   node-a skips past it and goes on write-through. Nothing by hand.
# Then: every block stager-perf saw acknowledged reads back through node-a (reads from the SAN)
# and from the SAN alone — so no older block node-b destaged landed over a newer write-through
# write (invariant 2). No command may hang; writes failed meanwhile with a retryable status (those
# waiting for the persisted watermark a dead flash never gives) are counted and reported.
# Prints the times from the failure: hand-over, copy on the SAN, node-a writing the SAN again.
# Needs tgtd, etcd, etcdctl, python3 and binaries built with the iscsi and cluster features
# (BIN=dir, default build/release). KEEP=1 keeps the work dir. Exit status 0 = pass.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-build/release}

work=$(mktemp -d /tmp/stager-flashfail.XXXXXX)
source tests/lib/cluster.sh
cluster_test cluster_flash_failure

start_etcd flashfail
prefix=/stager/flashfail
iqn=iqn.2026-11.dev.stager:flashfail
truncate -s 64M "$work/lun1.img"
start_tgtd "$iqn" 83 "$work/lun1.img"
san="iscsi://127.0.0.1:$iscsi_port/$iqn/1"
nqn=nqn.2026-11.dev.stager:flashfail

declare -A nvme fabric
for n in a b check; do nvme[$n]=$(free_port); fabric[$n]=$(free_port); done
declare -A core=([a]=0 [b]=1)
cluster_node_yaml a "${core[a]}" b
cluster_node_yaml b "${core[b]}" a
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
field_is() { [[ $(field "$1") == "$2" ]]; }
rescued() { [[ $(field rescued_unix_ms) =~ ^[1-9] ]]; }

start b
start a
wait_for 30 "volume 1 write-back+1 with node-b in sync" protected node-b
wait_for 10 "the record names node-b's copy in sync" field_is in_sync '["node-b"]'
echo "cluster_flash_failure: volume 1 write-back+1 on node-a, copy on node-b (in sync in the record)"

"$BIN/stager-perf" run --target "$target" --nsid 1 -q 8 -w randwrite -s 4k --range 0:4MiB -t 25 \
    --verify-state "$work/state.json" --quiet --name flash-failure > "$work/perf.log" 2>&1 &
writer=$!
sleep 3
kill -STOP "$tgtd_pid"
sleep 3
dirty=$(vol dirty_bytes)
t0=$(now)
ctl flash fail flash0 --socket "$work/a.sock" > /dev/null || fail "stagerctl flash fail"
sleep 1
kill -CONT "$tgtd_pid"
((dirty > 0)) || fail "node-a's log held nothing dirty when its flash failed: the race would not be tested"
# The steps are in the record's history with their times (they may all pass within a tick).
ended() { grep -q "is back and skipped past the rescue by node-b" <<< "$(record)"; }
wait_for 30 "(d) node-b rescues node-a's copy and node-a skips past it" ended
at() { # the time of the history entry containing $1, in seconds after t0
    record | python3 -c "import json,sys; h=[t for t in json.load(sys.stdin)['history'] if '$1' in t['what']]; print(f\"{h[-1]['at_unix_ms']/1000 - $t0:.1f}\")"
}
handover=$(at "flash failed: node-b destages")
on_san=$(at "copy is on the SAN")
back=$(at "skipped past the rescue")
[[ $(vol effective_policy) == '"write-through"' && $(vol reason) == '"flash-degraded"' ]] ||
    fail "(d) node-a should serve write-through (flash degraded): $(vol effective_policy) $(vol reason)"
echo "PASS: (d) node-a's flash failed with $dirty bytes dirty: rescuer node-b named after ${handover} s, its copy on the SAN after ${on_san} s, node-a writing the SAN again (write-through) after ${back} s"

rc=0
wait "$writer" || rc=$?
writer=""
grep -q "verify state saved" "$work/perf.log" || { cat "$work/perf.log"; fail "stager-perf did not save its state"; }
# A command that never completes is a volume that is not online: the host would time out.
! grep -q "no response within" "$work/perf.log" || { cat "$work/perf.log"; fail "(d) a command hung on node-a"; }
errors=$(awk '$1 == "all" { print $NF }' "$work/perf.log" | tail -1)
echo "cluster_flash_failure: stager-perf exit status $rc; ${errors:-0} command(s) failed with a retryable status (a host retries them; the verify counts their writes as in flight)"
"$BIN/stager-perf" verify --target "$target" --nsid 1 --verify-state "$work/state.json" > "$work/verify-a.log" 2>&1 ||
    { cat "$work/verify-a.log"; fail "an acknowledged block does not read back through node-a"; }
echo "PASS: every acknowledged block reads back through node-a (its flash failed): $(tail -1 "$work/verify-a.log")"
stop a KILL
start check
"$BIN/stager-perf" verify --target "$san_only" --nsid 1 --verify-state "$work/state.json" > "$work/verify-san.log" 2>&1 ||
    { cat "$work/verify-san.log"; fail "the SAN alone does not hold every acknowledged write (older data over newer?)"; }
echo "PASS: the SAN alone holds every acknowledged write, none older over newer (0 lost): $(tail -1 "$work/verify-san.log")"
stop check TERM
echo "cluster_flash_failure: PASS"
