"""The readout plan (dcud.service.dlms_plan.ReadoutPlan) without I/O: its phases, what it keeps of a hostile
profile buffer, and (hypothesis) that any answers at all only ever end it with a typed error."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from dcud.codec.dlms.axdr import (
    Array,
    CosemDateTime,
    Data,
    DoubleLongUnsigned,
    Enum,
    Float32,
    Integer,
    LongUnsigned,
    OctetString,
    Structure,
)
from dcud.codec.dlms.client import GetRequest, Outcome, Request, SetRequest
from dcud.codec.dlms.cosem import CLOCK_TIME, CaptureObject, ScalerUnit
from dcud.codec.dlms.obis import AttributeRef, Obis
from dcud.config.model import DlmsConfig, MeterConfig
from dcud.errors import DcudError
from dcud.service.dlms_plan import ObjectCache, ReadoutPlan
from dcud.service.dlms_settings import DlmsMeterSettings

from helpers.axdr_strategies import DATA

NOW = dt.datetime(2024, 6, 1, 12, 0, tzinfo=dt.UTC)
PROFILE = Obis.parse("1.0.99.1.0.255")
ENERGY = Obis.parse("1.0.1.8.0.255")
COLUMNS = (CaptureObject(8, Obis.parse("0.0.1.0.0.255"), 2), CaptureObject(3, ENERGY, 2))


def settings_of(**dlms: Any) -> DlmsMeterSettings:
    meter = MeterConfig(name="m", protocol="dlms", host="127.0.0.1", dlms=DlmsConfig(**dlms))
    return DlmsMeterSettings.from_config(meter, Path("."), "dcu-test")


def stamp(t: dt.datetime) -> OctetString:
    return OctetString(CosemDateTime.from_datetime(t).to_bytes())


def answer(request: Request, value: Data | None = None, result: int = 0) -> Outcome:
    return Outcome(request, result, value)


def run(plan: ReadoutPlan, respond: Any, max_steps: int = 20) -> list[list[Request]]:
    """Drive ``plan`` like the client does, ``respond(request) -> Outcome``; every batch it asked for."""
    outcomes: list[Outcome] = []
    batches: list[list[Request]] = []
    for _ in range(max_steps):
        batch = plan(outcomes)
        if not batch:
            return batches
        batches.append(batch)
        outcomes += [respond(request) for request in batch]
    raise AssertionError("the plan did not end")


def test_phases_and_a_hostile_buffer() -> None:
    settings = settings_of(objects=["1.0.1.8.0.255", "5/1.0.1.4.0.255/2"], profile=str(PROFILE))
    cursor = (NOW - dt.timedelta(hours=1)).timestamp()
    plan = ReadoutPlan(
        settings,
        ObjectCache(),
        profile_cursor_s=cursor,
        wall=lambda: NOW.timestamp() + 2.5,
        dcu_synced=lambda: True,
    )
    rows = [
        NOW - dt.timedelta(hours=1),  # the cursor itself: already committed
        NOW - dt.timedelta(minutes=45),
        NOW - dt.timedelta(minutes=30),
        NOW - dt.timedelta(minutes=40),  # out of order
        NOW + dt.timedelta(days=365),  # from the future: would move the cursor past every row to come
        NOW,
    ]
    buffer = Array(tuple(Structure((stamp(t), DoubleLongUnsigned(1000 + i))) for i, t in enumerate(rows)))

    def respond(request: Request) -> Outcome:
        assert isinstance(request, GetRequest)
        ref = request.attribute
        if ref == AttributeRef(15, Obis.parse("0.0.40.0.0.255"), 2):
            objects = Array(
                (
                    Structure(
                        (LongUnsigned(3), Integer(0), OctetString(ENERGY.to_bytes()), Structure((Array(()),)))
                    ),
                )
            )
            return answer(request, objects)
        if ref == CLOCK_TIME:
            return answer(request, stamp(NOW))
        if ref.index == 3 and ref.class_id == 3:
            return answer(request, ScalerUnit(-1, 30).to_data())
        if ref.class_id == 5 and ref.index == 4:
            return answer(request, ScalerUnit(0, 27).to_data())
        if ref.class_id == 5:
            return answer(request, Float32(float("nan")))
        if ref == AttributeRef(7, PROFILE, 3):
            return answer(request, Array(tuple(c.to_data() for c in COLUMNS)))
        if ref == AttributeRef(7, PROFILE, 4):
            return answer(request, DoubleLongUnsigned(900))
        if ref.class_id == 3 and ref.index == 2:
            return answer(request, DoubleLongUnsigned(12345))
        if ref == AttributeRef(7, PROFILE, 2):
            return answer(request, buffer)
        raise AssertionError(f"unexpected {ref}")

    batches = run(plan, respond)
    asked = [[str(r.attribute) for r in batch if isinstance(r, GetRequest)] for batch in batches]
    assert asked[0] == ["15/0.0.40.0.0.255/2"]  # the bare OBIS needs its class
    assert asked[1] == ["8/0.0.1.0.0.255/2"]  # the clock alone
    assert asked[2] == [
        "3/1.0.1.8.0.255/2",
        "5/1.0.1.4.0.255/2",
        "3/1.0.1.8.0.255/3",
        "5/1.0.1.4.0.255/4",  # a demand register keeps its scaler in attribute 4
        "7/1.0.99.1.0.255/3",
        "7/1.0.99.1.0.255/4",
    ]
    assert asked[3] == ["7/1.0.99.1.0.255/2"]  # the column's scaler is the register's, already known
    range_request = batches[3][0]
    assert isinstance(range_request, GetRequest) and range_request.access is not None
    result = plan.result
    assert result.values[0] == {"id": "1.0.1.8.0.255", "value": 1234.5, "unit": "Wh"}
    assert result.values[1]["value"] is None and "not a finite number" in result.values[1]["invalid"]
    json.dumps(result.values, allow_nan=False)  # what goes out is JSON
    kept = [(r.capture_s, r.values[0]["value"]) for r in result.profile_rows]
    assert kept == [
        ((NOW - dt.timedelta(minutes=45)).timestamp(), 100.1),
        ((NOW - dt.timedelta(minutes=30)).timestamp(), 100.2),
        (NOW.timestamp(), 100.5),
    ]
    assert result.profile_read == {
        "from": "2024-06-01T11:00:01Z",
        "to": "2024-06-01T12:00:00Z",
        "rows": 3,
        "skipped": 3,
    }
    assert result.clock is not None and result.clock["drift_s"] == -2.5 and result.clock["action"] == "none"


def test_a_meter_clock_before_the_cursor_asks_for_no_rows() -> None:
    settings = settings_of(profile=str(PROFILE), clock_sync="set")
    cache = ObjectCache(captures={PROFILE: (COLUMNS, 900)}, scaler_units={(3, ENERGY): None})
    plan = ReadoutPlan(settings, cache, profile_cursor_s=NOW.timestamp(), wall=NOW.timestamp)
    year_2000 = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)  # a meter whose battery ran out

    def respond(request: Request) -> Outcome:
        assert not isinstance(request, SetRequest)  # no verdict from NTP: never set
        return answer(request, stamp(year_2000))

    batches = run(plan, respond)
    assert [len(b) for b in batches] == [1]
    clock = plan.result.clock
    assert clock is not None and clock["action"] == "not_set" and clock["reason"] == "no NTP verdict yet"


REFS = st.sampled_from(["clock", "register", "demand", "profile", "events", "objects"])


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_answers_end_the_plan_or_a_typed_error(data: st.DataObject) -> None:
    settings = settings_of(
        objects=["1.0.1.8.0.255", "5/1.0.1.4.0.255/2", "1/0.0.96.1.0.255/2"],
        profile=str(PROFILE),
        event_logs=["0.0.99.98.0.255"],
        clock_sync=data.draw(st.sampled_from(["off", "report", "set"])),
    )
    plan = ReadoutPlan(
        settings,
        ObjectCache(),
        profile_cursor_s=data.draw(st.none() | st.floats(0, 4e9)),
        wall=NOW.timestamp,
        dcu_synced=lambda: data.draw(st.sampled_from([True, False, None])),
    )
    rows = st.lists(
        st.builds(lambda t, v: Structure((stamp(t), v)), st.datetimes(timezones=st.just(dt.UTC)), DATA),
        max_size=5,
    ).map(lambda items: Array(tuple(items)))

    def respond(request: Request) -> Outcome:
        code = data.draw(st.sampled_from([0, 0, 0, 1, 3, 4, 250]))
        if code:
            return answer(request, None, code)
        return answer(request, data.draw(st.one_of(DATA, rows, st.just(Enum(30)))))

    with contextlib.suppress(DcudError):  # a typed error fails the session, which releases
        run(plan, respond)
    for value in plan.result.values:
        json.dumps(value, default=str, allow_nan=False)
        assert not (isinstance(value.get("value"), float) and math.isnan(value["value"]))
