"""HDLC (IEC 62056-46) as the secondary station: frames, addresses, NRM connection, segmentation.

The link answers only frames addressed to this meter (logical device and physical address) from a client
SAP it knows. Window size 1 both ways (the standard's default): one I-frame, then the peer's RR.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .application import Association, Record

FLAG = 0x7E
SNRM = 0x83
DISC = 0x43
UA = 0x63
DM = 0x0F
UI = 0x03
PF = 0x10
LLC_REQUEST = b"\xe6\xe6\x00"
LLC_RESPONSE = b"\xe6\xe7\x00"
DEFAULT_INFO = 128
MAX_BUFFER = 8192
INTER_FRAME_GAP_S = 1.0  # silence that ends a frame cut short (far above a byte time at 300 Bd)


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc_table()


def fcs16(data: bytes) -> int:
    """CRC-16/X.25 of ``data`` (HCS and FCS; sent low byte first)."""
    crc = 0xFFFF
    for byte in data:
        crc = (crc >> 8) ^ _TABLE[(crc ^ byte) & 0xFF]
    return crc ^ 0xFFFF


@dataclass(frozen=True)
class Frame:
    """One received frame: addresses, control, information, segmentation bit."""

    upper: int
    lower: int | None
    server_address_size: int
    client_sap: int
    control: int
    info: bytes
    segmented: bool


class FrameError(ValueError):
    """A frame that does not check out (FCS, HCS, addresses)."""


def encode_server_address(upper: int, lower: int | None, size: int) -> bytes:
    """The server address in ``size`` (1, 2 or 4) bytes, 7 bits each, the last byte's low bit set."""
    if size == 1:
        return bytes([(upper << 1) | 1])
    if size == 2:
        return bytes([(upper & 0x7F) << 1, ((lower or 0) & 0x7F) << 1 | 1])
    low = lower or 0
    return bytes([(upper >> 7) << 1, (upper & 0x7F) << 1, (low >> 7) << 1, (low & 0x7F) << 1 | 1])


def _address(content: bytes, pos: int, limit: int) -> tuple[list[int], int]:
    out: list[int] = []
    while pos < limit and len(out) < 4:
        out.append(content[pos])
        pos += 1
        if out[-1] & 1:
            return out, pos
    raise FrameError("address without an end bit")


def parse_frame(content: bytes, segmented: bool) -> Frame:
    """Parse the bytes between the flags (format field through FCS)."""
    if fcs16(content[:-2]) != int.from_bytes(content[-2:], "little"):
        raise FrameError("FCS")
    dest, pos = _address(content, 2, len(content) - 2)
    src, pos = _address(content, pos, len(content) - 2)
    if len(dest) == 3 or len(src) != 1:
        raise FrameError(f"address sizes {len(dest)}/{len(src)}")
    control = content[pos]
    pos += 1
    info = b""
    if pos < len(content) - 2:
        if fcs16(content[:pos]) != int.from_bytes(content[pos : pos + 2], "little"):
            raise FrameError("HCS")
        info = bytes(content[pos + 2 : -2])
    values = [b >> 1 for b in dest]
    if len(values) == 1:
        upper, lower = values[0], None
    elif len(values) == 2:
        upper, lower = values
    else:
        upper, lower = (values[0] << 7) | values[1], (values[2] << 7) | values[3]
    return Frame(upper, lower, len(dest), src[0] >> 1, control, info, segmented)


def build_frame(
    client_sap: int, server_address: bytes, control: int, info: bytes, segmented: bool = False
) -> bytes:
    """A frame from this meter to ``client_sap``."""
    header_len = 2 + 1 + len(server_address) + 1
    length = header_len + (2 + len(info) if info else 0) + 2
    fmt = (0xA000 | (0x0800 if segmented else 0) | length).to_bytes(2, "big")
    header = fmt + bytes([(client_sap << 1) | 1]) + server_address + bytes([control])
    body = header
    if info:
        body += fcs16(header).to_bytes(2, "little") + info
    return bytes([FLAG]) + body + fcs16(body).to_bytes(2, "little") + bytes([FLAG])


class HdlcLink:
    """The meter's side of one HDLC line: feed received bytes, get the frames to send back."""

    def __init__(
        self,
        logical_device: int,
        physical_address: int,
        max_info: int,
        known_saps: set[int],
        open_association: Callable[[int, str], Association],
        log: Callable[[Record], None],
        is_silent: Callable[[], bool],
        inactivity_timeout_s: float = 0.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inactivity_timeout_s = inactivity_timeout_s
        self.monotonic = monotonic
        self.last_frame_at = monotonic()
        self.last_byte_at = self.last_frame_at
        self.logical_device = logical_device
        self.physical_address = physical_address
        self.max_info = max_info
        self.known_saps = known_saps
        self.open_association = open_association
        self.log = log
        self.is_silent = is_silent
        self.buffer = bytearray()
        self.connected = False
        self.client_sap = 0
        self.address = b""
        self.vs = 0
        self.vr = 0
        self.info_tx = DEFAULT_INFO
        self.info_rx = DEFAULT_INFO
        self.rx = bytearray()
        self.pending: list[bytes] = []
        self.last_frame: bytes | None = None
        self.association: Association | None = None
        self.connections = 0

    def feed(self, data: bytes) -> list[bytes]:
        """Bytes from the line in; frames to write out."""
        now = self.monotonic()
        if self.buffer and now - self.last_byte_at > INTER_FRAME_GAP_S:
            # a frame cut short (its length field promises bytes that never came): a real meter drops it
            self.log(
                {
                    "kind": "frame_error",
                    "transport": "hdlc",
                    "why": "incomplete frame",
                    "bytes": self.buffer.hex(),
                }
            )
            self.buffer.clear()
        self.last_byte_at = now
        self.buffer += data
        out: list[bytes] = []
        for _ in range(1000):
            content = self._next_frame()
            if content is None:
                break
            segmented = bool(content[0] & 0x08)
            try:
                frame = parse_frame(content, segmented)
            except (FrameError, IndexError) as exc:
                self.log(
                    {"kind": "frame_error", "transport": "hdlc", "why": str(exc), "bytes": content.hex()}
                )
                continue
            out += self._on_frame(frame)
        return out

    def _next_frame(self) -> bytes | None:
        buf = self.buffer
        while True:
            start = buf.find(FLAG)
            if start < 0:
                buf.clear()
                return None
            del buf[:start]
            if len(buf) < 3:
                return None
            if buf[1] == FLAG:  # shared or doubled flags
                del buf[:1]
                continue
            if buf[1] & 0xF0 != 0xA0:
                del buf[:1]
                continue
            length = ((buf[1] & 0x07) << 8) | buf[2]
            if length < 7:
                del buf[:1]
                continue
            if len(buf) < length + 2:
                if len(buf) > MAX_BUFFER:
                    buf.clear()
                return None
            if buf[length + 1] != FLAG:
                del buf[:1]
                continue
            content = bytes(buf[1 : length + 1])
            del buf[: length + 1]  # keep the closing flag: it may open the next frame
            return content

    def reset(self, why: str) -> None:
        """Forget the connection (the meter restarted its link layer); the association is aborted."""
        if self.association is not None:
            self.association.close(why)
            self.association = None
        self.connected = False
        self.pending = []
        self.rx.clear()

    def _frame(self, control: int, info: bytes = b"", segmented: bool = False) -> bytes:
        return build_frame(self.client_sap, self.address, control, info, segmented)

    def _on_frame(self, f: Frame) -> list[bytes]:
        if f.upper != self.logical_device or f.lower not in (self.physical_address, None):
            self.log({"kind": "foreign_frame", "transport": "hdlc", "upper": f.upper, "lower": f.lower})
            return []
        if f.client_sap not in self.known_saps:
            self.log({"kind": "unknown_client", "transport": "hdlc", "client_sap": f.client_sap})
            return []
        if self.is_silent():
            self.log(
                {"kind": "dropped", "transport": "hdlc", "client_sap": f.client_sap, "control": f.control}
            )
            return []
        now = self.monotonic()
        idle_s, self.last_frame_at = now - self.last_frame_at, now
        if self.connected and self.inactivity_timeout_s and idle_s > self.inactivity_timeout_s:
            # like a meter whose inactivity timer expired meanwhile: back in disconnected mode
            self.log({"kind": "inactivity_timeout", "transport": "hdlc", "idle_s": round(idle_s, 3)})
            self.reset("HDLC inactivity timeout")
        control = f.control & ~PF
        if control == SNRM:
            return self._snrm(f)
        if not self.connected or f.client_sap != self.client_sap:
            # disconnected mode: DISC, I and S frames get DM (the client must send SNRM first)
            if control == DISC or not f.control & 1 or f.control & 0x0F in (0x01, 0x05):
                self.log(
                    {
                        "kind": "not_connected",
                        "transport": "hdlc",
                        "client_sap": f.client_sap,
                        "control": f.control,
                    }
                )
                address = encode_server_address(f.upper, f.lower, f.server_address_size)
                return [build_frame(f.client_sap, address, DM | PF, b"")]
            return []
        if control == DISC:
            self.log({"kind": "disc", "transport": "hdlc", "client_sap": f.client_sap})
            self.reset("disc")
            return [self._frame(UA | PF)]
        if f.control & 1 == 0:
            return self._information(f)
        if f.control & 0x0F == 0x01:  # RR
            return self._receive_ready((f.control >> 5) & 7)
        if control == UI:
            return []
        self.log({"kind": "frame_ignored", "transport": "hdlc", "control": f.control})
        return []

    def _snrm(self, f: Frame) -> list[bytes]:
        tx, rx = DEFAULT_INFO, DEFAULT_INFO
        info = f.info
        try:
            if info:
                if info[:2] != b"\x81\x80" or info[2] + 3 != len(info):
                    raise ValueError("SNRM parameters are not a 0x81 0x80 group")
                pos = 3
                while pos < len(info):
                    pid, size = info[pos], info[pos + 1]
                    value = int.from_bytes(info[pos + 2 : pos + 2 + size], "big")
                    if pos + 2 + size > len(info):
                        raise ValueError("truncated SNRM parameter")
                    if pid == 0x05:
                        rx = value  # what the client sends is what we receive
                    elif pid == 0x06:
                        tx = value
                    pos += 2 + size
        except (ValueError, IndexError) as exc:
            self.log({"kind": "frame_error", "transport": "hdlc", "why": str(exc)})
            return []
        self.reset("snrm")
        self.client_sap = f.client_sap
        self.address = encode_server_address(f.upper, f.lower, f.server_address_size)
        self.info_tx = max(32, min(tx, self.max_info))
        self.info_rx = max(32, min(rx, self.max_info))
        self.vs = self.vr = 0
        self.connected = True
        self.connections += 1
        self.association = self.open_association(f.client_sap, f"hdlc-{self.connections}")
        self.log(
            {
                "kind": "snrm",
                "transport": "hdlc",
                "client_sap": f.client_sap,
                "info_tx": self.info_tx,
                "info_rx": self.info_rx,
            }
        )
        params = b""
        for pid, value in ((0x05, self.info_tx), (0x06, self.info_rx), (0x07, 1), (0x08, 1)):
            raw = value.to_bytes(1 if value < 256 else 2, "big")
            params += bytes([pid, len(raw)]) + raw
        return [self._frame(UA | PF, b"\x81\x80" + bytes([len(params)]) + params)]

    def _information(self, f: Frame) -> list[bytes]:
        ns = (f.control >> 1) & 7
        if ns != self.vr:
            if ns == (self.vr - 1) % 8 and self.last_frame is not None:
                self.log({"kind": "retransmit", "transport": "hdlc", "client_sap": f.client_sap})
                return [self.last_frame]
            self.log({"kind": "sequence_error", "transport": "hdlc", "ns": ns, "expected": self.vr})
            return []
        if len(f.info) > self.info_rx:
            self.log(
                {
                    "kind": "frame_error",
                    "transport": "hdlc",
                    "why": f"information field {len(f.info)} > {self.info_rx}",
                }
            )
            return []
        self.vr = (self.vr + 1) % 8
        self.pending = []
        self.rx += f.info
        if len(self.rx) > 0x10000:
            self.rx.clear()
            return []
        if f.segmented:
            return [self._remember(self._frame(0x01 | PF | (self.vr << 5)))]
        apdu = bytes(self.rx)
        self.rx.clear()
        if not apdu.startswith(LLC_REQUEST):
            self.log({"kind": "frame_error", "transport": "hdlc", "why": "no LLC header E6 E6 00"})
            return [self._remember(self._frame(0x01 | PF | (self.vr << 5)))]
        assert self.association is not None
        answer = self.association.handle(apdu[3:])
        if answer is None:
            return [self._remember(self._frame(0x01 | PF | (self.vr << 5)))]
        data = LLC_RESPONSE + answer
        self.pending = [data[i : i + self.info_tx] for i in range(0, len(data), self.info_tx)]
        return [self._send_segment()]

    def _send_segment(self) -> bytes:
        chunk = self.pending.pop(0)
        control = (self.vr << 5) | PF | (self.vs << 1)
        self.vs = (self.vs + 1) % 8
        return self._remember(self._frame(control, chunk, segmented=bool(self.pending)))

    def _receive_ready(self, nr: int) -> list[bytes]:
        if self.pending and nr == self.vs:
            return [self._send_segment()]
        if nr == (self.vs - 1) % 8 and self.last_frame is not None:
            return [self.last_frame]  # the client did not get our last frame
        return [self._frame(0x01 | PF | (self.vr << 5))]

    def _remember(self, frame: bytes) -> bytes:
        self.last_frame = frame
        return frame
