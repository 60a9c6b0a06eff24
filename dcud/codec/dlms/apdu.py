"""xDLMS and ACSE APDUs of DLMS/COSEM (IEC 62056-5-3, Green Book 9.3-9.5), sans-I/O, both directions.

Every APDU a client or a server sends is a frozen dataclass with ``encode()``; :func:`decode_apdu` turns
received bytes into one of them. The client's and the server's side are both complete, so the same code
serves dcud's client session, its meter simulator and the test peers:

- ACSE (BER): :class:`AARQ`, :class:`AARE`, :class:`RLRQ`, :class:`RLRE`, whose user-information carries
  an xDLMS :class:`InitiateRequest` / :class:`InitiateResponse` / :class:`ConfirmedServiceError` (or their
  ciphered form, a :class:`CipheredApdu` with the glo-initiate tags);
- GET (normal, next block, with list) and its responses (normal, with data block, with list);
- SET (normal, with first / next data block, with list) and its responses;
- ACTION (normal, next parameter block, with list, with first / next parameter block) and its responses;
- :class:`ExceptionResponse`, :class:`ConfirmedServiceError`;
- the ciphered forms: service-specific global and dedicated ciphering (:class:`CipheredApdu`, tags
  ``glo-*`` / ``ded-*``) and :class:`GeneralCiphering` (general-glo / general-ded-ciphering).

Malformed input raises :class:`~dcud.errors.RemoteProtocolError` and nothing else; building an APDU with
out-of-range fields raises :class:`~dcud.errors.LocalProtocolError`. Passwords and dedicated keys are left
out of ``repr()``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar

from dcud.codec.dlms.axdr import (
    MAX_DEPTH,
    MAX_ELEMENTS,
    Data,
    Reader,
    encode_data,
    encode_length,
    read_data,
)
from dcud.codec.dlms.obis import AttributeRef, Obis
from dcud.errors import LocalProtocolError, RemoteProtocolError

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

DLMS_VERSION = 6
VAA_NAME_LN = 0x0007
"""InitiateResponse vaa-name of logical-name referencing."""

OID_PREFIX_CONTEXT = bytes.fromhex("60857405080101")[:-1]
"""2.16.756.5.8.1: the application context names; the last arc picks the context."""
OID_PREFIX_MECHANISM = bytes.fromhex("60857405080201")[:-1]
"""2.16.756.5.8.2: the authentication mechanism names."""


class ApplicationContext(enum.IntEnum):
    """Application context names (the last arc of 2.16.756.5.8.1.x)."""

    LN = 1
    SN = 2
    LN_CIPHERING = 3
    SN_CIPHERING = 4


class Mechanism(enum.IntEnum):
    """Authentication mechanism names (the last arc of 2.16.756.5.8.2.x)."""

    NONE = 0
    LLS = 1
    HLS = 2
    HLS_MD5 = 3
    HLS_SHA1 = 4
    HLS_GMAC = 5
    HLS_SHA256 = 6
    HLS_ECDSA = 7


class AssociationResult(enum.IntEnum):
    """AARE result."""

    ACCEPTED = 0
    REJECTED_PERMANENT = 1
    REJECTED_TRANSIENT = 2


DIAGNOSTIC_SOURCE_USER = 1
DIAGNOSTIC_SOURCE_PROVIDER = 2

ACSE_USER_DIAGNOSTICS: dict[int, str] = {
    0: "null",
    1: "no-reason-given",
    2: "application-context-name-not-supported",
    3: "calling-AP-title-not-recognized",
    4: "calling-AP-invocation-identifier-not-recognized",
    5: "calling-AE-qualifier-not-recognized",
    6: "calling-AE-invocation-identifier-not-recognized",
    7: "called-AP-title-not-recognized",
    8: "called-AP-invocation-identifier-not-recognized",
    9: "called-AE-qualifier-not-recognized",
    10: "called-AE-invocation-identifier-not-recognized",
    11: "authentication-mechanism-name-not-recognised",
    12: "authentication-mechanism-name-required",
    13: "authentication-failure",
    14: "authentication-required",
}
"""result-source-diagnostic values of the ACSE service user."""
ACSE_PROVIDER_DIAGNOSTICS: dict[int, str] = {0: "null", 1: "no-reason-given", 2: "no-common-acse-version"}
DIAGNOSTIC_AUTHENTICATION_FAILURE = 13
DIAGNOSTIC_AUTHENTICATION_REQUIRED = 14

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

CONFIRMED_SERVICES: dict[int, str] = {
    1: "initiate",
    2: "get-status",
    3: "get-name-list",
    5: "read",
    6: "write",
}
SERVICE_ERROR_CLASSES: dict[int, str] = {
    0: "application-reference",
    1: "hardware-resource",
    2: "vde-state-error",
    3: "service",
    4: "definition",
    5: "access",
    6: "initiate",
    7: "load-data-set",
    8: "change-scope",
    9: "task",
    10: "other",
}
"""ConfirmedServiceError ServiceError choices (each carries an enumerated code)."""
INITIATE_ERRORS: dict[int, str] = {
    0: "other",
    1: "dlms-version-too-low",
    2: "incompatible-conformance",
    3: "pdu-size-too-short",
    4: "refused-by-the-VDE-Handler",
}


def result_text(code: int, table: dict[int, str] = DATA_ACCESS_RESULTS) -> str:
    """The name of a result code, or ``code N`` when the table does not know it."""
    return table.get(code, f"code {code}")


class Conformance(enum.IntFlag):
    """The xDLMS conformance block (24 bits; bit 0 of the standard is the most significant)."""

    GENERAL_PROTECTION = 1 << 22
    GENERAL_BLOCK_TRANSFER = 1 << 21
    READ = 1 << 20
    WRITE = 1 << 19
    UNCONFIRMED_WRITE = 1 << 18
    DELTA_VALUE_ENCODING = 1 << 17
    ATTRIBUTE0_SUPPORTED_WITH_SET = 1 << 15
    PRIORITY_MGMT_SUPPORTED = 1 << 14
    ATTRIBUTE0_SUPPORTED_WITH_GET = 1 << 13
    BLOCK_TRANSFER_WITH_GET_OR_READ = 1 << 12
    BLOCK_TRANSFER_WITH_SET_OR_WRITE = 1 << 11
    BLOCK_TRANSFER_WITH_ACTION = 1 << 10
    MULTIPLE_REFERENCES = 1 << 9
    INFORMATION_REPORT = 1 << 8
    DATA_NOTIFICATION = 1 << 7
    ACCESS = 1 << 6
    PARAMETERIZED_ACCESS = 1 << 5
    GET = 1 << 4
    SET = 1 << 3
    SELECTIVE_ACCESS = 1 << 2
    EVENT_NOTIFICATION = 1 << 1
    ACTION = 1 << 0


CLIENT_CONFORMANCE = (
    Conformance.BLOCK_TRANSFER_WITH_GET_OR_READ
    | Conformance.BLOCK_TRANSFER_WITH_SET_OR_WRITE
    | Conformance.BLOCK_TRANSFER_WITH_ACTION
    | Conformance.MULTIPLE_REFERENCES
    | Conformance.GET
    | Conformance.SET
    | Conformance.SELECTIVE_ACCESS
    | Conformance.ACTION
)
"""What dcud's client proposes (0x001E1D): LN services with block transfer, lists and selective access."""


def _encode_conformance(value: int) -> bytes:
    # [APPLICATION 31] IMPLICIT BIT STRING (SIZE(24)): tag 5F 1F, length 4, no unused bits, 3 bytes.
    return b"\x5f\x1f\x04\x00" + (int(value) & 0xFFFFFF).to_bytes(3, "big")


def _read_conformance(reader: Reader) -> Conformance:
    if reader.take(2) != b"\x5f\x1f":
        raise reader.error("conformance block tag 5F1F expected")
    if reader.u8() != 4:
        raise reader.error("conformance block is not 4 bytes")
    reader.u8()  # unused-bits count: the 24 bits fill the 3 bytes, some servers send 0, some 8
    return Conformance(int.from_bytes(reader.take(3), "big"))


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


def _read_access(reader: Reader, limits: _Limits) -> AccessSelection | None:
    if not _read_optional(reader, "access selection"):
        return None
    selector = reader.u8()
    return AccessSelection(selector, _data(reader, limits))


def _read_with_selection(reader: Reader, limits: _Limits) -> AttributeWithSelection:
    attribute = _read_descriptor(reader)
    return AttributeWithSelection(attribute, _read_access(reader, limits))


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


# ---------------------------------------------------------------------------------------------------
# xDLMS initiate (carried in the AARQ / AARE user-information)


@dataclass(frozen=True, slots=True)
class InitiateRequest:
    """xDLMS InitiateRequest: what the client proposes (conformance, its max receive PDU size)."""

    conformance: Conformance = CLIENT_CONFORMANCE
    max_receive_pdu_size: int = 0xFFFF
    dlms_version: int = DLMS_VERSION
    dedicated_key: bytes | None = field(default=None, repr=False)
    response_allowed: bool = True
    quality_of_service: int | None = None

    TAG: ClassVar[int] = TAG_INITIATE_REQUEST

    def __post_init__(self) -> None:
        if not 0 <= self.max_receive_pdu_size <= 0xFFFF:
            raise LocalProtocolError(f"max receive PDU size {self.max_receive_pdu_size} out of range")
        _check_u8("DLMS version", self.dlms_version)
        if self.quality_of_service is not None and not -128 <= self.quality_of_service <= 127:
            raise LocalProtocolError(f"quality of service {self.quality_of_service} out of range")

    def encode(self) -> bytes:
        """The A-XDR bytes (tag 01)."""
        out = bytearray([self.TAG])
        out += b"\x00" if self.dedicated_key is None else b"\x01" + _encode_octets(self.dedicated_key)
        out += b"\x00" if self.response_allowed else b"\x01\x00"
        out += b"\x00" if self.quality_of_service is None else bytes([1, self.quality_of_service & 0xFF])
        out.append(self.dlms_version)
        out += _encode_conformance(self.conformance)
        out += self.max_receive_pdu_size.to_bytes(2, "big")
        return bytes(out)

    @classmethod
    def read(cls, reader: Reader) -> InitiateRequest:
        """Decode after the tag byte."""
        dedicated_key = _read_octets(reader) if _read_optional(reader, "dedicated-key") else None
        response_allowed = _read_bool(reader) if _read_optional(reader, "response-allowed") else True
        qos = reader.i8() if _read_optional(reader, "quality-of-service") else None
        version = reader.u8()
        conformance = _read_conformance(reader)
        return cls(conformance, reader.u16(), version, dedicated_key, response_allowed, qos)


@dataclass(frozen=True, slots=True)
class InitiateResponse:
    """xDLMS InitiateResponse: what the server grants (conformance, its max receive PDU size)."""

    conformance: Conformance
    max_receive_pdu_size: int
    dlms_version: int = DLMS_VERSION
    quality_of_service: int | None = None
    vaa_name: int = VAA_NAME_LN

    TAG: ClassVar[int] = TAG_INITIATE_RESPONSE

    def __post_init__(self) -> None:
        if not 0 <= self.max_receive_pdu_size <= 0xFFFF:
            raise LocalProtocolError(f"max receive PDU size {self.max_receive_pdu_size} out of range")
        _check_u8("DLMS version", self.dlms_version)
        if self.quality_of_service is not None and not -128 <= self.quality_of_service <= 127:
            raise LocalProtocolError(f"quality of service {self.quality_of_service} out of range")

    def encode(self) -> bytes:
        """The A-XDR bytes (tag 08)."""
        out = bytearray([self.TAG])
        out += b"\x00" if self.quality_of_service is None else bytes([1, self.quality_of_service & 0xFF])
        out.append(self.dlms_version)
        out += _encode_conformance(self.conformance)
        out += self.max_receive_pdu_size.to_bytes(2, "big")
        out += (self.vaa_name & 0xFFFF).to_bytes(2, "big")
        return bytes(out)

    @classmethod
    def read(cls, reader: Reader) -> InitiateResponse:
        """Decode after the tag byte."""
        qos = reader.i8() if _read_optional(reader, "quality-of-service") else None
        version = reader.u8()
        conformance = _read_conformance(reader)
        max_pdu = reader.u16()
        return cls(conformance, max_pdu, version, qos, reader.u16())


@dataclass(frozen=True, slots=True)
class ConfirmedServiceError:
    """confirmedServiceError: a refused service (an initiate the server cannot accept, in an AARE)."""

    service: int
    error_class: int
    error_code: int

    TAG: ClassVar[int] = TAG_CONFIRMED_SERVICE_ERROR

    def __post_init__(self) -> None:
        for name in ("service", "error_class", "error_code"):
            _check_u8(name, getattr(self, name))

    def encode(self) -> bytes:
        """The A-XDR bytes (tag 0E)."""
        return bytes([self.TAG, self.service, self.error_class, self.error_code])

    @classmethod
    def read(cls, reader: Reader) -> ConfirmedServiceError:
        """Decode after the tag byte."""
        return cls(reader.u8(), reader.u8(), reader.u8())

    @property
    def text(self) -> str:
        """``service: class: code`` in words where known."""
        error_class = SERVICE_ERROR_CLASSES.get(self.error_class, f"class {self.error_class}")
        code = INITIATE_ERRORS.get(self.error_code) if self.error_class == 6 else None
        return (
            f"{CONFIRMED_SERVICES.get(self.service, f'service {self.service}')} error: {error_class} "
            f"{code or f'code {self.error_code}'}"
        )


# ---------------------------------------------------------------------------------------------------
# ACSE (BER)


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + encode_length(len(value)) + value


def _read_tlvs(reader: Reader) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    while not reader.at_end():
        tag = reader.u8()
        if tag & 0x1F == 0x1F:
            raise reader.error(f"multi-byte BER tag 0x{tag:02X} not used by ACSE")
        out.append((tag, reader.take(reader.length())))
    return out


def _encode_oid(prefix: bytes, arc: int) -> bytes:
    _check_u8("name arc", arc)
    if arc >= 0x80:
        raise LocalProtocolError(f"name arc {arc} too large")
    return prefix + bytes([arc])


def _decode_oid(value: bytes, prefix: bytes, what: str, whole: bytes) -> int:
    if len(value) != len(prefix) + 1 or not value.startswith(prefix) or value[-1] >= 0x80:
        raise RemoteProtocolError(f"{what} is not a DLMS UA name: {value.hex()}", whole)
    return value[-1]


def _inner(value: bytes, tag: int, what: str, whole: bytes) -> bytes:
    """The contents of the one TLV with ``tag`` that fills ``value`` (explicit tagging)."""
    reader = Reader(value, what=what)
    items = _read_tlvs(reader)
    if len(items) != 1 or items[0][0] != tag:
        raise RemoteProtocolError(f"{what}: expected one element with tag 0x{tag:02X}", whole)
    return items[0][1]


def _integer(value: bytes, what: str, whole: bytes) -> int:
    if not 1 <= len(value) <= 4:
        raise RemoteProtocolError(f"{what}: integer of {len(value)} bytes", whole)
    return int.from_bytes(value, "big", signed=True)


def _encode_integer(value: int) -> bytes:
    size = max(1, (value.bit_length() + 8) // 8)
    return _tlv(0x02, value.to_bytes(size, "big", signed=True))


ACSE_REQUIREMENTS_AUTHENTICATION = b"\x07\x80"
"""sender/responder-acse-requirements BIT STRING {authentication (0)}: 7 unused bits, bit 0 set."""


def _encode_user_information(user_information: bytes | None) -> bytes:
    if user_information is None:
        return b""
    return _tlv(0xBE, _tlv(0x04, user_information))


def _decode_user_information(value: bytes, whole: bytes) -> bytes:
    return _inner(value, 0x04, "user-information", whole)


def _merge(fields: list[tuple[int, bytes]], extra: tuple[tuple[int, bytes], ...]) -> bytes:
    """Encode known fields and kept unknown ones in ascending tag-number order."""
    items = sorted([*fields, *extra], key=lambda item: item[0] & 0x1F)
    return b"".join(_tlv(tag, value) for tag, value in items)


@dataclass(frozen=True, slots=True)
class AARQ:
    """A-ASSOCIATE request. ``user_information`` is the encoded xDLMS initiate (plain or ciphered).

    ``mechanism`` present means sender-acse-requirements = authentication; ``authentication_value`` is the
    LLS password or the HLS client challenge (CtoS). ``extra`` keeps fields dcud does not interpret (as
    ``(tag, contents)``) so a decoded AARQ encodes back to the same bytes.
    """

    application_context: int = ApplicationContext.LN
    calling_ap_title: bytes | None = None
    mechanism: int | None = None
    authentication_value: bytes | None = field(default=None, repr=False)
    user_information: bytes | None = None
    extra: tuple[tuple[int, bytes], ...] = ()

    TAG: ClassVar[int] = TAG_AARQ

    def encode(self) -> bytes:
        """The BER bytes."""
        fields = [(0xA1, _tlv(0x06, _encode_oid(OID_PREFIX_CONTEXT, self.application_context)))]
        if self.calling_ap_title is not None:
            fields.append((0xA6, _tlv(0x04, self.calling_ap_title)))
        if self.mechanism is not None:
            fields.append((0x8A, ACSE_REQUIREMENTS_AUTHENTICATION))
            fields.append((0x8B, _encode_oid(OID_PREFIX_MECHANISM, self.mechanism)))
        if self.authentication_value is not None:
            fields.append((0xAC, _tlv(0x80, self.authentication_value)))
        body = _merge(fields, self.extra) + _encode_user_information(self.user_information)
        return _tlv(self.TAG, body)

    @classmethod
    def read_body(cls, body: bytes, whole: bytes) -> AARQ:
        """Decode the contents after tag and length."""
        context: int | None = None
        title = mechanism = auth = user = None
        extra: list[tuple[int, bytes]] = []
        for tag, value in _read_tlvs(Reader(body, what="AARQ")):
            if tag == 0xA1:
                context = _decode_oid(
                    _inner(value, 0x06, "application-context-name", whole),
                    OID_PREFIX_CONTEXT,
                    "application context",
                    whole,
                )
            elif tag == 0xA6:
                title = _inner(value, 0x04, "calling-AP-title", whole)
            elif tag == 0x8A:
                pass  # sender-acse-requirements: implied by mechanism-name
            elif tag == 0x8B:
                mechanism = _decode_oid(value, OID_PREFIX_MECHANISM, "mechanism-name", whole)
            elif tag == 0xAC:
                auth = _authentication_value(value, whole)
            elif tag == 0xBE:
                user = _decode_user_information(value, whole)
            else:
                extra.append((tag, value))
        if context is None:
            raise RemoteProtocolError("AARQ without application-context-name", whole)
        return cls(context, title, mechanism, auth, user, tuple(extra))


def _authentication_value(value: bytes, whole: bytes) -> bytes:
    items = _read_tlvs(Reader(value, what="authentication-value"))
    if len(items) != 1 or items[0][0] not in (0x80, 0x81):
        raise RemoteProtocolError("authentication-value: expected a charstring or bitstring", whole)
    return items[0][1]


@dataclass(frozen=True, slots=True)
class AARE:
    """A-ASSOCIATE response: result, its diagnostic, the server's system title and challenge (StoC)."""

    application_context: int = ApplicationContext.LN
    result: int = AssociationResult.ACCEPTED
    diagnostic: int = 0
    diagnostic_source: int = DIAGNOSTIC_SOURCE_USER
    responding_ap_title: bytes | None = None
    mechanism: int | None = None
    authentication_value: bytes | None = None
    user_information: bytes | None = None
    extra: tuple[tuple[int, bytes], ...] = ()

    TAG: ClassVar[int] = TAG_AARE

    def __post_init__(self) -> None:
        if self.diagnostic_source not in (DIAGNOSTIC_SOURCE_USER, DIAGNOSTIC_SOURCE_PROVIDER):
            raise LocalProtocolError(
                f"diagnostic source {self.diagnostic_source} is 1 (user) or 2 (provider)"
            )

    @property
    def diagnostic_text(self) -> str:
        """The diagnostic's name."""
        table = (
            ACSE_USER_DIAGNOSTICS
            if self.diagnostic_source == DIAGNOSTIC_SOURCE_USER
            else ACSE_PROVIDER_DIAGNOSTICS
        )
        return result_text(self.diagnostic, table)

    def encode(self) -> bytes:
        """The BER bytes."""
        diagnostic = _tlv(0xA0 | self.diagnostic_source, _encode_integer(self.diagnostic))
        fields = [
            (0xA1, _tlv(0x06, _encode_oid(OID_PREFIX_CONTEXT, self.application_context))),
            (0xA2, _encode_integer(self.result)),
            (0xA3, diagnostic),
        ]
        if self.responding_ap_title is not None:
            fields.append((0xA4, _tlv(0x04, self.responding_ap_title)))
        if self.mechanism is not None:
            fields.append((0x88, ACSE_REQUIREMENTS_AUTHENTICATION))
            fields.append((0x89, _encode_oid(OID_PREFIX_MECHANISM, self.mechanism)))
        if self.authentication_value is not None:
            fields.append((0xAA, _tlv(0x80, self.authentication_value)))
        body = _merge(fields, self.extra) + _encode_user_information(self.user_information)
        return _tlv(self.TAG, body)

    @classmethod
    def read_body(cls, body: bytes, whole: bytes) -> AARE:
        """Decode the contents after tag and length."""
        context = result = None
        diagnostic, source = 0, DIAGNOSTIC_SOURCE_USER
        title = mechanism = auth = user = None
        extra: list[tuple[int, bytes]] = []
        for tag, value in _read_tlvs(Reader(body, what="AARE")):
            if tag == 0xA1:
                context = _decode_oid(
                    _inner(value, 0x06, "application-context-name", whole),
                    OID_PREFIX_CONTEXT,
                    "application context",
                    whole,
                )
            elif tag == 0xA2:
                result = _integer(_inner(value, 0x02, "result", whole), "result", whole)
            elif tag == 0xA3:
                items = _read_tlvs(Reader(value, what="result-source-diagnostic"))
                if len(items) != 1 or items[0][0] not in (0xA1, 0xA2):
                    raise RemoteProtocolError(
                        "result-source-diagnostic: expected user [1] or provider [2]", whole
                    )
                source = items[0][0] & 0x1F
                diagnostic = _integer(_inner(items[0][1], 0x02, "diagnostic", whole), "diagnostic", whole)
            elif tag == 0xA4:
                title = _inner(value, 0x04, "responding-AP-title", whole)
            elif tag == 0x88:
                pass  # responder-acse-requirements: implied by mechanism-name
            elif tag == 0x89:
                mechanism = _decode_oid(value, OID_PREFIX_MECHANISM, "mechanism-name", whole)
            elif tag == 0xAA:
                auth = _authentication_value(value, whole)
            elif tag == 0xBE:
                user = _decode_user_information(value, whole)
            else:
                extra.append((tag, value))
        if context is None or result is None:
            raise RemoteProtocolError("AARE without application-context-name or result", whole)
        return cls(context, result, diagnostic, source, title, mechanism, auth, user, tuple(extra))


@dataclass(frozen=True, slots=True)
class RLRQ:
    """A-RELEASE request (reason 0 = normal); user-information optional (a ciphered initiate)."""

    reason: int | None = 0
    user_information: bytes | None = None

    TAG: ClassVar[int] = TAG_RLRQ

    def encode(self) -> bytes:
        """The BER bytes."""
        body = b"" if self.reason is None else _tlv(0x80, bytes([self.reason & 0xFF]))
        return _tlv(self.TAG, body + _encode_user_information(self.user_information))

    @classmethod
    def read_body(cls, body: bytes, whole: bytes) -> RLRQ:
        """Decode the contents after tag and length."""
        reason, user = _read_release(body, whole, "RLRQ")
        return cls(reason, user)


@dataclass(frozen=True, slots=True)
class RLRE:
    """A-RELEASE response (reason 0 = normal)."""

    reason: int | None = 0
    user_information: bytes | None = None

    TAG: ClassVar[int] = TAG_RLRE

    def encode(self) -> bytes:
        """The BER bytes."""
        body = b"" if self.reason is None else _tlv(0x80, bytes([self.reason & 0xFF]))
        return _tlv(self.TAG, body + _encode_user_information(self.user_information))

    @classmethod
    def read_body(cls, body: bytes, whole: bytes) -> RLRE:
        """Decode the contents after tag and length."""
        reason, user = _read_release(body, whole, "RLRE")
        return cls(reason, user)


def _read_release(body: bytes, whole: bytes, what: str) -> tuple[int | None, bytes | None]:
    reason = user = None
    for tag, value in _read_tlvs(Reader(body, what=what)):
        if tag == 0x80:
            reason = _integer(value, "reason", whole) & 0xFF
        elif tag == 0xBE:
            user = _decode_user_information(value, whole)
        else:
            raise RemoteProtocolError(f"{what}: unexpected field 0x{tag:02X}", whole)
    return reason, user


# ---------------------------------------------------------------------------------------------------
# GET


@dataclass(frozen=True, slots=True)
class GetRequestNormal:
    """GET one attribute, optionally with selective access."""

    attribute: AttributeRef
    access: AccessSelection | None = None
    invoke_id_and_priority: int = INVOKE_ID_AND_PRIORITY

    TAG: ClassVar[int] = TAG_GET_REQUEST
    CHOICE: ClassVar[int] = 1

    def encode(self) -> bytes:
        """The A-XDR bytes."""
        head = bytes([self.TAG, self.CHOICE, self.invoke_id_and_priority])
        return head + _encode_descriptor(self.attribute) + _encode_access(self.access)


@dataclass(frozen=True, slots=True)
class GetRequestNext:
    """Ask for the next block of a long GET (the block number last received)."""

    block_number: int
    invoke_id_and_priority: int = INVOKE_ID_AND_PRIORITY

    TAG: ClassVar[int] = TAG_GET_REQUEST
    CHOICE: ClassVar[int] = 2

    def encode(self) -> bytes:
        """The A-XDR bytes."""
        _check_u32("block number", self.block_number)
        return bytes([self.TAG, self.CHOICE, self.invoke_id_and_priority]) + self.block_number.to_bytes(
            4, "big"
        )


@dataclass(frozen=True, slots=True)
class GetRequestWithList:
    """GET several attributes in one request (conformance: multiple-references)."""

    items: tuple[AttributeWithSelection, ...]
    invoke_id_and_priority: int = INVOKE_ID_AND_PRIORITY

    TAG: ClassVar[int] = TAG_GET_REQUEST
    CHOICE: ClassVar[int] = 3

    def encode(self) -> bytes:
        """The A-XDR bytes."""
        head = bytes([self.TAG, self.CHOICE, self.invoke_id_and_priority]) + encode_length(len(self.items))
        return head + b"".join(item.encode() for item in self.items)


@dataclass(frozen=True, slots=True)
class GetResponseNormal:
    """The value of one attribute, or the reason there is none."""

    result: GetDataResult
    invoke_id_and_priority: int = INVOKE_ID_AND_PRIORITY

    TAG: ClassVar[int] = TAG_GET_RESPONSE
    CHOICE: ClassVar[int] = 1

    def encode(self) -> bytes:
        """The A-XDR bytes."""
        return bytes([self.TAG, self.CHOICE, self.invoke_id_and_priority]) + _encode_get_data_result(
            self.result
        )


@dataclass(frozen=True, slots=True)
class GetResponseWithDatablock:
    """One block of a long GET: ``raw_data`` is a slice of the encoded result, or an AccessResult."""

    last_block: bool
    block_number: int
    raw_data: bytes | AccessResult
    invoke_id_and_priority: int = INVOKE_ID_AND_PRIORITY

    TAG: ClassVar[int] = TAG_GET_RESPONSE
    CHOICE: ClassVar[int] = 2

    def encode(self) -> bytes:
        """The A-XDR bytes."""
        head = bytes([self.TAG, self.CHOICE, self.invoke_id_and_priority])
        head += _encode_block_header(self.last_block, self.block_number)
        if isinstance(self.raw_data, AccessResult):
            return head + bytes([1, self.raw_data.code])
        return head + b"\x00" + _encode_octets(self.raw_data)


@dataclass(frozen=True, slots=True)
class GetResponseWithList:
    """One Get-Data-Result per attribute of a GET-with-list, in order."""

    results: tuple[GetDataResult, ...]
    invoke_id_and_priority: int = INVOKE_ID_AND_PRIORITY

    TAG: ClassVar[int] = TAG_GET_RESPONSE
    CHOICE: ClassVar[int] = 3

    def encode(self) -> bytes:
        """The A-XDR bytes."""
        head = bytes([self.TAG, self.CHOICE, self.invoke_id_and_priority])
        return head + encode_get_results(self.results)


def encode_get_results(results: tuple[GetDataResult, ...]) -> bytes:
    """SEQUENCE OF Get-Data-Result: the body of a GET-with-list response (also split into blocks)."""
    return encode_length(len(results)) + b"".join(_encode_get_data_result(r) for r in results)


def decode_get_results(
    data: bytes, *, max_elements: int = MAX_ELEMENTS, max_depth: int = MAX_DEPTH
) -> tuple[GetDataResult, ...]:
    """The results of a GET-with-list whose response came in blocks (the reassembled raw data)."""
    reader = Reader(data, what="GET-with-list result")
    limits = _Limits(max_elements, max_depth)
    results = tuple(_read_get_data_result(reader, limits) for _ in range(reader.counted(2)))
    reader.expect_end()
    return results


# ---------------------------------------------------------------------------------------------------
# SET


@dataclass(frozen=True, slots=True)
class SetRequestNormal:
    """SET one attribute."""

    attribute: AttributeRef
    value: Data
    access: AccessSelection | None = None
    invoke_id_and_priority: int = INVOKE_ID_AND_PRIORITY

    TAG: ClassVar[int] = TAG_SET_REQUEST
    CHOICE: ClassVar[int] = 1

    def encode(self) -> bytes:
        """The A-XDR bytes."""
        head = bytes([self.TAG, self.CHOICE, self.invoke_id_and_priority])
        return (
            head + _encode_descriptor(self.attribute) + _encode_access(self.access) + encode_data(self.value)
        )


@dataclass(frozen=True, slots=True)
class SetRequestWithFirstDatablock:
    """SET one attribute whose value does not fit one PDU: the first block of the encoded value."""

    attribute: AttributeRef
    last_block: bool
    block_number: int
    raw_data: bytes
    access: AccessSelection | None = None
    invoke_id_and_priority: int = INVOKE_ID_AND_PRIORITY

    TAG: ClassVar[int] = TAG_SET_REQUEST
    CHOICE: ClassVar[int] = 2

    def encode(self) -> bytes:
        """The A-XDR bytes."""
        head = bytes([self.TAG, self.CHOICE, self.invoke_id_and_priority])
        head += _encode_descriptor(self.attribute) + _encode_access(self.access)
        return head + _encode_block_header(self.last_block, self.block_number) + _encode_octets(self.raw_data)


@dataclass(frozen=True, slots=True)
class SetRequestWithDatablock:
    """A further block of a long SET."""

    last_block: bool
    block_number: int
    raw_data: bytes
    invoke_id_and_priority: int = INVOKE_ID_AND_PRIORITY

    TAG: ClassVar[int] = TAG_SET_REQUEST
    CHOICE: ClassVar[int] = 3

    def encode(self) -> bytes:
        """The A-XDR bytes."""
        head = bytes([self.TAG, self.CHOICE, self.invoke_id_and_priority])
        return head + _encode_block_header(self.last_block, self.block_number) + _encode_octets(self.raw_data)


@dataclass(frozen=True, slots=True)
class SetRequestWithList:
    """SET several attributes in one request."""

    items: tuple[AttributeWithSelection, ...]
    values: tuple[Data, ...]
    invoke_id_and_priority: int = INVOKE_ID_AND_PRIORITY

    TAG: ClassVar[int] = TAG_SET_REQUEST
    CHOICE: ClassVar[int] = 4

    def __post_init__(self) -> None:
        if len(self.items) != len(self.values):
            raise LocalProtocolError("SET-with-list needs one value per attribute")

    def encode(self) -> bytes:
        """The A-XDR bytes."""
        out = bytearray([self.TAG, self.CHOICE, self.invoke_id_and_priority])
        out += encode_length(len(self.items)) + b"".join(i.encode() for i in self.items)
        out += encode_length(len(self.values)) + b"".join(encode_data(v) for v in self.values)
        return bytes(out)


@dataclass(frozen=True, slots=True)
class SetResponseNormal:
    """The result of a SET."""

    result: int
    invoke_id_and_priority: int = INVOKE_ID_AND_PRIORITY

    TAG: ClassVar[int] = TAG_SET_RESPONSE
    CHOICE: ClassVar[int] = 1

    def encode(self) -> bytes:
        """The A-XDR bytes."""
        _check_u8("result", self.result)
        return bytes([self.TAG, self.CHOICE, self.invoke_id_and_priority, self.result])


@dataclass(frozen=True, slots=True)
class SetResponseDatablock:
    """The server took block ``block_number`` of a long SET and waits for the next."""

    block_number: int
    invoke_id_and_priority: int = INVOKE_ID_AND_PRIORITY

    TAG: ClassVar[int] = TAG_SET_RESPONSE
    CHOICE: ClassVar[int] = 2

    def encode(self) -> bytes:
        """The A-XDR bytes."""
        _check_u32("block number", self.block_number)
        return bytes([self.TAG, self.CHOICE, self.invoke_id_and_priority]) + self.block_number.to_bytes(
            4, "big"
        )


@dataclass(frozen=True, slots=True)
class SetResponseLastDatablock:
    """The result of a long SET, after its last block."""

    result: int
    block_number: int
    invoke_id_and_priority: int = INVOKE_ID_AND_PRIORITY

    TAG: ClassVar[int] = TAG_SET_RESPONSE
    CHOICE: ClassVar[int] = 3

    def encode(self) -> bytes:
        """The A-XDR bytes."""
        _check_u8("result", self.result)
        _check_u32("block number", self.block_number)
        head = bytes([self.TAG, self.CHOICE, self.invoke_id_and_priority, self.result])
        return head + self.block_number.to_bytes(4, "big")


@dataclass(frozen=True, slots=True)
class SetResponseWithList:
    """One result per attribute of a SET-with-list."""

    results: tuple[int, ...]
    invoke_id_and_priority: int = INVOKE_ID_AND_PRIORITY

    TAG: ClassVar[int] = TAG_SET_RESPONSE
    CHOICE: ClassVar[int] = 5

    def encode(self) -> bytes:
        """The A-XDR bytes."""
        for result in self.results:
            _check_u8("result", result)
        head = bytes([self.TAG, self.CHOICE, self.invoke_id_and_priority])
        return head + encode_length(len(self.results)) + bytes(self.results)


# ---------------------------------------------------------------------------------------------------
# ACTION


@dataclass(frozen=True, slots=True)
class ActionRequestNormal:
    """Invoke one method (``method.index`` is the method id), with optional parameters."""

    method: AttributeRef
    parameters: Data | None = None
    invoke_id_and_priority: int = INVOKE_ID_AND_PRIORITY

    TAG: ClassVar[int] = TAG_ACTION_REQUEST
    CHOICE: ClassVar[int] = 1

    def encode(self) -> bytes:
        """The A-XDR bytes."""
        head = bytes([self.TAG, self.CHOICE, self.invoke_id_and_priority]) + _encode_descriptor(self.method)
        return head + (b"\x00" if self.parameters is None else b"\x01" + encode_data(self.parameters))


@dataclass(frozen=True, slots=True)
class ActionRequestNextPblock:
    """Ask for the next block of long return parameters."""

    block_number: int
    invoke_id_and_priority: int = INVOKE_ID_AND_PRIORITY

    TAG: ClassVar[int] = TAG_ACTION_REQUEST
    CHOICE: ClassVar[int] = 2

    def encode(self) -> bytes:
        """The A-XDR bytes."""
        _check_u32("block number", self.block_number)
        return bytes([self.TAG, self.CHOICE, self.invoke_id_and_priority]) + self.block_number.to_bytes(
            4, "big"
        )


@dataclass(frozen=True, slots=True)
class ActionRequestWithList:
    """Invoke several methods; one parameter Data per method."""

    methods: tuple[AttributeRef, ...]
    parameters: tuple[Data, ...]
    invoke_id_and_priority: int = INVOKE_ID_AND_PRIORITY

    TAG: ClassVar[int] = TAG_ACTION_REQUEST
    CHOICE: ClassVar[int] = 3

    def __post_init__(self) -> None:
        if len(self.methods) != len(self.parameters):
            raise LocalProtocolError("ACTION-with-list needs one parameter per method")

    def encode(self) -> bytes:
        """The A-XDR bytes."""
        out = bytearray([self.TAG, self.CHOICE, self.invoke_id_and_priority])
        out += encode_length(len(self.methods)) + b"".join(_encode_descriptor(m) for m in self.methods)
        out += encode_length(len(self.parameters)) + b"".join(encode_data(p) for p in self.parameters)
        return bytes(out)


@dataclass(frozen=True, slots=True)
class ActionRequestWithFirstPblock:
    """Invoke a method whose parameters do not fit one PDU: the first block of them."""

    method: AttributeRef
    last_block: bool
    block_number: int
    raw_data: bytes
    invoke_id_and_priority: int = INVOKE_ID_AND_PRIORITY

    TAG: ClassVar[int] = TAG_ACTION_REQUEST
    CHOICE: ClassVar[int] = 4

    def encode(self) -> bytes:
        """The A-XDR bytes."""
        head = bytes([self.TAG, self.CHOICE, self.invoke_id_and_priority]) + _encode_descriptor(self.method)
        return head + _encode_block_header(self.last_block, self.block_number) + _encode_octets(self.raw_data)


@dataclass(frozen=True, slots=True)
class ActionRequestWithPblock:
    """A further block of long method parameters."""

    last_block: bool
    block_number: int
    raw_data: bytes
    invoke_id_and_priority: int = INVOKE_ID_AND_PRIORITY

    TAG: ClassVar[int] = TAG_ACTION_REQUEST
    CHOICE: ClassVar[int] = 6

    def encode(self) -> bytes:
        """The A-XDR bytes."""
        head = bytes([self.TAG, self.CHOICE, self.invoke_id_and_priority])
        return head + _encode_block_header(self.last_block, self.block_number) + _encode_octets(self.raw_data)


@dataclass(frozen=True, slots=True)
class ActionResult:
    """Action-Response-With-Optional-Data: the result and, when the method returns one, a value."""

    result: int
    return_parameters: GetDataResult | None = None

    def __post_init__(self) -> None:
        _check_u8("action result", self.result)

    @property
    def text(self) -> str:
        """The result's name."""
        return result_text(self.result, ACTION_RESULTS)

    def encode(self) -> bytes:
        """Result byte, then 00 or 01 and the Get-Data-Result."""
        if self.return_parameters is None:
            return bytes([self.result, 0])
        return bytes([self.result, 1]) + _encode_get_data_result(self.return_parameters)


def _read_action_result(reader: Reader, limits: _Limits) -> ActionResult:
    result = reader.u8()
    if _read_optional(reader, "return-parameters"):
        return ActionResult(result, _read_get_data_result(reader, limits))
    return ActionResult(result)


@dataclass(frozen=True, slots=True)
class ActionResponseNormal:
    """The result of one method invocation, with its return value if any."""

    result: ActionResult
    invoke_id_and_priority: int = INVOKE_ID_AND_PRIORITY

    TAG: ClassVar[int] = TAG_ACTION_RESPONSE
    CHOICE: ClassVar[int] = 1

    def encode(self) -> bytes:
        """The A-XDR bytes."""
        return bytes([self.TAG, self.CHOICE, self.invoke_id_and_priority]) + self.result.encode()


@dataclass(frozen=True, slots=True)
class ActionResponseWithPblock:
    """One block of long return parameters."""

    last_block: bool
    block_number: int
    raw_data: bytes
    invoke_id_and_priority: int = INVOKE_ID_AND_PRIORITY

    TAG: ClassVar[int] = TAG_ACTION_RESPONSE
    CHOICE: ClassVar[int] = 2

    def encode(self) -> bytes:
        """The A-XDR bytes."""
        head = bytes([self.TAG, self.CHOICE, self.invoke_id_and_priority])
        return head + _encode_block_header(self.last_block, self.block_number) + _encode_octets(self.raw_data)


@dataclass(frozen=True, slots=True)
class ActionResponseWithList:
    """One result per method of an ACTION-with-list."""

    results: tuple[ActionResult, ...]
    invoke_id_and_priority: int = INVOKE_ID_AND_PRIORITY

    TAG: ClassVar[int] = TAG_ACTION_RESPONSE
    CHOICE: ClassVar[int] = 3

    def encode(self) -> bytes:
        """The A-XDR bytes."""
        head = bytes([self.TAG, self.CHOICE, self.invoke_id_and_priority]) + encode_length(len(self.results))
        return head + b"".join(r.encode() for r in self.results)


@dataclass(frozen=True, slots=True)
class ActionResponseNextPblock:
    """The server took a block of long method parameters and asks for the next."""

    block_number: int
    invoke_id_and_priority: int = INVOKE_ID_AND_PRIORITY

    TAG: ClassVar[int] = TAG_ACTION_RESPONSE
    CHOICE: ClassVar[int] = 4

    def encode(self) -> bytes:
        """The A-XDR bytes."""
        _check_u32("block number", self.block_number)
        return bytes([self.TAG, self.CHOICE, self.invoke_id_and_priority]) + self.block_number.to_bytes(
            4, "big"
        )


# ---------------------------------------------------------------------------------------------------
# Errors and ciphered APDUs


@dataclass(frozen=True, slots=True)
class ExceptionResponse:
    """The server could not process an APDU at all (wrong state, unknown service, deciphering failed)."""

    state_error: int
    service_error: int
    invocation_counter: int | None = None
    """The server's expected counter, for service error 6 (invocation-counter-error)."""

    TAG: ClassVar[int] = TAG_EXCEPTION_RESPONSE

    @property
    def text(self) -> str:
        """``state: service`` in words."""
        state = result_text(self.state_error, STATE_ERRORS)
        text = f"{state}: {result_text(self.service_error, SERVICE_ERRORS)}"
        if self.invocation_counter is not None:
            text += f" (expected counter {self.invocation_counter})"
        return text

    def encode(self) -> bytes:
        """The A-XDR bytes."""
        _check_u8("state error", self.state_error)
        _check_u8("service error", self.service_error)
        out = bytes([self.TAG, self.state_error, self.service_error])
        if self.service_error == SERVICE_ERROR_INVOCATION_COUNTER:
            _check_u32("invocation counter", self.invocation_counter or 0)
            out += (self.invocation_counter or 0).to_bytes(4, "big")
        return out


@dataclass(frozen=True, slots=True)
class CipheredApdu:
    """A service-specific ciphered APDU (glo-* or ded-*): ``content`` is ``SC || IC || ciphertext || tag``."""

    tag: int
    content: bytes

    def __post_init__(self) -> None:
        if self.tag not in PLAIN_TAG_OF:
            raise LocalProtocolError(f"0x{self.tag:02X} is not a ciphered APDU tag")

    @property
    def plain_tag(self) -> int:
        """The tag of the APDU it carries."""
        return PLAIN_TAG_OF[self.tag]

    @property
    def dedicated(self) -> bool:
        """Whether the dedicated key protects it (else the global key)."""
        return self.tag in DED_TAGS.values()

    def encode(self) -> bytes:
        """Tag, length, content."""
        return bytes([self.tag]) + _encode_octets(self.content)


@dataclass(frozen=True, slots=True)
class GeneralCiphering:
    """general-glo-ciphering (0xDB) or general-ded-ciphering (0xDC), carrying the sender's system title."""

    system_title: bytes
    content: bytes
    tag: int = TAG_GENERAL_GLO_CIPHERING

    def __post_init__(self) -> None:
        if self.tag not in (TAG_GENERAL_GLO_CIPHERING, TAG_GENERAL_DED_CIPHERING):
            raise LocalProtocolError(f"0x{self.tag:02X} is not a general-ciphering tag")

    def encode(self) -> bytes:
        """Tag, system title, content."""
        return bytes([self.tag]) + _encode_octets(self.system_title) + _encode_octets(self.content)


Apdu = (
    AARQ
    | AARE
    | RLRQ
    | RLRE
    | InitiateRequest
    | InitiateResponse
    | ConfirmedServiceError
    | GetRequestNormal
    | GetRequestNext
    | GetRequestWithList
    | GetResponseNormal
    | GetResponseWithDatablock
    | GetResponseWithList
    | SetRequestNormal
    | SetRequestWithFirstDatablock
    | SetRequestWithDatablock
    | SetRequestWithList
    | SetResponseNormal
    | SetResponseDatablock
    | SetResponseLastDatablock
    | SetResponseWithList
    | ActionRequestNormal
    | ActionRequestNextPblock
    | ActionRequestWithList
    | ActionRequestWithFirstPblock
    | ActionRequestWithPblock
    | ActionResponseNormal
    | ActionResponseWithPblock
    | ActionResponseWithList
    | ActionResponseNextPblock
    | ExceptionResponse
    | CipheredApdu
    | GeneralCiphering
)
"""Every APDU :func:`decode_apdu` returns."""


# ---------------------------------------------------------------------------------------------------
# Decoding


def decode_apdu(data: bytes, *, max_elements: int = MAX_ELEMENTS, max_depth: int = MAX_DEPTH) -> Apdu:
    """Decode one complete APDU; RemoteProtocolError for anything malformed, unknown or trailing bytes."""
    data = bytes(data)
    reader = Reader(data)
    limits = _Limits(max_elements, max_depth)
    tag = reader.u8()
    apdu: Apdu
    if tag in (TAG_AARQ, TAG_AARE, TAG_RLRQ, TAG_RLRE):
        body = reader.take(reader.length())
        reader.expect_end()
        if tag == TAG_AARQ:
            return AARQ.read_body(body, data)
        if tag == TAG_AARE:
            return AARE.read_body(body, data)
        if tag == TAG_RLRQ:
            return RLRQ.read_body(body, data)
        return RLRE.read_body(body, data)
    if tag == TAG_INITIATE_REQUEST:
        apdu = InitiateRequest.read(reader)
    elif tag == TAG_INITIATE_RESPONSE:
        apdu = InitiateResponse.read(reader)
    elif tag == TAG_CONFIRMED_SERVICE_ERROR:
        apdu = ConfirmedServiceError.read(reader)
    elif tag == TAG_GET_REQUEST:
        apdu = _read_get_request(reader, limits)
    elif tag == TAG_GET_RESPONSE:
        apdu = _read_get_response(reader, limits)
    elif tag == TAG_SET_REQUEST:
        apdu = _read_set_request(reader, limits)
    elif tag == TAG_SET_RESPONSE:
        apdu = _read_set_response(reader)
    elif tag == TAG_ACTION_REQUEST:
        apdu = _read_action_request(reader, limits)
    elif tag == TAG_ACTION_RESPONSE:
        apdu = _read_action_response(reader, limits)
    elif tag == TAG_EXCEPTION_RESPONSE:
        state, service = reader.u8(), reader.u8()
        counter = reader.u32() if service == SERVICE_ERROR_INVOCATION_COUNTER else None
        apdu = ExceptionResponse(state, service, counter)
    elif tag in PLAIN_TAG_OF:
        apdu = CipheredApdu(tag, _read_octets(reader))
    elif tag in (TAG_GENERAL_GLO_CIPHERING, TAG_GENERAL_DED_CIPHERING):
        title = _read_octets(reader)
        apdu = GeneralCiphering(title, _read_octets(reader), tag)
    else:
        raise reader.error(f"unsupported APDU tag 0x{tag:02X}")
    reader.expect_end()
    return apdu


def _choice(reader: Reader) -> tuple[int, int]:
    return reader.u8(), reader.u8()


def _read_get_request(reader: Reader, limits: _Limits) -> Apdu:
    choice, iip = _choice(reader)
    if choice == GetRequestNormal.CHOICE:
        attribute = _read_descriptor(reader)
        return GetRequestNormal(attribute, _read_access(reader, limits), iip)
    if choice == GetRequestNext.CHOICE:
        return GetRequestNext(reader.u32(), iip)
    if choice == GetRequestWithList.CHOICE:
        count = reader.counted(10)
        return GetRequestWithList(tuple(_read_with_selection(reader, limits) for _ in range(count)), iip)
    raise reader.error(f"GET-Request choice {choice}")


def _read_get_response(reader: Reader, limits: _Limits) -> Apdu:
    choice, iip = _choice(reader)
    if choice == GetResponseNormal.CHOICE:
        return GetResponseNormal(_read_get_data_result(reader, limits), iip)
    if choice == GetResponseWithDatablock.CHOICE:
        last, number = _read_bool(reader), reader.u32()
        kind = reader.u8()
        if kind == 0:
            return GetResponseWithDatablock(last, number, _read_octets(reader), iip)
        if kind == 1:
            return GetResponseWithDatablock(last, number, AccessResult(reader.u8()), iip)
        raise reader.error(f"DataBlock-G result choice {kind}")
    if choice == GetResponseWithList.CHOICE:
        count = reader.counted(2)
        return GetResponseWithList(tuple(_read_get_data_result(reader, limits) for _ in range(count)), iip)
    raise reader.error(f"GET-Response choice {choice}")


def _read_block_sa(reader: Reader) -> tuple[bool, int, bytes]:
    last = _read_bool(reader)
    number = reader.u32()
    return last, number, _read_octets(reader)


def _read_set_request(reader: Reader, limits: _Limits) -> Apdu:
    choice, iip = _choice(reader)
    if choice == SetRequestNormal.CHOICE:
        attribute = _read_descriptor(reader)
        access = _read_access(reader, limits)
        return SetRequestNormal(attribute, _data(reader, limits), access, iip)
    if choice == SetRequestWithFirstDatablock.CHOICE:
        attribute = _read_descriptor(reader)
        access = _read_access(reader, limits)
        last, number, raw = _read_block_sa(reader)
        return SetRequestWithFirstDatablock(attribute, last, number, raw, access, iip)
    if choice == SetRequestWithDatablock.CHOICE:
        last, number, raw = _read_block_sa(reader)
        return SetRequestWithDatablock(last, number, raw, iip)
    if choice == SetRequestWithList.CHOICE:
        items = tuple(_read_with_selection(reader, limits) for _ in range(reader.counted(10)))
        values = tuple(_data(reader, limits) for _ in range(reader.counted(1)))
        if len(values) != len(items):
            raise reader.error("SET-with-list: value count differs from attribute count")
        return SetRequestWithList(items, values, iip)
    raise reader.error(f"SET-Request choice {choice}")


def _read_set_response(reader: Reader) -> Apdu:
    choice, iip = _choice(reader)
    if choice == SetResponseNormal.CHOICE:
        return SetResponseNormal(reader.u8(), iip)
    if choice == SetResponseDatablock.CHOICE:
        return SetResponseDatablock(reader.u32(), iip)
    if choice == SetResponseLastDatablock.CHOICE:
        result = reader.u8()
        return SetResponseLastDatablock(result, reader.u32(), iip)
    if choice == SetResponseWithList.CHOICE:
        return SetResponseWithList(tuple(reader.take(reader.counted(1))), iip)
    raise reader.error(f"SET-Response choice {choice}")


def _read_action_request(reader: Reader, limits: _Limits) -> Apdu:
    choice, iip = _choice(reader)
    if choice == ActionRequestNormal.CHOICE:
        method = _read_descriptor(reader)
        parameters = _data(reader, limits) if _read_optional(reader, "method parameters") else None
        return ActionRequestNormal(method, parameters, iip)
    if choice == ActionRequestNextPblock.CHOICE:
        return ActionRequestNextPblock(reader.u32(), iip)
    if choice == ActionRequestWithList.CHOICE:
        methods = tuple(_read_descriptor(reader) for _ in range(reader.counted(9)))
        arguments = tuple(_data(reader, limits) for _ in range(reader.counted(1)))
        if len(arguments) != len(methods):
            raise reader.error("ACTION-with-list: parameter count differs from method count")
        return ActionRequestWithList(methods, arguments, iip)
    if choice == ActionRequestWithFirstPblock.CHOICE:
        method = _read_descriptor(reader)
        last, number, raw = _read_block_sa(reader)
        return ActionRequestWithFirstPblock(method, last, number, raw, iip)
    if choice == ActionRequestWithPblock.CHOICE:
        last, number, raw = _read_block_sa(reader)
        return ActionRequestWithPblock(last, number, raw, iip)
    raise reader.error(f"ACTION-Request choice {choice}")


def _read_action_response(reader: Reader, limits: _Limits) -> Apdu:
    choice, iip = _choice(reader)
    if choice == ActionResponseNormal.CHOICE:
        return ActionResponseNormal(_read_action_result(reader, limits), iip)
    if choice == ActionResponseWithPblock.CHOICE:
        last, number, raw = _read_block_sa(reader)
        return ActionResponseWithPblock(last, number, raw, iip)
    if choice == ActionResponseWithList.CHOICE:
        count = reader.counted(2)
        return ActionResponseWithList(tuple(_read_action_result(reader, limits) for _ in range(count)), iip)
    if choice == ActionResponseNextPblock.CHOICE:
        return ActionResponseNextPblock(reader.u32(), iip)
    raise reader.error(f"ACTION-Response choice {choice}")


def decode_xdlms_initiate(
    data: bytes,
) -> InitiateRequest | InitiateResponse | ConfirmedServiceError | CipheredApdu:
    """The xDLMS APDU of a user-information field: initiate, confirmed-service-error, or ciphered."""
    apdu = decode_apdu(data)
    if isinstance(apdu, InitiateRequest | InitiateResponse | ConfirmedServiceError):
        return apdu
    if isinstance(apdu, CipheredApdu) and apdu.plain_tag in (
        TAG_INITIATE_REQUEST,
        TAG_INITIATE_RESPONSE,
        TAG_CONFIRMED_SERVICE_ERROR,
    ):
        return apdu
    raise RemoteProtocolError(f"user-information carries {type(apdu).__name__}, not an initiate", data)


__all__ = [
    "AARE",
    "AARQ",
    "ACSE_USER_DIAGNOSTICS",
    "ACTION_RESULTS",
    "CLIENT_CONFORMANCE",
    "DATA_ACCESS_RESULTS",
    "DED_TAGS",
    "GLO_TAGS",
    "INVOKE_ID_AND_PRIORITY",
    "RLRE",
    "RLRQ",
    "AccessResult",
    "AccessSelection",
    "ActionRequestNextPblock",
    "ActionRequestNormal",
    "ActionRequestWithFirstPblock",
    "ActionRequestWithList",
    "ActionRequestWithPblock",
    "ActionResponseNextPblock",
    "ActionResponseNormal",
    "ActionResponseWithList",
    "ActionResponseWithPblock",
    "ActionResult",
    "Apdu",
    "ApplicationContext",
    "AssociationResult",
    "AttributeWithSelection",
    "CipheredApdu",
    "ConfirmedServiceError",
    "Conformance",
    "ExceptionResponse",
    "GeneralCiphering",
    "GetDataResult",
    "GetRequestNext",
    "GetRequestNormal",
    "GetRequestWithList",
    "GetResponseNormal",
    "GetResponseWithDatablock",
    "GetResponseWithList",
    "InitiateRequest",
    "InitiateResponse",
    "Mechanism",
    "SetRequestNormal",
    "SetRequestWithDatablock",
    "SetRequestWithFirstDatablock",
    "SetRequestWithList",
    "SetResponseDatablock",
    "SetResponseLastDatablock",
    "SetResponseNormal",
    "SetResponseWithList",
    "decode_apdu",
    "decode_get_results",
    "decode_xdlms_initiate",
    "encode_get_results",
    "result_text",
]
