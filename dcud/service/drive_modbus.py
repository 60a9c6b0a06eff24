"""Modbus RTU servo drives on a shared serial line, polled through the line service's leases.

A ``[[drive]]`` with ``protocol = "modbus-rtu"`` names a ``[[line]]`` as its ``bus``; the line service
owns the tty (design.md rule 4) and this service only ever talks on it inside a lease of kind
``drive`` (priority between a CLI read and a scheduled meter poll), so drive polls and meter readouts
share the wire and never interleave. Each transaction is a :class:`~dcud.codec.modbus_rtu.
ModbusTransaction` run by :func:`~dcud.service.session_runner.run_session` on the leased port.

The register map (``[drive.registers]``, 0-based addresses) names where the drive keeps its CiA 402
statusword (``status``), controlword (``control``), position and velocity (one or two registers,
``word_order``), fault code and digital I/O; everything configured is read every ``poll_interval_s``,
in one request when the registers lie close together. ``function`` selects holding (03) or input (04)
registers for the reads; the controlword is always a holding register (06).

State, events, history and commands are those of :class:`~dcud.service.drive_base.DriveBase`; with no
heartbeat on Modbus, three failed polls in a row raise ``drive_offline`` and the next answer
``drive_online``. A poll that waits for the line (a transparent session holds it) is *deferred*, not
failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dcud.codec import modbus_rtu as mb
from dcud.config.model import DriveConfig, ModbusRegisters
from dcud.errors import DcudError, PeerTimeout, ProtocolError, TransportError
from dcud.runtime.bus import EventBus
from dcud.runtime.events import EventSink
from dcud.runtime.supervisor import Service, ServiceContext
from dcud.runtime.timefmt import rfc3339_ms
from dcud.service.commands import CommandError
from dcud.service.drive_base import EVENT_QUEUE_SIZE, DriveBase, DriveEvents, HistorySink
from dcud.service.drive_commands import DriveRegistry, DriveStateError, parse_int
from dcud.service.line import LeasedPort, LeaseTimeout, LineRegistry
from dcud.service.session_runner import run_session

if TYPE_CHECKING:
    from dcud.config.loader import LoadedConfig

DEFAULT_RESPONSE_TIMEOUT_S = 0.5
OFFLINE_AFTER_FAILURES = 3
MAX_BLOCK_SPAN = 32
"""Registers further apart than this are read in separate requests."""
LEASE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class _Field:
    name: str
    address: int
    words: int


def register_fields(registers: ModbusRegisters) -> list[_Field]:
    """The configured registers to poll, by address."""
    fields = [
        _Field("statusword", registers.status, 1) if registers.status is not None else None,
        _Field("position", registers.position, registers.position_words)
        if registers.position is not None
        else None,
        _Field("velocity", registers.velocity, registers.velocity_words)
        if registers.velocity is not None
        else None,
        _Field("error_code", registers.fault, 1) if registers.fault is not None else None,
        _Field("digital_io", registers.io, 1) if registers.io is not None else None,
    ]
    return sorted((f for f in fields if f is not None), key=lambda f: f.address)


def plan_blocks(fields: Sequence[_Field]) -> list[tuple[int, int, list[_Field]]]:
    """Group fields into read requests ``(address, count, fields)``: close registers share one request."""
    blocks: list[tuple[int, int, list[_Field]]] = []
    for field in fields:
        if blocks:
            start, count, members = blocks[-1]
            end = max(start + count, field.address + field.words)
            if field.address - (start + count) <= MAX_BLOCK_SPAN and end - start <= mb.MAX_READ_REGISTERS:
                blocks[-1] = (start, end - start, [*members, field])
                continue
        blocks.append((field.address, field.words, [field]))
    return blocks


class ModbusDrive(DriveBase):
    """One Modbus RTU drive (module docstring)."""

    protocol = "modbus-rtu"

    def __init__(
        self,
        config: DriveConfig,
        *,
        lines: LineRegistry,
        bus: EventBus,
        events: DriveEvents,
        counters: dict[str, int],
    ) -> None:
        super().__init__(config, bus, events, counters)
        self._lines = lines
        self.registers = config.registers
        self.blocks = plan_blocks(register_fields(config.registers))
        self.response_timeout_s = config.timeout_s or DEFAULT_RESPONSE_TIMEOUT_S
        self.failures = 0
        self.deferred = 0
        self.last_poll = ""

    def protocol_fields(self) -> dict[str, Any]:
        """Line-related members of the state document."""
        return {"line": self.config.bus, "unit": self.config.node_id, "last_poll": self.last_poll or None}

    # -- talking on the line ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lease(self) -> AsyncIterator[LeasedPort]:
        line = self._lines.get(self.config.bus)
        if line is None:
            raise TransportError(f"line {self.config.bus} is not served (yet)")
        async with line.lease(f"drive:{self.name}", "drive", timeout_s=LEASE_TIMEOUT_S) as port:
            if self.config.framing is not None:
                await port.set_framing(self.config.framing)
            if self.config.baud is not None:
                await port.set_baud(self.config.baud)
            yield port

    async def transact(self, port: LeasedPort, request: mb.Request) -> tuple[int, ...]:
        """One request and its answer on a leased port (the session keeps the silence after it)."""
        session = mb.ModbusTransaction(request, baud=port.baud, response_timeout_s=self.response_timeout_s)
        result: tuple[int, ...] = await run_session(session, port)
        return result

    async def _read_block(self, port: LeasedPort, address: int, count: int) -> tuple[int, ...]:
        request = mb.read_registers(
            self.config.node_id, address, count, input_registers=self.registers.function == "input"
        )
        return await self.transact(port, request)

    # -- polling ---------------------------------------------------------------------------------

    def _apply(self, field: _Field, words: Sequence[int]) -> tuple[bool, bool]:
        """Store one field; returns (significant change, minor change)."""
        if field.words == 2:
            value = mb.to_signed(mb.join_words(self.registers.word_order == "big", words), 32)
        elif field.name in ("position", "velocity"):
            value = mb.to_signed(words[0], 16)
        else:
            value = words[0]
        if field.name == "statusword":
            if self.set_statusword(value):
                return True, False
            return False, False
        if field.name == "error_code":
            if value != self.error_code:
                self.error_code = value
                if value:
                    self.report_emcy(value, None)
                return True, False
            return False, False
        if getattr(self, field.name) != value:
            setattr(self, field.name, value)
            return False, True
        return False, False

    async def poll(self) -> None:
        """Read every configured register (one lease for the whole poll)."""
        if not self.blocks:
            return
        significant = minor = False
        async with self._lease() as port:
            for address, count, members in self.blocks:
                words = await self._read_block(port, address, count)
                # The fault code before the statusword, so a fault event carries its code.
                for field in sorted(members, key=lambda f: f.name != "error_code"):
                    offset = field.address - address
                    sig, mi = self._apply(field, words[offset : offset + field.words])
                    significant |= sig
                    minor |= mi
        self.count("polls")
        self.last_update_s = time.monotonic()
        self.flush_pending_fault(self.last_update_s)
        self.last_poll = rfc3339_ms(time.time())
        if self.failures >= OFFLINE_AFTER_FAILURES or not self.online:
            if self.failures >= OFFLINE_AFTER_FAILURES:
                self.log.info("drive answers again")
                self.emit("drive_online", f"drive {self.name} (unit {self.config.node_id}) answers again")
            self.online = True
            self.last_error = ""
            significant = True
        self.failures = 0
        if significant:
            self.changed(True)
        elif minor:
            self.changed(False)

    def _poll_failed(self, exc: BaseException) -> None:
        if isinstance(exc, LeaseTimeout):
            # Someone else (a transparent session) held the line: deferred, not the drive's fault.
            self.deferred += 1
            self.count("deferred")
            return
        self.failures += 1
        self.count("poll_failures")
        text = str(exc)
        if text != self.last_error:
            self.log.warning("drive poll failed", error=text, failures=self.failures)
        self.last_error = text
        if self.failures == OFFLINE_AFTER_FAILURES:
            self.online = False
            self.emit(
                "drive_offline",
                f"drive {self.name} (unit {self.config.node_id}): {self.failures} polls failed: {text}",
            )
            self.changed(True)

    async def manage(self, stopping: asyncio.Event) -> None:
        """Poll every ``poll_interval_s`` until ``stopping``."""
        while not stopping.is_set():
            started = time.monotonic()
            try:
                await self.poll()
            except (PeerTimeout, ProtocolError, TransportError, DcudError) as exc:
                self._poll_failed(exc)
            delay = self.config.poll_interval_s - (time.monotonic() - started)
            await self._sleep(stopping, delay)

    # -- commands --------------------------------------------------------------------------------

    async def refresh_state(self) -> None:
        """Read the status register now."""
        if self.registers.status is None:
            raise DriveStateError(
                f"drive {self.name}: no status register configured ([drive.registers] status)"
            )
        async with self._lease() as port:
            (raw,) = await self._read_block(port, self.registers.status, 1)
        self.online = True
        if self.set_statusword(raw):
            self.changed(True)

    async def write_controlword(self, value: int) -> None:
        """Write the control register (06)."""
        if self.registers.control is None:
            raise DriveStateError(
                f"drive {self.name}: no control register configured ([drive.registers] control)"
            )
        async with self._lease() as port:
            await self.transact(port, mb.write_register(self.config.node_id, self.registers.control, value))
        self.count("controlword_writes")

    async def read_object(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """``drive/read``: ``{"address": n, "count": k, "table": "holding"|"input"}``."""
        address = parse_int(request, "address", lo=0, hi=0xFFFF)
        count = parse_int(request, "count", default=1, lo=1, hi=mb.MAX_READ_REGISTERS)
        table = request.get("table", "holding")
        if table not in ("holding", "input"):
            raise CommandError('"table": expected "holding" or "input"')
        try:
            req = mb.read_registers(self.config.node_id, address, count, input_registers=table == "input")
        except ProtocolError as exc:
            raise CommandError(str(exc)) from None
        async with self._lease() as port:
            values = await self.transact(port, req)
        return {"drive": self.name, "address": address, "table": table, "values": list(values)}

    async def write_object(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """``drive/write``: ``{"address": n, "value": v}`` (06) or ``{"address": n, "values": [..]}`` (10)."""
        address = parse_int(request, "address", lo=0, hi=0xFFFF)
        raw_values = request.get("values")
        if raw_values is None:
            values = [parse_int(request, "value", lo=0, hi=0xFFFF)]
        elif isinstance(raw_values, list) and raw_values:
            values = [parse_int({"v": v}, "v", lo=0, hi=0xFFFF) for v in raw_values]
        else:
            raise CommandError('"values": expected a non-empty list of integers 0..65535')
        control = self.registers.control
        if control is not None and address <= control < address + len(values):
            raise DriveStateError(
                f"drive {self.name}: write to the control register {control} refused: use drive/enable, "
                "drive/disable, drive/quick_stop or drive/fault_reset, which check the drive's state"
            )
        try:
            req = (
                mb.write_register(self.config.node_id, address, values[0])
                if len(values) == 1
                else mb.write_registers(self.config.node_id, address, values)
            )
        except ProtocolError as exc:
            raise CommandError(str(exc)) from None
        async with self._command_lock, self._lease() as port:
            await self.transact(port, req)
        self.log.info("registers written", address=address, values=values)
        return {"drive": self.name, "address": address, "written": values, "state": self.state_document()}


@dataclass(frozen=True)
class ModbusDrivesConfig:
    """The slice of one Modbus drive service: the line's name and the drives on it."""

    line: str
    drives: tuple[DriveConfig, ...]


class ModbusDriveService:
    """Polls the Modbus RTU drives of one line through leases (module docstring)."""

    def __init__(
        self,
        config: ModbusDrivesConfig,
        lines: LineRegistry,
        bus: EventBus,
        event: EventSink,
        history: HistorySink,
        registry: DriveRegistry,
    ) -> None:
        self.config = config
        self.name = f"drives.{config.line}"
        self._lines = lines
        self._state_bus = bus
        self._event = event
        self._history = history
        self._registry = registry
        self.counters: dict[str, int] = {}
        self.drives: dict[str, ModbusDrive] = {}
        self._events: DriveEvents = asyncio.Queue(EVENT_QUEUE_SIZE)

    async def _event_loop(self) -> None:
        while True:
            event_type, text, fields = await self._events.get()
            try:
                await self._event(event_type, text, **fields)
            except DcudError as exc:
                self.counters["events_failed"] = self.counters.get("events_failed", 0) + 1
                ctx_log = self.drives[fields["drive"]].log if fields.get("drive") in self.drives else None
                if ctx_log is not None:
                    ctx_log.warning("event not stored", event_type=event_type, error=str(exc))

    async def run(self, ctx: ServiceContext) -> None:
        """Poll until stopped."""
        for cfg in self.config.drives:
            self.drives[cfg.name] = ModbusDrive(
                cfg, lines=self._lines, bus=self._state_bus, events=self._events, counters=self.counters
            )
        tasks = [ctx.spawn("events", self._event_loop())]
        for drive in self.drives.values():
            tasks.append(ctx.spawn(drive.name, drive.manage(ctx.stopping)))
            tasks.append(ctx.spawn(f"{drive.name}:history", drive.history_loop(ctx, self._history)))
            self._registry.add(drive)
            drive.publish()
        ctx.set_ready()
        try:
            await ctx.heartbeat_forever(min(5.0, ctx.liveness_s / 3))
        finally:
            for drive in self.drives.values():
                self._registry.discard(drive)
                drive.stop_publishing()
            for task in tasks:
                task.cancel()
            while not self._events.empty():
                event_type, text, fields = self._events.get_nowait()
                with contextlib.suppress(DcudError):
                    await self._event(event_type, text, **fields)


def build_modbus_drive_services(
    config: LoadedConfig,
    registry: DriveRegistry,
    lines: LineRegistry,
    bus: EventBus,
    event: EventSink,
    history: HistorySink,
) -> Sequence[Service]:
    """One ModbusDriveService per ``[[line]]`` that has Modbus RTU drives."""
    services: list[Service] = []
    for line in config.toml.line:
        on_line = tuple(d for d in config.toml.drive if d.protocol == "modbus-rtu" and d.bus == line.name)
        if on_line:
            services.append(
                ModbusDriveService(
                    ModbusDrivesConfig(line.name, on_line), lines, bus, event, history, registry
                )
            )
    return services
