"""NTP client (WM-E ``ntp.*`` / ``ntp_*`` parameters) with ntplib, off the event loop.

What it does
    Every interval it sends one SNTP request (in a worker thread), checks the answer (below),
    and publishes the ``clock`` state (``<p>/clock/state`` and the ``clock`` member of ``<p>/status``)::

        {"synced": true, "offset_s": 0.0003, "delay_s": 0.0004, "stratum": 8, "server": "host:123",
         "last_sync_ts": "...Z", "failures": 0, "last_error": null, "refused_answers": 0,
         "owner": "chrony", "step_clock": false}

    ``synced`` is ``null`` until the first answer or the first verdict; ``true`` while the last accepted
    sample had ``|offset| <= [ntp] max_offset_s``; ``false`` after ``[ntp] unsync_after`` (default 3)
    failed or rejected queries in a row, or when the offset is too large. Readings taken while it is not
    ``true`` carry a flag (:func:`clock_synced`). The transition to ``false`` raises the event (and trap)
    ``clock_unsync``; back to ``true`` raises ``clock_sync``.

The exchange (:func:`query_server`; ntplib only encodes and decodes the packet)
    The request's transmit timestamp is **64 random bits**, not our clock (RFC 9109 "NTP client data
    minimization" section 3, the way chrony does it): an answer is accepted only when its originate
    timestamp is exactly those 8 bytes, which an off-path attacker cannot guess (ntplib's own client
    sends the time of day, guessable to a few milliseconds, and checks nothing). The socket is
    connected to the server, so the kernel drops datagrams from any other address or port. A datagram
    that does not echo our transmit timestamp (spoofed, a stale duplicate, or shorter than 48 bytes) is
    refused, counted (``refused_answers`` in the ``clock`` state) and the query keeps waiting for the
    real answer until its timeout (at most 32 refused datagrams per query). Our own send and receive
    times (T1, T4) are kept locally; offset and delay come from them and the server's T2, T3.

Answer checks (RFC 4330 section 5), after the origin check: mode 4 (server); leap indicator not 3
(server unsynchronised); stratum 1..15 (0 is a kiss-o'-death: ``RATE`` doubles the interval up to 64x,
``DENY``/``RSTR`` are reported; 16 is unsynchronised); receive and transmit timestamps non-zero and the
transmit not before the receive; 0 <= delay <= ``[ntp] max_delay_s``. A kiss-o'-death counts only when
its origin matches too, so a spoofed ``RATE`` cannot slow the client down.

Parameters and spellings
    The WM-E table has both ``ntp.address``/``ntp.port``/``ntp.interval``/``ntp.timeout`` (v5 NETWORK
    PROTOCOLS group) and the legacy ``ntp_address``/``ntp_port``/``ntp_interval``/``ntp_timeout``.
    For each setting: **the dotted spelling wins when both are set in the file**; when only one spelling
    is set, that one is used; when neither is, the dotted default applies (interval 30 s, timeout 10 s,
    port 0 = 123). No address: no queries; the state still reports the clock owner.

Who owns the clock
    On most DCUs chrony or systemd-timesyncd disciplines the system clock; dcud then only measures and
    reports (``owner``). ``[ntp] step_clock = true`` lets dcud step the clock when **no** owner is
    detected and ``|offset| > step_threshold_s``; it needs ``CAP_SYS_TIME`` (systemd drop-in
    ``clock-step.conf``). Without the capability it says so once and keeps measuring.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import ntplib

from dcud.config.loader import LoadedConfig
from dcud.config.wme import ParameterSet
from dcud.runtime.bus import EventBus
from dcud.runtime.events import EventSink
from dcud.runtime.link import STOPPED, until_stopped
from dcud.runtime.supervisor import ServiceContext
from dcud.runtime.threads import in_daemon_thread
from dcud.runtime.timefmt import rfc3339
from dcud.service.power import power_ok
from dcud.transport.udp import connected_socket

DEFAULT_NTP_PORT: Final = 123
NTP_EPOCH_OFFSET_S: Final = 2208988800
NTP_PACKET_BYTES: Final = 48
MAX_REFUSED_PER_QUERY: Final = 32
"""Datagrams that do not answer our request are skipped up to this many; then the query gives up."""
_MAX_RATE_BACKOFF: Final = 64
_ORIGIN: Final = slice(24, 32)
_TRANSMIT: Final = slice(40, 48)
_RECEIVE_BUFFER_BYTES: Final = 1024


def clock_synced(bus: EventBus) -> bool | None:
    """Whether the clock is known to be synchronised: the flag readings carry (cheap, no I/O).

    ``None`` when dcud has no verdict (no NTP server configured, or no answer yet).
    """
    value = bus.states.get("clock", {}).get("synced")
    return value if isinstance(value, bool) else None


def pick_spelling(params: ParameterSet, dotted: str, legacy: str) -> str:
    """Which of two spellings is in force: dotted if set, else legacy if set, else dotted (default)."""
    if params.is_set(dotted):
        return dotted
    if params.is_set(legacy):
        return legacy
    return dotted


@dataclass(frozen=True)
class NtpServiceConfig:
    """The NTP service's slice: server and timing from the WM-E file, policy from ``[ntp]``."""

    server: str | None
    port: int
    interval_s: float
    timeout_s: float
    step_clock: bool
    step_threshold_s: float
    max_delay_s: float
    max_offset_s: float
    unsync_after: int

    @classmethod
    def from_config(cls, config: LoadedConfig) -> NtpServiceConfig:
        """Resolve both spellings (module doc) and combine with ``[ntp]``."""
        params = config.params
        policy = config.toml.ntp
        server = params.get_opt_str(pick_spelling(params, "ntp.address", "ntp_address"))
        port = params.get_opt_int(pick_spelling(params, "ntp.port", "ntp_port")) or DEFAULT_NTP_PORT
        return cls(
            server=server or None,
            port=port,
            interval_s=float(params.get_int(pick_spelling(params, "ntp.interval", "ntp_interval"))),
            timeout_s=float(params.get_int(pick_spelling(params, "ntp.timeout", "ntp_timeout"))),
            step_clock=policy.step_clock,
            step_threshold_s=policy.step_threshold_s,
            max_delay_s=policy.max_delay_s,
            max_offset_s=policy.max_offset_s,
            unsync_after=policy.unsync_after,
        )


class NtpRejected(Exception):
    """No usable answer: the answer fails a check, or only refused datagrams came.

    ``kiss`` holds a kiss-o'-death code; ``refused`` counts the datagrams of this query that did not
    answer our request (wrong originate timestamp, too short).
    """

    def __init__(self, reason: str, kiss: str = "", refused: int = 0) -> None:
        super().__init__(reason)
        self.kiss = kiss
        self.refused = refused


class NtpNotOurAnswer(NtpRejected):
    """A datagram that does not answer our request: originate != our transmit timestamp, or malformed."""


@dataclass(frozen=True)
class NtpSample:
    """One accepted answer; ``refused`` datagrams of the same query were skipped before it."""

    offset_s: float
    delay_s: float
    stratum: int
    ref_id: str
    leap: int
    refused: int = 0


def new_transmit_timestamp() -> bytes:
    """64 random bits for the request's transmit field (never all zero: that means "not set")."""
    while True:
        value = secrets.token_bytes(8)
        if any(value):
            return value


def build_request(transmit: bytes) -> bytes:
    """A 48-byte SNTP v4 client request whose transmit timestamp field is ``transmit`` (8 bytes)."""
    if len(transmit) != 8:
        raise ValueError("the transmit timestamp is 8 bytes")
    header: bytes = ntplib.NTPPacket(version=4, mode=3).to_data()
    return header[: _TRANSMIT.start] + transmit


def check_answer(
    data: bytes, transmit: bytes, sent_unix_s: float, received_unix_s: float, max_delay_s: float
) -> NtpSample:
    """Validate one received datagram (module doc); raise :class:`NtpRejected` or return the sample.

    ``transmit`` is what our request carried; ``sent_unix_s`` (T1) and ``received_unix_s`` (T4) are our
    clock just before the send and just after the receive. Raises :class:`NtpNotOurAnswer` when the
    datagram does not answer that request, before looking at anything else in it.
    """
    if len(data) < NTP_PACKET_BYTES:
        raise NtpNotOurAnswer(f"datagram of {len(data)} bytes, an NTP packet has {NTP_PACKET_BYTES}")
    if data[_ORIGIN] != transmit:
        raise NtpNotOurAnswer("originate timestamp does not echo our transmit timestamp (spoofed or stale)")
    packet = ntplib.NTPPacket()
    try:
        packet.from_data(data)
    except ntplib.NTPException as exc:  # unreachable at 48 bytes; kept so nothing untyped escapes
        raise NtpNotOurAnswer(str(exc)) from None
    if packet.mode != 4:
        raise NtpRejected(f"mode {packet.mode}, expected 4 (server)")
    if packet.stratum == 0:
        kiss = _ascii_ref_id(packet.ref_id)
        raise NtpRejected(f"kiss-o'-death {kiss or '?'}", kiss=kiss)
    if not 1 <= packet.stratum <= 15:
        raise NtpRejected(f"stratum {packet.stratum} (unsynchronised server)")
    if packet.leap == 3:
        raise NtpRejected("leap indicator 3 (server clock not synchronised)")
    if packet.tx_timestamp == 0:
        raise NtpRejected("transmit timestamp is zero")
    if packet.recv_timestamp == 0:
        raise NtpRejected("receive timestamp is zero")
    server_received = packet.recv_timestamp - NTP_EPOCH_OFFSET_S  # T2
    server_sent = packet.tx_timestamp - NTP_EPOCH_OFFSET_S  # T3
    if server_sent < server_received:
        raise NtpRejected("the server's transmit timestamp is before its receive timestamp")
    delay = (received_unix_s - sent_unix_s) - (server_sent - server_received)
    if delay < 0 or delay > max_delay_s:
        raise NtpRejected(f"round-trip delay {delay:.3f} s outside 0..{max_delay_s} s")
    offset = ((server_received - sent_unix_s) + (server_sent - received_unix_s)) / 2
    return NtpSample(offset, delay, int(packet.stratum), _ref_id_text(packet), int(packet.leap))


def _ascii_ref_id(ref_id: int) -> str:
    raw = int(ref_id).to_bytes(4, "big")
    return raw.decode("ascii", errors="replace").strip("\x00 ")


def _ref_id_text(stats: Any) -> str:
    try:
        return str(ntplib.ref_id_to_text(stats.ref_id, stats.stratum))
    except Exception:  # ntplib raises plain exceptions on odd ids; the id is informational only
        return ""


def query_server(
    host: str, port: int, timeout_s: float, max_delay_s: float, *, transmit: bytes | None = None
) -> NtpSample:
    """One blocking SNTP exchange (run it in a thread); see the module doc.

    Raises ``OSError`` (name lookup, socket, ICMP unreachable), ``TimeoutError`` (no datagram at
    all) or :class:`NtpRejected` (only refused datagrams, or an answer failing a check; ``refused``
    says how many were skipped). ``transmit`` fixes the request's transmit field (tests); by default
    it is random.
    """
    transmit = new_transmit_timestamp() if transmit is None else transmit
    request = build_request(transmit)
    deadline = time.monotonic() + timeout_s
    refused = 0
    last_refusal = ""
    with connected_socket(host, port) as sock:  # the kernel drops datagrams from any other address
        sent = time.time()
        sock.send(request)
        while refused < MAX_REFUSED_PER_QUERY:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            try:
                data = sock.recv(_RECEIVE_BUFFER_BYTES)
            except TimeoutError:
                break
            received = time.time()
            try:
                sample = check_answer(data, transmit, sent, received, max_delay_s)
            except NtpNotOurAnswer as exc:
                refused += 1
                last_refusal = str(exc)
                continue
            except NtpRejected as exc:
                exc.refused = refused
                raise
            return replace(sample, refused=refused)
    if refused:
        raise NtpRejected(
            f"{refused} datagram(s) from {host}:{port} refused, none answered our request ({last_refusal})",
            refused=refused,
        )
    raise TimeoutError(f"no answer from {host}:{port} within {timeout_s:g} s")


_OWNER_MARKERS: Final = (
    ("chrony", ("/run/chrony/chronyd.pid", "/run/chronyd.pid", "/var/run/chrony/chronyd.pid")),
    ("systemd-timesyncd", ("/run/systemd/timesync/synchronized", "/run/systemd/timesync")),
    ("ntpd", ("/run/ntpd.pid", "/var/run/ntpd.pid")),
)
_OWNER_COMMS: Final = {"chronyd": "chrony", "systemd-timesyn": "systemd-timesyncd", "ntpd": "ntpd"}


def detect_clock_owner(proc: Path = Path("/proc"), root: Path = Path("/")) -> str | None:
    """Which time daemon runs here: chrony, systemd-timesyncd or ntpd (None: none found).

    Looks at the daemons' runtime files first (visible even under ``ProtectProc=invisible``), then at
    process names in ``/proc``.
    """
    for owner, paths in _OWNER_MARKERS:
        for path in paths:
            if (root / path.lstrip("/")).exists():
                return owner
    try:
        entries = list(proc.iterdir())
    except OSError:
        return None
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if comm in _OWNER_COMMS:
            return _OWNER_COMMS[comm]
    return None


def should_step(config: NtpServiceConfig, owner: str | None, offset_s: float) -> bool:
    """Whether to step the system clock by ``offset_s`` (only when enabled and nobody owns the clock)."""
    return config.step_clock and owner is None and abs(offset_s) > config.step_threshold_s


def step_system_clock(offset_s: float) -> None:
    """Step CLOCK_REALTIME by ``offset_s``; PermissionError without CAP_SYS_TIME."""
    time.clock_settime(time.CLOCK_REALTIME, time.time() + offset_s)


Query = Callable[[str, int, float, float], NtpSample]


class NtpService:
    """Supervised service ``ntp``."""

    name = "ntp"

    def __init__(
        self,
        config: NtpServiceConfig,
        bus: EventBus,
        event: EventSink,
        query: Query = query_server,
        stepper: Callable[[float], None] = step_system_clock,
    ) -> None:
        self.config = config
        self._bus = bus
        self._event = event
        self._query = query
        self._stepper = stepper
        self.synced: bool | None = None
        self.failures = 0
        self.last: NtpSample | None = None
        self.last_sync_ts: str | None = None
        self.last_error: str | None = None
        self.owner: str | None = None
        self.refused_answers = 0
        """Datagrams refused since start because they did not answer our request (spoofed, stale)."""
        self._step_refused = False
        self._refusing = False

    @property
    def server_text(self) -> str | None:
        """``host:port`` of the server, or None."""
        return f"{self.config.server}:{self.config.port}" if self.config.server else None

    def _publish(self) -> None:
        last = self.last
        self._bus.set_state(
            "clock",
            {
                "synced": self.synced,
                "offset_s": round(last.offset_s, 6) if last else None,
                "delay_s": round(last.delay_s, 6) if last else None,
                "stratum": last.stratum if last else None,
                "server": self.server_text,
                "last_sync_ts": self.last_sync_ts,
                "failures": self.failures,
                "last_error": self.last_error,
                "refused_answers": self.refused_answers,
                "owner": self.owner,
                "step_clock": self.config.step_clock,
            },
        )

    async def _verdict(self, ctx: ServiceContext, synced: bool, reason: str) -> None:
        before = self.synced
        self.synced = synced
        if before is not False and not synced:
            ctx.log.warning("clock unsynchronised", server=self.server_text, reason=reason)
            self._publish()
            await self._event("clock_unsync", f"clock unsynchronised: {reason}", server=self.server_text)
        elif before is False and synced:
            ctx.log.info("clock synchronised again", server=self.server_text)
            self._publish()
            await self._event("clock_sync", "clock synchronised", server=self.server_text)

    async def poll_once(self, ctx: ServiceContext) -> float:
        """One query and its consequences; returns the interval factor (RATE back-off) to apply."""
        cfg = self.config
        assert cfg.server is not None
        factor = 1.0
        try:
            sample = await asyncio.wait_for(
                in_daemon_thread(self._query, cfg.server, cfg.port, cfg.timeout_s, cfg.max_delay_s),
                cfg.timeout_s + 5.0,
            )
        except NtpRejected as exc:
            self._count_refused(ctx, exc.refused)
            self.failures += 1
            self.last_error = str(exc)
            if exc.kiss == "RATE":
                factor = 2.0
            elif exc.kiss in ("DENY", "RSTR"):
                ctx.log.error("NTP server refuses us", server=self.server_text, kiss=exc.kiss)
        except (OSError, ntplib.NTPException, TimeoutError, socket.gaierror) as exc:
            self.failures += 1
            self.last_error = str(exc) or type(exc).__name__
        else:
            self._count_refused(ctx, sample.refused)
            self.failures = 0
            self.last_error = None
            self.last = sample
            self.last_sync_ts = rfc3339(time.time())
            if should_step(cfg, self.owner, sample.offset_s):
                try:
                    self._stepper(sample.offset_s)
                    ctx.log.warning("stepped the system clock", offset_s=sample.offset_s)
                except PermissionError:
                    if not self._step_refused:
                        ctx.log.error("cannot step the clock: needs CAP_SYS_TIME (clock-step.conf drop-in)")
                        self._step_refused = True
            if abs(sample.offset_s) <= cfg.max_offset_s:
                await self._verdict(ctx, True, "")
            else:
                await self._verdict(
                    ctx, False, f"offset {sample.offset_s:+.3f} s exceeds {cfg.max_offset_s} s"
                )
            self._publish()
            return factor
        if self.failures >= cfg.unsync_after:
            await self._verdict(ctx, False, f"{self.failures} failed queries ({self.last_error})")
        self._publish()
        return factor

    def _count_refused(self, ctx: ServiceContext, refused: int) -> None:
        """Count refused datagrams; log when a query first meets them (not again while they go on)."""
        self.refused_answers += refused
        if refused and not self._refusing:
            ctx.log.warning(
                "NTP datagrams refused: they do not echo our transmit timestamp (spoofed or stale)",
                server=self.server_text,
                refused=refused,
                total=self.refused_answers,
            )
        self._refusing = refused > 0

    async def run(self, ctx: ServiceContext) -> None:
        """Poll the server every interval until stopped."""
        cfg = self.config
        self.owner = await in_daemon_thread(detect_clock_owner)
        if self.owner:
            ctx.log.info("system clock is owned by a time daemon; measuring only", owner=self.owner)
        elif cfg.step_clock:
            ctx.log.info("no time daemon found; dcud steps the clock", threshold_s=cfg.step_threshold_s)
        self._publish()
        ctx.set_ready()
        if cfg.server is None:
            await ctx.heartbeat_forever()
            return
        if cfg.interval_s < 15:
            ctx.log.warning(
                "NTP interval below 15 s (RFC 4330 asks for at least 15 s)", interval_s=cfg.interval_s
            )
        backoff = 1.0
        while not ctx.stopping.is_set():
            if power_ok(self._bus):
                # A query may block for its whole timeout; a stop request must not wait for it.
                factor = await until_stopped(ctx.stopping, self.poll_once(ctx), name="poll")
                if factor is STOPPED:
                    return
                backoff = min(backoff * factor, _MAX_RATE_BACKOFF) if factor > 1 else 1.0
            if await ctx.sleep(cfg.interval_s * backoff):
                return
