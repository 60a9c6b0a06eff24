"""The set-up scripts on a fresh machine: scripts/debian_packages.sh, as demo.sh and test.sh use it.

Run in a PATH of our own: fake ``id``, ``dpkg-query``, ``apt-get`` and ``sudo`` (each records its
call), real ``bash``, ``grep`` and ``env``. Nothing is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import REPO

HELPER = REPO / "scripts" / "debian_packages.sh"


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!{shutil.which('bash')}\n{body}\n")
    path.chmod(0o755)


@pytest.fixture
def machine(tmp_path: Path) -> Path:
    """A bin directory: the user is uid 1000, ``INSTALLED`` names the Debian packages present."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "grep", "env", "cat"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    _fake(bin_dir, "id", 'echo "${FAKE_UID:-1000}"')
    # dpkg-query -W -f=... PACKAGE: "install ok installed" for the packages in $INSTALLED
    found = '[ "$p" = "${@: -1}" ] && { printf "install ok installed"; exit 0; }'
    _fake(bin_dir, "dpkg-query", f"for p in $INSTALLED; do {found}; done; exit 1")
    _fake(bin_dir, "apt-get", f'echo "apt-get $*" >> {tmp_path}/calls')
    return bin_dir


def _ensure(bin_dir: Path, *packages: str, **env: str) -> subprocess.CompletedProcess[str]:
    script = f'source {HELPER}; ensure_debian_packages demo.sh "$@"'
    return subprocess.run(
        [str(bin_dir / "bash"), "-c", script, "bash", *packages],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={"PATH": str(bin_dir), **env},
    )


def _calls(bin_dir: Path) -> list[str]:
    calls = bin_dir.parent / "calls"
    return calls.read_text().splitlines() if calls.exists() else []


def test_nothing_missing_needs_neither_root_nor_sudo(machine: Path) -> None:
    result = _ensure(machine, "mosquitto", "socat", INSTALLED="mosquitto socat")
    assert result.returncode == 0, result.stderr
    assert _calls(machine) == []


def test_a_user_without_sudo_is_told_what_to_run_as_root(machine: Path) -> None:
    result = _ensure(machine, "mosquitto", "socat", INSTALLED="mosquitto")
    assert result.returncode == 1
    assert "sudo: command not found" not in result.stderr
    assert "these Debian packages are missing: socat" in result.stderr
    assert "apt-get update && apt-get install -y --no-install-recommends socat" in result.stderr
    assert "then run this script again as this user" in result.stderr
    assert _calls(machine) == []


def test_root_installs_what_is_missing(machine: Path) -> None:
    result = _ensure(machine, "mosquitto", "socat", INSTALLED="mosquitto", FAKE_UID="0")
    assert result.returncode == 0, result.stderr
    assert _calls(machine) == ["apt-get update -qq", "apt-get install -y -qq --no-install-recommends socat"]


def test_a_user_with_sudo_installs_through_it(machine: Path) -> None:
    _fake(machine, "sudo", f'echo "sudo $1" >> {machine.parent}/calls; exec "$@"')
    result = _ensure(machine, "socat", INSTALLED="")
    assert result.returncode == 0, result.stderr
    assert _calls(machine) == [
        "sudo apt-get",
        "apt-get update -qq",
        "sudo env",
        "apt-get install -y -qq --no-install-recommends socat",
    ]


def test_an_old_python_is_named_with_the_way_out(machine: Path) -> None:
    _fake(machine, "python3", 'case "$1" in -V) echo "Python 3.9.2";; *) exit 1;; esac')
    script = f"source {HELPER}; python_for_dcud test.sh"
    result = subprocess.run(
        [str(machine / "bash"), "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={"PATH": str(machine)},
    )
    assert result.returncode == 1
    assert "dcud needs Python 3.11 or newer; 'python3' is Python 3.9.2" in result.stderr
    assert "PYTHON=python3.11" in result.stderr


def test_demo_and_test_scripts_use_the_helper() -> None:
    for name in ("demo.sh", "test.sh"):
        text = (REPO / "scripts" / name).read_text()
        assert "source scripts/debian_packages.sh" in text and "ensure_debian_packages" in text, name
        assert "sudo apt-get" not in text, name  # sudo only through the helper, which checks for it
    assert ".[demo]" in (REPO / "scripts" / "demo.sh").read_text()
    assert os.access(HELPER, os.R_OK)
