#!/usr/bin/env bash
# The benchmarks under qemu-aarch64 in the rootfs of scripts/arm64_check.sh; reports ratios (docs/arm.md).
#
#   sudo scripts/arm64_bench.sh [all|bridge|drives|footprint|ratios FILE]...     (default: all)
#
# Timings under user-mode emulation are not absolute (every instruction is translated; syscalls run
# natively), but ratios of two programs measured side by side in one run carry over far better: dcud
# against socat, ser2net and a bare Python relay on the same emulated CPU, dcud's idle RSS against its
# own import floor. The script
#   - reuses the rootfs and the /opt/dcud venv of scripts/arm64_check.sh (runs its bootstrap and install
#     stages first when they are missing) and adds ser2net to it (bench_bridge's second contender;
#     qemu-user 7.2 cannot run it on a tty, see scripts/arm64_bench_bridge.py, which then leaves it out);
#   - copies this checkout's dcud/, bench/, config/, scripts/ to /bench/src in the rootfs (not /src, which
#     arm64_check.sh owns) and runs them with PYTHONPATH=/bench/src, so the installed venv provides the
#     dependencies and this checkout the code (checked: dcud is imported from /bench/src);
#   - runs each benchmark with smaller sizes than on the host (BENCH_* below), bounded by
#     DCUD_ARM64_BENCH_TIMEOUT_S each (default 5400 s);
#   - writes the JSON lines to $DCUD_ARM64_BENCH_OUT (default /var/tmp/dcud-logs/arm64-bench-<time>.jsonl)
#     and prints the ratios (the `ratios` stage re-prints them from such a file).
#
# Run it at low priority on a shared machine: nice -n 19 sudo scripts/arm64_bench.sh.
# Needs root (chroot, mounts), like arm64_check.sh. Everything listens on 127.0.0.1 in the chroot.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
ROOT="${DCUD_ARM64_ROOT:-/var/tmp/dcud-arm64}"
TIMEOUT_S="${DCUD_ARM64_BENCH_TIMEOUT_S:-5400}"
OUT="${DCUD_ARM64_BENCH_OUT:-/var/tmp/dcud-logs/arm64-bench-$(date -u +%Y%m%dT%H%M%SZ).jsonl}"
MARKER="$ROOT/.dcud-arm64-v2"

log() { printf '== arm64-bench [%4ss]: %s\n' "$SECONDS" "$*" >&2; }
die() { printf 'arm64_bench: %s\n' "$*" >&2; exit 1; }

# shellcheck source=packaging/rootfs.sh
. "$REPO/packaging/rootfs.sh"

ratios() {
    python3 "$REPO/scripts/arm64_bench_ratios.py" "$1"
}

if [ "${1:-}" = "ratios" ]; then
    [ -n "${2:-}" ] || die "ratios needs the JSON lines file"
    ratios "$2"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "needs root (chroot, mounts): sudo $0 $*"
trap rootfs_cleanup EXIT

prepare() {
    if [ ! -e "$MARKER" ] || [ ! -x "$ROOT/opt/dcud/bin/python" ]; then
        log "no arm64 rootfs with /opt/dcud yet: scripts/arm64_check.sh bootstrap, install"
        "$REPO/scripts/arm64_check.sh" bootstrap
        "$REPO/scripts/arm64_check.sh" install
    fi
    rootfs_binfmt arm64
    rootfs_mount "$ROOT"
    if [ ! -x "$ROOT/usr/sbin/ser2net" ]; then
        log "apt-get install ser2net in the rootfs (under qemu)"
        rootfs_apt "$ROOT" "$TIMEOUT_S" ser2net
    fi
    log "copying dcud/, bench/, config/, scripts/ to $ROOT/bench/src"
    rm -rf "$ROOT/bench/src"
    mkdir -p "$ROOT/bench/src"
    tar -C "$REPO" --exclude='__pycache__' -cf - dcud bench config scripts | tar -C "$ROOT/bench/src" -xf -
    in_chroot 'python -c "import dcud, platform; assert dcud.__file__.startswith(\"/bench/src/\"), dcud.__file__; print(platform.machine(), dcud.__file__)"'
    mkdir -p "$(dirname "$OUT")"
}

in_chroot() {
    rootfs_run "$ROOT" "$TIMEOUT_S" "cd /bench/src && export PYTHONPATH=/bench/src && $1"
}

run_bench() {
    local name="$1" script="$2"
    log "$name under qemu-aarch64"
    # A benchmark that fails still leaves the others' lines; its error is in the log.
    if ! in_chroot "$script" | tee -a "$OUT"; then
        log "$name FAILED"
        printf '{"bench": "%s", "failed": true}\n' "$name" >>"$OUT"
    fi
}

stage_bridge() {
    # bench_bridge.py's trials (scripts/arm64_bench_bridge.py: without ser2net where it cannot open a tty).
    # Fewer rounds than on the host (3000 x 3): emulation is 5-20x slower; the ratios are what matter.
    run_bench bridge 'BENCH_ROUNDS=1000 BENCH_WARMUP=100 BENCH_TRIALS=3 python scripts/arm64_bench_bridge.py'
}

stage_drives() {
    # udp_multicast in a private network namespace (root in the chroot may unshare -n).
    run_bench drives 'BENCH_INTERFACES=udp_multicast BENCH_WINDOW_S=20 python bench/bench_drives.py'
}

stage_footprint() {
    run_bench footprint 'BENCH_IDLE_S=10 BENCH_SETTLE_S=5 python bench/bench_footprint.py --quick'
}

stages=("$@")
[ "${#stages[@]}" -gt 0 ] || stages=(all)
[ "${stages[0]}" != all ] || stages=(bridge drives footprint)
for stage in "${stages[@]}"; do
    case "$stage" in
        bridge | drives | footprint) ;;
        *) die "unknown stage $stage (all|bridge|drives|footprint|ratios FILE)" ;;
    esac
done
prepare
log "results: $OUT"
for stage in "${stages[@]}"; do
    "stage_$stage"
done
ratios "$OUT"
log "done: $OUT"
