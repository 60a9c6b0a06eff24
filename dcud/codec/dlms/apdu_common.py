"""What every DLMS APDU module shares (IEC 62056-5-3, Green Book 9.3-9.5), sans-I/O.

The APDU tags (plain, and their service-specific global and dedicated ciphering forms), the result
codes and their names (Data-Access-Result, Action-Result, exception-response errors), and the small
encoding pieces the xDLMS services, the ACSE and the ciphered APDUs are built from: attribute
descriptors, Get-Data-Result (:class:`AccessResult` in place of a value), block headers, octet strings,
optional flags and the per-decode bounds on the Data inside an APDU. It is the bottom of the APDU modules
(:mod:`.acse`, :mod:`.xdlms`, :mod:`.selective_access`, :mod:`.ciphered`, :mod:`.apdu`) and imports none
of them; everything public is re-exported by :mod:`.apdu`.
"""

from __future__ import annotations

from dataclasses import dataclass

from dcud.codec.dlms.axdr import Data, encode_data, read_data
from dcud.codec.dlms.obis import AttributeRef, Obis
from dcud.codec.dlms.reader import Reader, encode_length
from dcud.errors import LocalProtocolError

# ---------------------------------------------------------------------------------------------------
# Tags

TAG_INITIATE_REQUEST = 0x01
TAG_INITIATE_RESPONSE = 0x08
TAG_CONFIRMED_SERVICE_ERROR = 0x0E
TAG_AARQ = 0x60
TAG_AARE = 0x61
TAG_RLRQ = 0x62
TAG_RLRE = 0x63
TAG_GET_REQUEST = 0xC0
TAG_SET_REQUEST = 0xC1
TAG_EVENT_NOTIFICATION = 0xC2
TAG_ACTION_REQUEST = 0xC3
TAG_GET_RESPONSE = 0xC4
TAG_SET_RESPONSE = 0xC5
TAG_ACTION_RESPONSE = 0xC7
TAG_EXCEPTION_RESPONSE = 0xD8
TAG_GENERAL_GLO_CIPHERING = 0xDB
TAG_GENERAL_DED_CIPHERING = 0xDC

GLO_TAGS: dict[int, int] = {
    TAG_INITIATE_REQUEST: 0x21,
    TAG_INITIATE_RESPONSE: 0x28,
    TAG_CONFIRMED_SERVICE_ERROR: 0x2E,
    TAG_GET_REQUEST: 0xC8,
    TAG_SET_REQUEST: 0xC9,
    TAG_EVENT_NOTIFICATION: 0xCA,
    TAG_ACTION_REQUEST: 0xCB,
    TAG_GET_RESPONSE: 0xCC,
    TAG_SET_RESPONSE: 0xCD,
    TAG_ACTION_RESPONSE: 0xCF,
}
"""Plain xDLMS tag to its service-specific global-ciphering tag (glo-get-request = 0xC8...)."""
DED_TAGS: dict[int, int] = {
    TAG_INITIATE_REQUEST: 0x41,
    TAG_INITIATE_RESPONSE: 0x48,
    TAG_CONFIRMED_SERVICE_ERROR: 0x4E,
    TAG_GET_REQUEST: 0xD0,
    TAG_SET_REQUEST: 0xD1,
    TAG_EVENT_NOTIFICATION: 0xD2,
    TAG_ACTION_REQUEST: 0xD3,
    TAG_GET_RESPONSE: 0xD4,
    TAG_SET_RESPONSE: 0xD5,
    TAG_ACTION_RESPONSE: 0xD7,
}
"""Plain xDLMS tag to its dedicated-ciphering tag."""
PLAIN_TAG_OF: dict[int, int] = {v: k for k, v in GLO_TAGS.items()} | {v: k for k, v in DED_TAGS.items()}
"""A ciphered tag back to the plain tag of what it carries."""

INVOKE_ID_AND_PRIORITY = 0xC1
"""Invoke id 1, confirmed, high priority: what most clients send."""


DATA_ACCESS_RESULTS: dict[int, str] = {
    0: "success",
    1: "hardware-fault",
    2: "temporary-failure",
    3: "read-write-denied",
    4: "object-undefined",
    9: "object-class-inconsistent",
    11: "object-unavailable",
    12: "type-unmatched",
    13: "scope-of-access-violated",
    14: "data-block-unavailable",
    15: "long-get-aborted",
    16: "no-long-get-in-progress",
    17: "long-set-aborted",
    18: "no-long-set-in-progress",
    19: "data-block-number-invalid",
    250: "other-reason",
}
"""Data-Access-Result (GET and SET), and the Action-Result values, which share the numbering."""
ACTION_RESULTS: dict[int, str] = DATA_ACCESS_RESULTS | {
    15: "long-action-aborted",
    16: "no-long-action-in-progress",
}

STATE_ERRORS: dict[int, str] = {1: "service-not-allowed", 2: "service-unknown"}
SERVICE_ERRORS: dict[int, str] = {
    1: "operation-not-possible",
    2: "service-not-supported",
    3: "other-reason",
    4: "pdu-too-long",
    5: "deciphering-error",
    6: "invocation-counter-error",
}
"""ExceptionResponse service-error choices."""
SERVICE_ERROR_INVOCATION_COUNTER = 6


def result_text(code: int, table: dict[int, str] = DATA_ACCESS_RESULTS) -> str:
    """The name of a result code, or ``code N`` when the table does not know it."""
    return table.get(code, f"code {code}")


# ---------------------------------------------------------------------------------------------------
# Common parts


def _check_u8(name: str, value: int) -> None:
    if isinstance(value, bool) or not 0 <= value <= 0xFF:
        raise LocalProtocolError(f"{name} must be 0..255, not {value!r}")


def _check_u32(name: str, value: int) -> None:
    if isinstance(value, bool) or not 0 <= value <= 0xFFFF_FFFF:
        raise LocalProtocolError(f"{name} must be 0..2^32-1, not {value!r}")


def _encode_descriptor(ref: AttributeRef) -> bytes:
    return ref.class_id.to_bytes(2, "big") + ref.obis.to_bytes() + ref.index.to_bytes(1, "big", signed=True)


def _read_descriptor(reader: Reader) -> AttributeRef:
    class_id = reader.u16()
    obis = Obis.from_bytes(reader.take(6))
    return AttributeRef(class_id, obis, reader.i8())


class _Limits:
    """Bounds for the Data inside an APDU (set per decode call)."""

    __slots__ = ("max_depth", "max_elements")

    def __init__(self, max_elements: int, max_depth: int) -> None:
        self.max_elements = max_elements
        self.max_depth = max_depth


def _data(reader: Reader, limits: _Limits) -> Data:
    return read_data(reader, max_elements=limits.max_elements, max_depth=limits.max_depth)


def _read_optional(reader: Reader, what: str) -> bool:
    flag = reader.u8()
    if flag not in (0, 1):
        raise reader.error(f"{what}: optional flag {flag}, expected 0 or 1")
    return flag == 1


@dataclass(frozen=True, slots=True)
class AccessResult:
    """A Data-Access-Result (or Action-Result) in place of data: why the server gave no value."""

    code: int

    def __post_init__(self) -> None:
        _check_u8("access result", self.code)

    @property
    def text(self) -> str:
        """The result's name."""
        return result_text(self.code)


GetDataResult = Data | AccessResult
"""Get-Data-Result: the value, or why there is none."""


def _encode_get_data_result(result: GetDataResult) -> bytes:
    if isinstance(result, AccessResult):
        return bytes([1, result.code])
    return b"\x00" + encode_data(result)


def _read_get_data_result(reader: Reader, limits: _Limits) -> GetDataResult:
    choice = reader.u8()
    if choice == 0:
        return _data(reader, limits)
    if choice == 1:
        return AccessResult(reader.u8())
    raise reader.error(f"Get-Data-Result choice {choice}")


def _encode_block_header(last_block: bool, block_number: int) -> bytes:
    _check_u32("block number", block_number)
    return bytes([1 if last_block else 0]) + block_number.to_bytes(4, "big")


def _read_bool(reader: Reader) -> bool:
    return reader.u8() != 0


def _encode_octets(data: bytes) -> bytes:
    return encode_length(len(data)) + data


def _read_octets(reader: Reader) -> bytes:
    return reader.take(reader.length())


__all__ = [
    "ACTION_RESULTS",
    "DATA_ACCESS_RESULTS",
    "DED_TAGS",
    "GLO_TAGS",
    "INVOKE_ID_AND_PRIORITY",
    "PLAIN_TAG_OF",
    "SERVICE_ERRORS",
    "SERVICE_ERROR_INVOCATION_COUNTER",
    "STATE_ERRORS",
    "TAG_AARE",
    "TAG_AARQ",
    "TAG_ACTION_REQUEST",
    "TAG_ACTION_RESPONSE",
    "TAG_CONFIRMED_SERVICE_ERROR",
    "TAG_EVENT_NOTIFICATION",
    "TAG_EXCEPTION_RESPONSE",
    "TAG_GENERAL_DED_CIPHERING",
    "TAG_GENERAL_GLO_CIPHERING",
    "TAG_GET_REQUEST",
    "TAG_GET_RESPONSE",
    "TAG_INITIATE_REQUEST",
    "TAG_INITIATE_RESPONSE",
    "TAG_RLRE",
    "TAG_RLRQ",
    "TAG_SET_REQUEST",
    "TAG_SET_RESPONSE",
    "AccessResult",
    "GetDataResult",
    "result_text",
]
