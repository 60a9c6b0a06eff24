"""OBIS codes (IEC 62056-6-1) and COSEM attribute/method references, parsed and formatted.

An OBIS code is six values A.B.C.D.E.F (0..255); dcud writes it ``1.0.1.8.0.255`` (the form MQTT
``values[].id`` carries) and reads also the IEC 62056-6-1 display form ``1-0:1.8.0*255`` and its variants
(``1-0:1.8.0.255``, ``1-0:1.8.0`` with F = 255). A COSEM attribute is named ``class/obis/attribute``
(``3/1.0.1.8.0.255/2``), the form ``dcud.toml`` uses in ``[meter.dlms] objects``.

Parsing a malformed string raises :class:`ObisError` (a LocalProtocolError that is also a ValueError, so
configuration decoders report it as a bad value).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dcud.errors import LocalProtocolError


class ObisError(LocalProtocolError, ValueError):
    """A string is not an OBIS code or attribute reference."""


_DISPLAY = re.compile(
    r"^\s*(\d{1,3})-(\d{1,3}):(\d{1,3})\.(\d{1,3})\.(\d{1,3})(?:[.*&](\d{1,3}))?\s*$",
)
_DOTTED = re.compile(r"^\s*(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\s*$")


@dataclass(frozen=True, slots=True, order=True)
class Obis:
    """One OBIS code; ``str()`` gives ``A.B.C.D.E.F``."""

    a: int
    b: int
    c: int
    d: int
    e: int
    f: int = 255

    def __post_init__(self) -> None:
        for name in ("a", "b", "c", "d", "e", "f"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
                raise ObisError(f"OBIS value group {name.upper()} must be 0..255, not {value!r}")

    @classmethod
    def parse(cls, text: str) -> Obis:
        """From ``1.0.1.8.0.255``, ``1-0:1.8.0*255``, ``1-0:1.8.0.255`` or ``1-0:1.8.0`` (F = 255)."""
        match = _DOTTED.match(text) or _DISPLAY.match(text)
        if match is None:
            raise ObisError(f"{text!r} is not an OBIS code (expected A.B.C.D.E.F or A-B:C.D.E*F)")
        groups = [255 if g is None else int(g) for g in match.groups()]
        return cls(*groups)

    @classmethod
    def from_bytes(cls, data: bytes) -> Obis:
        """From the six bytes of a logical name."""
        if len(data) != 6:
            raise ObisError(f"a logical name has 6 bytes, not {len(data)}")
        return cls(*data)

    def to_bytes(self) -> bytes:
        """The six bytes of the logical name."""
        return bytes((self.a, self.b, self.c, self.d, self.e, self.f))

    def display(self) -> str:
        """The IEC 62056-6-1 display form ``A-B:C.D.E*F``."""
        return f"{self.a}-{self.b}:{self.c}.{self.d}.{self.e}*{self.f}"

    def __str__(self) -> str:
        return f"{self.a}.{self.b}.{self.c}.{self.d}.{self.e}.{self.f}"


@dataclass(frozen=True, slots=True)
class AttributeRef:
    """A COSEM attribute (or, for ACTION, a method): interface class, logical name, index.

    ``str()`` gives ``class/obis/index``; :meth:`parse` also takes a bare OBIS code with ``default_class``
    and ``default_index`` when given (the configuration's short form, resolved later from the object list).
    """

    class_id: int
    obis: Obis
    index: int

    def __post_init__(self) -> None:
        if isinstance(self.class_id, bool) or not 0 <= self.class_id <= 0xFFFF:
            raise ObisError(f"interface class must be 0..65535, not {self.class_id!r}")
        if isinstance(self.index, bool) or not -128 <= self.index <= 127:
            raise ObisError(f"attribute/method index must be -128..127, not {self.index!r}")

    @classmethod
    def parse(cls, text: str) -> AttributeRef:
        """From ``3/1.0.1.8.0.255/2`` (the OBIS part in any form :meth:`Obis.parse` takes)."""
        parts = text.strip().split("/")
        if len(parts) != 3:
            raise ObisError(f"{text!r} is not class/obis/attribute (e.g. 3/1.0.1.8.0.255/2)")
        try:
            class_id, index = int(parts[0]), int(parts[2])
        except ValueError:
            raise ObisError(f"{text!r}: class and attribute must be numbers") from None
        return cls(class_id, Obis.parse(parts[1]), index)

    def __str__(self) -> str:
        return f"{self.class_id}/{self.obis}/{self.index}"


__all__ = ["AttributeRef", "Obis", "ObisError"]
