"""Line ownership (design.md rule 4): one owner per physical serial line, everyone else takes a lease.

A :class:`Line` is the arbiter of one ``[[line]]``: it holds the open
:class:`~dcud.transport.serial.SerialPort` (when there is one) and grants *leases*. A lease is
exclusive: while it is held nobody else writes to or reads from the line, so two masters never
interleave bytes. Waiting users queue FIFO within a priority
(``bridge`` before ``cli`` before ``drive`` before ``poll`` by default); the queue is bounded and a user
that finds it full gets :class:`LineBusyError` at once (counted).

Usage, from any service that found the line in the :class:`LineRegistry`::

    async with line.lease("poll:flat-12", "poll", timeout_s=10) as port:
        port.write(request)
        await port.drain()
        answer = await port.read(4096, timeout_s=0.5)

When the lease ends the line goes back to its configured baud and framing and its input is flushed,
so every holder starts from the same state. :class:`LineService` is the supervised owner: it opens the
tty (baud, framing, kernel RS485 mode from ``rs485.mode``/``dcd.mode``, echo filter), reopens a failing
device with backoff, raises ``line_down``/``line_up`` events and publishes ``<p>/line/<name>/state``.
:class:`Line` objects live in the registry for the life of the process, so leases queued while the
line service restarts (reload) simply wait for the line to open again.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import structlog

from dcud.config.model import LineConfig
from dcud.errors import DcudError, LocalProtocolError, PeerTimeout, TransportError
from dcud.runtime.bus import EventBus
from dcud.runtime.events import EventSink
from dcud.runtime.link import STOPPED, Link, LinkDown, LinkPolicy, run_link, until_stopped
from dcud.runtime.supervisor import Service, ServiceContext
from dcud.runtime.timefmt import rfc3339

if TYPE_CHECKING:
    from dcud.config.loader import LoadedConfig

    # pyserial is imported where a line's service opens its port, not with the registry that every
    # builder is handed: a daemon without [[line]] does not load it (docs/benchmarks.md).
    from dcud.transport.serial import PortCounters, Rs485Settings, SerialPort

log = structlog.get_logger("dcud.line")

LeaseKind = Literal["poll", "bridge", "cli", "drive"]
LEASE_KINDS: tuple[LeaseKind, ...] = ("poll", "bridge", "cli", "drive")
DEFAULT_PRIORITY: dict[str, int] = {"bridge": 0, "cli": 1, "drive": 2, "poll": 3}
"""Lower runs first. A transparent session preempts nothing but goes before every queued poll."""
DEFAULT_MAX_WAITERS = 64
DEFAULT_LEASE_TIMEOUT_S = 30.0

LineStateName = Literal["closed", "open", "failed"]


class LineBusyError(TransportError):
    """The line's wait queue is full; the request was refused at once."""


class LineClosedError(TransportError):
    """The line was removed from the configuration while the request waited."""


class LeaseTimeout(PeerTimeout):
    """No lease within ``timeout_s``. ``holder`` is who held the line then (None: it was down)."""

    def __init__(self, message: str, holder: LeaseInfo | None, line_state: str) -> None:
        super().__init__(message)
        self.holder = holder
        self.line_state = line_state

    @property
    def deferred(self) -> bool:
        """True when the line was up but held by a transparent (bridge) session."""
        return self.holder is not None and self.holder.kind == "bridge"


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """Who holds (or waits for) the line."""

    owner: str
    kind: str
    priority: int
    since_s: float
    """``time.time()`` when the lease was granted (or requested, for waiters)."""

    def to_json(self) -> dict[str, object]:
        """The ``lease`` member of the line state document."""
        return {"owner": self.owner, "kind": self.kind, "since": rfc3339(self.since_s)}


@dataclass(eq=False)
class _Waiter:
    priority: int
    order: int
    info: LeaseInfo
    future: asyncio.Future[SerialPort]
    gone: bool = False

    def __lt__(self, other: _Waiter) -> bool:
        return (self.priority, self.order) < (other.priority, other.order)


@dataclass
class LineCounters:
    """Counters of a line over the life of the process (all opens of its device)."""

    bytes_rx: int = 0
    bytes_tx: int = 0
    rx_dropped: int = 0
    echo_dropped: int = 0
    errors: int = 0
    opens: int = 0
    leases_granted: int = 0
    leases_refused: int = 0
    lease_timeouts: int = 0

    def add_port(self, counters: PortCounters) -> None:
        """Fold a closed port's counters into the totals."""
        self.bytes_rx += counters.bytes_rx
        self.bytes_tx += counters.bytes_tx
        self.rx_dropped += counters.rx_dropped
        self.echo_dropped += counters.echo_dropped


class LeasedPort:
    """The line as its lease holder sees it; every method fails once the lease has ended.

    ``write`` sends bytes (what the driver does not take at once is queued); ``drain`` waits until they
    are on the wire; ``output_pending`` counts what is not; ``read`` returns what arrived (``b""`` after
    ``timeout_s`` of silence); ``read_until`` raises PeerTimeout when the separator does not come;
    ``set_receiver`` has received bytes pushed to a callback instead; ``set_baud``/``set_framing`` drain
    first, then switch; ``reset_line_settings`` goes back to the configured baud and framing. Transport
    failures raise :class:`~dcud.errors.TransportError`.
    """

    def __init__(self, line: Line, port: SerialPort, info: LeaseInfo) -> None:
        self._line = line
        self._port: SerialPort | None = port
        self.info = info

    @property
    def line_name(self) -> str:
        """Name of the leased line."""
        return self._line.name

    @property
    def owner(self) -> str:
        """The owner string given to :meth:`Line.lease`."""
        return self.info.owner

    @property
    def kind(self) -> str:
        """The lease kind (poll, bridge, cli, drive)."""
        return self.info.kind

    def _live(self) -> SerialPort:
        if self._port is None:
            raise LocalProtocolError(f"lease of line {self._line.name} by {self.info.owner} has ended")
        return self._port

    @property
    def baud(self) -> int:
        """Rate the port runs at now."""
        return self._live().baud

    @property
    def framing(self) -> str:
        """Framing in force now (``"8E1"``...)."""
        return str(self._live().framing)

    @property
    def waiting(self) -> int:
        """How many others wait for this line (a bridge may release an idle lease when > 0)."""
        return self._line.waiting

    def write(self, data: bytes) -> int:
        """Send ``data``: to the driver at once when nothing is queued before it, else queued behind.

        Returns the bytes left waiting in user space (0: the driver took everything).
        """
        return self._live().write(data)

    def direct_writer(self) -> Callable[[bytes], int]:
        """The port's :meth:`~dcud.transport.serial.SerialPort.write_direct`, for a holder's hot path
        (one call less per chunk, and the common case in a few operations).

        Valid only while this lease is held: the caller must drop it when the lease ends (the
        bridge does so where it forgets the lease), since it bypasses the check that :meth:`write`
        makes on every call.
        """
        return self._live().write_direct

    def output_pending(self) -> int:
        """Bytes written and not on the wire yet (queued here plus the driver's TIOCOUTQ count)."""
        return self._live().output_pending()

    def set_receiver(self, receiver: Callable[[bytes], None] | None) -> None:
        """Push received bytes to ``receiver`` synchronously instead of buffering them for :meth:`read`.

        Bytes already received go first, then each chunk as it arrives; ``b""`` once when the line
        closes. ``None`` goes back to buffering. The receiver is dropped when the lease ends, so it
        never sees a byte of the next holder; ``set_receiver(None)`` after the end does nothing.
        The receiver must not raise (it runs in the port's reader callback).
        """
        port = self._port
        if port is None and receiver is None:
            return
        self._live().set_receiver(receiver)

    async def drain(self) -> None:
        """Wait until every written byte has left the UART."""
        await self._live().drain()

    async def read(self, max_bytes: int = 4096, timeout_s: float = 1.0) -> bytes:
        """Up to ``max_bytes`` once something arrived; ``b""`` after ``timeout_s`` of silence."""
        return await self._live().read(max_bytes, timeout_s)

    async def read_until(self, separator: bytes, timeout_s: float, max_bytes: int = 4096) -> bytes:
        """Bytes up to and including ``separator`` (at most ``max_bytes``); PeerTimeout otherwise."""
        return await self._live().read_until(separator, timeout_s, max_bytes)

    async def set_baud(self, baud: int) -> None:
        """Drain, then switch the rate (framing unchanged)."""
        port = self._live()
        if port.baud != baud:
            await port.drain()
            port.set_baud(baud)

    async def set_framing(self, framing: str) -> None:
        """Drain, then switch the character framing (``"7E1"``, ``"8E1"``, ``"8N1"``...)."""
        from dcud.transport.serial import Framing

        port = self._live()
        if str(port.framing) != str(Framing.parse(framing)):
            await port.drain()
            port.set_framing(framing)

    def flush_input(self) -> None:
        """Drop received bytes not read yet."""
        self._live().flush_input()

    async def reset_line_settings(self) -> None:
        """Back to the line's configured baud and framing."""
        config = self._line.config
        await self.set_framing(config.effective_framing)
        await self.set_baud(config.effective_baud)

    def _end(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            # Before the release flushes the input: later bytes are buffered, then dropped.
            port.set_receiver(None)


class Line:
    """The lease arbiter of one serial line (see the module docstring)."""

    def __init__(
        self,
        config: LineConfig,
        *,
        max_waiters: int = DEFAULT_MAX_WAITERS,
        on_change: Callable[[Line], None] | None = None,
    ) -> None:
        self.config = config
        self.max_waiters = max_waiters
        self.on_change = on_change
        self.state: LineStateName = "closed"
        self.since_s = time.time()
        self.last_error = ""
        self.counters = LineCounters()
        self.holder: LeaseInfo | None = None
        self.notes: dict[str, str] = {}
        """Device remarks for the state document (``rs485``, ``framing``, ``dcd``)."""
        self._port: SerialPort | None = None
        self._waiters: list[_Waiter] = []
        self._waiting = 0
        self._order = itertools.count()
        self._removed = False

    @property
    def name(self) -> str:
        """The line's name."""
        return self.config.name

    @property
    def waiting(self) -> int:
        """Lease requests queued now."""
        return self._waiting

    @property
    def port(self) -> SerialPort | None:
        """The open port, if any (owner use only: everyone else goes through :meth:`lease`)."""
        return self._port

    # -- owner side --------------------------------------------------------------------------------

    def attach(self, port: SerialPort) -> None:
        """The owner opened the device: mark open and hand the line to the first waiter."""
        self._port = port
        self._removed = False
        self.counters.opens += 1
        self._set_state("open", "")
        self._dispatch()

    def detach(self, state: LineStateName, error: str = "") -> None:
        """The device closed or failed: fold its counters and mark the line ``state``."""
        port = self._port
        self._port = None
        if port is not None:
            self.counters.add_port(port.counters)
            port.close()
        if state == "failed":
            self.counters.errors += 1
        self._set_state(state, error)

    def remove(self) -> None:
        """The line left the configuration: fail every waiter with LineClosedError."""
        self._removed = True
        self.detach("closed")
        for waiter in self._waiters:
            if not waiter.gone and not waiter.future.done():
                waiter.future.set_exception(LineClosedError(f"line {self.name} was removed"))
        self._waiters.clear()
        self._waiting = 0

    def _set_state(self, state: LineStateName, error: str) -> None:
        if state != self.state:
            self.since_s = time.time()
        self.state = state
        if error:
            self.last_error = error
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    # -- leases --------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(
        self,
        owner: str,
        kind: LeaseKind = "poll",
        *,
        priority: int | None = None,
        timeout_s: float | None = DEFAULT_LEASE_TIMEOUT_S,
    ) -> AsyncIterator[LeasedPort]:
        """Exclusive use of the line for the body of ``async with``.

        ``priority`` (lower first) defaults by ``kind``; ``timeout_s`` bounds the wait (None: no bound).
        Raises :class:`LeaseTimeout`, :class:`LineBusyError` (queue full) or :class:`LineClosedError`.
        """
        if kind not in DEFAULT_PRIORITY:
            raise LocalProtocolError(f"unknown lease kind {kind!r}")
        prio = DEFAULT_PRIORITY[kind] if priority is None else priority
        port = await self._acquire(owner, kind, prio, timeout_s)
        leased = LeasedPort(self, port, self.holder or LeaseInfo(owner, kind, prio, time.time()))
        try:
            yield leased
        finally:
            leased._end()
            await self._release(port)

    async def _acquire(self, owner: str, kind: str, priority: int, timeout_s: float | None) -> SerialPort:
        if self._removed:
            raise LineClosedError(f"line {self.name} was removed")
        now = time.time()
        port = self._port
        if self.holder is None and port is not None and port.is_open and self._waiting == 0:
            self._grant(LeaseInfo(owner, kind, priority, now))
            return port
        if self._waiting >= self.max_waiters:
            self.counters.leases_refused += 1
            raise LineBusyError(f"line {self.name}: {self._waiting} requests already waiting")
        loop = asyncio.get_running_loop()
        info = LeaseInfo(owner, kind, priority, now)
        waiter = _Waiter(priority, next(self._order), info, loop.create_future())
        heapq.heappush(self._waiters, waiter)
        self._waiting += 1
        self._changed()
        try:
            async with asyncio.timeout(timeout_s):
                return await waiter.future
        except BaseException as exc:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                # Granted in the same instant we gave up: hand the line on.
                await self._release(future.result())
            elif not waiter.gone:
                waiter.gone = True
                self._waiting -= 1
                self._changed()
            if isinstance(exc, TimeoutError) and not isinstance(exc, DcudError):
                self.counters.lease_timeouts += 1
                holder = self.holder
                who = f"held by {holder.kind} {holder.owner}" if holder else f"line {self.state}"
                raise LeaseTimeout(
                    f"line {self.name}: no lease within {timeout_s} s ({who})", holder, self.state
                ) from None
            raise

    def _grant(self, info: LeaseInfo) -> None:
        self.holder = LeaseInfo(info.owner, info.kind, info.priority, time.time())
        self.counters.leases_granted += 1
        self._changed()

    async def _release(self, port: SerialPort) -> None:
        try:
            config = self.config
            if port.is_open and (
                str(port.framing) != config.effective_framing or port.baud != config.effective_baud
            ):
                try:
                    with contextlib.suppress(DcudError):
                        await port.drain()
                finally:
                    # Even when the holder was cancelled mid-drain, the next holder starts from the
                    # configured settings.
                    with contextlib.suppress(DcudError):
                        port.set_framing(config.effective_framing)
                        port.set_baud(config.effective_baud)
            if port.is_open:
                port.flush_input()
        finally:
            self.holder = None
            self._dispatch()
            self._changed()

    def _dispatch(self) -> None:
        """Give the line to the first live waiter when it is free and open."""
        port = self._port
        while self.holder is None and port is not None and port.is_open and self._waiters:
            waiter = heapq.heappop(self._waiters)
            if waiter.gone or waiter.future.done():
                continue
            waiter.gone = True
            self._waiting -= 1
            self._grant(waiter.info)
            waiter.future.set_result(port)

    # -- reporting -----------------------------------------------------------------------------

    def state_document(self) -> dict[str, Any]:
        """The retained ``<p>/line/<name>/state`` document."""
        counters = self.counters
        port = self._port
        rx, tx = counters.bytes_rx, counters.bytes_tx
        if port is not None:
            rx += port.counters.bytes_rx
            tx += port.counters.bytes_tx
        config = self.config
        return {
            "line": self.name,
            "device": config.device,
            "kind": config.kind,
            "state": self.state,
            "since": rfc3339(self.since_s),
            "baud": config.effective_baud,
            "framing": config.effective_framing,
            "lease": self.holder.to_json() if self.holder is not None else None,
            "waiting": self._waiting,
            "bytes_rx": rx,
            "bytes_tx": tx,
            "errors": counters.errors,
            "opens": counters.opens,
            "leases": counters.leases_granted,
            "leases_refused": counters.leases_refused,
            "lease_timeouts": counters.lease_timeouts,
            "last_error": self.last_error or None,
            **self.notes,
        }


class LineRegistry:
    """Every :class:`Line` of the process by name; services find their line here."""

    def __init__(self) -> None:
        self._lines: dict[str, Line] = {}

    def attach(self, config: LineConfig, on_change: Callable[[Line], None] | None = None) -> Line:
        """The Line for ``config.name`` (created on first use), with its configuration updated."""
        line = self._lines.get(config.name)
        if line is None:
            line = Line(config, on_change=on_change)
            self._lines[config.name] = line
        else:
            line.config = config
            line.on_change = on_change
            line._removed = False
        return line

    def get(self, name: str) -> Line | None:
        """The line called ``name``, or None when no such line was ever configured."""
        return self._lines.get(name)

    def __getitem__(self, name: str) -> Line:
        line = self._lines.get(name)
        if line is None:
            raise KeyError(f"no line named {name!r}")
        return line

    def names(self) -> list[str]:
        """Names of every known line."""
        return sorted(self._lines)

    def remove(self, name: str) -> None:
        """Forget a line that left the configuration (its waiters get LineClosedError)."""
        line = self._lines.pop(name, None)
        if line is not None:
            line.remove()


# -- the owner service -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LineServiceConfig:
    """The line service's slice: its ``[[line]]`` plus the WM-E RS485/DCD parameters."""

    line: LineConfig
    rs485_mode: int = 0
    """WM-E ``rs485.mode``: 0 RS232 only, 1 2-wire RS485, 2 4-wire RS485."""
    dcd_mode: int = 3
    """WM-E ``dcd.mode``: 0/1 direction control on RTS, active low/high; 2/3 DCD as a status output."""
    exclusive: bool = True

    def rs485_settings(self) -> Rs485Settings | None:
        """Kernel RS485 settings for this line, or None when the mode is RS232 / not an RS485 line."""
        if self.line.kind != "rs485" or self.rs485_mode == 0:
            return None
        from dcud.transport.serial import Rs485Settings

        rts_on_send = self.line.rs485_rts_on_send
        if self.dcd_mode in (0, 1):
            rts_on_send = self.dcd_mode == 1
        return Rs485Settings(enabled=True, rts_on_send=rts_on_send, rx_during_tx=self.rs485_mode == 2)


RS485_MODE_NAMES = {0: "rs232", 1: "2-wire", 2: "4-wire"}
DCD_MODE_NAMES = {0: "dirx-0", 1: "dirx-1", 2: "standard", 3: "inverted"}


class LineService:
    """Supervised owner of one line: open, watch, reopen with backoff, publish state (module docstring)."""

    def __init__(
        self,
        config: LineServiceConfig,
        registry: LineRegistry,
        bus: EventBus,
        event: EventSink | None = None,
    ) -> None:
        self.config = config
        self.name = f"line.{config.line.name}"
        self._registry = registry
        self._bus = bus
        self._event = event
        self.line: Line | None = None
        self._down_reported = False

    def _publish(self, line: Line) -> None:
        self._bus.set_state(f"line/{line.name}", line.state_document())

    async def _emit(self, event_type: str, text: str, **fields: object) -> None:
        if self._event is not None:
            await self._event(event_type, text, **fields)

    def _port(self) -> SerialPort:
        from dcud.transport.serial import SerialPort

        cfg = self.config
        return SerialPort(
            cfg.line.device,
            cfg.line.effective_baud,
            cfg.line.effective_framing,
            rs485=cfg.rs485_settings(),
            echo_filter=cfg.line.echo_filter,
            exclusive=cfg.exclusive,
        )

    async def run(self, ctx: ServiceContext) -> None:
        """Own the line until stopped; a failing device never fails the service."""
        line_cfg = self.config.line
        line = self._registry.attach(line_cfg, self._publish)
        self.line = line
        line.notes = {
            "rs485_mode": RS485_MODE_NAMES.get(self.config.rs485_mode, str(self.config.rs485_mode)),
            "dcd_mode": DCD_MODE_NAMES.get(self.config.dcd_mode, str(self.config.dcd_mode)),
        }
        ctx.set_ready()  # a missing device is a degraded line, not a failed start
        self._publish(line)
        policy = LinkPolicy(initial_s=0.5, max_s=line_cfg.reopen_max_s, retry_on=(TransportError,))
        try:
            await run_link(ctx, _DeviceLink(self, ctx, line), policy)
        finally:
            line.detach("closed")

    def _note_device(self, ctx: ServiceContext, line: Line, port: SerialPort) -> None:
        """Log once what the device refused (RS485 ioctl, framing); a pty refuses both."""
        # A pty (a simulator, a socat pair) has no wire: it refuses the RS485 ioctl, parity and
        # 7-bit characters, which is expected there and so not a warning. A real device refusing is.
        log = ctx.log.info if port.is_pty else ctx.log.warning
        notes = dict(line.notes)
        if port.rs485 is not None:
            notes["rs485"] = "applied" if port.rs485_applied else f"not applied: {port.rs485_error}"
            if not port.rs485_applied and notes.get("rs485") != line.notes.get("rs485"):
                log(
                    "RS485 mode not applied; continuing without kernel direction control",
                    line=line.name,
                    error=port.rs485_error,
                    pty=port.is_pty,
                )
        if port.framing_error:
            if notes.get("framing_note") != port.framing_error:
                log("framing not applied", line=line.name, error=port.framing_error, pty=port.is_pty)
            notes["framing_note"] = port.framing_error
        line.notes = notes

    async def _emit_once(self, down: bool, line: Line, reason: str = "") -> None:
        """``line_down`` once per outage, ``line_up`` when a reported outage ends."""
        if down and not self._down_reported:
            self._down_reported = True
            await self._emit("line_down", f"line {line.name} down: {reason}", line=line.name)
        elif not down and self._down_reported:
            self._down_reported = False
            await self._emit("line_up", f"line {line.name} is back", line=line.name)


class _DeviceLink(Link["SerialPort"]):
    """The tty as the link kernel drives it: open, watch until it fails, reopen with backoff."""

    down_message = "line down"

    def __init__(self, service: LineService, ctx: ServiceContext, line: Line) -> None:
        self._service = service
        self._ctx = ctx
        self._line = line

    def log_fields(self) -> dict[str, object]:
        return {"line": self._line.name}

    def describe(self, exc: BaseException) -> str:
        return str(exc)

    @contextlib.asynccontextmanager
    async def _opened(self) -> AsyncIterator[SerialPort]:
        port = self._service._port()
        try:
            await port.open()
        except BaseException:
            port.close()  # a cancelled open (stop) leaves no tty open
            raise
        yield port  # the line closes it (detach), whether it failed or the service stops

    def connect(self) -> AbstractAsyncContextManager[SerialPort]:
        return self._opened()

    async def serve(self, port: SerialPort) -> str:
        """Hand the open port to the line, then wait until it fails (or the service stops)."""
        ctx, line = self._ctx, self._line
        self._service._note_device(ctx, line, port)
        line.attach(port)
        ctx.log.info("line open", line=line.name, device=line.config.device)
        await self._service._emit_once(False, line)
        failure = await until_stopped(ctx.stopping, port.wait_closed(), name="watch")
        if failure is STOPPED:
            return "stopping"
        return f"{line.config.device}: {_describe(failure or port.failure)}"

    async def on_down(self, down: LinkDown) -> None:
        line = self._line
        if line.state != "failed":
            line.detach("failed", down.error)
        await self._service._emit_once(True, line, down.error)


def _describe(failure: BaseException | None) -> str:
    if failure is None:
        return "device closed"
    if isinstance(failure, OSError) and failure.strerror:
        return failure.strerror
    return str(failure) or type(failure).__name__


def build_line_services(
    config: LoadedConfig, lines: LineRegistry, bus: EventBus, event: EventSink
) -> Sequence[Service]:
    """One LineService per ``[[line]]`` (``SERVICE_BUILDERS`` entry)."""
    params = config.params
    rs485_mode = _param_int(params, "rs485.mode", 0)
    dcd_mode = _param_int(params, "dcd.mode", 3)
    configured = {line.name for line in config.toml.line}
    for name in lines.names():
        if name not in configured:
            lines.remove(name)
            bus.clear_state(f"line/{name}")
    return [
        LineService(LineServiceConfig(line, rs485_mode, dcd_mode), lines, bus, event)
        for line in config.toml.line
    ]


def _param_int(params: Any, name: str, default: int) -> int:
    try:
        value = params.get_opt_int(name)
    except (KeyError, TypeError):
        return default
    return default if value is None else int(value)
