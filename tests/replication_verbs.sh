#!/usr/bin/env bash
# Replication over real RDMA (issue 9): two QEMU guests (TCG, Debian's kernel) joined by
# Soft-RoCE, each running a stagerd node with the `verbs` fabric on rxe0. node-a (guest A) owns
# a write-back+1 volume whose copy lives on node-b (guest B); scripts/guest/replication-verbs-test.sh
# runs in both guests:
#   1. node-b serves; node-a starts and its volume reaches `in-sync` with node-b;
#   2. stager-perf writes to the volume in guest A with --verify-state for a few seconds and
#      `stager-perf verify` reads every acknowledged block back;
#   3. node-b's copy is durable at least up to the writes acknowledged, and rxe0 in guest B
#      received the RoCE packets that carried them;
#   4. node-a is killed with SIGKILL, node-b stopped; `stagerctl flash inspect` on node-b's flash
#      lists the copy, `stagerctl flash destage` puts it on a fresh SAN file (with a
#      node-a-like configuration naming that file), and a write-through stagerd over that SAN
#      alone passes `stager-perf verify` with node-a's verify state;
#   5. guest A destages node-a's own flash to a fresh SAN file too; this script compares the
#      SHA-256 both guests print: the replica's copy rebuilds exactly what node-a's log held.
# node-a's own SAN is read-only, so no destage moves the watermark and node-b's copy must hold
# every write (the guest script explains). Correctness only: timings under TCG mean nothing.
#
# Builds stagerd, stagerctl and stager-perf with `--features stager-target/verbs` (and
# stager-target/iscsi when libiscsi-dev is installed, so that build/release keeps serving the
# iSCSI tests). As root it installs the verbs build packages (tests/rdma_verbs.sh
# --packages-only) and the guest tools (scripts/guest/build.sh).
#
# Environment:
#   GUEST_TIMEOUT   seconds for the guests (default 200)
#   GUEST_VERBOSE=1 stream both consoles while they run
#   WRITE_SECONDS   how long stager-perf writes (default 5)
# Logs go to build/guest/logs/replication-verbs-<timestamp>/ (node-a.log, node-b.log, qemu-*.log).
# Exit status: 0 = both guests passed and their SANs match.
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"
GUEST_TIMEOUT=${GUEST_TIMEOUT:-200}
log() { echo "replication_verbs: $*"; }
T_START=$(date +%s)

tests/rdma_verbs.sh --packages-only
features=stager-target/verbs
dpkg -s libiscsi-dev > /dev/null 2>&1 && features+=,stager-target/iscsi
log "building stagerd, stagerctl and stager-perf with the verbs fabric (cargo build --release --workspace --bins --features $features)"
cargo build --release --workspace --bins --features "$features" --quiet
BIN=build/release
grep -q libibverbs <<< "$(ldd "$BIN/stagerd")" || { log "FAIL: $BIN/stagerd was built without the verbs fabric"; exit 1; }

# shellcheck source=scripts/guest/rdma-pair.sh
. scripts/guest/rdma-pair.sh
rdma_pair_setup replication-verbs

rdma_pair_stage "$TMP/stage" scripts/guest/replication-verbs-test.sh "$BIN/stagerd" "$BIN/stagerctl" "$BIN/stager-perf"
rdma_pair_initrd "$TMP/stage" "$TMP/initrd.img"

PORT=$(rdma_pair_free_port)
append="console=ttyS0 panic=-1 quiet stager.net=0 stager.test=/guest/replication-verbs-test.sh"
append+=" stager.seconds=${WRITE_SECONDS:-5}"
log "booting two $GUEST_KVER guests (TCG, 768 MiB, 1 vCPU each) on a socket network at 127.0.0.1:$PORT"
rdma_pair_boot node-b "$TMP/initrd.img" 768 "listen=127.0.0.1:$PORT" 52:54:00:5a:01:02 \
    "$append stager.role=replica stager.ip=10.12.0.2 stager.peerip=10.12.0.1"
rdma_pair_wait_listen "$PORT"
rdma_pair_boot node-a "$TMP/initrd.img" 768 "connect=127.0.0.1:$PORT" 52:54:00:5a:01:01 \
    "$append stager.role=source stager.ip=10.12.0.1 stager.peerip=10.12.0.2"
rdma_pair_wait

ok=1
rdma_pair_report "PASS|FAIL|SAN-SHA256|source: node-b durable|replica: node-a acknowledged" || ok=0
sha() { tr -d '\r' < "$LOGDIR/$1.log" | grep -a -oE '^test: SAN-SHA256 [0-9a-f]{64}' | tail -n1 | cut -d' ' -f3; }
sha_a=$(sha node-a)
sha_b=$(sha node-b)
if ((ok)); then
    if [[ -z $sha_a || $sha_a != "$sha_b" ]]; then
        ok=0
        log "FAIL: the SAN rebuilt from node-b's copy (${sha_b:-none}) differs from node-a's own log (${sha_a:-none})"
    else
        log "the SAN rebuilt from node-b's copy equals the one from node-a's own log (SHA-256 $sha_a)"
    fi
fi
if ((ok)); then
    log "PASS: write-back+1 over verbs (Soft-RoCE) between two $GUEST_KVER guests ($(($(date +%s) - T_START)) s; logs $LOGDIR)"
    exit 0
fi
log "FAIL (logs $LOGDIR)"
exit 1
