"""`dcud demo`, the README's run command, as a person runs it: it shows the whole site and stops cleanly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_shows_status_readings_and_drives(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dcud", "demo", "--duration", "25", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, (out[-2000:], result.stderr[-2000:])
    assert "dcu/dcu-demo/status  state=online" in out
    assert "/meter/heat-1/reading  seq=1" in out  # an M-Bus meter
    assert "/meter/flat-12/reading  seq=1" in out  # an IEC 62056-21 meter
    assert "/meter/flat-12/state  quality=ok" in out
    assert "/meter/em-1/reading  seq=1" in out and "1.0.1.8.0.255=" in out  # the DLMS/COSEM meter
    assert "/meter/em-1/state  quality=ok" in out
    assert "/drive/axis-1/state  online=True nmt=operational" in out
    assert "cia402=operation_enabled" in out  # the operator's enable command took effect
    assert "dcud demo: stopped (daemon exit 0)" in out
    assert (tmp_path / "dcud.log").read_text().count('"level": "error"') == 0
