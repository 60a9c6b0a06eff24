"""The COSEM objects of the simulated DLMS meter: what each attribute and method answers, and to whom.

The association (Association LN: the object list with each client's access rights, HLS pass 3 and 4),
the clock (read and set), data objects, registers with their scaler_unit, and profiles (class 7: the
load profile and the event log, read in full, by range or by entry over rows computed on demand). Each
object checks its own access rules and answers with a value or a Data-Access-Result; the meter
(:class:`~dcud.sim.dlms_meter.DlmsMeter`) finds the object, checks the association and encodes the APDU.
Apart from the server logic so that adding an object to the simulator touches only this module and
the meter's object list (``DlmsMeter._build_objects``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dcud.codec.dlms.apdu import (
    OID_PREFIX_CONTEXT,
    OID_PREFIX_MECHANISM,
    AccessResult,
    AccessSelection,
    ActionResult,
    ApplicationContext,
    GetDataResult,
    Mechanism,
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
    DoubleLongUnsigned,
    Enum,
    Integer,
    Long,
    LongUnsigned,
    Null,
    OctetString,
    Structure,
    Unsigned,
    array_of,
    date_time_of,
    number,
    structure_of,
)
from dcud.codec.dlms.cosem import (
    ASSOCIATION_REPLY_TO_HLS,
    CLASS_ASSOCIATION_LN,
    CLASS_CLOCK,
    CLASS_DATA,
    CLASS_PROFILE_GENERIC,
    CLASS_REGISTER,
    SELECTOR_ENTRY,
    SELECTOR_RANGE,
    CaptureObject,
    ScalerUnit,
)
from dcud.codec.dlms.obis import AttributeRef, Obis
from dcud.codec.dlms.security import SecurityPolicy
from dcud.errors import DcudError
from dcud.sim.dlms_model import ClientSpec, iso

if TYPE_CHECKING:
    from dcud.sim.dlms_association import Association
    from dcud.sim.dlms_meter import DlmsMeter

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


__all__ = [
    "DATA_BLOCK_NUMBER_INVALID",
    "LONG_GET_ABORTED",
    "LONG_SET_ABORTED",
    "NO_LONG_GET_IN_PROGRESS",
    "NO_LONG_SET_IN_PROGRESS",
    "OBJECT_CLASS_INCONSISTENT",
    "OBJECT_UNAVAILABLE",
    "OBJECT_UNDEFINED",
    "OTHER_REASON",
    "READ_WRITE_DENIED",
    "TYPE_UNMATCHED",
]
