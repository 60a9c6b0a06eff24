"""Connectivity watchdog (WM-E ``com_ping_*``) and daily restart (``snrp_restart_time``).

Connectivity watchdog
    Every ``com_ping_interval`` seconds a check runs: up to ``com_ping_max_retries`` probes of
    ``com_ping_host``, each waiting ``com_ping_timeout`` for the answer; one answer is enough. When all
    probes fail, dcud raises ``uplink_unreachable`` (once per outage, with its trap) and asks every uplink
    to reconnect (:class:`dcud.runtime.uplink.UplinkReconnect`), again after every failed check.
    The ``uplink`` state (``<p>/uplink/state``) shows the last result. When the checks keep failing
    for ``snrp_bis_timeout`` hours (WM-E "wait-time until module-reset"; 0: never), dcud restarts as
    for the daily restart below (exit 75): the DCU's "module reset" (the cellular modem's own reset is
    ModemManager's on Linux). The outage is counted from the first failed check after the start, so
    a dead uplink restarts dcud at most once per ``snrp_bis_timeout``.

    Probes (``[watchdog] probe``):
    - ``icmp``: ICMP echo over an unprivileged ICMP datagram socket (``socket(AF_INET, SOCK_DGRAM,
      IPPROTO_ICMP)``). Linux allows it to processes whose group is in ``net.ipv4.ping_group_range``;
      systemd sets that range to all groups (``50-default.conf``), plain Debian without systemd's
      sysctl leaves it empty. No raw socket, no ``CAP_NET_RAW``, no setuid ``ping``.
    - ``tcp``: a TCP connect to ``[watchdog] tcp_port`` (default 443); an accepted **or refused**
      connection proves the host answered; a timeout or an unreachable error is a failure.
    - ``auto`` (default): ICMP, and TCP from the first time the kernel refuses the ICMP socket.
      With ``icmp`` a refused socket counts as a failed probe (logged once).

Daily restart
    ``snrp_restart_time=HH:MM`` (local time, :mod:`dcud.config.timekeeping`) plus a random shift in
    ``[0, snrp_restart_time_shift)`` minutes, drawn once per start, so a fleet does not restart at once.
    dcud then stops gracefully and exits 75, which the systemd unit restarts (``RestartForceExitStatus=75``).
    It never restarts sooner than ``[watchdog] restart_min_uptime_s`` after its start (the next day's time
    is taken then), and it waits while power is lost. The wall clock is re-read every minute, so an NTP
    step or a DST switch moves the restart with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import os
import random
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from dcud.config.loader import LoadedConfig
from dcud.config.timekeeping import LocalClock, TimeSettings
from dcud.runtime.bus import EventBus
from dcud.runtime.clock import SYSTEM_CLOCK, Clock
from dcud.runtime.events import EventSink
from dcud.runtime.supervisor import ServiceContext
from dcud.runtime.timefmt import rfc3339
from dcud.runtime.uplink import UplinkReconnect
from dcud.service.power import power_ok
from dcud.transport.tcp import open_stream

_ICMP_ECHO_REQUEST: Final = 8
_ICMP_ECHO_REPLY: Final = 0
_ICMP6_ECHO_REQUEST: Final = 128
_ICMP6_ECHO_REPLY: Final = 129
_WALL_RECHECK_S: Final = 60.0
_REFUSED_ERRNOS: Final = {errno.EACCES, errno.EPERM, errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT}


class IcmpNotPermitted(OSError):
    """The kernel refuses unprivileged ICMP sockets here (``net.ipv4.ping_group_range``)."""


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    words: tuple[int, ...] = struct.unpack(f"!{len(data) // 2}H", data)
    total = sum(words)
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int, payload: bytes, ipv6: bool = False) -> bytes:
    """An ICMP (or ICMPv6) echo request; the kernel rewrites ident for datagram sockets."""
    kind = _ICMP6_ECHO_REQUEST if ipv6 else _ICMP_ECHO_REQUEST
    header = struct.pack("!BBHHH", kind, 0, 0, ident & 0xFFFF, seq & 0xFFFF)
    checksum = 0 if ipv6 else _checksum(header + payload)  # ICMPv6: the kernel computes it
    return struct.pack("!BBHHH", kind, 0, checksum, ident & 0xFFFF, seq & 0xFFFF) + payload


async def icmp_probe(host: str, timeout_s: float, seq: int = 1) -> bool:
    """One ICMP echo over an unprivileged datagram socket; IcmpNotPermitted when not allowed."""
    ipv6 = ":" in host
    family, proto = (
        (socket.AF_INET6, socket.IPPROTO_ICMPV6) if ipv6 else (socket.AF_INET, socket.IPPROTO_ICMP)
    )
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM, proto)
    except OSError as exc:
        if exc.errno in _REFUSED_ERRNOS:
            raise IcmpNotPermitted(exc.errno, str(exc)) from exc
        raise
    loop = asyncio.get_running_loop()
    with sock:
        sock.setblocking(False)
        payload = b"dcud-watchdog" + os.urandom(8)
        try:
            await loop.sock_sendto(sock, echo_request(os.getpid(), seq, payload, ipv6), (host, 0))
        except OSError:
            return False  # unreachable network / host: a failed probe
        reply = _ICMP6_ECHO_REPLY if ipv6 else _ICMP_ECHO_REPLY
        deadline = loop.time() + timeout_s
        for _ in range(64):  # bounded: stray replies to other probes are skipped
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 2048), remaining)
            except (TimeoutError, OSError):
                return False
            if len(data) >= 8:
                kind, _code, _sum, _ident, got_seq = struct.unpack("!BBHHH", data[:8])
                if kind == reply and got_seq == seq & 0xFFFF and data[8:] == payload:
                    return True
        return False


async def tcp_probe(host: str, port: int, timeout_s: float) -> bool:
    """A TCP connect; accepted or refused (RST) both prove the host answers."""
    try:
        _reader, writer = await open_stream(host, port, timeout_s=timeout_s)
    except ConnectionRefusedError:
        return True
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


@dataclass(frozen=True)
class WatchdogServiceConfig:
    """The watchdog service's slice."""

    ping_host: str | None
    ping_interval_s: float
    ping_timeout_s: float
    ping_max_retries: int
    probe: str
    tcp_port: int
    restart_at: dt.time | None
    restart_shift_s: float
    restart_min_uptime_s: float
    time: TimeSettings
    unreachable_restart_s: float = 0.0
    """``snrp_bis_timeout``: restart after the uplink stayed unreachable this long (0: never)."""

    @classmethod
    def from_config(cls, config: LoadedConfig) -> WatchdogServiceConfig | None:
        """The slice, or None when neither the ping watchdog nor a daily restart is configured."""
        params = config.params
        restart = params.get("snrp_restart_time")
        host = params.get_opt_str("com_ping_host")
        if host is None and not isinstance(restart, dt.time):
            return None
        section = config.toml.watchdog
        return cls(
            ping_host=host,
            ping_interval_s=float(params.get_int("com_ping_interval")),
            ping_timeout_s=params.get_float("com_ping_timeout"),
            ping_max_retries=params.get_int("com_ping_max_retries"),
            probe=section.probe,
            tcp_port=section.tcp_port,
            restart_at=restart if isinstance(restart, dt.time) else None,
            restart_shift_s=float(params.get_opt_int("snrp_restart_time_shift") or 0),
            restart_min_uptime_s=section.restart_min_uptime_s,
            time=TimeSettings.from_config(config),
            unreachable_restart_s=float(params.get_int("snrp_bis_timeout")),
        )


def restart_due_s(
    config: WatchdogServiceConfig, clock: LocalClock, now_s: float, started_s: float, shift_s: float
) -> float | None:
    """Unix time of the next daily restart (module doc), or None when none is configured."""
    if config.restart_at is None:
        return None
    base = clock.next_daily_s(config.restart_at, now_s=now_s, after_s=now_s)
    for _ in range(3):  # bounded: at most a couple of days are skipped for the minimum uptime
        if base + shift_s >= started_s + config.restart_min_uptime_s:
            break
        base = clock.next_daily_s(config.restart_at, now_s=now_s, after_s=base)
    return base + shift_s


Probe = Callable[[str, float, int], Awaitable[bool]]


class WatchdogService:
    """Supervised service ``watchdog``: ping checks and the daily restart."""

    name = "watchdog"

    def __init__(
        self,
        config: WatchdogServiceConfig,
        bus: EventBus,
        event: EventSink,
        request_restart: Callable[[str], None],
        reconnect: UplinkReconnect | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._bus = bus
        self._event = event
        self._request_restart = request_restart
        self._reconnect = reconnect
        self._clock = clock
        self._rng = rng or random.SystemRandom()
        self.probe_kind = "tcp" if config.probe == "tcp" else "icmp"
        self.reachable: bool | None = None
        self.failed_checks = 0
        self.reconnects = 0
        self.started_s = clock.time()
        self.restart_at_s: float | None = None
        self.unreachable_since_s: float | None = None
        """Wall time of the first failed check of the current outage (None while reachable)."""
        self._icmp_refused = False

    async def probe_once(self, ctx: ServiceContext, host: str, seq: int) -> bool:
        """One probe with the probe kind in force (auto switches to TCP when ICMP is refused)."""
        cfg = self.config
        if self.probe_kind == "icmp":
            try:
                return await icmp_probe(host, cfg.ping_timeout_s, seq)
            except IcmpNotPermitted as exc:
                if cfg.probe == "icmp":  # ICMP was asked for explicitly: every probe fails, said once
                    if not self._icmp_refused:
                        ctx.log.error(
                            "ICMP sockets not permitted (net.ipv4.ping_group_range)", error=str(exc)
                        )
                        self._icmp_refused = True
                    return False
                ctx.log.warning(
                    "ICMP sockets not permitted (net.ipv4.ping_group_range); probing with TCP",
                    port=cfg.tcp_port,
                    error=str(exc),
                )
                self.probe_kind = "tcp"
        return await tcp_probe(host, cfg.tcp_port, cfg.ping_timeout_s)

    async def check(self, ctx: ServiceContext) -> bool:
        """One watchdog check: up to max_retries probes; acts on failure; returns reachability."""
        cfg = self.config
        assert cfg.ping_host is not None
        ok = False
        for attempt in range(1, cfg.ping_max_retries + 1):
            ok = await self.probe_once(ctx, cfg.ping_host, attempt)
            ctx.beat()
            if ok:
                break
        before = self.reachable
        self.reachable = ok
        if ok:
            self.unreachable_since_s = None
            if before is False:
                ctx.log.info("uplink reachable again", host=cfg.ping_host)
        else:
            self._restart_after_long_outage(ctx)
            self.failed_checks += 1
            self.reconnects += 1
            reason = f"no answer from {cfg.ping_host} to {cfg.ping_max_retries} {self.probe_kind} probes"
            if before is not False:
                ctx.log.warning(
                    "uplink unreachable; reconnecting uplinks", host=cfg.ping_host, probe=self.probe_kind
                )
                await self._event("uplink_unreachable", reason, host=cfg.ping_host, probe=self.probe_kind)
            if self._reconnect is not None:
                self._reconnect.request(reason)
        self._bus.set_state(
            "uplink",
            {
                "reachable": ok,
                "host": cfg.ping_host,
                "probe": self.probe_kind,
                "failed_checks": self.failed_checks,
                "reconnects": self.reconnects,
                "checked_ts": rfc3339(self._clock.time()),
            },
        )
        return ok

    def _restart_after_long_outage(self, ctx: ServiceContext) -> None:
        """``snrp_bis_timeout``: restart (exit 75) once the outage has lasted that long (module doc)."""
        now_s = self._clock.time()
        if self.unreachable_since_s is None:
            self.unreachable_since_s = now_s
        limit_s = self.config.unreachable_restart_s
        if limit_s <= 0 or now_s - self.unreachable_since_s < limit_s:
            return
        if now_s - self.started_s < self.config.restart_min_uptime_s or not power_ok(self._bus):
            return
        hours = limit_s / 3600
        ctx.log.warning("uplink unreachable too long; restarting", hours=hours)
        self._request_restart(f"uplink unreachable for {hours:g} h (snrp_bis_timeout)")

    async def _pinger(self, ctx: ServiceContext) -> None:
        while not ctx.stopping.is_set():
            if power_ok(self._bus):
                await self.check(ctx)
            if await ctx.sleep(self.config.ping_interval_s):
                return

    async def _restarter(self, ctx: ServiceContext) -> None:
        cfg = self.config
        clock = LocalClock(cfg.time)
        shift = self._rng.uniform(0.0, cfg.restart_shift_s) if cfg.restart_shift_s > 0 else 0.0
        due = restart_due_s(cfg, clock, self._clock.time(), self.started_s, shift)
        if due is None:
            return
        self.restart_at_s = due
        ctx.log.info(
            "daily restart scheduled",
            local=clock.local(due).isoformat(timespec="seconds"),
            shift_s=round(shift),
            zone=cfg.time.describe(),
        )
        while not ctx.stopping.is_set():
            remaining = due - self._clock.time()
            if remaining <= 0 and power_ok(self._bus):
                ctx.log.warning("daily restart", at=cfg.restart_at.isoformat() if cfg.restart_at else None)
                self._request_restart(f"daily restart (snrp_restart_time {cfg.restart_at})")
                return
            if await ctx.sleep(min(max(remaining, 1.0), _WALL_RECHECK_S)):
                return

    async def run(self, ctx: ServiceContext) -> None:
        """Run the pinger and the restarter until stopped."""
        ctx.set_ready()
        if self.config.ping_host is not None:
            ctx.spawn("ping", self._pinger(ctx))
        if self.config.restart_at is not None:
            ctx.spawn("restart", self._restarter(ctx))
        await ctx.heartbeat_forever()
