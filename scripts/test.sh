#!/usr/bin/env bash
# The README's test command: installs everything a fresh Debian 12 machine needs, then runs
# ruff, mypy, the layer contracts, the systemd checks and the whole test suite against real peers.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
PEERS=(mosquitto mosquitto-clients socat snmptrapd snmp smitools chrony systemd procps util-linux python3-venv python3-dev gcc curl iproute2)
missing=()
for pkg in "${PEERS[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "== apt-get install ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "$PY" -m venv .venv
fi
echo "== pip install -e .[test]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
export PATH="$PWD/.venv/bin:$PATH"

echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy --strict"
mypy
echo "== import-linter (layer contracts in pyproject.toml)"
lint-imports
echo "== systemd unit checks"
bash scripts/check_systemd.sh
echo "== pytest"
python -m pytest -q -p no:cacheprovider "$@"
