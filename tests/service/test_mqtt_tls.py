"""The MQTT uplink over TLS (mqtts://) with a CA and a client certificate, against a real Mosquitto."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import subprocess
from pathlib import Path

import aiomqtt
import pytest

from dcud.service.tls_banks import bank_path
from dcud.sim.peers import find_program, free_port, wait_for_tcp

from helpers.daemon import daemon_log, start_daemon, write_site
from helpers.notify import NotifySocket
from helpers.pki import Pki, make_pki

pytestmark = pytest.mark.slow


def start_tls_broker(workdir: Path, pki: Pki) -> tuple[subprocess.Popen[bytes], int]:
    """Mosquitto with a single TLS listener that requires a client certificate from the test CA."""
    port = free_port()
    server = bank_path(pki.state_dir, 10)  # server certificate, CA and key in one PEM
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto-tls.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"cafile {pki.ca_file}\ncertfile {server}\nkeyfile {server}\n"
        # As root, Mosquitto would drop to its own user, which cannot read the test's private tmp dir.
        "require_certificate true\nuser root\nlog_dest stderr\nlog_type error\n"
    )
    log = (workdir / "mosquitto-tls.log").open("ab")
    proc = subprocess.Popen([find_program("mosquitto", "mosquitto"), "-c", str(conf)], stdout=log, stderr=log)
    log.close()
    wait_for_tcp(port)
    return proc, port


async def retained_status(port: int, pki: Pki) -> dict[str, object]:
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    context.load_cert_chain(str(pki.client_good))
    async with aiomqtt.Client("127.0.0.1", port, tls_context=context) as client:
        await client.subscribe("dcu/dcu-test/status", qos=1)
        async with asyncio.timeout(15):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                return dict(json.loads(message.payload))
    raise AssertionError("unreachable")


async def test_mqtts_with_client_certificate(tmp_path: Path, notify_socket: NotifySocket) -> None:
    pki = make_pki(tmp_path)
    broker, port = start_tls_broker(tmp_path / "broker", pki)
    try:
        mqtt = (
            f'\n[mqtt]\nurl = "mqtts://user:s3cret@127.0.0.1:{port}"\nca_file = "{pki.ca_file}"\n'
            f'cert_file = "{pki.client_good}"\nstatus_interval_s = 2\n'
        )
        config = write_site(tmp_path / "site", toml_extra=mqtt)
        proc = start_daemon(config, notify_socket)
        try:
            notify_socket.wait_for("READY=1")
            status = await retained_status(port, pki)
            assert status["state"] == "online"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
            assert "s3cret" not in daemon_log(config)  # the password never reaches a log line
        finally:
            proc.kill()

        # Without a client certificate the broker refuses the handshake: dcud keeps running, degraded.
        no_cert = mqtt.replace(f'cert_file = "{pki.client_good}"\n', "")
        config = write_site(tmp_path / "site2", toml_extra=no_cert)
        proc = start_daemon(config, notify_socket)
        try:
            notify_socket.wait_for("READY=1")
            for _ in range(300):  # the refused handshake surfaces as a connect timeout (10 s)
                if "broker unavailable" in daemon_log(config):
                    break
                await asyncio.sleep(0.1)
            assert "broker unavailable" in daemon_log(config)
            assert proc.poll() is None
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
    finally:
        broker.terminate()
        broker.wait(timeout=10)
