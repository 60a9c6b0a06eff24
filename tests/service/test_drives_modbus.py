"""Modbus RTU drives: the codec (protocols.md vectors, split input, random input) and a drive sharing
an RS485 line with an IEC 62056-21 meter, both read through the line service's leases.

The far end of the line is the simulator (a socat pty pair): an IEC meter model and a Modbus drive
model (requests decoded and answers encoded with pymodbus) hear every byte, like devices on one RS485
pair; the drive model counts a request that arrives while the meter is mid-readout as an overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcud.codec import modbus_rtu as mb
from dcud.codec.actions import Action, Done, Drain, Failed, Flush, Send
from dcud.codec.cia402 import DriveState
from dcud.config.model import DriveConfig, LineConfig, MeterConfig, ModbusRegisters
from dcud.errors import DcudError, NegativeResponse, PeerTimeout, RemoteProtocolError
from dcud.runtime.bus import EventBus
from dcud.service.commands import CommandRouter
from dcud.service.drive_commands import register_drive_commands
from dcud.service.drive_modbus import ModbusDrivesConfig, ModbusDriveService, plan_blocks, register_fields
from dcud.service.line import LineRegistry, LineService, LineServiceConfig
from dcud.service.meter_read import read_meter
from dcud.sim.drive_modbus import MODBUS_REGISTERS, ModbusDriveModel, SharedLineModel
from dcud.sim.serial_sim import IecSimLine, SimLineRunner, SimLineSpec, SimMeterSpec

from helpers.meters import Events, FakeOutbox, SocatPair, supervised, wait_until

# -- codec ------------------------------------------------------------------------------------------


def test_protocols_md_vectors() -> None:
    assert mb.read_registers(1, 0, 1).encode() == bytes.fromhex("010300000001840A")
    assert mb.read_registers(0x11, 0x6B, 3).encode() == bytes.fromhex("1103006B00037687")
    assert mb.write_register(1, 0, 0x000F).encode() == bytes.fromhex("01060000000FC9CE")
    reply = bytes.fromhex("0103020237F8F2")
    assert mb.crc_ok(reply)
    assert mb.decode_response(mb.read_registers(1, 0, 1), reply) == (0x0237,)
    assert mb.write_registers(1, 0x10, [1, 2]).encode()[:7] == bytes.fromhex("01100010000204")


def test_exceptions_and_bad_answers() -> None:
    request = mb.read_registers(1, 0, 2)
    with pytest.raises(mb.ModbusException) as info:
        mb.decode_response(request, mb.with_crc(bytes.fromhex("018302")))
    assert isinstance(info.value, NegativeResponse)
    assert info.value.code == 2 and "illegal data address" in info.value.text
    bad = [
        mb.with_crc(bytes.fromhex("02030400010002")),  # other unit
        bytes.fromhex("0103040001000200FF"),  # bad CRC
        mb.with_crc(bytes.fromhex("010302FFFF")),  # 1 register, asked 2
        mb.with_crc(bytes.fromhex("01040400010002")),  # other function
    ]
    for frame in bad:
        with pytest.raises(RemoteProtocolError):
            mb.decode_response(request, frame)
    write = mb.write_register(1, 1, 7)
    with pytest.raises(RemoteProtocolError):
        mb.decode_response(write, mb.with_crc(bytes.fromhex("010600010008")))  # wrong echo
    for make in (
        lambda: mb.read_registers(1, 0, 0),
        lambda: mb.read_registers(1, 0, 126),
        lambda: mb.read_registers(0, 0, 1),
        lambda: mb.read_registers(248, 0, 1),
        lambda: mb.write_register(1, 0, 70000),
        lambda: mb.read_registers(1, 0xFFFF, 2),
    ):
        with pytest.raises(DcudError):
            make()


def run(transaction: mb.ModbusTransaction, chunks: list[bytes]) -> Action:
    actions = transaction.start(0.0)
    assert actions == [Flush(), Send(transaction.frame), Drain()]
    now = 0.001
    for chunk in chunks:
        out = transaction.receive_data(chunk, now)
        now += 0.001
        if out:
            assert len(out) == 1
            return out[0]
    deadline = transaction.next_deadline()
    assert deadline is not None
    (final,) = transaction.handle_timer(deadline)
    return final


def test_transaction_split_at_every_byte_boundary() -> None:
    answer = mb.with_crc(bytes.fromhex("010308023700000064FFFF"))
    request = mb.read_registers(1, 0, 4)
    for cut in range(len(answer) + 1):
        for second in range(cut, len(answer) + 1):
            chunks = [c for c in (answer[:cut], answer[cut:second], answer[second:]) if c]
            result = run(mb.ModbusTransaction(request, baud=9600), chunks)
            assert isinstance(result, Done), (cut, second, result)
            assert result.result == (0x0237, 0x0000, 0x0064, 0xFFFF)


def test_transaction_timeouts() -> None:
    request = mb.read_registers(1, 0, 1)
    silent = run(mb.ModbusTransaction(request, baud=9600, response_timeout_s=0.2), [])
    assert isinstance(silent, Failed) and isinstance(silent.error, PeerTimeout)
    partial = run(mb.ModbusTransaction(request, baud=9600), [b"\x01\x03\x02"])
    assert isinstance(partial, Failed) and isinstance(partial.error, RemoteProtocolError)
    longer = run(mb.ModbusTransaction(request, baud=9600), [bytes.fromhex("0103020237F8F2AA")])
    assert isinstance(longer, Failed) and isinstance(longer.error, RemoteProtocolError)
    exc = run(mb.ModbusTransaction(request, baud=9600), [mb.with_crc(b"\x01\x83\x04")])
    assert isinstance(exc, Failed) and isinstance(exc.error, mb.ModbusException)
    # A broadcast is done once sent.
    actions = mb.ModbusTransaction(mb.write_register(0, 1, 6), baud=9600).start(0.0)
    assert actions[-1] == Done((6,))


def test_transaction_keeps_the_silence_after_the_answer() -> None:
    """The session ends 4 character times after a good answer (the slave's 3.5), never before."""
    request = mb.read_registers(1, 0, 1)
    session = mb.ModbusTransaction(request, baud=9600)
    session.start(0.0)
    answer = bytes.fromhex("0103020237F8F2")
    assert session.receive_data(answer, 0.1) == []
    assert session.next_deadline() == pytest.approx(0.1 + 4 * 11 / 9600)
    assert session.receive_data(b"\x00", 0.101) == []  # noise after the answer: not part of it
    assert session.handle_timer(0.1 + 4 * 11 / 9600) == [Done((0x0237,))]
    assert session.next_deadline() is None
    # A failure ends it at once.
    failing = mb.ModbusTransaction(request, baud=9600)
    failing.start(0.0)
    (failed,) = failing.receive_data(mb.with_crc(b"\x01\x83\x02"), 0.1)
    assert isinstance(failed, Failed) and isinstance(failed.error, mb.ModbusException)


class _LookalikeSend:
    """Named like the shared action, but not it: the runner dispatches by type, not by class name."""

    def __init__(self, data: bytes) -> None:
        self.data = data


class _OneShot:
    def __init__(self, actions: list[object]) -> None:
        self.actions = actions

    def start(self, now: float) -> list[object]:
        return self.actions

    def receive_data(self, data: bytes, now: float) -> list[object]:
        return []

    def handle_timer(self, now: float) -> list[object]:
        return []

    def next_deadline(self) -> float | None:
        return None


class _RecordingPort:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.flushed = 0

    def write(self, data: bytes) -> None:
        self.written.append(data)

    async def drain(self) -> None:
        return None

    async def read(self, max_bytes: int = 4096, timeout_s: float = 0.0) -> bytes:
        return b""

    async def set_baud(self, baud: int) -> None:
        return None

    async def set_framing(self, framing: str) -> None:
        return None

    def flush_input(self) -> None:
        self.flushed += 1


async def test_session_runner_dispatches_by_type() -> None:
    from dcud.errors import LocalProtocolError
    from dcud.service.session_runner import run_session

    _LookalikeSend.__name__ = "Send"
    port = _RecordingPort()
    with pytest.raises(LocalProtocolError, match="unknown session action"):
        await run_session(_OneShot([_LookalikeSend(b"x")]), port)
    assert port.written == []
    result = await run_session(_OneShot([Flush(), Send(b"ab"), Drain(), Done((1, 2))]), port)
    assert result == (1, 2) and port.written == [b"ab"] and port.flushed == 1
    with pytest.raises(PeerTimeout):
        await run_session(_OneShot([Failed(PeerTimeout("silent"))]), port)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=12), max_size=6), st.sampled_from([0, 1, 2]))
def test_random_answers_give_typed_outcomes(chunks: list[bytes], which: int) -> None:
    request = [mb.read_registers(1, 0, 3), mb.write_register(1, 1, 15), mb.write_registers(1, 2, [1, 2])][
        which
    ]
    result = run(mb.ModbusTransaction(request, baud=19200), chunks)
    if isinstance(result, Failed):
        assert isinstance(result.error, DcudError)
    else:
        assert isinstance(result, Done)


def test_register_blocks() -> None:
    regs = ModbusRegisters(status=0, control=1, position=2, velocity=4, fault=6, io=7)
    blocks = plan_blocks(register_fields(regs))
    assert [(a, n) for a, n, _ in blocks] == [(0, 8)]
    far = ModbusRegisters(status=0, position=100, velocity_words=1, velocity=102, fault=2000)
    assert [(a, n) for a, n, _ in plan_blocks(register_fields(far))] == [(0, 1), (100, 3), (2000, 1)]


def test_simulator_answers_decode() -> None:
    sim = ModbusDriveModel(unit=3, baud=19200)
    request = mb.read_registers(3, 0, 8)
    (out,) = sim.receive(request.encode(), now=1.0)
    words = mb.decode_response(request, out.data)
    assert words[MODBUS_REGISTERS["status"]] == sim.model.statusword
    write = mb.write_register(3, MODBUS_REGISTERS["control"], 0x06)
    (out,) = sim.receive(write.encode(), now=2.0)
    assert mb.decode_response(write, out.data) == (6,)
    assert sim.model.state is DriveState.READY_TO_SWITCH_ON
    (out,) = sim.receive(mb.read_registers(3, 100, 1).encode(), now=3.0)
    with pytest.raises(mb.ModbusException):
        mb.decode_response(mb.read_registers(3, 100, 1), out.data)
    assert sim.receive(mb.read_registers(4, 0, 1).encode(), now=4.0) == []  # another unit
    assert sim.receive(b"/?12345678!\r\n", now=5.0) == []  # a meter's sign-on
    assert sim.stats.other_units == 1


# -- a drive and a meter on one line ------------------------------------------------------------------------

LINE = "rs485-1"
METER_ADDRESS = "12345678"


def modbus_drive(**extra: Any) -> DriveConfig:
    registers = ModbusRegisters(status=0, control=1, position=2, velocity=4, fault=6, io=7)
    defaults: dict[str, Any] = {
        "commands": True,
        "poll_interval_s": 0.2,
        "state_interval_s": 0.1,
        "baud": 9600,
        "framing": "8E1",
        "registers": registers,
        "writable": ["1"],  # listing the control register does not make it writable (checked below)
    }
    return DriveConfig(name="axis-m", bus=LINE, protocol="modbus-rtu", node_id=1, **{**defaults, **extra})


class Site:
    """The line service, the Modbus drive service, a meter poller, and the simulated far end."""

    def __init__(self, tmp_path: Path) -> None:
        self.pair = SocatPair(tmp_path / "dcu", tmp_path / "far")
        self.line_config = LineConfig(name=LINE, device=str(self.pair.a), kind="rs485")
        self.meter = MeterConfig(name="flat-1", line=LINE, protocol="iec62056-21", address=METER_ADDRESS)
        self.bus = EventBus()
        self.events = Events()
        self.outbox = FakeOutbox()
        self.router = CommandRouter()
        self.lines = LineRegistry()
        registry = register_drive_commands(self.router)
        self.line_service = LineService(
            LineServiceConfig(self.line_config), self.lines, self.bus, self.events
        )
        self.drive_service = ModbusDriveService(
            ModbusDrivesConfig(LINE, (modbus_drive(),)),
            self.lines,
            self.bus,
            self.events,
            self.outbox.put,
            registry,
        )
        self.drive_sim = ModbusDriveModel(unit=1, baud=9600)
        self.meters = IecSimLine([SimMeterSpec(address=METER_ADDRESS, fast_reaction=True)], line_baud=300)
        self.model = SharedLineModel(self.meters, [self.drive_sim])
        self.readings: list[dict[str, Any]] = []
        self.meter_errors: list[str] = []

    def state(self) -> dict[str, Any]:
        return dict(self.bus.states.get("drive/axis-m", {}))

    async def command(self, verb: str, **args: Any) -> dict[str, Any]:
        return await self.router.dispatch(f"drive/{verb}", json.dumps({"drive": "axis-m", **args}).encode())

    async def poll_meter(self, count: int) -> None:
        """What the polling service does: a readout of the meter inside a poll lease, ``count`` times."""
        line = self.lines[LINE]
        for _ in range(count):
            try:
                async with line.lease("poll:flat-1", "poll", timeout_s=20) as port:
                    reading = await read_meter(port, self.meter, self.line_config)
                self.readings.append({v["id"]: v["value"] for v in reading.values})
            except DcudError as exc:
                self.meter_errors.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    s = Site(tmp_path)
    s.pair.start()
    runner = SimLineRunner(
        SimLineSpec("far", "iec62056-21", [], device=str(s.pair.b), baud=300), model=s.model
    )  # type: ignore[arg-type]
    sim_task = asyncio.create_task(runner.run())
    try:
        await asyncio.wait_for(runner.ready.wait(), 10)
        async with supervised(s.line_service, s.drive_service):
            await wait_until(lambda: s.lines.get(LINE) is not None and s.lines[LINE].state == "open", 10)
            yield s
    finally:
        sim_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sim_task
        s.pair.kill()


async def test_drive_and_meter_share_the_line_never_interleaved(tmp_path: Path) -> None:
    async with site(tmp_path) as s:
        await wait_until(lambda: s.state().get("online") is True, 15)
        polls_before = s.drive_service.drives["axis-m"].counters.get("polls", 0)
        await asyncio.wait_for(s.poll_meter(3), 60)
        polls = s.drive_service.drives["axis-m"].counters.get("polls", 0) - polls_before
        # Both were read...
        assert len(s.readings) == 3, s.meter_errors
        assert "1.8.0" in s.readings[0] and "0.0.0" in s.readings[0]
        # The drive's lease kind goes before meter polls: it gets the line between every two readouts.
        assert polls >= 3
        # ...and never interleaved: no Modbus request while the meter talked, no garbled frame.
        assert s.drive_sim.stats.overlaps == 0
        assert s.drive_sim.stats.crc_errors == 0
        assert s.drive_sim.stats.requests == s.drive_sim.stats.answers
        counters = s.drive_service.drives["axis-m"].counters
        assert counters.get("poll_failures", 0) == 0, s.state()
        line_state = s.bus.states[f"line/{LINE}"]
        assert line_state["leases"] >= 3 + polls
        state = s.state()
        assert state["protocol"] == "modbus-rtu" and state["cia402"] == "switch_on_disabled"
        assert state["line"] == LINE and state["unit"] == 1


async def test_modbus_commands_and_fault(tmp_path: Path) -> None:
    async with site(tmp_path) as s:
        await wait_until(lambda: s.state().get("online") is True, 15)
        reply = await s.command("enable")
        assert reply["ok"], reply
        assert reply["result"]["state"]["cia402"] == "operation_enabled"
        assert s.drive_sim.model.state is DriveState.OPERATION_ENABLED
        start = s.state()["position"] or 0
        await wait_until(lambda: (s.state()["position"] or 0) > start, 10)
        reply = await s.command("read", address=0, count=2)
        assert reply["ok"] and len(reply["result"]["values"]) == 2
        reply = await s.command("read", address=500)
        assert (
            reply["error"]["type"] == "ModbusException"
            and "illegal data address" in reply["error"]["message"]
        )
        reply = await s.command("write", address=1, value=0)
        assert reply["error"]["type"] == "DriveStateError"
        reply = await s.command("write", address=8, values=[1, 2])
        assert (
            reply["error"]["type"] == "DriveWriteRefusedError"
            and "registers 8..9" in reply["error"]["message"]
        )
        reply = await s.command("write", address=0, values=[1, 2])  # 0 is not listed, 1 is
        assert reply["error"]["type"] == "DriveWriteRefusedError"
        s.drive_sim.model.inject_fault(0x2310, 0.0)
        await wait_until(lambda: s.state().get("cia402") == "fault", 10)
        await wait_until(lambda: any(e["type"] == "drive_fault" for e in s.events.items), 10)
        fault = next(e for e in s.events.items if e["type"] == "drive_fault")
        assert fault["code"] == 0x2310
        reply = await s.command("enable")
        assert reply["error"]["type"] == "DriveStateError" and "fault_reset" in reply["error"]["message"]
        reply = await s.command("fault_reset")
        assert reply["ok"] and reply["result"]["state"]["cia402"] == "switch_on_disabled", reply


async def test_modbus_drive_silent_goes_offline_and_back(tmp_path: Path) -> None:
    async with site(tmp_path) as s:
        await wait_until(lambda: s.state().get("online") is True, 15)
        s.drive_sim.silent = True
        await wait_until(lambda: any(e["type"] == "drive_offline" for e in s.events.items), 15)
        assert s.state()["online"] is False
        assert "no answer" in s.state()["last_error"]
        s.drive_sim.silent = False
        await wait_until(lambda: any(e["type"] == "drive_online" for e in s.events.items), 15)
        assert s.state()["online"] is True
