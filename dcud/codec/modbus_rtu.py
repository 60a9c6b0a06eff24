"""Modbus RTU master, sans-I/O (protocols.md section 4): CRC, requests, response framing, a transaction.

A master knows what it asked, so the length of the answer is known from its first bytes (exception:
5 bytes; read: 5 + byte count; write: 8); frames are cut by length, not by the 3.5-character silence,
which a USB adapter or a pty does not preserve. :class:`ModbusTransaction` is one request and its answer
as a session for :func:`dcud.service.session_runner.run_session`, speaking the shared actions of
:mod:`dcud.codec.actions` (``Flush``, ``Send``, ``Drain``, ``Done``, ``Failed``), so it runs on a
leased line like the meter protocols. It also keeps the 3.5 characters of silence the slave needs
between the answer and the next request (a deadline, not a sleep in the caller).

Errors: :class:`ModbusException` (a ``NegativeResponse``: the slave answered with an exception code),
``RemoteProtocolError`` (bad CRC, wrong unit or function, wrong length), ``PeerTimeout`` (no or an
incomplete answer), ``LocalProtocolError`` (a request outside the protocol's limits).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from dcud.codec.actions import Action, Done, Drain, Failed, Flush, Send
from dcud.codec.crc import crc16_reflected_8005
from dcud.errors import DcudError, LocalProtocolError, NegativeResponse, PeerTimeout, RemoteProtocolError

MAX_FRAME_BYTES = 256
MAX_READ_REGISTERS = 125
MAX_WRITE_REGISTERS = 123
BROADCAST = 0


def crc16(data: bytes) -> int:
    """CRC-16/MODBUS (init FFFF, reflected polynomial A001, no final XOR)."""
    return crc16_reflected_8005(data, 0xFFFF)


def with_crc(frame: bytes) -> bytes:
    """``frame`` followed by its CRC, low byte first."""
    return frame + crc16(frame).to_bytes(2, "little")


def crc_ok(frame: bytes) -> bool:
    """True when the CRC over the whole frame (CRC included) is zero, i.e. the frame is intact."""
    return len(frame) >= 4 and crc16(frame) == 0


class Function(enum.IntEnum):
    """The function codes a drive master uses."""

    READ_HOLDING_REGISTERS = 0x03
    READ_INPUT_REGISTERS = 0x04
    WRITE_SINGLE_REGISTER = 0x06
    WRITE_MULTIPLE_REGISTERS = 0x10


EXCEPTION_TEXTS: dict[int, str] = {
    0x01: "illegal function",
    0x02: "illegal data address",
    0x03: "illegal data value",
    0x04: "slave device failure",
    0x05: "acknowledge (processing a long command)",
    0x06: "slave device busy",
    0x08: "memory parity error",
    0x0A: "gateway path unavailable",
    0x0B: "gateway target device failed to respond",
}


class ModbusException(NegativeResponse):
    """The slave answered with an exception code."""

    def __init__(self, code: int, function: int, unit: int) -> None:
        text = EXCEPTION_TEXTS.get(code, f"exception 0x{code:02X}")
        super().__init__(code, f"Modbus unit {unit} function 0x{function:02X}: {text}")
        self.function = function
        self.unit = unit


@dataclass(frozen=True, slots=True)
class Request:
    """One request: ``count`` registers to read at ``address``, or ``values`` to write there."""

    unit: int
    function: Function
    address: int
    count: int = 0
    values: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.unit <= 247:
            raise LocalProtocolError(f"unit {self.unit} outside 0..247")
        if not 0 <= self.address <= 0xFFFF:
            raise LocalProtocolError(f"address {self.address} outside 0..65535")
        if self.function in (Function.READ_HOLDING_REGISTERS, Function.READ_INPUT_REGISTERS):
            if self.unit == BROADCAST:
                raise LocalProtocolError("a read cannot be broadcast")
            if not 1 <= self.count <= MAX_READ_REGISTERS:
                raise LocalProtocolError(f"read of {self.count} registers (1..{MAX_READ_REGISTERS})")
            last = self.address + self.count
        else:
            limit = 1 if self.function is Function.WRITE_SINGLE_REGISTER else MAX_WRITE_REGISTERS
            if not 1 <= len(self.values) <= limit:
                raise LocalProtocolError(f"write of {len(self.values)} registers (1..{limit})")
            if any(not 0 <= v <= 0xFFFF for v in self.values):
                raise LocalProtocolError("register values are 0..65535")
            last = self.address + len(self.values)
        if last > 0x10000:
            raise LocalProtocolError(f"registers {self.address}..{last - 1} run past 65535")

    def encode(self) -> bytes:
        """The request frame, CRC included."""
        head = bytes((self.unit, int(self.function)))
        if self.function in (Function.READ_HOLDING_REGISTERS, Function.READ_INPUT_REGISTERS):
            return with_crc(head + struct.pack(">HH", self.address, self.count))
        if self.function is Function.WRITE_SINGLE_REGISTER:
            return with_crc(head + struct.pack(">HH", self.address, self.values[0]))
        n = len(self.values)
        body = struct.pack(">HHB", self.address, n, 2 * n) + struct.pack(f">{n}H", *self.values)
        return with_crc(head + body)

    @property
    def expects_answer(self) -> bool:
        """False for broadcasts, which no slave answers."""
        return self.unit != BROADCAST


def read_registers(unit: int, address: int, count: int, *, input_registers: bool = False) -> Request:
    """Read ``count`` holding (03) or input (04) registers."""
    function = Function.READ_INPUT_REGISTERS if input_registers else Function.READ_HOLDING_REGISTERS
    return Request(unit, function, address, count=count)


def write_register(unit: int, address: int, value: int) -> Request:
    """Write one holding register (06)."""
    return Request(unit, Function.WRITE_SINGLE_REGISTER, address, values=(value,))


def write_registers(unit: int, address: int, values: Sequence[int]) -> Request:
    """Write several holding registers (10)."""
    return Request(unit, Function.WRITE_MULTIPLE_REGISTERS, address, values=tuple(values))


def response_length(request: Request, data: bytes) -> int | None:
    """Length of the answer to ``request`` once ``data`` (its first bytes) tells; None: need more."""
    if len(data) < 2:
        return None
    if data[1] == int(request.function) | 0x80:
        return 5
    if request.function in (Function.READ_HOLDING_REGISTERS, Function.READ_INPUT_REGISTERS):
        return 5 + data[2] if len(data) >= 3 else None
    return 8


def decode_response(request: Request, frame: bytes) -> tuple[int, ...]:
    """The registers read (reads) or written (writes: the echoed values) from a complete answer."""
    if not crc_ok(frame):
        raise RemoteProtocolError("Modbus answer with a bad CRC", frame)
    unit, function = frame[0], frame[1]
    if unit != request.unit:
        raise RemoteProtocolError(f"Modbus answer from unit {unit}, asked unit {request.unit}", frame)
    if function == int(request.function) | 0x80:
        if len(frame) != 5:
            raise RemoteProtocolError(f"Modbus exception answer of {len(frame)} bytes", frame)
        raise ModbusException(frame[2], int(request.function), unit)
    if function != int(request.function):
        raise RemoteProtocolError(
            f"Modbus answer for function 0x{function:02X}, asked 0x{request.function:02X}", frame
        )
    if request.function in (Function.READ_HOLDING_REGISTERS, Function.READ_INPUT_REGISTERS):
        byte_count = frame[2]
        if byte_count != 2 * request.count or len(frame) != 5 + byte_count:
            raise RemoteProtocolError(
                f"Modbus read answer with {byte_count} data bytes, asked {request.count} registers", frame
            )
        return struct.unpack(f">{request.count}H", frame[3 : 3 + byte_count])
    if len(frame) != 8:
        raise RemoteProtocolError(f"Modbus write answer of {len(frame)} bytes", frame)
    address, second = struct.unpack(">HH", frame[2:6])
    expected = (
        request.values[0] if request.function is Function.WRITE_SINGLE_REGISTER else len(request.values)
    )
    if address != request.address or second != expected:
        raise RemoteProtocolError("Modbus write answer does not echo the request", frame)
    return request.values


def frame_time_s(size_bytes: int, baud: int, bits_per_char: int = 11) -> float:
    """Time ``size_bytes`` take on the wire (11 bits a character: start, 8 data, parity or 2nd stop, stop)."""
    if baud <= 0:
        raise LocalProtocolError(f"baud {baud} must be positive")
    return size_bytes * bits_per_char / baud


def to_signed(value: int, bits: int) -> int:
    """Two's complement of an unsigned ``bits``-wide value."""
    return value - (1 << bits) if value & (1 << (bits - 1)) else value


def join_words(high_first: bool, words: Sequence[int]) -> int:
    """Two 16-bit registers as one unsigned 32-bit value, in the device's word order."""
    if len(words) != 2:
        raise LocalProtocolError(f"need 2 registers for a 32-bit value, got {len(words)}")
    high, low = (words[0], words[1]) if high_first else (words[1], words[0])
    return (high << 16) | low


# -- the transaction session (the shared actions of dcud.codec.actions, run by session_runner) ------


class ModbusTransaction:
    """One request and its answer (module docstring).

    ``response_timeout_s`` runs from the end of the request on the wire to the first byte of the answer;
    ``inter_char_timeout_s`` bounds the gaps inside the answer (generous: adapters deliver in chunks).
    After a good answer the session ends only once ``silence_chars`` character times have passed (the
    3.5 characters that make the next request a new frame for the slave); a failure ends it at once.
    """

    def __init__(
        self,
        request: Request,
        *,
        baud: int,
        response_timeout_s: float = 0.5,
        inter_char_timeout_s: float = 0.05,
        silence_chars: int = 4,
    ) -> None:
        self.request = request
        self.frame = request.encode()
        self.baud = baud
        self.response_timeout_s = response_timeout_s
        self.inter_char_timeout_s = inter_char_timeout_s
        self.silence_chars = silence_chars
        self._buffer = bytearray()
        self._deadline: float | None = None
        self._result: tuple[int, ...] | None = None
        """The decoded answer while the session waits out the silence after it."""
        self._done = False

    def start(self, now: float) -> list[Action]:
        """Flush, send the request, drain; answer due after its wire time plus the response timeout."""
        if not self.request.expects_answer:
            self._done = True
            return [Flush(), Send(self.frame), Drain(), Done(self.request.values)]
        self._deadline = now + frame_time_s(len(self.frame), self.baud) + self.response_timeout_s
        return [Flush(), Send(self.frame), Drain()]

    def next_deadline(self) -> float | None:
        """When the answer (or its next byte) is due, or when the silence after it is over."""
        return None if self._done else self._deadline

    def receive_data(self, data: bytes, now: float) -> list[Action]:
        """Collect the answer; decode it once its length is reached, then wait out the silence."""
        if self._done or self._result is not None:
            return []  # the answer is complete: more bytes are noise, dropped by the next Flush
        self._buffer += data
        needed = response_length(self.request, bytes(self._buffer[:3]))
        if len(self._buffer) > MAX_FRAME_BYTES or (needed is not None and len(self._buffer) > needed):
            return self._fail(RemoteProtocolError("Modbus answer longer than expected", bytes(self._buffer)))
        if needed is not None and len(self._buffer) == needed:
            try:
                self._result = decode_response(self.request, bytes(self._buffer))
            except (NegativeResponse, RemoteProtocolError) as exc:
                return self._fail(exc)
            self._deadline = now + frame_time_s(self.silence_chars, self.baud)
            return []
        self._deadline = now + self.inter_char_timeout_s + frame_time_s(1, self.baud)
        return []

    def handle_timer(self, now: float) -> list[Action]:
        """The silence after the answer is over (done), or nothing (more) came in time (failed)."""
        if self._done:
            return []
        if self._result is not None:
            self._done = True
            return [Done(self._result)]
        if self._buffer:
            return self._fail(RemoteProtocolError("incomplete Modbus answer", bytes(self._buffer)))
        return self._fail(
            PeerTimeout(f"Modbus unit {self.request.unit}: no answer within {self.response_timeout_s} s")
        )

    def _fail(self, error: DcudError) -> list[Action]:
        self._done = True
        return [Failed(error)]
