"""Selective access of DLMS/COSEM GET and SET (IEC 62056-5-3), sans-I/O.

:class:`AccessSelection` is the selector (1 = by range, 2 = by entry) with its parameters, and
:class:`AttributeWithSelection` an attribute descriptor with an optional one (the items of the
-with-list services). Apart from the services because it is what a profile read is built on: the COSEM
layer (:mod:`.cosem`, range and entry descriptors) needs it without the rest of the APDUs.
"""

from __future__ import annotations

from dataclasses import dataclass

from dcud.codec.dlms.apdu_common import (
    _check_u8,
    _data,
    _encode_descriptor,
    _Limits,
    _read_descriptor,
    _read_optional,
)
from dcud.codec.dlms.axdr import Data, encode_data
from dcud.codec.dlms.obis import AttributeRef
from dcud.codec.dlms.reader import Reader


@dataclass(frozen=True, slots=True)
class AccessSelection:
    """Selective access: the selector (1 = by range, 2 = by entry for profiles) and its parameters."""

    selector: int
    parameters: Data

    def __post_init__(self) -> None:
        _check_u8("access selector", self.selector)

    def encode(self) -> bytes:
        """The selector byte and the parameters."""
        return bytes([self.selector]) + encode_data(self.parameters)


@dataclass(frozen=True, slots=True)
class AttributeWithSelection:
    """An attribute descriptor with optional selective access (the items of the -with-list services)."""

    attribute: AttributeRef
    access: AccessSelection | None = None

    def encode(self) -> bytes:
        """Descriptor, then 00 or 01 and the access selection."""
        return _encode_descriptor(self.attribute) + _encode_access(self.access)


def _encode_access(access: AccessSelection | None) -> bytes:
    return b"\x00" if access is None else b"\x01" + access.encode()


def _read_access(reader: Reader, limits: _Limits) -> AccessSelection | None:
    if not _read_optional(reader, "access selection"):
        return None
    selector = reader.u8()
    return AccessSelection(selector, _data(reader, limits))


def _read_with_selection(reader: Reader, limits: _Limits) -> AttributeWithSelection:
    attribute = _read_descriptor(reader)
    return AttributeWithSelection(attribute, _read_access(reader, limits))


__all__ = [
    "AccessSelection",
    "AttributeWithSelection",
]
