"""Helpers of the transparent-port tests: far-end devices on ptys, a bridge harness, clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
import termios
import tty
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dcud.config.model import LineConfig
from dcud.runtime.bus import EventBus
from dcud.runtime.supervisor import Service
from dcud.service.bridge import BridgeConfig, BridgeService, SessionPolicy
from dcud.service.line import Line, LineRegistry, LineService, LineServiceConfig

from helpers.meters import Events, SocatPair, supervised, wait_until

TR_MIN_S = 0.25
"""IEC 62056-21 tr: the reaction time a master leaves between the meter's identification and its option
select (at least 200 ms, :data:`dcud.codec.iec62056.REACTION_MIN_S`, plus a margin). A head-end that
drives the protocol by hand through a transparent port must keep it: protocol pacing the meter requires,
not a wait for something to settle."""


class PtyDevice:
    """The far end of a line (one end of a socat pair): answers what it receives through ``respond``.

    ``respond(buffer)`` gets everything received and not consumed yet; it returns ``(consumed, answer)``.
    The default echoes every byte. Writes that the pty does not take at once are kept and retried.
    """

    def __init__(self, path: Path, respond: Callable[[bytearray], tuple[int, bytes]] | None = None) -> None:
        self.path = path
        self.respond = respond or (lambda buf: (len(buf), bytes(buf)))
        self.received = bytearray()
        self.log: list[tuple[float, bytes]] = []
        self._pending = bytearray()
        self._out = bytearray()
        self.fd = -1

    def start(self, *, reading: bool = True) -> None:
        """Open the pty (raw: ``setraw`` flushes input, so open before anything is sent) and read it,
        or with ``reading=False`` hold it open unread (a far end that takes nothing) until :meth:`read`."""
        self.fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.fd)
        if reading:
            self.read()

    def read(self) -> None:
        """Start reading (and answering)."""
        asyncio.get_running_loop().add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except (BlockingIOError, OSError):
            return
        if not data:
            return
        self.received += data
        self.log.append((asyncio.get_running_loop().time(), data))
        self._pending += data
        consumed, answer = self.respond(self._pending)
        del self._pending[:consumed]
        if answer:
            self._out += answer
            self._flush()

    def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._out:
            try:
                n = os.write(self.fd, self._out)
            except BlockingIOError:
                loop.add_writer(self.fd, self._writable)
                return
            del self._out[:n]

    def _writable(self) -> None:
        asyncio.get_running_loop().remove_writer(self.fd)
        self._flush()

    def stop(self) -> None:
        if self.fd >= 0:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self.fd)
            loop.remove_writer(self.fd)
            os.close(self.fd)
            self.fd = -1


def tty_speed(path: Path) -> int:
    """The output speed the line's tty runs at now (termios, in baud)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        speed = termios.tcgetattr(fd)[5]
    finally:
        os.close(fd)
    names = {
        getattr(termios, f"B{b}"): b for b in (300, 600, 1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)
    }
    return names.get(speed, -1)


FAST_POLICY = SessionPolicy(
    idle_timeout_s=60.0,
    lease_idle_s=30.0,
    lease_max_s=0.0,
    lease_wait_s=20.0,
    keepalive_idle_s=5,
    keepalive_interval_s=1,
    keepalive_count=3,
    unsent_timeout_s=5.0,
)


@dataclass
class Harness:
    """A line on a socat pair, its line service, bridge service(s) and collected events."""

    pair: SocatPair
    line_config: LineConfig
    lines: LineRegistry
    bus: EventBus
    events: Events
    bridges: list[BridgeService] = field(default_factory=list)
    extra: list[Any] = field(default_factory=list)

    @property
    def bridge(self) -> BridgeService:
        return self.bridges[0]

    @property
    def port(self) -> int:
        assert self.bridge.bound_port is not None
        return self.bridge.bound_port

    @property
    def line(self) -> Line:
        return self.lines[self.line_config.name]

    def audits(self) -> list[dict[str, Any]]:
        return [e for e in self.events.items if e["type"] == "bridge_session"]

    async def wait_audits(self, count: int, timeout_s: float = 20.0) -> list[dict[str, Any]]:
        await wait_until(lambda: len(self.audits()) >= count, timeout_s)
        return self.audits()


def line_config(name: str, device: Path, **kw: Any) -> LineConfig:
    return LineConfig(name=name, device=str(device), **kw)


@contextlib.asynccontextmanager
async def bridge_harness(
    tmp_path: Path,
    *,
    name: str = "rs485-1",
    kind: str = "rs232",
    line_baud: int = 9600,
    framing: str = "8N1",
    transparent: str = "primary",
    bridge: dict[str, Any] | None = None,
    policy: SessionPolicy = FAST_POLICY,
    extra_services: Callable[[Harness], list[Service]] | None = None,
) -> AsyncIterator[Harness]:
    """Start socat, the line service and a bridge service on 127.0.0.1:<free port>."""
    pair = SocatPair(tmp_path / f"{name}-a", tmp_path / f"{name}-b")
    pair.start()
    line = LineConfig(
        name=name,
        device=str(pair.a),
        kind=kind,  # type: ignore[arg-type]
        baud=line_baud,  # type: ignore[arg-type]
        framing=framing,
        transparent=transparent,  # type: ignore[arg-type]
    )
    lines = LineRegistry()
    bus = EventBus()
    events = Events()
    harness = Harness(pair, line, lines, bus, events)
    settings = {
        "port_name": "tm" if transparent == "primary" else "tm2",
        "line": line,
        "port": 0,
        "baud": line_baud,
        "host": "127.0.0.1",
        "policy": policy,
        "state_dir": str(tmp_path / "state"),
        **(bridge or {}),
    }
    service = BridgeService(BridgeConfig(**settings), lines, bus, events)
    harness.bridges.append(service)
    services: list[Service] = [LineService(LineServiceConfig(line), lines, bus, events), service]
    if extra_services is not None:
        services += extra_services(harness)
    try:
        async with supervised(*services):
            await wait_until(lambda: service.bound_port is not None or service.state == "tls_error", 10)
            yield harness
    finally:
        pair.kill()


async def connect(port: int, **kw: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, limit=1 << 22, **kw), 10)


async def read_exactly(reader: asyncio.StreamReader, size: int, timeout_s: float = 20.0) -> bytes:
    return await asyncio.wait_for(reader.readexactly(size), timeout_s)


async def exchange(port: int, payload: bytes, chunk: int = 4096, **kw: Any) -> bytes:
    """Send ``payload`` while reading the echo concurrently; returns what came back."""
    reader, writer = await connect(port, **kw)
    try:

        async def send() -> None:
            for off in range(0, len(payload), chunk):
                writer.write(payload[off : off + chunk])
                await writer.drain()

        sender = asyncio.create_task(send())
        echoed = await read_exactly(reader, len(payload), 60.0)
        await sender
        return echoed
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def policy(**changes: Any) -> SessionPolicy:
    return replace(FAST_POLICY, **changes)


async def closed_by_peer(reader: asyncio.StreamReader, timeout_s: float = 15.0) -> bool:
    """True once the port closed the connection (FIN or reset) without sending anything."""
    try:
        return await asyncio.wait_for(reader.read(), timeout_s) == b""
    except ConnectionResetError:
        return True
