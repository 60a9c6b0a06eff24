"""The pty simulators: IEC 62056-21 modes A/B/C, multidrop, BCC quirk; M-Bus primary, secondary,
multi-telegram and collisions; the control file; ``dcud sim meters`` as a process."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from dcud.codec.iec_session import IecReadout, IecReadoutResult
from dcud.codec.mbus_session import MbusReadout, MbusReadoutResult, MbusScan, MbusScanResult
from dcud.config.model import LineConfig
from dcud.errors import PeerTimeout, RemoteProtocolError
from dcud.service.line import LeasedPort, Line
from dcud.service.session_runner import Session, run_session
from dcud.sim.serial_sim import (
    IecSimLine,
    MbusSimLine,
    SimConfig,
    SimLineSpec,
    SimMeterSpec,
    expand_addresses,
    iec_expected_values,
    load_sim_config,
    mbus_expected_values,
)
from dcud.transport.serial import SerialPort

from helpers.meters import simulators, start_sim, wait_until, write_control
from helpers.pty import released


@asynccontextmanager
async def line_on(path: str, kind: str) -> AsyncIterator[Line]:
    cfg = LineConfig(name="sim", device=path, kind=kind)  # type: ignore[arg-type]
    port = SerialPort(path, cfg.effective_baud, cfg.effective_framing)
    await port.open()
    line = Line(cfg)
    line.attach(port)
    try:
        yield line
    finally:
        line.detach("closed")
        await released(port)


async def run(line: Line, session: Session) -> Any:
    async with line.lease("test", "cli", timeout_s=10) as port:
        assert isinstance(port, LeasedPort)
        return await run_session(session, port)


def iec_line(*meters: SimMeterSpec) -> SimConfig:
    return SimConfig([SimLineSpec("iec", "iec62056-21", list(meters))])


def mbus_line(*meters: SimMeterSpec) -> SimConfig:
    return SimConfig([SimLineSpec("mbus", "mbus", list(meters))])


@pytest.mark.parametrize(("baud_char", "mode", "baud"), [("5", "C", 9600), ("E", "B", 9600), ("Z", "A", 300)])
async def test_iec_modes(baud_char: str, mode: str, baud: int) -> None:
    spec = SimMeterSpec("4711", baud_char=baud_char, fast_reaction=True)
    async with simulators(iec_line(spec)) as sims, line_on(sims.runners[0].path, "rs485") as line:
        result = await run(line, IecReadout("4711"))
    assert isinstance(result, IecReadoutResult)
    assert result.ident.mode == mode and result.baud == baud and result.bcc_ok
    values = {v["id"]: v["value"] for v in result.to_values()}
    assert values == iec_expected_values(spec)


async def test_iec_multidrop_addresses() -> None:
    specs = [
        SimMeterSpec(a, base=100.0 * (i + 1), fast_reaction=True) for i, a in enumerate(("1", "22", "333"))
    ]
    async with simulators(iec_line(*specs)) as sims, line_on(sims.runners[0].path, "rs485") as line:
        for spec in specs:
            # Leading zeros are ignored on both sides (protocols.md section 1).
            result = await run(line, IecReadout("000" + spec.address))
            assert {v["id"]: v["value"] for v in result.to_values()}["1.8.0"] == spec.base
        with pytest.raises(PeerTimeout):
            await run(line, IecReadout("4444", reaction_timeout_s=0.3))


async def test_iec_bcc_quirk_needs_the_per_meter_setting() -> None:
    spec = SimMeterSpec("66", bcc="sum7", manufacturer="KAm", fast_reaction=True)
    async with simulators(iec_line(spec)) as sims, line_on(sims.runners[0].path, "rs485") as line:
        good = await run(line, IecReadout("66", bcc_mode="sum7"))
        assert good.bcc_ok and good.ident.manufacturer == "KAm"
        # The meter listens idle_timeout_s for a NAK after its data message; wait until it went idle.
        model = sims.runners[0].model
        assert isinstance(model, IecSimLine)
        await wait_until(lambda: model.meters[0].state == "idle", 10)
        with pytest.raises(RemoteProtocolError):
            await run(line, IecReadout("66", bcc_mode="xor", max_naks=1))


async def test_mbus_primary_secondary_and_multi_telegram() -> None:
    heat = SimMeterSpec("5", kind="heat", base=4321)
    water = SimMeterSpec("6", kind="water", secondary="87654321", telegrams=3, base=777)
    async with simulators(mbus_line(heat, water)) as sims, line_on(sims.runners[0].path, "mbus") as line:
        by_primary = await run(line, MbusReadout(5))
        assert isinstance(by_primary, MbusReadoutResult)
        got = [(r.value, r.unit) for r in by_primary.records]
        assert got == [pytest.approx(v) for v in mbus_expected_values(heat)]
        by_secondary = await run(line, MbusReadout(secondary="87654321"))
        assert len(by_secondary.telegrams) == 3 and len(by_secondary.frames) == 3
        assert by_secondary.telegrams[0].id == "87654321"
        expected = mbus_expected_values(water)
        first = [(r.value, r.unit) for r in by_secondary.telegrams[0].records[: len(expected)]]
        assert first == [pytest.approx(v) for v in expected]
        assert {r.storage for r in by_secondary.records} == {0, 1, 2}
        with pytest.raises(PeerTimeout):
            await run(line, MbusReadout(7, retries=0))


async def test_mbus_collisions_and_secondary_scan() -> None:
    # Two slaves share primary address 9 (a commissioning mistake): their answers collide.
    specs = [
        SimMeterSpec("9", secondary="12345678"),
        SimMeterSpec("9", secondary="13345699"),
        SimMeterSpec("10", secondary="55555555"),
    ]
    async with simulators(mbus_line(*specs)) as sims, line_on(sims.runners[0].path, "mbus") as line:
        with pytest.raises(RemoteProtocolError):
            await run(line, MbusReadout(9, retries=1))
        primary = await run(line, MbusScan.primary(8, 11))
        assert isinstance(primary, MbusScanResult)
        assert [hit.address for hit in primary.found] == [10]
        assert primary.collisions == ["9"]
        # The simulator answers within a few bit times, so a short answer window keeps the scan quick.
        secondary = await run(line, MbusScan.secondary(response_timeout_s=0.1))
        ids = sorted(hit.secondary_address[:8] for hit in secondary.found)
        assert ids == ["12345678", "13345699", "55555555"]


async def test_control_file_silences_and_revives(tmp_path: Path) -> None:
    control = tmp_path / "control.json"
    config = mbus_line(SimMeterSpec("3"))
    config.control = str(control)
    async with simulators(config) as sims, line_on(sims.runners[0].path, "mbus") as line:
        await run(line, MbusReadout(3))
        model = sims.runners[0].model
        assert isinstance(model, MbusSimLine)
        write_control(control, ["3"])
        await wait_until(lambda: not model.bus.slaves, 10)  # the simulator polls its control file
        with pytest.raises(PeerTimeout):
            await run(line, MbusReadout(3, retries=0))
        write_control(control, [])
        await wait_until(lambda: bool(model.bus.slaves), 10)
        await run(line, MbusReadout(3))


def test_config_file_and_address_ranges(tmp_path: Path) -> None:
    path = tmp_path / "sims.toml"
    path.write_text(
        'control = "c.json"\n[[line]]\nname = "m"\nprotocol = "mbus"\nlink = "m.tty"\n'
        '[[line.meter]]\naddress = "1"\nkind = "heat"\n'
        '[[line]]\nname = "i"\nprotocol = "iec62056-21"\n[[line.meter]]\naddress = "123"\nbcc = "sum7"\n'
    )
    config = load_sim_config(path)
    assert config.control == str(tmp_path / "c.json")
    assert config.lines[0].link == str(tmp_path / "m.tty") and config.lines[0].line_baud == 2400
    assert config.lines[1].line_baud == 300 and config.lines[1].meters[0].bcc == "sum7"
    assert expand_addresses("1-3,7, 12345678") == ["1", "2", "3", "7", "12345678"]


def test_sim_meters_command_runs_a_line_on_a_pty(tmp_path: Path) -> None:
    link = tmp_path / "mbus.tty"
    proc = start_sim("meters", "--protocol", "mbus", "--addresses", "1-3", "--link", str(link))
    try:
        assert proc.stdout is not None
        announced = json.loads(proc.stdout.readline())
        assert json.loads(proc.stdout.readline()) == {"ready": True}
        assert announced["meters"] == ["1", "2", "3"] and announced["link"] == str(link)
        assert os.path.realpath(link) == announced["path"]

        async def read_two() -> list[int]:
            async with line_on(str(link), "mbus") as line:
                results = [await run(line, MbusReadout(a)) for a in (1, 3)]
            return [r.telegrams[0].address for r in results]

        assert asyncio.run(read_two()) == [1, 3]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert proc.returncode == 0


async def test_simulator_reopens_an_existing_tty(tmp_path: Path) -> None:
    from helpers.meters import SocatPair

    pair = SocatPair(tmp_path / "dev", tmp_path / "far")
    pair.start()
    try:
        config = SimConfig([SimLineSpec("m", "mbus", [SimMeterSpec("4")], device=str(tmp_path / "far"))])
        async with simulators(config) as sims:
            async with line_on(str(tmp_path / "dev"), "mbus") as line:
                await run(line, MbusReadout(4))
            pair.kill()
            await wait_until(lambda: sims.runners[0].stats.reopens >= 1, 10)
            # The simulator set ``ready`` when it opened the tty; clear it to see the reopen. Safe now:
            # the device is gone (socat killed, links unlinked) until pair.start() below.
            sims.runners[0].ready.clear()
            pair.start()
            await asyncio.wait_for(sims.runners[0].ready.wait(), 10)
            async with line_on(str(tmp_path / "dev"), "mbus") as line:
                await run(line, MbusReadout(4))
    finally:
        pair.kill()
