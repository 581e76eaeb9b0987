# Shared by the end-to-end shell tests: a free TCP port on 127.0.0.1, and a real iSCSI SAN —
# Debian's tgtd serving file-backed LUNs on 127.0.0.1 — for stagerd's volumes. Source it after
# setting `work` (the test's folder) and `tgtd_pid=""`; the test's cleanup kills "$tgtd_pid".

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_tgtd IQN SALT LUN_FILE...: starts tgtd with one target IQN and one LUN (1, 2, …) per
# file, and sets iscsi_port, tgtd_pid and the `adm` function (tgtadm on its control port).
# SALT keeps the control ports of tests that run at the same time apart. Called again (after
# the test killed tgtd), it serves the same files on the same port.
start_tgtd() {
    local iqn=$1 salt=$2 lun=0 f
    shift 2
    iscsi_port=${iscsi_port:-$(free_port)}
    tgtd_control=$((2000 + ($$ + salt) % 7000))
    tgtd -f --iscsi "portal=127.0.0.1:$iscsi_port" --control-port "$tgtd_control" >> "$work/tgtd.log" 2>&1 &
    tgtd_pid=$!
    for _ in $(seq 100); do (exec 3<> "/dev/tcp/127.0.0.1/$iscsi_port") 2> /dev/null && break; sleep 0.1; done
    # tgtd listens on its portal before it opens its management socket: wait for that too.
    for _ in $(seq 100); do tgtadm -C "$tgtd_control" --op show --mode sys > /dev/null 2>&1 && break; sleep 0.1; done
    adm --op new --mode target --tid 1 -T "$iqn"
    for f in "$@"; do
        lun=$((lun + 1))
        adm --op new --mode logicalunit --tid 1 --lun "$lun" -b "$f"
    done
    adm --op bind --mode target --tid 1 -I ALL
}
adm() { tgtadm -C "$tgtd_control" --lld iscsi "$@"; }
