"""dcud.toml loading: every error names file, line and key, and all are reported together."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dcud.config.loader import load_config
from dcud.errors import ConfigError

from helpers import REPO

GOOD_LINES = """
[[line]]
name = "rs485-1"
device = "/dev/ttyS1"
baud = 300
transparent = "primary"

[[line]]
name = "mbus-1"
device = "/dev/ttyUSB0"
kind = "mbus"

[[meter]]
name = "flat-12"
line = "rs485-1"
protocol = "iec62056-21"
address = "12345678"

[[meter]]
name = "heat-1"
line = "mbus-1"
protocol = "mbus"
address = "5"
"""


def write(tmp_path: Path, toml: str, wme: str = "") -> Path:
    (tmp_path / "wme.conf").write_text(wme)
    path = tmp_path / "dcud.toml"
    path.write_text(toml)
    return path


def issues_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [str(i) for i in info.value.issues]


def test_example_installation_is_valid() -> None:
    config = load_config(REPO / "config" / "dcud.toml")
    assert config.device_id == "dcu-0001"
    assert config.topic_prefix == "dcu/dcu-0001"
    assert [line.name for line in config.toml.line] == ["rs485-1", "mbus-1"]
    assert config.toml.line[1].effective_baud == 2400
    assert config.toml.line[1].effective_framing == "8E1"


def test_good_site(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, 'device_id = "x1"\n' + GOOD_LINES))
    assert [m.name for m in config.toml.meter] == ["flat-12", "heat-1"]
    assert config.state_dir == Path("/var/lib/dcud")


def test_all_errors_reported_together_with_lines(tmp_path: Path) -> None:
    toml = (
        'device_id = "x1"\n'  # 1
        "grace_s = 500\n"  # 2: out of range
        "[mqtt]\n"  # 3
        'url = "http://broker"\n'  # 4: wrong scheme
        "keepalive = 10\n"  # 5: typo (keepalive_s)
        "[[line]]\n"  # 6
        'name = "l1"\n'  # 7
        'device = "/dev/ttyS1"\n'  # 8
        "baud = 1234\n"  # 9: not a baud
        "[[meter]]\n"  # 10
        'name = "m1"\n'  # 11
        'line = "nowhere"\n'  # 12: dangling
        'protocol = "mbus"\n'  # 13
        'address = "999"\n'  # 14
        "[[meter]]\n"  # 15
        'name = "m2"\n'  # 16
        'line = "l1"\n'  # 17
        'protocol = "iec62056-21"\n'  # 18
        'interval_s = "ten"\n'  # 19: wrong type
    )
    found = issues_of(write(tmp_path, toml))
    path = str(tmp_path / "dcud.toml")
    expected_prefixes = [
        f"{path}:2: grace_s: ",
        f'{path}:5: mqtt.keepalive: unknown key (did you mean "keepalive_s"?)',
        f"{path}:9: line[l1].baud: ",
        f"{path}:19: meter[m2].interval_s: ",
    ]
    for prefix in expected_prefixes:
        assert any(f.startswith(prefix) for f in found), (prefix, found)
    assert any("got 1234" in f for f in found)
    assert any('got "ten"' in f for f in found)


def test_cross_references(tmp_path: Path) -> None:
    toml = (
        'device_id = "x1"\n'
        + GOOD_LINES
        + """
[[meter]]
name = "flat-12"
line = "nowhere"
protocol = "iec62056-21"

[[meter]]
name = "gas"
line = "rs485-1"
protocol = "mbus"
address = "1"

[[line]]
name = "dup-dev"
device = "/dev/ttyS1"
transparent = "primary"

[[drive]]
name = "axis"
bus = "can9"
protocol = "canopen"
node_id = 1
"""
    )
    found = "\n".join(issues_of(write(tmp_path, toml)))
    assert 'meter[flat-12].name: duplicate meter name "flat-12"' in found
    assert 'meter[flat-12].line: no [[line]] named "nowhere"' in found
    assert "meter[gas].protocol: M-Bus meter on rs485 line" in found
    assert 'line[dup-dev].device: device already used by line "rs485-1"' in found
    assert 'line[dup-dev].transparent: "primary" is already served by line "rs485-1"' in found
    assert 'drive[axis].bus: no [[can]] named "can9"' in found


def test_broken_toml_names_the_line(tmp_path: Path) -> None:
    found = issues_of(write(tmp_path, 'device_id = "x"\n\n[mqtt\nurl = 1\n'))
    assert len(found) == 1
    assert found[0].startswith(f"{tmp_path / 'dcud.toml'}:3: invalid TOML")


def test_unknown_top_level_key_and_missing_required(tmp_path: Path) -> None:
    found = issues_of(write(tmp_path, 'devise_id = "x"\n[[line]]\nname = "a"\n'))
    joined = "\n".join(found)
    assert ':1: devise_id: unknown key (did you mean "device_id"?)' in joined
    assert "line[a].device: required key is missing" in joined


def test_toml_and_parameter_errors_together(tmp_path: Path) -> None:
    found = issues_of(write(tmp_path, "grace_s = -1\n", "ntp_interval=ten\nnpt_address=1.2.3.4\n"))
    joined = "\n".join(found)
    assert "dcud.toml:1: grace_s" in joined
    assert "wme.conf:1: ntp_interval" in joined
    assert "wme.conf:2: npt_address" in joined


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert "cannot read" in str(info.value)
    path = tmp_path / "dcud.toml"
    path.write_text('parameters = "missing.conf"\n')
    assert any("cannot read parameter file" in i for i in issues_of(path))


def test_port_clash_between_parameters(tmp_path: Path) -> None:
    found = issues_of(write(tmp_path, "", "tm_server_port=9001\nfw_server_port=9001\n"))
    assert any("fw_server_port: port 9001 is also tm_server_port" in f for f in found)


def test_check_config_cli_exit_codes(tmp_path: Path) -> None:
    good = subprocess.run(
        [sys.executable, "-m", "dcud", "check-config", "-c", str(REPO / "config" / "dcud.toml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert good.returncode == 0, good.stderr
    bad = write(tmp_path, "grace_s = -1\nbogus = 1\n", "ntp_interval=ten\n")
    result = subprocess.run(
        [sys.executable, "-m", "dcud", "check-config", "-c", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 78
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3, lines
    assert all(":" in line for line in lines)
