#!/bin/sh
# Runs INSIDE a QEMU guest (busybox sh), started by tests/rdma_verbs.sh: one of the two nodes of
# the verbs fabric test. Loads Soft-RoCE (rdma_rxe) from /rdma-modules (crc32 first, or `rdma link
# add` fails), gives eth0 its address, creates rxe0 on it, and runs stager-fabric-probe over real
# RDMA WRITE / WRITE WITH IMMEDIATE to the other guest.
#
# Parameters (kernel command line stager.KEY=VALUE, exported by /init as STAGER_KEY):
#   STAGER_ROLE    server | client
#   STAGER_IP      this guest's address on eth0 (a /24 shared by the two guests only)
#   STAGER_PEERIP  the other guest's address
#   STAGER_ARGS    extra probe arguments, commas for spaces (client: rounds, sizes, ...)
# Exit status 0 = the probe said PASS; the reason of a failure goes to $STAGER_RESULT_FILE.

RESULT_FILE=${STAGER_RESULT_FILE:-/run/guest-result}
ROLE=${STAGER_ROLE:-server}
PORT=7471
PROBE=/usr/local/bin/stager-fabric-probe
say() { echo "test: $*"; }
fail() {
    say "FAIL: $*"
    echo "$ROLE: $*" >"$RESULT_FILE"
    say "---- dmesg (rxe, infiniband)"
    dmesg | grep -iE "rxe|infiniband|rdma" | tail -n 15 | sed 's/^/test:   /'
    exit 1
}

# shellcheck disable=SC1091 # scripts/guest/rxe.sh, packed by scripts/guest/rdma-pair.sh
. /guest/rxe.sh
rxe_up

ARGS=$(echo "${STAGER_ARGS:-}" | tr , ' ')
common="--fabric verbs --device rxe0 --timeout-secs 150"
if [ "$ROLE" = server ]; then
    # shellcheck disable=SC2086
    $PROBE $common --node server --peer client server --listen "$STAGER_IP:$PORT" --region-mib 4 \
        >/tmp/probe.log 2>&1
else
    # Wait until the server guest answers ARP/ICMP: it boots at the same time as this one.
    n=0
    until ping -c 1 -W 1 "$STAGER_PEERIP" >/dev/null 2>&1 || [ $n -ge 60 ]; do n=$((n + 1)); done
    # shellcheck disable=SC2086
    $PROBE $common --node client --peer server client --connect "$STAGER_PEERIP:$PORT" \
        --connect-retry-secs 90 $ARGS >/tmp/probe.log 2>&1
fi
rc=$?
sed 's/^/test: /' /tmp/probe.log
[ $rc = 0 ] || fail "stager-fabric-probe $ROLE exited $rc: $(grep -m1 FAIL /tmp/probe.log)"
grep -q "^probe-$ROLE: PASS" /tmp/probe.log || fail "no PASS line from the probe $ROLE"
say "PASS: probe $ROLE over verbs (rxe0)"
