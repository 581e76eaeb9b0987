#!/usr/bin/env bash
# A lost SAN, end to end with real parts (issue 13, "the SAN is watched"):
#   tgtd serves a file-backed iSCSI LUN on 127.0.0.1; stagerd exports a write-back volume over it
#   without read cache (so reads of destaged blocks go to the SAN) and with
#   destage.san_timeout_ms = 2000. Under load — a verified writer and a verified reader of
#   destaged blocks — tgtd is
#   1. killed with SIGKILL, then restarted with the same backing file,
#   2. stopped with SIGSTOP (a hung SAN), then continued with SIGCONT.
#   Each time: `stagerctl status` shows the SAN unreachable (with a reason) within the deadline
#   plus slack, and no destage rate; every host command is answered (success or a retryable
#   status) within stager-perf's --timeout (the documented bound, log_full_wait_ms +
#   3 × san_timeout_ms, plus slack); when the SAN is back the dirty data destages and every
#   acknowledged block verifies with stager-perf's verify state files — through stagerd, and
#   finally from the SAN alone (a fresh flash device, write-through).
#   3. stagerd started with a hung SAN refuses the start and exits non-zero within
#   2 × san_timeout_ms plus slack, saying why, and a host that connected meanwhile is let go
#   (its connection reset) as it exits; with no SAN at all it refuses at once.
# Needs: tgtd/tgtadm (apt-get install tgt) and binaries built with the iscsi feature. BIN=dir
# overrides where the binaries are (default build/release). Prints PASS/FAIL lines; exits
# non-zero on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-build/release}
for b in stagerd stagerctl stager-perf; do
    [[ -x $BIN/$b ]] || { echo "san_outage: $BIN/$b missing (build with --features stager-target/iscsi)"; exit 1; }
done
command -v tgtd > /dev/null || { echo "san_outage: tgtd missing (apt-get install tgt)"; exit 1; }

SAN_TIMEOUT_MS=2000
LOG_FULL_WAIT_MS=1000
# Every host command is answered within log_full_wait_ms + 3 × san_timeout_ms (docs/operations.md);
# stager-perf fails its run if any one response takes longer than this (2 s of slack).
HOST_BOUND_S=$(((LOG_FULL_WAIT_MS + 3 * SAN_TIMEOUT_MS) / 1000 + 2))
# The SAN must show unreachable within one deadline, plus slack for polling.
DETECT_BOUND_MS=$((SAN_TIMEOUT_MS + 2000))

work=$(mktemp -d /tmp/stager-sanout.XXXXXX)
tgtd_pid="" stagerd_pid=""
cleanup() {
    [[ -n $stagerd_pid ]] && kill -9 "$stagerd_pid" 2> /dev/null || true
    [[ -n $tgtd_pid ]] && { kill -CONT "$tgtd_pid"; kill -9 "$tgtd_pid"; } 2> /dev/null || true
    wait 2> /dev/null || true
    if [[ ${KEEP:-0} == 1 ]]; then echo "san_outage: kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
fail() {
    echo "FAIL: $*"
    for f in "$work"/stagerd*.log; do echo "--- $f"; tail -30 "$f"; done
    exit 1
}
source tests/lib/san.sh
now_ms() { date +%s%3N; }

nvme_port=$(free_port)
iqn=iqn.2026-11.dev.stager:sanout
truncate -s 256M "$work/lun.img"
start_tgtd "$iqn" 211 "$work/lun.img"
echo "san_outage: tgtd on 127.0.0.1:$iscsi_port serving $work/lun.img"

# $1 config file, $2 flash file, $3 policy
write_config() {
    cat > "$1" << EOF
reactors: { cores: [0], idle_poll_us: 200 }
destage: { idle_poll_us: 50, san_timeout_ms: $SAN_TIMEOUT_MS, log_full_wait_ms: $LOG_FULL_WAIT_MS }
listeners: [{ name: tcp0, address: "127.0.0.1:$nvme_port" }]
management: { socket: $work/stagerd.sock }
flash:
  - { name: flash0, path: $2, size: 64MiB, cache_percent: 20 }
subsystems:
  - nqn: nqn.2026-11.dev.stager:sanout
    allow_any_host: true
    namespaces:
      - nsid: 1
        backend:
          kind: volume
          id: 3
          flash: flash0
          policy: $3
          read_cache: false
          san: { kind: iscsi, url: "iscsi://127.0.0.1:$iscsi_port/$iqn/1" }
EOF
}
write_config "$work/wb.yaml" "$work/flash.img" write-back
write_config "$work/wt.yaml" "$work/flash-fresh.img" write-through
target="tcp://127.0.0.1:$nvme_port/nqn.2026-11.dev.stager:sanout"
ctl() { "$BIN/stagerctl" "$@"; }

start_stagerd() { # $1 config, $2 log name
    "$BIN/stagerd" --config "$1" > "$work/$2.log" 2>&1 &
    stagerd_pid=$!
    for _ in $(seq 300); do
        ctl status --socket "$work/stagerd.sock" > /dev/null 2>&1 && return 0
        kill -0 "$stagerd_pid" 2> /dev/null || fail "stagerd exited at start ($2)"
        sleep 0.1
    done
    fail "stagerd did not come up ($2)"
}
stop_stagerd() {
    kill -TERM "$stagerd_pid"
    wait "$stagerd_pid" 2> /dev/null || true
    stagerd_pid=""
}
vol() { # $1 field of the volume's status
    ctl status --json --socket "$work/stagerd.sock" |
        python3 -c "import json,sys; print(json.load(sys.stdin)['devices'][0]['volumes'][0]['$1'])"
}
wait_clean() { # $1 label: the SAN is back, destage resumes, nothing dirty is left
    local until=$(($(now_ms) + 40000))
    while (($(now_ms) < until)); do
        [[ $(vol san_reachable) == True && $(vol dirty_bytes) == 0 ]] && return 0
        sleep 0.1
    done
    fail "$1: the SAN is back but $(vol dirty_bytes) dirty bytes did not destage (reachable: $(vol san_reachable))"
}
# A stager-perf run whose every command must be answered within HOST_BOUND_S; success or a
# retryable error status both count as answered. $1 label, rest: workload arguments.
perf_run() {
    local label=$1
    shift
    "$BIN/stager-perf" run --target "$target" --timeout "$HOST_BOUND_S" --quiet --name "$label" "$@" \
        > "$work/perf-$label.log" 2>&1 || true
}
check_answered() { # $1 label
    local log="$work/perf-$1.log"
    if grep -qE "no response within|closed the connection|terminated the connection|I/O error talking" "$log"; then
        cat "$log"
        fail "$1: a host command was not answered within $HOST_BOUND_S s (or the connection was lost)"
    fi
    grep -q "verify state saved" "$log" || { cat "$log"; fail "$1: stager-perf did not save its verify state"; }
}
verify() { # $1 state file, $2 label
    "$BIN/stager-perf" verify --target "$target" --verify-state "$1" > "$work/verify-$2.log" 2>&1 || {
        cat "$work/verify-$2.log"
        fail "$2: acknowledged blocks lost or stale"
    }
}

start_stagerd "$work/wb.yaml" stagerd1
# Blocks the reader will check: written, then destaged, so without read cache every read of
# them goes to the SAN.
"$BIN/stager-perf" run --target "$target" -q 16 -w write -s 64k --range 0:16MiB -t 2 \
    --verify-state "$work/reads.json" --quiet --name preload > "$work/perf-preload.log" 2>&1 ||
    { cat "$work/perf-preload.log"; fail "preload failed"; }
wait_clean preload

# $1 label, $2 signal that takes the SAN away (KILL or STOP), $3 the writer's range (its own:
# the SAN-only check verifies every state file)
outage() {
    local label=$1 sig=$2 range=$3
    perf_run "$label-writer" -q 8 -w randwrite -s 8k --range "$range" -t 9 --verify-state "$work/$label-writes.json" &
    local wpid=$!
    perf_run "$label-reader" -q 4 -w randread -s 4k --range 0:16MiB -t 9 --verify-state "$work/reads.json" &
    local rpid=$!
    sleep 2
    local t0
    t0=$(now_ms)
    kill "-$sig" "$tgtd_pid"
    local seen=""
    while (($(now_ms) - t0 < DETECT_BOUND_MS + 3000)); do
        if [[ $(vol san_reachable) == False ]]; then
            seen=$(($(now_ms) - t0))
            break
        fi
        sleep 0.1
    done
    [[ -n $seen ]] || fail "$label: status still says the SAN is reachable $((DETECT_BOUND_MS + 3000)) ms after SIG$sig"
    ((seen <= DETECT_BOUND_MS)) || fail "$label: the SAN showed unreachable only after $seen ms (bound $DETECT_BOUND_MS ms)"
    local why
    why=$(vol san_last_error)
    [[ $why != None ]] || fail "$label: status gives no reason for the outage"
    echo "PASS: $label: status shows the SAN unreachable $seen ms after SIG$sig (bound $DETECT_BOUND_MS ms): $why"
    ctl status --socket "$work/stagerd.sock" | grep -E "SAN iscsi" | sed 's/^ */san_outage: status: /'
    wait "$wpid" "$rpid" || true
    sleep 1
    [[ $(vol san_reachable) == False ]] || fail "$label: the SAN showed reachable while it is still away"
    local rate
    rate=$(vol destage_rate_bytes_per_s)
    python3 -c "import sys; sys.exit(0 if float('$rate') == 0 else 1)" ||
        fail "$label: status reports a destage rate of $rate B/s with the SAN away"
    grep -q "ERROR.*SAN iscsi://.* unreachable" "$work/stagerd1.log" || fail "$label: no ERROR log line for the outage"
    for r in writer reader; do check_answered "$label-$r"; done
    echo "PASS: $label: every host command answered within $HOST_BOUND_S s, successes or retryable errors:"
    for r in writer reader; do grep -E "^  all |first command error" "$work/perf-$label-$r.log" | sed "s/^/san_outage:   $r: /" || true; done
    # The SAN comes back.
    if [[ $sig == STOP ]]; then
        kill -CONT "$tgtd_pid"
    else
        wait "$tgtd_pid" 2> /dev/null || true
        start_tgtd "$iqn" 211 "$work/lun.img"
    fi
    local t1
    t1=$(now_ms)
    wait_clean "$label"
    echo "PASS: $label: SAN back, destage resumed, nothing dirty after $(($(now_ms) - t1)) ms"
    verify "$work/$label-writes.json" "$label-writes"
    verify "$work/reads.json" "$label-reads"
    echo "PASS: $label: every acknowledged block verifies ($(tail -1 "$work/verify-$label-writes.log"))"
}
outage killed KILL 16MiB:64MiB
outage hung STOP 80MiB:64MiB

# The SAN alone holds every acknowledged block: a fresh flash device, write-through.
stop_stagerd
start_stagerd "$work/wt.yaml" stagerd-san-only
for st in reads killed-writes hung-writes; do verify "$work/$st.json" "san-only-$st"; done
echo "PASS: the SAN LUN alone holds exactly the newest acknowledged data"
stop_stagerd

# 3. A start with a hung SAN refuses within a bounded time, and says why.
kill -STOP "$tgtd_pid"
t0=$(now_ms)
rc=0
timeout 60 "$BIN/stagerd" --config "$work/wb.yaml" > "$work/stagerd-hung-start.log" 2>&1 &
starting=$!
# A host that connects meanwhile is not left attached to a target that never answers: its
# connection ends when stagerd gives up (or is refused before the listener exists).
sleep 0.3
"$BIN/stager-perf" run --target "$target" -q 1 -w randread -s 4k -t 1 --timeout 60 --quiet \
    > "$work/perf-hung-start.log" 2>&1 &
host=$!
wait "$starting" || rc=$?
took=$(($(now_ms) - t0))
host_rc=0
wait "$host" || host_rc=$?
host_took=$(($(now_ms) - t0))
kill -CONT "$tgtd_pid"
((host_rc != 0 && host_took <= 2 * SAN_TIMEOUT_MS + 4000)) ||
    fail "a host connecting to a starting stagerd with a hung SAN: exit $host_rc after $host_took ms: $(cat "$work/perf-hung-start.log")"
echo "PASS: a host that connected during that start was let go after $host_took ms: $(grep -m1 -oE "stager-perf: .*|the target .*|connection .*" "$work/perf-hung-start.log" | head -1)"
((rc != 0 && rc != 124)) || fail "stagerd with a hung SAN: exit status $rc after $took ms"
((took <= 2 * SAN_TIMEOUT_MS + 3000)) || fail "stagerd with a hung SAN took $took ms to refuse"
grep -q "cannot reach its SAN.*no answer to the login within $SAN_TIMEOUT_MS ms.*san_timeout_ms" "$work/stagerd-hung-start.log" ||
    fail "stagerd with a hung SAN did not say why: $(cat "$work/stagerd-hung-start.log")"
echo "PASS: a start with a hung SAN refused after $took ms, exit status $rc: $(grep -o "volume 3: cannot reach.*" "$work/stagerd-hung-start.log" | head -1)"
kill -9 "$tgtd_pid"
wait "$tgtd_pid" 2> /dev/null || true
tgtd_pid=""
t0=$(now_ms)
rc=0
timeout 60 "$BIN/stagerd" --config "$work/wb.yaml" > "$work/stagerd-no-san.log" 2>&1 || rc=$?
took=$(($(now_ms) - t0))
((rc != 0 && rc != 124 && took <= SAN_TIMEOUT_MS + 3000)) || fail "stagerd without a SAN: exit status $rc after $took ms"
echo "PASS: a start without a SAN refused after $took ms: $(grep -o "volume 3: cannot reach.*" "$work/stagerd-no-san.log" | head -1)"
echo "san_outage: PASS"
