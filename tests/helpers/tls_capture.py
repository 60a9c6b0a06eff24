"""A TLS server for tests that records everything a client sent: the raw bytes and, after a completed
handshake, the plaintext. It proves what a client did *not* send to a server it should not trust."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field


@dataclass
class Capture:
    """One connection as the server saw it."""

    raw: bytearray = field(default_factory=bytearray)
    plaintext: bytearray = field(default_factory=bytearray)
    handshake_done: bool = False
    error: str = ""
    closed: bool = False


class _CaptureProtocol(asyncio.Protocol):
    def __init__(self, context: ssl.SSLContext, capture: Capture, answer: Callable[[bytes], bytes]) -> None:
        self.capture = capture
        self.answer = answer
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        capture = self.capture
        capture.raw += data
        self.incoming.write(data)
        try:
            if not capture.handshake_done:
                self.tls.do_handshake()
                capture.handshake_done = True
            for _ in range(1000):  # bounded: one record per round
                chunk = self.tls.read(65536)
                if not chunk:
                    break
                capture.plaintext += chunk
                reply = self.answer(bytes(capture.plaintext))
                if reply:
                    self.tls.write(reply)
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLError, ssl.SSLZeroReturnError) as exc:
            capture.error = str(exc)
            self._flush()
            if self.transport is not None:
                self.transport.close()
            return
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.capture.closed = True


@dataclass
class CaptureServer:
    """The server: its port and every connection it took."""

    port: int = 0
    connections: list[Capture] = field(default_factory=list)

    def all_plaintext(self) -> bytes:
        return b"".join(bytes(c.plaintext) for c in self.connections)

    def all_raw(self) -> bytes:
        return b"".join(bytes(c.raw) for c in self.connections)


@contextlib.asynccontextmanager
async def capture_server(
    context: ssl.SSLContext, answer: Callable[[bytes], bytes] = lambda _received: b""
) -> AsyncIterator[CaptureServer]:
    """A TLS server on 127.0.0.1:<free port>; ``answer(plaintext so far)`` may reply after each read."""
    state = CaptureServer()

    def factory() -> _CaptureProtocol:
        capture = Capture()
        state.connections.append(capture)
        return _CaptureProtocol(context, capture, answer)

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)


def server_context(cert_pem: bytes, key_pem: bytes, directory: str) -> ssl.SSLContext:
    """A TLS server context for a certificate and key (PEM), written to ``directory``."""
    from pathlib import Path

    cert = Path(directory) / "capture-server.pem"
    key = Path(directory) / "capture-server.key"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    return context
