"""Helpers of the DLMS simulator tests: the simulator in this event loop on an injected clock, dcud's
client session over a socat pty pair or TCP (through ``run_session``), and dlms-cosem's client in its
own process (tests/peers/cosem_client.py)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcud.codec.dlms.client import DlmsClient, DlmsClientConfig, Request
from dcud.codec.dlms.hdlc_link import HdlcLink
from dcud.codec.dlms.mode_e import ModeESettings
from dcud.codec.dlms.security import Keys
from dcud.codec.dlms.wrapper import WrapperTransport
from dcud.config.model import LineConfig
from dcud.service.line import Line
from dcud.service.session_runner import run_session
from dcud.sim.dlms_model import GREEN_BOOK_AUTHENTICATION_KEY, GREEN_BOOK_BLOCK_CIPHER_KEY, parse_time
from dcud.sim.dlms_sim import DlmsSimConfig, DlmsSimHandle, serve
from dcud.transport.serial import SerialPort

from helpers import REPO
from helpers.cosem import COSEM_CLIENT, report_of, write_plan

GREEN_BOOK_KEYS = Keys.from_hex(GREEN_BOOK_BLOCK_CIPHER_KEY, GREEN_BOOK_AUTHENTICATION_KEY)
CLIENT_TITLE = bytes.fromhex("4D4D4D0000000001")


class HostClock:
    """The host clock the simulated meters run from; tests move it."""

    def __init__(self, start: str) -> None:
        self.t = parse_time(start)

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@contextlib.asynccontextmanager
async def running(config: DlmsSimConfig, clock: HostClock) -> AsyncIterator[DlmsSimHandle]:
    """The simulator in this event loop; yields once every line is open and every port listens."""
    ready: asyncio.Future[DlmsSimHandle] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, clock=clock, on_ready=ready.set_result, stop=stop))
    try:
        done, _ = await asyncio.wait([ready, task], timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            if task.done():
                task.result()
            raise AssertionError("the DLMS simulator did not start")
        yield ready.result()
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


class TcpPort:
    """A TCP connection with the port interface ``run_session`` drives (no baud, no framing)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    async def read(self, max_bytes: int = 4096, timeout_s: float = 1.0) -> bytes:
        try:
            async with asyncio.timeout(timeout_s):
                return await self.reader.read(max_bytes)
        except TimeoutError:
            return b""

    async def set_baud(self, baud: int) -> None:
        return None

    async def set_framing(self, framing: str) -> None:
        return None

    def flush_input(self) -> None:
        return None


async def read_tcp(
    port: int, config: DlmsClientConfig, requests: Sequence[Request], client_sap: int = 16
) -> Any:
    """One dcud client session over the wrapper on 127.0.0.1:port; the session's result (or raises)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        client = DlmsClient(WrapperTransport(client_sap=client_sap, response_timeout_s=5), config, requests)
        return await asyncio.wait_for(run_session(client, TcpPort(reader, writer)), 60)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@dataclass
class HdlcLine:
    """dcud's side of an HDLC line: a Line on a tty (a socat pair end), leased per session."""

    line: Line

    async def read(
        self,
        config: DlmsClientConfig,
        requests: Sequence[Request],
        *,
        client_sap: int = 16,
        physical_address: int = 17,
        mode_e: ModeESettings | None = None,
        response_timeout_s: float = 2.0,
        **link: Any,
    ) -> Any:
        transport = HdlcLink(
            client_sap=client_sap,
            physical_address=physical_address,
            response_timeout_s=response_timeout_s,
            mode_e=mode_e or False,
            **link,
        )
        client = DlmsClient(transport, config, requests)
        async with self.line.lease("test", "cli", timeout_s=10) as port:
            return await asyncio.wait_for(run_session(client, port), 90)


@contextlib.asynccontextmanager
async def hdlc_line(path: str, baud: int = 9600, framing: str = "8N1") -> AsyncIterator[HdlcLine]:
    """A dcud Line on ``path``. A mode E line is configured as an IEC line (300 Bd 7E1): a pty refuses
    parity, so the port then runs 8N1 and keeps the framing logical only (as the lease switches it)."""
    cfg = LineConfig(name="dlms", device=path, kind="rs485", baud=baud, framing=framing)  # type: ignore[arg-type]
    port = SerialPort(path, cfg.effective_baud, cfg.effective_framing)
    await port.open()
    line = Line(cfg)
    line.attach(port)
    try:
        yield HdlcLine(line)
    finally:
        line.detach("closed")
        # The tty closes on the next loop turns; the next Line on it must find its lock free.
        serial_port = getattr(port, "_serial", None)
        for _ in range(200):
            if serial_port is None or not serial_port.is_open:
                break
            await asyncio.sleep(0.01)


async def cosem(tmp_path: Path, plan: dict[str, Any], timeout_s: float = 120) -> dict[str, Any]:
    """dlms-cosem's client (its own process) runs ``plan``; its JSON report. Asynchronous, so the
    simulator in this event loop goes on serving while it runs."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(COSEM_CLIENT),
        str(write_plan(tmp_path, plan)),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return report_of(proc.returncode, stdout.decode(), stderr.decode())


@contextlib.asynccontextmanager
async def dcud_reader(
    transport: str,
    sim: DlmsSimHandle,
    client_tty: Path | None = None,
    meter: str = "em-1",
    mode_e: bool = False,
) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """``read(config, requests, client_sap=16, **link)``: dcud's client session against ``meter`` over
    ``transport`` (``hdlc``: a Line on ``client_tty``, opened once; ``tcp``: a connection per session)."""
    if transport == "tcp":

        async def over_tcp(
            config: DlmsClientConfig, requests: Sequence[Request], client_sap: int = 16
        ) -> Any:
            return await read_tcp(sim.tcp_port(meter), config, requests, client_sap)

        yield over_tcp
        return
    assert client_tty is not None
    physical = next(m.physical_address for m in sim.config.meter if m.name == meter)
    line_settings = {"baud": 300, "framing": "7E1"} if mode_e else {}
    async with hdlc_line(str(client_tty), **line_settings) as line:

        async def over_hdlc(
            config: DlmsClientConfig, requests: Sequence[Request], client_sap: int = 16, **link: Any
        ) -> Any:
            return await line.read(config, requests, client_sap=client_sap, physical_address=physical, **link)

        yield over_hdlc


def hls_config(**extra: Any) -> DlmsClientConfig:
    """dcud's client for the management client 1: HLS-GMAC, authenticated and encrypted."""
    from dcud.codec.dlms.client import Auth
    from dcud.codec.dlms.security import SecurityPolicy

    values: dict[str, Any] = {
        "auth": Auth.HLS_GMAC,
        "security": SecurityPolicy.AUTHENTICATED_ENCRYPTED,
        "keys": GREEN_BOOK_KEYS,
        "system_title": CLIENT_TITLE,
        "invocation_counter": 1,
    }
    values.update(extra)
    return DlmsClientConfig(**values)


class RecordingPort:
    """Wraps a session port and keeps every chunk written and read, in order: a capture of the line."""

    def __init__(self, port: Any) -> None:
        self.port = port
        self.chunks: list[tuple[str, bytes]] = []

    def write(self, data: bytes) -> Any:
        self.chunks.append(("client", bytes(data)))
        return self.port.write(data)

    async def drain(self) -> None:
        await self.port.drain()

    async def read(self, max_bytes: int = 4096, timeout_s: float = 1.0) -> bytes:
        data: bytes = await self.port.read(max_bytes, timeout_s)
        if data:
            self.chunks.append(("meter", data))
        return data

    async def set_baud(self, baud: int) -> None:
        await self.port.set_baud(baud)

    async def set_framing(self, framing: str) -> None:
        await self.port.set_framing(framing)

    def flush_input(self) -> None:
        self.port.flush_input()

    def hex_text(self, title: str) -> str:
        """The capture as hex text, one line per chunk, with who sent it as a comment."""
        lines = [f"# {title}"]
        for who, data in self.chunks:
            direction = "client -> meter" if who == "client" else "meter -> client"
            lines.append(f"{data.hex(' ').upper()}  # {direction}")
        return "\n".join(lines) + "\n"


async def record_hdlc_session(
    client_tty: Path, config: DlmsClientConfig, requests: Sequence[Request], client_sap: int
) -> RecordingPort:
    """One dcud client session over HDLC on ``client_tty``, recorded."""
    async with hdlc_line(str(client_tty)) as line:
        link = HdlcLink(client_sap=client_sap, physical_address=17, response_timeout_s=5.0)
        client = DlmsClient(link, config, requests)
        async with line.line.lease("test", "cli", timeout_s=10) as port:
            recording = RecordingPort(port)
            await asyncio.wait_for(run_session(client, recording), 60)
    return recording


async def record_tcp_session(
    port: int, config: DlmsClientConfig, requests: Sequence[Request], client_sap: int
) -> RecordingPort:
    """One dcud client session over the wrapper, recorded."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        recording = RecordingPort(TcpPort(reader, writer))
        client = DlmsClient(WrapperTransport(client_sap=client_sap), config, requests)
        await asyncio.wait_for(run_session(client, recording), 60)
        return recording
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
