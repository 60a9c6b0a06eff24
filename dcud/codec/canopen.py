"""CANopen (CiA 301) master-side protocol, sans-I/O: NMT, heartbeat, SDO client, PDO decoding.

Frames are ``(cob_id, data)`` pairs (:class:`CanFrame`); time comes in as ``now`` (monotonic seconds)
and deadlines go out on the same clock. The :class:`SdoClient` runs one transfer at a time, as CiA 301
requires per server: expedited and segmented upload and download (block transfer is not used by
drives on a DCU and is not implemented). Errors: ``NegativeResponse`` for an SDO abort from the
server (with the CiA 301 text), ``RemoteProtocolError`` for garbage (with the abort frame the client
must send back), ``LocalProtocolError`` for misuse.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from dcud.codec.cia402 import sdo_abort_text
from dcud.errors import LocalProtocolError, NegativeResponse, RemoteProtocolError

NMT_COB_ID = 0x000
SYNC_COB_ID = 0x080
EMCY_BASE = 0x080
TPDO_BASES: tuple[int, ...] = (0x180, 0x280, 0x380, 0x480)
RPDO_BASES: tuple[int, ...] = (0x200, 0x300, 0x400, 0x500)
SDO_TX_BASE = 0x580
"""Server to client (the drive's answers)."""
SDO_RX_BASE = 0x600
"""Client to server (our requests)."""
HEARTBEAT_BASE = 0x700

MAX_NODE_ID = 127
MAX_STANDARD_ID = 0x7FF


@dataclass(frozen=True, slots=True)
class CanFrame:
    """One classic CAN frame with an 11-bit identifier."""

    cob_id: int
    data: bytes

    def __post_init__(self) -> None:
        if not 0 <= self.cob_id <= MAX_STANDARD_ID or len(self.data) > 8:
            raise LocalProtocolError(f"not a classic CAN frame: id 0x{self.cob_id:X}, {len(self.data)} bytes")


class FrameKind(enum.StrEnum):
    """What a COB-ID carries, from a master's point of view."""

    NMT = "nmt"
    SYNC = "sync"
    EMCY = "emcy"
    TIME = "time"
    TPDO = "tpdo"
    RPDO = "rpdo"
    SDO_RESPONSE = "sdo_response"
    SDO_REQUEST = "sdo_request"
    HEARTBEAT = "heartbeat"
    OTHER = "other"


def classify(cob_id: int) -> tuple[FrameKind, int]:
    """The kind of a COB-ID in the predefined connection set, and its node id (0 for broadcasts)."""
    if cob_id == NMT_COB_ID:
        return FrameKind.NMT, 0
    if cob_id == SYNC_COB_ID:
        return FrameKind.SYNC, 0
    if cob_id == 0x100:
        return FrameKind.TIME, 0
    function, node = cob_id & 0x780, cob_id & 0x7F
    if node == 0:
        return FrameKind.OTHER, 0
    kind = {
        0x080: FrameKind.EMCY,
        0x180: FrameKind.TPDO,
        0x280: FrameKind.TPDO,
        0x380: FrameKind.TPDO,
        0x480: FrameKind.TPDO,
        0x200: FrameKind.RPDO,
        0x300: FrameKind.RPDO,
        0x400: FrameKind.RPDO,
        0x500: FrameKind.RPDO,
        0x580: FrameKind.SDO_RESPONSE,
        0x600: FrameKind.SDO_REQUEST,
        0x700: FrameKind.HEARTBEAT,
    }.get(function, FrameKind.OTHER)
    return kind, node


# -- NMT and heartbeat ------------------------------------------------------------------------


class NmtCommand(enum.IntEnum):
    """NMT command specifiers (first byte of a COB-ID 000 frame)."""

    START = 0x01
    STOP = 0x02
    ENTER_PRE_OPERATIONAL = 0x80
    RESET_NODE = 0x81
    RESET_COMMUNICATION = 0x82


class NmtState(enum.StrEnum):
    """NMT states as reported by heartbeat (``boot_up`` is the initialising state's message)."""

    BOOT_UP = "boot_up"
    STOPPED = "stopped"
    OPERATIONAL = "operational"
    PRE_OPERATIONAL = "pre_operational"


_HEARTBEAT_STATES = {
    0x00: NmtState.BOOT_UP,
    0x04: NmtState.STOPPED,
    0x05: NmtState.OPERATIONAL,
    0x7F: NmtState.PRE_OPERATIONAL,
}
_HEARTBEAT_BYTES = {state: byte for byte, state in _HEARTBEAT_STATES.items()}


def nmt_command(command: NmtCommand, node_id: int) -> CanFrame:
    """The NMT frame that sends ``command`` to ``node_id`` (0 = all nodes)."""
    if not 0 <= node_id <= MAX_NODE_ID:
        raise LocalProtocolError(f"node id {node_id} outside 0..127")
    return CanFrame(NMT_COB_ID, bytes((int(command), node_id)))


def decode_heartbeat(data: bytes) -> NmtState:
    """The NMT state in a heartbeat (or boot-up) message; bit 7 is the node-guarding toggle."""
    if len(data) != 1:
        raise RemoteProtocolError(f"heartbeat must carry 1 byte, got {len(data)}", data)
    state = _HEARTBEAT_STATES.get(data[0] & 0x7F)
    if state is None:
        raise RemoteProtocolError(f"heartbeat state 0x{data[0]:02X} is not an NMT state", data)
    return state


def encode_heartbeat(state: NmtState) -> bytes:
    """The data byte of a heartbeat in ``state`` (simulators)."""
    return bytes((_HEARTBEAT_BYTES[state],))


# -- SDO client -------------------------------------------------------------------------------

_CCS_DOWNLOAD_SEGMENT = 0
_CCS_INITIATE_DOWNLOAD = 1
_CCS_INITIATE_UPLOAD = 2
_CCS_UPLOAD_SEGMENT = 3
_CS_ABORT = 4
_SCS_UPLOAD_SEGMENT = 0
_SCS_DOWNLOAD_SEGMENT = 1
_SCS_INITIATE_UPLOAD = 2
_SCS_INITIATE_DOWNLOAD = 3

ABORT_TIMEOUT = 0x05040000
ABORT_TOGGLE = 0x05030000
ABORT_COMMAND = 0x05040001
ABORT_LENGTH = 0x06070010

MAX_SDO_BYTES = 65536
"""Largest object the client accepts (a DCU reads identity strings and parameters, not firmware)."""


class SdoDirection(enum.StrEnum):
    """Direction of an SDO transfer."""

    UPLOAD = "upload"
    DOWNLOAD = "download"


@dataclass(frozen=True, slots=True)
class SdoDone:
    """A finished transfer: the uploaded bytes (empty for a download)."""

    index: int
    subindex: int
    data: bytes


@dataclass(frozen=True, slots=True)
class SdoSend:
    """The client's next request frame within a segmented transfer."""

    frame: CanFrame


class SdoRemoteError(RemoteProtocolError):
    """The server broke the SDO protocol; ``abort`` is the frame the client sends to end the transfer."""

    def __init__(self, message: str, frame: bytes, abort: CanFrame) -> None:
        super().__init__(message, frame)
        self.abort = abort


class SdoAbort(NegativeResponse):
    """The server aborted the transfer (CiA 301 abort code and its standard text)."""

    def __init__(self, code: int, index: int, subindex: int) -> None:
        super().__init__(code, f"SDO abort on 0x{index:04X}:{subindex:02X}: {sdo_abort_text(code)}")
        self.index = index
        self.subindex = subindex


@dataclass(slots=True)
class _Transfer:
    direction: SdoDirection
    index: int
    subindex: int
    deadline_s: float
    data: bytearray
    expected_size: int | None
    segmented: bool
    initiated: bool = False
    toggle: int = 0
    offset: int = 0


def _check_object(index: int, subindex: int) -> None:
    if not 0 <= index <= 0xFFFF or not 0 <= subindex <= 0xFF:
        raise LocalProtocolError(f"object 0x{index:X}:{subindex:X} outside 0000..FFFF:00..FF")


class SdoClient:
    """One node's SDO client channel (COB-IDs 600+id out, 580+id in), one transfer at a time."""

    def __init__(self, node_id: int, timeout_s: float = 1.0) -> None:
        if not 1 <= node_id <= MAX_NODE_ID:
            raise LocalProtocolError(f"node id {node_id} outside 1..127")
        self.node_id = node_id
        self.timeout_s = timeout_s
        self.request_cob_id = SDO_RX_BASE + node_id
        self.response_cob_id = SDO_TX_BASE + node_id
        self._transfer: _Transfer | None = None

    @property
    def busy(self) -> bool:
        """True while a transfer is in progress."""
        return self._transfer is not None

    @property
    def deadline_s(self) -> float | None:
        """When the server's next answer is due (None when idle)."""
        return self._transfer.deadline_s if self._transfer else None

    def _frame(self, payload: bytes) -> CanFrame:
        return CanFrame(self.request_cob_id, payload.ljust(8, b"\x00"))

    def _begin(self, transfer: _Transfer) -> None:
        if self._transfer is not None:
            raise LocalProtocolError("an SDO transfer is already in progress on this node")
        self._transfer = transfer

    def upload(self, index: int, subindex: int, now: float) -> CanFrame:
        """Start reading ``index:subindex``; returns the initiate-upload request."""
        _check_object(index, subindex)
        self._begin(
            _Transfer(
                SdoDirection.UPLOAD, index, subindex, now + self.timeout_s, bytearray(), None, segmented=False
            )
        )
        return self._frame(struct.pack("<BHB", _CCS_INITIATE_UPLOAD << 5, index, subindex))

    def download(self, index: int, subindex: int, data: bytes, now: float) -> CanFrame:
        """Start writing ``data`` to ``index:subindex``; returns the initiate-download request."""
        _check_object(index, subindex)
        if not data or len(data) > MAX_SDO_BYTES:
            raise LocalProtocolError(f"SDO download of {len(data)} bytes (1..{MAX_SDO_BYTES})")
        segmented = len(data) > 4
        self._begin(
            _Transfer(
                SdoDirection.DOWNLOAD,
                index,
                subindex,
                now + self.timeout_s,
                bytearray(data),
                len(data),
                segmented,
            )
        )
        if not segmented:
            # Expedited with size indicated: n = number of unused bytes in d.
            command = (_CCS_INITIATE_DOWNLOAD << 5) | ((4 - len(data)) << 2) | 0x03
            return self._frame(struct.pack("<BHB", command, index, subindex) + data)
        command = (_CCS_INITIATE_DOWNLOAD << 5) | 0x01
        return self._frame(struct.pack("<BHBI", command, index, subindex, len(data)))

    def expire(self, now: float) -> CanFrame:
        """The transfer's deadline passed: end it; returns the abort frame (05040000) to send."""
        transfer = self._transfer
        if transfer is None:
            raise LocalProtocolError("no SDO transfer to expire")
        self._transfer = None
        return self._abort_frame(transfer.index, transfer.subindex, ABORT_TIMEOUT)

    def cancel(self) -> None:
        """Forget the transfer without telling the server (the bus went away)."""
        self._transfer = None

    def _abort_frame(self, index: int, subindex: int, code: int) -> CanFrame:
        return self._frame(struct.pack("<BHBI", _CS_ABORT << 5, index, subindex, code))

    def _fail(self, message: str, data: bytes, code: int) -> SdoRemoteError:
        transfer = self._transfer
        assert transfer is not None
        self._transfer = None
        return SdoRemoteError(message, data, self._abort_frame(transfer.index, transfer.subindex, code))

    def receive(self, data: bytes, now: float) -> SdoDone | SdoSend | None:
        """Feed one SDO response (COB-ID 580+id); returns the outcome, or None when idle (stray frame).

        Raises :class:`SdoAbort` when the server aborted and :class:`SdoRemoteError` when its frame
        breaks the protocol (the transfer is over in both cases).
        """
        transfer = self._transfer
        if transfer is None:
            return None
        if len(data) != 8:
            raise self._fail(f"SDO response must carry 8 bytes, got {len(data)}", data, ABORT_COMMAND)
        command = data[0]
        scs = command >> 5
        if scs == _CS_ABORT:
            index, subindex, code = struct.unpack_from("<HBI", data, 1)
            self._transfer = None
            raise SdoAbort(code, index, subindex)
        if transfer.direction is SdoDirection.UPLOAD:
            return self._receive_upload(transfer, data, now)
        return self._receive_download(transfer, data, now)

    def _check_mux(self, transfer: _Transfer, data: bytes) -> None:
        index, subindex = struct.unpack_from("<HB", data, 1)
        if (index, subindex) != (transfer.index, transfer.subindex):
            raise self._fail(
                f"SDO response for 0x{index:04X}:{subindex:02X}, expected "
                f"0x{transfer.index:04X}:{transfer.subindex:02X}",
                data,
                ABORT_COMMAND,
            )

    def _receive_upload(self, transfer: _Transfer, data: bytes, now: float) -> SdoDone | SdoSend:
        command = data[0]
        scs = command >> 5
        if not transfer.initiated:
            if scs != _SCS_INITIATE_UPLOAD:
                raise self._fail(f"unexpected SDO command 0x{command:02X} to an upload", data, ABORT_COMMAND)
            self._check_mux(transfer, data)
            expedited, size_indicated = bool(command & 0x02), bool(command & 0x01)
            if expedited:
                size = 4 - ((command >> 2) & 0x03) if size_indicated else 4
                self._transfer = None
                return SdoDone(transfer.index, transfer.subindex, bytes(data[4 : 4 + size]))
            (size,) = struct.unpack_from("<I", data, 4)
            if size_indicated and size > MAX_SDO_BYTES:
                raise self._fail(f"object of {size} bytes is larger than {MAX_SDO_BYTES}", data, 0x05040005)
            transfer.expected_size = size if size_indicated else None
            transfer.initiated = True
            transfer.deadline_s = now + self.timeout_s
            return SdoSend(self._frame(bytes(((_CCS_UPLOAD_SEGMENT << 5) | (transfer.toggle << 4),))))
        if scs != _SCS_UPLOAD_SEGMENT:
            raise self._fail(
                f"unexpected SDO command 0x{command:02X} in a segmented upload", data, ABORT_COMMAND
            )
        toggle = (command >> 4) & 0x01
        if toggle != transfer.toggle:
            raise self._fail("SDO toggle bit not alternated", data, ABORT_TOGGLE)
        unused = (command >> 1) & 0x07
        transfer.data += data[1 : 8 - unused]
        if len(transfer.data) > MAX_SDO_BYTES:
            raise self._fail(f"segmented upload exceeds {MAX_SDO_BYTES} bytes", data, 0x05040005)
        if command & 0x01:
            self._transfer = None
            if transfer.expected_size is not None and transfer.expected_size != len(transfer.data):
                raise SdoRemoteError(
                    f"segmented upload gave {len(transfer.data)} bytes, announced {transfer.expected_size}",
                    data,
                    self._abort_frame(transfer.index, transfer.subindex, ABORT_LENGTH),
                )
            return SdoDone(transfer.index, transfer.subindex, bytes(transfer.data))
        transfer.toggle ^= 1
        transfer.deadline_s = now + self.timeout_s
        return SdoSend(self._frame(bytes(((_CCS_UPLOAD_SEGMENT << 5) | (transfer.toggle << 4),))))

    def _receive_download(self, transfer: _Transfer, data: bytes, now: float) -> SdoDone | SdoSend:
        command = data[0]
        scs = command >> 5
        if not transfer.initiated:
            if scs != _SCS_INITIATE_DOWNLOAD:
                raise self._fail(f"unexpected SDO command 0x{command:02X} to a download", data, ABORT_COMMAND)
            self._check_mux(transfer, data)
            transfer.initiated = True
            if not transfer.segmented:
                self._transfer = None
                return SdoDone(transfer.index, transfer.subindex, b"")
            return self._next_segment(transfer, now)
        if scs != _SCS_DOWNLOAD_SEGMENT:
            raise self._fail(
                f"unexpected SDO command 0x{command:02X} in a segmented download", data, ABORT_COMMAND
            )
        if (command >> 4) & 0x01 != transfer.toggle:
            raise self._fail("SDO toggle bit not alternated", data, ABORT_TOGGLE)
        if transfer.offset >= len(transfer.data):
            self._transfer = None
            return SdoDone(transfer.index, transfer.subindex, b"")
        transfer.toggle ^= 1
        return self._next_segment(transfer, now)

    def _next_segment(self, transfer: _Transfer, now: float) -> SdoSend:
        chunk = bytes(transfer.data[transfer.offset : transfer.offset + 7])
        transfer.offset += len(chunk)
        last = transfer.offset >= len(transfer.data)
        command = (_CCS_DOWNLOAD_SEGMENT << 5) | (transfer.toggle << 4) | ((7 - len(chunk)) << 1) | int(last)
        transfer.deadline_s = now + self.timeout_s
        return SdoSend(self._frame(bytes((command,)) + chunk))


# -- data types and PDO mapping ---------------------------------------------------------------


class DataType(enum.StrEnum):
    """CANopen basic data types as named in commands (``u16``, ``i32``...)."""

    BOOL = "bool"
    I8 = "i8"
    I16 = "i16"
    I32 = "i32"
    U8 = "u8"
    U16 = "u16"
    U32 = "u32"
    I64 = "i64"
    U64 = "u64"
    F32 = "f32"
    STR = "str"
    BYTES = "bytes"


_STRUCT_CODES: dict[DataType, str] = {
    DataType.BOOL: "B",
    DataType.I8: "b",
    DataType.I16: "h",
    DataType.I32: "i",
    DataType.U8: "B",
    DataType.U16: "H",
    DataType.U32: "I",
    DataType.I64: "q",
    DataType.U64: "Q",
    DataType.F32: "f",
}

KNOWN_OBJECTS: dict[tuple[int, int], DataType] = {
    (0x1000, 0): DataType.U32,
    (0x1001, 0): DataType.U8,
    (0x1008, 0): DataType.STR,
    (0x1009, 0): DataType.STR,
    (0x100A, 0): DataType.STR,
    (0x1017, 0): DataType.U16,
    (0x1018, 1): DataType.U32,
    (0x1018, 2): DataType.U32,
    (0x1018, 3): DataType.U32,
    (0x1018, 4): DataType.U32,
    (0x603F, 0): DataType.U16,
    (0x6040, 0): DataType.U16,
    (0x6041, 0): DataType.U16,
    (0x605A, 0): DataType.I16,
    (0x6060, 0): DataType.I8,
    (0x6061, 0): DataType.I8,
    (0x6062, 0): DataType.I32,
    (0x6064, 0): DataType.I32,
    (0x606C, 0): DataType.I32,
    (0x6071, 0): DataType.I16,
    (0x6077, 0): DataType.I16,
    (0x6078, 0): DataType.I16,
    (0x607A, 0): DataType.I32,
    (0x6081, 0): DataType.U32,
    (0x6083, 0): DataType.U32,
    (0x6084, 0): DataType.U32,
    (0x6098, 0): DataType.I8,
    (0x60FD, 0): DataType.U32,
    (0x60FF, 0): DataType.I32,
    (0x6502, 0): DataType.U32,
}
"""Types of the CiA 301/402 objects a DCU reads; anything else is read as unsigned or bytes."""


def decode_value(data: bytes, data_type: DataType) -> int | float | str | bytes | bool:
    """Decode an SDO/PDO payload as ``data_type`` (little-endian)."""
    if data_type is DataType.STR:
        return data.rstrip(b"\x00").decode("latin-1")
    if data_type is DataType.BYTES:
        return bytes(data)
    fmt = "<" + _STRUCT_CODES[data_type]
    size = struct.calcsize(fmt)
    if len(data) != size:
        raise RemoteProtocolError(f"{data_type} needs {size} bytes, got {len(data)}", data)
    (value,) = struct.unpack(fmt, data)
    if data_type is DataType.BOOL:
        return bool(value)
    return value  # type: ignore[no-any-return]


def encode_value(value: int | float | str | bytes | bool, data_type: DataType) -> bytes:
    """Encode ``value`` as ``data_type`` (little-endian); LocalProtocolError when it does not fit."""
    if data_type is DataType.STR:
        if not isinstance(value, str):
            raise LocalProtocolError("str object needs a string value")
        return value.encode("latin-1", errors="strict")
    if data_type is DataType.BYTES:
        if isinstance(value, str):
            try:
                return bytes.fromhex(value)
            except ValueError as exc:
                raise LocalProtocolError(f"bytes value must be hex: {exc}") from exc
        if not isinstance(value, bytes):
            raise LocalProtocolError("bytes object needs a hex string value")
        return value
    if isinstance(value, str | bytes):
        raise LocalProtocolError(f"{data_type} needs a number, got {type(value).__name__}")
    if data_type is not DataType.F32 and (isinstance(value, float) and not value.is_integer()):
        raise LocalProtocolError(f"{data_type} needs an integer, got {value}")
    try:
        if data_type is DataType.F32:
            return struct.pack("<f", float(value))
        return struct.pack("<" + _STRUCT_CODES[data_type], int(value))
    except struct.error as exc:
        raise LocalProtocolError(f"{value} does not fit {data_type}") from exc


@dataclass(frozen=True, slots=True)
class MappedObject:
    """One entry of a PDO mapping (1A00+ sub 1..8): object, sub-index and length in bits."""

    index: int
    subindex: int
    bits: int

    @classmethod
    def from_entry(cls, entry: int) -> MappedObject:
        """Decode a mapping entry ``iiiissbb`` (index, sub-index, bit length)."""
        if not 0 <= entry <= 0xFFFFFFFF:
            raise RemoteProtocolError(f"mapping entry {entry} is not 32-bit")
        mapped = cls(entry >> 16, (entry >> 8) & 0xFF, entry & 0xFF)
        if mapped.bits == 0:
            raise RemoteProtocolError(f"mapping entry 0x{entry:08X} has length 0")
        return mapped

    def entry(self) -> int:
        """The 32-bit mapping entry."""
        return (self.index << 16) | (self.subindex << 8) | self.bits


class PdoLayout:
    """Decoder of one TPDO: the mapped objects, precompiled into one ``struct`` format when aligned."""

    def __init__(self, objects: Sequence[MappedObject]) -> None:
        if not objects or len(objects) > 8:
            raise LocalProtocolError(f"a PDO maps 1..8 objects, got {len(objects)}")
        total_bits = sum(o.bits for o in objects)
        if total_bits > 64:
            raise RemoteProtocolError(f"PDO mapping of {total_bits} bits exceeds 64")
        self.objects = tuple(objects)
        self.keys = tuple((o.index, o.subindex) for o in objects)
        self.size_bytes = (total_bits + 7) // 8
        self._struct: struct.Struct | None = None
        self._signed = tuple(_signed(o) for o in objects)
        if all(o.bits in (8, 16, 32, 64) for o in objects):
            codes = ""
            for obj in objects:
                data_type = KNOWN_OBJECTS.get((obj.index, obj.subindex))
                size_code = {8: "b", 16: "h", 32: "i", 64: "q"}[obj.bits]
                signed = data_type is not None and data_type.value.startswith("i")
                codes += size_code if signed else size_code.upper()
            self._struct = struct.Struct("<" + codes)

    def decode(self, data: bytes) -> tuple[int, ...]:
        """The mapped values in mapping order; RemoteProtocolError when the frame is too short."""
        if len(data) < self.size_bytes:
            raise RemoteProtocolError(f"PDO of {len(data)} bytes, mapping needs {self.size_bytes}", data)
        if self._struct is not None:
            return self._struct.unpack_from(data)
        raw = int.from_bytes(data[: self.size_bytes], "little")
        values: list[int] = []
        shift = 0
        for obj, signed in zip(self.objects, self._signed, strict=True):
            value = (raw >> shift) & ((1 << obj.bits) - 1)
            if signed and value & (1 << (obj.bits - 1)):
                value -= 1 << obj.bits
            values.append(value)
            shift += obj.bits
        return tuple(values)

    def encode(self, values: Sequence[int]) -> bytes:
        """The PDO payload of ``values`` in mapping order (simulators)."""
        raw = 0
        shift = 0
        for obj, value in zip(self.objects, values, strict=True):
            raw |= (int(value) & ((1 << obj.bits) - 1)) << shift
            shift += obj.bits
        return raw.to_bytes(self.size_bytes, "little")


def _signed(obj: MappedObject) -> bool:
    data_type = KNOWN_OBJECTS.get((obj.index, obj.subindex))
    return data_type is not None and data_type.value.startswith("i")


def parse_object_ref(text: str) -> MappedObject:
    """Parse a configured mapping entry: ``6041``, ``6064:00``, ``0x2000:01/16`` (bits after ``/``).

    Without ``/bits`` the length comes from the known CiA 402 object types.
    """
    spec = text.strip().lower()
    bits_text = ""
    if "/" in spec:
        spec, bits_text = spec.split("/", 1)
    index_text, _, sub_text = spec.partition(":")
    try:
        index = int(index_text.removeprefix("0x"), 16)
        subindex = int(sub_text.removeprefix("0x"), 16) if sub_text else 0
        bits = int(bits_text) if bits_text else 0
    except ValueError as exc:
        raise LocalProtocolError(f'bad object reference "{text}": {exc}') from exc
    _check_object(index, subindex)
    if not bits:
        data_type = KNOWN_OBJECTS.get((index, subindex))
        if data_type is None or data_type in (DataType.STR, DataType.BYTES):
            raise LocalProtocolError(
                f'object "{text}" has no known size; write it as {index:04X}:{subindex:02X}/bits'
            )
        bits = struct.calcsize(_STRUCT_CODES[data_type]) * 8
    if not 1 <= bits <= 64:
        raise LocalProtocolError(f'object "{text}": length {bits} bits outside 1..64')
    return MappedObject(index, subindex, bits)
