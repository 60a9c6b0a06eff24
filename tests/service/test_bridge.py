"""Transparent ports end to end: bytes untouched, IEC mode C followed, leases, sessions, audit, trace."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from dcud.codec.iec62056 import compute_bcc, encode_option_select, encode_request, parse_data_message
from dcud.codec.mbus import decode_frame, encode_req_ud2
from dcud.config.loader import load_config
from dcud.config.model import MeterConfig
from dcud.runtime.bus import EventBus
from dcud.service.bridge import (
    INBOUND_HIGH_BYTES,
    READ_CHUNK_BYTES,
    AllowList,
    BridgeSession,
    HexTrace,
    TlsSettings,
    bits_per_char,
    build_bridge_services,
    resolve_listen,
)
from dcud.service.line import LeasedPort, LineRegistry
from dcud.service.polling import PollingConfig, PollingService
from dcud.sim.peers import find_program, free_port
from dcud.sim.serial_sim import IecSimLine, SimConfig, SimLineRunner, SimLineSpec, SimMeterSpec

from helpers import REPO, TESTS
from helpers.bridge import (
    TR_MIN_S,
    PtyDevice,
    bridge_harness,
    closed_by_peer,
    connect,
    exchange,
    policy,
    read_exactly,
    tty_speed,
)
from helpers.daemon import daemon_log, start_daemon, write_site
from helpers.meters import FakeOutbox, SocatPair, simulators, wait_until

ALL_BYTES = bytes(range(256))


@pytest.fixture(params=["read_loop", "push"])
def line_api(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Both ways the bridge can take bytes from its line: the port's push API (the line layer's own),
    and the read loop it falls back to for a port without it (hidden here; monkeypatch restores it)."""
    if request.param == "read_loop":
        monkeypatch.delattr(LeasedPort, "set_receiver")
        monkeypatch.delattr(LeasedPort, "output_pending")
    yield request.param


@pytest.mark.parametrize(
    ("transparent", "kind", "baud", "framing"),
    [("primary", "rs232", 9600, "8N1"), ("secondary", "mbus", 2400, "8E1")],
)
async def test_all_256_values_and_large_frames_both_ports(
    tmp_path: Path, transparent: str, kind: str, baud: int, framing: str, line_api: str
) -> None:
    rng = random.Random(4)
    payload = ALL_BYTES * 256 + rng.randbytes(256 * 1024) + ALL_BYTES[::-1] * 64
    async with bridge_harness(
        tmp_path, kind=kind, line_baud=baud, framing=framing, transparent=transparent
    ) as h:
        device = PtyDevice(h.pair.b)
        device.start()
        try:
            echoed = await exchange(h.port, payload, chunk=65536)
            assert echoed == payload  # nothing lost, nothing reordered, every value
            assert bytes(device.received) == payload
            (record,) = await h.wait_audits(1)
        finally:
            device.stop()
    assert record["port"] == ("tm" if transparent == "primary" else "tm2")
    assert record["bytes_to_meter"] == len(payload)
    assert record["bytes_to_client"] == len(payload)
    assert record["reason"] == "client_closed"
    assert record["peer"].startswith("127.0.0.1:")


def _dlms_like_responder(buffer: bytearray) -> tuple[int, bytes]:
    """Answers each length-prefixed binary request (2-byte length) with its bytes reversed, framed."""
    if len(buffer) < 2:
        return 0, b""
    size = int.from_bytes(buffer[:2], "big")
    if len(buffer) < 2 + size:
        return 0, b""
    body = bytes(buffer[2 : 2 + size])
    answer = b"\x7e\xff\x00" + body[::-1] + b"\x7e"
    return 2 + size, len(answer).to_bytes(2, "big") + answer


async def test_dlms_like_binary_exchange(tmp_path: Path, line_api: str) -> None:
    rng = random.Random(7)
    async with bridge_harness(tmp_path) as h:
        device = PtyDevice(h.pair.b, _dlms_like_responder)
        device.start()
        reader, writer = await connect(h.port)
        try:
            for size in [
                1,
                2,
                13,
                64,
                255,
                256,
                1024,
                2048,
                4000,
                *[rng.randrange(1, 3000) for _ in range(30)],
            ]:
                body = rng.randbytes(size - 3) + b"\xff\x7e\x00" if size > 3 else ALL_BYTES[-size:]
                writer.write(len(body).to_bytes(2, "big") + body)
                await writer.drain()
                length = int.from_bytes(await read_exactly(reader, 2), "big")
                answer = await read_exactly(reader, length)
                assert answer == b"\x7e\xff\x00" + body[::-1] + b"\x7e"
        finally:
            writer.close()
            device.stop()


async def _mode_c_readout(
    port: int, address: str = "12345678"
) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    """A head-end's IEC 62056-21 mode C readout through the port; returns the data message (STX..BCC)."""
    reader, writer = await connect(port)
    writer.write(encode_request(address))
    ident = await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)
    assert ident.startswith(b"/") and ident[4:5] == b"5", ident
    await asyncio.sleep(TR_MIN_S)  # IEC 62056-21 tr before the option select
    writer.write(encode_option_select("5"))
    message = await asyncio.wait_for(reader.readuntil(b"\x03"), 15)
    bcc = await read_exactly(reader, 1)
    return message[message.index(b"\x02") :] + bcc, reader, writer


async def test_iec_mode_c_readout_switches_the_uart(tmp_path: Path, line_api: str) -> None:
    trace = tmp_path / "trace.log"
    async with bridge_harness(
        tmp_path, kind="rs485", line_baud=300, framing="7E1", bridge={"trace_file": str(trace)}
    ) as h:
        sim = SimConfig([SimLineSpec("m", "iec62056-21", [SimMeterSpec("12345678")], device=str(h.pair.b))])
        async with simulators(sim):
            message, _reader, writer = await _mode_c_readout(h.port)
            # Right after the readout the UART still runs at the agreed 9600 Bd ...
            assert tty_speed(h.pair.a) == 9600
            # ... and goes back to the initial 300 Bd once the meter has (after its NAK window),
            # while the session (and its lease) goes on.
            await wait_until(lambda: tty_speed(h.pair.a) == 300, 10)
            assert h.line.holder is not None and h.line.holder.kind == "bridge"
            # A second readout in the same session works the same way.
            writer.close()
            second, _r, w2 = await _mode_c_readout(h.port)
            w2.close()
            records = await h.wait_audits(2)
    for data in (message, second):
        assert compute_bcc(data[1:-1]) == data[-1]
        parsed = parse_data_message(data)
        assert parsed.bcc_ok and parsed.readout
        assert {ds.address for ds in parsed.datasets} >= {"1.8.0", "F.F"}
    assert records[0]["iec"] == {
        "signons": 1,
        "switches": 2,
        "readouts": 1,
        "bcc_errors": 0,
        "breaks_sent": 0,
    }
    assert records[1]["iec"]["readouts"] == 1
    lines = trace.read_text().splitlines()
    option = next(i for i, ln in enumerate(lines) if " c>m 6 063035300d0a" in ln)
    switch = next(i for i, ln in enumerate(lines) if ln.endswith("-- line 9600 7E1 (option select 050)"))
    data = next(i for i, ln in enumerate(lines) if " m>c " in ln and ln.split()[4].startswith("02"))
    back = next(i for i, ln in enumerate(lines) if "-- line 300 7E1 (back to initial" in ln)
    assert option < switch < data < back


async def test_line_state_shows_the_bridge_as_lease_owner(tmp_path: Path) -> None:
    async with bridge_harness(tmp_path) as h:
        device = PtyDevice(h.pair.b)
        device.start()
        reader, writer = await connect(h.port)
        writer.write(b"x")
        assert await read_exactly(reader, 1) == b"x"
        doc = h.bus.states["line/rs485-1"]
        assert doc["lease"]["kind"] == "bridge"
        assert doc["lease"]["owner"].startswith("bridge:tm:127.0.0.1:")
        assert h.bus.states["bridge/tm"]["session"]["peer"].startswith("127.0.0.1:")
        writer.close()
        await wait_until(lambda: h.bus.states["line/rs485-1"]["lease"] is None, 10)
        device.stop()


async def test_second_client_takeover(tmp_path: Path) -> None:
    async with bridge_harness(tmp_path, bridge={"second_client": "takeover"}) as h:
        device = PtyDevice(h.pair.b)
        device.start()
        r1, w1 = await connect(h.port)
        w1.write(b"one")
        assert await read_exactly(r1, 3) == b"one"
        r2, w2 = await connect(h.port)
        w2.write(b"two")
        assert await read_exactly(r2, 3) == b"two"
        assert await asyncio.wait_for(r1.read(), 10) == b""  # the old client was closed
        records = await h.wait_audits(1)
        assert records[0]["reason"] == "taken_over"
        assert "by 127.0.0.1:" in records[0]["detail"]
        w2.close()
        await h.wait_audits(2)
        device.stop()
        assert h.bridge.counters["taken_over"] == 1


async def test_second_client_refused_with_a_message(tmp_path: Path) -> None:
    async with bridge_harness(tmp_path, bridge={"second_client": "refuse", "busy_message": "BUSY\r\n"}) as h:
        device = PtyDevice(h.pair.b)
        device.start()
        r1, w1 = await connect(h.port)
        w1.write(b"one")
        assert await read_exactly(r1, 3) == b"one"
        r2, w2 = await connect(h.port)
        w2.write(b"not for the meter")
        assert await asyncio.wait_for(r2.read(), 10) == b"BUSY\r\n"
        w1.write(b"still")
        assert await read_exactly(r1, 5) == b"still"
        assert b"not for the meter" not in device.received
        w1.close()
        w2.close()
        device.stop()
        assert h.bridge.counters["refused_busy"] == 1


async def test_source_allow_list_drops_others_before_anything(tmp_path: Path) -> None:
    async with bridge_harness(tmp_path, bridge={"allow": ("10.0.0.0/8",)}) as h:
        reader, writer = await connect(h.port)
        writer.write(b"hello")
        assert await closed_by_peer(reader, 10)
        assert h.bridge.counters["refused_address"] == 1
        assert h.line.holder is None
        assert h.audits() == []


async def test_idle_timeout_ends_the_session(tmp_path: Path) -> None:
    async with bridge_harness(tmp_path, policy=policy(idle_timeout_s=0.5, lease_idle_s=0.2)) as h:
        reader, _writer = await connect(h.port)
        assert await closed_by_peer(reader, 10)
        (record,) = await h.wait_audits(1)
        assert record["reason"] == "idle_timeout"


async def test_client_that_reads_nothing_is_dead_within_the_unsent_bound(
    tmp_path: Path, line_api: str
) -> None:
    """The meter keeps talking, the client never reads: the session ends (peer_not_reading)."""
    async with bridge_harness(tmp_path, policy=policy(unsent_timeout_s=1.0)) as h:
        chunk = bytes(range(256)) * 256

        def chatty(buffer: bytearray) -> tuple[int, bytes]:
            return len(buffer), chunk * 128 * len(buffer)  # 8 MiB per byte received

        device = PtyDevice(h.pair.b, chatty)
        device.start()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", h.port))
        try:
            sock.send(b"????")  # and never read
            (record,) = await h.wait_audits(1, timeout_s=60)
            assert record["reason"] in ("peer_not_reading", "peer_dead")
            await wait_until(lambda: h.line.holder is None, 10)
        finally:
            sock.close()
            device.stop()


async def test_a_line_that_takes_nothing_holds_the_client_back(tmp_path: Path) -> None:
    """Backpressure: while the far end reads nothing, the session stops reading its client and holds a
    bounded amount in memory; once the far end reads, every byte arrives, in order."""
    payload = random.Random(11).randbytes(6 * 1024 * 1024)
    async with bridge_harness(tmp_path, line_baud=115200) as h:
        device = PtyDevice(h.pair.b, lambda buf: (len(buf), b""))  # answers nothing
        device.start(reading=False)
        _reader, writer = await connect(h.port)
        writer.write(payload)  # the kernel's socket buffers take what dcud does not read
        await wait_until(lambda: bool(h.bridge._sessions), 10)
        (session,) = h.bridge._sessions

        def held_bytes() -> int:
            queued = session._queued_bytes + sum(len(op) for op in session._ops if isinstance(op, bytes))
            port = h.line._port
            return queued + (port.output_pending() if port is not None else 0)

        try:
            await wait_until(lambda: session._reading_paused, 30)
            bound = INBOUND_HIGH_BYTES + 2 * READ_CHUNK_BYTES + 256 * 1024  # + one socket read + the queue
            assert held_bytes() <= bound
            # Still nothing read on the far end: still bounded, still paused. A negative check with no
            # marker to wait for: a paused session sleeps on the port's drain and its own wake-up event,
            # and neither fires while the far end reads nothing. So a bounded window instead.
            await asyncio.sleep(0.5)
            assert held_bytes() <= bound and session._reading_paused
            assert session.bytes_c2m < len(payload)
            device.read()
            await asyncio.wait_for(writer.drain(), 60)
            await wait_until(lambda: len(device.received) >= len(payload), 60)
            assert bytes(device.received) == payload
        finally:
            writer.close()
            device.stop()


@pytest.fixture
def driver_asks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every TIOCOUTQ ioctl a serial port makes from now on (the fd asked), in order."""
    import dcud.transport.serial as serial_mod

    asked: list[int] = []
    real = serial_mod._tiocoutq

    def counting(fd: int) -> int:
        asked.append(fd)
        return real(fd)

    monkeypatch.setattr(serial_mod, "_tiocoutq", counting)
    return asked


async def test_the_line_model_learns_that_a_pty_has_no_wire(tmp_path: Path, driver_asks: list[int]) -> None:
    """The backlog model asks the driver (an ioctl) only when it believes the queue is full; a device that
    always reports an empty queue (a pty) speeds the model up, so the driver is soon asked no more."""
    async with bridge_harness(tmp_path, line_baud=115200) as h:
        device = PtyDevice(h.pair.b)
        device.start()
        reader, writer = await connect(h.port)
        try:
            frame = bytes(range(256)) * 4
            for _ in range(200):  # 200 KiB at "115200 Bd" would be 18 s of wire time
                writer.write(frame)
                assert await read_exactly(reader, len(frame)) == frame
        finally:
            writer.close()
            device.stop()
    # A model stuck at the nominal rate would ask on every other write (about 100 times).
    assert 0 < len(driver_asks) <= 12


async def test_the_line_model_does_not_age_on_the_loop_clock(tmp_path: Path, driver_asks: list[int]) -> None:
    """uvloop's clock moves in whole milliseconds. A line model aged on it sees no drain between chunks
    that arrive within one step, believes the queue full after a few and sends the hot path to the
    driver (an ioctl, then the careful path) for nothing: here the loop clock stands still while real
    time passes between chunks, and the model, once it has learned the pty, never asks."""
    import time

    async with bridge_harness(tmp_path, line_baud=115200) as h:
        device = PtyDevice(h.pair.b)
        device.start()
        reader, writer = await connect(h.port)
        frame = bytes(range(256)) * 4
        try:
            session: BridgeSession | None = None
            for _ in range(200):  # until the model has learned that the pty has no wire
                writer.write(frame)
                assert await read_exactly(reader, len(frame)) == frame
                (session,) = h.bridge._sessions
                if session._cps >= session._cps_max:
                    break
            assert session is not None and session._cps >= session._cps_max
            loop = session._loop
            frozen_s = loop.time()

            class SteppedClock:
                """The session's loop, with a clock that does not move inside this test's step."""

                def __getattr__(self, name: str) -> Any:
                    return getattr(loop, name)

                def time(self) -> float:
                    return frozen_s

            def chunks_within_one_step(target: BridgeSession) -> None:
                for _ in range(20):
                    target.data_received(frame)
                    time.sleep(0.0005)  # blocks the loop on purpose; the learned rate drains ~6 KB

            driver_asks.clear()
            session._loop = SteppedClock()  # type: ignore[assignment]
            try:
                chunks_within_one_step(session)
            finally:
                session._loop = loop
            assert driver_asks == []
            assert await read_exactly(reader, 20 * len(frame)) == frame * 20
        finally:
            writer.close()
            device.stop()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_rfc2217_client_sets_the_rate_and_data_passes_escaped(tmp_path: Path) -> None:
    import serial

    async with bridge_harness(tmp_path, bridge={"rfc2217": True}) as h:
        device = PtyDevice(h.pair.b)
        device.start()

        def client() -> bytes:
            port = serial.serial_for_url(f"rfc2217://127.0.0.1:{h.port}", baudrate=4800, timeout=5)
            try:
                port.write(ALL_BYTES * 4)
                got = port.read(1024)
                speed_seen = tty_speed(h.pair.a)
                port.baudrate = 19200
                return got + speed_seen.to_bytes(4, "big") + tty_speed(h.pair.a).to_bytes(4, "big")
            finally:
                port.close()

        result = await asyncio.to_thread(client)
        device.stop()
    assert result[:1024] == ALL_BYTES * 4
    assert int.from_bytes(result[1024:1028], "big") == 4800
    assert int.from_bytes(result[1028:1032], "big") == 19200


async def test_hex_trace_records_both_directions(tmp_path: Path) -> None:
    trace = tmp_path / "t" / "trace-tm.log"
    async with bridge_harness(tmp_path, bridge={"trace_file": str(trace)}) as h:
        device = PtyDevice(h.pair.b)
        device.start()
        assert await exchange(h.port, b"\x00\xff\x7e", chunk=256) == b"\x00\xff\x7e"
        await h.wait_audits(1)
        device.stop()
    text = trace.read_text()
    assert " tm#1 c>m 3 00ff7e\n" in text and " tm#1 m>c 3 00ff7e\n" in text
    assert "-- session tm from 127.0.0.1:" in text and "-- end client_closed" in text


def test_hex_trace_rotates_at_its_size(tmp_path: Path) -> None:
    trace = HexTrace(tmp_path / "trace.log", 4096)
    for i in range(100):
        trace.data("s#1", "c>m", bytes([i]) * 100)
    trace.close()
    assert (tmp_path / "trace.log").stat().st_size <= 4096
    assert (tmp_path / "trace.log.1").stat().st_size <= 4096
    assert "636363" in (tmp_path / "trace.log").read_text()


def test_allow_list_and_listen_rules() -> None:
    allow = AllowList(["10.0.0.0/8", "2001:db8::/32", "192.168.1.7"])
    assert allow.allows("10.1.2.3") and allow.allows("::ffff:10.1.2.3") and allow.allows("192.168.1.7")
    assert allow.allows("2001:db8::1") and not allow.allows("127.0.0.1") and not allow.allows("bogus")
    assert AllowList([]).allows("203.0.113.9")
    assert not AllowList(["10.0.0.0/99"]).allows("10.0.0.1")  # a typo narrows access, never widens it
    plain, open_tls = TlsSettings(enabled=False), TlsSettings(enabled=True, verify="none")
    mutual = TlsSettings(enabled=True, verify="mandatory")
    # auto is default-deny: beyond loopback only with client certificates or an allow-list.
    assert resolve_listen("auto", plain) == "127.0.0.1"
    assert resolve_listen("auto", open_tls) == "127.0.0.1"  # the WM-E defaults: TLS, no client auth
    assert resolve_listen("auto", mutual) == ""
    assert resolve_listen("auto", open_tls, ["192.0.2.0/24"]) == ""
    assert resolve_listen("auto", plain, ["192.0.2.0/24"]) == "127.0.0.1"
    assert resolve_listen("any", plain) == "" and resolve_listen("10.0.0.1", plain) == "10.0.0.1"
    assert bits_per_char("7E1") == 10 and bits_per_char("8E1") == 11 and bits_per_char("8N2") == 11


async def test_session_waits_for_the_line_and_ends_when_it_never_comes(tmp_path: Path) -> None:
    async with bridge_harness(tmp_path, policy=policy(lease_wait_s=0.5)) as h:
        line = h.line
        async with line.lease("poll:someone", "poll", timeout_s=5):
            reader, writer = await connect(h.port)
            writer.write(b"queued")
            assert await closed_by_peer(reader, 10)
        (record,) = await h.wait_audits(1)
        assert record["reason"] == "line_unavailable"
        with contextlib.suppress(Exception):
            writer.close()


# -- leases against real scheduled readouts -------------------------------------------------------


class _Recording:
    """Wraps a simulator line model: records when (loop time) every chunk was read off the pty."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.bits_per_char = model.bits_per_char
        self.chunks: list[tuple[float, bytes]] = []

    def inbound_baud(self, data: bytes) -> int:
        self.chunks.append((asyncio.get_running_loop().time(), bytes(data)))
        return int(self.model.inbound_baud(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


@contextlib.asynccontextmanager
async def _polled_line(tmp_path: Path, session_policy: Any) -> AsyncIterator[tuple[Any, Any, _Recording]]:
    """A bridged IEC line with one meter that the polling service reads every 10 s."""
    outbox = FakeOutbox()
    meter = MeterConfig(
        name="flat-12", line="rs485-1", protocol="iec62056-21", address="12345678", interval_s=10
    )

    def polling(h: Any) -> list[Any]:
        config = PollingConfig(meters=(meter,), lines=(h.line_config,), lease_timeout_s=1.0, state_dir="")
        return [PollingService(config, h.lines, h.bus, outbox, event=h.events)]

    async with bridge_harness(
        tmp_path, kind="rs485", line_baud=300, framing="7E1", policy=session_policy, extra_services=polling
    ) as h:
        spec = SimLineSpec("m", "iec62056-21", [SimMeterSpec("12345678")], device=str(h.pair.b), baud=300)
        recording = _Recording(IecSimLine(spec.meters, 300))
        runner = SimLineRunner(spec, recording)  # type: ignore[arg-type]
        task = asyncio.create_task(runner.run())
        try:
            await asyncio.wait_for(runner.ready.wait(), 10)
            yield h, outbox, recording
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _meter_state(h: Any) -> dict[str, Any]:
    return dict(h.bus.states.get("meter/flat-12", {}))


async def test_polling_is_deferred_during_a_session_and_resumes_after(tmp_path: Path) -> None:
    async with _polled_line(tmp_path, policy(lease_idle_s=600, idle_timeout_s=600)) as (h, outbox, _rec):
        reader, writer = await connect(h.port)
        await wait_until(lambda: h.line.holder is not None and h.line.holder.kind == "bridge", 10)
        await wait_until(lambda: _meter_state(h).get("status") == "deferred", 30)
        assert _meter_state(h)["counters"]["deferred"] >= 1
        assert _meter_state(h)["counters"]["failed"] == 0  # deferred, never failed
        assert outbox.readings() == []
        assert h.bus.states["line/rs485-1"]["lease"]["kind"] == "bridge"
        writer.close()
        await wait_until(lambda: len(outbox.readings("flat-12")) >= 1, 30)
        assert _meter_state(h)["status"] == "ok"
        del reader


async def test_idle_session_yields_to_readouts_and_takes_the_line_back(tmp_path: Path) -> None:
    async with _polled_line(tmp_path, policy(lease_idle_s=1.0, idle_timeout_s=600)) as (h, outbox, _rec):
        reader, writer = await connect(h.port)
        # The client stays connected but silent: a readout gets the line once the session is idle.
        await wait_until(lambda: len(outbox.readings("flat-12")) >= 1, 30)
        # The client talks again: the session takes the line back and a mode C readout works.
        writer.write(encode_request("12345678"))
        ident = await asyncio.wait_for(reader.readuntil(b"\r\n"), 15)
        assert ident.startswith(b"/")
        await asyncio.sleep(TR_MIN_S)  # IEC 62056-21 tr before the option select
        writer.write(encode_option_select("5"))
        message = await asyncio.wait_for(reader.readuntil(b"\x03"), 15)
        bcc = await read_exactly(reader, 1)
        data = message[message.index(b"\x02") :] + bcc
        assert parse_data_message(data).bcc_ok
        writer.close()
        (record,) = await h.wait_audits(1)
        assert record["leases"] >= 2 and record["lease_yields"] >= 1


async def test_a_session_never_interleaves_with_a_readout(tmp_path: Path) -> None:
    marker = b"\xaa\x55SESSION\x55\xaa"
    async with _polled_line(tmp_path, policy(lease_idle_s=600, idle_timeout_s=600)) as (h, outbox, rec):
        transitions: list[tuple[float, str | None]] = []
        line = h.line
        publish = line.on_change

        def on_change(changed: Any) -> None:
            holder = changed.holder.kind if changed.holder is not None else None
            if not transitions or transitions[-1][1] != holder:
                transitions.append((asyncio.get_running_loop().time(), holder))
            if publish is not None:
                publish(changed)

        line.on_change = on_change
        # Connect in the middle of a scheduled readout: the session must queue behind it.
        await wait_until(lambda: line.holder is not None and line.holder.kind == "poll", 30)
        _reader, writer = await connect(h.port)
        writer.write(marker)
        await wait_until(lambda: any(marker in c for _t, c in rec.chunks), 30)
        await wait_until(lambda: len(outbox.readings("flat-12")) >= 1, 30)
        writer.close()
        (record,) = await h.wait_audits(1)
    assert record["lease_wait_s"] > 0  # it really waited for the readout to finish
    reading = outbox.readings("flat-12")[0]
    assert {v["id"] for v in reading["values"]} >= {"1.8.0"}

    def holder_at(t: float) -> str | None:
        current = None
        for when, holder in transitions:
            if when <= t:
                current = holder
        return current

    kinds = [(holder_at(t), chunk) for t, chunk in rec.chunks]
    assert kinds, "the meter heard nothing"
    for holder, chunk in kinds:
        if marker in chunk:
            assert holder == "bridge", kinds
        else:
            assert holder == "poll", kinds  # sign-ons and option selects only ever under the poll lease


@pytest.mark.netns(user_ns=True)
async def test_a_vanished_client_frees_the_line_within_the_bound(tmp_path: Path) -> None:
    """In a private network namespace the client's packets are black-holed (no FIN, no RST)."""
    unshare = find_program("unshare", "util-linux")
    find_program("ip", "iproute2")
    script = TESTS / "helpers" / "bridge_vanish_proc.py"
    proc = await asyncio.create_subprocess_exec(
        unshare,
        "-rn",
        sys.executable,
        str(script),
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=str(REPO),
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    text = out.decode(errors="replace")
    results = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, text[-3000:]
    assert {r["case"] for r in results} == {"idle", "unacked"}, text[-3000:]
    for result in results:
        assert result["freed"], result
        assert result["reason"] == "peer_dead", result


# -- configuration and the real daemon ---------------------------------------------------------


def test_builder_reads_the_wme_parameters(tmp_path: Path) -> None:
    toml = (
        '[transparent]\nallow = ["10.0.0.0/8"]\nsecond_client = "refuse"\ntrace_file = "trace-{port}.log"\n'
        '[[line]]\nname = "rs485-1"\ndevice = "/dev/ttyS1"\ntransparent = "primary"\n'
        '[[line]]\nname = "mbus-1"\ndevice = "/dev/ttyS2"\nkind = "mbus"\ntransparent = "secondary"\n'
    )
    wme = (
        "tm.baud=300\ntm2.port=9012\ntm.tls_enable=0\nei_client_addr=192.0.2.10\nei_client_port=7000\n"
        "ei_client_top_keepalive=5\nei_client_auth_mode=E\nei_client_type=hes\nei_client_pass=secret\n"
    )
    loaded = load_config(write_site(tmp_path, toml_extra=toml, wme=wme))
    runtime = (LineRegistry(), EventBus(), _no_events)
    services = {s.name: s for s in build_bridge_services(loaded, *runtime)}
    assert set(services) == {"bridge.tm", "bridge.tm2", "ei-client"}
    tm = services["bridge.tm"].config
    assert (tm.port, tm.baud, tm.line.name, tm.host, tm.tls.enabled) == (
        9000,
        300,
        "rs485-1",
        "127.0.0.1",
        False,
    )
    assert tm.second_client == "refuse" and tm.allow == ("10.0.0.0/8",)
    assert tm.trace_file == str(loaded.state_dir / "trace-tm.log")
    tm2 = services["bridge.tm2"].config
    assert (tm2.port, tm2.baud, tm2.line.name) == (9012, 2400, "mbus-1")
    ei = services["ei-client"].config
    assert (ei.host, ei.port, ei.keepalive_s, ei.policy.keepalive_idle_s) == ("192.0.2.10", 7000, 300, 300)
    assert (ei.auth_mode, ei.username, ei.password, ei.line.name) == ("E", "hes", "secret", "rs485-1")
    assert ei.policy.idle_timeout_s == 0  # the EI connection is kept


def test_wme_defaults_serve_tls_with_a_device_certificate_on_loopback_only(tmp_path: Path) -> None:
    toml = '[[line]]\nname = "rs485-1"\ndevice = "/dev/ttyS1"\ntransparent = "primary"\n'
    loaded = load_config(write_site(tmp_path, toml_extra=toml, wme="ntp_interval=600\n"))
    runtime = (LineRegistry(), EventBus(), _no_events)
    (service,) = build_bridge_services(loaded, *runtime)
    config = service.config  # type: ignore[attr-defined]
    # TLS without client authentication (tm.verify=0) encrypts but admits anyone: loopback only.
    assert config.tls.enabled and config.tls.cert_bank == 0 and config.host == "127.0.0.1"
    allowed = load_config(
        write_site(tmp_path / "b", toml_extra=toml + '[transparent]\nallow = ["192.0.2.0/24"]\n', wme="")
    )
    (service,) = build_bridge_services(allowed, *runtime)
    assert service.config.host == ""  # type: ignore[attr-defined]


async def test_the_daemon_serves_the_transparent_port(tmp_path: Path) -> None:
    pair = SocatPair(tmp_path / "a", tmp_path / "b")
    pair.start()
    port = free_port()
    toml = (
        '[transparent]\nlisten = "loopback"\n[[line]]\nname = "rs485-1"\n'
        f'device = "{pair.a}"\nkind = "rs232"\nbaud = 9600\nframing = "8N1"\ntransparent = "primary"\n'
    )
    wme = f"tm_server_port={port}\ntm2.port={free_port()}\nfw_server_port={free_port()}\ntm.tls_enable=0\n"
    config = write_site(tmp_path / "site", toml_extra=toml, wme=wme)
    device = PtyDevice(pair.b)
    device.start()
    proc = start_daemon(config)
    try:
        for _ in range(200):
            with contextlib.suppress(OSError):
                _r, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            await asyncio.sleep(0.05)
        assert await exchange(port, ALL_BYTES * 16) == ALL_BYTES * 16
    finally:
        proc.terminate()
        proc.wait(20)
        device.stop()
        pair.kill()
    log_text = daemon_log(config)
    assert proc.returncode == 0, log_text[-2000:]
    assert "bridge session" in log_text and '"bytes_to_meter": 4096' in log_text


async def test_mbus_readout_through_the_secondary_port_with_the_simulator(tmp_path: Path) -> None:
    async with bridge_harness(
        tmp_path, kind="mbus", line_baud=2400, framing="8E1", transparent="secondary"
    ) as h:
        spec = SimLineSpec("m", "mbus", [SimMeterSpec("5", kind="water")], device=str(h.pair.b))
        async with simulators(SimConfig([spec])):
            reader, writer = await connect(h.port)
            for fcb in (False, True, False):
                writer.write(encode_req_ud2(5, fcb=fcb))
                head = await read_exactly(reader, 4)
                assert head[0] == 0x68 and head[3] == 0x68, head
                rest = await read_exactly(reader, head[1] + 2)
                frame = decode_frame(head + rest)  # checksum, lengths and stop byte verified
                assert frame.address == 5
            writer.close()
            (record,) = await h.wait_audits(1)
    assert record["port"] == "tm2" and record["iec"]["signons"] == 0


async def _no_events(event_type: str, text: str, **fields: Any) -> None:
    """An event sink for builder tests that never run the services."""
