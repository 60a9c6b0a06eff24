#!/usr/bin/env bash
# On-demand proof that dcud installs and runs on arm64 (docs/arm.md); not part of every CI run.
#
#   sudo scripts/arm64_check.sh [all|bootstrap|install|test|e2e|clean]     (default: all)
#
# What it does, on an amd64 Debian 12 host (it installs debootstrap and qemu-user-static when missing):
#   bootstrap  a Debian bookworm arm64 rootfs in $DCUD_ARM64_ROOT (default /var/tmp/dcud-arm64,
#              outside the repository; kept and reused), copied from the cached minbase debootstrap
#              of packaging/rootfs.sh, plus the packages in PACKAGES below from the Debian mirror.
#              No compiler: nothing can be compiled in it. Registers qemu-user-static's
#              qemu-aarch64 binfmt entry first when the kernel does not know it yet (its flags are
#              OPF; F makes it work in the chroot without a copy of qemu there).
#   install    copies this checkout (dcud/, tests/, scripts/, config/, pyproject.toml, README.md) to
#              /src and, inside the arm64 chroot, builds dcud's wheel and installs it into a venv at
#              /opt/dcud with its dependencies from wheels only (pip --only-binary :all:): a runtime
#              dependency that has no aarch64 wheel fails here, loudly. Then the `test` extra of
#              pyproject.toml (no compiler in the rootfs: a test tool that would need one fails too;
#              pyftpdlib, pure Python and published only as an sdist, is built from it).
#   test       the pure tests under qemu (codecs, vectors, property tests, WM-E parser, config,
#              crypto envelope, fuzz harnesses at the "ci" profile), then `dcud check-config` of
#              config/dcud.toml (must say OK, exit 0) and of a broken copy (must exit 78).
#   e2e        scripts/arm64_e2e.py inside the chroot: Mosquitto, simulated M-Bus and IEC meters on
#              ptys, `dcud run` as a process: READY=1, readings on MQTT, a curl upload on the config
#              port (200, and a bad one 422), SIGHUP reload, SIGTERM; prints one JSON line.
#   clean      unmounts and removes the rootfs (the cached base stays: packaging/rootfs.sh).
#
# Environment: DCUD_ARM64_ROOT, DEBIAN_MIRROR (default http://deb.debian.org/debian),
# DCUD_ARM64_TIMEOUT_S (hard bound of each stage, default 3600), DCUD_ROOTFS_CACHE. Needs root
# (debootstrap, chroot, mounts). Everything listens on 127.0.0.1 inside the chroot (it shares the
# host's network stack; the rootfs's policy-rc.d keeps the installed mosquitto from starting).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
ROOT="${DCUD_ARM64_ROOT:-/var/tmp/dcud-arm64}"
STAGE_TIMEOUT_S="${DCUD_ARM64_TIMEOUT_S:-3600}"
# Python and the test peers; no gcc, no -dev packages (see docs/arm.md).
PACKAGES="python3 python3-venv mosquitto socat curl ca-certificates procps iproute2"
# A new name whenever PACKAGES changes: an old rootfs (one with a compiler) is made again.
MARKER="$ROOT/.dcud-arm64-v2"

log() { printf '== arm64 [%4ss]: %s\n' "$SECONDS" "$*" >&2; }
die() { printf 'arm64_check: %s\n' "$*" >&2; exit 1; }

# shellcheck source=packaging/rootfs.sh
. "$REPO/packaging/rootfs.sh"

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot, mounts): sudo $0 $*"
trap rootfs_cleanup EXIT

in_chroot() { rootfs_run "$ROOT" "$STAGE_TIMEOUT_S" "$1"; }

stage_bootstrap() {
    rootfs_host_tools arm64
    rootfs_binfmt arm64
    if [ -e "$MARKER" ]; then
        log "rootfs $ROOT already bootstrapped"
        return
    fi
    log "fresh arm64 rootfs in $ROOT, then apt-get install $PACKAGES (under qemu)"
    rootfs_fresh arm64 "$ROOT"
    rootfs_mount "$ROOT"
    rootfs_apt "$ROOT" "$STAGE_TIMEOUT_S" "$PACKAGES"
    [ "$(chroot "$ROOT" /usr/bin/dpkg --print-architecture)" = "arm64" ] || die "rootfs is not arm64"
    for compiler in cc gcc c++ g++ clang; do
        [ ! -e "$ROOT/usr/bin/$compiler" ] || die "a compiler got into the rootfs: /usr/bin/$compiler"
    done
    touch "$MARKER"
}

stage_install() {
    [ -e "$MARKER" ] || die "run the bootstrap stage first"
    rootfs_binfmt arm64
    rootfs_mount "$ROOT"
    log "copying the checkout to $ROOT/src"
    rm -rf "$ROOT/src"
    mkdir -p "$ROOT/src"
    tar -C "$REPO" --exclude='__pycache__' --exclude='*.egg-info' \
        -cf - pyproject.toml README.md dcud tests scripts config | tar -C "$ROOT/src" -xf -
    log "pip install dcud into /opt/dcud inside the arm64 chroot (dependencies: wheels only)"
    in_chroot '
        uname -m
        python3 --version
        [ -x /opt/dcud/bin/python ] || python3 -m venv /opt/dcud
        pip=/opt/dcud/bin/pip
        rm -rf /tmp/dcud-wheel
        $pip wheel --quiet --no-deps --wheel-dir /tmp/dcud-wheel /src
        wheel="$(ls /tmp/dcud-wheel/dcud-*.whl)"
        # The runtime dependencies (pyproject.toml, through the wheel): aarch64 wheels or nothing.
        $pip install --quiet --force-reinstall --no-deps "$wheel"
        $pip install --quiet --only-binary :all: "$wheel"
        # The test extra: wheels where there are; there is no compiler to build anything else.
        $pip install --quiet --prefer-binary --no-compile "$wheel[test]"
        $pip check
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
    rootfs_binfmt arm64
    rootfs_mount "$ROOT"
    log "pure tests under qemu-aarch64"
    in_chroot '
        cd /src
        files=""
        for f in tests/codec/test_iec_codec.py tests/codec/test_iec_props.py tests/codec/test_iec_vectors.py \
                 tests/codec/test_iec_session.py tests/codec/test_mbus_codec.py tests/codec/test_mbus_props.py \
                 tests/codec/test_mbus_vectors.py tests/codec/test_mbus_session.py tests/config/test_wme_catalogue.py \
                 tests/config/test_wme_parser.py tests/config/test_config.py tests/service/test_crypto_envelope.py tests/fuzz; do
            [ -e "$f" ] && files="$files $f"
        done
        DCUD_FUZZ_PROFILE=ci /opt/dcud/bin/python -m pytest -q -p no:cacheprovider -m "not slow" $files
        /opt/dcud/bin/python -c "import platform; assert platform.machine() == \"aarch64\", platform.machine()"
    '
    log "dcud check-config under qemu-aarch64"
    in_chroot '
        /opt/dcud/bin/dcud check-config -c /src/config/dcud.toml
        rm -rf /tmp/dcud-bad && cp -r /src/config /tmp/dcud-bad
        echo "no_such_key = 1" >>/tmp/dcud-bad/dcud.toml
        rc=0
        /opt/dcud/bin/dcud check-config -c /tmp/dcud-bad/dcud.toml || rc=$?
        [ "$rc" -eq 78 ] || { echo "check-config of a broken dcud.toml exited $rc, not 78" >&2; exit 1; }
        echo "check-config of a broken dcud.toml: exit 78, as it must"
    '
}

stage_e2e() {
    rootfs_binfmt arm64
    rootfs_mount "$ROOT"
    log "end-to-end run with simulators under qemu-aarch64"
    in_chroot 'cd /src && /opt/dcud/bin/python scripts/arm64_e2e.py --workdir /tmp/dcud-e2e'
}

stage_clean() {
    rootfs_umount "$ROOT"
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
