# Debian 12 root filesystems for amd64 and arm64 (arm64 under qemu-user), shared by
# scripts/arm64_check.sh, scripts/build_deb.sh and scripts/deb_check.sh. Sourced, not run.
#
# debootstrap (--variant=minbase) runs once per architecture and its result is kept as a tarball in
# $DCUD_ROOTFS_CACHE (default /var/tmp/dcud-rootfs, outside the repository); every user then starts
# from a fresh copy of it in seconds instead of minutes (arm64 bootstraps under emulation).
#
# Environment: DCUD_ROOTFS_CACHE, DEBIAN_MIRROR (default http://deb.debian.org/debian),
# DEBIAN_SECURITY_MIRROR (default http://deb.debian.org/debian-security). Needs root.
# The caller defines log() and die() and calls rootfs_cleanup on exit (trap).

ROOTFS_CACHE="${DCUD_ROOTFS_CACHE:-/var/tmp/dcud-rootfs}"
ROOTFS_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ROOTFS_SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
ROOTFS_SUITE="bookworm"
# Bump when the way the base is made changes, so that old caches are not reused.
ROOTFS_FORMAT=1

# rootfs_host_tools ARCH...: the host tools for these architectures, installed when missing (a fresh
# Debian 12 host has none of them). debootstrap makes the rootfs; qemu-user-static runs arm64
# binaries (its binfmt entries are registered by rootfs_binfmt, binfmt-support is not needed).
rootfs_host_tools() {
    local arch pkg missing=()
    local wanted=(debootstrap)
    for arch in "$@"; do
        [ "$arch" = "$(dpkg --print-architecture)" ] || wanted+=(qemu-user-static)
    done
    for pkg in "${wanted[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "apt-get install ${missing[*]} (host tools)"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# rootfs_qemu_name ARCH: the qemu binfmt entry name of a Debian architecture.
rootfs_qemu_name() {
    case "$1" in
        arm64) echo aarch64 ;;
        armhf) echo arm ;;
        *) die "no qemu mapping for architecture $1" ;;
    esac
}

# rootfs_binfmt ARCH: make the kernel run ARCH binaries through qemu-user-static when ARCH is not the
# host's. Registers qemu-user-static's own entry (/usr/lib/binfmt.d/qemu-<name>.conf, flags OPF: F
# opens the interpreter at registration time, so it works inside a chroot without a copy of qemu
# there; O and P as qemu-user-static ships them) when the kernel does not know it yet.
rootfs_binfmt() {
    local arch="$1" name conf
    [ "$arch" = "$(dpkg --print-architecture)" ] && return
    name="$(rootfs_qemu_name "$arch")"
    [ -e "/proc/sys/fs/binfmt_misc/qemu-$name" ] && return
    [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    conf="/usr/lib/binfmt.d/qemu-$name.conf"
    [ -r "$conf" ] || die "no $conf: apt-get install qemu-user-static"
    log "registering the qemu-$name binfmt handler from $conf"
    # systemd-binfmt's file format is the kernel's register line.
    grep -v '^[#;]' "$conf" | grep -m1 ":qemu-$name:" >/proc/sys/fs/binfmt_misc/register
    [ -e "/proc/sys/fs/binfmt_misc/qemu-$name" ] || die "binfmt registration of qemu-$name failed"
}

# rootfs_base ARCH: prints the path of the cached base tarball of ARCH, making it when missing:
# debootstrap minbase with the security and updates suites in sources.list and a policy-rc.d that
# forbids starting services (a chroot shares the host's network: an installed mosquitto must not
# start and take port 1883; deb-systemd-invoke honours it too).
rootfs_base() {
    local arch="$1" tarball
    tarball="$ROOTFS_CACHE/$ROOTFS_SUITE-$arch-minbase-v$ROOTFS_FORMAT.tar"
    if [ ! -s "$tarball" ]; then
        mkdir -p "$ROOTFS_CACHE"
        # One debootstrap per architecture, also when two scripts ask at once.
        (
            flock 9
            [ -s "$tarball" ] || _rootfs_make_base "$arch" "$tarball"
        ) 9>"$tarball.lock" >&2 || die "making the $arch base rootfs failed"
    fi
    echo "$tarball"
}

_rootfs_make_base() {
    local arch="$1" tarball="$2" dir
    dir="$ROOTFS_CACHE/bootstrap-$arch"
    rootfs_host_tools "$arch"
    rootfs_binfmt "$arch"
    rm -rf "$dir"
    mkdir -p "$dir"
    log "debootstrap $ROOTFS_SUITE $arch (minbase) from $ROOTFS_MIRROR: once, then cached in $tarball"
    debootstrap --arch="$arch" --variant=minbase "$ROOTFS_SUITE" "$dir" "$ROOTFS_MIRROR" \
        || die "debootstrap failed (log: $dir/debootstrap/debootstrap.log)"
    [ "$(chroot "$dir" /usr/bin/dpkg --print-architecture)" = "$arch" ] || die "rootfs is not $arch"
    printf 'deb %s %s main\ndeb %s %s-updates main\ndeb %s %s-security main\n' \
        "$ROOTFS_MIRROR" "$ROOTFS_SUITE" "$ROOTFS_MIRROR" "$ROOTFS_SUITE" \
        "$ROOTFS_SECURITY_MIRROR" "$ROOTFS_SUITE" >"$dir/etc/apt/sources.list"
    printf '#!/bin/sh\n# dcud rootfs: never start services in this chroot\nexit 101\n' >"$dir/usr/sbin/policy-rc.d"
    chmod 0755 "$dir/usr/sbin/policy-rc.d"
    rm -f "$dir/var/cache/apt/archives/"*.deb
    tar --numeric-owner -C "$dir" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$dir"
}

# rootfs_fresh ARCH DIR: DIR becomes a fresh copy of the base rootfs of ARCH.
rootfs_fresh() {
    local arch="$1" dir="$2" tarball
    case "$dir" in
        /?*/?*) ;;
        *) die "refusing to make a rootfs in '$dir' (not a directory two levels below /)" ;;
    esac
    tarball="$(rootfs_base "$arch")"
    rootfs_umount "$dir"
    rm -rf "$dir"
    mkdir -p "$dir"
    tar --numeric-owner -C "$dir" -xpf "$tarball"
}

ROOTFS_MOUNTED=()
# rootfs_mount DIR: proc, sys, dev and dev/pts in the chroot, and the host's DNS and CA bundle (pip
# and apt in the chroot trust what the host trusts: a TLS-intercepting proxy's CA, say).
rootfs_mount() {
    local dir="$1" target
    for target in proc sys dev dev/pts; do
        mkdir -p "$dir/$target"
        if ! mountpoint -q "$dir/$target"; then
            case "$target" in
                proc) mount -t proc proc "$dir/proc" ;;
                sys) mount -t sysfs sysfs "$dir/sys" ;;
                dev) mount --bind /dev "$dir/dev" ;;
                dev/pts) mount --bind /dev/pts "$dir/dev/pts" ;;
            esac
            ROOTFS_MOUNTED=("$dir/$target" "${ROOTFS_MOUNTED[@]}")
        fi
    done
    cp /etc/resolv.conf "$dir/etc/resolv.conf"
    mkdir -p "$dir/etc/ssl/certs"
    cp "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$dir/etc/ssl/certs/host-ca-certificates.crt"
}

# rootfs_umount DIR: unmounts whatever is mounted below DIR (also what an interrupted run left).
rootfs_umount() {
    local dir="$1" target
    [ -d "$dir" ] || return 0
    for target in dev/pts dev sys proc; do
        if mountpoint -q "$dir/$target"; then umount -l "$dir/$target" || true; fi
    done
}

# rootfs_cleanup: unmounts everything this process mounted (for the caller's EXIT trap).
rootfs_cleanup() {
    local target
    for target in "${ROOTFS_MOUNTED[@]}"; do
        umount -l "$target" 2>/dev/null || true
    done
    ROOTFS_MOUNTED=()
}

# rootfs_run DIR TIMEOUT_S SCRIPT: runs SCRIPT with bash -euo pipefail in the chroot, in a clean
# environment (nothing of the host's Python or pip setup leaks in), bounded by TIMEOUT_S.
rootfs_run() {
    local dir="$1" timeout_s="$2" script="$3"
    timeout --kill-after=30 "$timeout_s" chroot "$dir" /usr/bin/env -i \
        HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
        PATH=/opt/dcud/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin \
        PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 PIP_ROOT_USER_ACTION=ignore \
        PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt \
        /bin/bash -euo pipefail -c "$script"
}

# rootfs_apt DIR TIMEOUT_S PACKAGE...: apt-get install without recommends in the chroot.
rootfs_apt() {
    local dir="$1" timeout_s="$2"
    shift 2
    rootfs_run "$dir" "$timeout_s" "
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends $* >/dev/null
        apt-get clean
    " >&2
}
