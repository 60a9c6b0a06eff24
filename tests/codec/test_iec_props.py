"""Property tests: random bytes only ever raise the typed errors; encode/parse round-trips."""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from dcud.codec.iec62056 import (
    BCC_MODES,
    BccMode,
    DataMessage,
    DataSet,
    IecReceiver,
    ReceiverSide,
    dataset_values,
    encode_data_message,
    encode_datasets,
    encode_identification,
    encode_p1_telegram,
    parse_command_message,
    parse_data_message,
    parse_datasets,
    parse_identification,
    parse_option_select,
    parse_p1_telegram,
    parse_request,
)
from dcud.codec.iec_session import Done, Failed, IecReadout
from dcud.errors import NegativeResponse, ProtocolError
from dcud.sim.iec_meter import IecMeter

TYPED = (ProtocolError, NegativeResponse)

# Bytes biased towards the protocol's own alphabet so random input reaches deep into the parsers.
protocol_bytes = st.lists(
    st.one_of(
        st.binary(max_size=8),
        st.sampled_from(
            [
                b"/",
                b"?",
                b"!",
                b"\r\n",
                b"\x02",
                b"\x03",
                b"\x04",
                b"\x01",
                b"\x06",
                b"\x15",
                b"(",
                b")",
                b"*",
            ]
        ),
        st.sampled_from([b"/ISk5MT174\r\n", b"1.8.0(", b"kWh)", b"\x06050\r\n", b"/?123!\r\n", b"!\r\n\x03"]),
    ),
    max_size=40,
).map(b"".join)

sides = st.sampled_from(["master", "meter", "p1"])
bcc_modes = st.sampled_from(BCC_MODES)


def drain(rx: IecReceiver) -> list[Any]:
    out: list[Any] = []
    for _ in range(10_000):
        try:
            msg = rx.next_message()
        except TYPED as exc:
            out.append(type(exc).__name__)
            continue
        if msg is None:
            return out
        out.append(msg)
    raise AssertionError("receiver did not settle")


@settings(max_examples=400)
@given(data=st.one_of(st.binary(max_size=300), protocol_bytes), side=sides, bcc_mode=bcc_modes)
def test_receiver_random_bytes_only_typed_errors(data: bytes, side: ReceiverSide, bcc_mode: BccMode) -> None:
    rx = IecReceiver(side=side, bcc_mode=bcc_mode, max_message_bytes=256)
    rx.receive_data(data)
    drain(rx)


@settings(max_examples=200)
@given(data=protocol_bytes, side=sides, bcc_mode=bcc_modes, cuts=st.lists(st.integers(0, 400), max_size=6))
def test_receiver_chunking_does_not_matter(
    data: bytes, side: ReceiverSide, bcc_mode: BccMode, cuts: list[int]
) -> None:
    whole = IecReceiver(side=side, bcc_mode=bcc_mode)
    whole.receive_data(data)
    expected = drain(whole)
    rx = IecReceiver(side=side, bcc_mode=bcc_mode)
    got: list[Any] = []
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(points):
        rx.receive_data(data[a:b])
        got += drain(rx)
    assert got == expected


@settings(max_examples=300)
@given(data=st.one_of(st.binary(max_size=200), protocol_bytes), bcc_mode=bcc_modes)
def test_parsers_random_bytes_only_typed_errors(data: bytes, bcc_mode: BccMode) -> None:
    for parse in (
        parse_identification,
        lambda d: parse_identification(d, pushed=True),
        parse_request,
        parse_option_select,
        parse_p1_telegram,
        lambda d: parse_data_message(d, bcc_mode),
        lambda d: parse_command_message(d, bcc_mode),
        lambda d: parse_datasets(d.decode("latin-1")),
    ):
        with contextlib.suppress(*TYPED):
            parse(data)


@settings(max_examples=200)
@given(data=st.lists(protocol_bytes, max_size=5), bcc_mode=bcc_modes)
def test_session_never_raises(data: list[bytes], bcc_mode: BccMode) -> None:
    session = IecReadout("1", bcc_mode=bcc_mode)
    session.start(0.0)
    now = 0.0
    for chunk in data:
        now += 0.1
        actions = session.receive_data(chunk, now)
        actions += session.handle_timer(now)
        for action in actions:
            if isinstance(action, Failed):
                assert isinstance(action.error, Exception)
    # Time always ends the session.
    for _ in range(10):
        deadline = session.next_deadline()
        if deadline is None:
            break
        session.handle_timer(deadline)
    assert session.next_deadline() is None
    assert session.state in ("done", "failed")


@settings(max_examples=200)
@given(data=protocol_bytes)
def test_meter_model_never_raises(data: bytes) -> None:
    meter = IecMeter("123", datasets=[DataSet("1.8.0", [("1", "kWh")])])
    meter.receive_data(data, 0.0)
    for _ in range(10):
        deadline = meter.next_deadline()
        if deadline is None:
            break
        meter.handle_timer(deadline)


# -- round trips -----------------------------------------------------------------------------------

address_text = st.text(alphabet="0123456789ABCDEFabcdef.:-*", min_size=1, max_size=16)
value_text = st.text(alphabet="0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcxyz.,:+-_#", max_size=32)
unit_text = st.text(alphabet="kMWhVArvaHzm3%/sGJdegC", min_size=1, max_size=16)
datasets_strategy = st.lists(
    st.builds(
        DataSet,
        address=address_text,
        values=st.lists(st.tuples(value_text, st.none() | unit_text), min_size=1, max_size=4),
    ),
    max_size=12,
)


@given(datasets=datasets_strategy)
def test_datasets_round_trip(datasets: list[DataSet]) -> None:
    assert parse_datasets(encode_datasets(datasets)) == datasets


@given(datasets=datasets_strategy, bcc_mode=bcc_modes)
def test_data_message_round_trip(datasets: list[DataSet], bcc_mode: BccMode) -> None:
    frame = encode_data_message(datasets, bcc_mode)
    msg = parse_data_message(frame, bcc_mode)
    assert msg.datasets == datasets and msg.readout and msg.raw == frame
    assert msg.bcc_ok == (bcc_mode != "none")
    rx = IecReceiver(bcc_mode=bcc_mode)
    for i in range(len(frame)):
        rx.receive_data(frame[i : i + 1])
    got = drain(rx)
    assert len(got) == 1 and isinstance(got[0], DataMessage) and got[0] == msg
    assert len(dataset_values(datasets)) == sum(len(ds.values) for ds in datasets)


@given(datasets=datasets_strategy, with_crc=st.booleans())
def test_p1_round_trip(datasets: list[DataSet], with_crc: bool) -> None:
    tele = encode_p1_telegram("ABc", "5", "METER", datasets, with_crc=with_crc)
    parsed = parse_p1_telegram(tele)
    assert parsed.datasets == datasets
    assert (parsed.crc is not None) == with_crc


@given(
    manufacturer=st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabc", min_size=3, max_size=3),
    baud_char=st.sampled_from("0123456ABCDEF-: Z"),
    ident=st.text(alphabet="ABCDEFGHIJ0123456789-. ", max_size=16).filter(lambda s: not s.startswith("\\")),
    escapes=st.lists(st.sampled_from("@2AB"), max_size=3),
)
def test_identification_round_trip(manufacturer: str, baud_char: str, ident: str, escapes: list[str]) -> None:
    parsed = parse_identification(encode_identification(manufacturer, baud_char, ident, escapes))
    assert (parsed.manufacturer, parsed.baud_char, parsed.ident, list(parsed.escapes)) == (
        manufacturer,
        baud_char,
        ident,
        escapes,
    )
    assert parsed.fast_reaction == manufacturer[2].islower()


@settings(max_examples=50, deadline=None)
@given(
    datasets=datasets_strategy.filter(bool), baud_char=st.sampled_from("0123456ABCDEF-"), bcc_mode=bcc_modes
)
def test_session_reads_any_meter(datasets: list[DataSet], baud_char: str, bcc_mode: BccMode) -> None:
    """Session and meter model agree for any data block, mode and check byte (no line timing)."""
    meter = IecMeter("42", baud_char=baud_char, datasets=datasets, bcc_mode=bcc_mode)
    session = IecReadout("0042", bcc_mode=bcc_mode)
    now = 0.0
    to_meter = b"".join(getattr(a, "data", b"") for a in session.start(now))
    to_master = b""
    for _ in range(50):
        now += 0.05
        for action in meter.receive_data(to_meter, now) + meter.handle_timer(now):
            to_master += getattr(action, "data", b"")
        to_meter = b""
        for step in session.receive_data(to_master, now) + session.handle_timer(now):
            if isinstance(step, Done):
                assert step.result.datasets == datasets
                return
            assert not isinstance(step, Failed), step
            to_meter += getattr(step, "data", b"")
        to_master = b""
    raise AssertionError("no outcome")
