"""One transparent session's I/O: a client connection bridged to a line under its lease.

The decisions are :class:`~dcud.codec.bridge_session.BridgeMachine`'s (sans-I/O: the UART model, the IEC
sniffer, RFC 2217, the queue and every deadline); this module carries them out: it owns the client's
transport, the leased port, the lease itself and two helper tasks per lease (the reader, line ->
client, and the pump, which carries out what waits: drains, line switches, timers). docs/bridge.md is
the user guide; :mod:`dcud.service.bridge` admits the connections.

Data path
---------
Client bytes are written to the line from the transport's ``data_received`` callback itself (no task
switch, no copy) whenever the machine says so (:attr:`~dcud.codec.bridge_session.BridgeMachine.fast`
and room in the line model); meter bytes go from the port's reader callback straight to
``transport.write``. Backpressure both ways: past a quarter second of wire time the pump drains the line
before it writes more and the client is no longer read (the TCP window closes on a fast client); when
the socket's send buffer is full the reader stops taking bytes from the line, and a client that reads
nothing for ``unsent_timeout_s`` is dead (``peer_not_reading``).

One clock: the machine's ``now`` is ``time.monotonic`` everywhere (not the event loop's clock, which
under uvloop moves in whole milliseconds: a line model aged on it saw no drain between chunks that
arrived within one step). Waits are relative, so the loop's timers serve the machine's deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any, cast

import structlog

from dcud.codec.bridge_session import (
    ASK_BACKLOG,
    CLIENT_SET,
    DRAIN,
    FLUSH_INPUT,
    RESUME_CLIENT,
    YIELD_LEASE,
    BridgeAction,
    BridgeMachine,
    EndSession,
    MeterFlow,
    SwitchLine,
    WriteClient,
    WriteLine,
)
from dcud.errors import DcudError, LocalProtocolError, TransportError
from dcud.runtime.link import child_name, until_stopped
from dcud.runtime.timefmt import rfc3339_ms
from dcud.service.bridge_config import SessionPolicy
from dcud.service.bridge_trace import HexTrace
from dcud.service.line import LeasedPort, LeaseTimeout, Line, LineBusyError, LineClosedError
from dcud.transport.tcp import source_address

__all__ = ["READ_CHUNK_BYTES", "SOCKET_WRITE_HIGH_BYTES", "BridgeSession"]

log = structlog.get_logger("dcud.bridge")

READ_CHUNK_BYTES = 64 * 1024
SOCKET_WRITE_HIGH_BYTES = 64 * 1024
_monotonic = time.monotonic


class _Ended(Exception):
    """Internal: the session has ended; unwinds helper tasks."""


async def _to_the_end(work: Coroutine[Any, Any, None]) -> None:
    """Await ``work`` to its end even if this task is cancelled meanwhile; then re-raise the cancel.

    ``work`` must be bounded in time by itself (the break's drain has a deadline), so the loop ends.
    """
    task = asyncio.get_running_loop().create_task(work, name=child_name("wind-down"))
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError as exc:
            cancelled = exc
    task.result()
    if cancelled is not None:
        raise cancelled


def _not_leased(data: bytes) -> int:
    raise LocalProtocolError("bridge session wrote to a line it does not hold")


class BridgeSession(asyncio.Protocol):
    """One client connection bridged to one line (see the module docstring)."""

    def __init__(
        self,
        *,
        sid: str,
        port_name: str,
        peer: str,
        line: Line,
        baud: int,
        framing: str,
        policy: SessionPolicy,
        rfc2217: bool = False,
        trace: HexTrace | None = None,
        lazy_lease: bool = False,
        release_when_idle: bool = False,
        tls: bool = False,
        source: str = "",
    ) -> None:
        self.sid = sid
        self.port_name = port_name
        self.peer = peer
        self.line = line
        self.baud = baud
        self.framing = framing
        self.policy = policy
        self.trace = trace
        self.tls = tls
        self.lazy_lease = lazy_lease
        self.release_when_idle = release_when_idle
        self.owner = f"bridge:{port_name}:{peer}"
        limits = policy.limits(
            rfc2217=rfc2217,
            lazy_lease=lazy_lease,
            release_when_idle=release_when_idle,
            traced=trace is not None,
        )
        self.machine = BridgeMachine(baud, framing, limits, _monotonic())
        """Every decision of this session (sans-I/O)."""
        self.telnet = self.machine.telnet
        self.sniffer = self.machine.sniffer
        self.client_cert: str | None = None
        self.identity: tuple[str, str] = ("address", source_address(source))
        """Who may take this session over: ``("certificate", subject and issuer)`` for a TLS client that
        sent a verified certificate, else ``("address", source address)``."""
        self.started_s = time.time()
        self.ended_s: float | None = None
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._port: LeasedPort | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._blocked = asyncio.Event()
        """Set while the client cannot take more (the inverse of ``_writable``)."""
        self._output_pending: Callable[[], int] | None = None
        self._write_paused = False
        self._wake = asyncio.Event()
        self._ended = asyncio.Event()
        self._line_write: Callable[[bytes], int | None] = _not_leased
        """The leased port's write (valid while ``_port`` is set): the hot path's one call."""

    # -- the machine's counters, under the names the rest of dcud reads ------------------------------

    @property
    def reason(self) -> str | None:
        """Why the session ended (None while it runs)."""
        return self.machine.reason

    @property
    def detail(self) -> str:
        """More about the reason (who took over...)."""
        return self.machine.detail

    @property
    def bytes_c2m(self) -> int:
        """Client bytes taken for the meter."""
        return self.machine.bytes_c2m

    @property
    def bytes_m2c(self) -> int:
        """Meter bytes for the client."""
        return self.machine.bytes_m2c

    @property
    def leases(self) -> int:
        """Leases taken."""
        return self.machine.leases

    @property
    def yields(self) -> int:
        """Leases handed over while idle."""
        return self.machine.yields

    @property
    def lease_wait_s(self) -> float:
        """Time spent waiting for the line."""
        return self.machine.lease_wait_s

    @property
    def breaks_sent(self) -> int:
        """IEC programming sessions this session closed with a break when it gave up the line."""
        return self.machine.breaks_sent

    @property
    def last_activity(self) -> float:
        """When a byte last went either way (``time.monotonic``)."""
        return self.machine.last_activity

    @property
    def _ops(self) -> Any:
        return self.machine.ops

    @property
    def _queued_bytes(self) -> int:
        return self.machine.queued_bytes

    @property
    def _reading_paused(self) -> bool:
        return self.machine.reading_paused

    @property
    def _cps(self) -> float:
        return self.machine.cps

    @property
    def _cps_max(self) -> float:
        return self.machine.cps_max

    # -- life cycle ------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once the session has ended (or is ending)."""
        return self.machine.reason is not None

    def attach(self, transport: asyncio.BaseTransport) -> None:
        """Start using ``transport`` (after TLS, if any) and greet an RFC 2217 client."""
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.set_write_buffer_limits(high=SOCKET_WRITE_HIGH_BYTES)
        if self.telnet is not None:
            self._transport.write(self.telnet.greeting())
        if self.trace is not None:
            self.trace.note(self.sid, f"session {self.port_name} from {self.peer} line {self.line.name}")

    def end(self, reason: str, detail: str = "") -> None:
        """End the session with ``reason`` (the first reason given wins)."""
        self.machine.end(reason, detail)
        self._ended.set()

    async def run(self) -> None:
        """Bridge until the session ends; closes the connection; the caller writes the audit record."""
        try:
            # The session's own end (client gone, idle, taken over...) is its "stopping": the body
            # is cancelled then, and waited for (it hands the line back in order).
            await until_stopped(self._ended, self._body(), name=f"{self.sid}/body")
        except asyncio.CancelledError:
            self.end("stopping")
            raise
        except Exception as exc:  # the body's bug ends this session, never the port
            log.error("bridge session failed", session=self.sid, error=repr(exc))
            self.end("error", repr(exc))
        finally:
            self.end("closed")  # a guard: every path that ends the body has set a reason already
            self._close_transport()
            self.ended_s = time.time()
            if self.trace is not None:
                self.trace.note(self.sid, f"end {self.reason} {self.detail}".rstrip())

    def _close_transport(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self.reason in ("client_closed", "idle_timeout", "stopping", "lease_max"):
            transport.close()  # what is buffered still goes out, then FIN
        else:
            transport.abort()  # dead or replaced peer: do not wait on it

    def record(self) -> dict[str, Any]:
        """The audit record of this session."""
        m = self.machine
        end = self.ended_s if self.ended_s is not None else time.time()
        doc: dict[str, Any] = {
            "session": self.sid,
            "port": self.port_name,
            "line": self.line.name,
            "peer": self.peer,
            "tls": self.tls,
            "start": rfc3339_ms(self.started_s),
            "end": rfc3339_ms(end),
            "duration_s": round(end - self.started_s, 3),
            "bytes_to_meter": m.bytes_c2m,
            "bytes_to_client": m.bytes_m2c,
            "reason": m.reason or "open",
            "leases": m.leases,
            "lease_yields": m.yields,
            "lease_wait_s": round(m.lease_wait_s, 3),
        }
        if m.detail:
            doc["detail"] = m.detail
        if self.client_cert:
            doc["client_cert"] = self.client_cert
        if self.sniffer is not None:
            stats = self.sniffer.stats
            doc["iec"] = {
                "signons": stats.signons,
                "switches": stats.switches,
                "readouts": stats.readouts,
                "bcc_errors": stats.bcc_errors,
                "breaks_sent": m.breaks_sent,
            }
        return doc

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Plain TCP: the transport is the session's (TLS sessions are attached after the handshake)."""
        if self._transport is None:
            self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        """Client bytes: straight to the line when the machine says so, else through its queue.

        The hot path writes first and keeps the books after (the meter starts on the bytes while the
        machine counts them, ages its line model and scans for an IEC sign-on).
        """
        m = self.machine
        if m.fast and m.backlog_bytes + len(data) <= m.queue_limit_bytes:
            try:
                spilled = self._line_write(data)
            except DcudError as exc:  # the line failed under us: this session is over
                self.end("line_error", str(exc))
                return
            m.client_wrote(data, spilled or 0, _monotonic())
            return
        self._client_slow(data)

    def _client_slow(self, data: bytes) -> None:
        """Client bytes the fast path may not take: through the machine's queue."""
        m = self.machine
        now = _monotonic()
        if self.trace is not None:
            self.trace.data(self.sid, "c>m", data)
        if m.client_data(data, now):
            self._pause_reading()
        if m.can_run_inline:
            self._run_inline(now)
        else:
            self._wake.set()

    def _run_inline(self, now: float) -> None:
        """Carry out what needs no waiting from this callback; the pump does the rest."""
        m = self.machine
        try:
            while (action := m.next_action(now, sync_only=True)) is not None:
                self._do(action)
        except DcudError as exc:  # the line failed under us: this session is over
            self.end("line_error", str(exc))
            return
        if m.ops:
            self._wake.set()

    def _do(self, action: BridgeAction) -> None:
        """Carry out an action that needs no waiting."""
        m = self.machine
        kind = type(action)
        if kind is WriteLine:
            m.line_wrote(self._line_write(cast(WriteLine, action).data) or 0)
        elif action is ASK_BACKLOG:
            pending = self._output_pending
            m.backlog_is(pending() if pending is not None else 0)
        elif kind is WriteClient:
            self._send_raw(cast(WriteClient, action).data)
        elif action is RESUME_CLIENT:
            self._resume_reading()
        elif kind is MeterFlow:
            if cast(MeterFlow, action).paused:
                self._writable.clear()
                self._blocked.set()
            elif not self._write_paused:
                self._writable.set()
                self._blocked.clear()
        elif action is FLUSH_INPUT:
            if self._port is not None:
                self._port.flush_input()
        else:
            raise LocalProtocolError(f"bridge session cannot carry out {action!r} here")

    def eof_received(self) -> bool | None:
        """The client half-closed: its last bytes still go to the line, the meter's answer still comes back.

        The session ends once everything queued is written and the line has been quiet for
        ``EOF_LINGER_S`` (``echo '/?!' | nc -N dcu 9000`` gets its identification line).
        """
        self._client_done("client_closed", "", linger=True)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is gone (a reset or a timeout means a dead peer); queued bytes still go out."""
        if exc is None:
            self._client_done("client_closed", "", linger=False)
        elif isinstance(exc, TimeoutError):
            self._client_done("peer_dead", str(exc) or "timeout", linger=False)
        else:
            self._client_done("client_reset", str(exc) or type(exc).__name__, linger=False)
        self._writable.set()
        self._blocked.clear()

    def _client_done(self, reason: str, detail: str, *, linger: bool) -> None:
        """The client sends no more: end now, or once the queued bytes are on the line (and lingered)."""
        if self.machine.client_done(reason, detail, linger=linger, now=_monotonic()) is not None:
            self._ended.set()
        self._wake.set()

    def pause_writing(self) -> None:
        """The socket's send buffer is full: stop taking bytes from the line."""
        self._write_paused = True
        self._writable.clear()
        self._blocked.set()

    def resume_writing(self) -> None:
        """The socket drained: take bytes from the line again."""
        self._write_paused = False
        if not self.machine.suspended:
            self._writable.set()
            self._blocked.clear()

    # -- client -> line ------------------------------------------------------------------------

    def _pause_reading(self) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            with contextlib.suppress(RuntimeError):
                transport.pause_reading()

    def _resume_reading(self) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            with contextlib.suppress(RuntimeError):
                transport.resume_reading()

    async def _pump(self, port: LeasedPort) -> bool:
        """Carries out the machine's actions in order, waiting where they wait, and runs its timer.

        Returns True when the machine hands the idle line over (the session goes on without it).
        """
        m = self.machine
        while True:
            now = _monotonic()
            action = m.next_action(now)
            if action is None:
                deadline = m.get_timer()
                if deadline is not None and now >= deadline:
                    outcome = m.handle_timer(now, port.waiting)
                    if outcome is YIELD_LEASE:
                        return True
                    if outcome is not None:
                        self._ended.set()
                        raise _Ended
                    continue
                self._wake.clear()
                timeout = None if deadline is None else deadline - now
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                continue
            kind = type(action)
            if action is DRAIN:
                await port.drain()
                m.drained(_monotonic())
            elif kind is SwitchLine:
                await self._switch(port, cast(SwitchLine, action))
            elif kind is EndSession:
                self._ended.set()
                raise _Ended
            else:
                self._do(action)

    async def _switch(self, port: LeasedPort, switch: SwitchLine) -> None:
        """Drain, then run the line at the switch's rate and framing; tell the machine what is in force."""
        try:
            await port.set_framing(switch.framing)
            await port.set_baud(switch.baud)
        except (TransportError, ValueError):
            if switch.reason != CLIENT_SET:
                raise
            # An RFC 2217 client's wish the line refuses: answered with the value in force.
        else:
            if self.trace is not None:
                self.trace.note(self.sid, f"line {port.baud} {port.framing} ({switch.reason})")
        self.machine.line_is(port.baud, port.framing, _monotonic())

    # -- line -> client ------------------------------------------------------------------------

    def _send_raw(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _on_line_data(self, data: bytes) -> None:
        """Meter bytes to the client (through the machine); never raises (it may run in a port callback)."""
        m = self.machine
        transport = self._transport
        if m.meter_fast and data and transport is not None:
            # The hot path: to the client first, the books after (an idle sniffer only forwards).
            try:
                if not transport.is_closing():
                    transport.write(data)
                m.last_activity = _monotonic()  # meter_wrote's books, kept here: a call costs as much
                m.bytes_m2c += len(data)
            except Exception as exc:  # a bug here must end this session, not the line's reader
                log.error("bridge session failed on line data", session=self.sid, error=repr(exc))
                self.end("error", repr(exc))
            return
        if not data:  # the port closed (push API: an empty chunk is its end of file)
            self.end("line_error", "line closed")
            return
        try:
            now = _monotonic()
            if self.trace is not None:
                self.trace.data(self.sid, "m>c", data)
            if transport is None or transport.is_closing():
                m.meter_wrote(len(data), now)
                return
            for piece in m.meter_data(data, now):
                transport.write(piece)
            if m.ops:
                self._wake.set()  # the sniffer asked for a line switch: the pump carries it out
        except Exception as exc:  # a bug here must end this session, not the line's reader
            log.error("bridge session failed on line data", session=self.sid, error=repr(exc))
            self.end("error", repr(exc))

    async def _reader(self, port: LeasedPort) -> None:
        """Line -> client, reading from the leased port; stops taking bytes while the client is full."""
        set_receiver = getattr(port, "set_receiver", None)
        if callable(set_receiver):
            await self._push_reader(set_receiver)
            return
        while True:
            if not self._writable.is_set():
                await self._wait_writable()
            data = await port.read(READ_CHUNK_BYTES, timeout_s=30.0)
            if data:
                self._on_line_data(data)

    async def _push_reader(self, set_receiver: Callable[[Callable[[bytes], None] | None], None]) -> None:
        """The port hands received bytes over at once; while the client is full they wait in the port."""
        try:
            while True:
                set_receiver(self._on_line_data)
                await self._blocked.wait()
                set_receiver(None)
                await self._wait_writable()
        finally:
            with contextlib.suppress(Exception):
                set_receiver(None)

    async def _wait_writable(self) -> None:
        if self.machine.suspended and not self._write_paused:
            await self._writable.wait()
            return
        try:
            async with asyncio.timeout(self.policy.unsent_timeout_s):
                await self._writable.wait()
        except TimeoutError:
            self.end("peer_not_reading", f"client read nothing for {self.policy.unsent_timeout_s:g} s")
            raise _Ended from None

    # -- leases ----------------------------------------------------------------------------------

    async def _body(self) -> None:
        lazy = self.lazy_lease
        while True:
            if lazy and not await self._wait_for_client_data():
                return
            asked = _monotonic()
            try:
                async with self.line.lease(self.owner, "bridge", timeout_s=self.policy.lease_wait_s) as port:
                    yielded = await self._hold(port, _monotonic() - asked)
            except LeaseTimeout as exc:
                self.end("line_unavailable", str(exc))
                return
            except LineBusyError as exc:
                self.end("line_busy", str(exc))
                return
            except LineClosedError as exc:
                self.end("line_removed", str(exc))
                return
            except (TransportError, DcudError) as exc:
                self.end("line_error", str(exc))
                return
            if not yielded:
                return
            lazy = True

    async def _wait_for_client_data(self) -> bool:
        """Without the line: wait until the client sends (True) or the session idles out (False)."""
        m = self.machine
        while not m.ops:
            finished = m.finished
            if finished is not None:
                self.end(*finished)
                return False
            self._wake.clear()
            now = _monotonic()
            deadline = m.get_timer()
            if deadline is not None and now >= deadline:
                if m.handle_timer(now) is not None:
                    self._ended.set()
                    return False
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if deadline is None else deadline - now):
                    await self._wake.wait()
        return True

    async def _hold(self, port: LeasedPort, waited_s: float) -> bool:
        """Serve the session on the leased line; True when the lease is handed back (idle)."""
        m = self.machine
        loop = self._loop
        baud, framing = m.lease_settings()
        await port.set_framing(framing)
        await port.set_baud(baud)
        port.flush_input()
        pending = getattr(port, "output_pending", None)
        self._output_pending = pending if callable(pending) else None
        direct = getattr(port, "direct_writer", None)
        self._line_write = direct() if callable(direct) else port.write
        m.lease_granted(
            port.baud, port.framing, _monotonic(), waited_s, counts=self._output_pending is not None
        )
        if self.trace is not None:
            self.trace.note(self.sid, f"lease {self.line.name} {port.baud} {port.framing}")
        self._port = port
        self._wake.set()
        # Helpers of this lease, named after the session; they end (cancelled) before the lease does.
        reader = loop.create_task(self._reader(port), name=child_name(f"{self.sid}/reader"))
        pump = loop.create_task(self._pump(port), name=child_name(f"{self.sid}/pump"))
        tasks = [reader, pump]
        yielded = False
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is None:
                    yielded = task is pump and bool(task.result())
                elif isinstance(exc, _Ended):
                    pass
                elif isinstance(exc, DcudError):
                    self.end("line_error", str(exc))
                else:
                    raise exc
            return yielded
        finally:
            self._port = None
            self._line_write = _not_leased
            m.lease_ended(yielded=yielded)
            for task in tasks:
                task.cancel()
            # The session's end cancels this task, often while it is already here: the helpers must
            # be gone and the meter out of programming mode before the lease goes, cancelled or not.
            await _to_the_end(self._wind_down(list(tasks), port))
            if yielded and self.trace is not None:
                self.trace.note(self.sid, "lease handed back (idle)")

    async def _wind_down(self, helpers: list[asyncio.Task[Any]], port: LeasedPort) -> None:
        await asyncio.wait(helpers)
        await self._close_programming(port)

    async def _close_programming(self, port: LeasedPort) -> None:
        """Before the lease goes: break an IEC programming session the client left open (never raises).

        Written at the rate in force (the meter's programming rate) and drained, so the meter is back
        at sign-on before anybody else gets the line (the machine says when and what:
        :meth:`~dcud.codec.bridge_session.BridgeMachine.break_needed`).
        """
        send = self.machine.break_needed()
        if send is None:
            return
        try:
            baud, framing = port.baud, port.framing
            port.write(send.data)
            async with asyncio.timeout(send.timeout_s):
                await port.drain()
        except (DcudError, TimeoutError) as exc:
            log.warning("IEC programming session left open: break not sent", session=self.sid, error=str(exc))
            return
        self.machine.break_sent()
        log.info("IEC programming session closed with a break", session=self.sid, baud=baud, framing=framing)
        if self.trace is not None:
            self.trace.note(self.sid, f"break B0 at {baud} {framing} (programming session left open)")
