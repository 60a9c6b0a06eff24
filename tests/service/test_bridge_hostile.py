"""Hostile input on the transparent ports: garbage, a flood, half-open and many connections.

Whatever comes in, the daemon keeps serving the other port and keeps polling its meters.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path
from typing import Any

from dcud.codec.iec62056 import encode_option_select, encode_request, parse_data_message
from dcud.config.model import LineConfig, MeterConfig
from dcud.service.bridge import INBOUND_HIGH_BYTES, BridgeConfig, BridgeService, TlsSettings
from dcud.service.line import LineService, LineServiceConfig
from dcud.service.polling import PollingConfig, PollingService
from dcud.sim.serial_sim import SimConfig, SimLineSpec, SimMeterSpec

from helpers.bridge import (
    TR_MIN_S,
    Harness,
    PtyDevice,
    bridge_harness,
    closed_by_peer,
    connect,
    exchange,
    policy,
    read_exactly,
)
from helpers.meters import FakeOutbox, SocatPair, simulators, wait_until


async def _readout(port: int) -> bytes:
    reader, writer = await connect(port)
    try:
        writer.write(encode_request("12345678"))
        await asyncio.wait_for(reader.readuntil(b"\r\n"), 15)
        await asyncio.sleep(TR_MIN_S)  # IEC 62056-21 tr before the option select
        writer.write(encode_option_select("5"))
        message = await asyncio.wait_for(reader.readuntil(b"\x03"), 15)
        return message[message.index(b"\x02") :] + await read_exactly(reader, 1)
    finally:
        writer.close()


async def test_garbage_then_a_clean_readout(tmp_path: Path) -> None:
    """Garbage of every kind, then a clean readout passes (RS485 line with a fixed 9600 Bd sign-on)."""
    rng = random.Random(11)
    async with bridge_harness(tmp_path, kind="rs485", line_baud=9600, framing="7E1") as h:
        spec = SimLineSpec("m", "iec62056-21", [SimMeterSpec("12345678")], device=str(h.pair.b), baud=9600)
        async with simulators(SimConfig([spec])):
            garbage = [
                rng.randbytes(600),
                b"/?" * 100,
                b"\x06" * 50 + b"\x06999\r\n" + b"\x06050\r\n",
                b"/?12345678!\r\n" + rng.randbytes(100),  # a real sign-on, then no option select
                bytes(range(256)),
                b"\x01B0\x03q" + b"\x7e\xa0\x07\x03\x21\x53\x00\x00\x7e",
            ]
            for index, chunk in enumerate(garbage, start=1):
                _reader, writer = await connect(h.port)
                writer.write(chunk)
                await writer.drain()
                writer.close()
                # One garbage session at a time: its audit record says it is over, bytes and all (a
                # half-closed client's bytes still go to the line before the session ends).
                records = await h.wait_audits(index)
                assert records[-1]["bytes_to_meter"] == len(chunk), records[-1]
            # The meter itself may need a sign-on or two (and its own timers) to get over the garbage,
            # as a real one would; dcud must pass a clean readout through once it has.
            message = b""
            for _attempt in range(4):
                with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError):
                    message = await _readout(h.port)
                    break
            assert parse_data_message(message).bcc_ok
            assert h.bridge.counters["sessions"] >= len(garbage) + 1


@contextlib.asynccontextmanager
async def _two_lines(tmp_path: Path, **bridge: Any) -> Any:
    """tm on line rs485-1 (115200 Bd, a sink), tm2 on line rs485-2 (a polled IEC meter)."""
    pair2 = SocatPair(tmp_path / "l2-a", tmp_path / "l2-b")
    pair2.start()
    line2 = LineConfig(name="rs485-2", device=str(pair2.a), baud=300, framing="7E1", transparent="secondary")
    outbox = FakeOutbox()
    tm2: list[BridgeService] = []

    def extra(h: Harness) -> list[Any]:
        meter = MeterConfig(
            name="m2", line="rs485-2", protocol="iec62056-21", address="12345678", interval_s=10
        )
        bridge2 = BridgeService(
            BridgeConfig(
                port_name="tm2", line=line2, port=0, baud=300, host="127.0.0.1", policy=h.bridge.config.policy
            ),
            h.lines,
            h.bus,
            h.events,
        )
        tm2.append(bridge2)
        return [
            LineService(LineServiceConfig(line2), h.lines, h.bus, h.events),
            bridge2,
            PollingService(
                PollingConfig(meters=(meter,), lines=(line2,), lease_timeout_s=1.0), h.lines, h.bus, outbox
            ),
        ]

    try:
        async with bridge_harness(tmp_path, line_baud=115200, bridge=bridge, extra_services=extra) as h:
            sim = SimConfig(
                [SimLineSpec("m", "iec62056-21", [SimMeterSpec("12345678")], device=str(pair2.b))]
            )
            async with simulators(sim):
                await wait_until(lambda: tm2[0].bound_port is not None, 10)
                yield h, tm2[0], outbox
    finally:
        pair2.kill()


async def test_a_flood_is_paced_by_the_line_and_everything_else_goes_on(tmp_path: Path) -> None:
    async with _two_lines(tmp_path) as (h, tm2, outbox):
        sink = PtyDevice(h.pair.b, lambda buf: (len(buf), b""))
        sink.start()
        reader, writer = await connect(h.port)
        sent = 0
        stop = asyncio.Event()
        block = random.Random(3).randbytes(65536)

        async def flood() -> None:
            nonlocal sent
            for _ in range(2000):  # bounded: at most 128 MiB
                if stop.is_set():
                    return
                writer.write(block)
                await writer.drain()
                sent += len(block)

        flooder = asyncio.create_task(flood())
        try:
            # While the flood runs: the other port serves a readout, and the polled meter is read.
            message = await _readout(tm2.bound_port or 0)
            assert parse_data_message(message).bcc_ok
            await wait_until(lambda: len(outbox.readings("m2")) >= 1, 40)
            session = h.bridge._active
            # Queued client bytes stay bounded: the high-water mark plus one socket read.
            assert session is not None and session._queued_bytes <= INBOUND_HIGH_BYTES + 256 * 1024
        finally:
            stop.set()
            await asyncio.wait_for(flooder, 30)
        writer.close()
        # What the kernel's socket buffers still hold is paced through the line before the end.
        (record,) = [r for r in await h.wait_audits(2, timeout_s=120) if r["port"] == "tm"]
        await wait_until(lambda: len(sink.received) == sent, 30)
        sink.stop()
        del reader
    assert record["bytes_to_meter"] == sent  # paced, never dropped


async def test_half_open_tls_handshakes_time_out_and_honest_clients_get_in(tmp_path: Path) -> None:
    tls = TlsSettings(enabled=True)
    async with _two_lines(
        tmp_path,
        tls=tls,
        state_dir=str(tmp_path / "state"),
        max_pending=4,
        max_pending_per_source=4,  # the global bound is what this test is about (one source here)
        handshake_timeout_s=1.0,
    ) as (h, _tm2, outbox):
        device = PtyDevice(h.pair.b)
        device.start()
        silent = [await connect(h.port) for _ in range(30)]  # TCP up, never a ClientHello
        await wait_until(lambda: h.bridge.counters["dropped_pending"] >= 26, 10)
        for reader, _writer in silent:  # every half-open connection is closed by the port
            assert await closed_by_peer(reader, 15)
        assert h.bridge.counters["tls_failures"] >= 4
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        assert await exchange(h.port, b"honest", ssl=ctx) == b"honest"
        await wait_until(lambda: len(outbox.readings("m2")) >= 1, 40)
        for _reader, writer in silent:
            writer.close()
        device.stop()


async def test_many_connection_attempts_while_a_session_runs(tmp_path: Path) -> None:
    async with bridge_harness(
        tmp_path, bridge={"second_client": "refuse"}, policy=policy(idle_timeout_s=120)
    ) as h:
        device = PtyDevice(h.pair.b)
        device.start()
        reader, writer = await connect(h.port)
        writer.write(b"first")
        assert await read_exactly(reader, 5) == b"first"
        gate = asyncio.Semaphore(50)
        answers: list[bytes] = []

        async def attempt(i: int) -> None:
            async with gate:
                try:
                    r, w = await connect(h.port)
                    w.write(b"intruder %d" % i)
                    answers.append(await asyncio.wait_for(r.read(), 15))
                    w.close()
                except (ConnectionError, OSError):
                    answers.append(b"")

        attempts = [asyncio.create_task(attempt(i)) for i in range(300)]
        for round_ in range(5):  # the first session keeps working during the storm
            writer.write(b"ping %d" % round_)
            assert await read_exactly(reader, 6) == b"ping %d" % round_
        await asyncio.wait_for(asyncio.gather(*attempts), 120)
        writer.write(b"after")
        assert await read_exactly(reader, 5) == b"after"
        writer.close()
        device.stop()
        counters = h.bridge.counters
        assert (
            counters["refused_busy"] + counters["dropped_pending"] + counters["dropped_pending_source"] == 300
        )
        assert set(answers) <= {b"BUSY transparent port in use\r\n", b""}
        assert b"intruder" not in bytes(device.received)
