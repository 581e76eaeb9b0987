#!/bin/sh
# Sourced INSIDE a QEMU guest (busybox sh) by the tests that need Soft-RoCE between two guests
# (rdma-verbs-test.sh, replication-verbs-test.sh): `rxe_up` loads rdma_rxe from /rdma-modules
# (the host wrote their load order: crc32 providers first, or `rdma link add` fails with "No
# such file or directory"), gives eth0 the address $STAGER_IP/24, creates rxe0 on it and waits
# until its port is ACTIVE. Calls the sourcing script's `fail` on any error.

rxe_up() {
    while read -r ko; do
        [ -n "$ko" ] || continue
        out=$(insmod "/rdma-modules/$ko" 2>&1) || case $out in
            *"File exists"*) ;;
            *) fail "insmod $ko: $out" ;;
        esac
    done </rdma-modules/order

    ip link set lo up
    n=0
    while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
    ip link set eth0 up || fail "no eth0"
    ip addr add "$STAGER_IP/24" dev eth0 || fail "ip addr add $STAGER_IP"
    rdma link add rxe0 type rxe netdev eth0 || fail "rdma link add rxe0 type rxe netdev eth0"
    n=0
    while [ "$(cat /sys/class/infiniband/rxe0/ports/1/state 2>/dev/null)" != "4: ACTIVE" ] && [ $n -lt 100 ]; do
        sleep 0.1
        n=$((n + 1))
    done
    say "$ROLE: rxe0 on eth0 ($STAGER_IP): $(cat /sys/class/infiniband/rxe0/ports/1/state 2>/dev/null)"
    say "$ROLE: gids: $(cat /sys/class/infiniband/rxe0/ports/1/gids/0 /sys/class/infiniband/rxe0/ports/1/gids/1 2>/dev/null | tr '\n' ' ')"
}

# Soft-RoCE's own packet counter (RoCEv2 packets rxe0 received: UDP port 4791 only, never the
# TCP of a set-up connection).
rxe_rcvd_pkts() {
    cat /sys/class/infiniband/rxe0/ports/1/hw_counters/rcvd_pkts 2>/dev/null || echo 0
}
