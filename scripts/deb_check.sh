#!/usr/bin/env bash
# Installs dcud's .deb into a fresh Debian 12 rootfs and checks install, upgrade and purge
# (docs/debian.md), on demand; not part of CI:
#
#   sudo scripts/deb_check.sh [amd64] [arm64]        (default: both; packages from scripts/build_deb.sh)
#
# For each architecture, in a fresh copy of the minbase rootfs (packaging/rootfs.sh; arm64 under
# qemu-user), with dpkg and apt as an administrator uses them:
#   1. apt-get satisfies the package's Depends from the Debian mirror (timed apart), then
#      `apt-get install ./dcud_<version>_<arch>.deb` (timed): user dcud in dialout and gpio,
#      /etc/dcud/* root:dcud 0640, /var/lib/dcud dcud:dcud 0750, the unit enabled and NOT started
#      (the examples are not a configuration of this box), `dcud check-config` run as user dcud,
#      `systemd-analyze verify` of the installed unit silent, every dcud module and the compiled
#      dependencies import for user dcud, the shipped byte code is current, /usr/bin/dcud on PATH.
#   2. the installer edits dcud.toml and dcud has state in /var/lib/dcud; the same version is
#      installed again: both kept, dcud stopped before and started after (it is configured now).
#   3. a bumped version (this package repacked as <version>+upgradetest1 with both examples changed)
#      is installed with --force-confold, as unattended upgrades do: the edited dcud.toml is kept (the
#      new example lands in dcud.toml.dpkg-dist), the unedited wme.conf is the new one, state kept.
#   4. a dcud.toml that does not load: the upgrade still succeeds, dcud is not started, postinst says why.
#   5. remove keeps /etc/dcud and /var/lib/dcud, purge deletes both and the enable symlink.
# systemd is not PID 1 in a chroot: /run/systemd/system is created and systemctl and
# deb-systemd-invoke are diverted to stubs that record their calls, so that what the maintainer
# scripts ask systemd to do is checked (start only when configured, stop before upgrade and removal),
# not what systemd then does.
#
# Environment: DCUD_DEB_DIR (default dist/deb), DCUD_CHECK_TIMEOUT_S (bound of each step, default
# 1800), DCUD_CHECK_KEEP=1 keeps the rootfs ($DCUD_ROOTFS_CACHE/check-<arch>) for a look inside.
# Prints one JSON line per architecture (timings in seconds, sizes); exits 1 when a check failed.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
DEB_DIR="${DCUD_DEB_DIR:-$REPO/dist/deb}"
STEP_TIMEOUT_S="${DCUD_CHECK_TIMEOUT_S:-1800}"

log() { printf '== deb_check [%4ss]: %s\n' "$SECONDS" "$*" >&2; }
die() { printf 'deb_check: %s\n' "$*" >&2; exit 1; }

# shellcheck source=packaging/rootfs.sh
. "$REPO/packaging/rootfs.sh"

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot, mounts): sudo $0 $*"

ROOT=""
FAILED=()
TIMINGS=()
in_root() { rootfs_run "$ROOT" "$STEP_TIMEOUT_S" "$1"; }
check() {  # check NAME COMMAND...: COMMAND (in the host shell) must succeed
    local name="$1"
    shift
    if "$@"; then
        printf '   ok: %s\n' "$name" >&2
    else
        printf '   FAIL: %s\n' "$name" >&2
        FAILED+=("$name")
    fi
}
OUT=""
step() {  # step KEY SCRIPT: runs SCRIPT in the rootfs, its output in $OUT, its duration recorded as KEY
    local key="$1" start rc=0
    start="$(date +%s.%N)"
    in_root "$2" >"$ROOT/tmp/step.log" 2>&1 || rc=$?
    [ "$key" = - ] || TIMINGS+=("\"$key\": $(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')")
    OUT="$(cat "$ROOT/tmp/step.log")"
    if [ "$rc" -ne 0 ]; then printf '%s\n' "$OUT" | sed 's/^/      /' >&2; fi
    return "$rc"
}
calls_since() {  # the starts and stops of dcud asked for since the last call, on one line
    local log="$ROOT/var/log/dcud-check/calls.log" seen="$ROOT/var/log/dcud-check/seen"
    touch "$log" "$seen"
    tail -n +"$(($(wc -l <"$seen") + 1))" "$log" | grep '^deb-systemd-invoke .*dcud' | tr '\n' ';' || true
    cp "$log" "$seen"
}
mode_of() { in_root "stat -c '%a %U %G' $1"; }

# bumped DEB OUTDIR: DEB repacked as <version>+upgradetest1 with both examples changed; prints its path.
bumped() {
    local deb="$1" outdir="$2" tree version new
    tree="$outdir/bumped-tree"
    rm -rf "$tree"
    dpkg-deb -R "$deb" "$tree"
    version="$(dpkg-deb -f "$deb" Version)+upgradetest1"
    sed -i "s/^Version: .*/Version: $version/" "$tree/DEBIAN/control"
    for file in etc/dcud/dcud.toml etc/dcud/wme.conf usr/share/dcud/examples/dcud.toml \
        usr/share/dcud/examples/wme.conf; do
        printf '# changed in %s\n' "$version" >>"$tree/$file"
    done
    (cd "$tree" && find . -path ./DEBIAN -prune -o -path ./etc -prune -o -type f -printf '%P\0' \
        | LC_ALL=C sort -z | xargs -0 md5sum) >"$tree/DEBIAN/md5sums"
    new="$outdir/dcud_${version}_$(dpkg-deb -f "$deb" Architecture).deb"
    dpkg-deb --root-owner-group -Zgzip --build "$tree" "$new" >/dev/null
    rm -rf "$tree"
    echo "$new"
}

check_arch() {
    local arch="$1" deb up version calls
    deb="$(find "$DEB_DIR" -maxdepth 1 -name "dcud_*_$arch.deb" ! -name '*upgradetest*' -printf '%T@ %p\n' \
        | sort -n | tail -n 1 | cut -d' ' -f2-)"
    [ -n "$deb" ] || die "no dcud_*_$arch.deb in $DEB_DIR: run scripts/build_deb.sh $arch first"
    version="$(dpkg-deb -f "$deb" Version)"
    log "$arch: $deb ($version)"
    FAILED=()
    TIMINGS=()
    ROOT="$ROOTFS_CACHE/check-$arch"
    rootfs_host_tools "$arch"
    rootfs_binfmt "$arch"
    rootfs_fresh "$arch" "$ROOT"
    rootfs_mount "$ROOT"
    mkdir -p "$ROOT/tmp/debs"
    cp "$deb" "$ROOT/tmp/debs/"
    up="$(bumped "$deb" "$ROOT/tmp/debs")"
    deb="/tmp/debs/$(basename "$deb")"
    up="/tmp/debs/$(basename "$up")"

    log "$arch: the package's dependencies from the mirror"
    step deps_install_s "
        apt-get update -qq
        apt-get satisfy -y -qq --no-install-recommends '$(dpkg-deb -f "$ROOT$deb" Depends)'
    " || die "apt-get satisfy failed"
    # "systemd is running": its two entry points record what they are asked instead of doing it,
    # except systemctl's offline work on unit files (--root=/: deb-systemd-helper enables through
    # `systemctl --root=/ preset`), which the real one does.
    in_root '
        mkdir -p /var/log/dcud-check /run/systemd/system
        for tool in /usr/bin/systemctl /usr/bin/deb-systemd-invoke; do
            dpkg-divert --quiet --local --no-rename --add "$tool"
            cp -p "$tool" "$tool.distrib"
        done'
    cat >"$ROOT/usr/bin/systemctl" <<'STUB'
#!/bin/sh
echo "systemctl $*" >>/var/log/dcud-check/calls.log
case " $* " in *" --root="*) exec /usr/bin/systemctl.distrib "$@" ;; esac
exit 0
STUB
    cat >"$ROOT/usr/bin/deb-systemd-invoke" <<'STUB'
#!/bin/sh
echo "deb-systemd-invoke $*" >>/var/log/dcud-check/calls.log
exit 0
STUB
    calls_since >/dev/null

    log "$arch: install"
    step install_s "apt-get install -y -q --no-install-recommends $deb" || die "apt-get install failed"
    calls="$(calls_since)"
    check "installed" test "$(in_root "dpkg-query -W -f='\${Status} \${Version}' dcud")" = "install ok installed $version"
    check "user dcud in dialout and gpio" in_root 'id -nG dcud | tr " " "\n" | grep -qx dialout && id -nG dcud | tr " " "\n" | grep -qx gpio'
    check "/etc/dcud/dcud.toml root:dcud 0640" test "$(mode_of /etc/dcud/dcud.toml)" = "640 root dcud"
    check "/etc/dcud/wme.conf root:dcud 0640" test "$(mode_of /etc/dcud/wme.conf)" = "640 root dcud"
    check "/var/lib/dcud dcud:dcud 0750" test "$(mode_of /var/lib/dcud)" = "750 dcud dcud"
    check "enabled" test -L "$ROOT/etc/systemd/system/multi-user.target.wants/dcud.service"
    check "not started on the examples [$calls]" test -z "$calls"
    check "daemon-reload asked" grep -qx 'systemctl --system daemon-reload' "$ROOT/var/log/dcud-check/calls.log"
    check "postinst says it is not started" grep -q 'enabled, not started' <<<"$OUT"
    check "/usr/bin/dcud --version" test "$(in_root '/usr/bin/dcud --version')" = "dcud ${version%-*}"
    step - 'runuser -u dcud -- /usr/bin/dcud check-config -c /etc/dcud/dcud.toml' || true
    printf '      %s\n' "$OUT" >&2
    check "dcud check-config (as dcud)" grep -q ': OK' <<<"$OUT"
    step - 'systemd-analyze verify /usr/lib/systemd/system/dcud.service' || true
    [ -z "$OUT" ] || printf '      %s\n' "$OUT" >&2
    check "systemd-analyze verify silent" test -z "$OUT"
    cp "$REPO/packaging/import_probe.py" "$ROOT/tmp/"
    step - 'runuser -u dcud -- /opt/dcud/bin/python /tmp/import_probe.py' || true
    printf '      %s\n' "$OUT" >&2
    check "every module imports (native ones too)" grep -q '"failed": \[\]' <<<"$OUT"
    # The shipped byte code is current: root, who could write it, finds nothing to rewrite (the
    # service cannot write /opt and would compile in memory at every start, slowly on a DCU).
    step - 'touch /tmp/before-import; /opt/dcud/bin/python /tmp/import_probe.py >/dev/null
            find /opt/dcud -newer /tmp/before-import -name "*.pyc"' || true
    check "shipped byte code is current [$OUT]" test -z "$OUT"

    log "$arch: the installer configures dcud; the same version again"
    in_root "sed -i 's/^device_id = .*/device_id = \"dcu-debcheck\"/' /etc/dcud/dcud.toml
             runuser -u dcud -- sh -c 'echo kept >/var/lib/dcud/state-marker'"
    step reinstall_s "dpkg -i $deb" || FAILED+=("reinstall")
    calls="$(calls_since)"
    check "edited dcud.toml kept (reinstall)" grep -q '^device_id = "dcu-debcheck"' "$ROOT/etc/dcud/dcud.toml"
    check "state kept (reinstall)" test -f "$ROOT/var/lib/dcud/state-marker"
    check "stopped before, started after: configured [$calls]" \
        test "$calls" = "deb-systemd-invoke stop dcud.service;deb-systemd-invoke start dcud.service;"

    log "$arch: upgrade to $(basename "$up")"
    step upgrade_s "dpkg -i --force-confdef --force-confold $up" || FAILED+=("upgrade")
    calls="$(calls_since)"
    check "upgraded" test "$(in_root "dpkg-query -W -f='\${Version}' dcud")" = "$version+upgradetest1"
    check "edited dcud.toml kept (upgrade)" grep -q '^device_id = "dcu-debcheck"' "$ROOT/etc/dcud/dcud.toml"
    check "new example beside it: dcud.toml.dpkg-dist" grep -q 'upgradetest1' "$ROOT/etc/dcud/dcud.toml.dpkg-dist"
    check "unedited wme.conf replaced by the new one" grep -q 'upgradetest1' "$ROOT/etc/dcud/wme.conf"
    check "modes kept (upgrade)" test "$(mode_of /etc/dcud/wme.conf)" = "640 root dcud"
    check "state kept (upgrade)" test -f "$ROOT/var/lib/dcud/state-marker"
    check "stopped before, started after: upgrade [$calls]" \
        test "$calls" = "deb-systemd-invoke stop dcud.service;deb-systemd-invoke start dcud.service;"

    log "$arch: a configuration that does not load"
    cp "$ROOT/etc/dcud/dcud.toml" "$ROOT/tmp/dcud.toml.good"
    echo 'no_such_key = 1' >>"$ROOT/etc/dcud/dcud.toml"
    step - "dpkg -i --force-confdef --force-confold $up" || FAILED+=("reinstall with a bad config")
    calls="$(calls_since)"
    check "bad config: stopped, not started [$calls]" test "$calls" = "deb-systemd-invoke stop dcud.service;"
    check "bad config: postinst names the error" grep -q 'no_such_key' <<<"$OUT"
    cp "$ROOT/tmp/dcud.toml.good" "$ROOT/etc/dcud/dcud.toml"

    log "$arch: remove, then purge"
    step remove_s 'dpkg -r dcud' || FAILED+=("remove")
    calls="$(calls_since)"
    check "remove: stopped [$calls]" test "$calls" = "deb-systemd-invoke stop dcud.service;"
    check "remove: /opt/dcud and /usr/bin/dcud gone" test ! -e "$ROOT/opt/dcud" -a ! -L "$ROOT/usr/bin/dcud"
    check "remove: /etc/dcud kept" grep -q '^device_id = "dcu-debcheck"' "$ROOT/etc/dcud/dcud.toml"
    check "remove: /var/lib/dcud kept" test -f "$ROOT/var/lib/dcud/state-marker"
    step purge_s 'dpkg -P dcud' || FAILED+=("purge")
    check "purge: /etc/dcud gone" test ! -e "$ROOT/etc/dcud"
    check "purge: /var/lib/dcud gone" test ! -e "$ROOT/var/lib/dcud"
    check "purge: enable symlink gone" test ! -L "$ROOT/etc/systemd/system/multi-user.target.wants/dcud.service"
    check "purge: unknown to dpkg" test -z "$(in_root "dpkg-query -W -f='\${Status}' dcud 2>/dev/null" || true)"

    rootfs_cleanup
    if [ -z "${DCUD_CHECK_KEEP:-}" ]; then rm -rf "$ROOT"; fi
    local failed_json="" local_deb
    local_deb="$DEB_DIR/$(basename "$deb")"
    if [ "${#FAILED[@]}" -gt 0 ]; then failed_json="$(printf '"%s", ' "${FAILED[@]}")"; fi
    printf '{"arch": "%s", "version": "%s", "deb_bytes": %s, "installed_size_kib": %s, %s, "failed": [%s], "ok": %s}\n' \
        "$arch" "$version" "$(stat -c %s "$local_deb")" "$(dpkg-deb -f "$local_deb" Installed-Size)" \
        "$(IFS=,; echo "${TIMINGS[*]}")" "${failed_json%, }" "$([ "${#FAILED[@]}" -eq 0 ] && echo true || echo false)"
    [ "${#FAILED[@]}" -eq 0 ]
}

trap rootfs_cleanup EXIT
arches=("$@")
[ "${#arches[@]}" -gt 0 ] || arches=(amd64 arm64)
status=0
for arch in "${arches[@]}"; do
    check_arch "$arch" || status=1
done
exit "$status"
