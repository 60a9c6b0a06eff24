"""xDLMS and ACSE APDUs of DLMS/COSEM (IEC 62056-5-3, Green Book 9.3-9.5), sans-I/O, both directions.

Every APDU a client or a server sends is a frozen dataclass with ``encode()``; :func:`decode_apdu` turns
received bytes into one of them. The client's and the server's side are both complete, so the same code
serves dcud's client session, its meter simulator and the test peers. This module is the one entry point:
the :data:`Apdu` union, the decoder that dispatches on the tag, and every APDU class re-exported from the
module that defines it:

- :mod:`.acse`: ACSE (BER): :class:`AARQ`, :class:`AARE`, :class:`RLRQ`, :class:`RLRE`, whose
  user-information carries an xDLMS :class:`InitiateRequest` / :class:`InitiateResponse` /
  :class:`ConfirmedServiceError` (or their ciphered form, a :class:`CipheredApdu` with the glo-initiate
  tags), and the conformance block;
- :mod:`.xdlms`: GET (normal, next block, with list) and its responses (normal, with data block, with
  list); SET (normal, with first / next data block, with list) and its responses; ACTION (normal, next
  parameter block, with list, with first / next parameter block) and its responses;
  :class:`ExceptionResponse`;
- :mod:`.selective_access`: :class:`AccessSelection`, :class:`AttributeWithSelection`;
- :mod:`.ciphered`: service-specific global and dedicated ciphering (:class:`CipheredApdu`, tags
  ``glo-*`` / ``ded-*``) and :class:`GeneralCiphering` (general-glo / general-ded-ciphering);
- :mod:`.apdu_common`: the tags, result codes and the encoding pieces they share.

Malformed input raises :class:`~dcud.errors.RemoteProtocolError` and nothing else; building an APDU with
out-of-range fields raises :class:`~dcud.errors.LocalProtocolError`. Passwords and dedicated keys are left
out of ``repr()``.
"""

from __future__ import annotations

from dcud.codec.dlms.acse import (
    AARE,
    AARQ,
    ACSE_PROVIDER_DIAGNOSTICS,
    ACSE_USER_DIAGNOSTICS,
    CLIENT_CONFORMANCE,
    DIAGNOSTIC_AUTHENTICATION_FAILURE,
    DIAGNOSTIC_AUTHENTICATION_REQUIRED,
    DIAGNOSTIC_SOURCE_USER,
    OID_PREFIX_CONTEXT,
    OID_PREFIX_MECHANISM,
    RLRE,
    RLRQ,
    ApplicationContext,
    AssociationResult,
    ConfirmedServiceError,
    Conformance,
    InitiateRequest,
    InitiateResponse,
    Mechanism,
)
from dcud.codec.dlms.apdu_common import (
    ACTION_RESULTS,
    DATA_ACCESS_RESULTS,
    DED_TAGS,
    GLO_TAGS,
    INVOKE_ID_AND_PRIORITY,
    PLAIN_TAG_OF,
    SERVICE_ERROR_INVOCATION_COUNTER,
    TAG_AARE,
    TAG_AARQ,
    TAG_ACTION_REQUEST,
    TAG_ACTION_RESPONSE,
    TAG_CONFIRMED_SERVICE_ERROR,
    TAG_EXCEPTION_RESPONSE,
    TAG_GENERAL_DED_CIPHERING,
    TAG_GENERAL_GLO_CIPHERING,
    TAG_GET_REQUEST,
    TAG_GET_RESPONSE,
    TAG_INITIATE_REQUEST,
    TAG_INITIATE_RESPONSE,
    TAG_RLRE,
    TAG_RLRQ,
    TAG_SET_REQUEST,
    TAG_SET_RESPONSE,
    AccessResult,
    GetDataResult,
    _data,
    _Limits,
    _read_bool,
    _read_descriptor,
    _read_get_data_result,
    _read_octets,
    _read_optional,
    result_text,
)
from dcud.codec.dlms.axdr import MAX_DEPTH, MAX_ELEMENTS
from dcud.codec.dlms.ciphered import CipheredApdu, GeneralCiphering
from dcud.codec.dlms.reader import Reader
from dcud.codec.dlms.selective_access import (
    AccessSelection,
    AttributeWithSelection,
    _read_access,
    _read_with_selection,
)
from dcud.codec.dlms.xdlms import (
    ActionRequestNextPblock,
    ActionRequestNormal,
    ActionRequestWithFirstPblock,
    ActionRequestWithList,
    ActionRequestWithPblock,
    ActionResponseNextPblock,
    ActionResponseNormal,
    ActionResponseWithList,
    ActionResponseWithPblock,
    ActionResult,
    ExceptionResponse,
    GetRequestNext,
    GetRequestNormal,
    GetRequestWithList,
    GetResponseNormal,
    GetResponseWithDatablock,
    GetResponseWithList,
    SetRequestNormal,
    SetRequestWithDatablock,
    SetRequestWithFirstDatablock,
    SetRequestWithList,
    SetResponseDatablock,
    SetResponseLastDatablock,
    SetResponseNormal,
    SetResponseWithList,
    _read_action_result,
    decode_get_results,
    encode_get_results,
)
from dcud.errors import RemoteProtocolError

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
    "ACSE_PROVIDER_DIAGNOSTICS",
    "ACSE_USER_DIAGNOSTICS",
    "ACTION_RESULTS",
    "CLIENT_CONFORMANCE",
    "DATA_ACCESS_RESULTS",
    "DED_TAGS",
    "DIAGNOSTIC_AUTHENTICATION_FAILURE",
    "DIAGNOSTIC_AUTHENTICATION_REQUIRED",
    "DIAGNOSTIC_SOURCE_USER",
    "GLO_TAGS",
    "INVOKE_ID_AND_PRIORITY",
    "OID_PREFIX_CONTEXT",
    "OID_PREFIX_MECHANISM",
    "PLAIN_TAG_OF",
    "RLRE",
    "RLRQ",
    "TAG_GENERAL_DED_CIPHERING",
    "TAG_GENERAL_GLO_CIPHERING",
    "TAG_GET_RESPONSE",
    "TAG_INITIATE_REQUEST",
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
