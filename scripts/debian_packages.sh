# Sourced by scripts/demo.sh and scripts/test.sh: install the Debian packages they need, or say plainly
# what to run when this user cannot (not root and no sudo).
#
#   ensure_debian_packages WHO PACKAGE...
#
# Nothing is installed when every package is there already (a non-root user then needs neither root nor
# sudo). Missing packages are installed with apt-get, as root directly or through sudo; without either
# it prints the one command to run as root and returns 1. On a system without dpkg (not Debian) it says
# which packages it expects and carries on.

ensure_debian_packages() {
    local who="$1"
    shift
    if ! command -v dpkg-query >/dev/null 2>&1; then
        echo "$who: not a Debian system (no dpkg-query): make sure these are installed: $*" >&2
        return 0
    fi
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if ! command -v sudo >/dev/null 2>&1; then
            {
                echo "$who: these Debian packages are missing: ${missing[*]}"
                echo "$who: installing them needs root, this user is not root and sudo is not installed."
                echo "$who: as root, run:"
                echo ""
                echo "    apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"
                echo ""
                echo "$who: then run this script again as this user."
            } >&2
            return 1
        fi
        sudo="sudo"
    fi
    echo "== ${sudo:+sudo }apt-get install ${missing[*]}"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The Python dcud runs on: 3.11 or newer (Debian 12's python3 is 3.11). Prints the interpreter to use.
python_for_dcud() {
    local who="$1" py="${PYTHON:-python3}"
    if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "$who: dcud needs Python 3.11 or newer; '$py' is $("$py" -V 2>&1 || echo missing)." >&2
        echo "$who: set PYTHON to a newer one (PYTHON=python3.11 bash $0)." >&2
        return 1
    fi
    echo "$py"
}
