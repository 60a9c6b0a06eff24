"""``dcud read``, ``dcud scan`` and ``dcud decode`` as processes, against the simulators and vectors."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dcud.cli_meters import capture_bytes
from dcud.transport.serial import SerialPort

from helpers import REPO
from helpers.meters import simulator_process
from helpers.pty import released

VECTORS = REPO / "tests" / "vectors"

SIMS = """\
[[line]]
name = "mbus"
protocol = "mbus"
link = "mbus.tty"
[[line.meter]]
address = "1"
kind = "heat"
base = 4321
[[line.meter]]
address = "2"
kind = "water"
secondary = "87654321"
[[line]]
name = "iec"
protocol = "iec62056-21"
link = "iec.tty"
[[line.meter]]
address = "12345678"
base = 777.5
fast_reaction = true
"""


def dcud(*args: str, stdin: bytes | None = None, timeout_s: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "dcud", *args],
        input=stdin,
        capture_output=True,
        cwd=REPO,
        timeout=timeout_s,
        check=False,
    )


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Path]:
    """Simulators in their own process and a dcud.toml pointing at them; yields the dcud.toml."""
    with simulator_process(tmp_path, SIMS):
        config = tmp_path / "dcud.toml"
        config.write_text(
            f'device_id = "cli"\nstate_dir = "{tmp_path / "state"}"\n'
            f'[[line]]\nname = "mbus-1"\ndevice = "{tmp_path / "mbus.tty"}"\nkind = "mbus"\n'
            f'[[line]]\nname = "rs485-1"\ndevice = "{tmp_path / "iec.tty"}"\nkind = "rs485"\n'
            '[[meter]]\nname = "heat-1"\nline = "mbus-1"\nprotocol = "mbus"\naddress = "1"\n'
            '[[meter]]\nname = "water-2"\nline = "mbus-1"\nprotocol = "mbus"\naddress = "87654321"\n'
            '[[meter]]\nname = "flat-12"\nline = "rs485-1"\nprotocol = "iec62056-21"\naddress = "12345678"\n'
        )
        (tmp_path / "wme.conf").write_text("")
        yield config


def test_read_mbus_and_iec_meters(site: Path) -> None:
    heat = dcud("read", "-c", str(site), "--meter", "heat-1")
    assert heat.returncode == 0, heat.stderr
    doc = json.loads(heat.stdout)
    assert doc["meter"] == "heat-1" and doc["trigger"] == "cli"
    assert (doc["values"][0]["value"], doc["values"][0]["unit"]) == (4321000, "Wh")

    water = json.loads(dcud("read", "-c", str(site), "--meter", "water-2").stdout)
    assert water["device"]["id"] == "87654321"

    flat = dcud("read", "-c", str(site), "--meter", "flat-12")
    assert flat.returncode == 0, flat.stderr
    values = {v["id"]: v["value"] for v in json.loads(flat.stdout)["values"]}
    assert values["1.8.0"] == 777.5


def test_read_refuses_a_line_someone_owns(site: Path) -> None:
    async def hold_and_read() -> subprocess.CompletedProcess[bytes]:
        port = SerialPort(str(site.parent / "mbus.tty"), 2400, "8E1")  # as the daemon holds it
        await port.open()
        try:
            return await asyncio.to_thread(dcud, "read", "-c", str(site), "--meter", "heat-1")
        finally:
            port.close()
            await released(port)

    result = asyncio.run(hold_and_read())
    assert result.returncode == 1
    assert b"in use" in result.stderr and b"--via-mqtt" in result.stderr


def test_read_unknown_meter_fails(site: Path) -> None:
    result = dcud("read", "-c", str(site), "--meter", "nope")
    assert result.returncode == 1 and b"heat-1" in result.stderr


def test_scan_primary_and_secondary(site: Path) -> None:
    primary = dcud("scan", "-c", str(site), "--line", "mbus-1", "--first", "0", "--last", "4")
    assert primary.returncode == 0, primary.stderr
    doc = json.loads(primary.stdout)
    assert [f["primary"] for f in doc["found"]] == [1, 2] and doc["complete"]
    assert b"\r" not in primary.stderr  # no progress bar when stderr is not a terminal
    secondary = dcud("scan", "-c", str(site), "--line", "mbus-1", "--secondary", timeout_s=120)
    assert secondary.returncode == 0, secondary.stderr
    ids = sorted(f["id"] for f in json.loads(secondary.stdout)["found"])
    assert ids == ["10000001", "87654321"]
    wrong = dcud("scan", "-c", str(site), "--line", "rs485-1")
    assert wrong.returncode == 1


def test_decode_mbus_hex_capture_file_and_stdin() -> None:
    path = VECTORS / "libmbus" / "test-frames" / "ACW_Itron-BM-plus-m.hex"
    result = dcud("decode", "mbus", str(path))
    assert result.returncode == 0, result.stderr
    telegram = json.loads(result.stdout)["frames"][0]["telegram"]
    assert telegram["id"] == "11490378" and telegram["manufacturer"] == "ACW"
    volume = telegram["records"][1]
    assert volume["unit"] == "m3" and volume["value"] == pytest.approx(54.321)
    raw = bytes.fromhex(path.read_text())
    piped = dcud("decode", "mbus", "-", stdin=raw)
    assert json.loads(piped.stdout)["frames"][0]["telegram"]["id"] == "11490378"


def test_decode_iec_captures() -> None:
    path = VECTORS / "dcud-iec" / "iskra_mt174_mode_c_9600.bin"
    expected = json.loads(path.with_suffix(".json").read_text())
    result = dcud("decode", "iec", str(path))
    assert result.returncode == 0, result.stderr
    messages = json.loads(result.stdout)["messages"]
    assert messages[0]["type"] == "identification" and messages[0]["manufacturer"] == "ISk"
    data = messages[1]
    assert data["type"] == "data" and data["bcc_ok"]
    assert [v["id"] for v in data["values"]][:2] == [ds[0] for ds in expected["datasets"]][:2]
    kamstrup = VECTORS / "dcud-iec" / "kamstrup_mc66_mode_a_sum7.bin"
    assert dcud("decode", "iec", str(kamstrup)).returncode == 1  # XOR check fails on the quirk
    assert dcud("decode", "iec", "--bcc", "sum7", str(kamstrup)).returncode == 0


def test_decode_garbage_fails() -> None:
    assert dcud("decode", "mbus", "-", stdin=b"\x00\x01\x02 not a frame").returncode == 1
    assert dcud("decode", "iec", "/nonexistent/file").returncode == 1


def test_capture_bytes_reads_hex_text_or_raw() -> None:
    assert capture_bytes(b"68 03 03 68\n0x53 fe:50") == bytes.fromhex("6803036853fe50")
    assert capture_bytes(b"/ISk5MT174\r\n") == b"/ISk5MT174\r\n"
    assert capture_bytes(b"\xe5") == b"\xe5"
