"""The systemd unit: resource limits present and sane; scripts/check_systemd.sh passes (verify, exposure)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

UNIT = REPO / "systemd" / "dcud.service"
_SIZE = {"K": 1024, "M": 1024**2, "G": 1024**3}


def _service_settings() -> dict[str, str]:
    settings: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings[key] = value
    return settings


def test_resource_limits_are_set() -> None:
    settings = _service_settings()
    memory = re.fullmatch(r"([0-9]+)([KMG])", settings["MemoryMax"])
    assert memory is not None
    memory_bytes = int(memory.group(1)) * _SIZE[memory.group(2)]
    # docs/systemd.md: measured peak RSS 44 MB; the limit keeps at least 2x headroom over that.
    assert 2 * 44 * 1024**2 <= memory_bytes <= 512 * 1024**2
    assert 32 <= int(settings["TasksMax"]) <= 256
    assert settings["LimitCORE"] == "0"
    documented = (REPO / "docs" / "systemd.md").read_text()
    for key in ("MemoryMax", "TasksMax", "LimitCORE"):
        assert f"{key}={settings[key]}" in documented


@pytest.mark.slow
def test_check_systemd_script_passes() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd")
    dcud_bin = shutil.which("dcud") or str(Path(sys.executable).with_name("dcud"))
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "check_systemd.sh")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "DCUD_BIN": dcud_bin},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    exposures = re.findall(r"exposure level: ([0-9.]+)", result.stdout)
    dropins = list((REPO / "systemd" / "dcud.service.d").glob("*.conf"))
    # the unit alone, with each drop-in, and with all of them at once
    assert len(exposures) == 1 + len(dropins) + 1 and all(float(e) <= 2.5 for e in exposures)
    settings = _service_settings()
    for key in ("MemoryMax", "TasksMax", "LimitCORE"):
        assert f"ok: {key}={settings[key]}" in result.stdout
