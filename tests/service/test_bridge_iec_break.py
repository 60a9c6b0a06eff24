"""A transparent session that ends while the meter is in IEC 62056-21 programming mode sends the break.

The meter is the IEC simulator (``dcud.sim``) on a socat pty pair: it models the hazard as a real meter
has it (a programming session it keeps for ``programming_idle_s`` after the last command, ignoring
sign-ons meanwhile), records every command with the rate it ran at, and ends the session on ``B0``.
Whatever ends the session (client gone, idle, taken over, lease handed to a readout, lease_max), the
meter must hear ``B0`` at the programming rate before anybody else gets the line.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dcud.codec.iec62056 import (
    ACK,
    encode_break,
    encode_command,
    encode_identification,
    encode_option_select,
    encode_password,
    encode_request,
    parse_data_message,
)
from dcud.codec.iec_sniffer import IecSniffer
from dcud.config.model import MeterConfig
from dcud.service.polling import PollingConfig, PollingService
from dcud.sim.iec_meter import IecMeter
from dcud.sim.serial_sim import IecSimLine, SimConfig, SimLineRunner, SimLineSpec, SimMeterSpec

from helpers.bridge import bridge_harness, connect, policy, read_exactly, tty_speed
from helpers.meters import FakeOutbox, simulators, wait_until

ADDRESS = "12345678"
PASSWORD = "00000000"


# -- the pieces: sniffer queries and the simulator's programming mode ------------------------------------


def test_the_sniffer_says_when_a_programming_session_is_open() -> None:
    sniffer = IecSniffer(300)
    assert not sniffer.programming
    sniffer.from_client(encode_request(ADDRESS), 1.0)
    sniffer.from_meter(encode_identification("DCU", "5", "SIM"), 1.2)
    sniffer.from_client(encode_option_select("5", mode_control="1"), 1.4)
    assert sniffer.programming and not sniffer.client_frame_open
    sniffer.from_client(encode_password(PASSWORD)[:5], 1.5)  # stops inside the frame
    assert sniffer.client_frame_open
    sniffer.from_client(encode_password(PASSWORD)[5:], 1.6)
    assert sniffer.programming and not sniffer.client_frame_open
    sniffer.from_client(encode_break(), 1.7)
    assert not sniffer.programming
    readout = IecSniffer(300)
    readout.from_client(encode_request(ADDRESS), 1.0)
    readout.from_meter(encode_identification("DCU", "5", "SIM"), 1.2)
    readout.from_client(encode_option_select("5"), 1.4)
    assert not readout.programming  # a readout holds no password session


def _run(meter: IecMeter, data: bytes, now: float) -> list[Any]:
    actions = meter.receive_data(data, now)
    while (deadline := meter.next_deadline()) is not None and deadline <= now + 0.3:
        actions += meter.handle_timer(deadline)
    return actions


def test_the_simulated_meter_keeps_a_programming_session_until_the_break() -> None:
    meter = IecMeter(ADDRESS, initial_baud=300, programming_idle_s=60.0)
    _run(meter, encode_request(ADDRESS), 0.0)
    sent = _run(meter, encode_option_select("5", mode_control="1"), 2.0)
    assert meter.baud == 9600 and meter.state == "programming"
    assert any(getattr(a, "data", b"").startswith(b"\x01P0\x02(") for a in sent)
    assert [a.data for a in _run(meter, encode_password("wrong"), 3.0) if hasattr(a, "data")] == [b"\x15"]
    assert [a.data for a in _run(meter, encode_password(PASSWORD), 4.0) if hasattr(a, "data")] == [b"\x06"]
    assert meter.authorised
    # A real meter in programming mode ignores a sign-on: the next master would talk to this session.
    assert _run(meter, encode_request(ADDRESS), 5.0) == []
    assert meter.ignored_requests == 1 and meter.state == "programming"
    assert [a.data for a in _run(meter, encode_command("W1", "1.8.0(5)"), 6.0) if hasattr(a, "data")] == [
        b"\x06"
    ]
    _run(meter, encode_break(), 7.0)
    assert meter.state == "idle" and meter.baud == 300 and not meter.authorised
    assert meter.commands == [("P1", 9600), ("P1", 9600), ("W1", 9600), ("B0", 9600)]
    # Without a command for programming_idle_s the meter gives up by itself.
    _run(meter, encode_request(ADDRESS), 10.0)
    _run(meter, encode_option_select("5", mode_control="1"), 12.0)
    assert meter.state == "programming"
    meter.handle_timer(12.5 + 60.0)
    assert meter.state == "idle" and meter.programming_timeouts == 1


# -- through the transparent port ----------------------------------------------------------------------


async def _programming(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A head-end's programming session through the port: sign-on, option select Y=1, P0, P1 -> ACK."""
    reader, writer = await connect(port)
    writer.write(encode_request(ADDRESS))
    ident = await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)
    assert ident.startswith(b"/") and ident[4:5] == b"5", ident
    writer.write(encode_option_select("5", mode_control="1"))
    p0 = await asyncio.wait_for(reader.readuntil(b"\x03"), 10)
    assert b"\x01P0\x02(" in p0
    await read_exactly(reader, 1)  # BCC
    writer.write(encode_password(PASSWORD))
    assert await read_exactly(reader, 1) == bytes([ACK])
    return reader, writer


async def _readout(port: int) -> bytes:
    """A mode C readout at 9600 through the port (the meter must be at sign-on to answer it)."""
    reader, writer = await connect(port)
    try:
        writer.write(encode_request(ADDRESS))
        await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)
        writer.write(encode_option_select("5"))
        message = await asyncio.wait_for(reader.readuntil(b"\x03"), 10)
        return message[message.index(b"\x02") :] + await read_exactly(reader, 1)
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def _iec_port(tmp_path: Path, **kw: Any) -> AsyncIterator[tuple[Any, IecMeter]]:
    """tm on an RS485 line at 300 Bd 7E1 with one simulated IEC meter (9600 Bd, mode C) behind it."""
    async with bridge_harness(tmp_path, kind="rs485", line_baud=300, framing="7E1", **kw) as h:
        spec = SimLineSpec("m", "iec62056-21", [SimMeterSpec(ADDRESS)], device=str(h.pair.b))
        async with simulators(SimConfig([spec])) as handle:
            model = handle.runners[0].model
            assert isinstance(model, IecSimLine)
            yield h, model.meters[0]


def _broken(meter: IecMeter) -> bool:
    return meter.state == "idle" and bool(meter.commands) and meter.commands[-1][0] == "B0"


@pytest.mark.parametrize("ending", ["client_closed", "client_reset", "idle_timeout", "taken_over"])
async def test_a_session_that_ends_in_programming_mode_sends_the_break(tmp_path: Path, ending: str) -> None:
    idle_s = 1.0 if ending == "idle_timeout" else 60.0
    trace = tmp_path / "trace.log"
    async with _iec_port(
        tmp_path, policy=policy(idle_timeout_s=idle_s), bridge={"trace_file": str(trace)}
    ) as (h, meter):
        _reader, writer = await _programming(h.port)
        assert meter.state == "programming" and meter.authorised
        assert tty_speed(h.pair.a) == 9600
        if ending == "client_closed":
            writer.close()
        elif ending == "client_reset":  # SO_LINGER 0: the close is a reset
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        elif ending == "taken_over":
            second = await _readout(h.port)  # same source: takes over, and finds the meter at sign-on
            assert parse_data_message(second).bcc_ok
        await wait_until(lambda: _broken(meter), 15)
        assert meter.commands == [("P1", 9600), ("B0", 9600)]  # at the programming rate, once
        assert meter.ignored_requests == 0  # nobody talked to the open session
        records = await h.wait_audits(1)
        assert records[0]["reason"] == ending
        assert records[0]["iec"]["breaks_sent"] == 1
        # The next holder gets a meter at sign-on, and the line back at its own settings.
        await wait_until(lambda: h.line.holder is None, 10)
        assert tty_speed(h.pair.a) == 300
        assert parse_data_message(await _readout(h.port)).bcc_ok
        writer.close()
    notes = trace.read_text()
    assert "-- break B0 at 9600 7E1 (programming session left open)" in notes
    # The break went out before the line went back to 300 Bd for the next holder.
    assert notes.index("break B0 at 9600") < notes.index("end ")


async def test_a_client_that_stops_inside_a_frame_gets_two_breaks(tmp_path: Path) -> None:
    async with _iec_port(tmp_path) as (h, meter):
        _reader, writer = await _programming(h.port)
        write = encode_command("W1", "1.8.0(00000001)")
        writer.write(write[:-5])  # the frame never ends: the meter takes the first break as its rest
        session = h.bridge._active
        assert session is not None and session.sniffer is not None
        sniffer = session.sniffer
        await wait_until(lambda: sniffer.client_frame_open, 10)
        writer.close()
        await wait_until(lambda: _broken(meter), 15)
        assert meter.commands[-1] == ("B0", 9600)
        assert ("W1", 9600) not in meter.commands  # the cut frame was never executed
        assert parse_data_message(await _readout(h.port)).bcc_ok


async def test_no_break_when_the_client_closed_the_session_itself(tmp_path: Path) -> None:
    async with _iec_port(tmp_path) as (h, meter):
        _reader, writer = await _programming(h.port)
        writer.write(encode_break())
        await wait_until(lambda: _broken(meter), 10)
        writer.close()
        (record,) = await h.wait_audits(1)
        assert record["iec"]["breaks_sent"] == 0
        assert meter.commands == [("P1", 9600), ("B0", 9600)]  # the client's own, nothing added


async def test_no_break_after_a_readout(tmp_path: Path) -> None:
    async with _iec_port(tmp_path) as (h, meter):
        assert parse_data_message(await _readout(h.port)).bcc_ok
        (record,) = await h.wait_audits(1)
        assert record["iec"]["breaks_sent"] == 0 and meter.commands == []


# -- handing the line to a scheduled readout -----------------------------------------------------------


@contextlib.asynccontextmanager
async def _polled(tmp_path: Path, session_policy: Any) -> AsyncIterator[tuple[Any, FakeOutbox, IecMeter]]:
    """The port's line also has the meter on the polling schedule (every 10 s, 1 s lease wait)."""
    outbox = FakeOutbox()
    meter_config = MeterConfig(
        name="flat-12", line="rs485-1", protocol="iec62056-21", address=ADDRESS, interval_s=10
    )

    def polling(h: Any) -> list[Any]:
        config = PollingConfig(
            meters=(meter_config,), lines=(h.line_config,), lease_timeout_s=1.0, state_dir=""
        )
        return [PollingService(config, h.lines, h.bus, outbox, event=h.events)]

    async with bridge_harness(
        tmp_path, kind="rs485", line_baud=300, framing="7E1", policy=session_policy, extra_services=polling
    ) as h:
        spec = SimLineSpec("m", "iec62056-21", [SimMeterSpec(ADDRESS)], device=str(h.pair.b), baud=300)
        model = IecSimLine(spec.meters, 300)
        runner = SimLineRunner(spec, model)
        task = asyncio.create_task(runner.run())
        try:
            await asyncio.wait_for(runner.ready.wait(), 10)
            yield h, outbox, model.meters[0]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.mark.parametrize("ending", ["lease_yield", "lease_max"])
async def test_the_readout_that_gets_the_line_finds_the_meter_at_sign_on(tmp_path: Path, ending: str) -> None:
    if ending == "lease_yield":  # silent for 1 s while the readout waits: the line is handed over
        session_policy = policy(lease_idle_s=1.0, idle_timeout_s=600)
    else:  # never idle long enough to yield; lease_max ends the session while the readout waits
        session_policy = policy(lease_idle_s=600, idle_timeout_s=600, lease_max_s=2.0)
    async with _polled(tmp_path, session_policy) as (h, outbox, meter):
        await wait_until(lambda: len(outbox.readings("flat-12")) >= 1, 30)  # the schedule runs
        _reader, writer = await _programming(h.port)
        readings = len(outbox.readings("flat-12"))
        await wait_until(lambda: len(outbox.readings("flat-12")) > readings, 40)
        assert ("B0", 9600) in meter.commands
        assert meter.ignored_requests == 0  # the readout's sign-on never went to the open session
        if ending == "lease_max":
            (record,) = await h.wait_audits(1)
            assert record["reason"] == "lease_max" and record["iec"]["breaks_sent"] == 1
        writer.close()
