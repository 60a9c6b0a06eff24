"""IEC 62056-47 wrapper: header codec, stream reassembly, bounds, WrapperTransport."""

from __future__ import annotations

import pytest

from dcud.codec.actions import Send
from dcud.codec.dlms.transport import ApduIn, ApduTransport, LinkDown, LinkUp
from dcud.codec.dlms.wrapper import (
    DEFAULT_PORT,
    WrapperFrame,
    WrapperReader,
    WrapperTransport,
    decode_wrapper,
    encode_wrapper,
)
from dcud.errors import LocalProtocolError, PeerTimeout, RemoteProtocolError

# The AARQ of the DLMS UA examples (tests/vectors/dlms/hdlc/dlms_ua_examples.json) behind a wrapper
# header from the public client (16) to the management logical device (1); the header bytes were
# written by hand from IEC 62056-47 (version 0001, wPorts 0010 / 0001, length 001F).
AARQ = bytes.fromhex("601DA109060760857405080101BE10040E01000000065F1F040000301DFFFF")
WRAPPED_AARQ = bytes.fromhex("0001 0010 0001 001F") + AARQ


def test_encode_decode_computed_vector() -> None:
    assert DEFAULT_PORT == 4059
    frame = WrapperFrame(16, 1, AARQ)
    assert encode_wrapper(frame) == WRAPPED_AARQ
    assert decode_wrapper(WRAPPED_AARQ) == frame


def test_reader_split_at_every_boundary() -> None:
    reply = encode_wrapper(WrapperFrame(1, 16, b"\x61\x29" + bytes(41)))
    stream = WRAPPED_AARQ + reply + encode_wrapper(WrapperFrame(1, 16, b""))
    expected = [decode_wrapper(WRAPPED_AARQ), decode_wrapper(reply), WrapperFrame(1, 16, b"")]
    for cut in range(len(stream) + 1):
        for second in (cut, min(len(stream), cut + 9)):
            reader = WrapperReader()
            got = []
            for chunk in (stream[:cut], stream[cut:second], stream[second:]):
                reader.receive_data(chunk)
                while (frame := reader.next_frame()) is not None:
                    got.append(frame)
            assert got == expected, (cut, second)
            assert not reader.in_frame


def test_bounds_and_bad_headers() -> None:
    reader = WrapperReader(max_apdu_bytes=1000)
    reader.receive_data(bytes.fromhex("0001 0001 0010 FFFF") + b"x" * 10)
    with pytest.raises(RemoteProtocolError, match="65535 bytes"):
        reader.next_frame()
    # The stream is unusable afterwards: the reader keeps refusing and holds nothing.
    reader.receive_data(WRAPPED_AARQ)
    with pytest.raises(RemoteProtocolError):
        reader.next_frame()
    assert not reader.in_frame
    reader = WrapperReader()
    reader.receive_data(bytes.fromhex("0002 0001 0010 0001 00"))
    with pytest.raises(RemoteProtocolError, match="version"):
        reader.next_frame()
    for bad in (b"\x00\x01", WRAPPED_AARQ[:-1], WRAPPED_AARQ + b"\x00"):
        with pytest.raises(RemoteProtocolError):
            decode_wrapper(bad)
    with pytest.raises(LocalProtocolError):
        encode_wrapper(WrapperFrame(70000, 1, b""))
    with pytest.raises(LocalProtocolError):
        encode_wrapper(WrapperFrame(16, 1, bytes(70000)))
    with pytest.raises(LocalProtocolError):
        WrapperReader(max_apdu_bytes=1 << 20)


def test_transport_exchange() -> None:
    transport: ApduTransport = WrapperTransport(response_timeout_s=2.0)
    assert transport.open(0.0) == [LinkUp()]
    assert transport.next_deadline() is None
    assert transport.send_apdu(AARQ, 1.0) == [Send(WRAPPED_AARQ)]
    assert transport.next_deadline() == pytest.approx(3.0)
    reply = encode_wrapper(WrapperFrame(1, 16, b"\x61\x03abc"))
    assert transport.receive_data(reply[:5], 2.5) == []
    assert transport.next_deadline() == pytest.approx(4.5)  # a reply in progress
    assert transport.receive_data(reply[5:], 2.6) == [ApduIn(b"\x61\x03abc")]
    assert transport.next_deadline() is None
    assert transport.close(3.0) == [LinkDown(None)]
    assert transport.close(3.1) == []
    assert transport.receive_data(reply, 3.2) == []


def test_transport_timeout_and_errors() -> None:
    transport = WrapperTransport(response_timeout_s=2.0)
    transport.open(0.0)
    transport.send_apdu(b"\xc0\x01", 1.0)
    assert transport.handle_timer(2.9) == []
    (down,) = transport.handle_timer(3.0)
    assert isinstance(down, LinkDown) and isinstance(down.error, PeerTimeout)
    assert not transport.is_up
    with pytest.raises(LocalProtocolError):
        transport.send_apdu(b"x", 4.0)

    transport = WrapperTransport(client_sap=16, logical_device=1)
    transport.open(0.0)
    transport.send_apdu(b"\xc0", 0.0)
    (down,) = transport.receive_data(encode_wrapper(WrapperFrame(2, 16, b"x")), 0.1)
    assert isinstance(down, LinkDown) and "from wPort 2 to 16" in str(down.error)

    transport = WrapperTransport(max_apdu_bytes=100)
    transport.open(0.0)
    (down,) = transport.receive_data(bytes.fromhex("0001 0001 0010 0400"), 0.1)
    assert isinstance(down, LinkDown) and isinstance(down.error, RemoteProtocolError)

    with pytest.raises(LocalProtocolError):
        transport.open(1.0)
    with pytest.raises(LocalProtocolError):
        WrapperTransport(response_timeout_s=0)
