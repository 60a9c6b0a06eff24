"""The CiA 402 / CANopen codecs: state machine, controlword plans, EMCY, SDO client, PDO decoding.

Vectors are those of protocols.md section 5; the SDO client is also run against the canopen library's
SDO server (an independent implementation) over python-can's in-process ``virtual`` bus, and fed
random bytes by hypothesis (only the typed errors may come out).
"""

from __future__ import annotations

import struct
import threading
import time
from typing import Any

import can
import canopen
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcud.codec import canopen as co
from dcud.codec.cia402 import (
    ENERGISED,
    SDO_ABORT_TEXTS,
    Controlword,
    DriveState,
    Goal,
    TransitionError,
    apply_controlword,
    decode_emcy,
    decode_statusword,
    drive_state,
    emcy_text,
    encode_emcy,
    encode_statusword,
    error_register_flags,
    plan,
    sdo_abort_text,
)
from dcud.errors import LocalProtocolError, NegativeResponse, ProtocolError, RemoteProtocolError
from dcud.sim.drive_can import build_object_dictionary

# -- statusword -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statusword", "state"),
    [
        (0x0000, DriveState.NOT_READY_TO_SWITCH_ON),
        (0x0040, DriveState.SWITCH_ON_DISABLED),
        (0x0250, DriveState.SWITCH_ON_DISABLED),  # voltage, remote: flags outside the mask
        (0x0021, DriveState.READY_TO_SWITCH_ON),
        (0x0031, DriveState.READY_TO_SWITCH_ON),
        (0x0023, DriveState.SWITCHED_ON),
        (0x0027, DriveState.OPERATION_ENABLED),
        (0x0237, DriveState.OPERATION_ENABLED),  # protocols.md: 0x0237 = operation enabled
        (0x0007, DriveState.QUICK_STOP_ACTIVE),
        (0x000F, DriveState.FAULT_REACTION_ACTIVE),
        (0x0008, DriveState.FAULT),
        (0x0218, DriveState.FAULT),
    ],
)
def test_statusword_states(statusword: int, state: DriveState) -> None:
    assert drive_state(statusword) is state


def test_statusword_flags_and_garbage() -> None:
    decoded = decode_statusword(0x0EB7)  # op enabled + warning + remote + target reached + limit
    assert decoded.state is DriveState.OPERATION_ENABLED
    assert decoded.warning and decoded.remote and decoded.target_reached and decoded.internal_limit
    assert decoded.voltage_enabled
    with pytest.raises(RemoteProtocolError):
        drive_state(0x0001)  # ready bit alone matches no state
    with pytest.raises(RemoteProtocolError):
        drive_state(0x10000)


@pytest.mark.parametrize("state", list(DriveState))
def test_encode_statusword_round_trips(state: DriveState) -> None:
    assert drive_state(encode_statusword(state)) is state
    assert drive_state(encode_statusword(state, flags=0x0680)) is state
    with pytest.raises(LocalProtocolError):
        encode_statusword(state, flags=0x0001)


@given(st.integers(min_value=0, max_value=0xFFFF))
def test_any_statusword_decodes_or_raises_typed(value: int) -> None:
    try:
        decoded = decode_statusword(value)
    except RemoteProtocolError:
        return
    assert decoded.raw == value


# -- controlword plans against the device-side state machine -------------------------------------------


def run_plan(goal: Goal, start: DriveState) -> DriveState:
    """Apply a plan's controlwords to the device model, checking every expected state on the way."""
    state, previous_cw = start, 0
    for step in plan(goal, start):
        edge = bool(step.controlword & 0x80) and not previous_cw & 0x80
        state = apply_controlword(state, step.controlword, fault_reset_edge=edge)
        previous_cw = step.controlword
        if step.expect:
            assert state in step.expect, (goal, start, step, state)
    return state


@pytest.mark.parametrize(
    ("goal", "start", "end"),
    [
        (Goal.ENABLE, DriveState.SWITCH_ON_DISABLED, DriveState.OPERATION_ENABLED),
        (Goal.ENABLE, DriveState.READY_TO_SWITCH_ON, DriveState.OPERATION_ENABLED),
        (Goal.ENABLE, DriveState.SWITCHED_ON, DriveState.OPERATION_ENABLED),
        (Goal.ENABLE, DriveState.OPERATION_ENABLED, DriveState.OPERATION_ENABLED),
        (Goal.ENABLE, DriveState.QUICK_STOP_ACTIVE, DriveState.OPERATION_ENABLED),
        (Goal.DISABLE, DriveState.OPERATION_ENABLED, DriveState.SWITCH_ON_DISABLED),
        (Goal.DISABLE, DriveState.QUICK_STOP_ACTIVE, DriveState.SWITCH_ON_DISABLED),
        (Goal.DISABLE, DriveState.SWITCH_ON_DISABLED, DriveState.SWITCH_ON_DISABLED),
        (Goal.QUICK_STOP, DriveState.OPERATION_ENABLED, DriveState.QUICK_STOP_ACTIVE),
        (Goal.QUICK_STOP, DriveState.SWITCHED_ON, DriveState.SWITCH_ON_DISABLED),
        (Goal.FAULT_RESET, DriveState.FAULT, DriveState.SWITCH_ON_DISABLED),
    ],
)
def test_plans_reach_their_goal(goal: Goal, start: DriveState, end: DriveState) -> None:
    assert run_plan(goal, start) is end


@pytest.mark.parametrize(
    ("goal", "start", "reason"),
    [
        (Goal.ENABLE, DriveState.FAULT, "send fault_reset first"),
        (Goal.DISABLE, DriveState.FAULT, "send fault_reset first"),
        (Goal.QUICK_STOP, DriveState.SWITCH_ON_DISABLED, "energised"),
        (Goal.FAULT_RESET, DriveState.OPERATION_ENABLED, "not in fault"),
        (Goal.ENABLE, DriveState.NOT_READY_TO_SWITCH_ON, "initialising"),
        (Goal.FAULT_RESET, DriveState.FAULT_REACTION_ACTIVE, "fault reaction"),
    ],
)
def test_plans_refuse_with_a_reason(goal: Goal, start: DriveState, reason: str) -> None:
    with pytest.raises(TransitionError) as info:
        plan(goal, start)
    assert reason in info.value.reason
    assert info.value.state is start


def test_controlword_values_match_cia402() -> None:
    assert Controlword.SHUTDOWN == 0x0006
    assert Controlword.SWITCH_ON == 0x0007
    assert Controlword.ENABLE_OPERATION == 0x000F
    assert Controlword.DISABLE_VOLTAGE == 0x0000
    assert Controlword.QUICK_STOP == 0x0002
    assert Controlword.FAULT_RESET == 0x0080
    assert [s.controlword for s in plan(Goal.ENABLE, DriveState.SWITCH_ON_DISABLED)] == [0x06, 0x07, 0x0F]
    assert [s.controlword for s in plan(Goal.FAULT_RESET, DriveState.FAULT)] == [0x00, 0x80]
    assert {
        DriveState.READY_TO_SWITCH_ON,
        DriveState.SWITCHED_ON,
        DriveState.OPERATION_ENABLED,
        DriveState.QUICK_STOP_ACTIVE,
    } == ENERGISED


def test_fault_reset_needs_a_rising_edge() -> None:
    assert apply_controlword(DriveState.FAULT, 0x80, fault_reset_edge=False) is DriveState.FAULT
    assert apply_controlword(DriveState.FAULT, 0x80, fault_reset_edge=True) is DriveState.SWITCH_ON_DISABLED


# -- EMCY and abort texts -----------------------------------------------------------------------------


def test_emcy_decode() -> None:
    emcy = decode_emcy(bytes.fromhex("1032050102030405"))
    assert (emcy.code, emcy.register, emcy.vendor) == (0x3210, 0x05, bytes.fromhex("0102030405"))
    assert emcy.text == "DC-link over-voltage"
    assert error_register_flags(emcy.register) == ["generic", "voltage"]
    assert decode_emcy(encode_emcy(0, 0)).is_reset
    # Code 0 is no error (issue 16: a drive showed "error reset or no error"); an EMCY with 0 is a reset.
    assert emcy_text(0) == "no error"
    assert decode_emcy(encode_emcy(0, 0)).text == "error reset"
    assert "reset" not in emcy_text(0x0042)
    assert emcy_text(0x8130) == "life guard error or heartbeat error"
    assert emcy_text(0x8611) == "following error"
    assert emcy_text(0x2314) == "continuous over-current (0x2314)" or "current" in emcy_text(0x2314)
    assert emcy_text(0xFF42) == "device specific (0xFF42)"
    assert emcy_text(0xA123).startswith("unknown class")
    for bad in (b"", b"\x10\x32", bytes(9)):
        with pytest.raises(RemoteProtocolError):
            decode_emcy(bad)


def test_sdo_abort_texts() -> None:
    assert sdo_abort_text(0x05040000) == "SDO protocol timed out"
    assert sdo_abort_text(0x06020000) == "object does not exist in the object dictionary"
    assert sdo_abort_text(0x06090011) == "sub-index does not exist"
    assert sdo_abort_text(0x06090030) == "invalid value for parameter (download only)"
    assert sdo_abort_text(0x06070010).startswith("data type does not match")
    assert "present device state" in sdo_abort_text(0x08000022)
    assert sdo_abort_text(0x12345678) == "unknown abort code 0x12345678"
    # Every code the canopen library (an independent source) knows has a text here too.
    from canopen.sdo.exceptions import SdoAbortedError

    missing = {hex(code) for code in SdoAbortedError.CODES if code not in SDO_ABORT_TEXTS}
    assert not missing


# -- NMT, heartbeat, frame classification ------------------------------------------------------------------


def test_nmt_and_heartbeat() -> None:
    assert co.nmt_command(co.NmtCommand.START, 0) == co.CanFrame(0x000, b"\x01\x00")  # start all nodes
    assert co.nmt_command(co.NmtCommand.RESET_COMMUNICATION, 5).data == b"\x82\x05"
    assert co.decode_heartbeat(b"\x00") is co.NmtState.BOOT_UP
    assert co.decode_heartbeat(b"\x05") is co.NmtState.OPERATIONAL
    assert co.decode_heartbeat(b"\x85") is co.NmtState.OPERATIONAL  # node-guarding toggle bit
    assert co.decode_heartbeat(b"\x7f") is co.NmtState.PRE_OPERATIONAL
    assert co.decode_heartbeat(b"\x04") is co.NmtState.STOPPED
    for bad in (b"", b"\x05\x05", b"\x42"):
        with pytest.raises(RemoteProtocolError):
            co.decode_heartbeat(bad)
    with pytest.raises(LocalProtocolError):
        co.nmt_command(co.NmtCommand.START, 128)
    assert co.classify(0x701) == (co.FrameKind.HEARTBEAT, 1)
    assert co.classify(0x2FF) == (co.FrameKind.TPDO, 0x7F)
    assert co.classify(0x581) == (co.FrameKind.SDO_RESPONSE, 1)
    assert co.classify(0x081) == (co.FrameKind.EMCY, 1)
    assert co.classify(0x080) == (co.FrameKind.SYNC, 0)


# -- SDO client: protocols.md vectors, segmented transfers, errors --------------------------------------


def test_sdo_expedited_vectors() -> None:
    client = co.SdoClient(1, timeout_s=0.5)
    request = client.upload(0x6041, 0, now=10.0)
    assert request == co.CanFrame(0x601, bytes.fromhex("4041600000000000"))
    assert client.deadline_s == pytest.approx(10.5)
    done = client.receive(bytes.fromhex("4B41600037020000"), now=10.1)
    assert done == co.SdoDone(0x6041, 0, b"\x37\x02")
    assert not client.busy
    request = client.download(0x6040, 0, b"\x0f\x00", now=11.0)
    assert request.data == bytes.fromhex("2B4060000F000000")
    assert client.receive(bytes.fromhex("6040600000000000"), now=11.1) == co.SdoDone(0x6040, 0, b"")
    assert client.receive(bytes.fromhex("6040600000000000"), now=11.2) is None  # stray: idle


def test_sdo_abort_and_protocol_errors() -> None:
    client = co.SdoClient(3)
    client.upload(0x2000, 0, now=0.0)
    with pytest.raises(co.SdoAbort) as info:
        client.receive(bytes.fromhex("8000200000000206"), now=0.1)
    assert isinstance(info.value, NegativeResponse)
    assert info.value.code == 0x06020000
    assert "object does not exist" in info.value.text
    client.upload(0x6041, 0, now=1.0)
    with pytest.raises(co.SdoRemoteError) as remote:
        client.receive(bytes.fromhex("4B64600000000000"), now=1.1)  # answer for another object
    assert remote.value.abort.data[0] == 0x80
    assert struct.unpack_from("<I", remote.value.abort.data, 4)[0] == co.ABORT_COMMAND
    client.upload(0x6041, 0, now=2.0)
    abort = client.expire(now=3.1)
    assert abort.data == bytes.fromhex("8041600000000405")  # 05040000 timeout
    with pytest.raises(LocalProtocolError):
        client.expire(now=4.0)
    client.upload(0x6041, 0, now=5.0)
    with pytest.raises(LocalProtocolError):
        client.upload(0x6064, 0, now=5.0)  # one transfer at a time


def test_sdo_segmented_upload_and_download() -> None:
    client = co.SdoClient(1)
    client.upload(0x1008, 0, now=0.0)
    step = client.receive(bytes.fromhex("4108100010000000"), now=0.01)  # 16 bytes follow
    assert isinstance(step, co.SdoSend) and step.frame.data[0] == 0x60
    step = client.receive(b"\x00" + b"dcud Ci", now=0.02)
    assert isinstance(step, co.SdoSend) and step.frame.data[0] == 0x70
    step = client.receive(b"\x10" + b"A 402 s", now=0.03)
    assert isinstance(step, co.SdoSend) and step.frame.data[0] == 0x60
    with pytest.raises(co.SdoRemoteError):
        client.receive(b"\x1b" + b"im\x00\x00\x00\x00\x00", now=0.04)  # toggle not alternated
    data = b"0123456789ABCDEF"
    first = client.download(0x2000, 1, data, now=1.0)
    assert first.data[0] == 0x21 and struct.unpack_from("<I", first.data, 4)[0] == 16
    step = client.receive(bytes.fromhex("6000200100000000"), now=1.1)
    assert isinstance(step, co.SdoSend) and step.frame.data == b"\x00" + data[:7]
    step = client.receive(bytes.fromhex("2000000000000000"), now=1.2)
    assert isinstance(step, co.SdoSend) and step.frame.data == b"\x10" + data[7:14]
    step = client.receive(bytes.fromhex("3000000000000000"), now=1.3)
    assert isinstance(step, co.SdoSend)
    assert step.frame.data[0] == 0x0B and step.frame.data[1:3] == data[14:]  # n = 5 unused, last
    assert client.receive(bytes.fromhex("2000000000000000"), now=1.4) == co.SdoDone(0x2000, 1, b"")


class CanopenServer:
    """canopen's LocalNode (the simulator's object dictionary) answering on a virtual bus."""

    def __init__(self, channel: str) -> None:
        self.network: Any = canopen.Network()
        self.network.connect(interface="virtual", channel=channel)
        self.node: Any = canopen.LocalNode(7, build_object_dictionary(7))
        self.network.add_node(self.node)

    def close(self) -> None:
        self.network.disconnect()


def transfer(bus: can.BusABC, client: co.SdoClient, first: co.CanFrame) -> bytes:
    """Drive the sans-I/O client over a real python-can bus (bounded)."""
    frame = first
    for _ in range(100):
        bus.send(can.Message(arbitration_id=frame.cob_id, data=frame.data, is_extended_id=False))
        for _ in range(100):
            msg = bus.recv(1.0)
            assert msg is not None, "no SDO answer"
            if msg.arbitration_id == client.response_cob_id:
                break
        result = client.receive(bytes(msg.data), time.monotonic())
        if isinstance(result, co.SdoDone):
            return result.data
        assert isinstance(result, co.SdoSend)
        frame = result.frame
    raise AssertionError("transfer did not end")


def test_sdo_client_against_canopen_server() -> None:
    channel = f"sdo-{threading.get_ident()}"
    server = CanopenServer(channel)
    bus = can.Bus(interface="virtual", channel=channel)
    try:
        client = co.SdoClient(7, timeout_s=1.0)
        now = time.monotonic()
        assert transfer(bus, client, client.upload(0x1008, 0, now)) == b"dcud CiA 402 sim"
        assert (
            co.decode_value(transfer(bus, client, client.upload(0x1000, 0, now)), co.DataType.U32) == 0x20192
        )
        long_value = b"x" * 40
        server.node.object_dictionary[0x1008].access_type = "rw"
        transfer(bus, client, client.download(0x1008, 0, long_value, now))
        assert transfer(bus, client, client.upload(0x1008, 0, now)) == long_value
        transfer(bus, client, client.download(0x60FF, 0, co.encode_value(-5, co.DataType.I32), now))
        assert co.decode_value(transfer(bus, client, client.upload(0x60FF, 0, now)), co.DataType.I32) == -5
        with pytest.raises(co.SdoAbort) as info:
            transfer(bus, client, client.upload(0x1018, 9, now))
        assert info.value.code == 0x06090011
        with pytest.raises(co.SdoAbort) as info:
            transfer(bus, client, client.download(0x6041, 0, b"\x01\x00", now))
        assert info.value.text.endswith("attempt to write a read only object")
    finally:
        bus.shutdown()
        server.close()


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=12), st.sampled_from(["upload", "download", "long"]))
def test_sdo_client_random_answers_raise_only_typed_errors(data: bytes, kind: str) -> None:
    client = co.SdoClient(1)
    if kind == "upload":
        client.upload(0x1008, 0, now=0.0)
    elif kind == "download":
        client.download(0x6040, 0, b"\x06\x00", now=0.0)
    else:
        client.download(0x2000, 0, bytes(20), now=0.0)
    try:
        result = client.receive(data, now=0.1)
    except ProtocolError:
        return
    except NegativeResponse:
        return
    assert result is None or isinstance(result, co.SdoDone | co.SdoSend)


# -- PDO mapping and values ------------------------------------------------------------------------------


def test_pdo_layouts() -> None:
    layout = co.PdoLayout([co.MappedObject.from_entry(0x60410010), co.MappedObject.from_entry(0x60640020)])
    assert layout.size_bytes == 6
    assert layout.decode(bytes.fromhex("3702FEFFFFFF")) == (0x0237, -2)
    assert layout.decode(bytes.fromhex("3702FEFFFFFF0000")) == (0x0237, -2)  # longer frame: extra ignored
    with pytest.raises(RemoteProtocolError):
        layout.decode(b"\x37\x02")
    odd = co.PdoLayout(
        [co.MappedObject(0x2000, 1, 4), co.MappedObject(0x6061, 0, 8), co.MappedObject(0x2001, 0, 4)]
    )
    assert odd.decode(odd.encode([0xA, -3, 0x5])) == (0xA, -3, 0x5)
    assert co.parse_object_ref("6064") == co.MappedObject(0x6064, 0, 32)
    assert co.parse_object_ref("0x2000:01/16") == co.MappedObject(0x2000, 1, 16)
    assert co.MappedObject(0x6041, 0, 16).entry() == 0x60410010
    for bad in ("2000", "zz", "6041/99", "12345"):
        with pytest.raises(LocalProtocolError):
            co.parse_object_ref(bad)
    with pytest.raises(RemoteProtocolError):
        co.PdoLayout([co.MappedObject(0x6064, 0, 32)] * 3)  # 96 bits


@given(st.binary(max_size=10))
def test_pdo_decode_random_bytes(data: bytes) -> None:
    layout = co.PdoLayout([co.MappedObject(0x6041, 0, 16), co.MappedObject(0x6064, 0, 32)])
    try:
        statusword, position = layout.decode(data)
    except RemoteProtocolError:
        assert len(data) < 6
        return
    assert 0 <= statusword <= 0xFFFF and -(2**31) <= position < 2**31


def test_values() -> None:
    assert co.encode_value(0x0F, co.DataType.U16) == b"\x0f\x00"
    assert co.decode_value(b"\xff\xff\xff\xff", co.DataType.I32) == -1
    assert co.decode_value(b"abc\x00", co.DataType.STR) == "abc"
    assert co.encode_value("0a0b", co.DataType.BYTES) == b"\x0a\x0b"
    for value, data_type in (
        (70000, co.DataType.U16),
        ("x", co.DataType.U8),
        (1.5, co.DataType.I32),
        ("zz", co.DataType.BYTES),
    ):
        with pytest.raises(LocalProtocolError):
            co.encode_value(value, data_type)
    with pytest.raises(RemoteProtocolError):
        co.decode_value(b"\x01", co.DataType.U16)
