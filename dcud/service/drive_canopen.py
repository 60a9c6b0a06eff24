"""CANopen master of one CiA 402 drive: SDO, NMT, TPDO mapping and CiA 402 state from its frames.

A :class:`CanopenDrive` is one ``[[drive]]`` with ``protocol = "canopen"``; the CAN bus service
(:mod:`dcud.service.drives`) owns the bus and routes this node's frames to it by COB-ID, in the event
loop. The protocol is :mod:`dcud.codec.canopen` and :mod:`dcud.codec.cia402` (sans-I/O), so no thread of
the canopen library runs inside dcud (``docs/drives.md`` has the measurement behind that choice).

Per drive, the master:

- tracks NMT state from heartbeat and boot-up, starts the node (NMT start) once it is configured, and
  reconfigures it after a boot-up, a heartbeat loss or a bus reopen;
- learns the heartbeat consumer timeout (``heartbeat_timeout_s``, or from the producer time 1017) and
  gives it to the bus's :class:`~dcud.codec.heartbeat.HeartbeatWatch`, which the service drives; a loss
  comes back as :meth:`CanopenDrive.heartbeat_lost`;
- reads the TPDO mapping (1800+/1A00+) from the drive unless ``[[drive.tpdo]]`` configures it, and decodes
  statusword, position, velocity, error code and mode display from TPDOs; what no TPDO carries is read by
  SDO every ``poll_interval_s``;
- decodes EMCY into ``drive_fault`` events; raises ``drive_boot_up``, ``drive_heartbeat_lost`` and
  ``drive_heartbeat_restored``.

State publishing, fault events, history and the CiA 402 command walk are :class:`~dcud.service.
drive_base.DriveBase`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dcud.codec import canopen as co
from dcud.codec.cia402 import decode_emcy
from dcud.codec.heartbeat import HeartbeatBack, HeartbeatStatus, HeartbeatWatch, heartbeat_timeout_s
from dcud.config.model import DriveConfig
from dcud.errors import (
    NegativeResponse,
    PeerTimeout,
    ProtocolError,
    RemoteProtocolError,
    TransportError,
)
from dcud.runtime.backoff import Backoff
from dcud.runtime.bus import EventBus
from dcud.runtime.timefmt import rfc3339_ms
from dcud.service.commands import CommandError
from dcud.service.drive_base import DriveBase, DriveEvents
from dcud.service.drive_commands import DriveStateError, parse_int
from dcud.transport.can import CanBusState, CanPort

DEFAULT_SDO_TIMEOUT_S = 1.0
DRIVE_ERRORS: tuple[type[BaseException], ...] = (
    PeerTimeout,
    NegativeResponse,
    ProtocolError,
    TransportError,
)
"""What talking to a drive may raise; anything else is a bug and fails the service."""


class NodeRebootedError(TransportError):
    """The node booted while we talked to it; whatever was in flight is void."""


_SLOTS: dict[tuple[int, int], str] = {
    (0x6041, 0): "statusword",
    (0x6064, 0): "position",
    (0x606C, 0): "velocity",
    (0x603F, 0): "error_code",
    (0x6061, 0): "mode",
    (0x60FD, 0): "digital_io",
}


@dataclass(frozen=True)
class _Tpdo:
    number: int
    cob_id: int
    layout: co.PdoLayout
    slots: tuple[str | None, ...]


class CanopenDrive(DriveBase):
    """One CiA 402 drive on a CAN bus (see the module docstring)."""

    protocol = "canopen"

    def __init__(
        self,
        config: DriveConfig,
        *,
        port: CanPort,
        bus: EventBus,
        events: DriveEvents,
        counters: dict[str, int],
        route: Callable[[int, Callable[[bytes, float], None] | None], None],
        heartbeats: HeartbeatWatch,
    ) -> None:
        super().__init__(config, bus, events, counters)
        self.node_id = config.node_id
        self.port = port
        self._route = route
        self._heartbeats = heartbeats
        heartbeats.add(config.node_id, config.heartbeat_timeout_s)
        self.sdo = co.SdoClient(config.node_id, config.timeout_s or DEFAULT_SDO_TIMEOUT_S)
        self._sdo_lock = asyncio.Lock()
        self._sdo_waiter: asyncio.Future[co.SdoDone | co.SdoSend] | None = None
        self.nmt: co.NmtState | None = None
        self.producer_time_ms: int | None = None
        self.last_emcy: dict[str, Any] | None = None
        self.tpdos: list[_Tpdo] = []
        self.needs_setup = True
        self._last_poll_s = 0.0
        self._last_problem = ""
        self._mapped: set[str] = set()

    @property
    def heartbeat(self) -> HeartbeatStatus:
        """This node's heartbeat as the bus's watch knows it."""
        return self._heartbeats.status(self.node_id)

    @property
    def heartbeat_timeout_s(self) -> float | None:
        """The consumer timeout (configured, or learnt from 1017), None while unknown or off."""
        return self._heartbeats.timeout_s(self.node_id)

    # -- frames (event loop, synchronous) --------------------------------------------------------

    def on_heartbeat(self, data: bytes, now: float) -> None:
        """Heartbeat or boot-up from this node (``now`` on the clock of the bus's heartbeat watch)."""
        try:
            state = co.decode_heartbeat(data)
        except RemoteProtocolError:
            self.count("malformed")
            return
        before = self.heartbeat
        back = self._heartbeats.heartbeat(self.node_id, now)
        significant = False
        if before is not HeartbeatStatus.OK:
            if back and isinstance(back[0], HeartbeatBack):
                self._wake.set()
                self.log.info("heartbeat restored", nmt=str(state))
                self.emit(
                    "drive_heartbeat_restored", f"drive {self.name}: heartbeat back ({state})", nmt=str(state)
                )
            significant = True
        if not self.online:
            self.online = True
            self.last_error = ""
            significant = True
        if state is co.NmtState.BOOT_UP:
            self.count("boot_ups")
            self.log.info("boot-up")
            waiter = self._sdo_waiter
            if waiter is not None and not waiter.done():
                # The node's SDO server restarted: the transfer in flight will never be answered.
                waiter.set_exception(
                    NodeRebootedError(f"drive {self.name}: node rebooted during an SDO transfer")
                )
            self.emit(
                "drive_boot_up", f"drive {self.name} (node {self.node_id}) booted", node_id=self.node_id
            )
            self.needs_setup = True
            self._wake.set()
        elif state is not co.NmtState.OPERATIONAL and self.nmt is co.NmtState.OPERATIONAL:
            self.log.warning("drive left operational", nmt=str(state))
            self.needs_setup = True
            self._wake.set()
        elif self.nmt is None and state is not co.NmtState.OPERATIONAL:
            self._wake.set()
        if state is not self.nmt:
            self.nmt = state
            significant = True
        if significant:
            self.changed(True)

    def on_emcy(self, data: bytes, now: float) -> None:
        """An emergency message from this node."""
        try:
            emcy = decode_emcy(data)
        except RemoteProtocolError:
            self.count("malformed")
            return
        self.count("emcy")
        stamp = rfc3339_ms(time.time())
        self.last_emcy = {"code": emcy.code, "text": emcy.text, "register": emcy.register, "ts": stamp}
        level = self.log.info if emcy.is_reset else self.log.warning
        level("EMCY", code=f"0x{emcy.code:04X}", text=emcy.text, register=emcy.register)
        if not emcy.is_reset:
            self.error_code = emcy.code
            self.report_emcy(emcy.code, emcy.register)
        self.changed(True)

    def on_sdo(self, data: bytes, now: float) -> None:
        """An SDO response from this node."""
        waiter = self._sdo_waiter
        if waiter is None or waiter.done():
            self.count("sdo_stray")
            return
        try:
            result = self.sdo.receive(data, now)
        except (NegativeResponse, RemoteProtocolError) as exc:
            waiter.set_exception(exc)
            return
        if result is None:
            self.count("sdo_stray")
            return
        waiter.set_result(result)

    def on_tpdo(self, tpdo: _Tpdo, data: bytes, now: float) -> None:
        """A TPDO of this node: update the mapped values."""
        try:
            values = tpdo.layout.decode(data)
        except RemoteProtocolError:
            self.count("malformed")
            return
        counters = self.counters
        counters["tpdo"] = counters.get("tpdo", 0) + 1
        self.last_update_s = now
        significant = False
        minor = False
        for slot, value in zip(tpdo.slots, values, strict=True):
            if slot is None:
                continue
            if slot == "statusword":
                if self.set_statusword(value):
                    significant = True
                elif value != self.statusword:
                    minor = True
            elif slot == "error_code":
                if value != self.error_code:
                    self.error_code = value
                    if value:
                        self.report_emcy(value, None)
                    significant = True
            elif getattr(self, slot) != value:
                setattr(self, slot, value)
                minor = True
        if not self.online:
            self.online = True
            significant = True
        if significant:
            self.changed(True)
        elif minor and self._publish_timer is None:  # else the pending timer publishes the latest state
            self.changed(False)

    def protocol_fields(self) -> dict[str, Any]:
        """NMT, heartbeat and EMCY members of the state document."""
        return {
            "nmt": str(self.nmt) if self.nmt is not None else "unknown",
            "configured": not self.needs_setup,
            "heartbeat": str(self.heartbeat),
            "heartbeat_timeout_s": self.heartbeat_timeout_s,
            "last_emcy": self.last_emcy,
        }

    # -- SDO -------------------------------------------------------------------------------------

    async def _send(self, frame: co.CanFrame) -> None:
        await self.port.send(frame.cob_id, frame.data)

    async def sdo_upload(self, index: int, subindex: int) -> bytes:
        """Read one object by SDO."""
        async with self._sdo_lock:
            return await self._sdo_transfer(
                self.sdo.upload(index, subindex, time.monotonic()), index, subindex
            )

    async def sdo_download(self, index: int, subindex: int, data: bytes) -> None:
        """Write one object by SDO."""
        async with self._sdo_lock:
            await self._sdo_transfer(
                self.sdo.download(index, subindex, data, time.monotonic()), index, subindex
            )

    async def _sdo_transfer(self, first: co.CanFrame, index: int, subindex: int) -> bytes:
        loop = asyncio.get_running_loop()
        frame = first
        try:
            for _ in range(co.MAX_SDO_BYTES // 7 + 2):
                waiter: asyncio.Future[co.SdoDone | co.SdoSend] = loop.create_future()
                self._sdo_waiter = waiter
                # Read before sending: the answer may arrive (and end the transfer) while we send.
                deadline = self.sdo.deadline_s or time.monotonic()
                await self._send(frame)
                try:
                    # Deadlines are on time.monotonic(), the clock frames are stamped with.
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        result = await waiter
                except TimeoutError:
                    self.count("sdo_timeouts")
                    abort = self.sdo.expire(time.monotonic())
                    with contextlib.suppress(TransportError):
                        await self._send(abort)
                    raise PeerTimeout(
                        f"drive {self.name}: no SDO answer for 0x{index:04X}:{subindex:02X} "
                        f"within {self.sdo.timeout_s} s"
                    ) from None
                except co.SdoRemoteError as exc:
                    self.count("sdo_errors")
                    with contextlib.suppress(TransportError):
                        await self._send(exc.abort)
                    raise
                except NegativeResponse:
                    self.count("sdo_aborts")
                    raise
                if isinstance(result, co.SdoDone):
                    return result.data
                frame = result.frame
            raise RemoteProtocolError(f"drive {self.name}: SDO transfer did not end")
        finally:
            self._sdo_waiter = None
            if self.sdo.busy:
                self.sdo.cancel()

    async def read_typed(self, index: int, subindex: int, data_type: co.DataType) -> Any:
        """Read and decode one object."""
        return co.decode_value(await self.sdo_upload(index, subindex), data_type)

    # -- management ------------------------------------------------------------------------------

    def bus_state_changed(self, state: CanBusState) -> None:
        """The bus closed or reopened: everything heard before is stale."""
        if state is CanBusState.CLOSED:
            self.sdo.cancel()
            waiter = self._sdo_waiter
            if waiter is not None and not waiter.done():
                waiter.set_exception(TransportError(f"CAN bus {self.config.bus} closed"))
            self.online = False
            self.last_error = f"CAN bus {self.config.bus} closed"
            self.nmt = None
            self._heartbeats.reset(self.node_id)
            self.needs_setup = True
            self.changed(True)
        elif state is CanBusState.ACTIVE:
            self._wake.set()

    async def manage(self, stopping: asyncio.Event) -> None:
        """Configure, start and poll the node until ``stopping`` (heartbeat: the service's watcher)."""
        backoff = Backoff(0.5, 10.0)
        while not stopping.is_set():
            now = time.monotonic()
            # A node whose heartbeat was lost is not probed: its next heartbeat or boot-up wakes us.
            if self.port.is_open and self.needs_setup and self.heartbeat is not HeartbeatStatus.LOST:
                try:
                    await self._setup()
                    backoff.reset()
                    self._last_problem = ""
                except NodeRebootedError:
                    continue  # set up again at once, now that it listens
                except DRIVE_ERRORS as exc:
                    self._problem(exc)
                    await self._sleep(stopping, backoff.next_delay_s())
                    continue
            if (
                self.fault_pending_since_s is not None
                and "error_code" not in self._mapped
                and not self.needs_setup
            ):
                with contextlib.suppress(*DRIVE_ERRORS):
                    code = int(await self.read_typed(0x603F, 0, co.DataType.U16))
                    self.error_code = code
                    self.report_emcy(code, None)
                    self.changed(True)
            self.flush_pending_fault(time.monotonic())
            if (
                self.port.is_open
                and not self.needs_setup
                and now - self._last_poll_s >= self.config.poll_interval_s
            ):
                self._last_poll_s = now
                try:
                    await self._poll()
                except DRIVE_ERRORS as exc:
                    self._problem(exc)
            await self._sleep(stopping, self.config.poll_interval_s)

    def _problem(self, exc: BaseException) -> None:
        text = str(exc)
        changed = text != self.last_error
        if text != self._last_problem:  # once per state change, not once per retry
            self._last_problem = text
            self.log.warning("drive not reachable", error=text)
        self.last_error = text
        if isinstance(exc, PeerTimeout) and self.heartbeat is not HeartbeatStatus.OK and self.online:
            self.online = False
            changed = True
        if changed:
            self.changed(True)

    def heartbeat_lost(self, timeout_s: float) -> None:
        """The bus's heartbeat watch found this node's heartbeat overdue: offline until it comes back."""
        self.online = False
        self.nmt = None
        self.needs_setup = True
        self.last_error = f"no heartbeat within {timeout_s:.3g} s"
        self.count("heartbeat_lost")
        self.log.warning("heartbeat lost", timeout_s=timeout_s)
        self.emit(
            "drive_heartbeat_lost",
            f"drive {self.name} (node {self.node_id}): no heartbeat within {timeout_s:.3g} s",
            timeout_s=timeout_s,
        )
        self.changed(True)

    async def _setup(self) -> None:
        """Probe the node, learn its heartbeat and TPDO mapping, read its state, start it."""
        device_type = await self.read_typed(0x1000, 0, co.DataType.U32)
        if device_type & 0xFFFF != 402:
            self.log.warning("device type is not CiA 402", device_type=f"0x{device_type:08X}")
        if self.config.heartbeat_timeout_s is None:
            try:
                self.producer_time_ms = int(await self.read_typed(0x1017, 0, co.DataType.U16))
            except NegativeResponse:
                self.producer_time_ms = 0
            ms = self.producer_time_ms
            self._heartbeats.set_timeout(self.node_id, heartbeat_timeout_s(ms) if ms else None)
        await self._learn_tpdos()
        await self._read_state()
        self.online = True
        self.last_error = ""
        if self.nmt is not co.NmtState.OPERATIONAL:
            await self._send(co.nmt_command(co.NmtCommand.START, self.node_id))
            self.count("nmt_start")
            self.log.info("NMT start sent", tpdos=[f"0x{t.cob_id:03X}" for t in self.tpdos])
            if self.heartbeat_timeout_s is None:
                self.nmt = co.NmtState.OPERATIONAL  # nothing will tell us otherwise
        self.needs_setup = False
        self.changed(True)

    async def _learn_tpdos(self) -> None:
        tpdos: list[_Tpdo] = []
        if self.config.tpdo:
            for cfg in self.config.tpdo:
                try:
                    objects = [co.parse_object_ref(ref) for ref in cfg.objects]
                except ProtocolError as exc:
                    raise TransportError(f"drive {self.name}: tpdo {cfg.number}: {exc}") from exc
                cob_id = cfg.cob_id or (co.TPDO_BASES[cfg.number - 1] + self.node_id)
                tpdos.append(self._make_tpdo(cfg.number, cob_id, objects))
        else:
            for number in range(1, 5):
                try:
                    cob_entry = int(await self.read_typed(0x1800 + number - 1, 1, co.DataType.U32))
                except NegativeResponse:
                    continue  # the drive has no such TPDO
                if cob_entry & 0x80000000:
                    continue  # not valid (disabled)
                count = int(await self.read_typed(0x1A00 + number - 1, 0, co.DataType.U8))
                if not 1 <= count <= 8:
                    continue
                objects = []
                for sub in range(1, count + 1):
                    entry = int(await self.read_typed(0x1A00 + number - 1, sub, co.DataType.U32))
                    objects.append(co.MappedObject.from_entry(entry))
                tpdos.append(self._make_tpdo(number, cob_entry & 0x7FF, objects))
        for old in self.tpdos:
            self._route(old.cob_id, None)
        self.tpdos = tpdos
        self._mapped = {slot for t in tpdos for slot in t.slots if slot is not None}
        for tpdo in tpdos:
            self._route(tpdo.cob_id, _bind_tpdo(self, tpdo))

    def _make_tpdo(self, number: int, cob_id: int, objects: Sequence[co.MappedObject]) -> _Tpdo:
        layout = co.PdoLayout(objects)
        slots = tuple(_SLOTS.get((o.index, o.subindex)) for o in objects)
        return _Tpdo(number, cob_id, layout, slots)

    async def _read_state(self) -> None:
        if self.set_statusword(int(await self.read_typed(0x6041, 0, co.DataType.U16))):
            self.changed(True)
        with contextlib.suppress(NegativeResponse):
            self.error_code = int(await self.read_typed(0x603F, 0, co.DataType.U16))
        with contextlib.suppress(NegativeResponse):
            self.mode = int(await self.read_typed(0x6061, 0, co.DataType.I8))
        if "position" not in self._mapped:
            with contextlib.suppress(NegativeResponse):
                self.position = int(await self.read_typed(0x6064, 0, co.DataType.I32))
        if "velocity" not in self._mapped:
            with contextlib.suppress(NegativeResponse):
                self.velocity = int(await self.read_typed(0x606C, 0, co.DataType.I32))
        self.last_update_s = time.monotonic()

    def _tpdo_fresh(self) -> bool:
        return (
            "statusword" in self._mapped
            and self.nmt is co.NmtState.OPERATIONAL
            and time.monotonic() - self.last_update_s < max(2 * self.config.poll_interval_s, 0.5)
        )

    async def _poll(self) -> None:
        """Read by SDO what the TPDOs do not bring (or everything, when they stopped coming)."""
        if self._tpdo_fresh():
            return
        await self._read_state()
        if not self.online:
            self.online = True
            self.last_error = ""
        self.changed(False)

    # -- commands --------------------------------------------------------------------------------

    def _require_sdo(self, what: str) -> None:
        if not self.port.is_open:
            raise DriveStateError(
                f"drive {self.name}: {what} refused: CAN bus {self.config.bus} is {self.port.state}"
            )
        if not self.online:
            raise DriveStateError(
                f"drive {self.name}: {what} refused: the drive is offline ({self._offline_reason()})"
            )
        if self.nmt is co.NmtState.STOPPED:
            raise DriveStateError(f"drive {self.name}: {what} refused: NMT state is stopped (no SDO)")

    async def refresh_state(self) -> None:
        """Read the statusword by SDO unless a TPDO brought it very recently."""
        self._require_sdo("command")
        if self._tpdo_fresh() and time.monotonic() - self.last_update_s < 0.1:
            return
        if self.set_statusword(int(await self.read_typed(0x6041, 0, co.DataType.U16))):
            self.changed(True)

    async def write_controlword(self, value: int) -> None:
        """Write 6040 by SDO."""
        await self.sdo_download(0x6040, 0, co.encode_value(value, co.DataType.U16))
        self.count("controlword_writes")

    def _object_args(self, request: Mapping[str, Any]) -> tuple[int, int, co.DataType]:
        index = parse_int(request, "index", lo=0, hi=0xFFFF)
        subindex = parse_int(request, "subindex", default=0, lo=0, hi=0xFF)
        type_name = request.get("type")
        if type_name is None:
            data_type = co.KNOWN_OBJECTS.get((index, subindex), co.DataType.BYTES)
        else:
            try:
                data_type = co.DataType(str(type_name))
            except ValueError:
                choices = ", ".join(t.value for t in co.DataType)
                raise CommandError(f'"type": expected one of {choices}, got {type_name!r}') from None
        return index, subindex, data_type

    async def read_object(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """``drive/read``: one object by SDO, decoded as ``type`` (default: known type or bytes)."""
        index, subindex, data_type = self._object_args(request)
        self._require_sdo("read")
        data = await self.sdo_upload(index, subindex)
        try:
            value = co.decode_value(data, data_type)
        except RemoteProtocolError as exc:
            raise CommandError(f"0x{index:04X}:{subindex:02X} returned {len(data)} bytes: {exc}") from None
        if isinstance(value, bytes):
            value = value.hex()
        return {
            "drive": self.name,
            "index": f"0x{index:04X}",
            "subindex": subindex,
            "type": str(data_type),
            "value": value,
            "raw": data.hex(),
        }

    async def write_object(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """``drive/write``: one object by SDO; the controlword only through the transition commands."""
        index, subindex, data_type = self._object_args(request)
        if index == 0x6040:
            raise DriveStateError(
                f"drive {self.name}: write to the controlword 6040 refused: use drive/enable, drive/disable, "
                "drive/quick_stop or drive/fault_reset, which check the drive's state"
            )
        if "value" not in request:
            raise CommandError('missing "value"')
        try:
            data = co.encode_value(request["value"], data_type)
        except ProtocolError as exc:
            raise CommandError(f'"value": {exc}') from None
        self._require_sdo("write")
        async with self._command_lock:
            await self.sdo_download(index, subindex, data)
        self.log.info("object written", index=f"0x{index:04X}", subindex=subindex, value=request["value"])
        return {
            "drive": self.name,
            "index": f"0x{index:04X}",
            "subindex": subindex,
            "type": str(data_type),
            "written": data.hex(),
            "state": self.state_document(),
        }


def _bind_tpdo(drive: CanopenDrive, tpdo: _Tpdo) -> Callable[[bytes, float], None]:
    return functools.partial(drive.on_tpdo, tpdo)  # a C-level call per TPDO, no Python frame in between
