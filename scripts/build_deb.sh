#!/usr/bin/env bash
# Builds dcud's Debian 12 packages (docs/debian.md), on demand; not part of CI:
#
#   sudo scripts/build_deb.sh [amd64] [arm64]             (default: both)   -> dist/deb/dcud_<version>_<arch>.deb
#   scripts/build_deb.sh --assemble VENV ARCH OUTDIR       packages a venv built elsewhere (no root; tests)
#
# For each architecture, in a Debian 12 chroot of that architecture (packaging/rootfs.sh; arm64 runs
# under qemu-user, because a venv holds the interpreter's architecture and its own path and cannot be
# moved): /opt/dcud is made afresh with `python3.11 -m venv --without-pip`, dcud's wheel is built from
# this checkout, and it is installed with its dependencies from PyPI with --only-binary :all:, so a
# dependency without a wheel for the architecture fails the build instead of being compiled. The
# dependency list is pyproject.toml's, through the wheel's metadata. The versions resolved for the
# first architecture constrain the next ones, so that all packages carry the same versions
# (DCUD_CONSTRAINTS=FILE pins them from a file instead, e.g. a release's requirements.txt).
# Debug information is stripped from the extension modules and every module is imported once. The
# package is then put together with dpkg-deb from the venv, systemd/, config/ and packaging/debian/.
#
# Environment: DCUD_DEB_OUT (default dist/deb), DCUD_DEB_REVISION (Debian revision, default 1),
# DCUD_DEB_MAINTAINER, DCUD_CONSTRAINTS, DCUD_BUILD_TIMEOUT_S (bound of each chroot step, default 3600),
# and packaging/rootfs.sh's DCUD_ROOTFS_CACHE, DEBIAN_MIRROR. Prints one JSON line per package.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${DCUD_DEB_OUT:-$REPO/dist/deb}"
REVISION="${DCUD_DEB_REVISION:-1}"
MAINTAINER="${DCUD_DEB_MAINTAINER:-dcud maintainers <dcud@localhost>}"
STEP_TIMEOUT_S="${DCUD_BUILD_TIMEOUT_S:-3600}"
PYVER=3.11

log() { printf '== build_deb [%4ss]: %s\n' "$SECONDS" "$*" >&2; }
die() { printf 'build_deb: %s\n' "$*" >&2; exit 1; }

# shellcheck source=packaging/rootfs.sh
. "$REPO/packaging/rootfs.sh"

# elf_machine ARCH: the ELF e_machine (bytes 18-19, little endian) of a Debian architecture.
elf_machine() {
    case "$1" in
        amd64) echo "3e 00" ;;
        arm64) echo "b7 00" ;;
        *) die "unsupported architecture $1 (amd64, arm64)" ;;
    esac
}

# debian_version PEP440: 0.2.0rc1 -> 0.2.0~rc1 (a pre-release sorts before the release in dpkg too).
debian_version() {
    printf '%s\n' "$1" | sed -E 's/\.?(a|b|rc|dev)([0-9]+)/~\1\2/g'
}

# assemble VENV ARCH OUTDIR [REQUIREMENTS BUNDLED]: the .deb of VENV (a venv made at /opt/dcud) for
# ARCH in OUTDIR; prints its path. The version is the one of the dcud distribution in VENV.
assemble() {
    local venv="$1" arch="$2" outdir="$3" requirements="${4:-}" bundled="${5:-}"
    local want dist_info upstream version stage deb so
    want="$(elf_machine "$arch")"
    [ -d "$venv/lib/python$PYVER/site-packages" ] || die "$venv is not a Python $PYVER venv"
    # A venv of the wrong architecture would install and then fail at the first import.
    while IFS= read -r -d '' so; do
        [ "$(od -An -tx1 -j18 -N2 "$so" | tr -s ' ' | sed 's/^ //;s/ $//')" = "$want" ] \
            || die "$so is not an $arch ELF file"
    done < <(find "$venv" -type f -name '*.so*' -print0)
    dist_info="$(find "$venv/lib/python$PYVER/site-packages" -maxdepth 1 -name 'dcud-*.dist-info' | head -n 1)"
    [ -n "$dist_info" ] || die "dcud is not installed in $venv"
    upstream="$(basename "$dist_info" .dist-info)"
    upstream="${upstream#dcud-}"
    version="$(debian_version "$upstream")-$REVISION"

    mkdir -p "$outdir"
    stage="$(mktemp -d "$outdir/.stage-$arch-XXXXXX")"
    chmod 0755 "$stage"  # mktemp's 0700 would be the mode of the archive's ./
    install -d -m 0755 "$stage/opt" "$stage/usr/bin" "$stage/DEBIAN"
    cp -a "$venv" "$stage/opt/dcud"
    ln -s /opt/dcud/bin/dcud "$stage/usr/bin/dcud"
    # The unit and the sysusers and tmpfiles entries as the repository has them (docs/systemd.md),
    # where a package puts them; /usr/lib is also where Debian 13 expects them.
    install -D -m 0644 "$REPO/systemd/dcud.service" "$stage/usr/lib/systemd/system/dcud.service"
    install -D -m 0644 "$REPO/systemd/dcud.sysusers.conf" "$stage/usr/lib/sysusers.d/dcud.conf"
    install -D -m 0644 "$REPO/systemd/dcud.tmpfiles.conf" "$stage/usr/lib/tmpfiles.d/dcud.conf"
    # The examples as conffiles. 0640: an edited dcud.toml holds secrets before postinst's
    # systemd-tmpfiles hands it to group dcud.
    install -d -m 0755 "$stage/etc/dcud"
    install -m 0640 "$REPO/config/dcud.toml" "$REPO/config/wme.conf" "$stage/etc/dcud/"
    # ...and pristine copies: postinst compares with them ("configured?"), an installer starts anew.
    install -D -m 0644 -t "$stage/usr/share/dcud/examples" "$REPO/config/dcud.toml" "$REPO/config/wme.conf" \
        "$REPO/systemd/dcud.service.d/clock-step.conf" "$REPO/systemd/dcud-reboot.rules"
    install -D -m 0644 -t "$stage/usr/share/doc/dcud" "$REPO/packaging/debian/copyright" \
        "$REPO/packaging/debian/README.Debian"
    if [ -n "$requirements" ]; then
        install -m 0644 "$requirements" "$stage/usr/share/doc/dcud/requirements.txt"
    fi
    if [ -n "$bundled" ]; then
        install -m 0644 "$bundled" "$stage/usr/share/doc/dcud/bundled-python-packages.txt"
    fi

    sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@MAINTAINER@/$MAINTAINER/" \
        -e "s/@INSTALLED_SIZE@/$(du -sk --apparent-size "$stage" | cut -f1)/" \
        "$REPO/packaging/debian/control.in" >"$stage/DEBIAN/control"
    printf '/etc/dcud/dcud.toml\n/etc/dcud/wme.conf\n' >"$stage/DEBIAN/conffiles"
    install -m 0755 "$REPO/packaging/debian/postinst" "$REPO/packaging/debian/prerm" \
        "$REPO/packaging/debian/postrm" "$stage/DEBIAN/"
    # md5sums of everything but the conffiles (dpkg keeps theirs itself), as dh_md5sums writes it.
    (cd "$stage" && find . -path ./DEBIAN -prune -o -path ./etc -prune -o -type f -printf '%P\0' \
        | LC_ALL=C sort -z | xargs -0 md5sum) >"$stage/DEBIAN/md5sums"

    deb="$outdir/dcud_${version}_${arch}.deb"
    dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
    rm -rf "$stage"
    echo "$deb"
}

# build_venv ARCH WORK CONSTRAINTS: /opt/dcud in the build chroot of ARCH ($ROOTFS_CACHE/build-ARCH,
# kept between builds with python3.11-venv in it); leaves requirements.txt and bundled.txt in WORK.
build_venv() {
    local arch="$1" work="$2" constraints="$3" root="$ROOTFS_CACHE/build-$arch" marker
    # Python, pip's trust store, and strip (binutils, no compiler).
    local packages="python$PYVER python$PYVER-venv ca-certificates binutils"
    marker="$root/.dcud-build-$(echo "$packages" | md5sum | cut -c1-8)"
    rootfs_host_tools "$arch"
    rootfs_binfmt "$arch"
    if [ ! -e "$marker" ]; then
        log "build chroot $root: fresh $arch rootfs + $packages"
        rootfs_fresh "$arch" "$root"
        rootfs_mount "$root"
        rootfs_apt "$root" "$STEP_TIMEOUT_S" "$packages"
        touch "$marker"
    else
        rootfs_mount "$root"
    fi
    rm -rf "$root/src" "$root/build"
    mkdir -p "$root/src" "$root/build"
    tar -C "$REPO" --exclude='__pycache__' -cf - pyproject.toml README.md dcud | tar -C "$root/src" -xf -
    cp "$constraints" "$root/build/constraints.txt"
    cp "$REPO/packaging/bundled_licences.py" "$REPO/packaging/import_probe.py" "$root/build/"
    log "$arch: /opt/dcud from wheels (--only-binary :all:) in the chroot"
    rootfs_run "$root" "$STEP_TIMEOUT_S" "
        [ \"\$(dpkg --print-architecture)\" = $arch ]
        # pip for the build only (Debian's bundled one): the venv itself gets none.
        [ -x /root/pip/bin/pip ] || python$PYVER -m venv /root/pip
        pip=/root/pip/bin/pip
        \$pip wheel --quiet --no-deps --wheel-dir /build/wheel /src
        rm -rf /opt/dcud
        python$PYVER -m venv --without-pip /opt/dcud
        \$pip --python /opt/dcud/bin/python install --quiet --only-binary :all: \
            --constraint /build/constraints.txt /build/wheel/dcud-*.whl
        \$pip --python /opt/dcud/bin/python check
        \$pip --python /opt/dcud/bin/python freeze --all --exclude dcud >/build/requirements.txt
        # Byte code for every module: the unit sets PYTHONDONTWRITEBYTECODE and /opt is read-only.
        /opt/dcud/bin/python -m compileall -q -j 0 /opt/dcud/lib >/dev/null
        # Debug information out of the extension modules (uvloop's is 12 of its 13.6 MB), as
        # dh_strip does; symbols stay. Not the libraries auditwheel bundled in *.libs/: patchelf
        # rewrote those, and strip is known to damage such files.
        find /opt/dcud/lib -name '*.so' -not -path '*.libs/*' -exec strip --strip-debug {} +
        /opt/dcud/bin/python /build/import_probe.py
        /opt/dcud/bin/python /build/bundled_licences.py >/build/bundled.txt
        /opt/dcud/bin/dcud --version
        /opt/dcud/bin/python -c 'import platform; print(platform.machine(), platform.python_version())'
    " >&2  # stdout carries only the one JSON line per package
    cp "$root/build/requirements.txt" "$root/build/bundled.txt" "$work/"
    rm -rf "$work/venv"
    cp -a "$root/opt/dcud" "$work/venv"
    rootfs_cleanup
}

if [ "${1:-}" = "--assemble" ]; then
    [ "$#" -eq 4 ] || die "usage: $0 --assemble VENV ARCH OUTDIR"
    assemble "$2" "$3" "$4"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot, mounts): sudo $0 $*"
trap rootfs_cleanup EXIT
arches=("$@")
[ "${#arches[@]}" -gt 0 ] || arches=(amd64 arm64)
for arch in "${arches[@]}"; do elf_machine "$arch" >/dev/null; done

mkdir -p "$OUT"
work="$(mktemp -d "$OUT/.work-XXXXXX")"
trap 'rootfs_cleanup; rm -rf "$work"' EXIT
constraints="$work/constraints.txt"
if [ -n "${DCUD_CONSTRAINTS:-}" ]; then cp "$DCUD_CONSTRAINTS" "$constraints"; else : >"$constraints"; fi

for arch in "${arches[@]}"; do
    started=$SECONDS
    mkdir -p "$work/$arch"
    build_venv "$arch" "$work/$arch" "$constraints"
    venv_s=$((SECONDS - started))
    # The next architecture installs exactly these versions.
    [ -s "$constraints" ] || cp "$work/$arch/requirements.txt" "$constraints"
    log "$arch: dpkg-deb"
    deb="$(assemble "$work/$arch/venv" "$arch" "$OUT" "$work/$arch/requirements.txt" "$work/$arch/bundled.txt")"
    build_s=$((SECONDS - started))
    log "$arch: $deb ($(du -h "$deb" | cut -f1))"
    printf '{"arch": "%s", "deb": "%s", "size_bytes": %s, "installed_size_kib": %s, "venv_s": %s, "build_s": %s}\n' \
        "$arch" "$deb" "$(stat -c %s "$deb")" "$(dpkg-deb -f "$deb" Installed-Size)" "$venv_s" "$build_s"
done
