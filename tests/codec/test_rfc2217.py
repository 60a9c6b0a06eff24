"""RFC 2217 access-server codec: negotiation, escaping, COM-PORT-OPTION commands, any chunking."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dcud.codec.rfc2217 import (
    COM_PORT_OPTION,
    DO,
    DONT,
    IAC,
    SB,
    SE,
    SET_BAUDRATE,
    WILL,
    WONT,
    ClientData,
    PortRequest,
    Reply,
    Rfc2217Event,
    Rfc2217Server,
    escape,
    framing_from_settings,
)

ECHO = 1
LINEMODE = 34


def feed(server: Rfc2217Server, stream: bytes, split: int = 0) -> list[Rfc2217Event]:
    if 0 < split < len(stream):
        return server.receive(stream[:split]) + server.receive(stream[split:])
    return server.receive(stream)


def data_of(events: list[Rfc2217Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, ClientData))


def test_greeting_and_negotiation_answers_only_state_changes() -> None:
    server = Rfc2217Server()
    greeting = server.greeting()
    assert bytes([IAC, DO, COM_PORT_OPTION]) in greeting and bytes([IAC, WILL, 0]) in greeting
    # pyserial's opening: DO ECHO, WILL SGA, DO SGA, DO COM-PORT, WILL COM-PORT
    opening = bytes(
        [IAC, DO, ECHO, IAC, WILL, 3, IAC, DO, 3, IAC, DO, COM_PORT_OPTION, IAC, WILL, COM_PORT_OPTION]
    )
    replies = b"".join(e.data for e in server.receive(opening) if isinstance(e, Reply))
    assert bytes([IAC, WONT, ECHO]) in replies  # refused once
    assert bytes([IAC, DO, 3]) in replies  # their SGA accepted
    assert bytes([IAC, WILL, COM_PORT_OPTION]) in replies  # we will, as asked
    assert bytes([IAC, DO, COM_PORT_OPTION]) not in replies  # already asked for in the greeting
    assert server.com_port_active
    # The same requests again change nothing and are not answered (no negotiation loops).
    assert [e for e in server.receive(opening) if isinstance(e, Reply)] == []
    assert [
        e for e in server.receive(bytes([IAC, DO, LINEMODE, IAC, DO, LINEMODE])) if isinstance(e, Reply)
    ] == [Reply(bytes([IAC, WONT, LINEMODE]))]
    assert server.receive(bytes([IAC, DONT, 3])) == [Reply(bytes([IAC, WONT, 3]))]


def test_data_with_iac_split_at_every_boundary() -> None:
    payload = bytes(range(256)) * 2
    stream = escape(payload)
    assert stream.count(b"\xff\xff") == 2
    for split in range(len(stream) + 1):
        assert data_of(feed(Rfc2217Server(), stream, split)) == payload


def test_set_baudrate_split_at_every_boundary_and_reply() -> None:
    command = bytes([IAC, SB, COM_PORT_OPTION, SET_BAUDRATE]) + (9600).to_bytes(4, "big") + bytes([IAC, SE])
    stream = b"ab" + command + b"cd"
    for split in range(len(stream) + 1):
        events = feed(Rfc2217Server(), stream, split)
        requests = [e for e in events if isinstance(e, PortRequest)]
        assert requests == [PortRequest(SET_BAUDRATE, (9600).to_bytes(4, "big"))], split
        assert data_of(events) == b"abcd"
        assert requests[0].number == 9600
    reply = Rfc2217Server().baud_reply(9600)
    assert reply == bytes([IAC, SB, COM_PORT_OPTION, 101, 0, 0, 0x25, 0x80, IAC, SE])


def test_iac_inside_a_subnegotiation_value_is_undoubled_and_escaped_in_replies() -> None:
    server = Rfc2217Server()
    value = bytes([0, 0, 0xFF, 0xFF])
    stream = bytes([IAC, SB, COM_PORT_OPTION, SET_BAUDRATE]) + escape(value) + bytes([IAC, SE])
    assert server.receive(stream) == [PortRequest(SET_BAUDRATE, value)]
    assert server.reply(SET_BAUDRATE, value) == bytes(
        [IAC, SB, COM_PORT_OPTION, 101, 0, 0, 255, 255, 255, 255, IAC, SE]
    )


def test_framing_from_rfc2217_settings() -> None:
    assert framing_from_settings("8N1", data_bits=7) == "7N1"
    assert framing_from_settings("7E1", parity=1) == "7N1"
    assert framing_from_settings("8N1", parity=3, stop_bits=2) == "8E2"
    assert framing_from_settings("8E1", stop_bits=3) == "8E1"  # 1.5 stop bits: kept as it is


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=300))
def test_random_streams_never_raise_and_plain_data_round_trips(noise: bytes, split: int) -> None:
    server = Rfc2217Server()
    feed(server, noise, split)  # anything at all: no exception
    fresh = Rfc2217Server()
    assert data_of(feed(fresh, escape(noise), split)) == noise
