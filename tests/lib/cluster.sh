# Shared by the cluster end-to-end shell tests: an etcd of the test's own on 127.0.0.1 and
# volume 1's record in it. Source it after setting `work` (and `prefix` before calling record).

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
