"""The meter's COSEM objects (Blue Book interface classes 1, 3, 7, 8, 15) and the time they live in.

Values are generated, not stored: every register and every profile row is a pure function of the meter's
clock, so a test that knows the configured start time knows every value the meter will answer.
"""

from __future__ import annotations

import bisect
import calendar
import datetime as dt
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from . import axdr
from .axdr import Data

# Data-Access-Result and Action-Result (IEC 62056-5-3)
SUCCESS = 0
HARDWARE_FAULT = 1
TEMPORARY_FAILURE = 2
READ_WRITE_DENIED = 3
OBJECT_UNDEFINED = 4
OBJECT_CLASS_INCONSISTENT = 9
OBJECT_UNAVAILABLE = 11
TYPE_UNMATCHED = 12
SCOPE_OF_ACCESS_VIOLATED = 13
LONG_GET_ABORTED = 15
NO_LONG_GET_IN_PROGRESS = 16
DATA_BLOCK_NUMBER_INVALID = 19
OTHER_REASON = 250

# access modes of the association's object list
NO_ACCESS = 0
READ_ONLY = 1
READ_WRITE = 3

CLOCK_LN = bytes([0, 0, 1, 0, 0, 255])
ASSOCIATION_LN = bytes([0, 0, 40, 0, 0, 255])
EVENT_CODE_LN = bytes([0, 0, 96, 11, 0, 255])

UNIT_WH = 30
UNIT_V = 35


def obis_bytes(text: str) -> bytes:
    """``"1.0.1.8.0.255"`` (also ``1-0:1.8.0*255``) as the 6-byte logical name."""
    parts = text.replace("-", ".").replace(":", ".").replace("*", ".").split(".")
    if len(parts) != 6:
        raise ValueError(f"not an OBIS code: {text!r}")
    return bytes(int(p) for p in parts)


def obis_text(ln: bytes) -> str:
    """The dotted form of a 6-byte logical name."""
    return ".".join(str(b) for b in ln)


def parse_utc(text: str) -> float:
    """An RFC 3339 / ISO 8601 time (``Z`` or an offset; naive means UTC) as Unix seconds."""
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.timestamp()


def iso_utc(t_s: float) -> str:
    """Unix seconds as ``2024-06-01T12:00:00Z`` (whole seconds)."""
    return dt.datetime.fromtimestamp(int(t_s), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def encode_datetime(t_s: float, deviation_min: int = 0, status: int = 0x00) -> bytes:
    """The 12-byte COSEM date-time of Unix time ``t_s``.

    Blue Book 4.1.6.1: the fields hold local time and ``deviation`` is the minutes from local time to
    UTC (UTC = local + deviation), so a meter on UTC+1 sends -60.
    """
    local = dt.datetime.fromtimestamp(int(t_s) - deviation_min * 60, dt.UTC)
    hundredths = int((t_s - int(t_s)) * 100)
    return (
        local.year.to_bytes(2, "big")
        + bytes([local.month, local.day, local.isoweekday(), local.hour, local.minute, local.second])
        + bytes([hundredths])
        + deviation_min.to_bytes(2, "big", signed=True)
        + bytes([status])
    )


def decode_datetime(raw: bytes, default_deviation_min: int = 0) -> float:
    """Unix seconds of a 12-byte COSEM date-time; unspecified seconds/hundredths read as 0.

    Raises ValueError when a date or hour field is unspecified or out of range.
    """
    if len(raw) != 12:
        raise ValueError("a date-time has 12 bytes")
    year = int.from_bytes(raw[0:2], "big")
    month, day, _weekday, hour, minute, second, hundredths = raw[2:9]
    if 0xFF in (month, day, hour, minute) or year == 0xFFFF:
        raise ValueError("date-time with unspecified date, hour or minute")
    second = 0 if second == 0xFF else second
    hundredths = 0 if hundredths == 0xFF else hundredths
    deviation = int.from_bytes(raw[9:11], "big", signed=True)
    if deviation == -0x8000:
        deviation = default_deviation_min
    local = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    return float(local + deviation * 60) + hundredths / 100.0


class MeterClock:
    """The meter's own clock: a wall-clock reading that runs (or stands still) and that tests move."""

    def __init__(self, start_s: float, running: bool, deviation_min: int = 0) -> None:
        self.base_s = start_s
        self.running = running
        self.deviation_min = deviation_min
        self._mono0 = time.monotonic()

    def now(self) -> float:
        """The meter's current time, Unix seconds."""
        if self.running:
            return self.base_s + (time.monotonic() - self._mono0)
        return self.base_s

    def set(self, t_s: float) -> None:
        """Set the clock (a DLMS SET of the clock, or the test's control channel)."""
        self.base_s = t_s
        self._mono0 = time.monotonic()

    def advance(self, delta_s: float) -> None:
        """Move the clock forward (or back, when negative)."""
        self.set(self.now() + delta_s)


@dataclass(frozen=True)
class Energy:
    """The meter's deterministic load: 15-minute energy steps that vary, and a voltage that wobbles.

    Period ``k`` (from ``start_s``) imports 250 + 25*(k mod 8) Wh and exports 50 + 10*(k mod 3) Wh; the
    registers hold the energy up to ``t`` (partial periods pro rata, rounded down).
    """

    start_s: float
    period_s: int = 900
    import0_wh: int = 1_000_000
    export0_wh: int = 200_000

    def _split(self, t_s: float) -> tuple[int, float]:
        elapsed = max(0.0, t_s - self.start_s)
        periods = int(elapsed // self.period_s)
        return periods, (elapsed - periods * self.period_s) / self.period_s

    def import_wh(self, t_s: float) -> int:
        """Cumulative active energy import (1.0.1.8.0) at ``t_s``, Wh."""
        n, frac = self._split(t_s)
        r = n % 8
        whole = 250 * n + 25 * (28 * (n // 8) + r * (r - 1) // 2)
        return self.import0_wh + whole + int((250 + 25 * r) * frac)

    def export_wh(self, t_s: float) -> int:
        """Cumulative active energy export (1.0.2.8.0) at ``t_s``, Wh."""
        n, frac = self._split(t_s)
        r = n % 3
        whole = 50 * n + 10 * (3 * (n // 3) + r * (r - 1) // 2)
        return self.export0_wh + whole + int((50 + 10 * r) * frac)

    def voltage_dv(self, t_s: float) -> int:
        """Phase voltage (1.0.32.7.0) in tenths of a volt: 229.5 V .. 230.5 V by period."""
        n, _ = self._split(t_s)
        return 2295 + n % 11


class Context(Protocol):
    """What an object needs to know about the request it serves."""

    @property
    def now_s(self) -> float:
        """The meter's time of the request."""
        ...

    @property
    def can_write(self) -> bool:
        """The association may SET (an authenticated client)."""
        ...


class AccessError(Exception):
    """A GET/SET/ACTION refused with a Data-Access-Result (or Action-Result) code."""

    def __init__(self, code: int, why: str = "") -> None:
        super().__init__(why or str(code))
        self.code = code


@dataclass
class Served:
    """One attribute value served, with the facts the request log keeps (rows read, range asked)."""

    value: Data
    note: dict[str, object] = field(default_factory=dict)


class CosemObject:
    """One interface-class instance: attributes by id, each a getter (and maybe a setter)."""

    class_id = 0
    version = 0
    attribute_count = 1

    def __init__(self, ln: bytes) -> None:
        self.ln = ln

    def get(self, attr: int, selector: int | None, params: Data | None, ctx: Context) -> Served:
        """Attribute ``attr``; selective access (``selector``, ``params``) where the class knows it."""
        if selector is not None:
            raise AccessError(OTHER_REASON, "no selective access on this attribute")
        if attr == 1:
            return Served(axdr.octets(self.ln))
        raise AccessError(OBJECT_UNDEFINED, f"attribute {attr}")

    def set(self, attr: int, value: Data, ctx: Context) -> None:
        """SET ``attr``; read-only by default."""
        raise AccessError(READ_WRITE_DENIED, f"attribute {attr} is read-only")

    def access_mode(self, attr: int, can_write: bool) -> int:
        """The access mode the object list advertises for ``attr``."""
        return READ_ONLY

    def selectors(self, attr: int) -> list[int]:
        """The access selectors ``attr`` supports (object list)."""
        return []

    def methods(self) -> list[int]:
        """Method ids (object list)."""
        return []


class DataObject(CosemObject):
    """Class 1 (Data): a value."""

    class_id = 1
    attribute_count = 2

    def __init__(self, ln: bytes, value: Callable[[float], Data]) -> None:
        super().__init__(ln)
        self._value = value

    def get(self, attr: int, selector: int | None, params: Data | None, ctx: Context) -> Served:
        """Attribute 2 is the value."""
        if attr == 2 and selector is None:
            return Served(self._value(ctx.now_s))
        return super().get(attr, selector, params, ctx)


class Register(CosemObject):
    """Class 3 (Register): value (attribute 2) and scaler_unit (attribute 3)."""

    class_id = 3
    attribute_count = 3

    def __init__(self, ln: bytes, raw: Callable[[float], int], tag: int, scaler: int, unit: int) -> None:
        super().__init__(ln)
        self.raw = raw
        self.tag = tag
        self.scaler = scaler
        self.unit = unit

    def value(self, t_s: float) -> Data:
        """The raw (unscaled) attribute 2 at ``t_s``."""
        return Data(self.tag, self.raw(t_s))

    def get(self, attr: int, selector: int | None, params: Data | None, ctx: Context) -> Served:
        """Attributes 2 and 3."""
        if selector is None and attr == 2:
            return Served(self.value(ctx.now_s))
        if selector is None and attr == 3:
            return Served(axdr.struct_(axdr.i8(self.scaler), axdr.enum(self.unit)))
        return super().get(attr, selector, params, ctx)


class Clock(CosemObject):
    """Class 8 (Clock): time (attribute 2, settable by an authenticated client), time zone, status."""

    class_id = 8
    attribute_count = 9

    def __init__(self, clock: MeterClock, on_set: Callable[[float, float], None]) -> None:
        super().__init__(CLOCK_LN)
        self.clock = clock
        self.on_set = on_set

    def get(self, attr: int, selector: int | None, params: Data | None, ctx: Context) -> Served:
        """Attributes 2..9 of a clock on UTC+deviation without daylight saving."""
        if selector is not None:
            return super().get(attr, selector, params, ctx)
        dev = self.clock.deviation_min
        values = {
            2: axdr.octets(encode_datetime(ctx.now_s, dev)),
            3: axdr.i16(-dev),
            4: axdr.u8(0),
            5: axdr.octets(bytes([0xFF, 0xFF, 3, 0xFE, 7, 2, 0, 0, 0, 0x80, 0, 0])),
            6: axdr.octets(bytes([0xFF, 0xFF, 10, 0xFE, 7, 3, 0, 0, 0, 0x80, 0, 0])),
            7: axdr.i8(60),
            8: axdr.boolean(False),
            9: axdr.enum(1),
        }
        if attr in values:
            return Served(values[attr])
        return super().get(attr, selector, params, ctx)

    def set(self, attr: int, value: Data, ctx: Context) -> None:
        """SET attribute 2 moves the meter's clock."""
        if attr != 2:
            super().set(attr, value, ctx)
        if not ctx.can_write:
            raise AccessError(READ_WRITE_DENIED, "this association may not set the clock")
        if value.tag != axdr.OCTET_STRING or len(value.as_bytes) != 12:
            raise AccessError(TYPE_UNMATCHED, "the time is an octet-string of 12 bytes")
        try:
            new_s = decode_datetime(value.as_bytes, self.clock.deviation_min)
        except ValueError as exc:
            raise AccessError(TYPE_UNMATCHED, str(exc)) from None
        old_s = self.clock.now()
        self.clock.set(new_s)
        self.on_set(old_s, new_s)

    def access_mode(self, attr: int, can_write: bool) -> int:
        """The time is writable by authenticated clients."""
        return READ_WRITE if attr == 2 and can_write else READ_ONLY


@dataclass(frozen=True)
class CaptureObject:
    """One column of a profile: class, logical name, attribute, data index."""

    class_id: int
    ln: bytes
    attr: int
    data_index: int = 0

    def to_data(self) -> Data:
        """capture_object_definition."""
        return axdr.struct_(
            axdr.u16(self.class_id), axdr.octets(self.ln), axdr.i8(self.attr), axdr.u16(self.data_index)
        )

    @classmethod
    def from_data(cls, value: Data) -> CaptureObject:
        """Parse a capture_object_definition (raises axdr.DecodeError)."""
        items = value.items
        if len(items) != 4:
            raise axdr.DecodeError("capture object definition has 4 elements")
        return cls(items[0].as_int, items[1].as_bytes, items[2].as_int, items[3].as_int)


class RowSource(Protocol):
    """The entries of a profile: their capture times at ``now`` and each row's values."""

    def times(self, now_s: float) -> Sequence[float]:
        """Capture times of the stored entries, oldest first."""
        ...

    def row(self, t_s: float) -> list[Data]:
        """The values captured at ``t_s`` (one per capture object)."""
        ...


class ProfileGeneric(CosemObject):
    """Class 7 (Profile generic): buffer read in full, by range (selector 1) or by entry (selector 2)."""

    class_id = 7
    version = 1
    attribute_count = 8

    def __init__(
        self, ln: bytes, capture: list[CaptureObject], period_s: int, rows: RowSource, max_entries: int
    ) -> None:
        super().__init__(ln)
        self.capture = capture
        self.period_s = period_s
        self.rows = rows
        self.max_entries = max_entries
        self.deviation_min = 0  # how range bounds with an unspecified deviation are read

    def get(self, attr: int, selector: int | None, params: Data | None, ctx: Context) -> Served:
        """Attribute 2 (buffer, with selective access) and 3..8."""
        if attr == 2:
            return self._buffer(selector, params, ctx.now_s)
        if selector is None:
            values = {
                3: axdr.array([c.to_data() for c in self.capture]),
                4: axdr.u32(self.period_s),
                5: axdr.enum(1),  # fifo
                6: CaptureObject(0, bytes(6), 0, 0).to_data(),
                7: axdr.u32(len(self.rows.times(ctx.now_s))),
                8: axdr.u32(self.max_entries),
            }
            if attr in values:
                return Served(values[attr])
        return super().get(attr, selector, params, ctx)

    def selectors(self, attr: int) -> list[int]:
        """The buffer supports range (1) and entry (2) descriptors."""
        return [1, 2] if attr == 2 else []

    def _buffer(self, selector: int | None, params: Data | None, now_s: float) -> Served:
        times = list(self.rows.times(now_s))
        columns = list(range(len(self.capture)))
        note: dict[str, object] = {"selector": selector or 0}
        try:
            if selector == 1 and params is not None:
                times, columns = self._by_range(times, params, note)
            elif selector == 2 and params is not None:
                times, columns = self._by_entry(times, params, note)
            elif selector is not None:
                raise AccessError(OTHER_REASON, f"access selector {selector}")
        except (axdr.DecodeError, ValueError) as exc:
            raise AccessError(OTHER_REASON, f"bad access parameters: {exc}") from None
        rows = []
        for t in times:
            full = self.rows.row(t)
            rows.append(axdr.struct_(*(full[c] for c in columns)))
        note["rows"] = [iso_utc(t) for t in times]
        return Served(axdr.array(rows), note)

    def _by_range(
        self, times: list[float], params: Data, note: dict[str, object]
    ) -> tuple[list[float], list[int]]:
        items = params.items
        if len(items) != 4:
            raise axdr.DecodeError("range_descriptor has 4 elements")
        restricting = CaptureObject.from_data(items[0])
        if (restricting.class_id, restricting.ln, restricting.attr) != (8, CLOCK_LN, 2):
            raise AccessError(OTHER_REASON, "only the clock column restricts a range")
        from_s = decode_datetime(_datetime_bytes(items[1]), self.deviation_min)
        to_s = decode_datetime(_datetime_bytes(items[2]), self.deviation_min)
        note["from"] = iso_utc(from_s)
        note["to"] = iso_utc(to_s)
        lo = bisect.bisect_left(times, from_s)
        hi = bisect.bisect_right(times, to_s)
        return times[lo:hi], self._columns(items[3])

    def _by_entry(
        self, times: list[float], params: Data, note: dict[str, object]
    ) -> tuple[list[float], list[int]]:
        items = params.items
        if len(items) != 4:
            raise axdr.DecodeError("entry_descriptor has 4 elements")
        from_entry, to_entry, from_col, to_col = (i.as_int for i in items)
        note["from_entry"] = from_entry
        note["to_entry"] = to_entry
        last = len(times) if to_entry == 0 else min(to_entry, len(times))
        selected = times[max(from_entry, 1) - 1 : last]
        last_col = len(self.capture) if to_col == 0 else min(to_col, len(self.capture))
        return selected, list(range(max(from_col, 1) - 1, last_col))

    def _columns(self, selected: Data) -> list[int]:
        wanted = [CaptureObject.from_data(item) for item in selected.items]
        if not wanted:
            return list(range(len(self.capture)))
        columns = []
        for want in wanted:
            if want not in self.capture:
                raise AccessError(OTHER_REASON, f"{want} is not captured")
            columns.append(self.capture.index(want))
        return columns


def _datetime_bytes(value: Data) -> bytes:
    if value.tag in (axdr.OCTET_STRING, axdr.DATE_TIME):
        return value.as_bytes
    raise axdr.DecodeError("a range bound is a date-time")


class LoadProfile:
    """Rows of 1.0.99.1.0.255: clock, energy import, energy export, every ``period_s`` from ``start_s``."""

    def __init__(
        self, energy: Energy, registers: Sequence[Register], max_entries: int, deviation_min: int = 0
    ) -> None:
        self.energy = energy
        self.registers = registers
        self.max_entries = max_entries
        self.deviation_min = deviation_min

    def times(self, now_s: float) -> Sequence[float]:
        """Capture times up to ``now_s``, the newest ``max_entries`` only (the meter's memory)."""
        start, period = self.energy.start_s, self.energy.period_s
        if now_s < start:
            return []
        count = int((now_s - start) // period) + 1
        first = max(0, count - self.max_entries)
        return [start + k * period for k in range(first, count)]

    def row(self, t_s: float) -> list[Data]:
        """Clock, then each register's raw value at the capture time."""
        return [
            axdr.octets(encode_datetime(t_s, self.deviation_min)),
            *(r.value(t_s) for r in self.registers),
        ]


class EventLog:
    """Rows of 0.0.99.98.0.255: fixed events (time, code) that appear once the clock passes them."""

    def __init__(self, events: list[tuple[float, int]], max_entries: int, deviation_min: int = 0) -> None:
        self.events = sorted(events)
        self.max_entries = max_entries
        self.deviation_min = deviation_min

    def times(self, now_s: float) -> Sequence[float]:
        """Times of the events that happened by ``now_s``."""
        happened = [t for t, _ in self.events if t <= now_s]
        return happened[-self.max_entries :]

    def row(self, t_s: float) -> list[Data]:
        """Clock and event code."""
        code = next(c for t, c in self.events if t == t_s)
        return [axdr.octets(encode_datetime(t_s, self.deviation_min)), axdr.u8(code)]

    def last_code(self, now_s: float) -> int:
        """The code of the latest event by ``now_s`` (0 when none)."""
        happened = [c for t, c in self.events if t <= now_s]
        return happened[-1] if happened else 0
