#!/usr/bin/env bash
# A damaged flash log with real parts (issue 13): nothing acknowledged comes back stale, nothing
# is formatted or extended without an operator's word.
#   tgtd serves a file-backed iSCSI LUN on 127.0.0.1 (the volume's SAN). stagerd takes verified
#   writes (stager-perf --verify-state) into a write-back volume while tgtd is SIGSTOPped, so the
#   acknowledged data lives only in the flash log; stagerd is killed with SIGKILL and that flash
#   file is kept as the pristine copy. Each case starts from it:
#   1. one byte flipped in a data block in the middle of the log: `stagerctl flash inspect`
#      reports the damaged frame and exits 3; stagerd starts, logs an ERROR, status shows the lost
#      blocks; `stager-perf verify` finds no stale block (lost blocks answer Unrecovered Read
#      Error, every other one verifies); the mark survives a restart after the destage; a write
#      clears one block and `stagerctl volume accept-loss` the rest.
#   2. both superblock copies zeroed over the used log: stagerd refuses to start and changes
#      nothing; `stagerctl flash wipe` refuses without --force.
#   3. the flash file truncated: stagerd refuses to start and does not extend it; inspect
#      exits 1 instead of "nothing to destage".
#   4. 64 KiB of garbage near the log's start: stagerd starts; no block comes back stale.
# Needs tgtd/tgtadm and binaries built with the iscsi feature. BIN=dir overrides where the
# binaries are (default build/release). Prints PASS/FAIL lines; exits non-zero on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-build/release}
for b in stagerd stagerctl stager-perf; do
    [[ -x $BIN/$b ]] || { echo "log_damage: $BIN/$b missing (build with --features stager-target/iscsi)"; exit 1; }
done
command -v tgtd > /dev/null || { echo "log_damage: tgtd missing (apt-get install tgt)"; exit 1; }

work=$(mktemp -d /tmp/stager-logdamage.XXXXXX)
tgtd_pid="" stagerd_pid=""
cleanup() {
    [[ -n $stagerd_pid ]] && kill -9 "$stagerd_pid" 2> /dev/null || true
    [[ -n $tgtd_pid ]] && { kill -CONT "$tgtd_pid"; kill -9 "$tgtd_pid"; } 2> /dev/null || true
    wait 2> /dev/null || true
    if [[ ${KEEP:-0} == 1 ]]; then echo "log_damage: kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
fail() {
    echo "FAIL: $*"
    for f in "$work"/stagerd*.log; do [[ -f $f ]] && { echo "--- $f"; tail -30 "$f"; }; done
    exit 1
}
source tests/lib/san.sh
ctl() { "$BIN/stagerctl" "$@"; }

nvme_port=$(free_port)
iqn=iqn.2026-11.dev.stager:logdamage
truncate -s 128M "$work/lun.img"
start_tgtd "$iqn" 131 "$work/lun.img"

flash=$work/flash.img
cat > "$work/wb.yaml" << EOF
reactors: { cores: [0], idle_poll_us: 200 }
destage: { idle_poll_us: 50 }
listeners: [{ name: tcp0, address: "127.0.0.1:$nvme_port" }]
management: { socket: $work/stagerd.sock }
flash:
  - { name: flash0, path: $flash, size: 64MiB, cache_percent: 20 }
subsystems:
  - nqn: nqn.2026-11.dev.stager:logdamage
    allow_any_host: true
    namespaces:
      - nsid: 1
        backend:
          kind: volume
          id: 7
          flash: flash0
          policy: write-back
          read_cache: false
          san: { kind: iscsi, url: "iscsi://127.0.0.1:$iscsi_port/$iqn/1" }
EOF
target="tcp://127.0.0.1:$nvme_port/nqn.2026-11.dev.stager:logdamage"
sock=$work/stagerd.sock

start_stagerd() { # $1 log name
    "$BIN/stagerd" --config "$work/wb.yaml" > "$work/$1.log" 2>&1 &
    stagerd_pid=$!
    for _ in $(seq 300); do
        ctl status --socket "$sock" > /dev/null 2>&1 && return 0
        kill -0 "$stagerd_pid" 2> /dev/null || fail "stagerd exited at start ($1)"
        sleep 0.1
    done
    fail "stagerd did not come up ($1)"
}
stop_stagerd() {
    kill -TERM "$stagerd_pid"
    wait "$stagerd_pid" 2> /dev/null || true
    stagerd_pid=""
}
# A start that must be refused: $1 log name, $2 what the refusal must say.
refused_start() {
    local sum_before sum_after size_before
    sum_before=$(md5sum < "$flash")
    size_before=$(stat -c %s "$flash")
    if timeout 60 "$BIN/stagerd" --config "$work/wb.yaml" > "$work/$1.log" 2>&1; then
        fail "stagerd started over $1"
    fi
    grep -q "$2" "$work/$1.log" || { cat "$work/$1.log"; fail "the refusal ($1) does not say '$2'"; }
    sum_after=$(md5sum < "$flash")
    [[ $sum_before == "$sum_after" && $size_before == $(stat -c %s "$flash") ]] \
        || fail "the refused start ($1) changed the flash file"
}
status_sum() { # $1 python expression over v (a volume's status)
    ctl status --json --socket "$sock" | python3 -c "import json,sys; print(sum($1 for d in json.load(sys.stdin)['devices'] for v in d['volumes']))"
}
# Verifies the state; the number of stale or wrong blocks must be 0. Prints the read errors.
verify_no_stale() { # $1 label
    local out rc=0
    out=$("$BIN/stager-perf" verify --target "$target" --verify-state "$work/state.json" 2>&1) || rc=$?
    echo "$out" > "$work/verify-$1.log"
    grep -qE "verify: .* 0 failures" <<< "$out" || { echo "$out" | tail -20; fail "stale or wrong blocks read back ($1)"; }
    errors=$(grep -oE "[0-9]+ reads failed" <<< "$out" | grep -oE "^[0-9]+" || echo 0)
    if ((errors > 0)); then
        grep -q "Unrecovered Read Error" <<< "$out" || { echo "$out" | tail -5; fail "lost blocks failed with another status ($1)"; }
    elif ((rc != 0)); then
        echo "$out" | tail -5
        fail "verify failed without read errors ($1)"
    fi
}

# The pristine log: verified writes acknowledged from flash alone (the SAN paused), then kill -9.
start_stagerd stagerd-fill
kill -STOP "$tgtd_pid"
# Short runs until the log holds at least 6 MiB; the log has 51, and a write that does not fit
# would go to the paused SAN. 50 ms at QD8 is about 8 MiB at 40 000 writes/s (0.3 s runs overfilled
# the log once writes to a flash file got that fast).
for run in $(seq 200); do
    "$BIN/stager-perf" run --target "$target" -q 8 -w randwrite -s 4k --range 0:32MiB -t 50ms \
        --verify-state "$work/state.json" --quiet --name "fill$run" > "$work/perf-fill.log" 2>&1 \
        || { cat "$work/perf-fill.log"; fail "writes with the SAN paused failed"; }
    in_log=$(ctl status --json --socket "$sock" | python3 -c 'import json,sys; print(json.load(sys.stdin)["devices"][0]["log_used_bytes"])')
    ((in_log >= 6 << 20)) && break
done
kill -9 "$stagerd_pid"
wait "$stagerd_pid" 2> /dev/null || true
stagerd_pid=""
kill -CONT "$tgtd_pid"
cp "$flash" "$work/pristine.img"
used=$(ctl flash inspect --json "$flash" | python3 -c 'import json,sys; print(json.load(sys.stdin)["device"]["log_used_bytes"])')
blocks=$(python3 -c 'import struct,sys; print(struct.unpack_from("<Q", open(sys.argv[1],"rb").read(), 24)[0])' "$work/state.json")
echo "log_damage: $blocks blocks acknowledged from flash alone in $run run(s); log $used bytes"
((used > 4 << 20)) || fail "too little in the log to damage ($used bytes)"

# 1. One flipped byte in a data block of a frame in the middle of the log, in an entry whose
#    blocks no later entry writes again (a later write would make the damaged one moot).
cp "$work/pristine.img" "$flash"
python3 - "$flash" "$used" << 'EOF'
import struct, sys
path, used = sys.argv[1], int(sys.argv[2])
LOG_START, BS = 8192, 4096
img = open(path, 'rb').read()
frames = []  # (offset, [(kind, lba, blocks)]) of each frame of the log, in log order
at = LOG_START
while at < LOG_START + used and img[at:at + 4] == b'STLF':
    n, data_blocks = struct.unpack_from('<H', img, at + 8)[0], struct.unpack_from('<I', img, at + 12)[0]
    entries = [(img[e + 5], struct.unpack_from('<Q', img, e + 32)[0], struct.unpack_from('<I', img, e + 12)[0])
               for e in (at + 64 + 64 * i for i in range(n))]
    frames.append((at, entries))
    at += (1 + data_blocks) * BS
def overwritten_later(fi, lba, blocks):
    later = frames[fi][1][1:] + [e for _, es in frames[fi + 1:] for e in es]
    return any(l < lba + blocks and lba < l + b for _, l, b in later)
for fi in range(len(frames) // 2, len(frames) - 1):  # a later frame proves it was acknowledged
    at, entries = frames[fi]
    if entries and entries[0][0] == 1 and not overwritten_later(fi, entries[0][1], entries[0][2]):
        break
else:
    sys.exit(f"log_damage: no frame after the middle of {len(frames)} whose first write stays the latest")
with open(path, 'r+b') as f:
    f.seek(at + BS + 100)       # the frame's first data block: its first entry's
    x = f.read(1)
    f.seek(at + BS + 100)
    f.write(bytes([x[0] ^ 0xff]))
print(f"log_damage: flipped one byte of the data block at {at + BS} (frame {fi} of {len(frames)})")
EOF
rc=0
ctl flash inspect "$flash" > "$work/inspect-flip.log" 2>&1 || rc=$?
cat "$work/inspect-flip.log"
((rc == 3)) || fail "inspect of a log with a flipped byte exited $rc, not 3"
grep -q "DAMAGED LOG" "$work/inspect-flip.log" || fail "inspect does not report the damage"
grep -q "nothing to destage" "$work/inspect-flip.log" && fail "inspect calls a damaged log safe"
echo "PASS: stagerctl flash inspect reports the damaged frame and exits 3"
start_stagerd stagerd-flip
grep -q "ERROR.*damaged log" "$work/stagerd-flip.log" || fail "no ERROR line for the damaged log"
# The status socket answers while the log is still being replayed: the lost blocks are counted
# once replay is done (a loaded machine can take a while).
for _ in $(seq 100); do
    lost=$(status_sum "v['lost_blocks']")
    ((lost > 0)) && break
    sleep 0.1
done
((lost > 0)) || fail "status shows no lost blocks"
grep -q "LOST: $lost block" <<< "$(ctl status --socket "$sock")" || fail "stagerctl status does not show the lost blocks"
verify_no_stale flip
((errors > 0)) || fail "no read answered Unrecovered Read Error although $lost blocks are lost"
echo "PASS: flipped byte: $lost block(s) lost and answered with Unrecovered Read Error, $errors read(s); every other acknowledged block verifies"
for _ in $(seq 300); do [[ $(status_sum "v['dirty_bytes']") == 0 ]] && break; sleep 0.1; done
stop_stagerd
start_stagerd stagerd-flip2
[[ $(status_sum "v['lost_blocks']") == "$lost" ]] || fail "the lost blocks were forgotten across a clean restart"
verify_no_stale flip-restart
echo "PASS: the lost mark survives the destage and a restart (stale SAN data is never served)"
ctl status --json --socket "$sock" > /dev/null
ctl volume accept-loss 7 --socket "$sock" | tee "$work/accept.log"
grep -q "loss of $lost block" "$work/accept.log" || fail "accept-loss did not report $lost blocks"
[[ $(status_sum "v['lost_blocks']") == 0 ]] || fail "lost blocks remain after accept-loss"
stop_stagerd
start_stagerd stagerd-flip3
[[ $(status_sum "v['lost_blocks']") == 0 ]] || fail "accepted loss came back after a restart"
stop_stagerd
echo "PASS: stagerctl volume accept-loss clears the mark, durably"

# 2. Zeroed superblocks over a used log.
cp "$work/pristine.img" "$flash"
dd if=/dev/zero of="$flash" bs=4096 count=2 conv=notrunc status=none
refused_start stagerd-zerosb "superblock is blank but its log area holds"
if ctl flash wipe "$flash" > "$work/wipe.log" 2>&1; then fail "flash wipe wiped a used log without --force"; fi
grep -q "nothing was changed" "$work/wipe.log" || fail "unexpected wipe refusal: $(cat "$work/wipe.log")"
ctl flash wipe "$flash" --force > /dev/null || fail "flash wipe --force failed"
start_stagerd stagerd-wiped
grep -q "formatting" "$work/stagerd-wiped.log" || fail "a wiped device was not formatted"
stop_stagerd
echo "PASS: zeroed superblocks: the start is refused and nothing changes; only flash wipe --force formats it"

# 3. Truncated flash file.
cp "$work/pristine.img" "$flash"
truncate -s 32M "$flash"
refused_start stagerd-trunc "truncated"
rc=0
ctl flash inspect "$flash" > "$work/inspect-trunc.log" 2>&1 || rc=$?
((rc == 1)) || { cat "$work/inspect-trunc.log"; fail "inspect of a truncated device exited $rc, not 1"; }
grep -q "nothing to destage" "$work/inspect-trunc.log" && fail "inspect calls a truncated device safe"
(($(wc -l < "$work/inspect-trunc.log") < 5)) || fail "inspect of a truncated device is noisy"
echo "PASS: truncated flash file: the start is refused without extending it; inspect exits 1"

# 4. 64 KiB of garbage near the log's start.
cp "$work/pristine.img" "$flash"
dd if=/dev/urandom of="$flash" bs=4096 seek=6 count=16 conv=notrunc status=none
rc=0
ctl flash inspect "$flash" > "$work/inspect-garbage.log" 2>&1 || rc=$?
((rc != 0)) || { cat "$work/inspect-garbage.log"; fail "inspect of a log with garbage exited 0"; }
start_stagerd stagerd-garbage
(($(status_sum "v['lost_blocks']") > 0)) || fail "garbage over the log lost nothing?"
verify_no_stale garbage
stop_stagerd
echo "PASS: garbage near the log's start: inspect exits $rc, no block comes back stale ($errors reads refused)"
echo "log_damage: PASS"
