"""RFC 2217 (Telnet COM Port Control Option) access-server side, sans-I/O.

For head-end tools that drive a remote serial port themselves (pyserial's ``rfc2217://``, many DLMS
clients), a transparent port can speak Telnet with the COM-PORT-OPTION (44) instead of raw TCP. This
module is the protocol only: bytes in, events out.

- :meth:`Rfc2217Server.greeting` is what the server sends first (WILL/DO BINARY, WILL SGA,
  DO COM-PORT-OPTION);
- :meth:`Rfc2217Server.receive` splits the client's stream into :class:`ClientData` (the serial payload,
  ``IAC IAC`` already undone), :class:`Reply` (negotiation answers to send back as they are) and
  :class:`PortRequest` (a COM-PORT-OPTION command: set the rate, framing, purge...). The I/O layer
  carries the request out and answers with :meth:`Rfc2217Server.reply` carrying the value in force;
- :func:`escape` doubles ``IAC`` in serial data going to the client.

Option negotiation follows RFC 854/1143 loosely: BINARY, SGA and COM-PORT-OPTION are accepted both ways,
everything else refused once; an answer is sent only when an option's state changes, so two polite
peers never loop. Unknown Telnet commands (NOP, AYT, BRK...) are ignored. Nothing here raises on input:
a Telnet stream cannot be malformed in a way that matters, and the session must keep running.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

__all__ = [
    "COM_PORT_OPTION",
    "ClientData",
    "PortRequest",
    "Reply",
    "Rfc2217Event",
    "Rfc2217Server",
    "escape",
    "framing_from_settings",
]

IAC = 255
DONT = 254
DO = 253
WONT = 252
WILL = 251
SB = 250
SE = 240
BINARY = 0
ECHO = 1
SGA = 3
COM_PORT_OPTION = 44

SIGNATURE = 0
SET_BAUDRATE = 1
SET_DATASIZE = 2
SET_PARITY = 3
SET_STOPSIZE = 4
SET_CONTROL = 5
NOTIFY_LINESTATE = 6
NOTIFY_MODEMSTATE = 7
FLOWCONTROL_SUSPEND = 8
FLOWCONTROL_RESUME = 9
SET_LINESTATE_MASK = 10
SET_MODEMSTATE_MASK = 11
PURGE_DATA = 12
SERVER_OFFSET = 100
"""A server's answer to command ``c`` carries command ``c + 100``."""

PARITY_CODES = {"N": 1, "O": 2, "E": 3, "M": 4, "S": 5}
PARITY_LETTERS = {code: letter for letter, code in PARITY_CODES.items()}

_ACCEPTED = frozenset({BINARY, SGA, COM_PORT_OPTION})
_MAX_SUBNEG_BYTES = 64
_IAC_BYTE = bytes([IAC])


@dataclass(frozen=True, slots=True)
class ClientData:
    """Serial payload from the client (Telnet escaping removed)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Reply:
    """Bytes to send to the client as they are (negotiation)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class PortRequest:
    """A COM-PORT-OPTION command from the client: ``command`` (1 = SET-BAUDRATE...) and raw ``value``."""

    command: int
    value: bytes

    @property
    def number(self) -> int:
        """The value as an unsigned big-endian number (0 for an empty value)."""
        return int.from_bytes(self.value, "big") if self.value else 0


Rfc2217Event = ClientData | Reply | PortRequest


def escape(data: bytes) -> bytes:
    """Serial data for the Telnet stream: every ``IAC`` doubled."""
    return data.replace(_IAC_BYTE, b"\xff\xff") if IAC in data else data


def framing_from_settings(framing: str, data_bits: int = 0, parity: int = 0, stop_bits: int = 0) -> str:
    """``framing`` (``"8N1"``) with the RFC 2217 data size, parity code and stop size applied (0 = keep)."""
    bits, letter, stop = framing[0], framing[1], framing[2]
    if 5 <= data_bits <= 8:
        bits = str(data_bits)
    if parity in PARITY_LETTERS:
        letter = PARITY_LETTERS[parity]
    if stop_bits in (1, 2):
        stop = str(stop_bits)
    return f"{bits}{letter}{stop}"


@dataclass
class Rfc2217Server:
    """Telnet + COM-PORT-OPTION state of one client connection (see the module docstring)."""

    signature: str = "dcud"
    _mode: int = 0  # 0 data, 1 after IAC, 2 after WILL/WONT/DO/DONT, 3 in SB, 4 IAC inside SB
    _verb: int = 0
    _sub: bytearray = field(default_factory=bytearray)
    _us: set[int] = field(default_factory=set)
    _him: set[int] = field(default_factory=set)
    _asked_us: set[int] = field(default_factory=set)
    _asked_him: set[int] = field(default_factory=set)
    _refused: set[tuple[int, int]] = field(default_factory=set)

    def greeting(self) -> bytes:
        """What the server sends when the connection opens."""
        self._asked_us |= {BINARY, SGA}
        self._asked_him |= {BINARY, COM_PORT_OPTION}
        return bytes([IAC, WILL, BINARY, IAC, DO, BINARY, IAC, WILL, SGA, IAC, DO, COM_PORT_OPTION])

    @property
    def com_port_active(self) -> bool:
        """Whether the client agreed to COM-PORT-OPTION (it may then send port requests)."""
        return COM_PORT_OPTION in self._him or COM_PORT_OPTION in self._us

    def receive(self, data: bytes) -> list[Rfc2217Event]:
        """Split a chunk of the client's stream into events (see the module docstring)."""
        if self._mode == 0 and IAC not in data:
            return [ClientData(data)] if data else []
        events: list[Rfc2217Event] = []
        payload = bytearray()
        i = 0
        n = len(data)
        while i < n:
            mode = self._mode
            if mode == 0:
                j = data.find(_IAC_BYTE, i)
                if j < 0:
                    payload += data[i:]
                    break
                payload += data[i:j]
                self._mode = 1
                i = j + 1
                continue
            byte = data[i]
            i += 1
            if mode == 1:
                if byte == IAC:
                    payload.append(IAC)
                    self._mode = 0
                elif byte in (WILL, WONT, DO, DONT):
                    self._verb = byte
                    self._mode = 2
                elif byte == SB:
                    self._sub.clear()
                    self._mode = 3
                else:
                    self._mode = 0  # NOP, AYT, BRK, GA...: nothing to do for a serial port
            elif mode == 2:
                self._mode = 0
                answer = self._negotiate(self._verb, byte)
                if answer:
                    if payload:
                        events.append(ClientData(bytes(payload)))
                        payload.clear()
                    events.append(Reply(answer))
            elif mode == 3:
                if byte == IAC:
                    self._mode = 4
                elif len(self._sub) < _MAX_SUBNEG_BYTES:
                    self._sub.append(byte)
            else:  # IAC inside a subnegotiation
                if byte == IAC:
                    if len(self._sub) < _MAX_SUBNEG_BYTES:
                        self._sub.append(IAC)
                    self._mode = 3
                    continue
                self._mode = 0
                if byte == SE and len(self._sub) >= 2 and self._sub[0] == COM_PORT_OPTION:
                    if payload:
                        events.append(ClientData(bytes(payload)))
                        payload.clear()
                    events.append(PortRequest(self._sub[1], bytes(self._sub[2:])))
                self._sub.clear()
        if payload:
            events.append(ClientData(bytes(payload)))
        return events

    def reply(self, command: int, value: bytes | int, size: int = 1) -> bytes:
        """The server's answer to ``command`` carrying ``value`` (an int is packed big-endian in ``size``)."""
        raw = value if isinstance(value, bytes) else value.to_bytes(size, "big")
        body = bytes([COM_PORT_OPTION, command + SERVER_OFFSET]) + raw
        return bytes([IAC, SB]) + escape(body) + bytes([IAC, SE])

    def baud_reply(self, baud: int) -> bytes:
        """SET-BAUDRATE answer (4-byte rate)."""
        return self.reply(SET_BAUDRATE, struct.pack("!I", baud))

    def signature_reply(self) -> bytes:
        """Answer to a SIGNATURE query."""
        return self.reply(SIGNATURE, self.signature.encode("ascii", "replace"))

    def _negotiate(self, verb: int, option: int) -> bytes:
        if verb == WILL:
            if option not in _ACCEPTED:
                return self._refuse(DONT, option)
            if option in self._him:
                return b""
            self._him.add(option)
            if option in self._asked_him:
                return b""
            return bytes([IAC, DO, option])
        if verb == DO:
            if option not in _ACCEPTED:
                return self._refuse(WONT, option)
            if option in self._us:
                return b""
            self._us.add(option)
            if option in self._asked_us:
                return b""
            return bytes([IAC, WILL, option])
        if verb == WONT:
            self._asked_him.discard(option)
            if option in self._him:
                self._him.discard(option)
                return bytes([IAC, DONT, option])
            return b""
        self._asked_us.discard(option)  # DONT
        if option in self._us:
            self._us.discard(option)
            return bytes([IAC, WONT, option])
        return b""

    def _refuse(self, verb: int, option: int) -> bytes:
        if (verb, option) in self._refused:
            return b""
        self._refused.add((verb, option))
        return bytes([IAC, verb, option])
