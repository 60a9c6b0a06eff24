#!/usr/bin/env bash
# On-demand proof that dcud installs and runs on arm64 (docs/arm.md); not part of every CI run.
#
#   sudo scripts/arm64_check.sh [all|bootstrap|install|test|e2e|clean]     (default: all)
#
# What it does, on an amd64 Debian 12 host with debootstrap and qemu-user-static:
#   bootstrap  debootstrap Debian bookworm arm64 into $DCUD_ARM64_ROOT (default /var/tmp/dcud-arm64,
#              outside the repository; kept and reused, ~10 min the first time), with python3,
#              python3-venv, mosquitto, socat and curl from the Debian mirror. Registers the qemu
#              aarch64 binfmt handler first when the kernel does not know it yet (flag F: works in
#              the chroot without copying qemu into it).
#   install    copies this checkout (dcud/, tests/, scripts/, config/, pyproject.toml) to /src
#              and runs `pip install /src` plus the test tools in a venv at /opt/dcud, inside the
#              arm64 chroot: the aarch64 wheels of msgspec, uvloop, cryptography, cffi are used.
#   test       the pure tests under qemu (codecs, vectors, property tests, WM-E parser, config,
#              crypto envelope, fuzz harnesses at the "ci" profile) plus `dcud check-config`.
#   e2e        scripts/arm64_e2e.py inside the chroot: Mosquitto, simulated M-Bus and IEC meters on
#              ptys, `dcud run` as a process: READY=1, readings on MQTT, a curl upload on the config
#              port (200, and a bad one 422), SIGHUP reload, SIGTERM; prints one JSON line.
#   clean      unmounts and removes the rootfs.
#
# Environment: DCUD_ARM64_ROOT, DEBIAN_MIRROR (default http://deb.debian.org/debian),
# DCUD_ARM64_TIMEOUT_S (hard bound of each stage, default 3600). Needs root (debootstrap, chroot,
# mounts). Everything listens on 127.0.0.1 inside the chroot (it shares the host's network stack).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
ROOT="${DCUD_ARM64_ROOT:-/var/tmp/dcud-arm64}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE="bookworm"
STAGE_TIMEOUT_S="${DCUD_ARM64_TIMEOUT_S:-3600}"
PACKAGES="python3,python3-venv,python3-dev,gcc,libc6-dev,libffi-dev,mosquitto,socat,curl,ca-certificates,procps,iproute2"
BINFMT_CONF="/usr/lib/binfmt.d/qemu-aarch64.conf"
MARKER="$ROOT/.dcud-bootstrap-ok"

log() { printf '== arm64 [%4ss]: %s\n' "$SECONDS" "$*" >&2; }
die() { printf 'arm64_check: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot, mounts): sudo $0 $*"

ensure_binfmt() {
    if [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        return
    fi
    [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    [ -r "$BINFMT_CONF" ] || die "no $BINFMT_CONF: apt-get install qemu-user-static"
    log "registering the qemu-aarch64 binfmt handler"
    # systemd-binfmt's file format is the kernel's register line.
    grep -v '^[#;]' "$BINFMT_CONF" | grep -m1 ':qemu-aarch64:' >/proc/sys/fs/binfmt_misc/register
    [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || die "binfmt registration failed"
}

MOUNTED=()
mount_all() {
    local target
    for target in proc sys dev dev/pts; do
        mkdir -p "$ROOT/$target"
        if ! mountpoint -q "$ROOT/$target"; then
            case "$target" in
                proc) mount -t proc proc "$ROOT/proc" ;;
                sys) mount -t sysfs sysfs "$ROOT/sys" ;;
                dev) mount --bind /dev "$ROOT/dev" ;;
                dev/pts) mount --bind /dev/pts "$ROOT/dev/pts" ;;
            esac
            MOUNTED=("$ROOT/$target" "${MOUNTED[@]}")
        fi
    done
    cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
    # pip in the chroot trusts what the host trusts (a proxy's CA on a CI network, say).
    cp "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$ROOT/etc/ssl/certs/host-ca-certificates.crt"
}

umount_all() {
    local target
    for target in "${MOUNTED[@]}"; do
        umount -l "$target" 2>/dev/null || true
    done
    MOUNTED=()
}
trap umount_all EXIT

in_chroot() {
    # A clean environment: nothing of the host's Python setup leaks in.
    timeout --kill-after=30 "$STAGE_TIMEOUT_S" chroot "$ROOT" /usr/bin/env -i \
        HOME=/root LANG=C.UTF-8 PATH=/opt/dcud/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin \
        PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 PYTHONDONTWRITEBYTECODE=1 \
        PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt \
        /bin/bash -euo pipefail -c "$1"
}

stage_bootstrap() {
    ensure_binfmt
    if [ -e "$MARKER" ]; then
        log "rootfs $ROOT already bootstrapped"
        return
    fi
    command -v debootstrap >/dev/null || die "apt-get install debootstrap qemu-user-static"
    rm -rf "$ROOT"
    mkdir -p "$(dirname "$ROOT")"
    log "debootstrap $SUITE arm64 into $ROOT from $MIRROR (slow under qemu)"
    timeout --kill-after=30 "$STAGE_TIMEOUT_S" debootstrap --arch=arm64 --variant=minbase \
        --include="$PACKAGES" "$SUITE" "$ROOT" "$MIRROR"
    [ "$(chroot "$ROOT" /usr/bin/dpkg --print-architecture)" = "arm64" ] || die "rootfs is not arm64"
    touch "$MARKER"
}

stage_install() {
    [ -e "$MARKER" ] || die "run the bootstrap stage first"
    ensure_binfmt
    mount_all
    log "copying the checkout to $ROOT/src"
    rm -rf "$ROOT/src"
    mkdir -p "$ROOT/src"
    tar -C "$REPO" --exclude='__pycache__' --exclude='*.egg-info' \
        -cf - pyproject.toml dcud tests scripts config $( [ -e "$REPO/README.md" ] && echo README.md ) \
        | tar -C "$ROOT/src" -xf -
    if [ ! -e "$ROOT/src/README.md" ]; then
        # pyproject.toml names README.md as the long description; only the copy gets a stand-in.
        echo "dcud" >"$ROOT/src/README.md"
    fi
    log "pip install dcud into /opt/dcud inside the arm64 chroot"
    in_chroot '
        uname -m
        python3 --version
        [ -x /opt/dcud/bin/python ] || python3 -m venv /opt/dcud
        /opt/dcud/bin/python -m pip install -q /src pytest pytest-asyncio pytest-timeout hypothesis
        /opt/dcud/bin/python - <<EOF
import platform, importlib
mods = {}
for name in ("msgspec", "cryptography", "h11", "structlog", "aiomqtt", "uvloop", "serial_asyncio", "pysnmp"):
    try:
        module = importlib.import_module(name)
        mods[name] = getattr(module, "__version__", "ok")
    except ImportError as exc:
        mods[name] = f"missing: {exc}"
print({"machine": platform.machine(), "python": platform.python_version(), **mods})
EOF
        /opt/dcud/bin/dcud --help >/dev/null
    '
}

stage_test() {
    ensure_binfmt
    mount_all
    log "pure tests under qemu-aarch64"
    in_chroot '
        cd /src
        files=""
        for f in tests/test_iec_codec.py tests/test_iec_props.py tests/test_iec_vectors.py \
                 tests/test_iec_session.py tests/test_mbus_codec.py tests/test_mbus_props.py \
                 tests/test_mbus_vectors.py tests/test_mbus_session.py tests/test_wme_catalogue.py \
                 tests/test_wme_parser.py tests/test_config.py tests/test_crypto_envelope.py tests/fuzz; do
            [ -e "$f" ] && files="$files $f"
        done
        DCUD_FUZZ_PROFILE=ci /opt/dcud/bin/python -m pytest -q -p no:cacheprovider -m "not slow" $files
        /opt/dcud/bin/python -c "import platform; assert platform.machine() == \"aarch64\", platform.machine()"
    '
}

stage_e2e() {
    ensure_binfmt
    mount_all
    log "end-to-end run with simulators under qemu-aarch64"
    in_chroot 'cd /src && /opt/dcud/bin/python scripts/arm64_e2e.py --workdir /tmp/dcud-e2e'
}

stage_clean() {
    for target in dev/pts dev sys proc; do
        mountpoint -q "$ROOT/$target" && umount -l "$ROOT/$target"
    done
    rm -rf "$ROOT"
}

case "${1:-all}" in
    bootstrap) stage_bootstrap ;;
    install) stage_install ;;
    test) stage_test ;;
    e2e) stage_e2e ;;
    clean) stage_clean ;;
    all)
        stage_bootstrap
        stage_install
        stage_test
        stage_e2e
        log "OK"
        ;;
    *) die "unknown stage $1 (all|bootstrap|install|test|e2e|clean)" ;;
esac
