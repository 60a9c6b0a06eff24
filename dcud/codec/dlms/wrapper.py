"""The DLMS/COSEM wrapper of IEC 62056-47 (TCP/UDP transport), sans-I/O.

Every APDU travels behind an 8-byte header::

    version (2) = 0x0001 | source wPort (2) | destination wPort (2) | length (2) | APDU

From the client, the source wPort is the client SAP (16: public client) and the destination wPort
the server's logical device (1: management); replies swap them. The length counts the APDU only.
The default TCP port is 4059. There is no link layer under the wrapper: TCP already orders,
acknowledges and retransmits.

:class:`WrapperReader` cuts wrapper frames out of a TCP stream split anywhere and refuses, with
:class:`~dcud.errors.RemoteProtocolError`, a version other than 1 or a length beyond
``max_apdu_bytes`` (a stream cannot be resynchronised after either). :class:`WrapperTransport` is the
:class:`~dcud.codec.dlms.transport.ApduTransport` over it.
"""

from __future__ import annotations

from dataclasses import dataclass

from dcud.codec.actions import Send
from dcud.codec.dlms.transport import ApduIn, LinkDown, LinkUp
from dcud.errors import DcudError, LocalProtocolError, PeerTimeout, RemoteProtocolError

WRAPPER_VERSION = 0x0001
HEADER_BYTES = 8
DEFAULT_PORT = 4059
DEFAULT_MAX_APDU_BYTES = 65535
"""The largest APDU the 16-bit length can carry; a smaller bound refuses big announcements early."""
DEFAULT_RESPONSE_TIMEOUT_S = 30.0
"""TCP over cellular networks: seconds of latency are normal, and a meter may compute a profile."""


@dataclass(frozen=True, slots=True)
class WrapperFrame:
    """One wrapper frame: source and destination wPort and the APDU."""

    source: int
    destination: int
    apdu: bytes


def _check_wport(value: int, name: str) -> None:
    if not 0 <= value <= 0xFFFF:
        raise LocalProtocolError(f"wrapper {name} wPort must be 0..65535, got {value}")


def encode_wrapper(frame: WrapperFrame) -> bytes:
    """Header and APDU."""
    _check_wport(frame.source, "source")
    _check_wport(frame.destination, "destination")
    if len(frame.apdu) > 0xFFFF:
        raise LocalProtocolError(f"APDU of {len(frame.apdu)} bytes does not fit the wrapper's 16-bit length")
    return (
        WRAPPER_VERSION.to_bytes(2, "big")
        + frame.source.to_bytes(2, "big")
        + frame.destination.to_bytes(2, "big")
        + len(frame.apdu).to_bytes(2, "big")
        + frame.apdu
    )


def _header(data: bytes | bytearray, max_apdu_bytes: int) -> tuple[int, int, int]:
    """Source, destination and length from a header; raises on a bad version or length."""
    version = (data[0] << 8) | data[1]
    if version != WRAPPER_VERSION:
        raise RemoteProtocolError(
            f"wrapper version 0x{version:04X} (0x0001 expected)", bytes(data[:HEADER_BYTES])
        )
    length = (data[6] << 8) | data[7]
    if length > max_apdu_bytes:
        raise RemoteProtocolError(
            f"wrapper frame announces {length} bytes, more than the {max_apdu_bytes} accepted",
            bytes(data[:HEADER_BYTES]),
        )
    return (data[2] << 8) | data[3], (data[4] << 8) | data[5], length


def decode_wrapper(data: bytes, max_apdu_bytes: int = DEFAULT_MAX_APDU_BYTES) -> WrapperFrame:
    """Decode exactly one complete wrapper frame."""
    if len(data) < HEADER_BYTES:
        raise RemoteProtocolError(f"wrapper frame of {len(data)} bytes, shorter than its header", data)
    source, destination, length = _header(data, max_apdu_bytes)
    if len(data) != HEADER_BYTES + length:
        raise RemoteProtocolError(
            f"wrapper length field says {length} bytes, frame carries {len(data) - HEADER_BYTES}", data[:64]
        )
    return WrapperFrame(source, destination, bytes(data[HEADER_BYTES:]))


class WrapperReader:
    """Cuts wrapper frames out of a stream split anywhere; holds at most one frame's bytes plus what
    the last chunk brought.

    :meth:`next_frame` returns a frame, None when more bytes are needed, or raises
    :class:`~dcud.errors.RemoteProtocolError` for a bad header; the stream is then unusable (the
    reader keeps refusing) and the connection must be closed.
    """

    def __init__(self, max_apdu_bytes: int = DEFAULT_MAX_APDU_BYTES) -> None:
        if not 0 <= max_apdu_bytes <= 0xFFFF:
            raise LocalProtocolError("max_apdu_bytes must be 0..65535")
        self.max_apdu_bytes = max_apdu_bytes
        self._buf = bytearray()
        self._error: RemoteProtocolError | None = None

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes from the socket."""
        if self._error is None:
            self._buf += data

    @property
    def in_frame(self) -> bool:
        """Whether part of a frame has arrived."""
        return bool(self._buf)

    def next_frame(self) -> WrapperFrame | None:
        """The next complete frame, None when more bytes are needed; raises on a bad header."""
        if self._error is not None:
            raise self._error
        buf = self._buf
        if len(buf) < HEADER_BYTES:
            return None
        try:
            source, destination, length = _header(buf, self.max_apdu_bytes)
        except RemoteProtocolError as exc:
            self._error = exc
            buf.clear()
            raise
        end = HEADER_BYTES + length
        if len(buf) < end:
            return None
        apdu = bytes(buf[HEADER_BYTES:end])
        del buf[:end]
        return WrapperFrame(source, destination, apdu)


class WrapperTransport:
    """:class:`~dcud.codec.dlms.transport.ApduTransport` over the wrapper (client side).

    ``open`` reports ``LinkUp`` at once (the TCP connection is the link); ``close`` reports
    ``LinkDown(None)``. After an APDU was sent, a reply must start within ``response_timeout_s``
    (and each further chunk of it follow within the same time), else ``LinkDown(PeerTimeout)``. A
    reply from other wPorts than ours, a bad header or an announced length beyond ``max_apdu_bytes``
    ends the link with a RemoteProtocolError.
    """

    def __init__(
        self,
        *,
        client_sap: int = 16,
        logical_device: int = 1,
        response_timeout_s: float = DEFAULT_RESPONSE_TIMEOUT_S,
        max_apdu_bytes: int = DEFAULT_MAX_APDU_BYTES,
    ) -> None:
        _check_wport(client_sap, "client")
        _check_wport(logical_device, "logical device")
        if response_timeout_s <= 0:
            raise LocalProtocolError("response_timeout_s must be positive")
        self.client_sap = client_sap
        self.logical_device = logical_device
        self.response_timeout_s = response_timeout_s
        self._reader = WrapperReader(max_apdu_bytes)
        self._up = False
        self._down = False
        self._pending = 0
        self._deadline: float | None = None
        self.bytes_tx = 0
        self.bytes_rx = 0

    @property
    def is_up(self) -> bool:
        """Whether APDUs may be exchanged."""
        return self._up and not self._down

    def open(self, now: float) -> list[object]:
        """The TCP connection is the link: LinkUp at once."""
        if self._up or self._down:
            raise LocalProtocolError("wrapper transport already opened")
        self._up = True
        return [LinkUp()]

    def send_apdu(self, apdu: bytes, now: float) -> list[object]:
        """One wrapper frame from our client SAP to the logical device."""
        if not self.is_up:
            raise LocalProtocolError("wrapper transport is not up")
        data = encode_wrapper(WrapperFrame(self.client_sap, self.logical_device, apdu))
        self.bytes_tx += len(data)
        self._pending += 1
        self._deadline = now + self.response_timeout_s
        return [Send(data)]

    def receive_data(self, data: bytes, now: float) -> list[object]:
        """Feed bytes from the socket, split anywhere."""
        if not self.is_up or not data:
            return []
        self.bytes_rx += len(data)
        self._reader.receive_data(data)
        out: list[object] = []
        while True:
            try:
                frame = self._reader.next_frame()
            except RemoteProtocolError as exc:
                return out + self._finish(exc)
            if frame is None:
                break
            if frame.source != self.logical_device or frame.destination != self.client_sap:
                return out + self._finish(
                    RemoteProtocolError(
                        f"wrapper frame from wPort {frame.source} to {frame.destination}, expected from"
                        f" {self.logical_device} to {self.client_sap}",
                        encode_wrapper(frame)[:64],
                    )
                )
            self._pending = max(0, self._pending - 1)
            out.append(ApduIn(frame.apdu))
        if self._pending or self._reader.in_frame:
            self._deadline = now + self.response_timeout_s
        else:
            self._deadline = None
        return out

    def handle_timer(self, now: float) -> list[object]:
        """No reply in time: LinkDown(PeerTimeout)."""
        if self._deadline is None or now < self._deadline or not self.is_up:
            return []
        return self._finish(PeerTimeout(f"no wrapper reply within {self.response_timeout_s} s"))

    def next_deadline(self) -> float | None:
        """When a reply is overdue; None while none is awaited."""
        return self._deadline if self.is_up else None

    def close(self, now: float) -> list[object]:
        """LinkDown(None) (the driver closes the socket)."""
        if self._down:
            return []
        return self._finish(None)

    def _finish(self, error: DcudError | None) -> list[object]:
        self._down = True
        self._deadline = None
        return [LinkDown(error)]
