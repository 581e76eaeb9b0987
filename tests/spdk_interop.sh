#!/usr/bin/env bash
# SPDK's userspace NVMe/TCP host (spdk_nvme_perf, v24.09) against stagerd: every queue depth
# from 1 to 128, reads and writes with in-capsule data (4 KiB) and through R2T (64 KiB and
# 128 KiB), header and data digests, and several I/O queues. Each run must finish without an
# error line from the host, with I/O done, and stagerd must log no warning or error.
# spdk_nvme_perf cannot check data; stager-perf --verify does that in the other tests.
#
# Where SPDK comes from, in this order:
#   SPDK_DIR=DIR           an SPDK build with DIR/build/bin/spdk_nvme_perf (e.g. /opt/spdk-peer)
#   SPDK_PEER_KIT=DIR      a directory with build.sh and SPDK's tarball (the shared peer kit,
#                          found at ../shared/peers/spdk or /work/shared/peers/spdk when unset):
#                          built once into build/spdk-peer (about 2-3 minutes on 2 cores, and
#                          Debian packages through apt-get, as root)
# Neither: the test says so and is skipped (exit 0, "SKIP" line) — SPDK is in no registry.
# STAGERD=path overrides the stagerd binary (default build/release/stagerd). Never commits or
# installs anything of SPDK into the repository; the build stays under build/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
STAGERD=${STAGERD:-build/release/stagerd}
[[ -x $STAGERD ]] || { echo "spdk_interop: $STAGERD missing (cargo build --release)"; exit 1; }

perf=""
if [[ -n ${SPDK_DIR:-} ]]; then
    perf=$SPDK_DIR/build/bin/spdk_nvme_perf
    [[ -x $perf ]] || { echo "spdk_interop: SPDK_DIR=$SPDK_DIR has no build/bin/spdk_nvme_perf"; exit 1; }
else
    kit=${SPDK_PEER_KIT:-}
    if [[ -z $kit ]]; then
        for k in ../shared/peers/spdk /work/shared/peers/spdk; do
            [[ -x $k/build.sh ]] && { kit=$k; break; }
        done
    fi
    if [[ -z $kit ]]; then
        echo "SKIP: spdk_interop: no SPDK (set SPDK_DIR to a build, or SPDK_PEER_KIT to the peer kit)"
        exit 0
    fi
    dest=$PWD/build/spdk-peer
    if [[ ! -x $dest/build/bin/spdk_nvme_perf ]]; then
        echo "spdk_interop: building SPDK's spdk_nvme_perf from $kit into $dest (once; ~2-3 minutes)"
        t0=$(date +%s)
        if ! "$kit/build.sh" "$dest" > build/spdk-peer-build.log 2>&1; then
            tail -30 build/spdk-peer-build.log
            echo "spdk_interop: building SPDK failed; see build/spdk-peer-build.log"
            exit 1
        fi
        echo "spdk_interop: built in $(($(date +%s) - t0)) s"
    fi
    perf=$dest/build/bin/spdk_nvme_perf
fi

work=$(mktemp -d /tmp/stager-spdk.XXXXXX)
pid=""
cleanup() {
    [[ -n $pid ]] && kill "$pid" 2> /dev/null && wait "$pid" 2> /dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
nqn=nqn.2026-11.dev.stager:spdk-interop
cat > "$work/stagerd.yaml" <<EOF
reactors: { cores: [0], idle_poll_us: 200 }
logging: { level: info }
transport: { max_queue_depth: 128, max_io_queues: 8, in_capsule_data_bytes: 8KiB }
listeners: [{ name: tcp0, address: "127.0.0.1:$port" }]
subsystems:
  - nqn: $nqn
    allow_any_host: true
    namespaces:
      - nsid: 1
        backend: { kind: memory, size: 256MiB, block_size: 512 }
EOF
"$STAGERD" --config "$work/stagerd.yaml" > "$work/stagerd.log" 2>&1 &
pid=$!
for _ in $(seq 100); do (exec 3<> "/dev/tcp/127.0.0.1/$port") 2> /dev/null && break; sleep 0.1; done
kill -0 "$pid" 2> /dev/null || { cat "$work/stagerd.log"; echo "FAIL: stagerd did not start"; exit 1; }

runs=0
# run NAME ARGS...: one spdk_nvme_perf run on CPU 1, one second, without hugepages.
run() {
    local name=$1
    shift
    local out=$work/$name.out
    runs=$((runs + 1))
    if ! timeout 60 "$perf" --no-huge -s 512 -c 0x2 -t 1 \
        -r "trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:$port subnqn:$nqn" "$@" > "$out" 2>&1; then
        tail -20 "$out"
        echo "FAIL: spdk_interop: $name: spdk_nvme_perf failed (exit status above)"
        exit 1
    fi
    if grep -qiE "error|fail|timed out|abort" "$out"; then
        grep -iE "error|fail|timed out|abort" "$out" | head -5
        echo "FAIL: spdk_interop: $name: spdk_nvme_perf reported errors"
        exit 1
    fi
    local iops
    iops=$(awk '/^Total/ {print int($3)}' "$out")
    if [[ -z $iops || $iops -lt 100 ]]; then
        tail -20 "$out"
        echo "FAIL: spdk_interop: $name: ${iops:-no} IOPS (a stall?)"
        exit 1
    fi
    printf 'spdk_interop: %-28s %9s IOPS\n' "$name" "$iops"
}

for qd in 1 2 4 8 16 32 64 128; do
    run "randrw-4k-qd$qd" -q "$qd" -o 4096 -w randrw -M 50
done
for qd in 1 32 128; do
    run "randwrite-64k-r2t-qd$qd" -q "$qd" -o 65536 -w randwrite
    run "rw-128k-r2t-qd$qd" -q "$qd" -o 131072 -w randrw -M 50
done
for qd in 1 32 128; do
    run "randrw-4k-digests-qd$qd" -q "$qd" -o 4096 -w randrw -M 50 -H -I
    run "write-64k-digests-qd$qd" -q "$qd" -o 65536 -w write -H -I
done
run "randrw-4k-4queues-qd32" -q 32 -o 4096 -w randrw -M 50 -P 4
run "randrw-16k-4queues-qd128-digests" -q 128 -o 16384 -w randrw -M 50 -P 4 -H -I

kill "$pid"
wait "$pid" 2> /dev/null || true
pid=""
if grep -E " (WARN|ERROR) " "$work/stagerd.log"; then
    echo "FAIL: spdk_interop: stagerd logged warnings or errors (above)"
    exit 1
fi
grep "transport:" "$work/stagerd.log" | sed 's/^.*INFO /spdk_interop: stagerd: /' || true
echo "PASS: spdk_interop: $runs spdk_nvme_perf runs against stagerd (QD 1-128, in-capsule and R2T writes, digests, 4 I/O queues), no errors"
