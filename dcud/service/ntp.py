"""NTP client (WM-E ``ntp.*`` / ``ntp_*`` parameters) with ntplib, off the event loop.

What it does
    Every interval it sends one SNTP request (ntplib in a worker thread), checks the answer (below),
    and publishes the ``clock`` state (``<p>/clock`` and the ``clock`` member of ``<p>/status``)::

        {"synced": true, "offset_s": 0.0003, "delay_s": 0.0004, "stratum": 8, "server": "host:123",
         "last_sync_ts": "...Z", "failures": 0, "last_error": null, "owner": "chrony", "step_clock": false}

    ``synced`` is ``null`` until the first answer or the first verdict; ``true`` while the last accepted
    sample had ``|offset| <= [ntp] max_offset_s``; ``false`` after ``[ntp] unsync_after`` (default 3)
    failed or rejected queries in a row, or when the offset is too large. Readings taken while it is not
    ``true`` carry a flag (:func:`clock_synced`). The transition to ``false`` raises the event (and trap)
    ``clock_unsync``; back to ``true`` raises ``clock_sync``.

Answer checks (ntplib validates nothing, RFC 4330 section 5): mode 4 (server); leap indicator not 3
(server unsynchronised); stratum 1..15 (0 is a kiss-o'-death: ``RATE`` doubles the interval up to 64x,
``DENY``/``RSTR`` are reported; 16 is unsynchronised); the originate timestamp echoes our request
(between our send and receive times); transmit timestamp non-zero; 0 <= delay <= ``[ntp] max_delay_s``.

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
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import ntplib

from dcud.config.loader import LoadedConfig
from dcud.config.wme import ParameterSet
from dcud.runtime.bus import EventBus
from dcud.runtime.supervisor import ServiceContext
from dcud.runtime.threads import in_daemon_thread
from dcud.service.power import power_ok

DEFAULT_NTP_PORT: Final = 123
NTP_EPOCH_OFFSET_S: Final = 2208988800
_MAX_RATE_BACKOFF: Final = 64
_ORIGINATE_SLACK_S: Final = 0.001


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
    """An answer arrived but fails the sanity checks; ``kiss`` holds a kiss-o'-death code."""

    def __init__(self, reason: str, kiss: str = "") -> None:
        super().__init__(reason)
        self.kiss = kiss


@dataclass(frozen=True)
class NtpSample:
    """One accepted answer."""

    offset_s: float
    delay_s: float
    stratum: int
    ref_id: str
    leap: int


def check_answer(stats: Any, sent_unix_s: float, received_unix_s: float, max_delay_s: float) -> NtpSample:
    """Validate an ``ntplib.NTPStats`` (module doc); raise :class:`NtpRejected` or return the sample.

    ``sent_unix_s``/``received_unix_s`` bracket the request on our clock (taken just before and just after
    ``NTPClient.request``, which stamps T1 and T4 with ``time.time()`` in between).
    """
    if stats.mode != 4:
        raise NtpRejected(f"mode {stats.mode}, expected 4 (server)")
    if stats.stratum == 0:
        kiss = _ascii_ref_id(stats.ref_id)
        raise NtpRejected(f"kiss-o'-death {kiss or '?'}", kiss=kiss)
    if not 1 <= stats.stratum <= 15:
        raise NtpRejected(f"stratum {stats.stratum} (unsynchronised server)")
    if stats.leap == 3:
        raise NtpRejected("leap indicator 3 (server clock not synchronised)")
    if stats.tx_timestamp == 0:
        raise NtpRejected("transmit timestamp is zero")
    originate = stats.orig_timestamp - NTP_EPOCH_OFFSET_S
    if not sent_unix_s - _ORIGINATE_SLACK_S <= originate <= received_unix_s + _ORIGINATE_SLACK_S:
        raise NtpRejected("originate timestamp does not echo our request")
    delay = float(stats.delay)
    if delay < 0 or delay > max_delay_s:
        raise NtpRejected(f"round-trip delay {delay:.3f} s outside 0..{max_delay_s} s")
    return NtpSample(float(stats.offset), delay, int(stats.stratum), _ref_id_text(stats), int(stats.leap))


def _ascii_ref_id(ref_id: int) -> str:
    raw = int(ref_id).to_bytes(4, "big")
    return raw.decode("ascii", errors="replace").strip("\x00 ")


def _ref_id_text(stats: Any) -> str:
    try:
        return str(ntplib.ref_id_to_text(stats.ref_id, stats.stratum))
    except Exception:  # ntplib raises plain exceptions on odd ids; the id is informational only
        return ""


def query_server(host: str, port: int, timeout_s: float, max_delay_s: float) -> NtpSample:
    """One blocking SNTP exchange (run it in a thread); raises OSError, NTPException or NtpRejected."""
    client = ntplib.NTPClient()
    sent = time.time()
    stats = client.request(host, version=4, port=port, timeout=timeout_s)
    received = time.time()
    return check_answer(stats, sent, received, max_delay_s)


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


class EventSink(Protocol):
    """``Runtime.event``."""

    def __call__(self, event_type: str, text: str, **fields: Any) -> Awaitable[None]:
        """Commit one event."""
        ...


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
        self._step_refused = False

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
            self.failures = 0
            self.last_error = None
            self.last = sample
            self.last_sync_ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
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
                poll = asyncio.ensure_future(self.poll_once(ctx))
                stop = asyncio.ensure_future(ctx.stopping.wait())
                await asyncio.wait([poll, stop], return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if not poll.done():
                    poll.cancel()
                    return
                factor = poll.result()
                backoff = min(backoff * factor, _MAX_RATE_BACKOFF) if factor > 1 else 1.0
            if await ctx.sleep(cfg.interval_s * backoff):
                return
