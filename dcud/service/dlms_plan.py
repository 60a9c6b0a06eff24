"""The readout plan of a DLMS/COSEM meter: which requests, phase by phase, and what the answers mean.

A readout is one association (:class:`~dcud.codec.dlms.client.DlmsClient` driven by
:func:`~dcud.service.session_runner.run_session`) whose requests :class:`ReadoutPlan` chooses phase by
phase from the answers so far:

1. the association's object list, only while a bare OBIS code of ``objects`` has no known class;
2. the meter's clock (a GET of its own, so the drift is measured on a short answer);
3. the registers of ``objects`` and what the meter does not change (scaler_units, a profile's capture
   objects and period), the last two read once per process (GET-with-list when negotiated);
4. the scaler_units of the profile's register columns (once);
5. the load profile by range (selective access, selector 1), from one second after the last captured
   row that was committed to the outbox (first contact: ``profile_backfill_s`` before the meter's
   time) to the meter's time: every missed row after an outage, once; long answers come in GET blocks;
6. each event log by range, the same way;
7. with ``clock_sync = "set"``: a SET of the clock when the DCU clock is synchronised (NTP) and the drift
   exceeds ``max_drift_s``, never otherwise.

Pure logic, no I/O: answers in, requests and a :class:`ReadoutResult` out (values, profile rows and
events after the cursors, the clock and its correction). That is why it is a module of its own: it is
tested without a meter (tests/service/test_dlms_plan.py) and used by the polling service and
``dcud read`` alike.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from dcud.codec.dlms.axdr import CosemDateTime, Data, OctetString, date_time_of, number, to_json, utc_datetime
from dcud.codec.dlms.client import GetRequest, Outcome, Request, SetRequest
from dcud.codec.dlms.cosem import (
    ASSOCIATION_LN_OBIS,
    ASSOCIATION_OBJECT_LIST,
    CLASS_ASSOCIATION_LN,
    CLASS_CLOCK,
    CLASS_DEMAND_REGISTER,
    CLASS_EXTENDED_REGISTER,
    CLASS_PROFILE_GENERIC,
    CLASS_REGISTER,
    CLOCK_TIME,
    PROFILE_BUFFER,
    PROFILE_CAPTURE_OBJECTS,
    PROFILE_CAPTURE_PERIOD,
    CaptureObject,
    ObjectListEntry,
    ScalerUnit,
    clock_time,
    clock_value,
    decode_capture_objects,
    decode_object_list,
    decode_scaler_unit,
    profile_rows,
    range_descriptor,
    scaled,
)
from dcud.codec.dlms.obis import AttributeRef, Obis
from dcud.errors import DcudError
from dcud.runtime.timefmt import rfc3339
from dcud.service.dlms_settings import DlmsMeterSettings

OBJECT_LIST = AttributeRef(CLASS_ASSOCIATION_LN, ASSOCIATION_LN_OBIS, ASSOCIATION_OBJECT_LIST)
SCALER_ATTRIBUTE = {CLASS_REGISTER: 3, CLASS_EXTENDED_REGISTER: 3, CLASS_DEMAND_REGISTER: 4}
"""Where the scaler_unit of a register class is (the demand register keeps it in attribute 4)."""
SCALED_ATTRIBUTES = {CLASS_REGISTER: (2,), CLASS_EXTENDED_REGISTER: (2,), CLASS_DEMAND_REGISTER: (2, 3)}
"""The attributes of each register class that the scaler applies to."""
EVENT_CODE_CLASS_IDS = (1, 3)
EVENT_TEXTS = {
    1: "power down",
    2: "power up",
    4: "clock adjusted (old time)",
    5: "clock adjusted (new time)",
}
"""Texts of the few standard event log codes every meter shares (others are reported by number)."""


# --- the readout plan --------------------------------------------------------------------------------


@dataclass
class ObjectCache:
    """What a meter does not change between readouts, learnt once per process."""

    classes: dict[Obis, int] = field(default_factory=dict)
    """Interface class of each OBIS code of the object list."""
    object_list_read: bool = False
    scaler_units: dict[tuple[int, Obis], ScalerUnit | None] = field(default_factory=dict)
    """None: the register has none readable (values are published unscaled, without a unit)."""
    captures: dict[Obis, tuple[tuple[CaptureObject, ...], int]] = field(default_factory=dict)
    """A profile's capture objects and capture period (seconds)."""


@dataclass(frozen=True)
class PlanOptions:
    """What one readout does beyond the registers."""

    profile: bool = True
    events: bool = True
    clock: bool = True
    objects_only: bool = False
    """Only the object list (``dcud dlms objects``)."""


@dataclass
class ProfileRowOut:
    """One profile row: capture time (epoch seconds) and its values as the reading carries them."""

    capture_s: float
    values: list[dict[str, Any]]


@dataclass
class EventOut:
    """One new event-log entry."""

    capture_s: float
    code: int | None
    values: list[Any]


@dataclass
class ReadoutResult:
    """Everything one readout learnt (also when the session failed part way)."""

    values: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    objects: list[ObjectListEntry] | None = None
    clock: dict[str, Any] | None = None
    clock_set: dict[str, Any] | None = None
    profile_rows: list[ProfileRowOut] = field(default_factory=list)
    profile_read: dict[str, Any] | None = None
    events: dict[str, list[EventOut]] = field(default_factory=dict)
    event_reads: dict[str, dict[str, Any]] = field(default_factory=dict)


class ReadoutPlan:
    """The requests of one readout, phase by phase (a :data:`~dcud.codec.dlms.client.Planner`).

    Pure logic: answers in, requests and :attr:`result` out; ``wall`` gives the DCU's time (epoch s) and
    ``dcu_synced`` whether NTP says it is right (asked only when a clock SET is considered).
    """

    def __init__(
        self,
        settings: DlmsMeterSettings,
        cache: ObjectCache,
        *,
        profile_cursor_s: float | None = None,
        event_cursors_s: Mapping[str, float] | None = None,
        options: PlanOptions | None = None,
        wall: Callable[[], float] = time.time,
        dcu_synced: Callable[[], bool | None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.cache = cache
        self.options = options or PlanOptions()
        self.profile_cursor_s = profile_cursor_s
        self.event_cursors_s = dict(event_cursors_s or {})
        self.result = ReadoutResult()
        self._wall = wall
        self._dcu_synced = dcu_synced
        self._meter_now: datetime | None = None
        self._deviation_min: int | None = None
        self._seen = 0
        self._steps: Generator[list[Request], list[Outcome], None] | None = None

    def __call__(self, outcomes: Sequence[Outcome]) -> list[Request]:
        """The next requests, given every outcome of the session so far ([] when done)."""
        new = list(outcomes[self._seen :])
        self._seen = len(outcomes)
        try:
            if self._steps is None:
                self._steps = self._run()
                return next(self._steps)
            return self._steps.send(new)
        except StopIteration:
            return []

    # -- the phases -----------------------------------------------------------------------------

    def _run(self) -> Generator[list[Request], list[Outcome], None]:
        settings, cache, options = self.settings, self.cache, self.options
        if options.objects_only or any(
            spec.ref is None and spec.obis not in cache.classes for spec in settings.objects
        ):
            answers = yield [GetRequest(OBJECT_LIST)]
            self._take_object_list(answers[0])
            if options.objects_only:
                return
        if options.clock or settings.profile is not None or settings.event_logs:
            answers = yield [GetRequest(CLOCK_TIME)]
            self._take_clock(answers[0])
        registers = self._register_refs()
        requests: list[Request] = [GetRequest(ref) for ref in registers]
        scalers = self._missing_scalers([(ref.class_id, ref.obis) for ref in registers])
        requests += [GetRequest(scaler) for scaler in scalers]
        profiles = self._profiles()
        missing_captures = [obis for obis in profiles if obis not in cache.captures]
        for obis in missing_captures:
            requests.append(GetRequest(AttributeRef(CLASS_PROFILE_GENERIC, obis, PROFILE_CAPTURE_OBJECTS)))
            requests.append(GetRequest(AttributeRef(CLASS_PROFILE_GENERIC, obis, PROFILE_CAPTURE_PERIOD)))
        if requests:
            answers = yield requests
            by_ref = _by_attribute(answers)
            self._take_scalers(scalers, by_ref)
            self._take_captures(missing_captures, by_ref)
            self._take_registers(registers, by_ref)
        columns = self._missing_scalers(
            [
                (c.class_id, c.obis)
                for obis in profiles
                for c in cache.captures.get(obis, ((), 0))[0]
                if c.attribute in SCALED_ATTRIBUTES.get(c.class_id, ())
            ]
        )
        if columns:
            answers = yield [GetRequest(scaler) for scaler in columns]
            self._take_scalers(columns, _by_attribute(answers))
        if settings.profile is not None and options.profile and settings.profile in cache.captures:
            window = self._window(self.profile_cursor_s, "profile")
            if window is not None:
                answers = yield [self._range_request(settings.profile, window)]
                self._take_profile(answers[0], window)
        if options.events:
            for obis in settings.event_logs:
                if obis not in cache.captures:
                    continue
                window = self._window(self.event_cursors_s.get(str(obis)), str(obis))
                if window is not None:
                    answers = yield [self._range_request(obis, window)]
                    self._take_events(obis, answers[0], window)
        request = self._clock_set_request()
        if request is not None:
            answers = yield [request]
            self._take_clock_set(answers[0])

    # -- what to ask ----------------------------------------------------------------------------

    def _register_refs(self) -> list[AttributeRef]:
        refs: list[AttributeRef] = []
        for spec in self.settings.objects:
            if spec.ref is not None:
                refs.append(spec.ref)
                continue
            class_id = self.cache.classes.get(spec.obis)
            if class_id is None:
                self._error(str(spec.obis), "not in the association's object list")
            elif class_id == CLASS_PROFILE_GENERIC:
                self._error(str(spec.obis), "a profile: configure it as profile or in event_logs")
            else:
                refs.append(AttributeRef(class_id, spec.obis, 2))
        return refs

    def _missing_scalers(self, registers: Sequence[tuple[int, Obis]]) -> list[AttributeRef]:
        out: list[AttributeRef] = []
        for class_id, obis in registers:
            attribute = SCALER_ATTRIBUTE.get(class_id)
            if attribute is None or (class_id, obis) in self.cache.scaler_units:
                continue
            ref = AttributeRef(class_id, obis, attribute)
            if ref not in out:
                out.append(ref)
        return out

    def _profiles(self) -> list[Obis]:
        out: list[Obis] = []
        if self.settings.profile is not None and self.options.profile:
            out.append(self.settings.profile)
        if self.options.events:
            out += [obis for obis in self.settings.event_logs if obis not in out]
        return out

    def _window(self, cursor_s: float | None, what: str) -> tuple[float, float] | None:
        """The capture times to ask for: after the cursor (or from the backfill) up to the meter's now."""
        now = self._meter_now.timestamp() if self._meter_now is not None else self._wall()
        start = cursor_s + 1 if cursor_s is not None else now - self.settings.dlms.profile_backfill_s
        start = math.floor(start)
        if start > now:
            return None  # nothing can be newer than the meter's clock
        return float(start), float(math.floor(now))

    def _range_request(self, obis: Obis, window: tuple[float, float]) -> GetRequest:
        zone = self._meter_zone()
        start = datetime.fromtimestamp(window[0], UTC).astimezone(zone)
        end = datetime.fromtimestamp(window[1], UTC).astimezone(zone)
        return GetRequest(
            AttributeRef(CLASS_PROFILE_GENERIC, obis, PROFILE_BUFFER), range_descriptor(start, end)
        )

    def _meter_zone(self) -> timezone:
        """The meter's own offset from UTC (its clock's deviation), UTC when unknown."""
        if self._deviation_min is None:
            return UTC
        return timezone(timedelta(minutes=-self._deviation_min))

    def _clock_set_request(self) -> SetRequest | None:
        clock = self.result.clock
        dlms = self.settings.dlms
        if clock is None or dlms.clock_sync == "off" or not self.options.clock:
            return None
        drift = float(clock["drift_s"])
        if abs(drift) <= dlms.max_drift_s:
            clock["action"] = "none"
            return None
        if dlms.clock_sync == "report":
            clock["action"] = "reported"
            return None
        synced = self._dcu_synced()
        if synced is not True:
            clock["action"] = "not_set"
            clock["reason"] = "the DCU clock is not synchronised" if synced is False else "no NTP verdict yet"
            return None
        now = datetime.fromtimestamp(self._wall(), UTC)
        if self._deviation_min is not None:
            now = now.astimezone(self._meter_zone())
        self.result.clock_set = {"to": now.isoformat(), "drift_s": drift}
        return SetRequest(CLOCK_TIME, clock_value(now))

    # -- what came back -------------------------------------------------------------------------

    def _error(self, item: str, message: str) -> None:
        self.result.errors.append({"id": item, "error": message})

    def _take_object_list(self, outcome: Outcome) -> None:
        if not outcome.ok or outcome.value is None:
            self._error(str(OBJECT_LIST), f"object list not readable: {outcome.error_text}")
            return
        try:
            objects = decode_object_list(outcome.value)
        except DcudError as exc:
            self._error(str(OBJECT_LIST), f"object list: {exc}")
            return
        self.result.objects = objects
        self.cache.object_list_read = True
        self.cache.classes = {entry.obis: entry.class_id for entry in objects}

    def _take_clock(self, outcome: Outcome) -> None:
        dcu_s = self._wall()
        if not outcome.ok or outcome.value is None:
            self._error(str(CLOCK_TIME), f"clock not readable: {outcome.error_text}")
            return
        try:
            stamp = clock_time(outcome.value)
            meter = stamp.to_datetime()
        except DcudError as exc:
            self._error(str(CLOCK_TIME), f"clock: {exc}")
            return
        self._deviation_min = stamp.deviation if stamp.deviation_specified else None
        meter_utc = utc_datetime(meter)
        self._meter_now = meter_utc
        self.result.clock = {
            "meter_time": _iso(meter_utc.timestamp()),
            "drift_s": round(meter_utc.timestamp() - dcu_s, 2),
            "checked": _iso(dcu_s),
            "deviation_min": self._deviation_min,
            "status": stamp.clock_status,
            "sync": self.settings.dlms.clock_sync,
        }

    def _take_scalers(self, refs: Sequence[AttributeRef], by_ref: Mapping[AttributeRef, Outcome]) -> None:
        for ref in refs:
            outcome = by_ref.get(ref)
            scaler: ScalerUnit | None = None
            if outcome is not None and outcome.ok and outcome.value is not None:
                try:
                    scaler = decode_scaler_unit(outcome.value)
                except DcudError as exc:
                    self._error(str(ref), f"scaler_unit: {exc}")
            elif outcome is not None:
                self._error(str(ref), f"scaler_unit not readable: {outcome.error_text}")
            self.cache.scaler_units[(ref.class_id, ref.obis)] = scaler

    def _take_captures(self, profiles: Sequence[Obis], by_ref: Mapping[AttributeRef, Outcome]) -> None:
        for obis in profiles:
            objects = by_ref.get(AttributeRef(CLASS_PROFILE_GENERIC, obis, PROFILE_CAPTURE_OBJECTS))
            period = by_ref.get(AttributeRef(CLASS_PROFILE_GENERIC, obis, PROFILE_CAPTURE_PERIOD))
            if objects is None or not objects.ok or objects.value is None:
                text = objects.error_text if objects is not None else "no answer"
                self._error(str(obis), f"capture objects not readable: {text}")
                continue
            try:
                columns = tuple(decode_capture_objects(objects.value))
                seconds = 0
                if period is not None and period.ok and period.value is not None:
                    seconds = int(number(period.value))
            except (DcudError, ValueError, OverflowError) as exc:
                self._error(str(obis), f"capture objects: {exc}")
                continue
            self.cache.captures[obis] = (columns, seconds)

    def _take_registers(self, refs: Sequence[AttributeRef], by_ref: Mapping[AttributeRef, Outcome]) -> None:
        for ref in refs:
            outcome = by_ref.get(ref)
            if outcome is None or not outcome.ok or outcome.value is None:
                text = outcome.error_text if outcome is not None else "no answer"
                self._error(_value_id(ref), text)
                if outcome is not None and outcome.result in (4, 9):  # object-undefined / unavailable
                    self.cache.classes.pop(ref.obis, None)  # ask the object list again next time
                continue
            try:
                self.result.values.append(self._value(ref, outcome.value))
            except DcudError as exc:
                self._error(_value_id(ref), str(exc))

    def _value(self, ref: AttributeRef, data: Data) -> dict[str, Any]:
        """``{id, value, unit}`` of one attribute (scaled when it is a register's value)."""
        entry: dict[str, Any] = {"id": str(ref.obis)}
        if ref.index != 2:
            entry["attribute"] = ref.index
        if ref.index in SCALED_ATTRIBUTES.get(ref.class_id, ()):
            scaler = self.cache.scaler_units.get((ref.class_id, ref.obis))
            if _is_number(data):
                value, unit = scaled(data, scaler)
                if isinstance(value, float) and not math.isfinite(value):
                    # NaN and infinities have no JSON form: the value is withheld, saying why.
                    entry.update(value=None, unit=unit, invalid=f"not a finite number ({value})")
                    return entry
                entry.update(value=value, unit=unit)
                return entry
        entry.update(value=_plain(data), unit=None)
        return entry

    def _rows(
        self, obis: Obis, outcome: Outcome, window: tuple[float, float], cursor_s: float | None
    ) -> tuple[list[tuple[float, tuple[Data, ...]]], dict[str, Any]]:
        """The new rows of a buffer read (capture time after the cursor, in increasing order)."""
        read: dict[str, Any] = {"from": _iso(window[0]), "to": _iso(window[1])}
        if not outcome.ok or outcome.value is None:
            read["error"] = f"buffer not readable: {outcome.error_text}"
            return [], read
        columns, period = self.cache.captures[obis]
        try:
            rows = profile_rows(outcome.value, columns, period)
        except DcudError as exc:
            read["error"] = f"buffer: {exc}"
            return [], read
        out: list[tuple[float, tuple[Data, ...]]] = []
        last = cursor_s if cursor_s is not None else float("-inf")
        skipped = 0
        for row in rows:
            if row.time is None:
                skipped += 1
                continue
            try:
                capture_s = utc_datetime(row.time.to_datetime()).timestamp()
            except DcudError:
                skipped += 1
                continue
            if capture_s <= last or not window[0] <= capture_s <= window[1] + 1:
                # Already committed, out of order (a clock set back), or outside the range asked for: a
                # row "from the future" must not move the cursor past rows still to come.
                skipped += 1
                continue
            out.append((capture_s, row.values))
            last = capture_s
        read["rows"] = len(out)
        if skipped:
            read["skipped"] = skipped
        return out, read

    def _take_profile(self, outcome: Outcome, window: tuple[float, float]) -> None:
        obis = self.settings.profile
        assert obis is not None
        rows, read = self._rows(obis, outcome, window, self.profile_cursor_s)
        columns = self.cache.captures[obis][0]
        for capture_s, values in rows:
            row_values: list[dict[str, Any]] = []
            for column, data in zip(columns, values, strict=True):
                if column.class_id == CLASS_CLOCK:
                    continue
                entry = self._value(column.ref, data)
                if column.data_index:
                    entry["data_index"] = column.data_index
                row_values.append(entry)
            self.result.profile_rows.append(ProfileRowOut(capture_s, row_values))
        self.result.profile_read = read

    def _take_events(self, obis: Obis, outcome: Outcome, window: tuple[float, float]) -> None:
        rows, read = self._rows(obis, outcome, window, self.event_cursors_s.get(str(obis)))
        columns = self.cache.captures[obis][0]
        events: list[EventOut] = []
        for capture_s, values in rows:
            code: int | None = None
            plain: list[Any] = []
            for column, data in zip(columns, values, strict=True):
                if column.class_id == CLASS_CLOCK:
                    continue
                value = _plain(data)
                plain.append(value)
                if code is None and isinstance(value, int) and not isinstance(value, bool):
                    code = value
            events.append(EventOut(capture_s, code, plain))
        self.result.events[str(obis)] = events
        self.result.event_reads[str(obis)] = read

    def _take_clock_set(self, outcome: Outcome) -> None:
        done = self.result.clock_set
        clock = self.result.clock
        assert done is not None and clock is not None
        if outcome.ok:
            clock["action"] = "set"
            clock["set"] = done["to"]
        else:
            clock["action"] = "set_refused"
            clock["reason"] = f"the meter refused the SET: {outcome.error_text}"
            done["error"] = outcome.error_text


def _by_attribute(outcomes: Sequence[Outcome]) -> dict[AttributeRef, Outcome]:
    return {o.request.attribute: o for o in outcomes if isinstance(o.request, GetRequest)}


def _is_number(data: Data) -> bool:
    try:
        number(data)
    except DcudError:
        return False
    return True


def _plain(data: Data) -> Any:
    """A JSON value for a reading: date-times in octet strings as RFC 3339, the rest as :func:`to_json`."""
    if isinstance(data, OctetString) and len(data.value) == CosemDateTime.SIZE:
        with contextlib.suppress(DcudError):
            return _iso(utc_datetime(date_time_of(data).to_datetime()).timestamp())
    return to_json(data)


def _value_id(ref: AttributeRef) -> str:
    return str(ref.obis) if ref.index == 2 else str(ref)


def _iso(epoch_s: float) -> str:
    return rfc3339(epoch_s)


def event_text(code: int | None) -> str:
    """A short text for an event code (``event 23`` when unknown)."""
    if code is None:
        return "event"
    name = EVENT_TEXTS.get(code)
    return f"event {code} ({name})" if name else f"event {code}"


__all__ = [
    "EVENT_CODE_CLASS_IDS",
    "EVENT_TEXTS",
    "OBJECT_LIST",
    "SCALED_ATTRIBUTES",
    "SCALER_ATTRIBUTE",
    "EventOut",
    "ObjectCache",
    "PlanOptions",
    "ProfileRowOut",
    "ReadoutPlan",
    "ReadoutResult",
    "event_text",
]
