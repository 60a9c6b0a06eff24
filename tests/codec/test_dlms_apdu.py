"""xDLMS / ACSE APDUs: round trips of every class, refusals, and hostile input (only typed errors)."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcud.codec.dlms import apdu as apdus
from dcud.codec.dlms.apdu import (
    AARE,
    AARQ,
    DED_TAGS,
    GLO_TAGS,
    RLRE,
    RLRQ,
    AccessResult,
    AccessSelection,
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
    AttributeWithSelection,
    CipheredApdu,
    ConfirmedServiceError,
    Conformance,
    ExceptionResponse,
    GeneralCiphering,
    GetRequestNext,
    GetRequestNormal,
    GetRequestWithList,
    GetResponseNormal,
    GetResponseWithDatablock,
    GetResponseWithList,
    InitiateRequest,
    InitiateResponse,
    SetRequestNormal,
    SetRequestWithDatablock,
    SetRequestWithFirstDatablock,
    SetRequestWithList,
    SetResponseDatablock,
    SetResponseLastDatablock,
    SetResponseNormal,
    SetResponseWithList,
    decode_apdu,
    decode_get_results,
    decode_xdlms_initiate,
    encode_get_results,
)
from dcud.codec.dlms.axdr import Unsigned
from dcud.codec.dlms.obis import AttributeRef, Obis
from dcud.errors import LocalProtocolError, RemoteProtocolError

from helpers import TESTS
from helpers.axdr_strategies import DATA

PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VECTORS = json.loads((TESTS / "vectors" / "dlms" / "apdus.json").read_text())["apdus"]
VECTOR_BYTES = [bytes.fromhex(v["hex"]) for v in VECTORS]

u8 = st.integers(0, 255)
u32 = st.integers(0, 0xFFFF_FFFF)
iip = u8
refs = st.builds(
    AttributeRef,
    st.integers(0, 0xFFFF),
    st.builds(Obis, u8, u8, u8, u8, u8, u8),
    st.integers(-128, 127),
)
access = st.one_of(st.none(), st.builds(AccessSelection, u8, DATA))
with_selection = st.builds(AttributeWithSelection, refs, access)
results = st.one_of(DATA, u8.map(AccessResult))
small = st.lists
raw = st.binary(max_size=300)
action_result = st.builds(ActionResult, u8, st.one_of(st.none(), results))
initiate_context = st.sampled_from([1, 2, 3, 4])
extra = st.lists(
    st.tuples(st.sampled_from([0xA2, 0xA3, 0xA4, 0xA5, 0xA7, 0xA8, 0xA9, 0xBD]), st.binary(max_size=10)),
    max_size=3,
)

APDUS = st.one_of(
    st.builds(
        AARQ,
        initiate_context,
        st.one_of(st.none(), st.binary(min_size=8, max_size=8)),
        st.one_of(st.none(), st.integers(0, 7)),
        st.one_of(st.none(), st.binary(max_size=64)),
        st.one_of(st.none(), st.binary(max_size=64)),
        extra.map(lambda e: tuple(sorted(e, key=lambda i: i[0] & 0x1F))),
    ),
    st.builds(
        AARE,
        initiate_context,
        st.integers(0, 2),
        st.integers(0, 14),
        st.sampled_from([1, 2]),
        st.one_of(st.none(), st.binary(min_size=8, max_size=8)),
        st.one_of(st.none(), st.integers(0, 7)),
        st.one_of(st.none(), st.binary(max_size=64)),
        st.one_of(st.none(), st.binary(max_size=64)),
    ),
    st.builds(RLRQ, st.one_of(st.none(), u8), st.one_of(st.none(), st.binary(max_size=40))),
    st.builds(RLRE, st.one_of(st.none(), u8), st.one_of(st.none(), st.binary(max_size=40))),
    st.builds(
        InitiateRequest,
        st.integers(0, 0xFFFFFF).map(Conformance),
        st.integers(0, 0xFFFF),
        u8,
        st.one_of(st.none(), st.binary(min_size=16, max_size=16)),
        st.booleans(),
        st.one_of(st.none(), st.integers(-128, 127)),
    ),
    st.builds(
        InitiateResponse,
        st.integers(0, 0xFFFFFF).map(Conformance),
        st.integers(0, 0xFFFF),
        u8,
        st.one_of(st.none(), st.integers(-128, 127)),
        st.integers(0, 0xFFFF),
    ),
    st.builds(ConfirmedServiceError, u8, u8, u8),
    st.builds(GetRequestNormal, refs, access, iip),
    st.builds(GetRequestNext, u32, iip),
    st.builds(GetRequestWithList, small(with_selection, max_size=4).map(tuple), iip),
    st.builds(GetResponseNormal, results, iip),
    st.builds(GetResponseWithDatablock, st.booleans(), u32, st.one_of(raw, u8.map(AccessResult)), iip),
    st.builds(GetResponseWithList, small(results, max_size=4).map(tuple), iip),
    st.builds(SetRequestNormal, refs, DATA, access, iip),
    st.builds(SetRequestWithFirstDatablock, refs, st.booleans(), u32, raw, access, iip),
    st.builds(SetRequestWithDatablock, st.booleans(), u32, raw, iip),
    small(st.tuples(with_selection, DATA), max_size=4).map(
        lambda pairs: SetRequestWithList(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))
    ),
    st.builds(SetResponseNormal, u8, iip),
    st.builds(SetResponseDatablock, u32, iip),
    st.builds(SetResponseLastDatablock, u8, u32, iip),
    st.builds(SetResponseWithList, small(u8, max_size=6).map(tuple), iip),
    st.builds(ActionRequestNormal, refs, st.one_of(st.none(), DATA), iip),
    st.builds(ActionRequestNextPblock, u32, iip),
    small(st.tuples(refs, DATA), max_size=4).map(
        lambda pairs: ActionRequestWithList(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))
    ),
    st.builds(ActionRequestWithFirstPblock, refs, st.booleans(), u32, raw, iip),
    st.builds(ActionRequestWithPblock, st.booleans(), u32, raw, iip),
    st.builds(ActionResponseNormal, action_result, iip),
    st.builds(ActionResponseWithPblock, st.booleans(), u32, raw, iip),
    st.builds(ActionResponseWithList, small(action_result, max_size=4).map(tuple), iip),
    st.builds(ActionResponseNextPblock, u32, iip),
    st.builds(ExceptionResponse, u8.filter(lambda v: v != 6), st.integers(1, 5)),
    st.builds(ExceptionResponse, u8, st.just(6), u32),
    st.builds(CipheredApdu, st.sampled_from(sorted([*GLO_TAGS.values(), *DED_TAGS.values()])), raw),
    st.builds(GeneralCiphering, st.binary(max_size=8), raw, st.sampled_from([0xDB, 0xDC])),
)


@PROPS
@given(APDUS)
def test_every_apdu_round_trips(apdu: apdus.Apdu) -> None:
    wire = apdu.encode()
    decoded = decode_apdu(wire)
    assert decoded.encode() == wire
    if "Float" not in repr(apdu):  # NaN never equals itself; the bytes above already match
        assert decoded == apdu


@PROPS
@given(st.binary(max_size=120))
def test_random_bytes_only_raise_remote_protocol_errors(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_apdu(data)


@PROPS
@given(st.sampled_from(VECTOR_BYTES), st.data())
def test_mutated_vectors_only_raise_remote_protocol_errors(wire: bytes, data: st.DataObject) -> None:
    mutated = bytearray(wire)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(mutated) - 1))
        mutated[position] = data.draw(u8)
    with contextlib.suppress(RemoteProtocolError):
        decode_apdu(bytes(mutated))


@pytest.mark.parametrize("wire", VECTOR_BYTES, ids=[v["name"] for v in VECTORS])
def test_every_truncation_of_a_vector_is_refused(wire: bytes) -> None:
    for cut in range(len(wire)):
        with pytest.raises(RemoteProtocolError):
            decode_apdu(wire[:cut])
    with pytest.raises(RemoteProtocolError, match=r"trailing|unexpected field|one element"):
        decode_apdu(wire + b"\x00")


def test_refusals() -> None:
    with pytest.raises(RemoteProtocolError, match="unsupported APDU tag 0xE0"):
        decode_apdu(b"\xe0\x00")
    with pytest.raises(RemoteProtocolError, match="GET-Request choice 4"):
        decode_apdu(bytes.fromhex("C004C100000001"))
    with pytest.raises(RemoteProtocolError, match="without application-context-name"):
        decode_apdu(bytes.fromhex("6000"))
    with pytest.raises(RemoteProtocolError, match="DLMS UA name"):
        decode_apdu(bytes.fromhex("6009A1070605608574050A"))
    with pytest.raises(RemoteProtocolError, match="optional flag 2"):
        decode_apdu(bytes.fromhex("C001C1000100002B0100FF0202"))
    with pytest.raises(RemoteProtocolError, match="not an initiate"):
        decode_xdlms_initiate(bytes.fromhex("C002C100000001"))
    with pytest.raises(LocalProtocolError):
        CipheredApdu(0xC0, b"")
    with pytest.raises(LocalProtocolError):
        SetRequestWithList((), (Unsigned(1),))
    with pytest.raises(LocalProtocolError):
        InitiateRequest(max_receive_pdu_size=70000)


def test_texts() -> None:
    assert (
        ExceptionResponse(1, 6, 7).text
        == "service-not-allowed: invocation-counter-error (expected counter 7)"
    )
    assert AccessResult(250).text == "other-reason" and AccessResult(99).text == "code 99"
    assert ActionResult(16).text == "no-long-action-in-progress"
    assert AARE(result=1, diagnostic=2, diagnostic_source=2).diagnostic_text == "no-common-acse-version"
    assert "12345678" not in repr(AARQ(authentication_value=b"12345678"))
    assert "00112233" not in repr(InitiateRequest(dedicated_key=bytes.fromhex("00112233" * 4)))


def test_get_results_for_block_transfer() -> None:
    results = (apdus.AccessResult(4), Unsigned(7))
    encoded = encode_get_results(results)
    assert encoded.hex() == "0201040011" + "07"
    assert decode_get_results(encoded) == results
    with pytest.raises(RemoteProtocolError):
        decode_get_results(encoded + b"\x00")


def test_conformance_block_round_trip_and_unused_bits_tolerance() -> None:
    wire = bytes.fromhex("0800065F1F040000501F01F40007")
    response = decode_apdu(wire)
    assert isinstance(response, InitiateResponse)
    assert (
        response.conformance & Conformance.GET and not response.conformance & Conformance.MULTIPLE_REFERENCES
    )
    # Some servers count the unused bits differently; the 24 bits are what matter.
    sloppy = bytes.fromhex("0800065F1F040800501F01F40007")
    assert decode_apdu(sloppy) == response
