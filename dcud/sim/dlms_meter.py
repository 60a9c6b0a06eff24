"""A simulated DLMS/COSEM electricity meter: the application layer of ``dcud sim dlms``, on dcud's codec.

:class:`DlmsMeter` is the server side of the xDLMS/ACSE layer, without I/O: :meth:`DlmsMeter.handle`
takes one request APDU (as the HDLC server link or the wrapper delivered it, with the client SAP and the
channel it came on) and returns the response APDU, or None when a meter would stay silent. It uses the
codec's server-side encoders and decoders (:mod:`dcud.codec.dlms.apdu`, :mod:`~dcud.codec.dlms.security`,
:mod:`~dcud.codec.dlms.axdr`): the simulator is dcud's own server, for the demo, field checks and
benchmarks. The independent reference for interoperability is the test peer in tests/peers/.

- **Associations** (one per client SAP and channel): public (no authentication), LLS (password) and
  HLS-GMAC (mechanism 5: StoC in the AARE, the client's f(StoC) checked in reply_to_HLS_authentication,
  f(CtoS) returned), each with a security policy of suite 0 (none, authenticated, encrypted or both;
  global or dedicated key, service-specific or general-glo ciphering, answered the way the request came).
  Every protected request's GCM tag is checked and its invocation counter must be above the last one
  accepted from that client SAP (kept for the meter's life, across associations); the meter's own
  counter never repeats.
- **Objects**: the association (object list with each client's access rights), the clock (read and set,
  with a configurable offset and drift), registers with scaler_unit (active energy import and export,
  voltage, current, power, frequency), a load profile (class 7, capture period 15 minutes by default,
  read in full, by range or by entry, values a pure function of the capture time) and an event log.
- **Time** comes from an injected clock (``clock``: seconds since the epoch, UTC); values derive from the
  meter's time only, so a test that knows the configuration knows every answer (:class:`LoadModel`).
- Long answers go in GET data blocks sized to the client's max receive PDU (capped by the meter's
  ``max_pdu_size``); long SETs are taken in blocks; GET/SET with list are served.

Nothing raises out of :meth:`DlmsMeter.handle`: a malformed APDU is logged and left unanswered, a refused
request gets the Data-Access-Result / exception-response a meter gives.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

import msgspec

from dcud.codec.dlms.apdu import (
    AARE,
    AARQ,
    DED_TAGS,
    DIAGNOSTIC_AUTHENTICATION_FAILURE,
    DIAGNOSTIC_AUTHENTICATION_REQUIRED,
    GLO_TAGS,
    OID_PREFIX_CONTEXT,
    OID_PREFIX_MECHANISM,
    RLRE,
    RLRQ,
    TAG_GENERAL_DED_CIPHERING,
    TAG_GENERAL_GLO_CIPHERING,
    TAG_INITIATE_REQUEST,
    AccessResult,
    AccessSelection,
    ActionRequestNormal,
    ActionRequestWithList,
    ActionResponseNormal,
    ActionResponseWithList,
    ActionResult,
    Apdu,
    ApplicationContext,
    AssociationResult,
    AttributeWithSelection,
    CipheredApdu,
    ConfirmedServiceError,
    Conformance,
    ExceptionResponse,
    GeneralCiphering,
    GetDataResult,
    GetRequestNext,
    GetRequestNormal,
    GetRequestWithList,
    GetResponseNormal,
    GetResponseWithDatablock,
    GetResponseWithList,
    InitiateRequest,
    InitiateResponse,
    Mechanism,
    SetRequestNormal,
    SetRequestWithDatablock,
    SetRequestWithFirstDatablock,
    SetRequestWithList,
    SetResponseDatablock,
    SetResponseLastDatablock,
    SetResponseNormal,
    SetResponseWithList,
    decode_apdu,
    decode_xdlms_initiate,
    encode_get_results,
)
from dcud.codec.dlms.axdr import (
    Array,
    BitString,
    Boolean,
    CosemDate,
    CosemDateTime,
    CosemTime,
    Data,
    DateTime,
    DoubleLong,
    DoubleLongUnsigned,
    Enum,
    Integer,
    Long,
    LongUnsigned,
    Null,
    OctetString,
    Structure,
    Unsigned,
    VisibleString,
    array_of,
    date_time_of,
    decode_data,
    encode_data,
    number,
    structure_of,
)
from dcud.codec.dlms.cosem import (
    ASSOCIATION_LN_OBIS,
    ASSOCIATION_REPLY_TO_HLS,
    CLASS_ASSOCIATION_LN,
    CLASS_CLOCK,
    CLASS_DATA,
    CLASS_PROFILE_GENERIC,
    CLASS_REGISTER,
    CLOCK_OBIS,
    SELECTOR_ENTRY,
    SELECTOR_RANGE,
    CaptureObject,
    ScalerUnit,
)
from dcud.codec.dlms.obis import AttributeRef, Obis
from dcud.codec.dlms.security import (
    INVOCATION_COUNTER_MAX,
    InvocationCounter,
    Keys,
    SecurityPolicy,
    hls_gmac_response,
    protect,
    unprotect,
    verify_hls_gmac,
)
from dcud.errors import DcudError
from dcud.runtime.timefmt import rfc3339

GREEN_BOOK_BLOCK_CIPHER_KEY = "000102030405060708090A0B0C0D0E0F"
GREEN_BOOK_AUTHENTICATION_KEY = "D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF"
DEFAULT_SYSTEM_TITLE = "4D4D4D0000BC614E"
DEFAULT_ORIGIN = "2024-01-01T00:00:00Z"
DAY_S = 86400

METER_CONFORMANCE = (
    Conformance.BLOCK_TRANSFER_WITH_GET_OR_READ
    | Conformance.BLOCK_TRANSFER_WITH_SET_OR_WRITE
    | Conformance.MULTIPLE_REFERENCES
    | Conformance.GET
    | Conformance.SET
    | Conformance.SELECTIVE_ACCESS
    | Conformance.ACTION
)
"""What the simulated meter offers; the AARE grants the intersection with the client's proposal."""

MAX_LIST_ITEMS = 64
"""Attributes in one GET/SET-with-list; a longer list is refused as a whole."""
MAX_SET_BYTES = 65536
"""A SET value reassembled from blocks (the clock needs 14 bytes)."""
RECORDS_KEPT = 5000
"""The request log (:attr:`DlmsMeter.records`) keeps this many newest records."""
CHALLENGE_BYTES = 16
"""The meter's HLS challenge StoC."""

# Data-Access-Result / Action-Result codes used here.
READ_WRITE_DENIED = 3
OBJECT_UNDEFINED = 4
OBJECT_CLASS_INCONSISTENT = 9
OBJECT_UNAVAILABLE = 11
TYPE_UNMATCHED = 12
LONG_GET_ABORTED = 15
NO_LONG_GET_IN_PROGRESS = 16
LONG_SET_ABORTED = 17
NO_LONG_SET_IN_PROGRESS = 18
DATA_BLOCK_NUMBER_INVALID = 19
OTHER_REASON = 250

# Exception-response codes.
STATE_SERVICE_NOT_ALLOWED = 1
STATE_SERVICE_UNKNOWN = 2
SERVICE_OPERATION_NOT_POSSIBLE = 1
SERVICE_NOT_SUPPORTED = 2
SERVICE_DECIPHERING_ERROR = 5
SERVICE_INVOCATION_COUNTER_ERROR = 6

# ConfirmedServiceError (in a refused AARE): service initiate (1), class and code.
CSE_INITIATE = 1
CSE_CLASS_APPLICATION_REFERENCE = 0
CSE_CLASS_INITIATE = 6
CSE_DECIPHERING_ERROR = 6
CSE_OTHER = 0
CSE_DLMS_VERSION_TOO_LOW = 1
CSE_INCOMPATIBLE_CONFORMANCE = 2
CSE_PDU_SIZE_TOO_SHORT = 3

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
# Associations


_State = Literal["pending", "associated", "failed"]


@dataclass
class _LongGet:
    blocks: list[bytes]
    sent: int  # number of the last block sent (1-based)


@dataclass
class _LongSet:
    attribute: AttributeRef
    data: bytearray
    block: int  # last block number received


@dataclass(frozen=True, slots=True)
class _Protection:
    """How a request came protected, so the answer goes back the same way."""

    kind: Literal["glo", "ded", "general-glo", "general-ded"]
    security_control: int


@dataclass
class Association:
    """One application association (a client SAP on one channel)."""

    client: ClientSpec
    channel: Hashable
    state: _State
    conformance: Conformance
    client_max_pdu: int
    client_title: bytes | None = None
    ctos: bytes = field(default=b"", repr=False)
    stoc: bytes = field(default=b"", repr=False)
    dedicated_key: bytes | None = field(default=None, repr=False)
    long_get: _LongGet | None = None
    long_set: _LongSet | None = None


# ---------------------------------------------------------------------------------------------------
# The COSEM objects


@dataclass(frozen=True)
class _Ctx:
    """What an attribute access needs: the association and the meter's time; ``note`` collects what
    the request log should say about it (the rows a profile read served)."""

    association: Association
    now_s: float
    note: dict[str, Any] = field(default_factory=dict)


class _Object:
    """A COSEM object: class, version, logical name, attributes and methods (with access rules)."""

    class_id = 0
    version = 0
    attributes: tuple[int, ...] = ()
    methods: tuple[int, ...] = ()
    selective: dict[int, tuple[int, ...]] = {}

    def __init__(self, meter: DlmsMeter, obis: Obis) -> None:
        self.meter = meter
        self.obis = obis

    def readable(self, attribute: int, client: ClientSpec) -> bool:
        """Whether ``client`` may GET ``attribute``."""
        return attribute in self.attributes

    def writable(self, attribute: int, client: ClientSpec) -> bool:
        """Whether ``client`` may SET ``attribute``."""
        return False

    def method_allowed(self, method: int, client: ClientSpec) -> bool:
        """Whether ``client`` may invoke ``method``."""
        return False

    def get(self, attribute: int, access: AccessSelection | None, ctx: _Ctx) -> GetDataResult:
        """The value of ``attribute`` (1 is the logical name for every class)."""
        if attribute == 1:
            return OctetString(self.obis.to_bytes())
        return AccessResult(OBJECT_UNDEFINED)

    def set(self, attribute: int, value: Data, ctx: _Ctx) -> int:
        """Write ``attribute``; the Data-Access-Result."""
        return READ_WRITE_DENIED

    def action(self, method: int, parameters: Data | None, ctx: _Ctx) -> ActionResult:
        """Invoke ``method``."""
        return ActionResult(READ_WRITE_DENIED)

    def access_rights(self, client: ClientSpec) -> Structure:
        """The object list's access_rights for ``client``."""
        attributes = []
        for attribute in self.attributes:
            mode = (1 if self.readable(attribute, client) else 0) | (
                2 if self.writable(attribute, client) else 0
            )
            selectors = self.selective.get(attribute)
            attributes.append(
                Structure(
                    (
                        Integer(attribute),
                        Enum(mode),
                        Null() if not selectors else Array(tuple(Integer(s) for s in selectors)),
                    )
                )
            )
        methods = [
            Structure((Integer(m), Enum(1 if self.method_allowed(m, client) else 0))) for m in self.methods
        ]
        return Structure((Array(tuple(attributes)), Array(tuple(methods))))


class _DataObject(_Object):
    class_id = CLASS_DATA
    attributes = (1, 2)

    def __init__(self, meter: DlmsMeter, obis: Obis, value: Callable[[_Ctx], Data]) -> None:
        super().__init__(meter, obis)
        self._value = value

    def get(self, attribute: int, access: AccessSelection | None, ctx: _Ctx) -> GetDataResult:
        if attribute == 2:
            return self._value(ctx)
        return super().get(attribute, access, ctx)


class _Register(_Object):
    class_id = CLASS_REGISTER
    attributes = (1, 2, 3)
    methods = (1,)

    def __init__(
        self, meter: DlmsMeter, obis: Obis, value: Callable[[float], Data], scaler_unit: ScalerUnit
    ) -> None:
        super().__init__(meter, obis)
        self._value = value
        self.scaler_unit = scaler_unit

    def get(self, attribute: int, access: AccessSelection | None, ctx: _Ctx) -> GetDataResult:
        if attribute == 2:
            return self._value(ctx.now_s)
        if attribute == 3:
            return self.scaler_unit.to_data()
        return super().get(attribute, access, ctx)


class _Clock(_Object):
    class_id = CLASS_CLOCK
    attributes = (1, 2, 3, 4, 5, 6, 7, 8, 9)
    methods = (1, 2, 3, 4, 5, 6)

    def writable(self, attribute: int, client: ClientSpec) -> bool:
        return attribute == 2 and client.write

    def get(self, attribute: int, access: AccessSelection | None, ctx: _Ctx) -> GetDataResult:
        meter = self.meter
        if attribute == 2:
            return OctetString(meter.date_time(ctx.now_s).to_bytes())
        if attribute == 3:
            return Long(meter.spec.deviation_min)
        if attribute == 4:
            return Unsigned(0)
        if attribute in (5, 6):
            # Last Sunday of March / October, 02:00 / 03:00, any year (DST is not enabled).
            month, hour = (3, 2) if attribute == 5 else (10, 3)
            dst = CosemDateTime(CosemDate(0xFFFF, month, 0xFE, 7), CosemTime(hour, 0, 0, 0), 0x8000, 0xFF)
            return OctetString(dst.to_bytes())
        if attribute == 7:
            return Integer(60)
        if attribute == 8:
            return Boolean(False)
        if attribute == 9:
            return Enum(1)  # internal crystal
        return super().get(attribute, access, ctx)

    def set(self, attribute: int, value: Data, ctx: _Ctx) -> int:
        if attribute != 2:
            return READ_WRITE_DENIED
        try:
            moment = date_time_of(value).to_datetime()
        except DcudError:
            return TYPE_UNMATCHED if not isinstance(value, OctetString | DateTime) else OTHER_REASON
        if moment.tzinfo is None:  # no deviation: the meter's local time
            moment = moment.replace(tzinfo=self.meter.zone)
        before = ctx.now_s
        self.meter.clock.set(moment.timestamp())
        self.meter.record("clock_set", ctx.association, was=iso(before), to=iso(moment.timestamp()))
        return 0


class _Profile(_Object):
    """Profile generic (class 7) over rows computed on demand (see :meth:`DlmsMeter.profile_rows`)."""

    class_id = CLASS_PROFILE_GENERIC
    version = 1
    attributes = (1, 2, 3, 4, 5, 6, 7, 8)
    methods = (1, 2)
    selective = {2: (SELECTOR_RANGE, SELECTOR_ENTRY)}

    def __init__(
        self,
        meter: DlmsMeter,
        obis: Obis,
        columns: tuple[CaptureObject, ...],
        period_s: int,
        max_entries: int,
        rows: Callable[[float, float, float], list[tuple[float, tuple[Data, ...]]]],
        count: Callable[[float], int],
    ) -> None:
        super().__init__(meter, obis)
        self.columns = columns
        self.period_s = period_s
        self.max_entries = max_entries
        self._rows = rows
        self._count = count

    def get(self, attribute: int, access: AccessSelection | None, ctx: _Ctx) -> GetDataResult:
        if attribute == 2:
            return self._buffer(access, ctx)
        if attribute == 3:
            return Array(tuple(c.to_data() for c in self.columns))
        if attribute == 4:
            return DoubleLongUnsigned(self.period_s)
        if attribute == 5:
            return Enum(1)  # fifo
        if attribute == 6:
            return self.columns[0].to_data()
        if attribute == 7:
            return DoubleLongUnsigned(self._count(ctx.now_s))
        if attribute == 8:
            return DoubleLongUnsigned(self.max_entries)
        return super().get(attribute, access, ctx)

    def _buffer(self, access: AccessSelection | None, ctx: _Ctx) -> GetDataResult:
        now = ctx.now_s
        columns = list(range(len(self.columns)))
        note: dict[str, Any] = {"obis": str(self.obis)}
        if access is None:
            rows = self._rows(float("-inf"), float("inf"), now)
        elif access.selector == SELECTOR_RANGE:
            try:
                start, end, columns = self._range(access.parameters)
            except _Refused as refused:
                self.meter.record("refused", ctx.association, why=str(refused), obis=str(self.obis))
                return AccessResult(OTHER_REASON)
            rows = self._rows(start, end, now)
            note |= {"selector": 1, "from": iso(start), "to": iso(end)}
        elif access.selector == SELECTOR_ENTRY:
            try:
                first, last, from_col, to_col = (int(number(v)) for v in structure_of(access.parameters, 4))
            except DcudError:
                return AccessResult(OTHER_REASON)
            rows = self._rows(float("-inf"), float("inf"), now)
            count = len(rows)
            last = count if last == 0 else min(last, count)
            rows = rows[max(first, 1) - 1 : last] if first <= count else []
            to_col = len(self.columns) if to_col == 0 else min(to_col, len(self.columns))
            columns = list(range(max(from_col, 1) - 1, to_col))
            note |= {"selector": 2, "from_entry": first, "to_entry": last}
        else:
            return AccessResult(OTHER_REASON)
        note["rows"] = [iso(t) for t, _ in rows]
        ctx.note.update(note)
        return Array(tuple(Structure(tuple(values[i] for i in columns)) for _, values in rows))

    def _range(self, parameters: Data) -> tuple[float, float, list[int]]:
        try:
            restricting, start, end, selected = structure_of(parameters, 4, "range descriptor")
            klass, name, attribute, _index = structure_of(restricting, 4, "restricting object")
            ref = AttributeRef(int(number(klass)), _obis_of(name), int(number(attribute)))
            start_s = self.meter.time_of(date_time_of(start))
            end_s = self.meter.time_of(date_time_of(end))
            chosen = [
                AttributeRef(int(number(k)), _obis_of(o), int(number(a)))
                for k, o, a, _i in (structure_of(item, 4) for item in array_of(selected))
            ]
        except (DcudError, ValueError) as exc:
            raise _Refused(f"bad range descriptor: {exc}") from None
        if ref != self.columns[0].ref:
            raise _Refused(f"restricting object {ref} is not the clock column")
        refs = [c.ref for c in self.columns]
        if any(c not in refs for c in chosen):
            raise _Refused("selected values are not capture objects")
        columns = [refs.index(c) for c in chosen] if chosen else list(range(len(refs)))
        return start_s, end_s, columns


class _Refused(Exception):
    """A request parameter the meter does not accept (becomes a Data-Access-Result)."""


def _obis_of(value: Data) -> Obis:
    if not isinstance(value, OctetString):
        raise ValueError("logical name is not an octet-string")
    return Obis.from_bytes(value.value)


class _AssociationObject(_Object):
    """Association LN (class 15, version 1): the current association."""

    class_id = CLASS_ASSOCIATION_LN
    version = 1
    attributes = (1, 2, 3, 4, 5, 6, 7, 8)
    methods = (1,)

    def readable(self, attribute: int, client: ClientSpec) -> bool:
        return attribute in self.attributes and attribute != 7  # 7 is the secret

    def method_allowed(self, method: int, client: ClientSpec) -> bool:
        return method == ASSOCIATION_REPLY_TO_HLS and client.auth == "hls-gmac"

    def get(self, attribute: int, access: AccessSelection | None, ctx: _Ctx) -> GetDataResult:
        association, meter = ctx.association, self.meter
        client = association.client
        if attribute == 2:
            return Array(
                tuple(
                    Structure(
                        (
                            LongUnsigned(o.class_id),
                            Unsigned(o.version),
                            OctetString(o.obis.to_bytes()),
                            o.access_rights(client),
                        )
                    )
                    for o in meter.objects.values()
                )
            )
        if attribute == 3:
            return Structure((Integer(client.sap), LongUnsigned(meter.spec.logical_device)))
        if attribute == 4:
            context = (
                ApplicationContext.LN
                if client.policy is SecurityPolicy.NONE
                else ApplicationContext.LN_CIPHERING
            )
            return OctetString(OID_PREFIX_CONTEXT + bytes([context]))
        if attribute == 5:
            return Structure(
                (
                    BitString(int(association.conformance).to_bytes(3, "big"), 24),
                    LongUnsigned(meter.spec.max_pdu_size),
                    LongUnsigned(association.client_max_pdu),
                    Unsigned(6),
                    Integer(0),
                    OctetString(b""),
                )
            )
        if attribute == 6:
            mechanism = {"none": Mechanism.NONE, "lls": Mechanism.LLS, "hls-gmac": Mechanism.HLS_GMAC}
            return OctetString(OID_PREFIX_MECHANISM + bytes([mechanism[client.auth]]))
        if attribute == 7:
            return AccessResult(READ_WRITE_DENIED)
        if attribute == 8:
            return Enum(2 if association.state == "associated" else 1)
        return super().get(attribute, access, ctx)

    def action(self, method: int, parameters: Data | None, ctx: _Ctx) -> ActionResult:
        if method != ASSOCIATION_REPLY_TO_HLS:
            return ActionResult(READ_WRITE_DENIED)
        return self.meter.reply_to_hls(ctx.association, parameters)


# ---------------------------------------------------------------------------------------------------
# The meter


class DlmsMeter:
    """One simulated meter's application layer (see the module docstring).

    ``clock`` gives the host's time (seconds since the epoch, UTC; default :func:`time.time`); the
    meter's own clock runs from it with ``spec.clock_offset_s`` and ``spec.clock_drift_ppm``.
    ``challenge`` draws the meter's HLS challenges (default: random, or derived from
    ``spec.challenge_seed`` when set, for repeatable runs).
    """

    def __init__(
        self,
        spec: MeterSpec,
        clock: Callable[[], float] = time.time,
        challenge: Callable[[int], bytes] | None = None,
    ) -> None:
        self.spec = spec
        self.clock = MeterClock(clock, spec.clock_offset_s, spec.clock_drift_ppm)
        self.zone = timezone(timedelta(minutes=-spec.deviation_min))
        self.model = LoadModel(spec)
        self.keys = spec.keys
        self.title = spec.title
        self.clients = {c.sap: c for c in spec.clients}
        self.silent = spec.silent
        self.counter = InvocationCounter(spec.invocation_counter)
        self.client_counters: dict[int, int] = {}
        """The last invocation counter accepted from each client SAP."""
        self.stats = MeterStats()
        self.records: deque[dict[str, Any]] = deque(maxlen=RECORDS_KEPT)
        self._seq = 0
        self._associations: dict[tuple[Hashable, int], Association] = {}
        self._challenges = 0
        if challenge is not None:
            self._challenge = challenge
        elif spec.challenge_seed:
            self._challenge = self._seeded_challenge
        else:
            self._challenge = secrets.token_bytes
        now = self.clock.now()
        start = parse_time(spec.profile_start) if spec.profile_start else now - spec.profile_backlog_s
        self.profile_first_s = self.model.ceil_capture(start)
        """The first capture time the load profile holds (later rows fall off at ``max_entries``)."""
        self.extra_events = sorted((parse_time(e.at), e.code) for e in spec.events)
        self.objects: dict[Obis, _Object] = {}
        self._build_objects()

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

    def _event_code(self, ctx: _Ctx) -> Data:
        events = self.events(ctx.now_s)
        return Unsigned(events[-1][1] if events else 0)

    def _build_objects(self) -> None:
        model = self.model
        clock_column = CaptureObject(CLASS_CLOCK, CLOCK_OBIS, 2)
        objects: list[_Object] = [
            _AssociationObject(self, ASSOCIATION_LN_OBIS),
            _Clock(self, CLOCK_OBIS),
            _DataObject(
                self,
                DEVICE_NAME,
                lambda _ctx: OctetString(f"DCU{self.spec.serial}".encode("ascii", "replace")[:16]),
            ),
            _DataObject(self, SERIAL_NUMBER, lambda _ctx: VisibleString(self.spec.serial)),
            _Register(
                self, ENERGY_IMPORT, lambda t: DoubleLongUnsigned(model.import_wh(t)), ScalerUnit(0, UNIT_WH)
            ),
            _Register(
                self, ENERGY_EXPORT, lambda t: DoubleLongUnsigned(model.export_raw(t)), ScalerUnit(1, UNIT_WH)
            ),
            _Register(self, POWER_IMPORT, lambda t: DoubleLong(model.power_w(t)), ScalerUnit(0, UNIT_W)),
            _Register(self, VOLTAGE_L1, lambda t: LongUnsigned(model.voltage_raw(t)), ScalerUnit(-1, UNIT_V)),
            _Register(self, CURRENT_L1, lambda t: LongUnsigned(model.current_raw(t)), ScalerUnit(-2, UNIT_A)),
            _Register(
                self, FREQUENCY, lambda t: LongUnsigned(model.frequency_raw(t)), ScalerUnit(-2, UNIT_HZ)
            ),
            _Profile(
                self,
                LOAD_PROFILE,
                (
                    clock_column,
                    CaptureObject(CLASS_REGISTER, ENERGY_IMPORT, 2),
                    CaptureObject(CLASS_REGISTER, ENERGY_EXPORT, 2),
                ),
                self.spec.profile_period_s,
                self.spec.profile_max_entries,
                self._profile_rows,
                lambda now: len(self.profile_times(float("-inf"), float("inf"), now)),
            ),
            _DataObject(self, EVENT_CODE, self._event_code),
            _Profile(
                self,
                EVENT_LOG,
                (clock_column, CaptureObject(CLASS_DATA, EVENT_CODE, 2)),
                0,
                self.spec.event_log_max_entries,
                self._event_rows,
                lambda now: len(self.events(now)),
            ),
        ]
        self.objects = {o.obis: o for o in objects}

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

    # -- channels ---------------------------------------------------------------------------------

    def channel_closed(self, channel: Hashable) -> None:
        """The link under ``channel`` went away (DISC, SNRM, TCP close): its associations end."""
        for key in [k for k in self._associations if k[0] == channel]:
            self._end_association(key, "link closed")

    def associations(self) -> list[Association]:
        """The open associations."""
        return list(self._associations.values())

    # -- requests ---------------------------------------------------------------------------------

    def handle(self, channel: Hashable, client_sap: int, data: bytes) -> bytes | None:
        """One request APDU from ``client_sap`` on ``channel``; the response APDU, or None for none."""
        self.stats.requests += 1
        if self.silent:
            self.stats.dropped += 1
            self.record("dropped", client_sap=client_sap, bytes=len(data))
            return None
        try:
            response = self._handle(channel, client_sap, data)
        except DcudError as exc:
            self.stats.malformed += 1
            self.record("malformed", client_sap=client_sap, error=str(exc)[:200])
            return None
        except Exception as exc:  # a bug of the simulator: it goes on serving (and says so)
            self.stats.internal_errors += 1
            self.record("internal_error", client_sap=client_sap, error=repr(exc)[:300])
            return None
        if response is not None:
            self.stats.responses += 1
        return response

    def _handle(self, channel: Hashable, client_sap: int, data: bytes) -> bytes | None:
        apdu = decode_apdu(data)
        key = (channel, client_sap)
        client = self.clients.get(client_sap)
        if isinstance(apdu, AARQ):
            if client is None:
                self.record("aarq", client_sap=client_sap, result="rejected", why="unknown client")
                return AARE(apdu.application_context, AssociationResult.REJECTED_PERMANENT, 1).encode()
            return self._associate(channel, client, apdu)
        association = self._associations.get(key)
        if isinstance(apdu, RLRQ):
            return self._release(key, association, apdu)
        if association is None:
            self.record("refused", client_sap=client_sap, why="no association")
            return ExceptionResponse(STATE_SERVICE_NOT_ALLOWED, SERVICE_OPERATION_NOT_POSSIBLE).encode()
        opened = self._open(association, apdu)
        if isinstance(opened, bytes):
            return opened
        plain, protection = opened
        response = self._serve(association, plain, protection)
        if response is None:
            return None
        return self._seal(association, response, protection)

    # -- association --------------------------------------------------------------------------------

    def _associate(self, channel: Hashable, client: ClientSpec, aarq: AARQ) -> bytes:
        policy = client.policy
        context = ApplicationContext.LN if policy is SecurityPolicy.NONE else ApplicationContext.LN_CIPHERING
        needed = {"none": None, "lls": Mechanism.LLS, "hls-gmac": Mechanism.HLS_GMAC}[client.auth]
        key = (channel, client.sap)
        if key in self._associations:
            self._end_association(key, "new AARQ")

        def refuse(diagnostic: int, why: str, error: ConfirmedServiceError | None = None) -> bytes:
            self.stats.refused += 1
            self.record("aarq", client_sap=client.sap, result="rejected", diagnostic=diagnostic, why=why)
            user = None if error is None else error.encode()
            return AARE(
                aarq.application_context,
                AssociationResult.REJECTED_PERMANENT,
                diagnostic,
                user_information=user,
            ).encode()

        initiate_error = ConfirmedServiceError(CSE_INITIATE, CSE_CLASS_INITIATE, CSE_OTHER)
        if aarq.application_context != context:
            return refuse(2, f"application context {aarq.application_context}, expected {int(context)}")
        if needed is None and aarq.mechanism not in (None, Mechanism.NONE):
            return refuse(11, f"mechanism {aarq.mechanism} for a client without authentication")
        if needed is not None and aarq.mechanism is None:
            return refuse(12, "no authentication mechanism")
        if needed is not None and aarq.mechanism != needed:
            return refuse(11, f"mechanism {aarq.mechanism}, expected {int(needed)}")
        title = aarq.calling_ap_title
        needs_title = policy is not SecurityPolicy.NONE or needed == Mechanism.HLS_GMAC
        if needs_title and (title is None or len(title) != 8):
            return refuse(3, "no 8-byte calling AP title (client system title)")
        if aarq.user_information is None:
            return refuse(1, "no xDLMS initiate", initiate_error)
        try:
            initiate = decode_xdlms_initiate(aarq.user_information)
        except DcudError:
            return refuse(1, "malformed xDLMS initiate", initiate_error)
        deciphering = ConfirmedServiceError(
            CSE_INITIATE, CSE_CLASS_APPLICATION_REFERENCE, CSE_DECIPHERING_ERROR
        )
        ciphered = isinstance(initiate, CipheredApdu)
        if isinstance(initiate, CipheredApdu):
            if (
                policy is SecurityPolicy.NONE
                or initiate.dedicated
                or initiate.plain_tag != TAG_INITIATE_REQUEST
            ):
                return refuse(1, "ciphered initiate not expected here", deciphering)
            assert title is not None
            try:
                opened = unprotect(initiate.content, system_title=title, keys=self.keys)
            except DcudError as exc:
                return refuse(1, f"initiate does not decipher: {exc}", deciphering)
            if not policy.satisfied_by(opened.security_control):
                return refuse(
                    1, f"initiate protected with SC 0x{opened.security_control:02X} only", deciphering
                )
            if not self._accept_counter(client.sap, opened.invocation_counter):
                return refuse(1, f"replayed invocation counter {opened.invocation_counter}", deciphering)
            try:
                initiate = decode_xdlms_initiate(opened.plaintext)
            except DcudError:
                return refuse(1, "malformed xDLMS initiate", initiate_error)
        elif policy is not SecurityPolicy.NONE:
            return refuse(1, "plain initiate under a security policy", deciphering)
        if not isinstance(initiate, InitiateRequest):
            return refuse(1, f"user-information is {type(initiate).__name__}", initiate_error)
        if initiate.dlms_version < 6:
            return refuse(1, "DLMS version below 6", ConfirmedServiceError(1, 6, CSE_DLMS_VERSION_TOO_LOW))
        if not initiate.conformance & Conformance.GET:
            return refuse(
                1, "no GET in the conformance", ConfirmedServiceError(1, 6, CSE_INCOMPATIBLE_CONFORMANCE)
            )
        client_max_pdu = initiate.max_receive_pdu_size or 0xFFFF
        if client_max_pdu < 64:
            return refuse(1, "client PDU below 64 bytes", ConfirmedServiceError(1, 6, CSE_PDU_SIZE_TOO_SHORT))
        if needed == Mechanism.LLS and not hmac.compare_digest(
            aarq.authentication_value or b"", client.password.encode()
        ):
            return refuse(DIAGNOSTIC_AUTHENTICATION_FAILURE, "wrong password")
        ctos = aarq.authentication_value or b""
        if needed == Mechanism.HLS_GMAC and not 8 <= len(ctos) <= 64:
            return refuse(DIAGNOSTIC_AUTHENTICATION_FAILURE, f"client challenge of {len(ctos)} bytes")
        conformance = Conformance(METER_CONFORMANCE & initiate.conformance)
        association = Association(
            client=client,
            channel=channel,
            state="pending" if needed == Mechanism.HLS_GMAC else "associated",
            conformance=conformance,
            client_max_pdu=client_max_pdu,
            client_title=title,
            ctos=ctos,
            dedicated_key=initiate.dedicated_key,
        )
        response = InitiateResponse(conformance, self.spec.max_pdu_size).encode()
        if policy is not SecurityPolicy.NONE:
            content = protect(
                response,
                security_control=policy.security_control,
                system_title=self.title,
                invocation_counter=self.counter.take(),
                keys=self.keys,
            )
            response = CipheredApdu(GLO_TAGS[response[0]], content).encode()
        diagnostic = 0
        stoc = None
        if needed == Mechanism.HLS_GMAC:
            diagnostic = DIAGNOSTIC_AUTHENTICATION_REQUIRED
            stoc = self._new_challenge(ctos)
            association.stoc = stoc
        self._associations[key] = association
        self.stats.associations += 1
        self.record(
            "aarq",
            association,
            result="accepted",
            ciphered=ciphered,
            pending_hls=association.state == "pending",
            client_max_pdu=client_max_pdu,
            conformance=f"{int(conformance):06X}",
        )
        return AARE(
            context,
            AssociationResult.ACCEPTED,
            diagnostic,
            responding_ap_title=self.title if needs_title else None,
            mechanism=needed,
            authentication_value=stoc,
            user_information=response,
        ).encode()

    def _end_association(self, key: tuple[Hashable, int], why: str) -> None:
        association = self._associations.pop(key, None)
        if association is not None:
            self.record("aborted", association, state=association.state, why=why)

    def _new_challenge(self, ctos: bytes) -> bytes:
        for _ in range(8):
            stoc = self._challenge(CHALLENGE_BYTES)
            if stoc != ctos:
                return stoc
        return bytes(b ^ 0xFF for b in ctos[:CHALLENGE_BYTES].ljust(CHALLENGE_BYTES, b"\0"))

    def _seeded_challenge(self, size: int) -> bytes:
        self._challenges += 1
        digest = hashlib.sha256(f"{self.spec.challenge_seed}:{self._challenges}".encode()).digest()
        return digest[:size]

    def _accept_counter(self, sap: int, counter: int) -> bool:
        last = self.client_counters.get(sap)
        if last is not None and counter <= last:
            return False
        self.client_counters[sap] = counter
        return True

    def reply_to_hls(self, association: Association, parameters: Data | None) -> ActionResult:
        """HLS pass 3 and 4: check the client's f(StoC), answer f(CtoS)."""
        if association.state != "pending" or association.client.auth != "hls-gmac":
            self.record("hls", association, result="unexpected")
            return ActionResult(READ_WRITE_DENIED)
        title = association.client_title
        assert title is not None  # an HLS association has one (checked at the AARQ)
        answer = parameters.value if isinstance(parameters, OctetString) else b""
        valid = verify_hls_gmac(answer, system_title=title, keys=self.keys, challenge=association.stoc)
        # No counter check here: f(StoC) binds the fresh StoC of this association, which is what keeps
        # it from being replayed (its IC is taken before the counter of the ACTION that carries it).
        if not valid:
            association.state = "failed"
            self.stats.refused += 1
            self.record("hls", association, result="failed", why="f(StoC) does not verify")
            return ActionResult(READ_WRITE_DENIED)
        association.state = "associated"
        reply = hls_gmac_response(
            system_title=self.title,
            invocation_counter=self.counter.take(),
            keys=self.keys,
            challenge=association.ctos,
        )
        self.record("hls", association, result="ok")
        return ActionResult(0, OctetString(reply))

    def _release(self, key: tuple[Hashable, int], association: Association | None, rlrq: RLRQ) -> bytes:
        user_information = None
        note: dict[str, Any] = {"reason": rlrq.reason}
        if association is not None and rlrq.user_information is not None and association.client_title:
            policy = association.client.policy
            try:
                initiate = decode_xdlms_initiate(rlrq.user_information)
                if isinstance(initiate, CipheredApdu) and policy is not SecurityPolicy.NONE:
                    opened = unprotect(
                        initiate.content, system_title=association.client_title, keys=self.keys
                    )
                    note["ic_fresh"] = self._accept_counter(association.client.sap, opened.invocation_counter)
                    response = InitiateResponse(association.conformance, self.spec.max_pdu_size).encode()
                    content = protect(
                        response,
                        security_control=opened.security_control,
                        system_title=self.title,
                        invocation_counter=self.counter.take(),
                        keys=self.keys,
                    )
                    user_information = CipheredApdu(GLO_TAGS[response[0]], content).encode()
            except DcudError as exc:
                note["decipher_failed"] = str(exc)[:200]
        if association is not None:
            self._associations.pop(key, None)
        self.record("release", association, was=None if association is None else association.state, **note)
        return RLRE(0, user_information).encode()

    # -- protection ---------------------------------------------------------------------------------

    def _open(self, association: Association, apdu: Apdu) -> tuple[Apdu, _Protection | None] | bytes:
        """The plain request and how it was protected, or the exception-response refusing it."""
        policy = association.client.policy
        refused = ExceptionResponse(STATE_SERVICE_NOT_ALLOWED, SERVICE_DECIPHERING_ERROR).encode()
        if not isinstance(apdu, CipheredApdu | GeneralCiphering):
            if policy is not SecurityPolicy.NONE:
                self.record("refused", association, why="plain request under a security policy")
                self.stats.refused += 1
                return refused
            return apdu, None
        title = association.client_title
        if policy is SecurityPolicy.NONE or title is None:
            self.record("refused", association, why="ciphered request without a security policy")
            self.stats.refused += 1
            return refused
        if isinstance(apdu, CipheredApdu):
            dedicated = apdu.dedicated
            kind: Literal["glo", "ded", "general-glo", "general-ded"] = "ded" if dedicated else "glo"
            content = apdu.content
        else:
            dedicated = apdu.tag == TAG_GENERAL_DED_CIPHERING
            kind = "general-ded" if dedicated else "general-glo"
            content = apdu.content
            if apdu.system_title != title:
                self.record("refused", association, why="general ciphering under another system title")
                self.stats.refused += 1
                return refused
        keys = self._keys(association, dedicated)
        if keys is None:
            self.record("refused", association, why="dedicated ciphering without a dedicated key")
            self.stats.refused += 1
            return refused
        try:
            opened = unprotect(content, system_title=title, keys=keys)
        except DcudError as exc:
            self.record("refused", association, why=f"does not decipher: {exc}"[:200])
            self.stats.refused += 1
            return refused
        if not policy.satisfied_by(opened.security_control):
            self.record("refused", association, why=f"SC 0x{opened.security_control:02X} below the policy")
            self.stats.refused += 1
            return refused
        if not self._accept_counter(association.client.sap, opened.invocation_counter):
            expected = self.client_counters.get(association.client.sap, 0) + 1
            self.record(
                "refused", association, why="replayed invocation counter", ic=opened.invocation_counter
            )
            self.stats.refused += 1
            return ExceptionResponse(
                STATE_SERVICE_NOT_ALLOWED,
                SERVICE_INVOCATION_COUNTER_ERROR,
                min(expected, INVOCATION_COUNTER_MAX),
            ).encode()
        inner = decode_apdu(opened.plaintext)
        if isinstance(inner, CipheredApdu | GeneralCiphering) or (
            isinstance(apdu, CipheredApdu) and opened.plaintext[:1] != bytes([apdu.plain_tag])
        ):
            self.record("refused", association, why="ciphered APDU carries something else than its tag says")
            self.stats.refused += 1
            return refused
        return inner, _Protection(kind, opened.security_control)

    def _keys(self, association: Association, dedicated: bool) -> Keys | None:
        if not dedicated:
            return self.keys
        if association.dedicated_key is None or len(association.dedicated_key) != 16:
            return None
        return Keys(association.dedicated_key, self.keys.authentication_key)

    def _seal(self, association: Association, plain: bytes, protection: _Protection | None) -> bytes:
        if protection is None or plain[0] == ExceptionResponse.TAG:
            return plain
        dedicated = protection.kind in ("ded", "general-ded")
        keys = self._keys(association, dedicated)
        assert keys is not None  # the request deciphered with them
        content = protect(
            plain,
            security_control=protection.security_control,
            system_title=self.title,
            invocation_counter=self.counter.take(),
            keys=keys,
        )
        if protection.kind == "glo":
            return CipheredApdu(GLO_TAGS[plain[0]], content).encode()
        if protection.kind == "ded":
            return CipheredApdu(DED_TAGS[plain[0]], content).encode()
        tag = TAG_GENERAL_DED_CIPHERING if dedicated else TAG_GENERAL_GLO_CIPHERING
        return GeneralCiphering(self.title, content, tag).encode()

    def _overhead(self, protection: _Protection | None) -> int:
        if protection is None:
            return 0
        return 1 + 3 + 5 + 12 + (9 if protection.kind.startswith("general") else 0)

    # -- services -----------------------------------------------------------------------------------

    def _serve(self, association: Association, apdu: Apdu, protection: _Protection | None) -> bytes | None:
        ctx = _Ctx(association, self.now())
        if isinstance(apdu, GetRequestNormal | GetRequestNext | GetRequestWithList):
            return self._get(association, apdu, ctx, protection)
        if isinstance(
            apdu,
            SetRequestNormal | SetRequestWithFirstDatablock | SetRequestWithDatablock | SetRequestWithList,
        ):
            return self._set(association, apdu, ctx)
        if isinstance(apdu, ActionRequestNormal | ActionRequestWithList):
            return self._action(association, apdu, ctx)
        self.record("refused", association, why=f"unsupported service {type(apdu).__name__}")
        self.stats.refused += 1
        return ExceptionResponse(STATE_SERVICE_UNKNOWN, SERVICE_NOT_SUPPORTED).encode()

    def _read(self, association: Association, item: AttributeWithSelection, ctx: _Ctx) -> GetDataResult:
        ref = item.attribute
        obj = self.objects.get(ref.obis)
        if association.state != "associated":
            return AccessResult(READ_WRITE_DENIED)
        if obj is None:
            return AccessResult(OBJECT_UNDEFINED)
        if obj.class_id != ref.class_id:
            return AccessResult(OBJECT_CLASS_INCONSISTENT)
        if ref.index not in obj.attributes:
            return AccessResult(OBJECT_UNDEFINED)
        if not obj.readable(ref.index, association.client):
            return AccessResult(READ_WRITE_DENIED)
        if item.access is not None and item.access.selector not in obj.selective.get(ref.index, ()):
            return AccessResult(OTHER_REASON)
        return obj.get(ref.index, item.access, ctx)

    def _get(
        self,
        association: Association,
        apdu: GetRequestNormal | GetRequestNext | GetRequestWithList,
        ctx: _Ctx,
        protection: _Protection | None,
    ) -> bytes:
        iip = apdu.invoke_id_and_priority
        if isinstance(apdu, GetRequestNext):
            return self._get_next(association, apdu)
        association.long_get = None
        if isinstance(apdu, GetRequestWithList):
            if len(apdu.items) > MAX_LIST_ITEMS:
                results: tuple[GetDataResult, ...] = tuple(AccessResult(OTHER_REASON) for _ in apdu.items)
            else:
                results = tuple(self._read(association, item, ctx) for item in apdu.items)
            self.record(
                "get_list",
                association,
                attributes=[str(i.attribute) for i in apdu.items],
                results=[r.code if isinstance(r, AccessResult) else 0 for r in results],
            )
            whole = GetResponseWithList(results, iip).encode()
            return self._blocks(association, whole, encode_get_results(results), iip, protection, None)
        result = self._read(association, AttributeWithSelection(apdu.attribute, apdu.access), ctx)
        note = ctx.note
        entry = self.record(
            "get",
            association,
            class_id=apdu.attribute.class_id,
            obis=str(apdu.attribute.obis),
            attr=apdu.attribute.index,
            result=result.code if isinstance(result, AccessResult) else 0,
            **{k: v for k, v in note.items() if k != "obis"},
        )
        if isinstance(result, AccessResult):
            return GetResponseNormal(result, iip).encode()
        whole = GetResponseNormal(result, iip).encode()
        return self._blocks(association, whole, encode_data(result), iip, protection, entry)

    def _send_limit(self, association: Association, protection: _Protection | None) -> int:
        return min(association.client_max_pdu, self.spec.max_pdu_size) - self._overhead(protection)

    def _blocks(
        self,
        association: Association,
        whole: bytes,
        raw: bytes,
        iip: int,
        protection: _Protection | None,
        entry: dict[str, Any] | None,
    ) -> bytes:
        limit = self._send_limit(association, protection)
        if len(whole) <= limit or not association.conformance & Conformance.BLOCK_TRANSFER_WITH_GET_OR_READ:
            if entry is not None:
                entry["blocks"] = 1
                entry["bytes"] = len(raw)
            return whole
        chunk = max(1, limit - (3 + 1 + 4 + 1 + 3))
        blocks = [raw[i : i + chunk] for i in range(0, len(raw), chunk)]
        if entry is not None:
            entry["blocks"] = len(blocks)
            entry["bytes"] = len(raw)
        association.long_get = _LongGet(blocks, 1)
        return GetResponseWithDatablock(len(blocks) == 1, 1, blocks[0], iip).encode()

    def _get_next(self, association: Association, apdu: GetRequestNext) -> bytes:
        iip = apdu.invoke_id_and_priority
        long_get = association.long_get
        if long_get is None:
            self.record("get_next", association, block=apdu.block_number, result=NO_LONG_GET_IN_PROGRESS)
            number = min(apdu.block_number + 1, INVOCATION_COUNTER_MAX)
            return GetResponseWithDatablock(True, number, AccessResult(NO_LONG_GET_IN_PROGRESS), iip).encode()
        if apdu.block_number != long_get.sent:
            association.long_get = None
            self.record("get_next", association, block=apdu.block_number, result=LONG_GET_ABORTED)
            return GetResponseWithDatablock(
                True, long_get.sent + 1, AccessResult(LONG_GET_ABORTED), iip
            ).encode()
        long_get.sent += 1
        last = long_get.sent == len(long_get.blocks)
        if last:
            association.long_get = None
        self.record("get_next", association, block=apdu.block_number, result=0)
        return GetResponseWithDatablock(last, long_get.sent, long_get.blocks[long_get.sent - 1], iip).encode()

    def _write(self, association: Association, ref: AttributeRef, value: Data, ctx: _Ctx) -> int:
        obj = self.objects.get(ref.obis)
        if association.state != "associated":
            result = READ_WRITE_DENIED
        elif obj is None or ref.index not in obj.attributes:
            result = OBJECT_UNDEFINED
        elif obj.class_id != ref.class_id:
            result = OBJECT_CLASS_INCONSISTENT
        elif not obj.writable(ref.index, association.client):
            result = READ_WRITE_DENIED
        else:
            result = obj.set(ref.index, value, ctx)
        self.record(
            "set", association, class_id=ref.class_id, obis=str(ref.obis), attr=ref.index, result=result
        )
        return result

    def _set(
        self,
        association: Association,
        apdu: SetRequestNormal | SetRequestWithFirstDatablock | SetRequestWithDatablock | SetRequestWithList,
        ctx: _Ctx,
    ) -> bytes:
        iip = apdu.invoke_id_and_priority
        if isinstance(apdu, SetRequestNormal):
            association.long_set = None
            return SetResponseNormal(self._write(association, apdu.attribute, apdu.value, ctx), iip).encode()
        if isinstance(apdu, SetRequestWithList):
            association.long_set = None
            if len(apdu.items) > MAX_LIST_ITEMS:
                return SetResponseWithList(tuple(OTHER_REASON for _ in apdu.items), iip).encode()
            results = tuple(
                self._write(association, item.attribute, value, ctx)
                for item, value in zip(apdu.items, apdu.values, strict=True)
            )
            return SetResponseWithList(results, iip).encode()
        if isinstance(apdu, SetRequestWithFirstDatablock):
            if apdu.block_number != 1:
                association.long_set = None
                return SetResponseLastDatablock(DATA_BLOCK_NUMBER_INVALID, apdu.block_number, iip).encode()
            association.long_set = _LongSet(apdu.attribute, bytearray(apdu.raw_data), 1)
        else:
            long_set = association.long_set
            if long_set is None:
                return SetResponseLastDatablock(NO_LONG_SET_IN_PROGRESS, apdu.block_number, iip).encode()
            if apdu.block_number != long_set.block + 1:
                association.long_set = None
                return SetResponseLastDatablock(DATA_BLOCK_NUMBER_INVALID, apdu.block_number, iip).encode()
            long_set.data += apdu.raw_data
            long_set.block += 1
        long_set = association.long_set
        assert long_set is not None
        if len(long_set.data) > MAX_SET_BYTES:
            association.long_set = None
            return SetResponseLastDatablock(LONG_SET_ABORTED, apdu.block_number, iip).encode()
        if not apdu.last_block:
            return SetResponseDatablock(apdu.block_number, iip).encode()
        association.long_set = None
        try:
            value = decode_data(bytes(long_set.data))
        except DcudError:
            return SetResponseLastDatablock(TYPE_UNMATCHED, apdu.block_number, iip).encode()
        result = self._write(association, long_set.attribute, value, ctx)
        return SetResponseLastDatablock(result, apdu.block_number, iip).encode()

    def _invoke(
        self, association: Association, method: AttributeRef, parameters: Data | None, ctx: _Ctx
    ) -> ActionResult:
        obj = self.objects.get(method.obis)
        hls = method.obis == ASSOCIATION_LN_OBIS and method.index == ASSOCIATION_REPLY_TO_HLS
        if association.state != "associated" and not (hls and association.state == "pending"):
            result = ActionResult(READ_WRITE_DENIED)
        elif obj is None or method.index not in obj.methods:
            result = ActionResult(OBJECT_UNDEFINED)
        elif obj.class_id != method.class_id:
            result = ActionResult(OBJECT_CLASS_INCONSISTENT)
        elif not obj.method_allowed(method.index, association.client):
            result = ActionResult(READ_WRITE_DENIED)
        else:
            result = obj.action(method.index, parameters, ctx)
        if not hls:
            self.record("action", association, method=str(method), result=result.result)
        return result

    def _action(
        self, association: Association, apdu: ActionRequestNormal | ActionRequestWithList, ctx: _Ctx
    ) -> bytes:
        iip = apdu.invoke_id_and_priority
        if isinstance(apdu, ActionRequestNormal):
            return ActionResponseNormal(
                self._invoke(association, apdu.method, apdu.parameters, ctx), iip
            ).encode()
        if len(apdu.methods) > MAX_LIST_ITEMS:
            results = tuple(ActionResult(OTHER_REASON) for _ in apdu.methods)
        else:
            results = tuple(
                self._invoke(association, method, parameters, ctx)
                for method, parameters in zip(apdu.methods, apdu.parameters, strict=True)
            )
        return ActionResponseWithList(results, iip).encode()

    # -- status -----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What the simulator reports about this meter."""
        return {
            "name": self.spec.name,
            "meter_time": iso(self.now()),
            "clock_offset_s": round(self.clock.offset_s(), 3),
            "silent": self.silent,
            "invocation_counter": self.counter.next_value,
            "client_invocation_counters": {str(k): v for k, v in self.client_counters.items()},
            "associations": len(self._associations),
            "stats": vars(self.stats).copy(),
        }


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
    "DEFAULT_SYSTEM_TITLE",
    "ENERGY_EXPORT",
    "ENERGY_IMPORT",
    "EVENT_CODE",
    "EVENT_LOG",
    "GREEN_BOOK_AUTHENTICATION_KEY",
    "GREEN_BOOK_BLOCK_CIPHER_KEY",
    "LOAD_PROFILE",
    "METER_CONFORMANCE",
    "Association",
    "ClientSpec",
    "DlmsMeter",
    "EventSpec",
    "LoadModel",
    "MeterClock",
    "MeterSpec",
    "default_clients",
    "expected_registers",
    "iso",
    "parse_time",
]
