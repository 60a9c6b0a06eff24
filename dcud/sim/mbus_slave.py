"""Sans-I/O M-Bus slave model for the simulator: requests in, reply bytes out.

:class:`MbusSlave` answers SND_NKE, REQ_UD2 (with FCB semantics and multi-telegram readouts), secondary
selection (CI 52 with wildcards, deselection), set primary/secondary address (CI 51), application reset
(CI 50) and baud changes (CI B8..BF). :class:`MbusBusModel` puts several slaves on one line: every slave
hears every request, and when more than one answers their replies are merged the way the bus merges
them electrically (wired-AND of the UART bit streams, each slave starting after its own delay), which
turns simultaneous answers into the garbage a master sees as a collision.

Wire timing (:func:`bytes_time_s`) lives here, not in ``dcud.codec``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from dcud.codec.mbus import (
    ACK,
    ADDRESS_BROADCAST,
    ADDRESS_BROADCAST_REPLY,
    ADDRESS_NETWORK,
    BAUD_RATES,
    C_MASK_FUNCTION,
    C_REQ_UD1,
    C_REQ_UD2,
    C_RSP_UD,
    C_SND_NKE,
    C_SND_UD,
    CI_APPLICATION_RESET,
    CI_DATA_SEND,
    CI_SELECT,
    CI_SET_BAUD_BASE,
    FrameKind,
    MbusFrame,
    MbusLinkParser,
    encode_long,
    encode_manufacturer,
)
from dcud.codec.mbus_app import (
    CI_VARIABLE,
    DataField,
    decode_records,
    encode_manufacturer_data,
    encode_record,
    encode_variable_header,
)
from dcud.errors import LocalProtocolError, ProtocolError

BITS_PER_CHARACTER = 11
"""8E1 character: start, 8 data bits, even parity, stop."""


def bytes_time_s(size_bytes: int, baud: int) -> float:
    """Time ``size_bytes`` characters take on the wire at ``baud`` (8E1)."""
    return size_bytes * BITS_PER_CHARACTER / baud


@dataclass(frozen=True, slots=True)
class SlaveRecord:
    """A record the slave reports, with its raw (unscaled) value; see ``encode_record``."""

    value: int | float | str | bytes | None
    vif: int | bytes
    data_field: int = DataField.INT32
    storage: int = 0
    tariff: int = 0
    subunit: int = 0
    function: str = "instantaneous"

    def encode(self) -> bytes:
        """The record's bytes (DIF..data)."""
        return encode_record(
            self.value,
            vif=self.vif,
            data_field=self.data_field,
            storage=self.storage,
            tariff=self.tariff,
            subunit=self.subunit,
            function=self.function,
        )


def encode_rsp_ud(
    address: int,
    *,
    ident: str,
    manufacturer: str,
    version: int,
    medium: int,
    access_number: int,
    status: int = 0,
    signature: int = 0,
    records: Sequence[SlaveRecord | bytes] = (),
    manufacturer_data: bytes | None = None,
    more_records_follow: bool = False,
) -> bytes:
    """A complete RSP_UD long frame with CI 72 (12-byte header) and the given records.

    ``more_records_follow`` appends DIF 1F (with ``manufacturer_data`` after it); otherwise
    ``manufacturer_data`` is sent after DIF 0F.
    """
    body = bytearray(
        encode_variable_header(
            ident,
            manufacturer=manufacturer,
            version=version,
            medium=medium,
            access_number=access_number,
            status=status,
            signature=signature,
        )
    )
    for record in records:
        body += record.encode() if isinstance(record, SlaveRecord) else record
    if more_records_follow or manufacturer_data is not None:
        body += encode_manufacturer_data(manufacturer_data or b"", more_records_follow)
    return encode_long(C_RSP_UD, address, CI_VARIABLE, bytes(body))


def _mask_matches(mask: bytes, own: bytes) -> bool:
    """Select mask (8 bytes) against our secondary address bytes; F nibbles / FF bytes are wildcards."""
    for i in range(4):  # BCD ID: nibble wildcards
        m, o = mask[i], own[i]
        if (m >> 4) != 0xF and (m >> 4) != (o >> 4):
            return False
        if (m & 0x0F) != 0xF and (m & 0x0F) != (o & 0x0F):
            return False
    man = mask[4] | (mask[5] << 8)
    if man != 0xFFFF and mask[4:6] != own[4:6]:
        return False
    return all(not (mask[i] != 0xFF and mask[i] != own[i]) for i in (6, 7))


@dataclass
class MbusSlave:
    """One simulated meter.

    ``telegrams`` is the multi-telegram readout: each entry is the list of records of one RSP_UD; all
    but the last end in DIF 1F. ``reply_delay_bits`` is when the answer starts after the request (used
    by :class:`MbusBusModel` to merge simultaneous answers). ``drop_replies`` swallows that many of the
    next answers (a lost reply, to exercise the master's retries); ``answer_nke`` False models meters
    that ignore SND_NKE.
    """

    primary_address: int = 0
    ident: str = "12345678"
    manufacturer: str = "DCU"
    version: int = 1
    medium: int = 0x07
    telegrams: list[list[SlaveRecord | bytes]] = field(default_factory=lambda: [[]])
    status: int = 0
    access_number: int = 0
    baud: int = 2400
    answer_nke: bool = True
    reply_delay_bits: int = 11
    drop_replies: int = 0
    selected: bool = False
    requests: list[MbusFrame] = field(default_factory=list)
    """Every frame addressed to or heard by this slave, for test assertions."""

    def __post_init__(self) -> None:
        if not self.telegrams:
            raise LocalProtocolError("a slave needs at least one telegram")
        self._last_fcb: bool | None = None
        self._index = 0
        self._last_reply: bytes | None = None
        self._parser = MbusLinkParser()
        self._pending_baud: int | None = None

    @property
    def secondary_bytes(self) -> bytes:
        """ID (BCD LSB first), manufacturer (LE), version, medium: the 8 bytes selection compares."""
        return (
            bytes.fromhex(self.ident)[::-1]
            + encode_manufacturer(self.manufacturer).to_bytes(2, "little")
            + bytes([self.version, self.medium])
        )

    @property
    def secondary_address(self) -> str:
        """16 hex digits ``IIIIIIIIMMMMVVDD``."""
        return f"{self.ident}{encode_manufacturer(self.manufacturer):04X}{self.version:02X}{self.medium:02X}"

    def telegram_bytes(self, index: int, access_number: int) -> bytes:
        """The RSP_UD frame of telegram ``index``."""
        last = index == len(self.telegrams) - 1
        return encode_rsp_ud(
            self.primary_address,
            ident=self.ident,
            manufacturer=self.manufacturer,
            version=self.version,
            medium=self.medium,
            access_number=access_number & 0xFF,
            status=self.status,
            records=self.telegrams[index],
            more_records_follow=not last,
        )

    def _reply(self, data: bytes) -> bytes | None:
        if self.drop_replies > 0:
            self.drop_replies -= 1
            return None
        return data

    def _addressed(self, address: int) -> bool:
        return address in (self.primary_address, ADDRESS_BROADCAST_REPLY, ADDRESS_BROADCAST) or (
            address == ADDRESS_NETWORK and self.selected
        )

    def handle_frame(self, frame: MbusFrame) -> bytes | None:
        """React to one master frame; returns the reply bytes or None (silence)."""
        if not frame.from_master:
            return None
        if frame.kind is FrameKind.LONG and frame.address == ADDRESS_NETWORK and frame.ci == CI_SELECT:
            self.requests.append(frame)
            if len(frame.data) >= 8 and _mask_matches(frame.data[:8], self.secondary_bytes):
                self.selected = True
                return self._reply(bytes([ACK]))
            self.selected = False
            return None
        if not self._addressed(frame.address):
            return None
        self.requests.append(frame)
        silent = frame.address == ADDRESS_BROADCAST
        function = frame.control & ~0x30 & 0xFF
        if frame.kind is FrameKind.SHORT and frame.control == C_SND_NKE:
            self._last_fcb = None
            self._index = 0
            if frame.address == ADDRESS_NETWORK:
                self.selected = False
            return None if silent or not self.answer_nke else self._reply(bytes([ACK]))
        if frame.kind is FrameKind.SHORT and function in (C_REQ_UD2 & ~0x30, C_REQ_UD1 & ~0x30):
            return None if silent else self._reply(self._class2(frame))
        if frame.kind in (FrameKind.LONG, FrameKind.CONTROL) and frame.control & C_MASK_FUNCTION == (
            C_SND_UD & C_MASK_FUNCTION
        ):
            acked = self._snd_ud(frame)
            return None if silent or not acked else self._reply(bytes([ACK]))
        return None

    def _class2(self, frame: MbusFrame) -> bytes:
        if frame.fcv and self._last_fcb is not None and frame.fcb == self._last_fcb and self._last_reply:
            return self._last_reply  # repeated request: same telegram again
        if frame.fcv and self._last_fcb is not None:
            self._index = (self._index + 1) % len(self.telegrams)
        elif not frame.fcv:
            self._index = 0
        self._last_fcb = frame.fcb if frame.fcv else None
        self.access_number = (self.access_number + 1) & 0xFF
        self._last_reply = self.telegram_bytes(self._index, self.access_number)
        return self._last_reply

    def _snd_ud(self, frame: MbusFrame) -> bool:
        ci = frame.ci
        if ci is None:
            return False
        if ci == CI_APPLICATION_RESET:
            self._index = 0
            self._last_reply = None
            return True
        if CI_SET_BAUD_BASE <= ci <= CI_SET_BAUD_BASE + 7:
            # Acknowledged at the old rate; the bus model applies the new one afterwards.
            self._pending_baud = BAUD_RATES[ci - CI_SET_BAUD_BASE]
            return True
        if ci == CI_DATA_SEND:
            return self._data_send(frame.data)
        return False

    def _data_send(self, data: bytes) -> bool:
        try:
            records, _ = decode_records(data)
        except ProtocolError:
            return False
        for record in records:
            vif = bytes.fromhex(record.raw_vif)[:1]
            raw = bytes.fromhex(record.raw_data)
            if vif == b"\x7a" and isinstance(record.value, int):
                self.primary_address = record.value
            elif vif == b"\x79" and len(raw) == 8:
                self.ident = raw[3::-1].hex().upper()
                self.manufacturer = _manufacturer_letters(raw[4] | (raw[5] << 8))
                self.version, self.medium = raw[6], raw[7]
            elif vif == b"\x79" and len(raw) == 4:
                self.ident = raw[::-1].hex().upper()
        return True

    def apply_pending_baud(self) -> None:
        """Switch to the baud rate a CI B8..BF request asked for (after the ACK went out)."""
        if self._pending_baud is not None:
            self.baud = self._pending_baud
            self._pending_baud = None

    def receive_data(self, data: bytes) -> bytes:
        """Stream interface: bytes from the master in, concatenated replies out."""
        self._parser.receive_data(data)
        out = bytearray()
        for event in self._parser.events():
            if isinstance(event, MbusFrame):
                reply = self.handle_frame(event)
                if reply:
                    out += reply
                self.apply_pending_baud()
        return bytes(out)


def _manufacturer_letters(value: int) -> str:
    return "".join(chr(((value >> shift) & 0x1F) + 64) for shift in (10, 5, 0))


def _uart_bits(data: bytes) -> list[int]:
    bits: list[int] = []
    for byte in data:
        data_bits = [(byte >> i) & 1 for i in range(8)]
        bits += [0, *data_bits, sum(data_bits) & 1, 1]
    return bits


def merge_replies(replies: Sequence[tuple[int, bytes]]) -> bytes:
    """What the master's UART reads when several slaves answer at once.

    Each reply is ``(start_bits, data)``: the slave starts sending ``start_bits`` bit times after the
    first one could. The bus is a wired-AND (a slave sending 0 pulls the line), so the bit streams are
    ANDed and then re-framed like a UART would: wait for a start bit, sample 8 data bits, skip parity
    and stop (parity and framing errors are not reported by most serial drivers, the byte is delivered).
    One reply alone comes out unchanged.
    """
    active = [(start, data) for start, data in replies if data]
    if not active:
        return b""
    if len(active) == 1:
        return active[0][1]
    base = min(start for start, _ in active)
    streams = [([1] * (start - base)) + _uart_bits(data) for start, data in active]
    length = max(len(s) for s in streams)
    line = [1] * length
    for stream in streams:
        for i, bit in enumerate(stream):
            line[i] &= bit
    out = bytearray()
    i = 0
    while i < length:
        if line[i] == 1:
            i += 1
            continue
        frame = line[i : i + BITS_PER_CHARACTER] + [1] * max(0, i + BITS_PER_CHARACTER - length)
        out.append(sum(bit << n for n, bit in enumerate(frame[1:9])))
        i += BITS_PER_CHARACTER
    return bytes(out)


@dataclass
class MbusBusModel:
    """Several slaves on one line, all hearing every request at ``baud``."""

    slaves: list[MbusSlave]
    baud: int = 2400

    def request(self, data: bytes) -> bytes:
        """Deliver master bytes to every slave listening at the line's rate; return the merged answers."""
        replies: list[tuple[int, bytes]] = []
        for slave in self.slaves:
            if slave.baud != self.baud:
                continue  # a slave at another rate hears only noise
            reply = slave.receive_data(data)
            if reply:
                replies.append((slave.reply_delay_bits, reply))
        return merge_replies(replies)
