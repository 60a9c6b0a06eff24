"""The one TLS client factory for dcud.toml file paths (MQTT uplink, FTPS and MQTTS data push), against a
real TLS server on loopback: CA file, client certificate with a separate key file, lab mode, bad paths."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from dcud.config.model import DataPushConfig
from dcud.service.datapush import PushError, tls_context
from dcud.service.tls_banks import TlsBankError, file_client_context

from helpers.certs import make_cert


def pem_pair(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = make_cert(name)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.crt").write_bytes(cert)
    (directory / f"{name}.key").write_bytes(key)
    return directory / f"{name}.crt", directory / f"{name}.key"


async def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> str | None:
    """One TLS handshake with a loopback server; the client certificate's subject CN the server saw."""
    seen: list[str | None] = []
    served = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert")
        seen.append(dict(x[0] for x in peer["subject"])["commonName"] if peer else None)
        served.set()
        writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server)
    port = srv.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(10):
            _reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
            writer.close()
            await served.wait()
    finally:
        srv.close()
        await srv.wait_closed()
    return seen[0]


def server_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def test_ca_file_and_a_client_certificate_with_its_own_key_file(tmp_path: Path) -> None:
    server_cert, server_key = pem_pair(tmp_path, "127.0.0.1")
    client_cert, client_key = pem_pair(tmp_path, "dcu-0001")
    context = file_client_context(
        ca_file=str(server_cert), cert_file=str(client_cert), key_file=str(client_key)
    )
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2 and context.check_hostname
    seen = await handshake(server_context(server_cert, server_key, client_ca=client_cert), context)
    assert seen == "dcu-0001"


async def test_an_unknown_ca_is_refused_unless_verification_is_off(tmp_path: Path) -> None:
    server_cert, server_key = pem_pair(tmp_path / "a", "127.0.0.1")
    other, _ = pem_pair(tmp_path / "b", "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError):
        await handshake(server_context(server_cert, server_key), file_client_context(ca_file=str(other)))
    lab = file_client_context(ca_file=str(other), verify=False)
    assert await handshake(server_context(server_cert, server_key), lab) is None


def test_a_missing_file_names_itself_and_is_a_failed_push_attempt(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(TlsBankError, match=r"nope\.pem"):
        file_client_context(ca_file=str(missing))
    with pytest.raises(TlsBankError, match=r"nope\.pem"):
        file_client_context(cert_file=str(missing))
    with pytest.raises(PushError, match=r"TLS: .*nope\.pem"):
        tls_context(DataPushConfig(ca_file=str(missing)))
    assert file_client_context().verify_mode == ssl.CERT_REQUIRED  # the system store
