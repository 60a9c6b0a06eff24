"""The xDLMS services of DLMS/COSEM with logical-name referencing (IEC 62056-5-3), sans-I/O.

Requests and responses of GET (normal, next block, with list; normal, with data block, with list), SET
(normal, with first / next data block, with list) and ACTION (normal, next parameter block, with list,
with first / next parameter block), and the :class:`ExceptionResponse` a server sends when it cannot
process an APDU at all. Each is a frozen dataclass with ``encode()``;
:func:`~dcud.codec.dlms.apdu.decode_apdu` reads them. These are the APDUs exchanged inside an
association (opening and closing it is :mod:`.acse`, protecting them :mod:`.ciphered`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dcud.codec.dlms.apdu_common import (
    ACTION_RESULTS,
    INVOKE_ID_AND_PRIORITY,
    SERVICE_ERROR_INVOCATION_COUNTER,
    SERVICE_ERRORS,
    STATE_ERRORS,
    TAG_ACTION_REQUEST,
    TAG_ACTION_RESPONSE,
    TAG_EXCEPTION_RESPONSE,
    TAG_GET_REQUEST,
    TAG_GET_RESPONSE,
    TAG_SET_REQUEST,
    TAG_SET_RESPONSE,
    AccessResult,
    GetDataResult,
    _check_u8,
    _check_u32,
    _encode_block_header,
    _encode_descriptor,
    _encode_get_data_result,
    _encode_octets,
    _Limits,
    _read_get_data_result,
    _read_optional,
    result_text,
)
from dcud.codec.dlms.axdr import MAX_DEPTH, MAX_ELEMENTS, Data, encode_data
from dcud.codec.dlms.obis import AttributeRef
from dcud.codec.dlms.reader import Reader, encode_length
from dcud.codec.dlms.selective_access import AccessSelection, AttributeWithSelection, _encode_access
from dcud.errors import LocalProtocolError

# ---------------------------------------------------------------------------------------------------
# The two shapes the block transfers of GET, SET and ACTION share: each APDU below is its own class (the
# decoder and the sessions match on it), its tag and choice say which service it belongs to.


@dataclass(frozen=True, slots=True)
class _BlockNumberApdu:
    """Tag, choice, invoke-id-and-priority and a block number: the request for the next block of a
    long result, or the acknowledgement of a block received."""

    block_number: int
    invoke_id_and_priority: int = INVOKE_ID_AND_PRIORITY

    TAG: ClassVar[int]
    CHOICE: ClassVar[int]

    def encode(self) -> bytes:
        """The A-XDR bytes."""
        _check_u32("block number", self.block_number)
        return bytes([self.TAG, self.CHOICE, self.invoke_id_and_priority]) + self.block_number.to_bytes(
            4, "big"
        )


@dataclass(frozen=True, slots=True)
class _RawBlockApdu:
    """Tag, choice, invoke-id-and-priority and one further block of a long value: last-block flag,
    block number and the raw bytes of the encoded value's slice."""

    last_block: bool
    block_number: int
    raw_data: bytes
    invoke_id_and_priority: int = INVOKE_ID_AND_PRIORITY

    TAG: ClassVar[int]
    CHOICE: ClassVar[int]

    def encode(self) -> bytes:
        """The A-XDR bytes."""
        head = bytes([self.TAG, self.CHOICE, self.invoke_id_and_priority])
        return head + _encode_block_header(self.last_block, self.block_number) + _encode_octets(self.raw_data)


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
class GetRequestNext(_BlockNumberApdu):
    """Ask for the next block of a long GET (the block number last received)."""

    TAG: ClassVar[int] = TAG_GET_REQUEST
    CHOICE: ClassVar[int] = 2


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
class SetRequestWithDatablock(_RawBlockApdu):
    """A further block of a long SET."""

    TAG: ClassVar[int] = TAG_SET_REQUEST
    CHOICE: ClassVar[int] = 3


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
class SetResponseDatablock(_BlockNumberApdu):
    """The server took block ``block_number`` of a long SET and waits for the next."""

    TAG: ClassVar[int] = TAG_SET_RESPONSE
    CHOICE: ClassVar[int] = 2


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
class ActionRequestNextPblock(_BlockNumberApdu):
    """Ask for the next block of long return parameters."""

    TAG: ClassVar[int] = TAG_ACTION_REQUEST
    CHOICE: ClassVar[int] = 2


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
class ActionRequestWithPblock(_RawBlockApdu):
    """A further block of long method parameters."""

    TAG: ClassVar[int] = TAG_ACTION_REQUEST
    CHOICE: ClassVar[int] = 6


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
class ActionResponseWithPblock(_RawBlockApdu):
    """One block of long return parameters."""

    TAG: ClassVar[int] = TAG_ACTION_RESPONSE
    CHOICE: ClassVar[int] = 2


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
class ActionResponseNextPblock(_BlockNumberApdu):
    """The server took a block of long method parameters and asks for the next."""

    TAG: ClassVar[int] = TAG_ACTION_RESPONSE
    CHOICE: ClassVar[int] = 4


# ---------------------------------------------------------------------------------------------------
# Errors


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


__all__ = [
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
    "ExceptionResponse",
    "GetRequestNext",
    "GetRequestNormal",
    "GetRequestWithList",
    "GetResponseNormal",
    "GetResponseWithDatablock",
    "GetResponseWithList",
    "SetRequestNormal",
    "SetRequestWithDatablock",
    "SetRequestWithFirstDatablock",
    "SetRequestWithList",
    "SetResponseDatablock",
    "SetResponseLastDatablock",
    "SetResponseNormal",
    "SetResponseWithList",
    "decode_get_results",
    "encode_get_results",
]
