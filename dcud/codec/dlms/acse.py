"""The association APDUs of DLMS/COSEM (IEC 62056-5-3, Green Book 9.3), sans-I/O, both directions.

ACSE (BER): :class:`AARQ`, :class:`AARE`, :class:`RLRQ`, :class:`RLRE`, whose user-information carries
an xDLMS :class:`InitiateRequest` / :class:`InitiateResponse` / :class:`ConfirmedServiceError` (or their
ciphered form, a :class:`~dcud.codec.dlms.ciphered.CipheredApdu` with the glo-initiate tags); and what
they name: application contexts, authentication mechanisms, association results and diagnostics, the
conformance block. Everything that opens or closes an association is here and nothing else: the
services used inside one are :mod:`.xdlms`. ACSE is BER-encoded while the rest of DLMS is A-XDR, which is
another reason to keep it apart. Passwords and dedicated keys are left out of ``repr()``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar, Self

from dcud.codec.dlms.apdu_common import (
    TAG_AARE,
    TAG_AARQ,
    TAG_CONFIRMED_SERVICE_ERROR,
    TAG_INITIATE_REQUEST,
    TAG_INITIATE_RESPONSE,
    TAG_RLRE,
    TAG_RLRQ,
    _check_u8,
    _encode_octets,
    _read_bool,
    _read_octets,
    _read_optional,
    result_text,
)
from dcud.codec.dlms.reader import Reader, encode_length
from dcud.errors import LocalProtocolError, RemoteProtocolError

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
# xDLMS initiate (carried in the AARQ / AARE user-information)


def _check_initiate(max_receive_pdu_size: int, dlms_version: int, quality_of_service: int | None) -> None:
    """The fields InitiateRequest and InitiateResponse share, in range."""
    if not 0 <= max_receive_pdu_size <= 0xFFFF:
        raise LocalProtocolError(f"max receive PDU size {max_receive_pdu_size} out of range")
    _check_u8("DLMS version", dlms_version)
    if quality_of_service is not None and not -128 <= quality_of_service <= 127:
        raise LocalProtocolError(f"quality of service {quality_of_service} out of range")


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
        _check_initiate(self.max_receive_pdu_size, self.dlms_version, self.quality_of_service)

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
        _check_initiate(self.max_receive_pdu_size, self.dlms_version, self.quality_of_service)

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


def _encode_context(context: int) -> bytes:
    """application-context-name [1]: the OBJECT IDENTIFIER of the context (AARQ and AARE)."""
    return _tlv(0x06, _encode_oid(OID_PREFIX_CONTEXT, context))


def _decode_context(value: bytes, whole: bytes) -> int:
    name = _inner(value, 0x06, "application-context-name", whole)
    return _decode_oid(name, OID_PREFIX_CONTEXT, "application context", whole)


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
        fields = [(0xA1, _encode_context(self.application_context))]
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
                context = _decode_context(value, whole)
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
            (0xA1, _encode_context(self.application_context)),
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
                context = _decode_context(value, whole)
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
class _Release:
    """What RLRQ and RLRE share: the reason (0 = normal) and an optional user-information (a ciphered
    initiate), and their BER encoding."""

    reason: int | None = 0
    user_information: bytes | None = None

    TAG: ClassVar[int]

    def encode(self) -> bytes:
        """The BER bytes."""
        body = b"" if self.reason is None else _tlv(0x80, bytes([self.reason & 0xFF]))
        return _tlv(self.TAG, body + _encode_user_information(self.user_information))

    @classmethod
    def read_body(cls, body: bytes, whole: bytes) -> Self:
        """Decode the contents after tag and length."""
        what = cls.__name__
        reason = user = None
        for tag, value in _read_tlvs(Reader(body, what=what)):
            if tag == 0x80:
                reason = _integer(value, "reason", whole) & 0xFF
            elif tag == 0xBE:
                user = _decode_user_information(value, whole)
            else:
                raise RemoteProtocolError(f"{what}: unexpected field 0x{tag:02X}", whole)
        return cls(reason, user)


@dataclass(frozen=True, slots=True)
class RLRQ(_Release):
    """A-RELEASE request (reason 0 = normal); user-information optional (a ciphered initiate)."""

    TAG: ClassVar[int] = TAG_RLRQ


@dataclass(frozen=True, slots=True)
class RLRE(_Release):
    """A-RELEASE response (reason 0 = normal)."""

    TAG: ClassVar[int] = TAG_RLRE


__all__ = [
    "AARE",
    "AARQ",
    "ACSE_PROVIDER_DIAGNOSTICS",
    "ACSE_REQUIREMENTS_AUTHENTICATION",
    "ACSE_USER_DIAGNOSTICS",
    "CLIENT_CONFORMANCE",
    "CONFIRMED_SERVICES",
    "DIAGNOSTIC_AUTHENTICATION_FAILURE",
    "DIAGNOSTIC_AUTHENTICATION_REQUIRED",
    "DIAGNOSTIC_SOURCE_PROVIDER",
    "DIAGNOSTIC_SOURCE_USER",
    "DLMS_VERSION",
    "INITIATE_ERRORS",
    "OID_PREFIX_CONTEXT",
    "OID_PREFIX_MECHANISM",
    "RLRE",
    "RLRQ",
    "SERVICE_ERROR_CLASSES",
    "VAA_NAME_LN",
    "ApplicationContext",
    "AssociationResult",
    "ConfirmedServiceError",
    "Conformance",
    "InitiateRequest",
    "InitiateResponse",
    "Mechanism",
]
