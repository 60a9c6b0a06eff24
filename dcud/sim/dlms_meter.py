"""A simulated DLMS/COSEM electricity meter: the application layer of ``dcud sim dlms``, on dcud's codec.

:class:`DlmsMeter` is the server side of the xDLMS/ACSE layer, without I/O: :meth:`DlmsMeter.handle`
takes one request APDU (as the HDLC server link or the wrapper delivered it, with the client SAP and the
channel it came on) and returns the response APDU, or None when a meter would stay silent. It uses the
codec's server-side encoders and decoders (:mod:`dcud.codec.dlms.apdu`, :mod:`~dcud.codec.dlms.security`,
:mod:`~dcud.codec.dlms.axdr`): the simulator is dcud's own server, for the demo, field checks and
benchmarks. The independent reference for interoperability is the test peer in tests/peers/.

It is built in layers, each in its own module:

- **Model** (:mod:`dcud.sim.dlms_model`): the configuration (:class:`MeterSpec`), the meter's clock
  (a configurable offset and drift), its values as pure functions of its time (:class:`LoadModel`), so a
  test that knows the configuration knows every answer, the rows of the load profile and event log, and
  the request log. Time comes from an injected clock (``clock``: seconds since the epoch, UTC).
- **Associations** (:mod:`dcud.sim.dlms_association`, one per client SAP and channel): public (no
  authentication), LLS (password) and HLS-GMAC (mechanism 5: StoC in the AARE, the client's f(StoC)
  checked in reply_to_HLS_authentication, f(CtoS) returned), each with a security policy of suite 0
  (none, authenticated, encrypted or both; global or dedicated key, service-specific or general-glo
  ciphering, answered the way the request came). Every protected request's GCM tag is checked and its
  invocation counter must be above the last one accepted from that client SAP (kept for the meter's
  life, across associations); the meter's own counter never repeats.
- **Objects** (:mod:`dcud.sim.dlms_objects`): the association (object list with each client's access
  rights), the clock (read and set), registers with scaler_unit (active energy import and export,
  voltage, current, power, frequency), a load profile (class 7, capture period 15 minutes by default,
  read in full, by range or by entry, values a pure function of the capture time) and an event log.
- **Services** (here): request dispatch, GET/SET/ACTION. Long answers go in GET data blocks sized to the
  client's max receive PDU (capped by the meter's ``max_pdu_size``); long SETs are taken in blocks;
  GET/SET with list are served.

Nothing raises out of :meth:`DlmsMeter.handle`: a malformed APDU is logged and left unanswered, a refused
request gets the Data-Access-Result / exception-response a meter gives. The public names of the other
modules are re-exported here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Any

from dcud.codec.dlms.apdu import (
    AARE,
    AARQ,
    RLRQ,
    AccessResult,
    ActionRequestNormal,
    ActionRequestWithList,
    ActionResponseNormal,
    ActionResponseWithList,
    ActionResult,
    Apdu,
    AssociationResult,
    AttributeWithSelection,
    Conformance,
    ExceptionResponse,
    GetDataResult,
    GetRequestNext,
    GetRequestNormal,
    GetRequestWithList,
    GetResponseNormal,
    GetResponseWithDatablock,
    GetResponseWithList,
    SetRequestNormal,
    SetRequestWithDatablock,
    SetRequestWithFirstDatablock,
    SetRequestWithList,
    SetResponseDatablock,
    SetResponseLastDatablock,
    SetResponseNormal,
    SetResponseWithList,
    decode_apdu,
    encode_get_results,
)
from dcud.codec.dlms.axdr import (
    Data,
    DoubleLong,
    DoubleLongUnsigned,
    LongUnsigned,
    OctetString,
    Unsigned,
    VisibleString,
    decode_data,
    encode_data,
)
from dcud.codec.dlms.cosem import (
    ASSOCIATION_LN_OBIS,
    ASSOCIATION_REPLY_TO_HLS,
    CLASS_CLOCK,
    CLASS_DATA,
    CLASS_REGISTER,
    CLOCK_OBIS,
    CaptureObject,
    ScalerUnit,
)
from dcud.codec.dlms.obis import AttributeRef, Obis
from dcud.codec.dlms.security import INVOCATION_COUNTER_MAX
from dcud.errors import DcudError
from dcud.sim.dlms_association import (
    METER_CONFORMANCE,
    SERVICE_NOT_SUPPORTED,
    SERVICE_OPERATION_NOT_POSSIBLE,
    STATE_SERVICE_NOT_ALLOWED,
    STATE_SERVICE_UNKNOWN,
    Association,
    AssociationServer,
    _LongGet,
    _LongSet,
    _Protection,
)
from dcud.sim.dlms_model import (
    CURRENT_L1,
    DEFAULT_SYSTEM_TITLE,
    DEVICE_NAME,
    ENERGY_EXPORT,
    ENERGY_IMPORT,
    EVENT_CODE,
    EVENT_LOG,
    FREQUENCY,
    GREEN_BOOK_AUTHENTICATION_KEY,
    GREEN_BOOK_BLOCK_CIPHER_KEY,
    LOAD_PROFILE,
    POWER_IMPORT,
    SERIAL_NUMBER,
    UNIT_A,
    UNIT_HZ,
    UNIT_V,
    UNIT_W,
    UNIT_WH,
    VOLTAGE_L1,
    ClientSpec,
    EventSpec,
    LoadModel,
    MeterClock,
    MeterSpec,
    default_clients,
    expected_registers,
    iso,
    parse_time,
)
from dcud.sim.dlms_objects import (
    DATA_BLOCK_NUMBER_INVALID,
    LONG_GET_ABORTED,
    LONG_SET_ABORTED,
    NO_LONG_GET_IN_PROGRESS,
    NO_LONG_SET_IN_PROGRESS,
    OBJECT_CLASS_INCONSISTENT,
    OBJECT_UNDEFINED,
    OTHER_REASON,
    READ_WRITE_DENIED,
    TYPE_UNMATCHED,
    _AssociationObject,
    _Clock,
    _Ctx,
    _DataObject,
    _Object,
    _Profile,
    _Register,
)

MAX_LIST_ITEMS = 64
"""Attributes in one GET/SET-with-list; a longer list is refused as a whole."""
MAX_SET_BYTES = 65536
"""A SET value reassembled from blocks (the clock needs 14 bytes)."""


# ---------------------------------------------------------------------------------------------------
# The meter


class DlmsMeter(AssociationServer):
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
        super().__init__(spec, clock, challenge)
        self.clients = {c.sap: c for c in spec.clients}
        self.silent = spec.silent
        self.objects: dict[Obis, _Object] = {}
        self._build_objects()

    # -- objects ----------------------------------------------------------------------------------

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
