"""The CAN frame mover: a python-can bus opened, watched and reopened without blocking the event loop.

:class:`CanPort` owns one python-can bus of any interface python-can supports (``socketcan`` on the
DCU, ``virtual`` inside one process, ``slcan``/``serial`` over a tty or a pty pair across processes):

- the bus is opened in a worker thread (some interfaces sleep or talk to an adapter while opening);
- frames arrive through python-can's :class:`can.Notifier`: socketcan and udp_multicast are read by the
  asyncio loop itself (``add_reader``, non-blocking, every waiting frame per wake-up; socketcan straight
  from its socket, 16-byte ``struct can_frame`` in, no ``can.Message`` per frame); every other interface
  by the Notifier's reader thread, whose frames reach the loop in batches (a bounded queue, one wake-up
  per ``batch_s``); either way the ``on_frame`` callback runs in the loop and nothing blocks it;
- on socketcan the kernel drops what nobody here reads (:meth:`CanPort.set_receive_ids`: the routed
  COB-IDs, plus every heartbeat and EMCY so that unconfigured nodes still show);
- frames go out through one dedicated sender thread per open bus, at most ``max_pending_sends`` queued
  (beyond that :meth:`CanPort.send` fails at once with :class:`~dcud.errors.TransportError`, counted);
- health: SocketCAN error frames (error warning, error passive, bus-off, restarted) and, for the
  interfaces that report one, python-can's ``bus.state`` are turned into :class:`CanBusState`; a
  bus-off or a failing device closes the bus, and it is reopened with exponential backoff;
- a garbled frame on a serial-framed interface (noise on an slcan line, a half frame) makes python-can's
  parser raise; it is counted as ``malformed`` and reading goes on, instead of killing the reader.

The port knows CAN, not CANopen: what the frames mean is the caller's business.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import enum
import itertools
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, cast

import can
import serial
import structlog

from dcud.errors import TransportError
from dcud.runtime.link import Link, LinkDown, LinkPolicy, run_link, until_stopped

log = structlog.get_logger("dcud.can")

FrameHandler = Callable[[int, bytes, float], None]
"""``on_frame(can_id, data, now)``: called in the event loop; ``now`` is ``time.monotonic()``."""

# SocketCAN error frame classes (linux/can/error.h), carried in the identifier of an error frame.
CAN_ERR_CRTL = 0x00000004
CAN_ERR_BUSOFF = 0x00000040
CAN_ERR_RESTARTED = 0x00000100
CAN_ERR_CRTL_RX_WARNING = 0x04
CAN_ERR_CRTL_TX_WARNING = 0x08
CAN_ERR_CRTL_RX_PASSIVE = 0x10
CAN_ERR_CRTL_TX_PASSIVE = 0x20
CAN_ERR_CRTL_ACTIVE = 0x40

LOOP_READ_INTERFACES = frozenset({"socketcan", "udp_multicast"})
"""Interfaces the event loop reads itself (``add_reader``): one non-blocking datagram per frame.

Every other interface is read by the Notifier's thread: python-can's serial-framed parsers (slcan,
serial) read byte by byte and may wait for the rest of a frame, and driver-based ones have no
descriptor. Their frames reach the loop in batches (:class:`_Batcher`)."""

MAX_DRAIN_FRAMES = 256
"""Frames read per readiness of a descriptor-driven bus before the loop gets to do something else."""

CAN_EFF_FLAG = 0x80000000
CAN_RTR_FLAG = 0x40000000
CAN_ERR_FLAG = 0x20000000
CAN_ERR_MASK = 0x1FFFFFFF
CAN_MTU = 16
"""``sizeof(struct can_frame)``: a classic frame as a SocketCAN raw socket delivers it."""
CANFD_MTU = 72
CAN_FRAME = struct.Struct("=IB3x8s")
"""``struct can_frame`` (linux/can.h): ``can_id`` with the EFF/RTR/ERR flags, ``len``, 3 bytes, data."""
ALWAYS_RECEIVED: tuple[tuple[int, int], ...] = ((0x700, 0x780), (0x080, 0x780))
"""``(can_id, can_mask)`` the kernel filter always lets through: every heartbeat/boot-up (0x700-0x77F)
and every EMCY (0x081-0x0FF, with SYNC 0x080), so a node nobody configured is still seen."""

MALFORMED_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    struct.error,
    IndexError,
    TypeError,
    UnicodeDecodeError,
)
"""What python-can's serial-framed parsers raise on garbage (besides CanOperationError without a cause)."""


class _Batcher:
    """The Notifier's listener for thread-read interfaces: frames reach the loop in batches.

    Handing every frame over with ``call_soon_threadsafe`` costs a self-pipe write and a loop wake-up
    per frame (8 drives x 2 TPDOs every 10 ms is 1600 a second); here the reader thread queues frames
    and the loop takes everything queued at most once per ``batch_s``: a frame after a quiet spell
    (an SDO answer) is taken at once, a flood of TPDOs costs one wake-up per ``batch_s``. The queue is
    bounded: when the loop falls ``max_frames`` behind, new frames are dropped and counted
    (``rx_dropped``).
    """

    def __init__(
        self, port: CanPort, loop: asyncio.AbstractEventLoop, batch_s: float, max_frames: int
    ) -> None:
        self._port = port
        self._loop = loop
        self._batch_s = batch_s
        self._max_frames = max_frames
        self._frames: collections.deque[can.Message] = collections.deque()
        self._lock = threading.Lock()
        self._armed = False
        self._last_drain_s = 0.0

    def __call__(self, msg: can.Message) -> None:
        """A frame from the reader thread."""
        with self._lock:
            if len(self._frames) >= self._max_frames:
                self._port.stats.rx_dropped += 1
                return
            self._frames.append(msg)
            if self._armed:
                return
            self._armed = True
        with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
            self._loop.call_soon_threadsafe(self._arm)

    def _arm(self) -> None:
        delay = self._last_drain_s + self._batch_s - self._loop.time()
        if delay <= 0:
            self._drain()
        else:
            self._loop.call_later(delay, self._drain)

    def _drain(self) -> None:
        self._last_drain_s = self._loop.time()
        with self._lock:
            frames = list(self._frames)
            self._frames.clear()
            self._armed = False
        now = time.monotonic()
        for msg in frames:
            self._port._on_message(msg, now)


class _DrainingNotifier(can.Notifier):
    """python-can's Notifier for descriptor-driven buses, reading every waiting frame per wake-up.

    The stock Notifier reads one frame per readiness of the descriptor, i.e. one loop iteration per
    frame; this one reads all that wait (bounded, :meth:`_GuardedBus.drain`), so a burst of TPDOs after
    a SYNC costs one iteration. (Resting the descriptor for a few ms between reads was measured too: it
    cost more CPU than it saved, see docs/drives.md.) ``listener`` is only what the Notifier keeps: the
    frames go from the drain to the port directly.
    """

    def __init__(self, guard: _GuardedBus, listener: Callable[..., None]) -> None:
        self._drain = guard.drain
        super().__init__(cast(can.BusABC, guard), [listener], timeout=0.2, loop=asyncio.get_running_loop())

    def _on_message_available(self, bus: can.BusABC) -> None:
        self._drain()


class CanBusState(enum.StrEnum):
    """Health of the bus as the state documents show it."""

    CLOSED = "closed"
    ACTIVE = "active"
    ERROR_WARNING = "error_warning"
    ERROR_PASSIVE = "error_passive"
    BUS_OFF = "bus_off"


@dataclass(frozen=True)
class CanSettings:
    """How to open one bus: python-can interface, channel, bitrate and interface options."""

    name: str
    interface: str
    channel: str
    bitrate: int = 500_000
    options: Mapping[str, str | int | float | bool] = field(default_factory=dict)
    reopen_initial_s: float = 0.5
    reopen_max_s: float = 30.0
    reopen_stable_s: float = 60.0
    """A bus open at least this long resets the reopen backoff (one that fails at once keeps backing off)."""
    send_timeout_s: float = 0.2
    max_pending_sends: int = 64
    health_interval_s: float = 1.0
    receive_own_messages: bool = False
    batch_s: float = 0.005
    """Thread-read interfaces: how long frames gather before the loop takes them (latency bound)."""
    max_queued_frames: int = 4096


@dataclass
class CanStats:
    """Counters over the life of the port (all opens of the bus)."""

    rx_frames: int = 0
    tx_frames: int = 0
    error_frames: int = 0
    malformed: int = 0
    ignored: int = 0
    rx_dropped: int = 0
    tx_failed: int = 0
    tx_dropped: int = 0
    opens: int = 0
    failures: int = 0

    def to_json(self) -> dict[str, int]:
        """The counters as a JSON object."""
        return dict(self.__dict__)


class _GuardedBus:
    """The bus as the Notifier sees it: garbled input is counted and skipped, a dead device reported once.

    python-can's Notifier stops its reader thread (or floods the loop's exception handler, for
    descriptor-driven interfaces) when ``recv`` raises; a DCU must instead ride over noise and reopen a
    device that went away. Only ``recv``, ``fileno`` and ``channel_info`` are used by the Notifier.
    """

    def __init__(
        self,
        bus: can.BusABC,
        port: CanPort,
        loop: asyncio.AbstractEventLoop,
        threaded: bool,
        *,
        raw_socket: socket.socket | None = None,
    ) -> None:
        self.bus = bus
        self.channel_info = bus.channel_info
        self._port = port
        self._loop = loop
        self._threaded = threaded
        self.dead = False
        self.raw_socket = raw_socket if raw_socket is not None else (None if threaded else _raw_socket(bus))
        """SocketCAN's socket, read directly (:meth:`drain`); None: python-can's read."""
        port._apply_receive_filter(bus)

    def fileno(self) -> int:
        """The descriptor for ``add_reader``, or -1 to make the Notifier use its reader thread."""
        if self._threaded:
            return -1
        return self.bus.fileno()

    def recv(self, timeout: float | None = None) -> can.Message | None:
        """One frame, or None (nothing arrived, a malformed frame was dropped, or the bus is dead)."""
        if self.dead:
            if timeout:
                time.sleep(min(timeout, 0.05))  # the reader thread only; the port is closing it
            return None
        return self._guarded(self.bus.recv, timeout)

    def drain(self) -> None:
        """The loop reader (the descriptor is readable): every waiting frame to the port, then return.

        SocketCAN: ``recv`` of each ``struct can_frame`` straight from the socket (non-blocking), no
        ``can.Message``. Other loop-read interfaces: the interface's own read (``_recv_internal``,
        python-can's extension point) and the bus filters, without ``BusABC.recv``'s per-call timing
        loop and debug log. Either way one clock reading per wake-up, not per frame: at hundreds of
        frames a second these are a measurable part of the daemon's CPU (bench/bench_drives.py). A
        malformed frame or a dead device ends the drain as :meth:`recv` would (counted, or reported).
        """
        if self.dead:
            return
        if self.raw_socket is not None:
            self._drain_raw(self.raw_socket)
            return
        bus, port = self.bus, self._port
        read = bus._recv_internal
        now = time.monotonic()
        for _ in range(MAX_DRAIN_FRAMES):
            try:
                msg, filtered = read(0.0)
            except Exception as exc:  # sorted out as recv() does: malformed (counted) or fatal
                self._read_failed(exc)
                return
            if msg is None:
                return
            if filtered or bus._filters is None or bus._matches_filters(msg):
                port._on_message(msg, now)

    def _drain_raw(self, sock: socket.socket) -> None:
        on_raw = self._port._on_raw_frame
        now = time.monotonic()
        for _ in range(MAX_DRAIN_FRAMES):
            try:
                frame = sock.recv(CANFD_MTU, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:  # the interface went down: the port reopens the bus
                self._fatal(exc)
                return
            if not frame:  # no CAN socket reads empty: the descriptor is no longer what it was
                self._fatal(OSError("empty read from the CAN socket"))
                return
            on_raw(frame, now)

    def _guarded(
        self, read: Callable[[float | None], can.Message | None], timeout: float | None
    ) -> can.Message | None:
        try:
            return read(timeout)
        except Exception as exc:
            self._read_failed(exc)
        return None

    def _read_failed(self, exc: Exception) -> None:
        """A read raised: garbled input is counted and skipped, anything else means the device is gone."""
        if isinstance(exc, can.CanOperationError):
            if isinstance(exc.__cause__, OSError | serial.SerialException) or _is_os_error(exc):
                self._fatal(exc)
            else:
                self._malformed(exc)
        elif isinstance(exc, MALFORMED_ERRORS):
            self._malformed(exc)
        else:  # a driver failure we do not know: treat the device as gone
            self._fatal(exc)

    def _malformed(self, exc: BaseException) -> None:
        if isinstance(exc, UnicodeDecodeError) or isinstance(exc.__cause__, UnicodeDecodeError):
            # python-can's slcan decodes its line buffer before clearing it: one non-ASCII byte would
            # stay in the buffer and spoil every later line. Drop the spoilt line ourselves.
            buffer = getattr(self.bus, "_buffer", None)
            if isinstance(buffer, bytearray):
                buffer.clear()
        self._loop.call_soon_threadsafe(self._port._on_malformed, exc)

    def _fatal(self, exc: BaseException) -> None:
        self.dead = True
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            self._loop.call_soon_threadsafe(self._port._on_fatal, exc)


def _is_os_error(exc: can.CanOperationError) -> bool:
    return getattr(exc, "error_code", None) is not None


def _raw_socket(bus: can.BusABC) -> socket.socket | None:
    """A SocketCAN bus's raw ``AF_CAN`` socket, to be read directly; None for every other bus."""
    sock = getattr(bus, "socket", None)
    family = getattr(socket, "AF_CAN", None)
    if isinstance(sock, socket.socket) and family is not None and sock.family == family:
        return sock
    return None


def receive_filters(cob_ids: Collection[int]) -> list[dict[str, int | bool]]:
    """python-can ``can_filters`` for 11-bit ``cob_ids`` plus :data:`ALWAYS_RECEIVED`."""
    filters: list[dict[str, int | bool]] = [
        {"can_id": can_id, "can_mask": mask, "extended": False} for can_id, mask in ALWAYS_RECEIVED
    ]
    for cob_id in sorted(set(cob_ids)):
        if not any(cob_id & mask == can_id for can_id, mask in ALWAYS_RECEIVED):
            filters.append({"can_id": cob_id, "can_mask": 0x7FF, "extended": False})
    return filters


class CanPort:
    """One CAN bus: open, deliver frames to ``on_frame``, send, watch, reopen (module docstring)."""

    def __init__(
        self,
        settings: CanSettings,
        on_frame: FrameHandler,
        on_state: Callable[[CanBusState, str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.on_frame = on_frame
        self.on_state = on_state
        self.state = CanBusState.CLOSED
        self.last_error = ""
        self.stats = CanStats()
        self._bus: can.BusABC | None = None
        self._guard: _GuardedBus | None = None
        self._sender: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending_sends = 0
        self._failed: asyncio.Event | None = None
        self._notifier: can.Notifier | None = None
        self._threaded = False
        self._failure = ""
        self._last_malformed_log_s = 0.0
        self._receive_ids: frozenset[int] | None = None

    @property
    def is_open(self) -> bool:
        """True while frames can be sent (open and not bus-off)."""
        return self._bus is not None and self.state not in (CanBusState.CLOSED, CanBusState.BUS_OFF)

    # -- state -----------------------------------------------------------------------------------

    def _set_state(self, state: CanBusState, error: str = "") -> None:
        if error:
            self.last_error = error
        if state is self.state:
            return
        self.state = state
        log.info("CAN bus state", bus=self.settings.name, state=str(state), error=error or None)
        if self.on_state is not None:
            self.on_state(state, error)

    def _on_fatal(self, exc: BaseException) -> None:
        notifier = self._notifier
        if notifier is not None and not self._threaded and not notifier.stopped:
            # A dead descriptor stays readable: stop watching it now, not after the reopen backoff.
            notifier.stop()
        self._fail(f"{type(exc).__name__}: {exc}")

    def _fail(self, reason: str) -> None:
        self._failure = reason
        if self._failed is not None:
            self._failed.set()

    def _on_malformed(self, exc: BaseException) -> None:
        self.stats.malformed += 1
        now = time.monotonic()
        if now - self._last_malformed_log_s > 10.0:  # rate-limited: noise can be continuous
            self._last_malformed_log_s = now
            log.warning(
                "malformed CAN frame dropped",
                bus=self.settings.name,
                error=f"{type(exc).__name__}: {exc}",
                malformed=self.stats.malformed,
            )

    # -- receive path (event loop) ---------------------------------------------------------------

    def set_receive_ids(self, cob_ids: Collection[int] | None) -> None:
        """Receive only these 11-bit identifiers (and :data:`ALWAYS_RECEIVED`); None: everything.

        Applied in the kernel where the interface filters there (socketcan: a frame dropped there costs
        no wake-up), at once and at every reopen; on other interfaces python-can would filter after
        decoding each frame, which costs more than it saves, so they keep receiving everything.
        """
        ids = frozenset(cob_ids) if cob_ids is not None else None
        if ids == self._receive_ids:
            return
        self._receive_ids = ids
        bus = self._bus
        if bus is not None:
            self._apply_receive_filter(bus)

    def _apply_receive_filter(self, bus: can.BusABC) -> None:
        if self.settings.interface != "socketcan" or _raw_socket(bus) is None:
            return
        ids = self._receive_ids
        try:
            bus.set_filters(receive_filters(ids) if ids is not None else None)  # type: ignore[arg-type]
        except (can.CanError, OSError, ValueError) as exc:  # not fatal: it only costs CPU
            log.warning("CAN receive filter not set", bus=self.settings.name, error=str(exc))

    def _on_message(self, msg: can.Message, now: float) -> None:
        if msg.is_error_frame:
            self.stats.error_frames += 1
            self._on_error_frame(msg.arbitration_id, bytes(msg.data))
            return
        if msg.is_remote_frame or msg.is_extended_id or msg.is_fd:
            self.stats.ignored += 1
            return
        self.stats.rx_frames += 1
        try:
            self.on_frame(msg.arbitration_id, bytes(msg.data), now)
        except Exception:  # the consumer's bug must not stop the bus; it is logged with its traceback
            log.exception("CAN frame handler failed", bus=self.settings.name, can_id=msg.arbitration_id)

    def _on_raw_frame(self, frame: bytes, now: float) -> None:
        """One ``struct can_frame`` from a SocketCAN socket (a CAN FD frame, 72 bytes, is ignored)."""
        if len(frame) != CAN_MTU:
            self.stats.ignored += 1
            return
        can_id, size, data = CAN_FRAME.unpack(frame)
        if can_id & (CAN_EFF_FLAG | CAN_RTR_FLAG | CAN_ERR_FLAG):
            if can_id & CAN_ERR_FLAG:
                self.stats.error_frames += 1
                self._on_error_frame(can_id & CAN_ERR_MASK, data[:size])
            else:
                self.stats.ignored += 1
            return
        self.stats.rx_frames += 1
        try:
            self.on_frame(can_id, data[:size], now)
        except Exception:  # the consumer's bug must not stop the bus; it is logged with its traceback
            log.exception("CAN frame handler failed", bus=self.settings.name, can_id=can_id)

    def _on_error_frame(self, error_class: int, data: bytes) -> None:
        if error_class & CAN_ERR_BUSOFF:
            self._set_state(CanBusState.BUS_OFF, "bus-off")
            self._fail("bus-off")
            return
        if error_class & CAN_ERR_RESTARTED:
            self._set_state(CanBusState.ACTIVE)
            return
        if error_class & CAN_ERR_CRTL and len(data) > 1:
            detail = data[1]
            if detail & (CAN_ERR_CRTL_RX_PASSIVE | CAN_ERR_CRTL_TX_PASSIVE):
                self._set_state(CanBusState.ERROR_PASSIVE, "error passive")
            elif detail & (CAN_ERR_CRTL_RX_WARNING | CAN_ERR_CRTL_TX_WARNING):
                self._set_state(CanBusState.ERROR_WARNING, "error warning")
            elif detail & CAN_ERR_CRTL_ACTIVE:
                self._set_state(CanBusState.ACTIVE)

    # -- open / watch / close --------------------------------------------------------------------

    def _open_bus(self) -> can.BusABC:
        s = self.settings
        kwargs: dict[str, Any] = dict(s.options)
        kwargs.setdefault("bitrate", s.bitrate)
        if s.receive_own_messages:
            kwargs.setdefault("receive_own_messages", True)
        return can.Bus(interface=s.interface, channel=s.channel, **kwargs)

    async def run(self, stopping: asyncio.Event, beat: Callable[[], None] | None = None) -> None:
        """Keep the bus open until ``stopping`` is set (link kernel); failures are reported, never raised."""
        s = self.settings
        policy = LinkPolicy(
            initial_s=s.reopen_initial_s,
            max_s=s.reopen_max_s,
            stable_s=s.reopen_stable_s,
            retry_on=OPEN_ERRORS,
        )
        ctx = _PortContext(f"can.{s.name}", stopping, beat)
        await run_link(ctx, _BusLink(self, ctx), policy)

    async def _serve(
        self,
        bus: can.BusABC,
        loop: asyncio.AbstractEventLoop,
        stopping: asyncio.Event,
        beat: Callable[[], None] | None,
    ) -> str:
        threaded = self.settings.interface not in LOOP_READ_INTERFACES
        self._threaded = threaded
        guard = _GuardedBus(bus, self, loop, threaded)
        self._failed = asyncio.Event()
        self._failure = ""
        self._sender = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"dcud-can-{self.settings.name}"
        )
        notifier: can.Notifier | None = None
        try:
            if threaded:
                batcher = _Batcher(self, loop, self.settings.batch_s, self.settings.max_queued_frames)
                notifier = can.Notifier(cast(can.BusABC, guard), [batcher], timeout=0.2)
            else:
                notifier = _DrainingNotifier(guard, self._on_message)
            self._notifier = notifier
            self._bus = bus
            self._guard = guard
            self.stats.opens += 1
            self._set_state(CanBusState.ACTIVE, "")
            log.info("CAN bus open", bus=self.settings.name, interface=self.settings.interface)
            failed = self._failed
            for _ in itertools.count():  # until the bus fails or the port stops
                try:
                    await until_stopped(stopping, failed.wait(), timeout_s=self.settings.health_interval_s)
                except TimeoutError:
                    if beat is not None:
                        beat()
                    self._poll_state(bus)
                    continue
                if beat is not None:
                    beat()
                break
            return self._failure
        except (can.CanError, OSError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            self._bus = None
            self._guard = None
            guard.dead = True
            sender, self._sender = self._sender, None
            self._notifier = None
            if notifier is not None and not notifier.stopped:
                if threaded:
                    await loop.run_in_executor(None, notifier.stop, 1.0)  # joins the reader thread
                else:
                    notifier.stop()  # remove_reader: must run in the loop
            if sender is not None:
                sender.shutdown(wait=False, cancel_futures=True)
            with contextlib.suppress(Exception):
                await loop.run_in_executor(None, bus.shutdown)
            self._set_state(CanBusState.CLOSED, self._failure)

    def _poll_state(self, bus: can.BusABC) -> None:
        try:
            reported = bus.state
        except (can.CanError, NotImplementedError, OSError):
            return
        if reported is can.BusState.ERROR:
            self._set_state(CanBusState.BUS_OFF, "bus-off (driver)")
            self._fail("bus-off (driver)")
        elif reported is can.BusState.PASSIVE:
            self._set_state(CanBusState.ERROR_PASSIVE, "error passive (driver)")
        elif (
            self.state in (CanBusState.ERROR_PASSIVE, CanBusState.ERROR_WARNING)
            and "driver" in self.last_error
        ):
            self._set_state(CanBusState.ACTIVE)

    # -- send ------------------------------------------------------------------------------------

    async def send(self, can_id: int, data: bytes) -> None:
        """Send one 11-bit frame; TransportError when the bus is down, the queue full or the driver fails."""
        bus, sender = self._bus, self._sender
        if bus is None or sender is None or not self.is_open:
            self.stats.tx_dropped += 1
            raise TransportError(f"CAN bus {self.settings.name} is {self.state}")
        if self._pending_sends >= self.settings.max_pending_sends:
            self.stats.tx_dropped += 1
            raise TransportError(f"CAN bus {self.settings.name}: {self._pending_sends} frames already queued")
        msg = can.Message(arbitration_id=can_id, data=data, is_extended_id=False)
        self._pending_sends += 1
        try:
            await asyncio.get_running_loop().run_in_executor(
                sender, bus.send, msg, self.settings.send_timeout_s
            )
        except (can.CanError, OSError, ValueError, RuntimeError) as exc:
            self.stats.tx_failed += 1
            raise TransportError(f"CAN bus {self.settings.name}: send failed: {exc}") from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # The bus closed under a queued frame (the sender dropped it), nobody cancelled us.
            self.stats.tx_failed += 1
            raise TransportError(f"CAN bus {self.settings.name} closed while sending") from None
        finally:
            self._pending_sends -= 1
        self.stats.tx_frames += 1


OPEN_ERRORS: tuple[type[BaseException], ...] = (
    can.CanError,
    OSError,
    ValueError,
    ImportError,
    serial.SerialException,
)
"""What opening a bus raises when the device is missing or refuses: the port reopens with backoff."""


class _PortContext:
    """The link kernel's context for a port (which is no service): its stop event and beat."""

    liveness_s = 3.0
    """The kernel beats at least every second, as the port always has."""

    def __init__(self, name: str, stopping: asyncio.Event, beat: Callable[[], None] | None) -> None:
        self.name = name
        self.stopping = stopping
        self._beat = beat
        self.log = log

    def beat(self) -> None:
        if self._beat is not None:
            self._beat()

    async def sleep(self, delay_s: float) -> bool:
        return await _wait(self.stopping, delay_s, self._beat)


class _BusLink(Link[can.BusABC]):
    """The bus as the link kernel drives it: opened in a worker thread, served by :meth:`CanPort._serve`."""

    down_message = "CAN bus unavailable"
    lost_message = "CAN bus failed; reopening"

    def __init__(self, port: CanPort, ctx: _PortContext) -> None:
        self._port = port
        self._ctx = ctx

    def log_fields(self) -> dict[str, object]:
        return {"bus": self._port.settings.name}

    def describe(self, exc: BaseException) -> str:
        return f"open failed: {type(exc).__name__}: {exc}"

    @contextlib.asynccontextmanager
    async def _opened(self) -> AsyncIterator[can.BusABC]:
        loop = asyncio.get_running_loop()
        opening = loop.run_in_executor(None, self._port._open_bus)
        try:
            bus = await asyncio.shield(opening)
        except asyncio.CancelledError:  # stopping: a bus that still opens is shut down when it does
            opening.add_done_callback(_shutdown_when_opened)
            raise
        try:
            yield bus
        finally:  # serve shuts it down in order; this covers a stop before serve ran (idempotent)
            with contextlib.suppress(Exception):
                await loop.run_in_executor(None, bus.shutdown)

    def connect(self) -> AbstractAsyncContextManager[can.BusABC]:
        return self._opened()

    async def serve(self, bus: can.BusABC) -> str:
        ctx, port = self._ctx, self._port
        reason = await port._serve(bus, asyncio.get_running_loop(), ctx.stopping, ctx._beat)
        if not ctx.stopping.is_set():
            port.stats.failures += 1  # counted with the state change to CLOSED, as observers expect
        return reason

    async def on_down(self, down: LinkDown) -> None:
        if down.phase == "connect":
            self._port.stats.failures += 1
            self._port._set_state(CanBusState.CLOSED, down.error)


def _shutdown_when_opened(opening: asyncio.Future[can.BusABC]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        with contextlib.suppress(Exception):
            opening.result().shutdown()


async def _wait(stopping: asyncio.Event, delay_s: float, beat: Callable[[], None] | None) -> bool:
    """Sleep ``delay_s`` unless stopping; beats every second; True when stopping."""
    deadline = time.monotonic() + delay_s
    while not stopping.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(remaining, 1.0)):
                await stopping.wait()
        if beat is not None:
            beat()
    return True
