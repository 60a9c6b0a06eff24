#!/usr/bin/env bash
# The README's run command: installs what the demo needs on a fresh Debian 12 machine, then runs
# `dcud demo` (the whole system on this computer with simulated devices; Ctrl-C stops it).
# Arguments go to `dcud demo`: bash scripts/demo.sh --duration 60 --workdir /tmp/demo
# Missing Debian packages are installed as root or through sudo; without either it says what to run.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/debian_packages.sh

ensure_debian_packages demo.sh mosquitto socat python3-venv
PY="$(python_for_dcud demo.sh)"
# The demo starts its own broker on a free loopback port; the system one may stay stopped.
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# The `demo` extra: the local FTP server that receives the demo's data push.
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[demo]"
exec .venv/bin/dcud demo "$@"
