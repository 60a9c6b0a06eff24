"""The simulated DLMS meter's model: its configuration, its clock, and its values as functions of time.

:class:`MeterSpec` (with :class:`ClientSpec` and :class:`EventSpec`) is one ``[[meter]]`` of the
simulator file; :class:`MeterClock` the meter's own clock (the host's plus an offset that drifts, and
that a SET replaces); :class:`LoadModel` its energy, power, voltage, current and frequency as pure
functions of the meter's time, so a test that knows the configuration knows every answer
(:func:`expected_registers`); :class:`MeterModel` the meter without its protocol: its time, the rows of
its load profile and event log, its counters and request log. The protocol is built on top of it: the
associations and their security in :mod:`dcud.sim.dlms_association`, the COSEM objects in
:mod:`dcud.sim.dlms_objects`, the services in :mod:`dcud.sim.dlms_meter`. Apart from them so that what
the meter *is* reads without the xDLMS machinery.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from dcud.codec.dlms.axdr import CosemDateTime, Data, DoubleLongUnsigned, OctetString, Unsigned
from dcud.codec.dlms.obis import Obis
from dcud.codec.dlms.security import INVOCATION_COUNTER_MAX, Keys, SecurityPolicy
from dcud.runtime.timefmt import rfc3339

if TYPE_CHECKING:
    from dcud.sim.dlms_association import Association
    from dcud.sim.dlms_meter import DlmsMeter

GREEN_BOOK_BLOCK_CIPHER_KEY = "000102030405060708090A0B0C0D0E0F"
GREEN_BOOK_AUTHENTICATION_KEY = "D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF"
DEFAULT_SYSTEM_TITLE = "4D4D4D0000BC614E"
DEFAULT_ORIGIN = "2024-01-01T00:00:00Z"
DAY_S = 86400


RECORDS_KEPT = 5000
"""The request log (:attr:`DlmsMeter.records`) keeps this many newest records."""


# OBIS codes of the simulated meter.
ENERGY_IMPORT = Obis(1, 0, 1, 8, 0, 255)
ENERGY_EXPORT = Obis(1, 0, 2, 8, 0, 255)
POWER_IMPORT = Obis(1, 0, 1, 7, 0, 255)
VOLTAGE_L1 = Obis(1, 0, 32, 7, 0, 255)
CURRENT_L1 = Obis(1, 0, 31, 7, 0, 255)
FREQUENCY = Obis(1, 0, 14, 7, 0, 255)
LOAD_PROFILE = Obis(1, 0, 99, 1, 0, 255)
EVENT_LOG = Obis(0, 0, 99, 98, 0, 255)
EVENT_CODE = Obis(0, 0, 96, 11, 0, 255)
DEVICE_NAME = Obis(0, 0, 42, 0, 0, 255)
SERIAL_NUMBER = Obis(0, 0, 96, 1, 0, 255)

EVENT_POWER_DOWN = 1
EVENT_POWER_UP = 2
POWER_OUTAGE_S = 120
"""A generated power-down event is followed by a power-up this much later."""

# Unit enum values (Blue Book table of units).
UNIT_WH = 30
UNIT_W = 27
UNIT_V = 35
UNIT_A = 33
UNIT_HZ = 44

_IMPORT_SHAPE = (3, 3, 2, 2, 2, 3, 5, 8, 9, 7, 6, 6, 7, 6, 6, 6, 7, 9, 10, 10, 9, 7, 5, 4)
"""Relative consumption per hour of the day (a household: low at night, peaks morning and evening)."""
_EXPORT_SHAPE = (0, 0, 0, 0, 0, 0, 1, 3, 5, 7, 8, 8, 8, 7, 5, 3, 1, 0, 0, 0, 0, 0, 0, 0)
"""Relative export per hour of the day (a small PV plant)."""


# ---------------------------------------------------------------------------------------------------
# Configuration


class ClientSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One client SAP the meter knows, with its association's authentication and protection."""

    sap: int
    auth: Literal["none", "lls", "hls-gmac"] = "none"
    password: str = ""
    security: Literal["none", "authenticated", "encrypted", "authenticated-encrypted"] = "none"
    write: bool = False
    """May SET the clock (the only writable attribute)."""

    def __post_init__(self) -> None:
        if not 0 <= self.sap <= 0x7F:
            raise ValueError(f"client sap {self.sap} is not 0..127")
        if self.auth == "lls" and not self.password:
            raise ValueError(f"client {self.sap}: auth lls needs a password")

    @property
    def policy(self) -> SecurityPolicy:
        """The security policy of this client's associations."""
        return SecurityPolicy(self.security)


def default_clients() -> list[ClientSpec]:
    """Public client 16 (read only), LLS client 32 (password 12345678) and management client 1
    (HLS-GMAC, authenticated and encrypted); the last two may set the clock."""
    return [
        ClientSpec(sap=16),
        ClientSpec(sap=32, auth="lls", password="12345678", write=True),
        ClientSpec(sap=1, auth="hls-gmac", security="authenticated-encrypted", write=True),
    ]


class EventSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """An event in the log: its time (ISO 8601) and code (0..255)."""

    at: str
    code: int

    def __post_init__(self) -> None:
        if not 0 <= self.code <= 255:
            raise ValueError(f"event code {self.code} is not 0..255")
        parse_time(self.at)


class MeterSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One simulated DLMS meter (``[[meter]]`` of the simulator file; docs/dlms.md lists every key)."""

    name: str = "dlms-1"
    physical_address: int = 17
    logical_device: int = 1
    iec_address: str = ""
    serial_number: str = ""
    system_title: str = DEFAULT_SYSTEM_TITLE
    block_cipher_key: str = GREEN_BOOK_BLOCK_CIPHER_KEY
    authentication_key: str = GREEN_BOOK_AUTHENTICATION_KEY
    invocation_counter: int = 1
    max_pdu_size: int = 512
    clients: list[ClientSpec] = msgspec.field(default_factory=default_clients)
    clock_offset_s: float = 0.0
    clock_drift_ppm: float = 0.0
    deviation_min: int = 0
    origin: str = DEFAULT_ORIGIN
    profile_period_s: int = 900
    profile_start: str = ""
    profile_backlog_s: int = 10 * DAY_S
    profile_max_entries: int = 4320
    import_wh_per_period: int = 250
    export_wh_per_period: int = 100
    base_import_wh: int = 1_000_000
    base_export_wh: int = 200_000
    event_interval_s: int = 6 * 3600
    events: list[EventSpec] = msgspec.field(default_factory=list)
    event_log_max_entries: int = 100
    challenge_seed: str = ""
    silent: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.physical_address <= 0x3FFF or not 0 <= self.logical_device <= 0x3FFF:
            raise ValueError("physical_address and logical_device are 0..16383")
        for name in ("system_title", "block_cipher_key", "authentication_key"):
            try:
                raw = bytes.fromhex(getattr(self, name))
            except ValueError:
                raise ValueError(f"{name} is not hex") from None
            if len(raw) != (8 if name == "system_title" else 16):
                raise ValueError(f"{name} must be {8 if name == 'system_title' else 16} bytes")
        if not 1 <= self.invocation_counter <= INVOCATION_COUNTER_MAX:
            raise ValueError("invocation_counter must be 1..2^32-1")
        if not 64 <= self.max_pdu_size <= 0xFFFF:
            raise ValueError("max_pdu_size must be 64..65535")
        if self.profile_period_s <= 0 or DAY_S % self.profile_period_s:
            raise ValueError("profile_period_s must divide a day (60, 300, 900, 1800, 3600...)")
        if int(parse_time(self.origin)) % self.profile_period_s:
            raise ValueError("origin must fall on a capture time (a multiple of profile_period_s)")
        if self.profile_start:
            parse_time(self.profile_start)
        if self.profile_max_entries < 1 or self.event_log_max_entries < 1:
            raise ValueError("profile_max_entries and event_log_max_entries must be positive")
        if min(self.import_wh_per_period, self.export_wh_per_period, self.base_import_wh) < 0:
            raise ValueError("energy values must not be negative")
        if self.base_export_wh < 0 or self.profile_backlog_s < 0 or self.event_interval_s < 0:
            raise ValueError("base_export_wh, profile_backlog_s and event_interval_s must not be negative")
        if not -720 <= self.deviation_min <= 840:
            raise ValueError("deviation_min must be -720..840 minutes")
        saps = [c.sap for c in self.clients]
        if len(set(saps)) != len(saps) or not saps:
            raise ValueError("clients: one entry per sap, at least one")

    @property
    def keys(self) -> Keys:
        """The global keys (EK, AK)."""
        return Keys(bytes.fromhex(self.block_cipher_key), bytes.fromhex(self.authentication_key))

    @property
    def title(self) -> bytes:
        """The meter's system title."""
        return bytes.fromhex(self.system_title)

    @property
    def serial(self) -> str:
        """The serial number (default from the physical address)."""
        return self.serial_number or f"{10_000_000 + self.physical_address}"


def parse_time(text: str) -> float:
    """ISO 8601 (``Z`` allowed; naive means UTC) to seconds since the epoch."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


iso = rfc3339
"""Seconds since the epoch as ``YYYY-MM-DDTHH:MM:SSZ`` (the meter's log and notes)."""


# ---------------------------------------------------------------------------------------------------
# The meter's clock and values


class MeterClock:
    """The meter's own clock: the host clock plus an offset that drifts (``drift_ppm``), and that a SET
    of the clock replaces. ``host`` returns seconds since the epoch (UTC); tests inject their own."""

    def __init__(self, host: Callable[[], float], offset_s: float = 0.0, drift_ppm: float = 0.0) -> None:
        self.host = host
        self.drift_ppm = drift_ppm
        self._base_host_s = host()
        self._base_offset_s = offset_s

    def now(self) -> float:
        """The meter's time, seconds since the epoch (UTC)."""
        host = self.host()
        return host + self._base_offset_s + (host - self._base_host_s) * self.drift_ppm * 1e-6

    def offset_s(self) -> float:
        """Meter time minus host time now (what a clock sync would correct)."""
        return self.now() - self.host()

    def set(self, meter_time_s: float) -> None:
        """Set the meter's time (the drift goes on from there)."""
        self._base_host_s = self.host()
        self._base_offset_s = meter_time_s - self._base_host_s


class LoadModel:
    """The meter's energy as a pure function of time (see docs/dlms.md, "Simulator and decoder").

    Capture period ``k`` (``origin + k * period`` .. the next) imports ``import_per_period(k)`` Wh:
    ``import_wh_per_period * shape[hour] // 6 + (j * 7) % 11`` with ``j`` the period of the day, and
    exports ``export_wh_per_period * export_shape[hour] // 8`` (the shapes repeat every day). The
    import register at a capture time is ``base_import_wh`` plus every period since ``origin``; between
    capture times it grows pro rata. The export register counts tens of Wh (scaler 1).
    """

    def __init__(self, spec: MeterSpec) -> None:
        self.origin_s = int(parse_time(spec.origin))
        self.period_s = spec.profile_period_s
        self.base_import_wh = spec.base_import_wh
        self.base_export_wh = spec.base_export_wh
        per_day = DAY_S // self.period_s
        self.shift = (self.origin_s % DAY_S) // self.period_s
        """Periods of the day before the origin (the origin need not be midnight)."""
        self.import_day = [
            spec.import_wh_per_period * _IMPORT_SHAPE[j * self.period_s // 3600] // 6 + (j * 7) % 11
            for j in range(per_day)
        ]
        self.export_day = [
            spec.export_wh_per_period * _EXPORT_SHAPE[j * self.period_s // 3600] // 8 for j in range(per_day)
        ]
        self._import_prefix = _prefix_sums(self.import_day)
        self._export_prefix = _prefix_sums(self.export_day)

    def period_index(self, t: float) -> int:
        """The capture period ``t`` falls in, counted from ``origin`` (negative before it)."""
        return int((t - self.origin_s) // self.period_s)

    def capture_time(self, index: int) -> int:
        """The start of period ``index`` (a capture time)."""
        return self.origin_s + index * self.period_s

    def ceil_capture(self, t: float) -> int:
        """The first capture time at or after ``t``."""
        return self.capture_time(-int((self.origin_s - t) // self.period_s))

    def _cumulative(self, n: int, prefix: list[int]) -> int:
        """Sum of the increments of periods 0..n-1 (negative n: minus those of n..-1)."""
        per_day = len(prefix) - 1

        def total(k: int) -> int:  # the increments of the day table's entries 0..k-1, for any integer k
            return (k // per_day) * prefix[-1] + prefix[k % per_day]

        return total(n + self.shift) - total(self.shift)

    def import_increment(self, index: int) -> int:
        """Wh imported in period ``index``."""
        return self.import_day[(index + self.shift) % len(self.import_day)]

    def export_increment(self, index: int) -> int:
        """Wh exported in period ``index``."""
        return self.export_day[(index + self.shift) % len(self.export_day)]

    def import_wh(self, t: float) -> int:
        """The import register (Wh) at time ``t``."""
        n = self.period_index(t)
        done = self.base_import_wh + self._cumulative(n, self._import_prefix)
        part = self.import_increment(n) * (t - self.capture_time(n)) / self.period_s
        return max(0, done + int(part))

    def export_wh(self, t: float) -> int:
        """Exported energy (Wh) at time ``t``."""
        n = self.period_index(t)
        done = self.base_export_wh + self._cumulative(n, self._export_prefix)
        part = self.export_increment(n) * (t - self.capture_time(n)) / self.period_s
        return max(0, done + int(part))

    def export_raw(self, t: float) -> int:
        """The export register's raw value (tens of Wh: scaler 1)."""
        return self.export_wh(t) // 10

    def power_w(self, t: float) -> int:
        """Average import power of the period ``t`` falls in (W)."""
        return self.import_increment(self.period_index(t)) * 3600 // self.period_s

    def voltage_raw(self, t: float) -> int:
        """Voltage L1 in 0.1 V: 229.0 .. 231.0 V."""
        return 2290 + (self.period_index(t) * 7) % 21

    def current_raw(self, t: float) -> int:
        """Current L1 in 0.01 A (power over voltage)."""
        return round(self.power_w(t) * 1000 / self.voltage_raw(t))

    def frequency_raw(self, t: float) -> int:
        """Frequency in 0.01 Hz: 49.97 .. 50.03 Hz."""
        return 4997 + (self.period_index(t) * 3) % 7


def _prefix_sums(values: Sequence[int]) -> list[int]:
    out = [0]
    for value in values:
        out.append(out[-1] + value)
    return out


# ---------------------------------------------------------------------------------------------------
# Records (the meter's request log)


@dataclass
class MeterStats:
    """Counters of one meter."""

    requests: int = 0
    responses: int = 0
    dropped: int = 0
    malformed: int = 0
    refused: int = 0
    associations: int = 0
    internal_errors: int = 0


# ---------------------------------------------------------------------------------------------------
# The meter without its protocol


class MeterModel:
    """The simulated meter without its protocol: its clock, its values and rows, its request log.

    ``clock`` gives the host's time (seconds since the epoch, UTC); the meter's own clock runs from it
    with ``spec.clock_offset_s`` and ``spec.clock_drift_ppm``. :class:`~dcud.sim.dlms_meter.DlmsMeter`
    adds the associations, security, COSEM objects and services on top.
    """

    def __init__(self, spec: MeterSpec, clock: Callable[[], float]) -> None:
        self.spec = spec
        self.clock = MeterClock(clock, spec.clock_offset_s, spec.clock_drift_ppm)
        self.zone = timezone(timedelta(minutes=-spec.deviation_min))
        self.model = LoadModel(spec)
        self.stats = MeterStats()
        self.records: deque[dict[str, Any]] = deque(maxlen=RECORDS_KEPT)
        self._seq = 0
        now = self.clock.now()
        start = parse_time(spec.profile_start) if spec.profile_start else now - spec.profile_backlog_s
        self.profile_first_s = self.model.ceil_capture(start)
        """The first capture time the load profile holds (later rows fall off at ``max_entries``)."""
        self.extra_events = sorted((parse_time(e.at), e.code) for e in spec.events)

    # -- time -------------------------------------------------------------------------------------

    def now(self) -> float:
        """The meter's time (seconds since the epoch, UTC)."""
        return self.clock.now()

    def date_time(self, t: float) -> CosemDateTime:
        """``t`` as the meter sends it: local time with its deviation, clock status 0 (ok)."""
        local = datetime.fromtimestamp(t, self.zone)
        return CosemDateTime.from_datetime(local, 0x00)

    def time_of(self, value: CosemDateTime) -> float:
        """A date-time from a client as seconds since the epoch (no deviation: the meter's local time)."""
        moment = value.to_datetime()
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=self.zone)
        return moment.timestamp()

    # -- rows -------------------------------------------------------------------------------------

    def profile_times(self, start_s: float, end_s: float, now_s: float) -> range:
        """Capture times of the load profile rows between ``start_s`` and ``end_s`` (inclusive) that
        exist at ``now_s``: from the profile start, up to now, the newest ``profile_max_entries``."""
        model, spec = self.model, self.spec
        period = model.period_s
        last = model.capture_time(model.period_index(now_s))
        first = max(self.profile_first_s, last - (spec.profile_max_entries - 1) * period)
        if math.isfinite(start_s) and start_s > first:
            first = model.ceil_capture(start_s)
        if math.isfinite(end_s) and end_s < last:
            last = model.capture_time(model.period_index(end_s))
        if last < first:
            return range(0)
        return range(first, last + 1, period)

    def profile_row(self, t: float) -> tuple[Data, ...]:
        """The load profile row captured at ``t``: clock, import register, export register (raw)."""
        return (
            OctetString(self.date_time(t).to_bytes()),
            DoubleLongUnsigned(self.model.import_wh(t)),
            DoubleLongUnsigned(self.model.export_raw(t)),
        )

    def events(self, now_s: float) -> list[tuple[float, int]]:
        """The event log at ``now_s``: (time, code), oldest first, the newest ``event_log_max_entries``."""
        limit = self.spec.event_log_max_entries
        found = [e for e in self.extra_events if e[0] <= now_s]
        interval = self.spec.event_interval_s
        if interval:
            origin = self.model.origin_s
            newest = int((now_s - origin) // interval)
            for m in range(newest, max(-1, newest - limit), -1):
                down = origin + m * interval
                if down + POWER_OUTAGE_S <= now_s:
                    found.append((float(down + POWER_OUTAGE_S), EVENT_POWER_UP))
                found.append((float(down), EVENT_POWER_DOWN))
        found.sort()
        return found[-limit:]

    def _profile_rows(
        self, start_s: float, end_s: float, now_s: float
    ) -> list[tuple[float, tuple[Data, ...]]]:
        return [(t, self.profile_row(t)) for t in self.profile_times(start_s, end_s, now_s)]

    def _event_rows(self, start_s: float, end_s: float, now_s: float) -> list[tuple[float, tuple[Data, ...]]]:
        return [
            (t, (OctetString(self.date_time(t).to_bytes()), Unsigned(code)))
            for t, code in self.events(now_s)
            if start_s <= t <= end_s
        ]

    # -- the request log --------------------------------------------------------------------------

    def record(self, kind: str, association: Association | None = None, **fields: Any) -> dict[str, Any]:
        """Append a record to :attr:`records` (bounded); returns it."""
        self._seq += 1
        entry: dict[str, Any] = {"seq": self._seq, "meter_time": iso(self.now()), "kind": kind}
        if association is not None:
            entry["client_sap"] = association.client.sap
        entry.update(fields)
        self.records.append(entry)
        return entry

    def records_of(self, kind: str) -> list[dict[str, Any]]:
        """Every kept record of ``kind``, oldest first."""
        return [r for r in self.records if r["kind"] == kind]


def expected_registers(meter: DlmsMeter, t: float) -> Iterator[tuple[str, int | float, str]]:
    """``(obis, scaled value, unit)`` of every register at meter time ``t``: what a reader should get."""
    model = meter.model
    yield str(ENERGY_IMPORT), model.import_wh(t), "Wh"
    yield str(ENERGY_EXPORT), model.export_raw(t) * 10, "Wh"
    yield str(POWER_IMPORT), model.power_w(t), "W"
    yield str(VOLTAGE_L1), round(model.voltage_raw(t) / 10, 1), "V"
    yield str(CURRENT_L1), round(model.current_raw(t) / 100, 2), "A"
    yield str(FREQUENCY), round(model.frequency_raw(t) / 100, 2), "Hz"


__all__ = [
    "CURRENT_L1",
    "DAY_S",
    "DEFAULT_ORIGIN",
    "DEFAULT_SYSTEM_TITLE",
    "DEVICE_NAME",
    "ENERGY_EXPORT",
    "ENERGY_IMPORT",
    "EVENT_CODE",
    "EVENT_LOG",
    "EVENT_POWER_DOWN",
    "EVENT_POWER_UP",
    "FREQUENCY",
    "GREEN_BOOK_AUTHENTICATION_KEY",
    "GREEN_BOOK_BLOCK_CIPHER_KEY",
    "LOAD_PROFILE",
    "POWER_IMPORT",
    "POWER_OUTAGE_S",
    "RECORDS_KEPT",
    "SERIAL_NUMBER",
    "UNIT_A",
    "UNIT_HZ",
    "UNIT_V",
    "UNIT_W",
    "UNIT_WH",
    "VOLTAGE_L1",
    "ClientSpec",
    "EventSpec",
    "LoadModel",
    "MeterClock",
    "MeterModel",
    "MeterSpec",
    "MeterStats",
    "default_clients",
    "expected_registers",
    "iso",
    "parse_time",
]
