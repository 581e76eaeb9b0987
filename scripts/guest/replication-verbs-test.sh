#!/bin/sh
# Runs INSIDE a QEMU guest (busybox sh), started by tests/replication_verbs.sh: one of the two
# stagerd nodes of a write-back+1 volume replicated over real RDMA (Soft-RoCE, fabric `verbs`).
#
#   source  (node-a): owns volume 1, write-back+1 with its copy on node-b. Waits until node-b
#           serves, starts node-a, waits until the replica is in sync, writes with
#           `stager-perf run --verify-state` for a few seconds and reads everything back with
#           `stager-perf verify`; hands the number of acknowledged writes and the verify state
#           to node-b's guest; kills node-a with SIGKILL; destages its own flash to a fresh SAN
#           file and prints the file's SHA-256.
#   replica (node-b): keeps the copy. Once node-a's writes are acknowledged: its copy is durable
#           at least up to them and rxe0 received the RoCE packets that carried them; stops
#           node-b, `stagerctl flash inspect` lists the copy, `stagerctl flash destage` (with a
#           node-a-like configuration naming a fresh SAN file) puts it on that SAN, prints the
#           file's SHA-256, and a write-through stagerd over that SAN alone passes
#           `stager-perf verify` with node-a's verify state.
# The host compares the two SHA-256 lines: the replica's copy, which only RDMA writes filled,
# rebuilds exactly the volume node-a acknowledged.
#
# node-a's SAN is a read-only loop device: every destage attempt fails (the volume keeps its
# dirty data in flash and stays write-back, DESIGN.md "SAN down → retry with back-off"), so no
# watermark ever reaches node-b and its copy must hold every acknowledged write, not only those
# newer than the last destage. The test checks that nothing reached that SAN.
#
# The guests talk outside the fabric over plain HTTP on eth0 (busybox httpd and wget): each
# serves $SHARE, the other polls for a file there. In order: B `ready` (node-b serves);
# A `state.bin` + `written` (the verify state, the writes acknowledged and the bytes sent);
# B `received`; A `killed` (node-a is gone: B stops node-b only now); at the end each publishes
# `done` and stays up until the other is done or gone. Either side publishes `failed` when it
# fails, and the other stops waiting.
#
# Parameters (kernel command line stager.KEY=VALUE, exported by /init as STAGER_KEY):
#   STAGER_ROLE     source | replica
#   STAGER_IP       this guest's address on eth0 (a /24 shared by the two guests only)
#   STAGER_PEERIP   the other guest's address
#   STAGER_SECONDS  how long stager-perf writes (source; default 5)
# Exit status 0 = pass; the reason of a failure goes to $STAGER_RESULT_FILE.

RESULT_FILE=${STAGER_RESULT_FILE:-/run/guest-result}
ROLE=${STAGER_ROLE:-source}
BIN=/usr/local/bin
W=/tmp/replication
SHARE=$W/share
HTTP_PORT=8080
FABRIC_PORT=4520
NQN=nqn.2026-11.dev.stager:replication-verbs
TARGET=tcp://127.0.0.1:4420/$NQN
SECRET="replication over verbs test secret"
SAN_BYTES=$((16 << 20))
FLASH_BYTES=$((64 << 20))
# Polls of the other guest's files: how long each wait may take (TCG: booting, starting a
# stagerd and a few seconds of writes all take several times longer than on a host).
PEER_WAIT_SECS=150
STAGERD_PID=""
mkdir -p "$SHARE"
export RUST_BACKTRACE=1

# shellcheck disable=SC1091 # scripts/guest/rxe.sh, packed by scripts/guest/rdma-pair.sh
. /guest/rxe.sh

say() { echo "test: $*"; }
fail() {
    say "FAIL: $*"
    echo "$ROLE: $*" >"$RESULT_FILE"
    echo "$*" >"$SHARE/failed.tmp" && mv "$SHARE/failed.tmp" "$SHARE/failed"
    [ -n "$STAGERD_PID" ] && kill -9 "$STAGERD_PID" 2>/dev/null
    for f in "$W"/*.log; do
        [ -f "$f" ] || continue
        say "---- last lines of $f"
        tail -n 25 "$f" | sed 's/^/test:   /'
    done
    say "---- dmesg (rxe, infiniband)"
    dmesg | grep -iE "rxe|infiniband|rdma" | tail -n 15 | sed 's/^/test:   /'
    exit 1
}
pass() { say "PASS: $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }

# ------------------------------------------------------------- the other guest --
publish() { # $1 name, $2 file: atomically, so the other guest never fetches half of it
    cp "$2" "$SHARE/$1.tmp" && mv "$SHARE/$1.tmp" "$SHARE/$1"
}
fetch() { # $1 name, $2 output file. (Debian's static busybox wget crashes with -T.)
    timeout 10 wget -q -O "$2" "http://$STAGER_PEERIP:$HTTP_PORT/$1" 2>/dev/null
}
# $1 name, $2 output file, $3 what we wait for (for the failure message).
await() {
    deadline=$(($(cut -d. -f1 /proc/uptime) + PEER_WAIT_SECS))
    while ! fetch "$1" "$2"; do
        if fetch failed "$W/peer-failed"; then
            fail "the other guest failed while we waited for $3: $(cat "$W/peer-failed")"
        fi
        [ "$(cut -d. -f1 /proc/uptime)" -lt "$deadline" ] || fail "no $3 from the other guest within $PEER_WAIT_SECS s"
        sleep 0.5
    done
}
# At the end: stays up (serving $SHARE) until the other guest is done too, or gone. It may still
# need a file from here until it is done; once it is gone, it needs nothing.
linger() {
    echo "done" >"$W/done"
    publish "done" "$W/done"
    deadline=$(($(cut -d. -f1 /proc/uptime) + PEER_WAIT_SECS))
    while ! timeout 5 wget -q -O "$W/peer-done" "http://$STAGER_PEERIP:$HTTP_PORT/done" 2>"$W/wget.err"; do
        # Anything but "404 Not Found" (no answer within 5 s: a guest that powered off does not
        # refuse, it is silent) means no HTTP server answers: the other guest is gone.
        grep -q " 404 " "$W/wget.err" || return 0
        [ "$(cut -d. -f1 /proc/uptime)" -lt "$deadline" ] || fail "the other guest did not finish within $PEER_WAIT_SECS s"
        sleep 0.5
    done
}

# ------------------------------------------------------------------- stagerd --
# $1 config, $2 log name. Waits until it serves.
start_stagerd() {
    "$BIN/stagerd" --config "$1" >"$W/stagerd-$2.log" 2>&1 &
    STAGERD_PID=$!
    n=0
    while ! grep -q "stagerd is serving" "$W/stagerd-$2.log" 2>/dev/null; do
        kill -0 "$STAGERD_PID" 2>/dev/null || fail "stagerd exited at start ($2)"
        n=$((n + 1))
        [ $n -lt 600 ] || fail "stagerd did not come up in 60 s ($2)"
        sleep 0.1
    done
}
stop_stagerd() {
    kill -TERM "$STAGERD_PID" 2>/dev/null
    n=0
    while kill -0 "$STAGERD_PID" 2>/dev/null && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
    kill -0 "$STAGERD_PID" 2>/dev/null && fail "stagerd did not stop within 30 s of SIGTERM"
    wait "$STAGERD_PID" 2>/dev/null
    STAGERD_PID=""
}
status_json() { # $1 management socket
    "$BIN/stagerctl" status --json --socket "$1" 2>/dev/null
}
# The first number after "KEY": in a JSON text on stdin, after the first line matching $2 if
# given (stagerctl prints one key per line).
json_num() {
    awk -v key="\"$1\":" -v after="${2:-}" '
        after != "" && !seen { if (index($0, after)) seen = 1; next }
        index($0, key) { gsub(/[^0-9]/, "", $2); print $2; exit }'
}

# A loop device over a new file in this guest's tmpfs: a block device takes O_DIRECT, which
# the flash driver and `stagerctl flash` use; tmpfs files refuse it. $1 file, $2 bytes, $3 -r
# for read-only. Sets LOOP to the device.
attach_loop() {
    truncate -s "$2" "$1" || fail "truncate $1"
    LOOP=$(losetup -f) || fail "no free loop device"
    # shellcheck disable=SC2086
    losetup $3 "$LOOP" "$1" || fail "losetup $3 $LOOP $1"
}

# ------------------------------------------------------------------- configs --
# A node's configuration without volumes: $1 file, $2 its id, $3 its peer's, $4 flash path.
node_config() {
    cat >"$1" <<EOF
reactors: { cores: [0], idle_poll_us: 200 }
destage: { idle_poll_us: 50 }
logging: { level: info }
listeners: [{ name: tcp0, address: "127.0.0.1:4420" }]
management: { socket: $W/$2.sock }
node:
  id: $2
  fabric: { kind: verbs, device: rxe0, listen: "$STAGER_IP:$FABRIC_PORT", secret: "$SECRET", peer_timeout_ms: 3000, ring_size: 8MiB }
  peers:
    - { id: $3, address: "$STAGER_PEERIP:$FABRIC_PORT" }
flash:
  - { name: flash0, path: $4, cache_percent: 10 }
EOF
}
# node-a's configuration; the offline destages use it with another SAN ($3) and flash ($2).
# $1 file, $2 flash path, $3 the SAN's YAML.
node_a_config() {
    node_config "$1" node-a node-b "$2"
    cat >>"$1" <<EOF
subsystems:
  - nqn: $NQN
    allow_any_host: true
    namespaces:
      - nsid: 1
        backend: { kind: volume, id: 1, flash: flash0, policy: write-back+1, replicas: [node-b], san: $3 }
EOF
}
# The SAN alone, write-through without read cache, behind a fresh flash file. $1 file, $2 SAN.
check_config() {
    cat >"$1" <<EOF
reactors: { cores: [0], idle_poll_us: 200 }
logging: { level: info }
listeners: [{ name: tcp0, address: "127.0.0.1:4420" }]
flash:
  - { name: flash0, path: $W/check-flash.img, size: 16MiB, direct: false }
subsystems:
  - nqn: $NQN
    allow_any_host: true
    namespaces:
      - nsid: 1
        backend: { kind: volume, id: 1, flash: flash0, policy: write-through, read_cache: false,
                   san: { kind: file, path: $2, direct: false } }
EOF
}
fresh_san_yaml() { # $1 file (tmpfs: no O_DIRECT)
    echo "{ kind: file, path: $1, size: $SAN_BYTES, direct: false }"
}

# $1 flash device, $2 config, $3 label: destage the device offline to the SAN the config names.
destage_offline() {
    if ! "$BIN/stagerctl" flash destage "$1" --config "$2" >"$W/destage-$3.log" 2>&1; then
        fail "stagerctl flash destage $1 ($3): $(tail -n 3 "$W/destage-$3.log" | tr '\n' ' ')"
    fi
    say "$ROLE: $(tr '\r' '\n' <"$W/destage-$3.log" | grep -a "destaged" | tail -n 1)"
}
# The line the host compares between the two guests.
print_san_sha256() { # $1 SAN file
    say "SAN-SHA256 $(sha256sum "$1" | cut -d' ' -f1)"
}

# ------------------------------------------------------------------- source --
run_source() {
    attach_loop "$W/flash.img" $FLASH_BYTES
    flash=$LOOP
    attach_loop "$W/san.img" $SAN_BYTES -r
    san=$LOOP
    node_a_config "$W/node-a.yaml" "$flash" "{ kind: file, path: $san }"
    say "source: flash $flash, SAN $san (read-only: destage cannot move the watermark)"

    await ready "$W/peer-ready" "node-b serving"
    start_stagerd "$W/node-a.yaml" node-a
    t0=$(uptime_s)
    n=0
    until status_json "$W/node-a.sock" >"$W/status.json" &&
        grep -q '"state": "in-sync"' "$W/status.json" &&
        grep -q '"effective_policy": "write-back"' "$W/status.json"; do
        n=$((n + 1))
        [ $n -lt 1200 ] || { cat "$W/status.json"; fail "volume 1 never ran write-back with node-b in sync (120 s)"; }
        sleep 0.1
    done
    pass "source: node-b in sync over verbs after $(awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN { printf "%.1f", b - a }') s"

    # --poll sleep: busy polling would starve stagerd on this one-vCPU guest.
    if ! "$BIN/stager-perf" run --target "$TARGET" -q 4 -w randwrite -s 4k --range 0:8MiB \
        -t "${STAGER_SECONDS:-5}" --verify-state "$W/state.bin" --poll sleep --quiet --name verbs \
        >"$W/perf-run.log" 2>&1; then
        cat "$W/perf-run.log"
        fail "stager-perf run failed"
    fi
    written=$(grep -oE "[0-9]+ written" "$W/perf-run.log" | head -n 1 | cut -d' ' -f1)
    [ "${written:-0}" -gt 0 ] || { cat "$W/perf-run.log"; fail "stager-perf acknowledged no writes"; }
    grep -E "^ +all|verify:" "$W/perf-run.log" | sed 's/^/test:   /'
    if ! "$BIN/stager-perf" verify --target "$TARGET" --verify-state "$W/state.bin" --poll sleep >"$W/perf-verify.log" 2>&1; then
        cat "$W/perf-verify.log"
        fail "stager-perf verify through node-a failed"
    fi
    pass "source: $written writes acknowledged, all read back: $(tail -n 1 "$W/perf-verify.log")"

    status_json "$W/node-a.sock" >"$W/status.json" || fail "stagerctl status"
    durable=$(json_num durable_seq '"replicas"' <"$W/status.json")
    bytes_sent=$(json_num bytes_sent '"replicas"' <"$W/status.json")
    records=$(json_num records_sent '"replicas"' <"$W/status.json")
    persisted=$(json_num persisted_watermark <"$W/status.json")
    say "source: node-b durable to seq $durable, $records records, $bytes_sent bytes sent over verbs; persisted watermark $persisted"
    [ "${durable:-0}" -ge "$written" ] || fail "node-b is durable to seq ${durable:-?}, below the $written writes acknowledged"
    [ "${bytes_sent:-0}" -ge $((written * 4096)) ] || fail "only ${bytes_sent:-?} bytes went to node-b for $written 4 KiB writes"
    [ "$persisted" = 0 ] || fail "the read-only SAN took a destage (watermark $persisted): the replica's copy is not all there is"

    echo "$written $bytes_sent" >"$W/written"
    publish state.bin "$W/state.bin"
    publish written "$W/written"
    # node-b's guest needs this guest's HTTP server until it has the verify state.
    await received "$W/peer-received" "the other guest's receipt of the verify state"

    kill -9 "$STAGERD_PID"
    wait "$STAGERD_PID" 2>/dev/null
    STAGERD_PID=""
    say "source: node-a killed with SIGKILL"
    echo killed >"$W/killed"
    publish killed "$W/killed"

    # Nothing of the volume reached node-a's SAN: its blocks are all still zero.
    zero=$(head -c $SAN_BYTES /dev/zero | sha256sum | cut -d' ' -f1)
    [ "$(sha256sum "$san" | cut -d' ' -f1)" = "$zero" ] || fail "node-a's read-only SAN changed"

    # What node-a's own log holds, on a fresh SAN: the reference for the replica's copy.
    node_a_config "$W/destage-a.yaml" "$flash" "$(fresh_san_yaml "$W/san-a.img")"
    destage_offline "$flash" "$W/destage-a.yaml" node-a
    [ "$(sha256sum "$W/san-a.img" | cut -d' ' -f1)" != "$zero" ] || fail "node-a's log destaged nothing"
    print_san_sha256 "$W/san-a.img"
    pass "source: node-a's own log destaged to a fresh SAN"
}

# ------------------------------------------------------------------ replica --
run_replica() {
    attach_loop "$W/flash.img" $FLASH_BYTES
    flash=$LOOP
    node_config "$W/node-b.yaml" node-b node-a "$flash"
    start_stagerd "$W/node-b.yaml" node-b
    rcvd0=$(rxe_rcvd_pkts)
    echo ready >"$W/ready"
    publish ready "$W/ready"
    say "replica: node-b serving on $STAGER_IP:$FABRIC_PORT (verbs, rxe0); flash $flash"

    await written "$W/written" "node-a's acknowledged writes"
    fetch state.bin "$W/state.bin" || fail "cannot fetch the verify state"
    publish received "$W/written"
    read -r written bytes_sent <"$W/written"
    rcvd=$(($(rxe_rcvd_pkts) - rcvd0))
    say "replica: node-a acknowledged $written writes ($bytes_sent bytes to node-b); rxe0 received $rcvd RoCE packets"
    # Each packet carries at most one path MTU (4096 bytes at most) of an RDMA write.
    if [ "$rcvd" -lt $((bytes_sent / 4096)) ] || [ "$rcvd" -eq 0 ]; then
        fail "rxe0 received $rcvd packets: too few for $bytes_sent bytes of RDMA writes"
    fi

    status_json "$W/node-b.sock" >"$W/status.json" || fail "stagerctl status"
    grep -q '"source": "node-a"' "$W/status.json" || { cat "$W/status.json"; fail "node-b shows no copy for node-a"; }
    durable=$(json_num durable_seq '"copies"' <"$W/status.json")
    watermark=$(json_num watermark '"copies"' <"$W/status.json")
    copy_bytes=$(json_num bytes '"copies"' <"$W/status.json")
    [ "${durable:-0}" -ge "$written" ] || { cat "$W/status.json"; fail "node-b's copy is durable to seq ${durable:-?}, below the $written writes acknowledged"; }
    pass "replica: node-b's copy of volume 1 is durable to seq $durable (>= $written acknowledged), $copy_bytes bytes above watermark $watermark"

    await killed "$W/peer-killed" "node-a's end"
    stop_stagerd
    say "replica: node-b stopped after node-a was killed"
    "$BIN/stagerctl" flash inspect "$flash" >"$W/inspect.log" 2>&1 || fail "stagerctl flash inspect $flash: $(cat "$W/inspect.log")"
    sed 's/^/test:   /' "$W/inspect.log"
    grep -q "copy of volume 1 for node node-a" "$W/inspect.log" || fail "node-b's flash lists no copy of volume 1"

    # node-a's configuration as node-b's guest can have it: node-a's volume and a fresh SAN
    # file here (its flash line names this device; only the SANs matter to a destage).
    node_a_config "$W/destage-b.yaml" "$flash" "$(fresh_san_yaml "$W/san-b.img")"
    destage_offline "$flash" "$W/destage-b.yaml" node-b
    print_san_sha256 "$W/san-b.img"

    check_config "$W/check.yaml" "$W/san-b.img"
    start_stagerd "$W/check.yaml" check
    if ! "$BIN/stager-perf" verify --target "$TARGET" --verify-state "$W/state.bin" --poll sleep >"$W/perf-verify.log" 2>&1; then
        cat "$W/perf-verify.log"
        fail "the SAN rebuilt from node-b's copy lacks acknowledged writes"
    fi
    stop_stagerd
    pass "replica: the SAN rebuilt from node-b's copy alone holds every acknowledged write: $(tail -n 1 "$W/perf-verify.log")"
}

rxe_up
modprobe loop 2>/dev/null
[ -e /dev/loop0 ] || fail "no loop devices (modprobe loop)"
httpd -p "$HTTP_PORT" -h "$SHARE" || fail "httpd"
case $ROLE in
    source) run_source ;;
    replica) run_replica ;;
    *) fail "unknown role $ROLE" ;;
esac
linger
