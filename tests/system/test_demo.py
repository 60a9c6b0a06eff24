"""`dcud demo`, the README's run command, as a person runs it: it shows the whole site and stops cleanly."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dcud import demo


@pytest.mark.slow
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
    assert "dcud demo: FTP data push every minute into" in out  # the `demo` extra is in `test` too
    assert f"dcud demo: stopped (daemon exit 0); daemon log: {tmp_path / 'dcud.log'}" in out
    log = (tmp_path / "dcud.log").read_text()
    assert log.count('"level": "error"') == 0
    # The simulated lines are ptys, which refuse 7E1/8E1: expected for a simulator, so not a warning.
    assert '"event": "framing not applied"' in log
    assert not [line for line in log.splitlines() if '"level": "warning"' in line and "not applied" in line]


@pytest.mark.slow
def test_demo_without_workdir_names_no_removed_file() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dcud", "demo", "--duration", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
    lines = result.stdout.splitlines()
    assert "(temporary: removed at the end; --workdir DIR keeps it)" in lines[0]
    last = lines[-1]
    assert "now removed (--workdir DIR keeps them)" in last
    assert not [path for path in re.findall(r"/[\w./-]+", last) if not Path(path).exists()], last


def test_demo_says_why_the_ftp_push_is_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyftpdlib", None)  # as if the `demo` extra were not installed
    with contextlib.ExitStack() as stack:
        why = demo._start_ftp(tmp_path, stack)
    assert isinstance(why, str)
    assert "pyftpdlib is not installed" in why and "scripts/demo.sh" in why


def test_the_closing_line_points_at_the_log_only_when_it_is_kept(tmp_path: Path) -> None:
    assert str(tmp_path / "dcud.log") in demo.closing_line(0, tmp_path, kept=True)
    assert str(tmp_path) not in demo.closing_line(0, tmp_path, kept=False)
