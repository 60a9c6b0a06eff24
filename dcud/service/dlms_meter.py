"""DLMS/COSEM meters in the polling service: one readout, its plan, its line or TCP connection, its commit.

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

The association is released (RLRQ) and the link closed at the end, after an error or a timeout too
(the client session does that); when the readout's task is cancelled, :func:`run_dlms_session` closes
the link (HDLC DISC, the TCP connection) within :data:`CANCEL_CLEANUP_S` before the lease ends.

Commit, in this order: the profile rows (each a reading whose ``ts`` is its capture time) and the new
event-log entries (``meter_event`` events) go into the outbox in one transaction together with their
cursors (:meth:`~dcud.service.outbox.Outbox.put_many` marks); then the per-meter state file
(:mod:`dcud.service.dlms_state`); then the registers reading goes the usual way (the polling service's
committer). A crash at any point loses no row and sends none twice: the cursor in force after a
restart is the later of the state file's and the outbox's mark.

Line meters take the line's lease like every other protocol; TCP meters (``host``) need no line and run
at most :data:`TCP_CONCURRENCY` sessions at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Protocol

import structlog

from dcud.codec.dlms.axdr import CosemDateTime, Data, OctetString, date_time_of, number, to_json, utc_datetime
from dcud.codec.dlms.client import (
    Auth,
    DlmsClient,
    DlmsClientConfig,
    DlmsSessionResult,
    GetRequest,
    Outcome,
    Request,
    SetRequest,
)
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
from dcud.codec.dlms.hdlc_link import HdlcLink
from dcud.codec.dlms.mode_e import ModeESettings
from dcud.codec.dlms.obis import AttributeRef, Obis
from dcud.codec.dlms.security import DecipheringError, Keys, SecurityPolicy
from dcud.codec.dlms.wrapper import WrapperTransport
from dcud.config.dlms import (
    ObjectSpec,
    client_system_title,
    meter_keys,
    parse_host,
    parse_obis,
    parse_object,
    physical_address,
)
from dcud.config.model import DlmsConfig, LineConfig, MeterConfig
from dcud.errors import DcudError, LocalProtocolError, PeerTimeout, RemoteProtocolError, TransportError
from dcud.runtime.timefmt import rfc3339
from dcud.service.dlms_state import DlmsStateStore, MeterState, keyset_id, lock_state_dir
from dcud.service.line import LeaseInfo, LeaseKind, LeaseTimeout, LineClosedError, LineRegistry
from dcud.service.meter_read import MeterReading
from dcud.service.session_runner import SessionPort, run_session
from dcud.transport.tcp import SocketTuning, open_stream

log = structlog.get_logger("dcud.dlms")

TCP_CONCURRENCY = 8
"""TCP meters read at once (they share no line; this bounds sockets, memory and CPU)."""
TCP_CONNECT_TIMEOUT_S = 10.0
CANCEL_CLEANUP_S = 3.0
"""After a cancellation: the longest wait for the link to close (DISC/UA) before the lease ends."""
DEFAULT_HDLC_TIMEOUT_S = 5.0
DEFAULT_SESSION_TIMEOUT_S = 10.0
HDLC_MAX_PDU_BYTES = 2048
"""The largest APDU dcud takes on a serial line (longer answers come in GET blocks): at 9600 Bd it is on
the line for 2.3 s, so one answer cannot outlast the session's timeout, and a block costs one round trip
per 2 kB at most. Meters usually accept 512 or 1024 themselves."""
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


# --- settings -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DlmsMeterSettings:
    """One DLMS meter as the readout needs it, derived from dcud.toml exactly as the loader checked it."""

    name: str
    line: str
    host: str
    port: int
    address: str
    physical_address: int | None
    dlms: DlmsConfig
    keys: Keys | None = field(repr=False)
    system_title: bytes
    objects: tuple[ObjectSpec, ...]
    profile: Obis | None
    event_logs: tuple[Obis, ...]
    timeout_s: float | None
    retries: int
    max_baud: int | None
    keyset: str

    @classmethod
    def from_config(cls, meter: MeterConfig, base_dir: Path, device_id: str) -> DlmsMeterSettings:
        """From a validated ``[[meter]]`` (a DlmsConfigError here means the file changed since)."""
        dlms = meter.dlms or DlmsConfig()
        keys = meter_keys(dlms, base_dir)
        title = client_system_title(dlms, device_id)
        host, port = parse_host(meter.host) if meter.host else ("", 0)
        return cls(
            name=meter.name,
            line=meter.line,
            host=host,
            port=port,
            address=meter.address,
            physical_address=physical_address(meter.address) if meter.line else None,
            dlms=dlms,
            keys=keys,
            system_title=title,
            objects=tuple(parse_object(text) for text in dlms.objects),
            profile=parse_obis(dlms.profile) if dlms.profile else None,
            event_logs=tuple(parse_obis(text) for text in dlms.event_logs),
            timeout_s=meter.timeout_s,
            retries=meter.retries,
            max_baud=meter.max_baud,
            keyset=keyset_id(
                keys=keys,
                system_title=title,
                client_sap=dlms.client,
                logical_device=dlms.logical_device,
            ),
        )

    @property
    def where(self) -> str:
        """``line <name>`` or ``host:port`` (for messages)."""
        return f"line {self.line}" if self.line else f"{self.host}:{self.port}"

    def client_config(
        self, invocation_counter: int, limit: int, server_counter: int | None, line: LineConfig | None = None
    ) -> DlmsClientConfig:
        """The session's configuration with the counters the state store handed out.

        On TCP ``timeout_s`` bounds each answer. On HDLC it is the link's per-frame timeout (the link
        retries and gives up by itself); the session's own bound on one answer is a backstop above it
        that also covers the line time of the largest APDU dcud accepts (:data:`HDLC_MAX_PDU_BYTES`).
        """
        dlms = self.dlms
        secured = dlms.auth == "hls-gmac" or dlms.security != "none"
        if self.host:
            max_pdu, timeout_s = 0xFFFF, self.timeout_s or DEFAULT_SESSION_TIMEOUT_S
        else:
            baud = (self.max_baud or 9600) if dlms.mode_e or line is None else line.effective_baud
            link_s = (self.timeout_s or DEFAULT_HDLC_TIMEOUT_S) * 4
            max_pdu = HDLC_MAX_PDU_BYTES
            timeout_s = max(DEFAULT_SESSION_TIMEOUT_S, link_s) + 1.5 * 11 * max_pdu / baud
        return DlmsClientConfig(
            auth=Auth(dlms.auth),
            password=dlms.password.encode(),
            security=SecurityPolicy(dlms.security),
            keys=self.keys,
            system_title=self.system_title if secured else None,
            invocation_counter=invocation_counter,
            invocation_counter_limit=limit,
            server_invocation_counter=server_counter,
            response_timeout_s=timeout_s,
            max_receive_pdu_bytes=max_pdu,
        )

    def transport(self, line: LineConfig | None) -> HdlcLink | WrapperTransport:
        """HDLC on ``line`` (mode E first when configured), or the wrapper for a TCP meter."""
        dlms = self.dlms
        if self.host:
            return WrapperTransport(
                client_sap=dlms.client,
                logical_device=dlms.logical_device,
                response_timeout_s=self.timeout_s or DEFAULT_SESSION_TIMEOUT_S,
            )
        if line is None:
            raise LineClosedError(f"line {self.line} is not configured")
        mode_e: ModeESettings | bool = False
        if dlms.mode_e:
            mode_e = ModeESettings(
                address=dlms.iec_address, initial_baud=line.effective_baud, max_baud=self.max_baud
            )
        return HdlcLink(
            client_sap=dlms.client,
            logical_device=dlms.logical_device,
            physical_address=self.physical_address,
            response_timeout_s=self.timeout_s or DEFAULT_HDLC_TIMEOUT_S,
            baud=None if dlms.mode_e else line.effective_baud,
            mode_e=mode_e,
        )

    def describe(self) -> dict[str, Any]:
        """What the state document shows of the configuration (never a secret)."""
        doc: dict[str, Any] = {
            "transport": "tcp" if self.host else "hdlc",
            "client": self.dlms.client,
            "logical_device": self.dlms.logical_device,
            "auth": self.dlms.auth,
            "security": self.dlms.security,
        }
        if self.host:
            doc["host"] = f"{self.host}:{self.port}"
        return doc


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


# --- running one session -------------------------------------------------------------------------------


class MeterUnreachable(PeerTimeout):
    """A TCP meter that cannot be connected to, or closed the connection."""


class DlmsStateError(LocalProtocolError):
    """The durable state cannot be written (or locked): no session may start without it."""


class TcpPort:
    """A TCP connection with the port interface ``run_session`` drives (no baud, no framing)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, where: str) -> None:
        self.reader = reader
        self.writer = writer
        self.where = where

    def write(self, data: bytes) -> None:
        """Send ``data``."""
        self.writer.write(data)

    async def drain(self) -> None:
        """Wait for the socket buffer."""
        try:
            await self.writer.drain()
        except OSError as exc:
            raise MeterUnreachable(f"{self.where}: {exc.strerror or exc}") from exc

    async def read(self, max_bytes: int = 4096, timeout_s: float = 1.0) -> bytes:
        """What arrived; ``b""`` after ``timeout_s``; MeterUnreachable when the meter closed."""
        try:
            async with asyncio.timeout(timeout_s):
                data = await self.reader.read(max_bytes)
        except TimeoutError:
            return b""
        except OSError as exc:
            raise MeterUnreachable(f"{self.where}: {exc.strerror or exc}") from exc
        if not data:
            raise MeterUnreachable(f"{self.where} closed the connection")
        return data

    async def set_baud(self, baud: int) -> None:
        """Nothing: TCP has no rate."""

    async def set_framing(self, framing: str) -> None:
        """Nothing: TCP has no framing."""

    def flush_input(self) -> None:
        """Nothing to drop: the session reads every byte."""

    async def close(self) -> None:
        """Close the connection (bounded)."""
        self.writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()


async def open_tcp(host: str, port: int, timeout_s: float = TCP_CONNECT_TIMEOUT_S) -> TcpPort:
    """A TCP connection to a meter (dcud's socket tuning: TCP_NODELAY, so every APDU goes out at once;
    keepalive and a user timeout); MeterUnreachable when there is none within ``timeout_s``."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        reader, writer = await open_stream(host, port, timeout_s=timeout_s, tuning=SocketTuning())
    except TimeoutError:
        raise MeterUnreachable(f"no TCP connection to {where} within {timeout_s:g} s") from None
    except OSError as exc:
        raise MeterUnreachable(f"cannot connect to {where}: {exc.strerror or exc}") from None
    return TcpPort(reader, writer, where)


class _Resumed:
    """A started session seen as a new one whose first actions are given (the close after a cancel)."""

    def __init__(self, client: DlmsClient, first: list[object]) -> None:
        self.client = client
        self.first = first

    def start(self, now: float) -> list[object]:
        return self.first

    def receive_data(self, data: bytes, now: float) -> list[object]:
        return self.client.receive_data(data, now)

    def handle_timer(self, now: float) -> list[object]:
        return self.client.handle_timer(now)

    def next_deadline(self) -> float | None:
        return self.client.next_deadline()


async def run_dlms_session(
    client: DlmsClient, port: SessionPort, *, cleanup_s: float = CANCEL_CLEANUP_S
) -> DlmsSessionResult:
    """Run ``client`` on ``port`` to its end. When the task is cancelled, the link is closed first (the
    DISC, bounded by ``cleanup_s``) so the line is left clean before the lease ends; then the
    cancellation goes on."""
    try:
        result: DlmsSessionResult = await run_session(client, port)
        return result
    except asyncio.CancelledError:
        first = client.abort(asyncio.get_running_loop().time())
        if first or client.next_deadline() is not None:
            # A second cancellation is not suppressed: it ends the clean-up too.
            with contextlib.suppress(DcudError, TimeoutError, OSError):
                async with asyncio.timeout(cleanup_s):
                    await run_session(_Resumed(client, first), port)
        raise


async def dlms_session(
    settings: DlmsMeterSettings,
    line: LineConfig | None,
    port: SessionPort,
    store: DlmsStateStore,
    plan: ReadoutPlan,
) -> DlmsSessionResult:
    """One association on ``port`` following ``plan``, with invocation counters from ``store`` (the
    reservation is on disk before the first one is used; the state is updated however it ends)."""
    state = store.get(settings.name)
    start, limit = state.counter_range(settings.keyset)
    if state.dirty:
        try:
            await asyncio.to_thread(store.save, settings.name)
        except OSError as exc:
            # Without the reservation on disk a crash could reuse counters: no session.
            raise DlmsStateError(f"cannot save the DLMS state of {settings.name}: {exc}") from exc
    server_counter = state.server_counters.get(settings.keyset)
    client = DlmsClient(
        settings.transport(line), settings.client_config(start, limit, server_counter, line), planner=plan
    )
    try:
        return await run_dlms_session(client, port)
    finally:
        state.counter_used(settings.keyset, client.next_invocation_counter)
        state.set_server_counter(settings.keyset, client.server_invocation_counter)


# --- the polling side ---------------------------------------------------------------------------------


class MarkingOutbox(Protocol):
    """What the readouts need of :class:`~dcud.service.outbox.Outbox`."""

    async def put_many(
        self, items: Sequence[tuple[str, str, bytes]], *, marks: Mapping[str, str] | None = None
    ) -> Any:
        """Commit items and marks in one transaction."""
        ...

    def mark(self, key: str) -> str | None:
        """A committed mark."""
        ...


def profile_mark(meter: str) -> str:
    """Outbox mark key of a meter's profile cursor (value ``"<obis> <capture epoch s>"``)."""
    return f"dlms:{meter}:profile"


def event_mark(meter: str, obis: str) -> str:
    """Outbox mark key of an event log's cursor (value ``"<capture epoch s>"``)."""
    return f"dlms:{meter}:events:{obis}"


class DlmsReadouts:
    """The DLMS meters of one polling service: settings, per-meter locks and caches, TCP slots.

    :meth:`read` is what the polling service calls for a scheduled readout and for ``cmd/read``.
    """

    def __init__(
        self,
        meters: Sequence[MeterConfig],
        lines: Sequence[LineConfig],
        *,
        registry: LineRegistry | None,
        outbox: MarkingOutbox,
        state_dir: Path | None,
        base_dir: Path,
        device_id: str,
        next_seq: Callable[[str], int],
        dcu_synced: Callable[[], bool | None],
        wall: Callable[[], float] = time.time,
        tcp_concurrency: int = TCP_CONCURRENCY,
    ) -> None:
        self.settings: dict[str, DlmsMeterSettings] = {}
        self.setting_errors: dict[str, str] = {}
        for meter in meters:
            if meter.protocol != "dlms":
                continue
            try:
                self.settings[meter.name] = DlmsMeterSettings.from_config(meter, base_dir, device_id)
            except (DcudError, ValueError) as exc:  # the key file changed since the configuration loaded
                self.setting_errors[meter.name] = str(exc)
        self._line_cfgs = {line.name: line for line in lines}
        self._registry = registry
        self._outbox = outbox
        self._state_dir = state_dir
        self.store = DlmsStateStore(state_dir, wall)
        self._next_seq = next_seq
        self._dcu_synced = dcu_synced
        self._wall = wall
        self._tcp_slots = asyncio.Semaphore(tcp_concurrency)
        self._locks: dict[str, asyncio.Lock] = {}
        self._caches: dict[str, ObjectCache] = {}
        self._holders: dict[str, str] = {}
        self._locked = state_dir is None

    async def _lock_state(self) -> None:
        if not self._locked and self._state_dir is not None:
            # Held for the life of the process; waits while a `dcud read` of a DLMS meter runs.
            try:
                await asyncio.to_thread(lock_state_dir, self._state_dir, wait=True)
            except OSError as exc:
                where = self._state_dir
                raise DlmsStateError(f"cannot lock the DLMS state directory {where}: {exc}") from exc
            self._locked = True

    async def read(
        self, meter: MeterConfig, kind: str, owner: str, *, lease_timeout_s: float, trigger: str
    ) -> MeterReading:
        """One readout with the meter's retries; raises what the line or the meter raised."""
        settings = self.settings.get(meter.name)
        if settings is None:  # its key file became unreadable since the configuration was loaded
            why = self.setting_errors.get(meter.name, "not a DLMS meter")
            raise LocalProtocolError(f"meter {meter.name}: {why}")
        await self._lock_state()
        lock = self._locks.setdefault(meter.name, asyncio.Lock())
        try:
            async with asyncio.timeout(lease_timeout_s):
                await lock.acquire()
        except TimeoutError:
            holder = self._holders.get(meter.name, "poll")
            info = LeaseInfo(holder, holder.split(":")[0], 0, self._wall())
            raise LeaseTimeout(f"meter {meter.name} is being read by {holder}", info, "open") from None
        self._holders[meter.name] = owner
        try:
            attempts = 1 + settings.retries
            for attempt in range(attempts):
                try:
                    return await self._read_once(settings, kind, owner, lease_timeout_s, trigger, attempt)
                except (PeerTimeout, RemoteProtocolError) as exc:
                    # A busy line, wrong keys or a replay: asking again at once changes nothing.
                    if isinstance(exc, LeaseTimeout | DecipheringError) or attempt == attempts - 1:
                        raise
            raise AssertionError("unreachable")  # pragma: no cover
        finally:
            self._holders.pop(meter.name, None)
            lock.release()

    @contextlib.asynccontextmanager
    async def _port(
        self, settings: DlmsMeterSettings, kind: str, owner: str, lease_timeout_s: float
    ) -> AsyncIterator[tuple[SessionPort, LineConfig | None]]:
        if settings.host:
            async with self._tcp_slots:
                port = await open_tcp(settings.host, settings.port)
                try:
                    yield port, None
                finally:
                    await port.close()
            return
        line = self._registry.get(settings.line) if self._registry is not None else None
        line_cfg = self._line_cfgs.get(settings.line)
        if line is None or line_cfg is None:
            raise LineClosedError(f"line {settings.line} is not available")
        lease_kind: LeaseKind = "cli" if kind == "cli" else "poll"
        async with line.lease(owner, lease_kind, timeout_s=lease_timeout_s) as leased:
            yield leased, line_cfg

    def _cursors(
        self, settings: DlmsMeterSettings, state: MeterState
    ) -> tuple[float | None, dict[str, float]]:
        """The cursors in force: the later of the state file's and the outbox's marks."""
        profile_cursor: float | None = None
        if settings.profile is not None:
            obis = str(settings.profile)
            profile_cursor = state.profile_cursor(obis)
            mark = self._outbox.mark(profile_mark(settings.name))
            if mark:
                mark_obis, _, value = mark.partition(" ")
                with contextlib.suppress(ValueError):
                    if mark_obis == obis and (profile_cursor is None or float(value) > profile_cursor):
                        profile_cursor = float(value)
                        state.set_profile_cursor(obis, profile_cursor)
        events: dict[str, float] = {}
        for log_obis in settings.event_logs:
            key = str(log_obis)
            cursor = state.event_cursors_s.get(key)
            mark = self._outbox.mark(event_mark(settings.name, key))
            with contextlib.suppress(ValueError, TypeError):
                if mark and (cursor is None or float(mark) > cursor):
                    cursor = float(mark)
                    state.set_event_cursor(key, cursor)
            if cursor is not None:
                events[key] = cursor
        return profile_cursor, events

    async def _read_once(
        self,
        settings: DlmsMeterSettings,
        kind: str,
        owner: str,
        lease_timeout_s: float,
        trigger: str,
        retries: int,
    ) -> MeterReading:
        name = settings.name
        state = self.store.get(name)
        profile_cursor, event_cursors = self._cursors(settings, state)
        plan = ReadoutPlan(
            settings,
            self._caches.setdefault(name, ObjectCache()),
            profile_cursor_s=profile_cursor,
            event_cursors_s=event_cursors,
            wall=self._wall,
            dcu_synced=self._dcu_synced,
        )
        started = self._wall()
        error: DcudError | None = None
        session: DlmsSessionResult | None = None
        try:
            async with self._port(settings, kind, owner, lease_timeout_s) as (port, line_cfg):
                session = await dlms_session(settings, line_cfg, port, self.store, plan)
        except (LeaseTimeout, LineClosedError):
            raise
        except TransportError as exc:
            if settings.host:
                error = MeterUnreachable(str(exc))
            else:
                raise
        except DcudError as exc:
            error = exc
        result = plan.result
        committed = await self._commit(settings, state, result, trigger)
        state.clock = result.clock or state.clock
        try:
            await asyncio.to_thread(self.store.save, name)
        except OSError as exc:
            log.warning("DLMS state not saved", meter=name, error=str(exc))
        if error is not None:
            raise error
        finished = self._wall()
        details: dict[str, Any] = {}
        if settings.host:
            details["host"] = f"{settings.host}:{settings.port}"
        if result.clock is not None:
            details["meter_clock"] = result.clock["meter_time"]
            details["clock_drift_s"] = result.clock["drift_s"]
        if result.errors:
            details["errors"] = list(result.errors)
        if session is not None and not session.released:
            details["released"] = False
        return MeterReading(
            meter=name,
            protocol="dlms",
            values=list(result.values),
            details=details,
            started_s=started,
            finished_s=finished,
            retries=retries,
            publish=bool(result.values),
            state={"dlms": self._state_doc(settings, state, result, committed)},
        )

    def _state_doc(
        self, settings: DlmsMeterSettings, state: MeterState, result: ReadoutResult, committed: dict[str, Any]
    ) -> dict[str, Any]:
        doc = settings.describe()
        if state.clock:
            doc["clock"] = dict(state.clock)
        if settings.profile is not None:
            cursor = state.profile_cursor(str(settings.profile))
            profile: dict[str, Any] = {
                "obis": str(settings.profile),
                "last_capture": _iso(cursor) if cursor is not None else None,
            }
            if result.profile_read is not None:
                profile["last_read"] = {**result.profile_read, "committed": committed.get("rows", 0)}
            doc["profile"] = profile
        if settings.event_logs:
            doc["event_logs"] = {
                str(obis): {
                    "last_capture": _iso(state.event_cursors_s[str(obis)])
                    if str(obis) in state.event_cursors_s
                    else None,
                    **(
                        {"last_read": result.event_reads[str(obis)]}
                        if str(obis) in result.event_reads
                        else {}
                    ),
                }
                for obis in settings.event_logs
            }
        doc["errors"] = list(result.errors)
        if "error" in committed:
            doc["commit_error"] = committed["error"]
        return doc

    async def _commit(
        self, settings: DlmsMeterSettings, state: MeterState, result: ReadoutResult, trigger: str
    ) -> dict[str, Any]:
        """Profile rows and events into the outbox with their cursors in one transaction, then the state."""
        name = settings.name
        items: list[tuple[str, str, bytes]] = []
        marks: dict[str, str] = {}
        received = _iso(self._wall())
        if result.profile_rows and settings.profile is not None:
            obis = str(settings.profile)
            for row in result.profile_rows:
                payload = {
                    "meter": name,
                    "ts": _iso(row.capture_s),
                    "seq": self._next_seq(name),
                    "values": row.values,
                    "protocol": "dlms",
                    "line": settings.line,
                    "address": settings.address,
                    "trigger": trigger,
                    "profile": obis,
                }
                if settings.host:
                    payload["host"] = f"{settings.host}:{settings.port}"
                items.append(("reading", f"meter/{name}/reading", _json(payload)))
            marks[profile_mark(name)] = f"{obis} {result.profile_rows[-1].capture_s:.0f}"
        for log_obis, events in result.events.items():
            for event in events:
                payload = {
                    "type": "meter_event",
                    "ts": _iso(event.capture_s),
                    "text": f"meter {name}: {event_text(event.code)}",
                    "meter": name,
                    "log": log_obis,
                    "code": event.code,
                    "values": event.values,
                    "received": received,
                }
                items.append(("event", "event", _json(payload)))
            if events:
                marks[event_mark(name, log_obis)] = f"{events[-1].capture_s:.0f}"
        clock_set = result.clock_set
        if clock_set is not None and result.clock is not None and result.clock.get("action") == "set":
            payload = {
                "type": "meter_clock_set",
                "ts": received,
                "text": f"meter {name}: clock corrected by {-clock_set['drift_s']:+.1f} s",
                "meter": name,
                "drift_s": clock_set["drift_s"],
            }
            items.append(("event", "event", _json(payload)))
        if not items:
            return {}
        try:
            await self._outbox.put_many(items, marks=marks)
        except DcudError as exc:
            # Nothing was committed and no cursor moved: the same rows are asked for next time.
            log.warning("DLMS rows not committed", meter=name, error=str(exc))
            return {"error": str(exc)}
        if result.profile_rows and settings.profile is not None:
            state.set_profile_cursor(str(settings.profile), result.profile_rows[-1].capture_s)
        for log_obis, events in result.events.items():
            if events:
                state.set_event_cursor(log_obis, events[-1].capture_s)
        return {"rows": len(result.profile_rows), "events": sum(len(e) for e in result.events.values())}


def _json(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), default=str).encode()


__all__ = [
    "CANCEL_CLEANUP_S",
    "TCP_CONCURRENCY",
    "DlmsMeterSettings",
    "DlmsReadouts",
    "DlmsStateError",
    "MeterUnreachable",
    "ObjectCache",
    "PlanOptions",
    "ReadoutPlan",
    "ReadoutResult",
    "TcpPort",
    "dlms_session",
    "event_mark",
    "event_text",
    "open_tcp",
    "profile_mark",
    "run_dlms_session",
]
