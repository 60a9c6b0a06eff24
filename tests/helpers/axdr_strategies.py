"""Hypothesis strategies for A-XDR data (every type, nested arrays and structures), shared by the A-XDR
and APDU property tests."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from dcud.codec.dlms.axdr import (
    DEVIATION_NOT_SPECIFIED,
    Array,
    Bcd,
    BitString,
    Boolean,
    CosemDate,
    CosemDateTime,
    CosemTime,
    Date,
    DateTime,
    DontCare,
    DoubleLong,
    DoubleLongUnsigned,
    Enum,
    Float32,
    Float64,
    Integer,
    Long,
    Long64,
    Long64Unsigned,
    LongUnsigned,
    Null,
    OctetString,
    Structure,
    Time,
    Unsigned,
    Utf8String,
    VisibleString,
)

__all__ = ["DATA"]


def _int(cls: Any, bits: int, signed: bool) -> Any:
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return st.integers(low, high).map(cls)


_date = st.builds(
    CosemDate, st.integers(0, 0xFFFF), st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)
)
_time = st.builds(
    CosemTime, st.integers(0, 255), st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)
)
_datetime = st.builds(
    CosemDateTime,
    _date,
    _time,
    st.one_of(st.just(DEVIATION_NOT_SPECIFIED), st.integers(-0x7FFF, 0x7FFF)),
    st.integers(0, 255),
)
_scalars = st.one_of(
    st.just(Null()),
    st.just(DontCare()),
    st.booleans().map(Boolean),
    st.text(alphabet="01", max_size=40).map(BitString.from_bits),
    _int(DoubleLong, 32, True),
    _int(DoubleLongUnsigned, 32, False),
    st.binary(max_size=300).map(OctetString),
    st.text(alphabet=st.characters(max_codepoint=255), max_size=40).map(VisibleString),
    st.text(max_size=20).map(Utf8String),
    st.integers(0, 255).map(Bcd),
    _int(Integer, 8, True),
    _int(Long, 16, True),
    _int(Unsigned, 8, False),
    _int(LongUnsigned, 16, False),
    _int(Long64, 64, True),
    _int(Long64Unsigned, 64, False),
    _int(Enum, 8, False),
    st.floats(width=32).map(Float32),
    st.floats().map(Float64),
    _datetime.map(DateTime),
    _date.map(Date),
    _time.map(Time),
)
DATA = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6).map(lambda items: Array(tuple(items))),
        st.lists(inner, max_size=6).map(lambda items: Structure(tuple(items))),
    ),
    max_leaves=40,
)
