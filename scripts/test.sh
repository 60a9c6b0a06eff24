#!/usr/bin/env bash
# The README's test command: installs everything a fresh Debian 12 machine needs, then runs
# ruff, mypy, the layer contracts, the systemd checks and the whole test suite against real peers.
# Arguments go to pytest. Missing Debian packages are installed as root or through sudo; without either
# it says what to run.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/debian_packages.sh

PEERS=(mosquitto mosquitto-clients socat dbus-daemon snmptrapd snmp smitools chrony systemd procps util-linux python3-venv python3-dev gcc curl iproute2)
ensure_debian_packages test.sh "${PEERS[@]}"
PY="$(python_for_dcud test.sh)"
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
# -rs: the reason of every skipped test in the summary (what is missing, how to run it).
# -n: pytest-xdist workers, two per core (at most 8): most tests wait on processes, pty lines and sockets,
# not on the CPU (2 cores: 4 workers take 4.7 min, 2 workers 7.8). Every test binds its own ports and
# writes under its own tmp_path, so workers never meet. DCUD_TEST_WORKERS overrides; arguments after it
# win (`-n 0` runs serially, for pdb).
WORKERS="${DCUD_TEST_WORKERS:-$(( $(nproc) * 2 > 8 ? 8 : $(nproc) * 2 ))}"
python -m pytest -q -rs -p no:cacheprovider -n "$WORKERS" "$@"
