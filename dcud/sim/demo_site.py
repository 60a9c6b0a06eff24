"""The meters of ``dcud demo``: three simulated lines (M-Bus, IEC 62056-21 on RS485, and DLMS/COSEM over
HDLC) and their config.

:func:`start_simulators` runs ``python -m dcud sim meters`` and :func:`start_dlms_simulator` runs
``python -m dcud sim dlms``, each as a separate process (as on a real site the meters are separate
devices) with symlinked ptys in the demo's working directory; :func:`site_toml` is the matching
``[[line]]``/``[[meter]]`` part of the demo's ``dcud.toml``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SIMS_TOML = """\
# Written by `dcud demo`: the simulated meters (`dcud sim meters --config sims.toml`).
control = "sim-control.json"

[[line]]
name = "mbus"
protocol = "mbus"
link = "mbus.tty"
baud = 2400

[[line.meter]]
address = "1"
kind = "heat"
base = 48210
rate_per_h = 12

[[line.meter]]
address = "2"
kind = "water"
base = 731554
rate_per_h = 40
telegrams = 2

[[line.meter]]
address = "3"
kind = "electricity"
base = 152300
rate_per_h = 90

[[line]]
name = "rs485"
protocol = "iec62056-21"
link = "rs485.tty"

[[line.meter]]
address = "12345678"
base = 20411.5
rate_per_h = 1.7

[[line.meter]]
address = "87654321"
base = 3310.25
rate_per_h = 0.4
fast_reaction = true
"""

DLMS_SIMS_TOML = """\
# Written by `dcud demo`: the simulated DLMS/COSEM meter (`dcud sim dlms --config dlms-sims.toml`).
# Direct HDLC at 9600 Bd 8N1 (a mode E line on a pty would have to be configured as an IEC line).
[[line]]
name = "dlms"
link = "dlms.tty"
baud = 9600

[[meter]]
name = "em-1"
line = "dlms"
physical_address = 17
"""

SITE_TOML = """
[[line]]
name = "mbus-1"
device = "{workdir}/mbus.tty"
kind = "mbus"

[[line]]
name = "rs485-1"
device = "{workdir}/rs485.tty"
kind = "rs485"

[[meter]]
name = "heat-1"
line = "mbus-1"
protocol = "mbus"
address = "1"
interval_s = 15

[[meter]]
name = "water-2"
line = "mbus-1"
protocol = "mbus"
address = "10000002"
interval_s = 15

[[meter]]
name = "power-3"
line = "mbus-1"
protocol = "mbus"
address = "3"
interval_s = 30

[[meter]]
name = "flat-12"
line = "rs485-1"
protocol = "iec62056-21"
address = "12345678"
interval_s = 15

[[meter]]
name = "flat-13"
line = "rs485-1"
protocol = "iec62056-21"
address = "87654321"
interval_s = 30

[[line]]
name = "dlms-1"
device = "{workdir}/dlms.tty"
kind = "rs485"
baud = 9600
framing = "8N1"

[[meter]]
name = "em-1"
line = "dlms-1"
protocol = "dlms"
address = "17"
interval_s = 15
[meter.dlms]
objects = ["1.0.1.8.0.255", "1.0.2.8.0.255", "1.0.32.7.0.255", "1.0.1.7.0.255"]
profile = "1.0.99.1.0.255"
profile_backfill_s = 3600
event_logs = ["0.0.99.98.0.255"]
"""


def site_toml(workdir: Path) -> str:
    """The ``[[line]]``/``[[meter]]`` tables of the demo site, pointing at the simulators' ptys."""
    return SITE_TOML.format(workdir=workdir)


def start_simulators(workdir: Path, timeout_s: float = 10.0) -> subprocess.Popen[bytes]:
    """Start the simulator process; returns once both ptys exist (raises RuntimeError otherwise)."""
    return _start_sim(
        workdir,
        "meters",
        SIMS_TOML,
        stem="sims",
        ttys=("mbus.tty", "rs485.tty"),
        what="meter simulators",
        timeout_s=timeout_s,
    )


def start_dlms_simulator(workdir: Path, timeout_s: float = 10.0) -> subprocess.Popen[bytes]:
    """Start ``dcud sim dlms`` (one meter on HDLC); returns once its pty exists (RuntimeError otherwise)."""
    return _start_sim(
        workdir,
        "dlms",
        DLMS_SIMS_TOML,
        stem="dlms-sims",
        ttys=("dlms.tty",),
        what="DLMS simulator",
        timeout_s=timeout_s,
    )


def _start_sim(
    workdir: Path, command: str, config: str, *, stem: str, ttys: tuple[str, ...], what: str, timeout_s: float
) -> subprocess.Popen[bytes]:
    """``dcud sim <command>`` on ``<stem>.toml`` holding ``config``, logging to ``<stem>.log``; returns
    once every pty of ``ttys`` exists in ``workdir``."""
    (workdir / f"{stem}.toml").write_text(config)
    log = (workdir / f"{stem}.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcud", "sim", command, "--config", str(workdir / f"{stem}.toml")],
        stdout=log,
        stderr=log,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log.close()
    deadline = time.monotonic() + timeout_s
    while not all((workdir / name).exists() for name in ttys):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{what} did not start; see {workdir / f'{stem}.log'}")
        time.sleep(0.05)
    return proc


def render_reading(topic: str, payload: dict[str, Any]) -> str:
    """One line for a reading: meter, time and its first values."""
    values = payload.get("values", [])
    shown = []
    for value in values[:4]:
        if isinstance(value, dict):
            unit = value.get("unit") or ""
            shown.append(f"{value.get('id')}={value.get('value')}{(' ' + unit) if unit else ''}")
    more = f" (+{len(values) - 4})" if len(values) > 4 else ""
    return f"{topic}  seq={payload.get('seq')} ts={payload.get('ts')}  {', '.join(shown)}{more}"


def render_state(topic: str, payload: dict[str, Any]) -> str | None:
    """One line for a meter or line state document, "" to print nothing, None for other documents."""
    if "/meter/" in topic and "quality" in payload:
        return f"{topic}  quality={payload.get('quality')} status={payload.get('status')}"
    if "/line/" in topic and "lease" in payload:
        # Every lease changes the line's state document; show only open/failed transitions.
        state = str(payload.get("state"))
        if _LINE_STATES.get(topic) == state:
            return ""
        _LINE_STATES[topic] = state
        error = f" error={payload.get('last_error')}" if state != "open" else ""
        return f"{topic}  {state} device={payload.get('device')}{error}"
    return None


_LINE_STATES: dict[str, str] = {}


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 5 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


__all__ = [
    "render_reading",
    "render_state",
    "site_toml",
    "start_dlms_simulator",
    "start_simulators",
    "stop_process",
]
