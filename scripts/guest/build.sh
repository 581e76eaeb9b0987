#!/usr/bin/env bash
# Build (or reuse) everything needed to boot a Debian kernel in QEMU as an
# NVMe/TCP host for interoperability tests.  Idempotent; caches under
# build/guest/ (git-ignored).  Safe to run concurrently (flock).
#
# Outputs (paths are also written to build/guest/guest.env, sourceable):
#   build/guest/vmlinuz       the Debian kernel
#   build/guest/initrd.img    base.cpio.gz + tests.cpio.gz concatenated
#
# The base initramfs holds busybox, the kernel modules, nvme-cli (+ its shared
# libraries) and /init (scripts/guest/init).  It is rebuilt only when one of
# those inputs changes.  The tests archive holds the scripts that run inside
# the guest (scripts/guest/nvme-tcp-test.sh, scripts/guest/nvmet-selftest.sh,
# scripts/guest/multipath-test.sh)
# and is tiny, so editing a test script never rebuilds the base image. Tests that need our
# binaries in the guest (tests/nvme_drivers.sh) append an archive of their own.
#
# Environment:
#   GUEST_KERNEL_PKG   override the kernel package (default: what
#                      linux-image-amd64 depends on, e.g. linux-image-6.1.0-56-amd64)
#   GUEST_EXTRA_MODULES  extra module names to put in the initramfs (space separated)
#   GUEST_FORCE=1      rebuild the initramfs even if inputs are unchanged
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
OUT=${GUEST_BUILD_DIR:-$REPO_ROOT/build/guest}

log() { echo "guest: $*"; }
die() { echo "guest: ERROR: $*" >&2; exit 1; }

mkdir -p "$OUT"
# Serialize concurrent builds (two test scripts starting at once).
exec 9>"$OUT/.lock"
flock 9

# --------------------------------------------------------------------------
# 1. Host packages
# --------------------------------------------------------------------------
# package -> a file it provides that we use
declare -A NEED=(
    [qemu-system-x86]=/usr/bin/qemu-system-x86_64
    [busybox-static]=/bin/busybox
    [cpio]=/usr/bin/cpio
    [kmod]=/usr/sbin/depmod
    [nvme-cli]=/usr/sbin/nvme
)
pkg_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}
missing=()
for p in "${!NEED[@]}"; do
    if ! pkg_installed "$p" || [ ! -e "${NEED[$p]}" ]; then missing+=("$p"); fi
done
APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" = 0 ]; then
        log "running apt-get update..."
        apt-get update -qq >/dev/null
        APT_UPDATED=1
    fi
}
if [ "${#missing[@]}" -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "need root to apt-get install: ${missing[*]}"
    log "installing host packages with apt-get: ${missing[*]}"
    apt_update_once
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    for p in "${missing[@]}"; do
        pkg_installed "$p" || die "apt-get install $p did not install it"
    done
    log "host packages installed"
else
    log "host packages present (qemu-system-x86 busybox-static cpio kmod nvme-cli)"
fi
# busybox-static must really be static: it is run as PID 1 without libraries.
if ldd /bin/busybox >/dev/null 2>&1; then
    die "/bin/busybox is dynamically linked; install busybox-static"
fi

# --------------------------------------------------------------------------
# 2. Debian kernel
# --------------------------------------------------------------------------
resolve_kernel_pkg() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}
KPKG=${GUEST_KERNEL_PKG:-}
if [ -z "$KPKG" ]; then
    KPKG=$(resolve_kernel_pkg || true)
    if [ -z "$KPKG" ]; then
        apt_update_once
        KPKG=$(resolve_kernel_pkg || true)
    fi
fi
if [ -z "$KPKG" ]; then
    # Offline / no apt lists: fall back to the newest kernel already cached.
    # shellcheck disable=SC2012
    KPKG=$(ls -1 "$OUT/kernel" 2>/dev/null | sed -n 's/^\(linux-image-.*\)\.done$/\1/p' | sort -V | tail -n1)
    [ -n "$KPKG" ] || die "cannot resolve the kernel package (apt-cache depends linux-image-amd64 gave nothing)"
    log "apt could not resolve linux-image-amd64; using cached $KPKG"
fi
if { [ ! -f "$OUT/kernel/$KPKG.done" ] || [ ! -f "$OUT/kernel/$KPKG/boot/vmlinuz-${KPKG#linux-image-}" ]; } && [ -z "${GUEST_KERNEL_PKG:-}" ] && [ "$APT_UPDATED" = 0 ]; then
    # About to download: make sure the name is not from stale apt lists.
    apt_update_once
    KPKG=$(resolve_kernel_pkg || true)
    [ -n "$KPKG" ] || die "cannot resolve the kernel package (apt-cache depends linux-image-amd64 gave nothing)"
fi
KVER=${KPKG#linux-image-}
KROOT=$OUT/kernel/$KPKG
if [ ! -f "$OUT/kernel/$KPKG.done" ] || [ ! -f "$KROOT/boot/vmlinuz-$KVER" ]; then
    log "downloading kernel package $KPKG..."
    mkdir -p "$OUT/dl"
    rm -f "$OUT/dl/${KPKG}_"*.deb
    (cd "$OUT/dl" && apt-get -o APT::Sandbox::User=root download -qq "$KPKG") || {
        apt_update_once
        (cd "$OUT/dl" && apt-get -o APT::Sandbox::User=root download -qq "$KPKG")
    } || die "apt-get download $KPKG failed"
    deb=$(find "$OUT/dl" -maxdepth 1 -name "${KPKG}_*.deb" | head -n1)
    log "extracting $(basename "$deb")..."
    rm -rf "$KROOT"
    mkdir -p "$KROOT"
    dpkg-deb -x "$deb" "$KROOT"
    [ -f "$KROOT/boot/vmlinuz-$KVER" ] || die "no boot/vmlinuz-$KVER in $deb"
    depmod -b "$KROOT" "$KVER"
    dpkg-deb -f "$deb" Version >"$KROOT/.version"
    touch "$OUT/kernel/$KPKG.done"
    rm -f "$deb" # the extracted tree is the cache
    # Drop kernels of older Debian ABIs (~400 MiB each).
    for d in "$OUT"/kernel/linux-image-*; do
        case $d in "$KROOT" | "$KROOT.done") ;; *) log "removing old cached kernel $(basename "$d")"; rm -rf "$d" ;; esac
    done
else
    log "kernel $KPKG cached ($(cat "$KROOT/.version" 2>/dev/null || echo '?'))"
fi

# --------------------------------------------------------------------------
# 3. Collect initramfs inputs
# --------------------------------------------------------------------------
# Modules: NVMe/TCP host, virtio NIC, and the kernel target for --self-test.
# CRC32C providers are loaded on demand by nvme-tcp when digests are enabled
# (crypto API "crc32c"); include them so header/data digests work.
# On 6.1.0-*-amd64 all of these are modules (=m): virtio_pci, virtio_net,
# nvme-tcp (pulls nvme-core, nvme-fabrics, t10-pi, crc64-rocksoft, crc-t10dif),
# configfs, nvmet, nvmet-tcp, null_blk, loop.  Built-in ones (devtmpfs, tmpfs,
# af_packet) are reported by modprobe as "builtin" and skipped.
# nvme, vfio-pci and vfio_iommu_type1 drive QEMU's emulated NVMe controller for the local
# flash driver test (tests/nvme_drivers.sh): the kernel's own driver for io_uring passthrough,
# then vfio-pci for our userspace driver.
MODULES="nvme-tcp virtio_net virtio_pci nvmet nvmet-tcp configfs loop null_blk
         crc32c_generic crc32c-intel nvme vfio-pci vfio_iommu_type1 ${GUEST_EXTRA_MODULES:-}"
kofiles=()
builtin_mods=()
for m in $MODULES; do
    deps=$(modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" 2>&1) || {
        case $m in
            nvme-tcp | virtio_net | virtio_pci) die "required module $m not found in $KVER: $deps" ;;
        esac
        log "warning: module $m not found in $KVER (skipped): $deps"
        continue
    }
    while read -r kind arg _; do
        case $kind in
            insmod) kofiles+=("$arg") ;;
            builtin) builtin_mods+=("$arg") ;;
        esac
    done <<<"$deps"
done
mapfile -t kofiles < <(printf '%s\n' "${kofiles[@]}" | awk 'NF && !seen[$0]++')

NVME_BIN=$(command -v nvme)
mapfile -t LIBS < <(ldd "$NVME_BIN" | awk '
    /=>/ && $3 ~ /^\// { print $3; next }
    $1 ~ /^\// { print $1 }' | sort -u)

INIT_SRC=$SCRIPT_DIR/init
[ -f "$INIT_SRC" ] || die "missing $INIT_SRC"

# Input fingerprint: contents of every file that goes into the base archive.
base_key=$(
    {
        echo "kernel $KPKG $(cat "$KROOT/.version" 2>/dev/null)"
        echo "modules $MODULES"
        sha256sum /bin/busybox "$NVME_BIN" "$INIT_SRC" "${BASH_SOURCE[0]}" "${LIBS[@]}" "${kofiles[@]}"
    } | sha256sum | cut -c1-16
)

BASE=$OUT/base.cpio.gz
if [ "${GUEST_FORCE:-0}" = 1 ] || [ ! -f "$BASE" ] || [ "$(cat "$OUT/base.key" 2>/dev/null)" != "$base_key" ]; then
    log "building initramfs (kernel $KVER, ${#kofiles[@]} modules, busybox, nvme-cli)..."
    STAGE=$OUT/stage.base
    rm -rf "$STAGE"
    mkdir -p "$STAGE"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,etc/nvme,guest,lib/modules/"$KVER",root}
    # busybox and its applets
    cp /bin/busybox "$STAGE/bin/busybox"
    for a in $(/bin/busybox --list-full); do
        [ -e "$STAGE/$a" ] || ln -s /bin/busybox "$STAGE/$a"
    done
    # nvme-cli and its shared libraries, at the paths ldd reports
    rm -f "$STAGE/usr/sbin/nvme"
    cp -L "$NVME_BIN" "$STAGE/usr/sbin/nvme"
    for l in "${LIBS[@]}"; do
        mkdir -p "$STAGE$(dirname "$l")"
        cp -L "$l" "$STAGE$l"
    done
    # modules (decompressed if the kernel ships them compressed)
    for ko in "${kofiles[@]}"; do
        rel=${ko#"$KROOT"/}
        case $rel in
            *.ko.xz) dst=$STAGE/${rel%.xz}; mkdir -p "$(dirname "$dst")"; xz -dc "$ko" >"$dst" ;;
            *.ko.zst) dst=$STAGE/${rel%.zst}; mkdir -p "$(dirname "$dst")"; zstd -qdc "$ko" >"$dst" ;;
            *.ko.gz) dst=$STAGE/${rel%.gz}; mkdir -p "$(dirname "$dst")"; gzip -dc "$ko" >"$dst" ;;
            *) dst=$STAGE/$rel; mkdir -p "$(dirname "$dst")"; cp "$ko" "$dst" ;;
        esac
    done
    for f in modules.builtin modules.builtin.modinfo modules.order; do
        [ -f "$KROOT/lib/modules/$KVER/$f" ] && cp "$KROOT/lib/modules/$KVER/$f" "$STAGE/lib/modules/$KVER/"
    done
    depmod -b "$STAGE" "$KVER"
    # /init
    cp "$INIT_SRC" "$STAGE/init"
    chmod 0755 "$STAGE/init"
    echo "$KVER" >"$STAGE/etc/guest-kernel"
    echo "root:x:0:0:root:/root:/bin/sh" >"$STAGE/etc/passwd"
    echo "root:x:0:" >"$STAGE/etc/group"
    (cd "$STAGE" && find . -print0 | LC_ALL=C sort -z |
        cpio --null -o -H newc --quiet --owner=0:0 | gzip -6n) >"$BASE.tmp"
    mv "$BASE.tmp" "$BASE"
    echo "$base_key" >"$OUT/base.key"
    rm -rf "$STAGE"
    log "initramfs built: $BASE ($(du -h "$BASE" | cut -f1))"
else
    log "initramfs up to date ($BASE, key $base_key)"
fi

# --------------------------------------------------------------------------
# 4. Tests archive (guest-side scripts) and the combined initrd
# --------------------------------------------------------------------------
TEST_FILES=("$SCRIPT_DIR/nvme-tcp-test.sh" "$SCRIPT_DIR/nvmet-selftest.sh" "$SCRIPT_DIR/nvme-drivers-test.sh" "$SCRIPT_DIR/multipath-test.sh")
tests_key=$(sha256sum "${TEST_FILES[@]}" | sha256sum | cut -c1-16)
TESTS=$OUT/tests.cpio.gz
if [ ! -f "$TESTS" ] || [ "$(cat "$OUT/tests.key" 2>/dev/null)" != "$tests_key" ]; then
    log "packing guest test scripts..."
    TSTAGE=$OUT/stage.tests
    rm -rf "$TSTAGE"
    mkdir -p "$TSTAGE/guest"
    for f in "${TEST_FILES[@]}"; do
        install -m 0755 "$f" "$TSTAGE/guest/$(basename "$f")"
    done
    (cd "$TSTAGE" && find . -print0 | LC_ALL=C sort -z |
        cpio --null -o -H newc --quiet --owner=0:0 | gzip -6n) >"$TESTS.tmp"
    mv "$TESTS.tmp" "$TESTS"
    echo "$tests_key" >"$OUT/tests.key"
    rm -rf "$TSTAGE"
fi

initrd_key="$base_key-$tests_key"
if [ ! -f "$OUT/initrd.img" ] || [ "$(cat "$OUT/initrd.key" 2>/dev/null)" != "$initrd_key" ]; then
    cat "$BASE" "$TESTS" >"$OUT/initrd.img.tmp"
    mv "$OUT/initrd.img.tmp" "$OUT/initrd.img"
    echo "$initrd_key" >"$OUT/initrd.key"
fi
if ! cmp -s "$KROOT/boot/vmlinuz-$KVER" "$OUT/vmlinuz" 2>/dev/null; then
    cp "$KROOT/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
fi

cat >"$OUT/guest.env" <<EOF
GUEST_KVER=$KVER
GUEST_KERNEL_PKG=$KPKG
GUEST_VMLINUZ=$OUT/vmlinuz
GUEST_INITRD=$OUT/initrd.img
EOF
log "ready: kernel $KVER, vmlinuz=$OUT/vmlinuz initrd=$OUT/initrd.img"
