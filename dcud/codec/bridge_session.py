"""One transparent bridge session as a sans-I/O machine: bytes and ``now`` in, actions and a deadline out.

A transparent session (docs/bridge.md) passes a head-end client's bytes to a meter line and back,
untouched, while it holds the line's lease. Everything it *decides* lives here, in the style of
aioquic's connection (``get_timer``/``handle_timer``): the UART model that decides when a write must
wait for a drain, the IEC 62056-21 sniffer that moves the line's rate at the right byte, RFC 2217
(Telnet COM-PORT-OPTION) requests, the bounded queue of client bytes, and every deadline (idle
timeout, lease idle, ``lease_max``, the sniffer's inactivity, the linger after a half-close). The I/O
layer (:mod:`dcud.service.bridge_session`) owns the socket, the port and the lease, and only carries
out what the machine says. Nothing here reads a clock or touches a socket: every method that needs the
time takes ``now`` (seconds on one monotonic clock, the same for every call of one machine).

The hot paths are a few attribute operations, because every byte of a busy session passes them:

- client -> line: when :attr:`BridgeMachine.fast` is true and ``backlog_bytes + len(data) <=
  queue_limit_bytes``, the I/O layer writes the chunk to the line itself and then calls
  :meth:`BridgeMachine.client_wrote` (bytes first, books after: the meter starts on them while the
  machine counts them). Otherwise :meth:`BridgeMachine.client_data` queues the chunk and the I/O layer
  pulls what to do with :meth:`BridgeMachine.next_action`;
- line -> client: when :attr:`BridgeMachine.meter_fast` is true, the chunk goes to the client as it is
  and :meth:`BridgeMachine.meter_wrote` counts it; else :meth:`BridgeMachine.meter_data` returns what
  to send (Telnet-escaped, sniffed).

Actions (:meth:`BridgeMachine.next_action`, one at a time, in order):

=====================  ====================================================================================
action                 the I/O layer
=====================  ====================================================================================
:class:`WriteLine`     writes the bytes to the line (no wait), then :meth:`~BridgeMachine.line_wrote`
:class:`WriteClient`   writes the bytes to the client
:data:`ASK_BACKLOG`    asks the port how many bytes are not on the wire yet, :meth:`~BridgeMachine.backlog_is`
:data:`DRAIN`          waits until the UART has sent everything (tcdrain), then :meth:`~BridgeMachine.drained`
:class:`SwitchLine`    drains, sets the rate and framing, then :meth:`~BridgeMachine.line_is` with what is in
                       force (``tolerant``: a refused setting is not an error, RFC 2217 answers with the
                       value in force)
:data:`FLUSH_INPUT`    drops the line's unread input
:data:`PAUSE_CLIENT`   stops reading the client (the queue is full); :data:`RESUME_CLIENT` reads again
:class:`MeterFlow`     stops (``paused``) or resumes taking bytes from the line (RFC 2217 flow control)
:class:`EndSession`    the session is over (reason and detail are in the machine too)
:data:`YIELD_LEASE`    hands the idle line to waiting readouts (the session goes on without it)
=====================  ====================================================================================

``next_action(now, sync_only=True)`` returns only actions that need no waiting (``None`` when the next
one would wait): the I/O layer uses it from a socket callback; the rest is done by its pump task.

Deadlines: :meth:`BridgeMachine.get_timer` is when :meth:`BridgeMachine.handle_timer` must run next;
it may run early (it does nothing then). While the session holds the line, ``handle_timer`` needs the
number of readouts waiting for it (``waiting``), which decides ``lease_max`` and lease yielding.

Lease: :meth:`BridgeMachine.lease_settings` is what a new lease starts at, :meth:`BridgeMachine.
lease_granted` and :meth:`BridgeMachine.lease_ended` bracket it; before the line goes,
:meth:`BridgeMachine.break_needed` says whether the meter is left in IEC programming mode and must get
the break ``SOH B0 ETX BCC`` (then :meth:`BridgeMachine.break_sent`).

No method raises on input: a transparent port carries whatever the peers send.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from dcud.codec.iec62056 import encode_break, tx_time_s
from dcud.codec.iec_sniffer import (
    CLIENT_SHORTCUT,
    Forward,
    IecSniffer,
    SnifferState,
    SnifferTimings,
    SwitchLine,
)
from dcud.codec.rfc2217 import (
    FLOWCONTROL_RESUME,
    FLOWCONTROL_SUSPEND,
    NOTIFY_LINESTATE,
    NOTIFY_MODEMSTATE,
    PARITY_CODES,
    PURGE_DATA,
    SET_BAUDRATE,
    SET_CONTROL,
    SET_DATASIZE,
    SET_LINESTATE_MASK,
    SET_MODEMSTATE_MASK,
    SET_PARITY,
    SET_STOPSIZE,
    SIGNATURE,
    ClientData,
    PortRequest,
    Reply,
    Rfc2217Server,
    escape,
    framing_from_settings,
)

__all__ = [
    "ASK_BACKLOG",
    "BREAK_DRAIN_S",
    "CLIENT_SET",
    "DRAIN",
    "EOF_LINGER_MAX_S",
    "EOF_LINGER_S",
    "FLUSH_INPUT",
    "INBOUND_HIGH_BYTES",
    "INBOUND_LOW_BYTES",
    "LINE_QUEUE_MIN_BYTES",
    "LINE_QUEUE_S",
    "MODEL_SPEEDUP_MAX",
    "PAUSE_CLIENT",
    "RESUME_CLIENT",
    "WAITER_POLL_S",
    "YIELD_LEASE",
    "BridgeAction",
    "BridgeMachine",
    "EndSession",
    "MeterFlow",
    "SendBreak",
    "SessionLimits",
    "SwitchLine",
    "WriteClient",
    "WriteLine",
    "bits_per_char",
]

INBOUND_HIGH_BYTES = 64 * 1024
"""Client bytes queued while the line is not ours (or is switching) before the socket stops being read."""
INBOUND_LOW_BYTES = 16 * 1024
LINE_QUEUE_S = 0.25
"""Wire time the session lets the UART hold before it waits for a drain."""
LINE_QUEUE_MIN_BYTES = 64
MODEL_SPEEDUP_MAX = 1 << 16
"""How far the line model's drain rate may rise above the nominal rate when the driver keeps reporting
an empty queue (a pty or a network serial server has no wire at the configured rate). 65536 x nominal is
755 MB/s at 115200 Bd, so a device without a wire never fills the model: 1024 x (11.8 MB/s) was less
than a 1 KiB echo over a pty moves, and the model, full every fourth chunk, sent it to the careful path
and the driver (an ioctl) for nothing."""
WAITER_POLL_S = 1.0
"""How often an idle session holding the line looks for waiting readouts."""
EOF_LINGER_S = 1.5
"""After a client's half-close: how long the line must be quiet before the session ends (meter answer)."""
EOF_LINGER_MAX_S = 10.0
CLIENT_SET = "RFC 2217 client"
"""The reason of a :class:`SwitchLine` an RFC 2217 client asked for: a refused setting is answered with
the value in force, not an error."""
BREAK_DRAIN_S = 2.0
"""Beyond its wire time, how long the IEC break may take to leave the UART before the lease goes anyway."""

_IDLE = SnifferState.IDLE
# RFC 2217 SET-CONTROL: no flow control, break or modem lines on a meter line: queries get "none/off",
# settings of DTR/RTS/break are acknowledged as asked (there is nothing to switch).
_CONTROL_ANSWERS = {0: 1, 2: 1, 3: 1, 4: 6, 7: 8, 10: 11, 13: 1, 14: 1, 15: 1, 16: 1, 17: 1, 18: 1, 19: 1}


def bits_per_char(framing: str) -> int:
    """Bits one character takes on the wire: start + data + parity + stop (``"7E1"`` -> 10)."""
    return 1 + int(framing[0]) + (0 if framing[1].upper() == "N" else 1) + int(framing[2])


# -- actions -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WriteLine:
    """Write ``data`` to the line now (the model says the UART has room)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class WriteClient:
    """Send ``data`` to the client as it is (already Telnet-escaped where needed)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class MeterFlow:
    """Stop (``paused``) or resume taking meter bytes for the client (RFC 2217 flow control)."""

    paused: bool


@dataclass(frozen=True, slots=True)
class EndSession:
    """The session is over: close the client, give the line back (with the break if needed)."""

    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class SendBreak:
    """Write ``data`` (the IEC break) and drain it within ``timeout_s`` before the lease goes."""

    data: bytes
    timeout_s: float


class _Signal:
    """An action without data (a singleton each)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


ASK_BACKLOG = _Signal("ASK_BACKLOG")
"""Tell :meth:`BridgeMachine.backlog_is` how many written bytes the port has not sent yet."""
DRAIN = _Signal("DRAIN")
"""Wait until the UART is empty, then :meth:`BridgeMachine.drained`."""
FLUSH_INPUT = _Signal("FLUSH_INPUT")
"""Drop the line's unread input (RFC 2217 PURGE-DATA)."""
PAUSE_CLIENT = _Signal("PAUSE_CLIENT")
"""Stop reading the client socket (the queue of client bytes is full)."""
RESUME_CLIENT = _Signal("RESUME_CLIENT")
"""Read the client socket again."""
YIELD_LEASE = _Signal("YIELD_LEASE")
"""Hand the idle line over to waiting readouts; the session waits for its client without it."""

BridgeAction = WriteLine | WriteClient | SwitchLine | MeterFlow | EndSession | _Signal
"""What :meth:`BridgeMachine.next_action` and :meth:`BridgeMachine.handle_timer` hand out."""


@dataclass(frozen=True, slots=True)
class _Raw:
    """Client bytes not yet decoded (Telnet) or sniffed."""

    data: bytes


@dataclass(frozen=True, slots=True)
class _PortReply:
    """Answer an RFC 2217 request with the value in force (after its switch was carried out)."""

    command: int
    client_set: bool


_Queued = _Raw | bytes | SwitchLine | PortRequest | _PortReply | WriteClient | _Signal | MeterFlow


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """Timing and behaviour of one session (the I/O layer builds it from ``[transparent]``)."""

    idle_timeout_s: float = 300.0
    """No byte either way for this long: the session ends (0 = never)."""
    lease_idle_s: float = 30.0
    lease_max_s: float = 900.0
    iec_aware: bool = True
    iec_inactivity_s: float = 120.0
    rfc2217: bool = False
    lazy_lease: bool = False
    """Take the lease only when the client sends (the EI client's permanent connection)."""
    release_when_idle: bool = False
    """Hand the line back after ``lease_idle_s`` even when no readout waits (the EI client)."""
    traced: bool = False
    """The I/O layer records every chunk (hex trace): no chunk may bypass it."""


class BridgeMachine:
    """The decisions of one transparent session (see the module docstring)."""

    def __init__(self, baud: int, framing: str, limits: SessionLimits, now: float) -> None:
        self.baud = baud
        """The session's initial rate (``tm.baud``): every lease starts at it unless RFC 2217 set one."""
        self.framing = framing
        self.limits = limits
        self.telnet = Rfc2217Server() if limits.rfc2217 else None
        timings = SnifferTimings(
            programming_idle_s=limits.iec_inactivity_s, hdlc_idle_s=limits.iec_inactivity_s
        )
        self.sniffer = IecSniffer(baud, framing, timings) if limits.iec_aware else None
        self._scan = CLIENT_SHORTCUT if self.sniffer is not None else None
        """The sniffer's per-chunk test on the fast path (None: no sniffer)."""
        self._plain = self.telnet is None and not limits.traced
        """Chunks may bypass the machine's slow paths (no Telnet to decode, no trace to write)."""
        # -- the hot path's state (read by the I/O layer before it writes) --
        self.fast = False
        """Client bytes may go straight to the line (see the module docstring)."""
        self.meter_fast = self._plain and (self.sniffer is None or self.sniffer.state is _IDLE)
        """Meter bytes may go straight to the client."""
        self.backlog_bytes = 0.0
        """The line model: bytes written and not on the wire yet (an upper bound until aged)."""
        self.queue_limit_bytes = LINE_QUEUE_MIN_BYTES
        self._aged_at = now
        self.cps = baud / bits_per_char(framing)
        """The model's drain rate (characters per second): nominal, or learned faster (a pty)."""
        self.cps_max = self.cps * MODEL_SPEEDUP_MAX
        self.spilled = 0
        """Bytes the port kept in user space at the last write (the driver was full)."""
        # -- counters (the audit record) --
        self.bytes_c2m = 0
        self.bytes_m2c = 0
        self.leases = 0
        self.yields = 0
        self.lease_wait_s = 0.0
        self.breaks_sent = 0
        self.last_activity = now
        # -- the queue and its flow control --
        self.ops: collections.deque[_Queued] = collections.deque()
        self.queued_bytes = 0
        """Client bytes queued undecoded (``_Raw``): bounded by pausing the client."""
        self.reading_paused = False
        self.suspended = False
        """RFC 2217 FLOWCONTROL-SUSPEND: the client asked for no meter bytes."""
        self._busy = False
        """An action that waits (drain, switch) is being carried out."""
        self._truth: float | None = None
        """The port's own backlog count, when the machine asked for it (ASK_BACKLOG)."""
        self._after_drain = False
        # -- the line --
        self.leased = False
        self.line_baud = baud
        self.line_framing = framing
        self.client_line: tuple[int, str] | None = None
        """Rate and framing an RFC 2217 client set (re-applied on every lease); None: session defaults."""
        self._has_count = False
        """The leased port can tell its own backlog (:data:`ASK_BACKLOG` may be handed out)."""
        self._lease_since = now
        self._polled_at = now
        """When :meth:`handle_timer` last ran: an idle session polls for waiting readouts from there."""
        # -- the end --
        self.reason: str | None = None
        self.detail = ""
        self._finish: tuple[str, str, bool] | None = None
        """Set when the client sent its last byte: (reason, detail, linger for the meter's answer)."""
        self._finish_at = 0.0

    # -- the hot paths ------------------------------------------------------------------------------

    def client_wrote(self, data: bytes, spilled: int, now: float) -> None:
        """The I/O layer wrote a client chunk to the line on the fast path; keep the books.

        ``spilled``: what the port kept in user space (0: the driver took it all). From the idle state
        the sniffer only forwards client bytes (never a switch), so writing first is safe.
        """
        size = len(data)
        self.last_activity = now
        self.bytes_c2m += size
        backlog = self.backlog_bytes
        if backlog:
            backlog -= (now - self._aged_at) * self.cps
            if backlog < 0.0:  # noqa: PLR1730 (an if is cheaper than a call to max() here)
                backlog = 0.0
        self._aged_at = now
        self.backlog_bytes = backlog + size
        if spilled:
            self.spilled = spilled
            self.fast = False
        scan = self._scan
        if scan is not None and scan(data) is not None:
            # A "/?" or a "/" at the end: the sniffer looks closer (it never switches from rest).
            sniffer = self.sniffer
            assert sniffer is not None
            sniffer.from_client(data, now)
            if not sniffer.resting:
                self.fast = False  # every next chunk goes through the sniffer until it rests
                self.meter_fast = self._plain and sniffer.state is _IDLE

    def meter_wrote(self, size: int, now: float) -> None:
        """The I/O layer sent a meter chunk of ``size`` bytes to the client on the fast path.

        These are the only books of that path (``last_activity = now``, ``bytes_m2c += size``), and
        the I/O layer may keep them itself: a call costs there as much as the rest of the path.
        """
        self.last_activity = now
        self.bytes_m2c += size

    # -- client -> line ----------------------------------------------------------------------------

    def client_data(self, data: bytes, now: float) -> bool:
        """Queue a chunk from the client (the slow path); True when the client must stop being read."""
        self.last_activity = now
        self.bytes_c2m += len(data)
        self.ops.append(_Raw(data))
        self.fast = False
        self.queued_bytes += len(data)
        if self.queued_bytes > INBOUND_HIGH_BYTES and not self.reading_paused:
            self.reading_paused = True
            return True
        return False

    @property
    def can_run_inline(self) -> bool:
        """True when queued work may be carried out from a callback now (line held, nothing waiting)."""
        return self.leased and not self._busy and self.reason is None

    def next_action(self, now: float, *, sync_only: bool = False) -> BridgeAction | None:
        """The next thing to do for the queue, or None (nothing to do, or, ``sync_only``, it would wait).

        A returned :class:`SwitchLine` or :data:`DRAIN` must be followed by :meth:`line_is` or
        :meth:`drained` before the next call.
        """
        ops = self.ops
        while ops:
            item = ops[0]
            kind = type(item)
            if kind is _Raw:
                if sync_only and self._timer_due(now):
                    return None  # the pump runs the sniffer's timer first
                ops.popleft()
                raw = item.data  # type: ignore[union-attr]
                self.queued_bytes -= len(raw)
                ops.extendleft(reversed(self._client_ops(raw, now)))
                if self.reading_paused and self.queued_bytes <= INBOUND_LOW_BYTES:
                    self.reading_paused = False
                    return RESUME_CLIENT
                continue
            if kind is bytes:
                action = self._write_direct(item, now) if sync_only else self._write_careful(item, now)  # type: ignore[arg-type]
                if action is not None or sync_only:
                    return action
                continue
            if kind is SwitchLine:
                if sync_only:
                    return None
                ops.popleft()
                self._busy = True
                return item  # type: ignore[return-value]
            ops.popleft()
            if kind is PortRequest:
                self._port_request(item)  # type: ignore[arg-type]
                continue
            if kind is _PortReply:
                return self._port_reply(item)  # type: ignore[arg-type]
            return item  # type: ignore[return-value]  # WriteClient, MeterFlow, FLUSH_INPUT
        if sync_only:
            self._refresh()
            return None
        self._busy = False
        finish = self._finish
        if finish is not None:
            reason, detail, linger = finish
            if not linger or now >= self._quiet_at():
                return self.end(reason, detail)
        self._refresh()
        return None

    def backlog_is(self, pending_bytes: float) -> None:
        """The port's answer to :data:`ASK_BACKLOG`."""
        self._truth = float(pending_bytes)

    def line_wrote(self, spilled: int) -> None:
        """A :class:`WriteLine` was carried out; ``spilled`` bytes stayed in user space."""
        self.spilled = spilled

    def drained(self, now: float) -> None:
        """A :data:`DRAIN` is done: the UART is empty."""
        self.backlog_bytes = 0.0
        self._aged_at = now
        self._after_drain = True
        self._busy = False

    def line_is(self, baud: int, framing: str, now: float) -> None:
        """A :class:`SwitchLine` is done (or refused): the line runs at ``baud``/``framing`` now."""
        self.line_baud = baud
        self.line_framing = framing
        self.backlog_bytes = 0.0
        self._aged_at = now
        self._set_rate(baud, framing)
        self._busy = False

    def _write_direct(self, data: bytes, now: float) -> BridgeAction | None:
        """From a callback: write if the line's queue has room, else None (the pump drains first).

        The model answers first; the port's own count is asked only when the model says the queue is
        full or the last write left bytes in user space (the driver refused them: the model is behind).
        """
        limit = self.queue_limit_bytes
        size = len(data)
        queued = self._aged(now)
        truth = self._truth
        if truth is None and self._has_count and (queued + size > limit or self.spilled):
            return ASK_BACKLOG
        if truth is not None:
            self._truth = None
            if truth * 2 < queued and self.cps < self.cps_max:
                # The device drains faster than its nominal rate (a serial server on the network):
                # let the model follow, so the driver is not asked on every write. An empty queue
                # while the model says full is a device without a wire at this rate (a pty): the
                # model goes to its cap at once (x4 steps took five full queues to get there).
                self.cps = self.cps_max if not truth else min(self.cps * 4, self.cps_max)
            queued = truth
            self.spilled = 0
        self.backlog_bytes = queued
        if queued + size > limit and (queued or size > limit):
            return None
        self.ops.popleft()
        self.backlog_bytes = queued + size
        return WriteLine(data)

    def _write_careful(self, data: bytes, now: float) -> BridgeAction | None:
        """From the pump: write in pieces of at most the queue limit, draining whenever it is full."""
        limit = self.queue_limit_bytes
        piece = data[:limit] if len(data) > limit else data
        if self._after_drain:
            queued = 0.0
        else:
            truth = self._truth
            if truth is None and self._has_count:
                return ASK_BACKLOG
            self._truth = None
            queued = truth if truth is not None else self._aged(now)
            if queued and queued + len(piece) > limit:
                self._busy = True
                return DRAIN
        self._after_drain = False
        self.ops.popleft()
        if len(piece) < len(data):
            self.ops.appendleft(data[len(piece) :])
        self.backlog_bytes = self._aged(now) + len(piece)
        return WriteLine(piece)

    def _aged(self, now: float) -> float:
        """Age the line model: what the wire has sent since the last call leaves the bucket."""
        backlog = self.backlog_bytes
        if backlog:
            backlog = max(0.0, backlog - (now - self._aged_at) * self.cps)
            self.backlog_bytes = backlog
        self._aged_at = now
        return backlog

    def _set_rate(self, baud: int, framing: str) -> None:
        self.cps = baud / bits_per_char(framing)
        self.cps_max = self.cps * MODEL_SPEEDUP_MAX
        self.queue_limit_bytes = max(LINE_QUEUE_MIN_BYTES, int(self.cps * LINE_QUEUE_S))

    def _client_ops(self, data: bytes, now: float) -> list[_Queued]:
        """Decode (Telnet) and sniff client bytes into what must happen, in order (answers first)."""
        telnet = self.telnet
        payloads: list[bytes | PortRequest]
        replies: list[_Queued] = []
        if telnet is None:
            payloads = [data]
        else:
            payloads = []
            for event in telnet.receive(data):
                if isinstance(event, ClientData):
                    payloads.append(event.data)
                elif isinstance(event, Reply):
                    replies.append(WriteClient(event.data))
                else:
                    payloads.append(event)
        sniffer = self.sniffer
        if sniffer is None or self.client_line is not None:
            return [*replies, *payloads]
        items = replies
        for payload in payloads:
            if isinstance(payload, PortRequest):
                items.append(payload)
                continue
            for action in sniffer.from_client(payload, now):
                items.append(action.data if isinstance(action, Forward) else action)
        self.meter_fast = self._plain and sniffer.state is _IDLE
        return items

    # -- RFC 2217 ----------------------------------------------------------------------------------

    def _port_request(self, request: PortRequest) -> None:
        """Turn a COM-PORT-OPTION command into line operations and its answer, at the queue's head."""
        telnet = self.telnet
        assert telnet is not None
        command, value = request.command, request.number
        front: list[_Queued] = []
        if command == SET_BAUDRATE:
            if value:
                front.append(SwitchLine(value, self.line_framing, CLIENT_SET))
            front.append(_PortReply(command, bool(value)))
        elif command in (SET_DATASIZE, SET_PARITY, SET_STOPSIZE):
            if value:
                wanted = framing_from_settings(
                    self.line_framing,
                    data_bits=value if command == SET_DATASIZE else 0,
                    parity=value if command == SET_PARITY else 0,
                    stop_bits=value if command == SET_STOPSIZE else 0,
                )
                front.append(SwitchLine(self.line_baud, wanted, CLIENT_SET))
            front.append(_PortReply(command, bool(value)))
        elif command == SET_CONTROL:
            front.append(WriteClient(telnet.reply(command, _CONTROL_ANSWERS.get(value, value))))
        elif command == NOTIFY_LINESTATE:
            front.append(WriteClient(telnet.reply(command, 0)))
        elif command == NOTIFY_MODEMSTATE:
            front.append(WriteClient(telnet.reply(command, 0x30)))  # no modem lines: CTS and DSR on
        elif command == FLOWCONTROL_SUSPEND:
            self.suspended = True
            front.append(MeterFlow(paused=True))
        elif command == FLOWCONTROL_RESUME:
            self.suspended = False
            front.append(MeterFlow(paused=False))
        elif command in (SET_LINESTATE_MASK, SET_MODEMSTATE_MASK):
            front.append(WriteClient(telnet.reply(command, request.value or b"\x00")))
        elif command == PURGE_DATA:
            if value in (1, 3):
                front.append(FLUSH_INPUT)
            front.append(WriteClient(telnet.reply(command, value)))
        elif command == SIGNATURE and not request.value:
            front.append(WriteClient(telnet.signature_reply()))
        self.ops.extendleft(reversed(front))

    def _port_reply(self, item: _PortReply) -> WriteClient:
        """The answer to a set request, carrying the value in force after the switch."""
        telnet = self.telnet
        assert telnet is not None
        if item.client_set:
            self.client_line = (self.line_baud, self.line_framing)
        if item.command == SET_BAUDRATE:
            return WriteClient(telnet.baud_reply(self.line_baud))
        framing = self.line_framing
        current = {
            SET_DATASIZE: int(framing[0]),
            SET_PARITY: PARITY_CODES.get(framing[1], 1),
            SET_STOPSIZE: int(framing[2]),
        }[item.command]
        return WriteClient(telnet.reply(item.command, current))

    # -- line -> client ----------------------------------------------------------------------------

    def meter_data(self, data: bytes, now: float) -> list[bytes]:
        """Meter bytes (the slow path): what to send to the client, in order; switches are queued."""
        self.last_activity = now
        self.bytes_m2c += len(data)
        telnet = self.telnet
        sniffer = self.sniffer
        if sniffer is None or self.client_line is not None or sniffer.state is _IDLE:
            return [escape(data) if telnet is not None else data]
        out: list[bytes] = []
        for action in sniffer.from_meter(data, now):
            if isinstance(action, Forward):
                out.append(escape(action.data) if telnet is not None else action.data)
            else:
                self.ops.append(action)
                self.fast = False
        self.meter_fast = self._plain and sniffer.state is _IDLE
        return out

    # -- deadlines ---------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must run next (absolute, on the clock of ``now``), or None."""
        if self.reason is not None:
            return None
        limits = self.limits
        deadlines: list[float] = []
        sniffer = self.sniffer
        if sniffer is not None and self.leased:  # without the line the sniffer has nothing to switch
            deadline = sniffer.next_deadline()
            if deadline is not None:
                deadlines.append(deadline)
        if self._finish is not None and self._finish[2]:
            deadlines.append(self._quiet_at())
        if limits.idle_timeout_s:
            deadlines.append(self.last_activity + limits.idle_timeout_s)
        if self.leased:
            # Past the lease idle point (or lease_max) only a waiting readout changes anything, and
            # nothing says when one comes: look once a second from the last look.
            poll_at = self._polled_at + WAITER_POLL_S
            lease_idle_at = self.last_activity + limits.lease_idle_s
            deadlines.append(lease_idle_at if lease_idle_at > self._polled_at else poll_at)
            if limits.lease_max_s:
                deadlines.append(max(self._lease_since + limits.lease_max_s, poll_at))
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float, waiting: int = 0) -> BridgeAction | None:
        """Run what is due at ``now``: an end, a lease to yield, or the sniffer's switch back (queued).

        ``waiting``: readouts waiting for the line (only looked at while the session holds it).
        """
        limits = self.limits
        self._polled_at = now
        if self.reason is not None:
            return None
        if self.leased:
            self._sniffer_timer(now)
        idle = now - self.last_activity
        if limits.idle_timeout_s and idle >= limits.idle_timeout_s:
            return self.end("idle_timeout")
        if self._finish is not None and not self.ops and not self._busy:
            reason, detail, linger = self._finish
            if not linger or now >= self._quiet_at():
                return self.end(reason, detail)
        if not self.leased:
            return None
        held = now - self._lease_since
        if limits.lease_max_s and held >= limits.lease_max_s and waiting:
            return self.end("lease_max", f"held the line {held:.0f} s while {waiting} waited")
        if (
            idle >= limits.lease_idle_s
            and (waiting or limits.release_when_idle)
            and not self.ops
            and not self._busy
        ):
            return YIELD_LEASE
        return None

    def _timer_due(self, now: float) -> bool:
        sniffer = self.sniffer
        if sniffer is None:
            return False
        deadline = sniffer.next_deadline()
        return deadline is not None and deadline <= now

    def _sniffer_timer(self, now: float) -> None:
        sniffer = self.sniffer
        if sniffer is None or not self._timer_due(now):
            return
        for action in sniffer.handle_timer(now):
            if isinstance(action, SwitchLine):
                self.ops.append(action)
                self.fast = False
        self.meter_fast = self._plain and sniffer.state is _IDLE

    def _quiet_at(self) -> float:
        return min(self.last_activity + EOF_LINGER_S, self._finish_at + EOF_LINGER_MAX_S)

    # -- the lease ---------------------------------------------------------------------------------

    def lease_settings(self) -> tuple[int, str]:
        """Rate and framing a new lease starts at: the RFC 2217 client's, else the session's."""
        return self.client_line or (self.baud, self.framing)

    def lease_granted(self, baud: int, framing: str, now: float, waited_s: float, *, counts: bool) -> None:
        """The line is the session's, set to ``baud``/``framing`` and flushed.

        ``counts``: the port can tell its own backlog (:data:`ASK_BACKLOG` may be handed out).
        """
        self.leases += 1
        self.lease_wait_s += waited_s
        self.leased = True
        self._has_count = counts
        self.line_baud = baud
        self.line_framing = framing
        self._set_rate(baud, framing)
        self.backlog_bytes = 0.0
        self._aged_at = now
        self.spilled = 0
        self._truth = None
        self._after_drain = False
        self._busy = False
        if self.sniffer is not None:
            self.sniffer.reset()
        self._lease_since = now
        self._polled_at = now
        self._refresh()

    def lease_ended(self, *, yielded: bool) -> None:
        """The session gave the line back (``yielded``: handed over while idle; it goes on)."""
        self.leased = False
        self.fast = False
        self._busy = False
        self._truth = None
        if yielded:
            self.yields += 1

    def break_needed(self) -> SendBreak | None:
        """The break to send before the line goes, when the meter is left in IEC programming mode.

        Twice when the client stopped inside a frame (the meter takes the first break as the rest of
        that frame). None when the sniffer is off or an RFC 2217 client set the line itself.
        """
        sniffer = self.sniffer
        if sniffer is None or self.client_line is not None or not sniffer.programming:
            return None
        frame = encode_break()
        data = frame * 2 if sniffer.client_frame_open else frame
        return SendBreak(data, tx_time_s(len(data), self.line_baud) + BREAK_DRAIN_S)

    def break_sent(self) -> None:
        """The break left the UART: the meter is back at sign-on."""
        self.breaks_sent += 1
        if self.sniffer is not None:
            self.sniffer.reset()
        self.meter_fast = self._plain

    # -- the end -----------------------------------------------------------------------------------

    def end(self, reason: str, detail: str = "") -> EndSession:
        """End with ``reason`` (the first reason given wins)."""
        if self.reason is None:
            self.reason = reason
            self.detail = detail
        self.fast = False
        return EndSession(self.reason, self.detail)

    def client_done(self, reason: str, detail: str, *, linger: bool, now: float) -> EndSession | None:
        """The client sends no more: end now, or once the queue is on the line (and, ``linger``, quiet).

        A second call (EOF, then the connection lost) keeps the first reason; lingering only while
        every call asked for it.
        """
        first = self._finish
        if first is not None:
            reason, detail = first[0], first[1]
            linger = linger and first[2]
        else:
            self._finish_at = now
        self._finish = (reason, detail, linger)
        if not self.ops and not linger:
            return self.end(reason, detail)
        return None

    @property
    def finished(self) -> tuple[str, str] | None:
        """(reason, detail) once the client sent its last byte, else None."""
        return None if self._finish is None else (self._finish[0], self._finish[1])

    def _refresh(self) -> None:
        sniffer = self.sniffer
        self.meter_fast = self._plain and (sniffer is None or sniffer.state is _IDLE)
        self.fast = (
            self.leased
            and self._plain
            and (sniffer is None or sniffer.resting)
            and not self.ops
            and not self._busy
            and not self.spilled
            and self.reason is None
        )
