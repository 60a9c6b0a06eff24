"""``dcud sim dlms``: dcud's own DLMS/COSEM meter, checked from both sides.

dcud's client session (``DlmsClient`` under ``run_session``) reads it over a socat pty pair (HDLC) and
over TCP (the wrapper); dlms-cosem's client (an independent implementation, in its own process through
tests/peers/cosem_client.py) reads it over its pty and TCP. Registers with scaler_unit, the clock read
and set, the load profile by range in GET blocks, LLS and HLS-GMAC with suite 0, refusals of a wrong
key or password, silence, mode E, drift, and the command as a process. The meters run from an injected
host clock, so every expected value comes from the documented load model.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcud.codec.dlms.axdr import array_of, number, structure_of
from dcud.codec.dlms.client import (
    AssociationRefused,
    Auth,
    DlmsClientConfig,
    DlmsSessionResult,
    GetRequest,
    SetRequest,
)
from dcud.codec.dlms.cosem import (
    clock_time,
    clock_value,
    decode_capture_objects,
    decode_object_list,
    decode_scaler_unit,
    entry_descriptor,
    profile_rows,
    range_descriptor,
    scaled,
)
from dcud.codec.dlms.mode_e import ModeESettings
from dcud.codec.dlms.obis import AttributeRef
from dcud.codec.dlms.security import AuthenticationFailed, Keys, SecurityPolicy
from dcud.errors import PeerTimeout
from dcud.sim.dlms_meter import (
    DlmsMeter,
    LoadModel,
    MeterSpec,
    expected_registers,
    iso,
    parse_time,
)
from dcud.sim.dlms_sim import DlmsSimConfig, config_from_dict, load_config
from dcud.sim.serial_sim import SimConfigError

from helpers import REPO
from helpers.cosem import get, ok_steps, profile_get, register_gets
from helpers.dlms_sim import (
    GREEN_BOOK_KEYS,
    HostClock,
    cosem,
    dcud_reader,
    hdlc_line,
    hls_config,
    read_tcp,
    running,
)
from helpers.meters import SocatPair, start_sim, wait_until, write_control

NOW = "2024-06-01T12:00:00Z"
PROFILE_START = "2024-05-30T00:00:00Z"
REGISTERS = [
    "3/1.0.1.8.0.255",
    "3/1.0.2.8.0.255",
    "3/1.0.1.7.0.255",
    "3/1.0.32.7.0.255",
    "3/1.0.31.7.0.255",
    "3/1.0.14.7.0.255",
]
CLOCK = AttributeRef.parse("8/0.0.1.0.0.255/2")
PROFILE = AttributeRef.parse("7/1.0.99.1.0.255/2")
PROFILE_COLUMNS = AttributeRef.parse("7/1.0.99.1.0.255/3")
PUBLIC = DlmsClientConfig()
LLS = DlmsClientConfig(auth=Auth.LLS, password=b"12345678")


def utc(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def sim_config(
    *, hdlc: str | None = None, tcp: bool = False, mode_e: bool = False, **meter: Any
) -> DlmsSimConfig:
    data: dict[str, Any] = {"meter": [{"name": "em-1", "profile_start": PROFILE_START, **meter}]}
    if hdlc is not None:
        data["line"] = [{"name": "dlms", "device": hdlc, "mode_e": mode_e}]
        data["meter"][0]["line"] = "dlms"
    if tcp:
        data["meter"][0]["tcp_port"] = 0
    return config_from_dict(data)


def register_requests() -> list[GetRequest]:
    out = []
    for ref in REGISTERS:
        out += [GetRequest(AttributeRef.parse(f"{ref}/2")), GetRequest(AttributeRef.parse(f"{ref}/3"))]
    return out


def scaled_values(result: DlmsSessionResult) -> dict[str, tuple[int | float, str | None]]:
    out = {}
    outcomes = result.outcomes
    for i in range(0, 2 * len(REGISTERS), 2):
        value, unit = outcomes[i], outcomes[i + 1]
        assert value.ok and unit.ok, (value, unit)
        assert value.value is not None and unit.value is not None
        out[str(value.request.attribute.obis)] = scaled(value.value, decode_scaler_unit(unit.value))
    return out


# --- the load model: what every answer derives from ---


def test_load_model_is_a_running_sum_of_its_documented_increments() -> None:
    spec = MeterSpec(origin="2024-01-01T06:00:00Z")  # an origin that is not midnight
    model = LoadModel(spec)
    origin = parse_time(spec.origin)
    # The closed form (whole days plus the day's prefix) against a plain running sum, across days
    # and before the origin.
    total = spec.base_import_wh
    for k in range(0, 400):
        assert model.import_wh(origin + k * 900) == total
        total += model.import_increment(k)
    back = spec.base_import_wh
    for k in range(-1, -200, -1):
        back -= model.import_increment(k)
        assert model.import_wh(origin + k * 900) == back
    # the increments follow the documented day shape: j = period of the day (origin at 06:00)
    for k in (0, 5, 40, 95, 96):
        j = (k + 24) % 96
        shape = [3, 3, 2, 2, 2, 3, 5, 8, 9, 7, 6, 6, 7, 6, 6, 6, 7, 9, 10, 10, 9, 7, 5, 4][j // 4]
        assert model.import_increment(k) == 250 * shape // 6 + (j * 7) % 11
    # between capture times the register grows pro rata
    t = origin + 10 * 900
    assert model.import_wh(t + 450) == model.import_wh(t) + model.import_increment(10) // 2
    assert model.export_raw(t) == model.export_wh(t) // 10


def test_profile_rows_from_the_start_up_to_now_newest_kept() -> None:
    clock = HostClock(NOW)
    meter = DlmsMeter(MeterSpec(profile_start=PROFILE_START, profile_max_entries=100), clock=clock)
    times = meter.profile_times(float("-inf"), float("inf"), meter.now())
    assert len(times) == 100 and iso(times[-1]) == NOW
    clock.advance(899)
    assert iso(meter.profile_times(float("-inf"), float("inf"), meter.now())[-1]) == NOW
    clock.advance(1)
    assert iso(meter.profile_times(float("-inf"), float("inf"), meter.now())[-1]) == "2024-06-01T12:15:00Z"
    wide = MeterSpec(profile_start=PROFILE_START)
    assert iso(DlmsMeter(wide, clock=clock).profile_times(0, 1e12, parse_time(NOW))[0]) == PROFILE_START


# --- dcud's client against the simulator ---

TRANSPORTS = ["hdlc", "tcp"]


@pytest.fixture
def ttys(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A socat pty pair: (the client's end, the simulator's end)."""
    pair = SocatPair(tmp_path / "client-tty", tmp_path / "meter-tty")
    pair.start()
    try:
        yield pair.a, pair.b
    finally:
        pair.kill()


def both(ttys: tuple[Path, Path], **meter: Any) -> DlmsSimConfig:
    """One meter on the HDLC line (the simulator's tty) and on the wrapper."""
    return sim_config(hdlc=str(ttys[1]), tcp=True, **meter)


def profile_read(start: str, end: str) -> GetRequest:
    return GetRequest(PROFILE, range_descriptor(utc(start), utc(end)))


def expected_row(meter: DlmsMeter, at: str) -> tuple[str, int, int]:
    t = parse_time(at)
    return at, meter.model.import_wh(t), meter.model.export_raw(t)


def rows_of(result: DlmsSessionResult, index: int, columns: Any) -> list[tuple[str, int, int]]:
    outcome = result.outcomes[index]
    assert outcome.ok and outcome.value is not None, outcome
    out = []
    for row in profile_rows(outcome.value, decode_capture_objects(columns), 900):
        assert row.time is not None
        stamp = row.time.to_datetime().astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        out.append((stamp, int(number(row.values[1])), int(number(row.values[2]))))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_registers_with_scaler_unit_and_the_clock(ttys: tuple[Path, Path], transport: str) -> None:
    clock = HostClock(NOW)
    async with running(both(ttys), clock) as sim, dcud_reader(transport, sim, ttys[0]) as read:
        meter = sim.meters["em-1"]
        expected = {obis: (value, unit) for obis, value, unit in expected_registers(meter, meter.now())}
        result = await read(PUBLIC, [*register_requests(), GetRequest(CLOCK)])
        assert scaled_values(result) == expected
        assert expected["1.0.1.8.0.255"] == (meter.model.import_wh(parse_time(NOW)), "Wh")
        assert expected["1.0.32.7.0.255"][1] == "V" and 229 <= expected["1.0.32.7.0.255"][0] <= 231
        assert clock_time(result.outcomes[-1].value).to_datetime() == utc(NOW)
        assert result.released
        clock.advance(450)  # half a period later the import register has grown pro rata
        later = await read(PUBLIC, register_requests()[:1])
        half = meter.model.import_increment(meter.model.period_index(parse_time(NOW))) // 2
        assert later.outcomes[0].value.value == expected["1.0.1.8.0.255"][0] + half
        assert [r["kind"] for r in meter.records].count("release") == 2
        assert not meter.records_of("internal_error")


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_load_profile_by_range_in_blocks(ttys: tuple[Path, Path], transport: str) -> None:
    clock = HostClock(NOW)
    async with running(both(ttys), clock) as sim, dcud_reader(transport, sim, ttys[0]) as read:
        meter = sim.meters["em-1"]
        # 48 hours of 15-minute rows (192, plus the row at the upper bound), then the rows by entry
        result = await read(
            PUBLIC,
            [
                GetRequest(PROFILE_COLUMNS),
                profile_read("2024-05-30T12:00:00Z", NOW),
                GetRequest(PROFILE, entry_descriptor(1, 3)),
            ],
        )
        columns = result.outcomes[0].value
        rows = rows_of(result, 1, columns)
        start = parse_time("2024-05-30T12:00:00Z")
        assert rows == [expected_row(meter, iso(start + 900 * k)) for k in range(193)]
        buffer_reads = [r for r in meter.records_of("get") if r["attr"] == 2]
        assert buffer_reads[0]["blocks"] > 5, "a 512-byte meter PDU: the rows come in blocks"
        assert buffer_reads[0]["rows"] == [row[0] for row in rows], "each row served once, in order"
        assert result.blocks >= buffer_reads[0]["blocks"]
        first = parse_time(PROFILE_START)
        assert rows_of(result, 2, columns) == [expected_row(meter, iso(first + 900 * k)) for k in range(3)]
        # the meter's clock moves on: a row every 15 minutes
        clock.advance(3 * 900 + 10)
        again = await read(PUBLIC, [profile_read(NOW, "2024-06-01T13:00:00Z")])
        assert [r[0] for r in rows_of(again, 0, columns)] == [
            NOW,
            "2024-06-01T12:15:00Z",
            "2024-06-01T12:30:00Z",
            "2024-06-01T12:45:00Z",
        ]


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_clock_set_by_lls_and_hls_refused_for_the_public_client(
    ttys: tuple[Path, Path], transport: str
) -> None:
    clock = HostClock(NOW)
    async with (
        running(both(ttys, clock_offset_s=37), clock) as sim,
        dcud_reader(transport, sim, ttys[0]) as read,
    ):
        meter = sim.meters["em-1"]
        drifted = await read(PUBLIC, [GetRequest(CLOCK)])
        assert clock_time(drifted.outcomes[0].value).to_datetime() == utc("2024-06-01T12:00:37Z")
        refused = await read(PUBLIC, [SetRequest(CLOCK, clock_value(utc(NOW)))])
        assert refused.outcomes[0].result == 3, "read-write-denied"
        assert meter.clock.offset_s() == 37
        lls = await read(LLS, [SetRequest(CLOCK, clock_value(utc(NOW))), GetRequest(CLOCK)], client_sap=32)
        assert lls.outcomes[0].ok and clock_time(lls.outcomes[1].value).to_datetime() == utc(NOW)
        assert meter.clock.offset_s() == 0
        # HLS-GMAC, authenticated and encrypted; a local time with its deviation is understood
        cet = dt.timezone(dt.timedelta(hours=1))
        new_time = clock_value(dt.datetime(2024, 6, 1, 13, 0, 5, tzinfo=cet))
        hls = await read(hls_config(), [SetRequest(CLOCK, new_time), GetRequest(CLOCK)], client_sap=1)
        assert hls.outcomes[0].ok and meter.clock.offset_s() == 5
        assert hls.server_system_title == bytes.fromhex("4D4D4D0000BC614E")
        assert [r["to"] for r in meter.records_of("clock_set")] == [NOW, "2024-06-01T12:00:05Z"]


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_hls_gmac_with_each_policy_and_the_refusals(ttys: tuple[Path, Path], transport: str) -> None:
    clock = HostClock(NOW)
    clients = [
        {"sap": 16},
        {"sap": 32, "auth": "lls", "password": "secret-1"},
        {"sap": 1, "auth": "hls-gmac", "security": "authenticated-encrypted", "write": True},
        {"sap": 2, "auth": "hls-gmac", "security": "authenticated"},
        {"sap": 3, "auth": "hls-gmac", "security": "encrypted"},
        {"sap": 4, "auth": "hls-gmac"},
    ]
    async with (
        running(both(ttys, clients=clients), clock) as sim,
        dcud_reader(transport, sim, ttys[0]) as read,
    ):
        meter = sim.meters["em-1"]
        energy = GetRequest(AttributeRef.parse("3/1.0.1.8.0.255/2"))
        counter = 100
        for sap, policy in [
            (1, SecurityPolicy.AUTHENTICATED_ENCRYPTED),
            (2, SecurityPolicy.AUTHENTICATED),
            (3, SecurityPolicy.ENCRYPTED),
            (4, SecurityPolicy.NONE),
        ]:
            config = hls_config(security=policy, invocation_counter=counter)
            result = await read(config, [energy, profile_read("2024-06-01T00:00:00Z", NOW)], client_sap=sap)
            assert number(result.outcomes[0].value) == meter.model.import_wh(parse_time(NOW))
            assert len(array_of(result.outcomes[1].value)) == 49 and result.blocks > 1
            counter = result.last_invocation_counter + 1
        assert [r["result"] for r in meter.records_of("hls")] == ["ok"] * 4
        # a client that restarted its invocation counter: a replay, refused at the AARQ
        with pytest.raises(AssociationRefused, match="wrong keys"):
            await read(hls_config(invocation_counter=5), [energy], client_sap=1)
        assert "replayed" in meter.records_of("aarq")[-1]["why"]
        # a wrong block cipher key: the ciphered initiate does not verify
        wrong_ek = Keys(bytes(16), GREEN_BOOK_KEYS.authentication_key)
        with pytest.raises(AssociationRefused):
            await read(hls_config(keys=wrong_ek, invocation_counter=10_000), [energy], client_sap=1)
        assert "does not decipher" in meter.records_of("aarq")[-1]["why"]
        # HLS without ciphering and a wrong authentication key: the meter refuses f(StoC)
        wrong_ak = Keys(GREEN_BOOK_KEYS.block_cipher_key, bytes(16))
        with pytest.raises(AuthenticationFailed, match="refused our reply"):
            await read(hls_config(security=SecurityPolicy.NONE, keys=wrong_ak), [energy], client_sap=4)
        assert meter.records_of("hls")[-1]["result"] == "failed"
        # LLS with a wrong password, then the right one
        with pytest.raises(AuthenticationFailed, match="refused the password"):
            await read(LLS, [energy], client_sap=32)
        assert meter.records_of("aarq")[-1]["diagnostic"] == 13
        assert (
            (await read(DlmsClientConfig(auth=Auth.LLS, password=b"secret-1"), [energy], client_sap=32))
            .outcomes[0]
            .ok
        )
        # the public client asking for authentication it does not have
        with pytest.raises(AssociationRefused):
            await read(LLS, [energy], client_sap=16)
        assert meter.records_of("aarq")[-1]["diagnostic"] == 11
        assert not meter.records_of("internal_error")


@pytest.mark.slow
async def test_object_list_and_event_log() -> None:
    events = [{"at": "2024-06-01T09:30:00Z", "code": 47}, {"at": "2024-06-02T00:00:00Z", "code": 48}]
    async with running(sim_config(tcp=True, events=events, event_interval_s=0), HostClock(NOW)) as sim:
        result = await read_tcp(
            sim.tcp_port("em-1"),
            PUBLIC,
            [
                GetRequest(AttributeRef.parse("15/0.0.40.0.0.255/2")),
                GetRequest(AttributeRef.parse("7/0.0.99.98.0.255/2")),
                GetRequest(AttributeRef.parse("1/0.0.96.11.0.255/2")),
                GetRequest(AttributeRef.parse("15/0.0.40.0.0.255/7")),
                GetRequest(AttributeRef.parse("3/1.0.99.1.0.255/2")),
            ],
        )
    objects = {str(o.obis): o for o in decode_object_list(result.outcomes[0].value)}
    assert set(objects) == {
        "0.0.40.0.0.255",
        "0.0.1.0.0.255",
        "0.0.42.0.0.255",
        "0.0.96.1.0.255",
        "1.0.1.8.0.255",
        "1.0.2.8.0.255",
        "1.0.1.7.0.255",
        "1.0.32.7.0.255",
        "1.0.31.7.0.255",
        "1.0.14.7.0.255",
        "1.0.99.1.0.255",
        "0.0.96.11.0.255",
        "0.0.99.98.0.255",
    }
    clock_access = {a.attribute: a.access_mode for a in objects["0.0.1.0.0.255"].attributes}
    assert clock_access[2] == 1, "read only for the public client"
    buffer = next(a for a in objects["1.0.99.1.0.255"].attributes if a.attribute == 2)
    assert buffer.selectors == (1, 2)
    logged = [structure_of(row) for row in array_of(result.outcomes[1].value)]
    assert [(clock_time(r[0]).to_datetime(), number(r[1])) for r in logged] == [
        (utc("2024-06-01T09:30:00Z"), 47)
    ]
    assert number(result.outcomes[2].value) == 47
    assert result.outcomes[3].result == 3, "the secret is not readable"
    assert result.outcomes[4].result == 9, "object-class-inconsistent"


# --- dlms-cosem's client (an independent implementation, its own process) against the simulator ---


def plan(sim: Any, transport: str, ttys: tuple[Path, Path], **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"transport": transport, "client_sap": 16, "physical_address": 17}
    if transport == "tcp":
        base["port"] = sim.tcp_port("em-1")
    else:
        base["device"] = str(ttys[0])
    return {**base, **extra}


HLS_PLAN = {
    "client_sap": 1,
    "auth": "hls-gmac",
    "challenge_length": 32,
    "block_cipher_key": "000102030405060708090A0B0C0D0E0F",
    "authentication_key": "D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF",
}


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_independent_client_reads_registers_clock_and_profile(
    ttys: tuple[Path, Path], tmp_path: Path, transport: str
) -> None:
    async with running(both(ttys), HostClock(NOW)) as sim:
        meter = sim.meters["em-1"]
        report = await cosem(
            tmp_path,
            plan(
                sim,
                transport,
                ttys,
                max_pdu_size=128,  # every answer above 128 bytes comes in GET blocks
                steps=[
                    *register_gets("1.0.1.8.0.255", "1.0.2.8.0.255", "1.0.32.7.0.255"),
                    get(3, "1.0.31.7.0.255", 3),
                    get(8, "0.0.1.0.0.255", 2, as_time=True),
                    profile_get("1.0.99.1.0.255", "2024-06-01T06:00:00+00:00", NOW),
                ],
            ),
        )
        steps = ok_steps(report)
        t = parse_time(NOW)
        assert steps[0]["value"] == meter.model.import_wh(t) and steps[1]["value"] == [0, 30]
        assert steps[2]["value"] == meter.model.export_raw(t) and steps[3]["value"] == [1, 30]
        assert steps[4]["value"] == meter.model.voltage_raw(t) and steps[5]["value"] == [-1, 35]
        assert steps[6]["value"] == [-2, 33]
        assert steps[7]["time"] == NOW
        rows = steps[8]["rows"]
        start = parse_time("2024-06-01T06:00:00Z")
        assert rows == [list(expected_row(meter, iso(start + 900 * k))) for k in range(25)]
        assert next(r for r in meter.records_of("get") if r["attr"] == 2 and r["class_id"] == 7)["blocks"] > 1
        assert meter.records_of("release"), "dlms-cosem released the association"
        assert not meter.records_of("internal_error") and not meter.records_of("malformed")


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_independent_client_lls_clock_set_and_wrong_password(
    ttys: tuple[Path, Path], tmp_path: Path, transport: str
) -> None:
    async with running(both(ttys), HostClock(NOW)) as sim:
        meter = sim.meters["em-1"]
        clock = "0.0.1.0.0.255"
        set_clock = {"op": "set", "class_id": 8, "obis": clock, "attr": 2, "time": "2024-06-01T12:07:30Z"}
        steps = ok_steps(
            await cosem(
                tmp_path,
                plan(
                    sim,
                    transport,
                    ttys,
                    client_sap=32,
                    auth="lls",
                    password="12345678",
                    steps=[set_clock, get(8, clock, 2, as_time=True)],
                ),
            )
        )
        assert steps[0]["result"] == 0 and steps[1]["time"] == "2024-06-01T12:07:30Z"
        assert meter.clock.offset_s() == 450
        public = ok_steps(
            await cosem(tmp_path, plan(sim, transport, ttys, steps=[{**set_clock, "time": NOW}]))
        )
        assert public[0]["result"] == 3, "read-write-denied for the public client"
        wrong = await cosem(
            tmp_path,
            plan(
                sim,
                transport,
                ttys,
                client_sap=32,
                auth="lls",
                password="87654321",
                steps=[get(3, "1.0.1.8.0.255", 2)],
            ),
        )
        assert not wrong["associate"]["ok"] and "AUTHENTICATION_FAILED" in wrong["associate"]["message"]
        assert meter.records_of("aarq")[-1]["diagnostic"] == 13


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_independent_client_hls_gmac_with_ciphering_and_a_wrong_key(
    ttys: tuple[Path, Path], tmp_path: Path, transport: str
) -> None:
    async with running(both(ttys), HostClock(NOW)) as sim:
        meter = sim.meters["em-1"]
        steps = ok_steps(
            await cosem(
                tmp_path,
                plan(
                    sim,
                    transport,
                    ttys,
                    **HLS_PLAN,
                    client_invocation_counter=1000,
                    max_pdu_size=256,
                    steps=[
                        get(3, "1.0.1.8.0.255", 2),
                        profile_get("1.0.99.1.0.255", "2024-06-01T06:00:00+00:00", NOW),
                        {
                            "op": "set",
                            "class_id": 8,
                            "obis": "0.0.1.0.0.255",
                            "attr": 2,
                            "time": "2024-06-01T11:59:50Z",
                        },
                    ],
                ),
            )
        )
        assert steps[0]["value"] == meter.model.import_wh(parse_time(NOW))
        assert len(steps[1]["rows"]) == 25 and steps[2]["result"] == 0
        assert meter.clock.offset_s() == -10
        aarq = meter.records_of("aarq")[0]
        assert aarq["result"] == "accepted" and aarq["ciphered"] and aarq["pending_hls"]
        assert meter.records_of("hls")[0]["result"] == "ok"
        assert next(r for r in meter.records_of("get") if r["class_id"] == 7)["blocks"] > 1, (
            "ciphered GET blocks"
        )
        assert meter.client_counters[1] > 1000
        for key in ("block_cipher_key", "authentication_key"):
            wrong = {**HLS_PLAN, key: "00" * 16}
            report = await cosem(
                tmp_path,
                plan(
                    sim,
                    transport,
                    ttys,
                    **wrong,
                    client_invocation_counter=5000,
                    steps=[get(3, "1.0.1.8.0.255", 2)],
                ),
            )
            assert not report["associate"]["ok"] and "REJECTED_PERMANENT" in report["associate"]["message"]
            assert "does not decipher" in meter.records_of("aarq")[-1]["why"]
        assert not meter.records_of("internal_error") and not meter.records_of("malformed")


# --- silence, mode E, drift, configuration, the command ---


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_control_file_silences_the_meter_and_lets_it_speak_again(
    ttys: tuple[Path, Path], tmp_path: Path, transport: str
) -> None:
    control = tmp_path / "control.json"
    config = both(ttys)
    config.control = str(control)
    energy = [GetRequest(AttributeRef.parse("3/1.0.1.8.0.255/2"))]
    quick = DlmsClientConfig(response_timeout_s=1.0)
    link = {"response_timeout_s": 0.3, "max_retries": 1} if transport == "hdlc" else {}
    async with running(config, HostClock(NOW)) as sim, dcud_reader(transport, sim, ttys[0]) as read:
        meter = sim.meters["em-1"]
        assert (await read(quick, energy, **link)).outcomes[0].ok
        write_control(control, ["em-1"])
        await wait_until(lambda: meter.silent, 10)
        with pytest.raises(PeerTimeout):
            await read(quick, energy, **link)
        if transport == "tcp":
            assert meter.records_of("dropped"), "the request reached the meter and was dropped"
        write_control(control, [])
        await wait_until(lambda: not meter.silent, 10)
        assert (await read(quick, energy, **link)).outcomes[0].ok
        # a physical address names the meter too
        write_control(control, ["17"])
        await wait_until(lambda: meter.silent, 10)


@pytest.mark.slow
async def test_mode_e_sign_on_then_hdlc(ttys: tuple[Path, Path]) -> None:
    config = sim_config(hdlc=str(ttys[1]), mode_e=True)
    energy = [GetRequest(AttributeRef.parse("3/1.0.1.8.0.255/2"))]
    async with running(config, HostClock(NOW)) as sim, dcud_reader("hdlc", sim, ttys[0], mode_e=True) as read:
        meter = sim.meters["em-1"]
        for _ in range(2):  # after DISC the meter listens for a sign-on again
            result = await read(PUBLIC, energy, mode_e=ModeESettings(address=meter.spec.serial))
            assert number(result.outcomes[0].value) == meter.model.import_wh(parse_time(NOW))
        assert sim.runners["dlms"].model.meters[0].mode_e.sign_ons == 2  # type: ignore[attr-defined]
        # HDLC without the sign-on gets no answer from a mode E meter
        with pytest.raises(PeerTimeout):
            await read(PUBLIC, energy, response_timeout_s=0.3, max_retries=0)
        # a sign-on for another meter's address neither
        with pytest.raises(PeerTimeout):
            await read(PUBLIC, energy, mode_e=ModeESettings(address="99999999", reaction_timeout_s=0.5))


def test_the_clock_drifts_and_a_set_restarts_it() -> None:
    clock = HostClock(NOW)
    meter = DlmsMeter(MeterSpec(clock_offset_s=-2.0, clock_drift_ppm=1000.0), clock=clock)
    assert meter.clock.offset_s() == -2.0
    clock.advance(3600)
    assert meter.clock.offset_s() == pytest.approx(1.6)  # -2 s + 3.6 s per hour
    meter.clock.set(clock() + 0.5)
    assert meter.clock.offset_s() == pytest.approx(0.5)
    clock.advance(1000)
    assert meter.clock.offset_s() == pytest.approx(1.5)


def test_configuration_files(tmp_path: Path) -> None:
    path = tmp_path / "sims.toml"
    path.write_text(
        'control = "c.json"\n'
        '[[line]]\nname = "l1"\nlink = "l1.tty"\nbaud = 9600\nmode_e = true\n'
        '[[meter]]\nname = "a"\nline = "l1"\nphysical_address = 18\n'
        "[[meter.client]]\nsap = 16\n"
        '[[meter]]\nname = "b"\ntcp_port = 0\nauthentication_key = "00112233445566778899AABBCCDDEEFF"\n'
    )
    with pytest.raises(SimConfigError, match="client"):
        load_config(path)  # the key is `clients`
    path.write_text(path.read_text().replace("[[meter.client]]", "[[meter.clients]]"))
    config = load_config(path)
    assert config.control == str(tmp_path / "c.json") and config.line[0].link == str(tmp_path / "l1.tty")
    assert [c.sap for c in config.meter[0].clients] == [16] and config.meter[1].tcp_port == 0
    assert [c.sap for c in config.meter[1].clients] == [16, 32, 1], "the default clients"
    as_json = tmp_path / "sims.json"
    as_json.write_text(
        json.dumps({"meter": [{"name": "j", "tcp_port": 4059, "events": [{"at": NOW, "code": 9}]}]})
    )
    assert load_config(as_json).meter[0].events[0].code == 9
    for bad, why in [
        ({"meter": [{"name": "x"}]}, "line"),
        ({"meter": [{"name": "x", "tcp_port": 0, "block_cipher_key": "00"}]}, "block_cipher_key"),
        ({"meter": [{"name": "x", "tcp_port": 0, "profile_period_s": 7}]}, "profile_period_s"),
        ({"meter": [{"name": "x", "line": "nope"}]}, "nope"),
        ({"meter": [{"name": "x", "tcp_port": 0, "clients": [{"sap": 9, "auth": "lls"}]}]}, "password"),
        ({"meter": [{"name": "x", "tcp_port": 0, "colour": "red"}]}, "colour"),
    ]:
        with pytest.raises(SimConfigError, match=why):
            config_from_dict(bad)


@pytest.mark.slow
async def test_the_simulator_reopens_its_tty_after_a_hang_up(tmp_path: Path) -> None:
    pair = SocatPair(tmp_path / "client-tty", tmp_path / "meter-tty")
    pair.start()
    energy = [GetRequest(AttributeRef.parse("3/1.0.1.8.0.255/2"))]
    try:
        async with running(sim_config(hdlc=str(pair.b)), HostClock(NOW)) as sim:
            async with dcud_reader("hdlc", sim, pair.a) as read:
                assert (await read(PUBLIC, energy)).outcomes[0].ok
            pair.kill()
            await wait_until(lambda: sim.runners["dlms"].stats.reopens >= 1, 10)
            pair.start()
            async with dcud_reader("hdlc", sim, pair.a) as read:
                for attempt in range(50):  # the simulator retries its tty every 0.1 s
                    try:
                        result = await read(PUBLIC, energy, response_timeout_s=0.3, max_retries=0)
                        break
                    except PeerTimeout:
                        assert attempt < 49
                assert result.outcomes[0].ok
    finally:
        pair.kill()


@pytest.mark.slow
def test_sim_dlms_command_on_a_pty_and_tcp(tmp_path: Path) -> None:
    link = tmp_path / "dlms.tty"
    proc = start_sim("dlms", "--link", str(link), "--tcp-port", "0", stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        announced = json.loads(proc.stdout.readline())
        assert json.loads(proc.stdout.readline()) == {"ready": True}
        assert announced["meter"] == "dlms-1" and announced["link"] == str(link)
        assert announced["physical_address"] == 17 and announced["tcp"].startswith("127.0.0.1:")
        assert os.path.realpath(link) == announced["path"]
        port = int(announced["tcp"].rsplit(":", 1)[1])

        async def read_both() -> list[Any]:
            energy = [GetRequest(AttributeRef.parse("3/1.0.1.8.0.255/2")), GetRequest(CLOCK)]
            over_tcp = await read_tcp(port, PUBLIC, energy)
            async with hdlc_line(str(link)) as line:
                over_hdlc = await line.read(PUBLIC, energy)
            return [over_tcp, over_hdlc]

        before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
        for result in asyncio.run(read_both()):
            assert result.outcomes[0].ok and number(result.outcomes[0].value) > 1_000_000
            assert clock_time(result.outcomes[1].value).to_datetime() >= before, "the host's clock"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert proc.returncode == 0, proc.stderr.read().decode() if proc.stderr else ""
    bad = subprocess.run(
        [sys.executable, "-m", "dcud", "sim", "dlms"], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert bad.returncode == 1 and "--tcp-port" in bad.stderr and "Traceback" not in bad.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port_in_use = str(taken.getsockname()[1])
        busy = subprocess.run(
            [sys.executable, "-m", "dcud", "sim", "dlms", "--tcp-port", port_in_use],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=False,
            timeout=60,
        )
    assert busy.returncode == 1 and "cannot start" in busy.stderr and "Traceback" not in busy.stderr


@pytest.mark.slow
async def test_two_meters_on_one_line(ttys: tuple[Path, Path]) -> None:
    config = config_from_dict(
        {
            "line": [{"name": "dlms", "device": str(ttys[1])}],
            "meter": [
                {"name": "em-1", "line": "dlms", "physical_address": 17, "base_import_wh": 1000},
                {"name": "em-2", "line": "dlms", "physical_address": 18, "base_import_wh": 2_000_000},
            ],
        }
    )
    energy = [GetRequest(AttributeRef.parse("3/1.0.1.8.0.255/2"))]
    async with running(config, HostClock(NOW)) as sim:
        for name in ("em-1", "em-2"):
            async with dcud_reader("hdlc", sim, ttys[0], meter=name) as read:
                result = await read(PUBLIC, energy)
            meter = sim.meters[name]
            assert number(result.outcomes[0].value) == meter.model.import_wh(parse_time(NOW))
        assert all(len(m.records_of("aarq")) == 1 for m in sim.meters.values()), (
            "each answered its own frames"
        )


# --- hostile input to the meter ---


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=10), st.sampled_from([16, 32, 1, 99]))
def test_random_apdus_never_raise(apdus: list[bytes], sap: int) -> None:
    meter = DlmsMeter(MeterSpec(), clock=HostClock(NOW))
    for apdu in apdus:
        answer = meter.handle("fuzz", sap, apdu)
        assert answer is None or isinstance(answer, bytes)
    assert not meter.records_of("internal_error")


def _aarq_like(draw: st.DrawFn) -> bytes:
    from dcud.codec.dlms.apdu import AARQ, InitiateRequest

    initiate = InitiateRequest(
        conformance=draw(st.integers(0, 0xFFFFFF)),
        max_receive_pdu_size=draw(st.integers(0, 0xFFFF)),
        dlms_version=draw(st.integers(0, 9)),
    ).encode()
    return AARQ(
        application_context=draw(st.integers(0, 5)),
        calling_ap_title=draw(st.none() | st.binary(min_size=0, max_size=10)),
        mechanism=draw(st.none() | st.integers(0, 7)),
        authentication_value=draw(st.none() | st.binary(max_size=70)),
        user_information=draw(st.sampled_from([initiate, b"\x21\x05" + bytes(5), b"\x01", initiate[:-1]])),
    ).encode()


@settings(max_examples=300, deadline=None)
@given(st.data(), st.sampled_from([16, 32, 1]))
def test_random_associations_and_requests_never_raise(data: st.DataObject, sap: int) -> None:
    meter = DlmsMeter(MeterSpec(), clock=HostClock(NOW))
    aarq = data.draw(st.composite(_aarq_like)())
    assert isinstance(meter.handle("fuzz", sap, aarq), bytes), "an AARQ always gets an AARE"
    for _ in range(data.draw(st.integers(0, 5))):
        request = data.draw(
            st.sampled_from(
                [
                    "C001C1000300" + "0100010800FF" + "0200",
                    "C001C1000700" + "0100630100FF" + "0201" + "02",
                    "C002C100000001",
                    "C101C1000800" + "0000010000FF" + "0200" + "090C07E8060106",
                    "C301C1000F0000280000FF010109021000",
                    "C801" + "00",
                    "6200",
                ]
            )
        )
        tail = data.draw(st.binary(max_size=40))
        meter.handle("fuzz", sap, bytes.fromhex(request) + tail)
    assert not meter.records_of("internal_error"), meter.records_of("internal_error")
