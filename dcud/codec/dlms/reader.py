"""The byte reader under every DLMS decoder (A-XDR data, xDLMS and ACSE APDUs), sans-I/O.

:class:`Reader` is a bounds-checked cursor over received bytes: every read that the input cannot satisfy
raises :class:`~dcud.errors.RemoteProtocolError` naming the position, so no decoder indexes bytes by hand.
:func:`encode_length` is its writing counterpart, the BER definite length used before strings, element
counts and ACSE fields. It is a module of its own because the A-XDR data codec (:mod:`.axdr`), the
APDU modules and the ACSE BER fields all build on it, and it depends on none of them.
"""

from __future__ import annotations

from dcud.errors import LocalProtocolError, RemoteProtocolError

MAX_LENGTH_BYTES = 4
"""Long-form length: at most four length bytes (lengths up to 2^32 - 1)."""


class Reader:
    """A cursor over received bytes: every read checks the bounds and raises RemoteProtocolError."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, pos: int = 0, what: str = "APDU") -> None:
        self.data = bytes(data)
        self.pos = pos
        self.what = what

    def error(self, message: str) -> RemoteProtocolError:
        """A RemoteProtocolError naming the position, carrying the whole input."""
        return RemoteProtocolError(f"{self.what}: {message} at byte {self.pos}", self.data)

    @property
    def remaining(self) -> int:
        """Bytes not read yet."""
        return len(self.data) - self.pos

    def at_end(self) -> bool:
        """True once every byte is read."""
        return self.pos >= len(self.data)

    def take(self, size: int) -> bytes:
        """The next ``size`` bytes."""
        if size < 0 or size > self.remaining:
            raise self.error(f"needs {size} more bytes, has {self.remaining}")
        out = self.data[self.pos : self.pos + size]
        self.pos += size
        return out

    def peek(self) -> int:
        """The next byte without consuming it."""
        if self.pos >= len(self.data):
            raise self.error("ends early")
        return self.data[self.pos]

    def u8(self) -> int:
        """One unsigned byte."""
        if self.pos >= len(self.data):
            raise self.error("ends early")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def i8(self) -> int:
        """One signed byte."""
        value = self.u8()
        return value - 0x100 if value & 0x80 else value

    def u16(self) -> int:
        """Unsigned 16 bits, big-endian."""
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        """Unsigned 32 bits, big-endian."""
        return int.from_bytes(self.take(4), "big")

    def length(self) -> int:
        """A BER definite length (short form, or 0x81..0x84 and that many bytes)."""
        first = self.u8()
        if first < 0x80:
            return first
        count = first & 0x7F
        if count == 0 or count > MAX_LENGTH_BYTES:
            raise self.error(f"unsupported length form 0x{first:02X}")
        return int.from_bytes(self.take(count), "big")

    def counted(self, min_item_bytes: int = 1) -> int:
        """An element count that the remaining input can actually hold (guards allocation)."""
        count = self.length()
        if min_item_bytes > 0 and count * min_item_bytes > self.remaining:
            raise self.error(f"claims {count} elements but only {self.remaining} bytes follow")
        return count

    def expect_end(self) -> None:
        """Refuse trailing bytes."""
        if not self.at_end():
            raise self.error(f"{self.remaining} unexpected trailing bytes")


def encode_length(length: int) -> bytes:
    """BER definite length: one byte below 128, else 0x81..0x84 and the big-endian length."""
    if length < 0:
        raise LocalProtocolError(f"negative length {length}")
    if length < 0x80:
        return bytes([length])
    size = (length.bit_length() + 7) // 8
    if size > MAX_LENGTH_BYTES:
        raise LocalProtocolError(f"length {length} too large to encode")
    return bytes([0x80 | size]) + length.to_bytes(size, "big")


__all__ = ["MAX_LENGTH_BYTES", "Reader", "encode_length"]
