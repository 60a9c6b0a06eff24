"""Running one DLMS session: its TCP connection, its invocation counters, its clean end after a cancel.

:func:`dlms_session` runs one association on a leased line port or a TCP connection (:func:`open_tcp`,
:class:`TcpPort`) following a :class:`~dcud.service.dlms_plan.ReadoutPlan`, with invocation counters
reserved on disk by the state store before the first is used. The association is released (RLRQ) and
the link closed at the end, after an error or a timeout too (the client session does that); when the
readout's task is cancelled, :func:`run_dlms_session` closes the link (HDLC DISC, the TCP connection)
within :data:`CANCEL_CLEANUP_S` before the lease ends. The I/O of a readout, apart from what it asks
(the plan) and what is done with the answers (:mod:`dcud.service.dlms_meter`).
"""

from __future__ import annotations

import asyncio
import contextlib

from dcud.codec.dlms.client import DlmsClient, DlmsSessionResult
from dcud.config.model import LineConfig
from dcud.errors import DcudError, LocalProtocolError, PeerTimeout
from dcud.service.dlms_plan import ReadoutPlan
from dcud.service.dlms_settings import DlmsMeterSettings
from dcud.service.dlms_state import DlmsStateStore
from dcud.service.session_runner import SessionPort, run_session
from dcud.transport.tcp import SocketTuning, open_stream

TCP_CONNECT_TIMEOUT_S = 10.0
CANCEL_CLEANUP_S = 3.0
"""After a cancellation: the longest wait for the link to close (DISC/UA) before the lease ends."""


# --- running one session -------------------------------------------------------------------------------


class MeterUnreachable(PeerTimeout):
    """A TCP meter that cannot be connected to, or closed the connection."""


class DlmsStateError(LocalProtocolError):
    """The durable state cannot be written (or locked): no session may start without it."""


class TcpPort:
    """A TCP connection with the port interface ``run_session`` drives (no baud, no framing)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, where: str) -> None:
        self.reader = reader
        self.writer = writer
        self.where = where

    def write(self, data: bytes) -> None:
        """Send ``data``."""
        self.writer.write(data)

    async def drain(self) -> None:
        """Wait for the socket buffer."""
        try:
            await self.writer.drain()
        except OSError as exc:
            raise MeterUnreachable(f"{self.where}: {exc.strerror or exc}") from exc

    async def read(self, max_bytes: int = 4096, timeout_s: float = 1.0) -> bytes:
        """What arrived; ``b""`` after ``timeout_s``; MeterUnreachable when the meter closed."""
        try:
            async with asyncio.timeout(timeout_s):
                data = await self.reader.read(max_bytes)
        except TimeoutError:
            return b""
        except OSError as exc:
            raise MeterUnreachable(f"{self.where}: {exc.strerror or exc}") from exc
        if not data:
            raise MeterUnreachable(f"{self.where} closed the connection")
        return data

    async def set_baud(self, baud: int) -> None:
        """Nothing: TCP has no rate."""

    async def set_framing(self, framing: str) -> None:
        """Nothing: TCP has no framing."""

    def flush_input(self) -> None:
        """Nothing to drop: the session reads every byte."""

    async def close(self) -> None:
        """Close the connection (bounded)."""
        self.writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()


async def open_tcp(host: str, port: int, timeout_s: float = TCP_CONNECT_TIMEOUT_S) -> TcpPort:
    """A TCP connection to a meter (dcud's socket tuning: TCP_NODELAY, so every APDU goes out at once;
    keepalive and a user timeout); MeterUnreachable when there is none within ``timeout_s``."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        reader, writer = await open_stream(host, port, timeout_s=timeout_s, tuning=SocketTuning())
    except TimeoutError:
        raise MeterUnreachable(f"no TCP connection to {where} within {timeout_s:g} s") from None
    except OSError as exc:
        raise MeterUnreachable(f"cannot connect to {where}: {exc.strerror or exc}") from None
    return TcpPort(reader, writer, where)


class _Resumed:
    """A started session seen as a new one whose first actions are given (the close after a cancel)."""

    def __init__(self, client: DlmsClient, first: list[object]) -> None:
        self.client = client
        self.first = first

    def start(self, now: float) -> list[object]:
        return self.first

    def receive_data(self, data: bytes, now: float) -> list[object]:
        return self.client.receive_data(data, now)

    def handle_timer(self, now: float) -> list[object]:
        return self.client.handle_timer(now)

    def next_deadline(self) -> float | None:
        return self.client.next_deadline()


async def run_dlms_session(
    client: DlmsClient, port: SessionPort, *, cleanup_s: float = CANCEL_CLEANUP_S
) -> DlmsSessionResult:
    """Run ``client`` on ``port`` to its end. When the task is cancelled, the link is closed first (the
    DISC, bounded by ``cleanup_s``) so the line is left clean before the lease ends; then the
    cancellation goes on."""
    try:
        result: DlmsSessionResult = await run_session(client, port)
        return result
    except asyncio.CancelledError:
        first = client.abort(asyncio.get_running_loop().time())
        if first or client.next_deadline() is not None:
            # A second cancellation is not suppressed: it ends the clean-up too.
            with contextlib.suppress(DcudError, TimeoutError, OSError):
                async with asyncio.timeout(cleanup_s):
                    await run_session(_Resumed(client, first), port)
        raise


async def dlms_session(
    settings: DlmsMeterSettings,
    line: LineConfig | None,
    port: SessionPort,
    store: DlmsStateStore,
    plan: ReadoutPlan,
) -> DlmsSessionResult:
    """One association on ``port`` following ``plan``, with invocation counters from ``store`` (the
    reservation is on disk before the first one is used; the state is updated however it ends)."""
    state = store.get(settings.name)
    start, limit = state.counter_range(settings.keyset)
    if state.dirty:
        try:
            await asyncio.to_thread(store.save, settings.name)
        except OSError as exc:
            # Without the reservation on disk a crash could reuse counters: no session.
            raise DlmsStateError(f"cannot save the DLMS state of {settings.name}: {exc}") from exc
    server_counter = state.server_counters.get(settings.keyset)
    client = DlmsClient(
        settings.transport(line), settings.client_config(start, limit, server_counter, line), planner=plan
    )
    try:
        return await run_dlms_session(client, port)
    finally:
        state.counter_used(settings.keyset, client.next_invocation_counter)
        state.set_server_counter(settings.keyset, client.server_invocation_counter)


__all__ = [
    "CANCEL_CLEANUP_S",
    "TCP_CONNECT_TIMEOUT_S",
    "DlmsStateError",
    "MeterUnreachable",
    "TcpPort",
    "dlms_session",
    "open_tcp",
    "run_dlms_session",
]
