# Shared by the cluster end-to-end shell tests: an etcd of the test's own on 127.0.0.1, volume
# 1's record in it, node-a's view of volume 1, and the check node that reads a SAN alone.
# Source it after tests/lib/san.sh and tests/lib/nodes.sh, with `work`, `BIN` and `fail` set
# (and `prefix` before calling record); or, for a test that needs nothing else, call
# `cluster_test NAME` first (after `work` and `BIN`), which defines those for it.

# start_etcd NAME: starts etcd with its data in "$work/etcd", logging to "$work/etcd.log", and
# waits until it answers; sets etcd_port and etcd_pid.
start_etcd() {
    etcd_port=$(free_port)
    local peer
    peer=$(free_port)
    etcd --name "$1" --data-dir "$work/etcd" \
        --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
        --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
        --initial-cluster "$1=http://127.0.0.1:$peer" > "$work/etcd.log" 2>&1 &
    etcd_pid=$!
    for _ in $(seq 100); do etcdctl --endpoints "127.0.0.1:$etcd_port" endpoint health > /dev/null 2>&1 && break; sleep 0.1; done
}

# record: volume 1's record (JSON) under $prefix; field KEY: one of its fields, as JSON.
record() { etcdctl --endpoints "127.0.0.1:$etcd_port" get "$prefix/volumes/1" --print-value-only 2> /dev/null; }
field() { record | python3 -c "import json,sys; r=json.load(sys.stdin); print(json.dumps(r.get('$1')))" 2> /dev/null || true; }

# vol FIELD: node-a's status of volume 1, one field as JSON (replicas: "node:state ...").
vol() {
    ctl status --json --socket "$work/a.sock" 2> /dev/null | python3 -c "import json,sys; v=[v for d in json.load(sys.stdin)['devices'] for v in d['volumes'] if v['id']==1][0]; print(json.dumps(v['$1']) if '$1' != 'replicas' else ' '.join(r['node']+':'+r['state'] for r in v['replicas']))" 2> /dev/null || true
}

# wait_for SECONDS WHAT COMMAND...: until COMMAND succeeds, or fail naming WHAT.
wait_for() {
    local limit=$1 what=$2
    shift 2
    local end=$(($(date +%s) + limit))
    until "$@"; do
        (($(date +%s) < end)) || fail "$what: not within $limit s (record: $(record); replicas: $(vol replicas))"
        sleep 0.1
    done
}

# protected NODE: volume 1 runs write-back with NODE's copy in sync; replicas_are NODE: the
# record names NODE alone.
protected() { [[ $(vol effective_policy) == '"write-back"' && $(vol replicas) == "$1:in-sync" ]]; }
replicas_are() { [[ $(field replicas) == "[\"$1\"]" ]]; }

# check_node_yaml PORT NQN SAN-URL: the check node's configuration, a write-through volume 1
# over the SAN without read cache, to read the SAN alone (start it as node `check`).
check_node_yaml() {
    cat << EOF
reactors: { cores: [0] }
listeners: [{ name: tcp0, address: "127.0.0.1:$1" }]
management: { socket: $work/check.sock }
flash:
  - { name: flash0, path: $work/flash-check.img, size: 64MiB }
subsystems:
  - nqn: $2
    allow_any_host: true
    namespaces:
      - nsid: 1
        backend: { kind: volume, id: 1, flash: flash0, policy: write-through, read_cache: false,
                   san: { kind: iscsi, url: "$3" } }
EOF
}

# cluster_node_yaml NODE CORE [PEER...]: writes $work/node-NODE.yaml, what every cluster node
# of these tests has (the test appends its own `ana:` and subsystems): its reactor on CPU CORE,
# its listener on ${nvme[NODE]}, its management socket, its fabric on ${fabric[NODE]} with each
# PEER (a node letter, at ${fabric[PEER]}, or LETTER=PORT), etcd at $etcd_port under $prefix,
# and a 96 MiB flash. For one call: NODE_LINES adds lines under `node:`, ETCD replaces the etcd
# address, FLASH=0 leaves the flash out (a node that only stands for manager).
cluster_node_yaml() {
    local n=$1 core=$2 p id addr peers=""
    shift 2
    for p in "$@"; do
        id=${p%%=*} addr=${fabric[${p%%=*}]}
        [[ $p == *=* ]] && addr=${p#*=}
        peers+="    - { id: node-$id, address: \"127.0.0.1:$addr\", fault_domain: rack-$id }"$'\n'
    done
    {
        cat << YAML
reactors: { cores: [$core], idle_poll_us: 200 }
destage: { idle_poll_us: 50 }
listeners: [{ name: tcp0, address: "127.0.0.1:${nvme[$n]}" }]
management: { socket: $work/$n.sock }
node:
  id: node-$n
  fault_domain: rack-$n
${NODE_LINES:-}  fabric: { listen: "127.0.0.1:${fabric[$n]}", secret: "${test_name:-stager} test fabric secret", peer_timeout_ms: 1000, ring_size: 8MiB }
YAML
        [[ -z $peers ]] || printf '  peers:\n%s' "$peers"
        echo "cluster: { endpoints: [\"${ETCD:-127.0.0.1:$etcd_port}\"], prefix: $prefix, lease_ttl_ms: 3000, op_timeout_ms: 1000 }"
        [[ ${FLASH:-1} == 0 ]] || echo "flash: [{ name: flash0, path: $work/flash-$n.img, size: 96MiB, cache_percent: 10 }]"
    } > "$work/node-$n.yaml"
}

ctl() { "$BIN/stagerctl" "$@"; }
now() { date +%s.%N; }
# since T: seconds from T (a `now`) to now, one decimal.
since() { python3 -c "print(f'{$(now) - $1:.1f}')"; }
# drained: node-a holds nothing dirty of volume 1.
drained() { [[ $(vol dirty_bytes) == 0 ]]; }

# cluster_test NAME: the common frame of a cluster test — its binaries and commands checked,
# `pid`, `writer`, `tgtd_pid` and
# `etcd_pid` to stop at exit (tgtd resumed first if a test stopped it), the work dir removed
# unless KEEP=1, `fail` printing each log's tail — and the shared libraries sourced.
cluster_test() {
    test_name=$1
    local b c
    for b in stagerd stagerctl stager-perf; do
        [[ -x $BIN/$b ]] || { echo "$test_name: $BIN/$b missing"; exit 1; }
    done
    for c in tgtd tgtadm etcd etcdctl python3; do
        command -v $c > /dev/null || { echo "$test_name: $c missing"; exit 1; }
    done
    tgtd_pid="" etcd_pid="" writer=""
    declare -gA pid=()
    trap cluster_test_cleanup EXIT
    fail() {
        echo "FAIL: $*"
        for f in "$work"/*.log; do echo "--- $f"; tail -30 "$f"; done
        exit 1
    }
    source tests/lib/san.sh
    source tests/lib/nodes.sh
}
cluster_test_cleanup() {
    [[ -n $tgtd_pid ]] && kill -CONT "$tgtd_pid" 2> /dev/null || true
    for n in "${!pid[@]}"; do kill -9 "${pid[$n]}" 2> /dev/null || true; done
    for p in "$writer" "$tgtd_pid" "$etcd_pid"; do [[ -n $p ]] && kill -9 "$p" 2> /dev/null || true; done
    wait 2> /dev/null || true
    if [[ ${KEEP:-0} == 1 ]]; then echo "$test_name: kept $work"; else rm -rf "$work"; fi
}

# writer_done_and_verified TARGET SAN-ONLY: the background writer ($writer) succeeded; every
# block it recorded in $work/state.json reads back through TARGET (node-a) and, once node-a has
# drained volume 1 and stopped, through SAN-ONLY (the check node) alone.
writer_done_and_verified() {
    wait "$writer" || { cat "$work/perf.log"; fail "writes failed on node-a"; }
    writer=""
    grep -q "verify state saved" "$work/perf.log" || { cat "$work/perf.log"; fail "stager-perf did not save its state"; }
    "$BIN/stager-perf" verify --target "$1" --nsid 1 --verify-state "$work/state.json" > "$work/verify-a.log" 2>&1 ||
        { cat "$work/verify-a.log"; fail "an acknowledged block does not read back through node-a"; }
    echo "PASS: every write succeeded and every acknowledged block reads back through node-a: $(tail -1 "$work/verify-a.log")"
    ctl volume set-policy 1 write-through --socket "$work/a.sock" > /dev/null
    wait_for 60 "node-a drains volume 1" drained
    stop a TERM
    start check
    "$BIN/stager-perf" verify --target "$2" --nsid 1 --verify-state "$work/state.json" > "$work/verify-san.log" 2>&1 ||
        { cat "$work/verify-san.log"; fail "the SAN alone does not hold every acknowledged write"; }
    echo "PASS: the SAN alone holds every acknowledged write (0 lost): $(tail -1 "$work/verify-san.log")"
    stop check TERM
}
