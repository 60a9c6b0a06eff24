"""ACSE (AARQ/AARE, RLRQ/RLRE, IEC 62056-5-3 / Green Book 9.4) and the xDLMS Initiate request/response.

BER with one-byte tags only, which is all the COSEM ACSE uses. Unknown optional fields are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

from .axdr import DecodeError, decode_length, encode_length

AARQ = 0x60
AARE = 0x61
RLRQ = 0x62
RLRE = 0x63
INITIATE_REQUEST = 0x01
INITIATE_RESPONSE = 0x08
CONFIRMED_SERVICE_ERROR = 0x0E
GLO_INITIATE_REQUEST = 0x21
GLO_INITIATE_RESPONSE = 0x28

CONTEXT_PREFIX = bytes([0x60, 0x85, 0x74, 0x05, 0x08, 0x01])  # 2.16.756.5.8.1
MECHANISM_PREFIX = bytes([0x60, 0x85, 0x74, 0x05, 0x08, 0x02])  # 2.16.756.5.8.2
CONTEXT_LN = 1
CONTEXT_LN_CIPHERED = 3
MECHANISM_NONE = 0
MECHANISM_LLS = 1
MECHANISM_HLS_GMAC = 5

# AARE result and acse-service-user diagnostics
ACCEPTED = 0
REJECTED_PERMANENT = 1
DIAG_NONE = 0
DIAG_NO_REASON = 1
DIAG_CONTEXT_NOT_SUPPORTED = 2
DIAG_MECHANISM_NOT_RECOGNISED = 11
DIAG_MECHANISM_REQUIRED = 12
DIAG_AUTHENTICATION_FAILURE = 13
DIAG_AUTHENTICATION_REQUIRED = 14


@dataclass
class Aarq:
    """The fields of an AARQ this meter looks at."""

    context: int | None = None
    calling_ap_title: bytes | None = None
    mechanism: int | None = None
    auth_value: bytes | None = None
    user_information: bytes | None = None


@dataclass(frozen=True)
class InitiateRequest:
    """xDLMS InitiateRequest: dedicated key, DLMS version, proposed conformance, client max receive PDU."""

    dedicated_key: bytes | None
    dlms_version: int
    conformance: int
    client_max_receive_pdu: int


def tlvs(data: bytes) -> list[tuple[int, bytes]]:
    """Split BER TLVs with one-byte tags."""
    out = []
    pos = 0
    while pos < len(data):
        tag = data[pos]
        length, pos = decode_length(data, pos + 1)
        if pos + length > len(data):
            raise DecodeError(f"field 0x{tag:02X} runs past the end")
        out.append((tag, data[pos : pos + length]))
        pos += length
    return out


def unwrap(apdu: bytes, tag: int) -> bytes:
    """The body of an APDU ``tag LEN body`` that must fill ``apdu``."""
    if not apdu or apdu[0] != tag:
        raise DecodeError(f"expected tag 0x{tag:02X}")
    length, pos = decode_length(apdu, 1)
    if pos + length != len(apdu):
        raise DecodeError("length does not match the APDU")
    return apdu[pos:]


def _oid_arc(value: bytes, prefix: bytes) -> int:
    if len(value) != len(prefix) + 1 or not value.startswith(prefix):
        raise DecodeError(f"unknown object identifier {value.hex()}")
    return value[-1]


def parse_aarq(apdu: bytes) -> Aarq:
    """Parse an AARQ (raises DecodeError)."""
    aarq = Aarq()
    for tag, body in tlvs(unwrap(apdu, AARQ)):
        if tag == 0xA1:  # application-context-name: [1] { OBJECT IDENTIFIER }
            inner = tlvs(body)
            if len(inner) != 1 or inner[0][0] != 0x06:
                raise DecodeError("application-context-name is not an OID")
            aarq.context = _oid_arc(inner[0][1], CONTEXT_PREFIX)
        elif tag == 0xA6:  # calling-AP-title: [6] { OCTET STRING }
            inner = tlvs(body)
            if len(inner) != 1 or inner[0][0] != 0x04:
                raise DecodeError("calling-AP-title is not an octet string")
            aarq.calling_ap_title = inner[0][1]
        elif tag == 0x8B:  # mechanism-name: [11] IMPLICIT OID
            aarq.mechanism = _oid_arc(body, MECHANISM_PREFIX)
        elif tag == 0xAC:  # calling-authentication-value: [12] { charstring [0] | bitstring [1] ... }
            inner = tlvs(body)
            if len(inner) != 1 or inner[0][0] not in (0x80, 0x81):
                raise DecodeError("calling-authentication-value is not a charstring")
            aarq.auth_value = inner[0][1]
        elif tag == 0xBE:  # user-information: [30] { OCTET STRING }
            inner = tlvs(body)
            if len(inner) != 1 or inner[0][0] != 0x04:
                raise DecodeError("user-information is not an octet string")
            aarq.user_information = inner[0][1]
        # protocol-version, called-*, acse-requirements, implementation-information: not needed
    return aarq


def parse_initiate_request(data: bytes) -> InitiateRequest:
    """Parse an xDLMS InitiateRequest (A-XDR; raises DecodeError)."""
    try:
        if data[0] != INITIATE_REQUEST:
            raise DecodeError("not an InitiateRequest")
        pos = 1
        key = None
        if data[pos]:
            length = data[pos + 1]
            key = bytes(data[pos + 2 : pos + 2 + length])
            if len(key) != length:
                raise DecodeError("truncated dedicated key")
            pos += 2 + length
        else:
            pos += 1
        pos += 2 if data[pos] else 1  # response-allowed (BOOLEAN DEFAULT TRUE)
        pos += 2 if data[pos] else 1  # proposed-quality-of-service
        version = data[pos]
        pos += 1
        if data[pos : pos + 4] != b"\x5f\x1f\x04\x00":
            raise DecodeError("proposed-conformance is not [APPLICATION 31] BIT STRING (24)")
        conformance = int.from_bytes(data[pos + 4 : pos + 7], "big")
        pdu = int.from_bytes(data[pos + 7 : pos + 9], "big")
        if pos + 9 != len(data):
            raise DecodeError("bytes after the InitiateRequest")
    except IndexError:
        raise DecodeError("truncated InitiateRequest") from None
    return InitiateRequest(key, version, conformance, pdu)


def initiate_response(conformance: int, server_max_receive_pdu: int) -> bytes:
    """xDLMS InitiateResponse for LN referencing (VAA name 0x0007)."""
    return (
        bytes([INITIATE_RESPONSE, 0x00, 0x06, 0x5F, 0x1F, 0x04, 0x00])
        + conformance.to_bytes(3, "big")
        + server_max_receive_pdu.to_bytes(2, "big")
        + b"\x00\x07"
    )


def confirmed_service_error_initiate(service_error: int, value: int) -> bytes:
    """ConfirmedServiceError: initiateError [1], ServiceError choice ``service_error`` with ``value``."""
    return bytes([CONFIRMED_SERVICE_ERROR, 0x01, service_error, value])


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + encode_length(len(body)) + body


@dataclass(frozen=True)
class Aare:
    """What the meter answers to an AARQ."""

    context: int
    result: int
    diagnostic: int
    system_title: bytes | None = None
    mechanism: int | None = None
    stoc: bytes | None = None
    user_information: bytes | None = None

    def encode(self) -> bytes:
        """BER encoding of the AARE."""
        body = _tlv(0xA1, _tlv(0x06, CONTEXT_PREFIX + bytes([self.context])))
        body += _tlv(0xA2, _tlv(0x02, bytes([self.result])))
        body += _tlv(0xA3, _tlv(0xA1, _tlv(0x02, bytes([self.diagnostic]))))
        if self.system_title is not None:
            body += _tlv(0xA4, _tlv(0x04, self.system_title))
        if self.mechanism is not None and self.mechanism != MECHANISM_NONE:
            body += _tlv(0x88, b"\x07\x80")
            body += _tlv(0x89, MECHANISM_PREFIX + bytes([self.mechanism]))
        if self.stoc is not None:
            body += _tlv(0xAA, _tlv(0x80, self.stoc))
        if self.user_information is not None:
            body += _tlv(0xBE, _tlv(0x04, self.user_information))
        return _tlv(AARE, body)


def parse_rlrq(apdu: bytes) -> tuple[int | None, bytes | None]:
    """(reason, user-information) of an RLRQ (raises DecodeError)."""
    reason = None
    user_information = None
    for tag, body in tlvs(unwrap(apdu, RLRQ)):
        if tag == 0x80 and len(body) == 1:
            reason = body[0]
        elif tag == 0xBE:
            inner = tlvs(body)
            if len(inner) != 1 or inner[0][0] != 0x04:
                raise DecodeError("user-information is not an octet string")
            user_information = inner[0][1]
    return reason, user_information


def rlre(user_information: bytes | None) -> bytes:
    """RLRE with reason normal (0) and, when given, user-information."""
    body = _tlv(0x80, b"\x00")
    if user_information is not None:
        body += _tlv(0xBE, _tlv(0x04, user_information))
    return _tlv(RLRE, body)
