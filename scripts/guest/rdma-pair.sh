#!/usr/bin/env bash
# Sourced on the HOST by the tests that run two QEMU guests joined by Soft-RoCE
# (tests/rdma_verbs.sh, tests/replication_verbs.sh): what goes into their initramfs beyond the
# base image, and booting, watching and judging the pair. The caller defines `log` and
# GUEST_TIMEOUT (seconds), and calls `rdma_pair_setup` first, from the repository root.
#
# The two guests share a QEMU socket network: the first listens on 127.0.0.1:PORT, the second
# connects (distinct MACs). Soft-RoCE between them works; between two network namespaces of one
# guest it does not (../../shared/GUEST.md). Each guest runs scripts/guest/rxe.sh's `rxe_up`.

RDMA_PAIR_PIDS=()
RDMA_PAIR_NAMES=()

# Builds (or reuses) the guest kernel and base initramfs, sources build/guest/guest.env, makes
# LOGDIR (build/guest/logs/$1-<timestamp>) and TMP, and sets traps that stop the guests and
# remove TMP on every exit path.
rdma_pair_setup() {
    log "guest: kernel + base initramfs (scripts/guest/build.sh)"
    bash scripts/guest/build.sh > /dev/null
    # shellcheck disable=SC1091
    . build/guest/guest.env
    LOGDIR=$PWD/build/guest/logs/$1-$(date +%Y%m%d-%H%M%S)-$$
    mkdir -p "$LOGDIR"
    TMP=$(mktemp -d "/tmp/stager-$1.XXXXXX")
    trap rdma_pair_cleanup EXIT
    trap 'log "interrupted"; exit 130' INT TERM HUP
}

rdma_pair_cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    rdma_pair_stop
    rm -rf "$TMP"
    exit "$rc"
}

# Stages into $1 what a verbs guest needs: the binaries $3... (stripped) under /usr/local/bin,
# iproute2's `rdma`, libibverbs with the rxe provider and its driver file, every library they
# link, the guest scripts scripts/guest/rxe.sh and $2 under /guest, and the Soft-RoCE modules
# with their load order in /rdma-modules/order.
rdma_pair_stage() {
    local stage=$1 script=$2
    shift 2
    local kroot=build/guest/kernel/$GUEST_KERNEL_PKG
    mkdir -p "$stage/usr/local/bin" "$stage/usr/bin" "$stage/rdma-modules" "$stage/guest" "$stage/etc/libibverbs.d"
    local b
    for b in "$@"; do
        strip -o "$stage/usr/local/bin/$(basename "$b")" "$b" 2> /dev/null || cp "$b" "$stage/usr/local/bin/"
    done
    cp -L /usr/bin/rdma "$stage/usr/bin/rdma"
    install -m 0755 scripts/guest/rxe.sh "$stage/guest/rxe.sh"
    install -m 0755 "$script" "$stage/guest/$(basename "$script")"
    # libibverbs finds its providers through /etc/libibverbs.d/*.driver; rxe is the one we need.
    local provider
    provider=$(find /usr/lib/x86_64-linux-gnu/libibverbs -name 'librxe-rdmav*.so' | head -n1)
    [[ -n $provider ]] || { log "FAIL: no rxe provider (ibverbs-providers)"; return 1; }
    mkdir -p "$stage$(dirname "$provider")"
    cp -L "$provider" "$stage$provider"
    cp /etc/libibverbs.d/rxe.driver "$stage/etc/libibverbs.d/"
    local libs l
    mapfile -t libs < <(for b in "$stage"/usr/local/bin/* "$stage/usr/bin/rdma" "$provider" \
        /usr/lib/x86_64-linux-gnu/libibverbs.so.1; do ldd "$b"; done | awk '
        /=>/ && $3 ~ /^\// { print $3; next }
        $1 ~ /^\// { print $1 }' | sort -u)
    libs+=(/usr/lib/x86_64-linux-gnu/libibverbs.so.1)
    for l in "${libs[@]}"; do
        mkdir -p "$stage$(dirname "$l")"
        cp -L "$l" "$stage$l"
    done
    # Soft-RoCE modules, in load order: crc32 providers first (rxe asks the crypto API for
    # "crc32" at run time, so modprobe's dependencies do not list them), then rdma_rxe and what
    # it needs.
    : > "$stage/rdma-modules/order"
    local m ko name
    for m in crc32_generic crc32-pclmul rdma_rxe; do
        modprobe -d "$kroot" -S "$GUEST_KVER" --show-depends "$m" | awk '$1 == "insmod" { print $2 }'
    done | awk '!seen[$0]++' | while read -r ko; do
        name=$(basename "$ko")
        case $name in
            *.ko.xz) xz -dc "$ko" > "$stage/rdma-modules/${name%.xz}"; name=${name%.xz} ;;
            *.ko.zst) zstd -qdc "$ko" > "$stage/rdma-modules/${name%.zst}"; name=${name%.zst} ;;
            *) cp "$ko" "$stage/rdma-modules/$name" ;;
        esac
        echo "$name" >> "$stage/rdma-modules/order"
    done
    log "staged ${*##*/}, rdma, libibverbs + rxe provider, ${#libs[@]} libraries and $(wc -l < "$stage/rdma-modules/order") modules"
}

# Packs stage $1 into an archive appended to the base initramfs: $2 is the result.
rdma_pair_initrd() {
    (cd "$1" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet --owner=0:0 | gzip -1n) > "$2.extra"
    cat "$GUEST_INITRD" "$2.extra" > "$2"
    rm -f "$2.extra"
    log "initramfs: $(du -h "$2" | cut -f1)"
}

rdma_pair_free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Boots one guest (TCG, one vCPU) in the background; its console goes to $LOGDIR/NAME.log.
# $1 name, $2 initrd, $3 memory (MiB), $4 netdev options (listen=... or connect=...), $5 MAC,
# $6 kernel command line.
rdma_pair_boot() {
    local name=$1
    : > "$LOGDIR/$name.log"
    timeout -k 10 "$GUEST_TIMEOUT" qemu-system-x86_64 -accel tcg -cpu max -m "$3" -smp 1 \
        -kernel "$GUEST_VMLINUZ" -initrd "$2" -append "$6" \
        -netdev "socket,id=n0,$4" -device "virtio-net-pci,netdev=n0,mac=$5" \
        -display none -monitor none -parallel none -serial "file:$LOGDIR/$name.log" \
        -no-reboot < /dev/null > "$LOGDIR/qemu-$name.log" 2>&1 &
    RDMA_PAIR_PIDS+=($!)
    RDMA_PAIR_NAMES+=("$name")
    if [[ ${GUEST_VERBOSE:-0} == 1 ]]; then
        tail -n +1 -f "$LOGDIR/$name.log" --pid=$! | sed -u "s/^/  $name| /" &
    fi
}

# Waits until the first guest's QEMU listens on $1 (the second one connects to it).
rdma_pair_wait_listen() {
    local n=0
    until grep -q . <<< "$(ss -Hltn "sport = :$1" 2> /dev/null)"; do
        ((n++ < 100)) || { log "FAIL: the first guest's QEMU never listened on $1"; return 1; }
        sleep 0.1
    done
}

# The GUEST-RESULT line of guest $1's console (empty if none yet).
rdma_pair_result() {
    tr -d '\r' < "$LOGDIR/$1.log" | grep -a -E '^GUEST-RESULT: ' | tail -n1 || true
}

# Waits for both guests. When one stops without passing, the other is stopped at once (it would
# only wait for its peer until its own timeout).
rdma_pair_wait() {
    local i alive
    while :; do
        alive=0
        for i in "${!RDMA_PAIR_PIDS[@]}"; do
            if kill -0 "${RDMA_PAIR_PIDS[$i]}" 2> /dev/null; then
                alive=$((alive + 1))
            elif [[ $(rdma_pair_result "${RDMA_PAIR_NAMES[$i]}") != "GUEST-RESULT: PASS" ]]; then
                rdma_pair_stop
                return 0
            fi
        done
        ((alive)) || break
        sleep 0.5
    done
    rdma_pair_stop
}

# Stops whatever guest still runs (every exit path of the caller should call it).
rdma_pair_stop() {
    local p
    for p in "${RDMA_PAIR_PIDS[@]}"; do kill -TERM "$p" 2> /dev/null || true; done
    for p in "${RDMA_PAIR_PIDS[@]}"; do wait "$p" 2> /dev/null || true; done
    RDMA_PAIR_PIDS=()
}

# Prints each guest's `test: ` lines matching $1 (an ERE after "test: ") and, for a guest that
# did not pass, the end of its console. Returns 0 only if every guest said GUEST-RESULT: PASS.
rdma_pair_report() {
    local name result ok=0
    for name in "${RDMA_PAIR_NAMES[@]}"; do
        result=$(rdma_pair_result "$name")
        tr -d '\r' < "$LOGDIR/$name.log" | grep -a -E "^test: ($1)" | sed "s/^test: /  $name| /" || true
        if [[ $result != "GUEST-RESULT: PASS" ]]; then
            ok=1
            log "$name guest: ${result:-no GUEST-RESULT marker (stopped, timed out after ${GUEST_TIMEOUT}s, or its peer failed first)}"
            log "---- last 60 lines of the $name console ($LOGDIR/$name.log)"
            tr -d '\r' < "$LOGDIR/$name.log" | tail -n 60 | sed "s/^/  $name| /"
            [[ -s $LOGDIR/qemu-$name.log ]] && tail -n 10 "$LOGDIR/qemu-$name.log" | sed "s/^/  $name qemu| /"
        fi
    done
    return $ok
}
