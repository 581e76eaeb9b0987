#!/usr/bin/env bash
# The verbs fabric over real RDMA: boots Debian's kernel in TWO QEMU guests (TCG) joined by a
# QEMU socket network (one listens on 127.0.0.1:PORT, the other connects), loads Soft-RoCE
# (rdma_rxe) in each, and runs stager-fabric-probe built with `--features stager-rdma/verbs`:
# the server in one guest, the client in the other, over RDMA WRITE and WRITE WITH IMMEDIATE
# on RC queue pairs. Fails unless both sides verify (scripts/guest/rdma-verbs-test.sh runs in
# the guests; scripts/guest/rdma-pair.sh stages and boots them, as for
# tests/replication_verbs.sh; docs/fabric.md explains the set-up).
#
# As root it installs what it needs with apt-get (and says so): libibverbs-dev, librdmacm-dev,
# ibverbs-providers, libclang-dev, clang, pkg-config (to build rdma-sys), iproute2 (`rdma`);
# scripts/guest/build.sh installs QEMU, busybox, cpio and kmod and fetches the kernel.
#
# `tests/rdma_verbs.sh --packages-only` installs the build packages and stops (scripts/test runs
# it before linting the verbs backend).
#
# Environment:
#   GUEST_TIMEOUT   seconds for the guests (default 240)
#   GUEST_VERBOSE=1 stream both consoles while they run
#   PROBE_ARGS      client arguments (default: 40 rounds of 4 writes, 20 messages, 200 streamed)
# Logs go to build/guest/logs/rdma-verbs-<timestamp>/ (server.log, client.log, qemu-*.log).
# Exit status: 0 = both guests said GUEST-RESULT: PASS.
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"
GUEST_TIMEOUT=${GUEST_TIMEOUT:-240}
PROBE_ARGS=${PROBE_ARGS:-"--rounds 40 --batch 4 --size 4096 --messages 20 --stream 200"}
log() { echo "rdma_verbs: $*"; }
T_START=$(date +%s)

# ---- host packages for building the verbs backend -------------------------------------------
missing=()
for p in libibverbs-dev librdmacm-dev ibverbs-providers libclang-dev clang pkg-config iproute2; do
    dpkg -s "$p" > /dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    [[ $(id -u) == 0 ]] || { log "missing packages ${missing[*]}: run as root, or apt-get install them"; exit 1; }
    log "installing with apt-get: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" > /dev/null
fi

[[ ${1:-} == --packages-only ]] && exit 0

log "building stager-fabric-probe with the verbs backend (cargo build --release -p stager-rdma --features verbs)"
cargo build --release -p stager-rdma --features verbs --bin stager-fabric-probe --quiet
PROBE=build/release/stager-fabric-probe

# shellcheck source=scripts/guest/rdma-pair.sh
. scripts/guest/rdma-pair.sh
rdma_pair_setup rdma-verbs

# ---- what the guests need beyond the base image ---------------------------------------------
rdma_pair_stage "$TMP/stage" scripts/guest/rdma-verbs-test.sh "$PROBE"
rdma_pair_initrd "$TMP/stage" "$TMP/initrd.img"

# ---- two guests on one socket network --------------------------------------------------------
PORT=$(rdma_pair_free_port)
append="console=ttyS0 panic=-1 quiet stager.net=0 stager.test=/guest/rdma-verbs-test.sh"
log "booting two $GUEST_KVER guests (TCG, 512 MiB, 1 vCPU each) on a socket network at 127.0.0.1:$PORT"
rdma_pair_boot server "$TMP/initrd.img" 512 "listen=127.0.0.1:$PORT" 52:54:00:5a:00:01 \
    "$append stager.role=server stager.ip=10.11.0.1 stager.peerip=10.11.0.2"
rdma_pair_wait_listen "$PORT"
rdma_pair_boot client "$TMP/initrd.img" 512 "connect=127.0.0.1:$PORT" 52:54:00:5a:00:02 \
    "$append stager.role=client stager.ip=10.11.0.2 stager.peerip=10.11.0.1 stager.args=$(tr ' ' , <<< "$PROBE_ARGS")"
rdma_pair_wait

if rdma_pair_report "probe-|PASS|FAIL"; then
    log "PASS: verbs fabric over Soft-RoCE between two $GUEST_KVER guests ($(($(date +%s) - T_START)) s; logs $LOGDIR)"
    exit 0
fi
log "FAIL (logs $LOGDIR)"
exit 1
