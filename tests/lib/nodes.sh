# Shared by the multi-node end-to-end shell tests: start and stop stagerd nodes by name. Source
# it after setting `work`, `BIN`, `declare -A pid=()` and defining `fail`; node N runs
# "$work/node-N.yaml", logs to "$work/stagerd-N.log" and answers on "$work/N.sock".

# start N: starts node N and waits until its management socket answers.
start() {
    "$BIN/stagerd" --config "$work/node-$1.yaml" >> "$work/stagerd-$1.log" 2>&1 &
    pid[$1]=$!
    for _ in $(seq 300); do
        "$BIN/stagerctl" status --socket "$work/$1.sock" > /dev/null 2>&1 && return 0
        kill -0 "${pid[$1]}" 2> /dev/null || fail "node $1 exited at start"
        sleep 0.1
    done
    fail "node $1 did not come up"
}

# stop N SIGNAL: sends SIGNAL to node N and waits for it to end.
stop() {
    kill "-$2" "${pid[$1]}" 2> /dev/null || true
    wait "${pid[$1]}" 2> /dev/null || true
    unset "pid[$1]"
}
