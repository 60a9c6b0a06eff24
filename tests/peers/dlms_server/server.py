"""The peer's runtime: the tty and TCP transports, the control channel and the request log (asyncio)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import sys
import termios
import time
import tty
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from . import cosem
from .application import Association, Meter, Record
from .config import PeerConfig
from .hdlc import HdlcLink
from .wrapper import WrapperError, WrapperLink

MAX_RECORDS = 200_000
READ_SIZE = 4096


class RequestLog:
    """Every request the meter served (and refused, dropped, aborted), numbered; waiters are woken."""

    def __init__(self, clock: Callable[[], float], path: str | None) -> None:
        self.clock = clock
        self.records: list[Record] = []
        self.seq = 0
        self._file: IO[str] | None = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115
        self._changed = asyncio.Event()

    def add(self, record: Record) -> None:
        """Append one record (written to the file before the meter answers the request)."""
        self.seq += 1
        full = {"seq": self.seq, "meter_time": cosem.iso_utc(self.clock()), **record}
        if len(self.records) >= MAX_RECORDS:
            del self.records[: MAX_RECORDS // 2]
        self.records.append(full)
        if self._file is not None:
            self._file.write(json.dumps(full) + "\n")
            self._file.flush()
        self._changed.set()

    def since(self, seq: int, kind: str | None = None) -> list[Record]:
        """Records after ``seq`` (of ``kind`` when given)."""
        return [r for r in self.records if r["seq"] > seq and (kind is None or r["kind"] == kind)]

    async def wait(self, kind: str, count: int, since: int, timeout_s: float) -> tuple[bool, list[Record]]:
        """Wait until ``count`` records of ``kind`` after ``since`` exist (or the timeout)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            found = self.since(since, kind)
            remaining = deadline - loop.time()
            if len(found) >= count or remaining <= 0:
                return len(found) >= count, found
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)


class Peer:
    """The meter process: one Meter, the links, the control server."""

    def __init__(self, cfg: PeerConfig) -> None:
        self.cfg = cfg
        self.silent_until: float | None = 0.0
        if cfg.silent:
            self.silent_until = None
        self.requests = RequestLog(self._meter_now, cfg.request_log)
        self.meter = Meter(cfg, self.requests.add)
        self.known_saps = {c.sap for c in cfg.clients}
        self.hdlc: HdlcLink | None = None
        self.tcp_links: dict[str, tuple[WrapperLink, asyncio.StreamWriter]] = {}
        self.tcp_count = 0
        self.stop = asyncio.Event()

    def _meter_now(self) -> float:
        return self.meter.clock.now()

    def is_silent(self) -> bool:
        """True while the meter must not answer (the control channel's ``silent``)."""
        return self.silent_until is None or time.monotonic() < self.silent_until

    def open_association(self, client_sap: int, link_id: str, transport: str) -> Association:
        """A new association for ``client_sap`` (known: the links check) on ``link_id``."""
        return Association(self.meter, self.meter.clients[client_sap], transport, link_id)

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        ready: dict[str, Any] = {"pid": os.getpid()}
        servers = []
        tasks = []
        if self.cfg.tcp is not None:
            server = await asyncio.start_server(self._tcp_client, self.cfg.tcp.host, self.cfg.tcp.port)
            servers.append(server)
            ready["tcp_port"] = server.sockets[0].getsockname()[1]
        control = await asyncio.start_server(
            self._control_client, self.cfg.control_host, self.cfg.control_port
        )
        servers.append(control)
        ready["control_port"] = control.sockets[0].getsockname()[1]
        if self.cfg.hdlc is not None:
            h = self.cfg.hdlc
            self.hdlc = HdlcLink(
                self.cfg.logical_device,
                h.physical_address,
                h.max_info_field,
                self.known_saps,
                lambda sap, link: self.open_association(sap, link, "hdlc"),
                self.requests.add,
                self.is_silent,
                h.inactivity_timeout_s,
            )
            fd = _open_tty(h.device)
            tasks.append(asyncio.create_task(self._serve_tty(h.device, fd)))
            ready["hdlc_device"] = h.device
        print("READY " + json.dumps(ready), flush=True)
        await self.stop.wait()
        for task in tasks:
            task.cancel()
        for server in servers:
            server.close()
        for link, writer in list(self.tcp_links.values()):
            link.close("stopped")
            writer.close()

    async def _serve_tty(self, device: str, fd: int) -> None:
        loop = asyncio.get_running_loop()
        assert self.hdlc is not None
        while True:
            readable = asyncio.Event()
            loop.add_reader(fd, readable.set)
            try:
                while True:
                    await readable.wait()
                    readable.clear()
                    try:
                        data = os.read(fd, READ_SIZE)
                    except BlockingIOError:
                        continue
                    if not data:
                        raise OSError(errno.EIO, "end of file")
                    baud = self.cfg.hdlc.baud if self.cfg.hdlc else 0
                    if baud:  # what the request took on a real line at this speed (a pty takes nothing)
                        await asyncio.sleep(len(data) * 10 / baud)
                    try:
                        frames = self.hdlc.feed(data)
                    except Exception as exc:  # a bug of the peer: logged for the test to see, never fatal
                        self.requests.add({"kind": "internal_error", "transport": "hdlc", "why": repr(exc)})
                        continue
                    for frame in frames:
                        if baud:
                            await asyncio.sleep(len(frame) * 10 / baud)
                        await _write_all(fd, frame)
            except OSError as exc:
                self.requests.add({"kind": "tty_lost", "transport": "hdlc", "why": str(exc)})
            finally:
                loop.remove_reader(fd)
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.hdlc.reset("tty lost")
            fd = await _reopen_tty(device)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.tcp_count += 1
        link_id = f"tcp-{self.tcp_count}"
        link = WrapperLink(
            self.cfg.logical_device,
            self.known_saps,
            lambda sap, lid: self.open_association(sap, lid, "tcp"),
            self.requests.add,
            self.is_silent,
            link_id,
        )
        self.tcp_links[link_id] = (link, writer)
        self.requests.add({"kind": "connect", "transport": "tcp", "link": link_id})
        why = "closed by the client"
        try:
            while data := await reader.read(READ_SIZE):
                for frame in link.feed(data):
                    writer.write(frame)
                await writer.drain()
        except WrapperError as exc:
            why = str(exc)
        except OSError as exc:
            why = f"socket: {exc}"
        except Exception as exc:  # a bug of the peer: logged for the test to see, the connection dropped
            why = f"internal error: {exc!r}"
            self.requests.add(
                {"kind": "internal_error", "transport": "tcp", "link": link_id, "why": repr(exc)}
            )
        finally:
            link.close(why)
            self.tcp_links.pop(link_id, None)
            self.requests.add({"kind": "disconnect", "transport": "tcp", "link": link_id, "why": why})
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _control_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("a request is a JSON object")
                    reply = await self._control(request)
                except (ValueError, KeyError, TypeError) as exc:
                    reply = {"ok": False, "error": str(exc)}
                writer.write((json.dumps(reply) + "\n").encode())
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def _control(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        clock = self.meter.clock
        if op == "status":
            return {"ok": True, **self.status()}
        if op == "silent":
            for_s = request.get("for_s")
            self.silent_until = None if for_s is None else time.monotonic() + float(for_s)
            self.requests.add({"kind": "control", "op": "silent", "for_s": for_s})
            return {"ok": True}
        if op == "speak":
            self.silent_until = 0.0
            self.requests.add({"kind": "control", "op": "speak"})
            return {"ok": True}
        if op == "advance_clock":
            clock.advance(float(request["s"]))
            self.requests.add({"kind": "control", "op": "advance_clock", "s": request["s"]})
            return {"ok": True, "now": cosem.iso_utc(clock.now())}
        if op == "set_clock":
            clock.set(cosem.parse_utc(request["utc"]))
            self.requests.add({"kind": "control", "op": "set_clock", "utc": request["utc"]})
            return {"ok": True, "now": cosem.iso_utc(clock.now())}
        if op == "reset_links":
            if self.hdlc is not None:
                self.hdlc.reset("reset by the test")
            for link, writer in list(self.tcp_links.values()):
                link.close("reset by the test")
                writer.close()
            self.requests.add({"kind": "control", "op": "reset_links"})
            return {"ok": True}
        if op == "requests":
            return {
                "ok": True,
                "records": self.requests.since(int(request.get("since", 0)), request.get("kind")),
            }
        if op == "wait":
            ok, found = await self.requests.wait(
                str(request["kind"]),
                int(request.get("count", 1)),
                int(request.get("since", 0)),
                float(request.get("timeout_s", 10)),
            )
            return {"ok": ok, "records": found}
        raise ValueError(f"unknown op {op!r}")

    def status(self) -> dict[str, Any]:
        """What the control channel's ``status`` answers."""
        return {
            "now": cosem.iso_utc(self.meter.clock.now()),
            "now_s": self.meter.clock.now(),
            "silent": self.is_silent(),
            "server_invocation_counter": self.meter.server_ic,
            "client_invocation_counters": {str(k): v for k, v in self.meter.last_client_ic.items()},
            "hdlc_connected": bool(self.hdlc and self.hdlc.connected),
            "tcp_connections": len(self.tcp_links),
            "last_seq": self.requests.seq,
        }


def _open_tty(device: str) -> int:
    fd = os.open(device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    with contextlib.suppress(termios.error):
        tty.setraw(fd)
    return fd


async def _reopen_tty(device: str) -> int:
    # The tty vanished (socat killed, adapter unplugged): wait for it to come back, like a meter
    # whose line is reconnected.
    while True:
        await asyncio.sleep(0.2)
        with contextlib.suppress(OSError):
            return _open_tty(device)


async def _write_all(fd: int, data: bytes) -> None:
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
            view = view[written:]
        except BlockingIOError:
            writable = loop.create_future()
            loop.add_writer(fd, writable.set_result, None)
            try:
                await writable
            finally:
                loop.remove_writer(fd)


def main(config_path: Path) -> int:
    """Run the peer with the configuration at ``config_path``."""
    from .config import ConfigError, load

    try:
        cfg = load(config_path)
    except ConfigError as exc:
        print(f"dlms_server: {exc}", file=sys.stderr)
        return 2
    asyncio.run(Peer(cfg).run())
    return 0
