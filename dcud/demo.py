"""``dcud demo``: the whole system on this computer, with simulated devices and real peers.

It starts a local Mosquitto (the system's, from the ``mosquitto`` package), writes an example
installation into a working directory, runs ``dcud run`` as a separate process exactly as systemd
would, and prints what flows on MQTT until Ctrl-C (or ``--duration``). Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt

from dcud.sim.demo_site import (
    render_reading,
    render_state,
    site_toml,
    start_dlms_simulator,
    start_simulators,
    stop_process,
)
from dcud.sim.drive import start_demo_drives
from dcud.sim.peers import Mosquitto, PeerMissing, free_port, start_mosquitto

DEVICE_ID = "dcu-demo"

DEMO_TOML = """\
# Written by `dcud demo`: a small site on simulated devices.
device_id = "{device_id}"
parameters = "wme.conf"
state_dir = "{state_dir}"
log_level = "info"

[mqtt]
url = "{mqtt_url}"
topic_prefix = "dcu/{{device_id}}"
status_interval_s = 10
"""

DEMO_WME = """\
# Written by `dcud demo`: WM-E parameters of the demo site.
datapush_periodic=1
ntp_interval=600
"""


def _render(message: aiomqtt.Message) -> str:
    topic = message.topic.value
    try:
        payload = json.loads(
            bytes(message.payload) if isinstance(message.payload, (bytes, bytearray)) else b""
        )
    except (ValueError, TypeError):
        return f"{topic}  {message.payload!r}"
    if topic.endswith("/reading") and isinstance(payload, dict):
        return render_reading(topic, payload)
    if isinstance(payload, dict) and (state := render_state(topic, payload)) is not None:
        return state
    if "/drive/" in topic and topic.endswith("/state") and isinstance(payload, dict):
        return (
            f"{topic}  online={payload.get('online')} nmt={payload.get('nmt')} "
            f"cia402={payload.get('cia402')} position={payload.get('position')} "
            f"velocity={payload.get('velocity')} error={payload.get('error_text')}"
        )
    if topic.endswith("/status") and isinstance(payload, dict):
        outbox = payload.get("outbox", {})
        return (
            f"{topic}  state={payload.get('state')} uptime_s={payload.get('uptime_s')} "
            f"outbox_depth={outbox.get('depth')} version={payload.get('version')}"
        )
    return f"{topic}  {json.dumps(payload, separators=(',', ':'))[:160]}"


async def _watch(broker: Mosquitto, duration_s: float | None, stop: asyncio.Event) -> None:
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="dcud-demo-viewer") as client:
        await client.subscribe(f"dcu/{DEVICE_ID}/#", qos=1)

        async def printer() -> None:
            async for message in client.messages:
                stamp = time.strftime("%H:%M:%S")
                if text := _render(message):
                    print(f"{stamp}  {text}", flush=True)

        task = asyncio.create_task(printer())
        try:
            async with asyncio.timeout(duration_s):
                await stop.wait()
        except TimeoutError:
            pass
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


def _start_ftp(workdir: Path, stack: contextlib.ExitStack) -> tuple[str, Path] | None:
    """A local FTP server for the data push: (datapush_host URL, local directory), or None."""
    try:
        import pyftpdlib  # noqa: F401  (a test dependency; the demo works without it)

        from dcud.sim.ftp_server import start_ftp_server

        ftp = start_ftp_server(workdir / "ftp")
    except (ImportError, OSError, TimeoutError):
        return None
    stack.callback(ftp.stop)
    return ftp.url("/push"), ftp.root / "push"


async def _enable_first_drive(broker: Mosquitto, drives_toml: str) -> None:
    """After a few seconds, enable operation of axis-1 over MQTT, as an operator would; it then moves."""
    if "axis-1" not in drives_toml:
        return
    await asyncio.sleep(8)
    with contextlib.suppress(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="dcud-demo-operator") as client:
            print("dcud demo: operator sends cmd/drive/enable {drive: axis-1}", flush=True)
            request = json.dumps({"id": 1, "drive": "axis-1"})
            await client.publish(f"dcu/{DEVICE_ID}/cmd/drive/enable", request, qos=1)


def run_demo(duration_s: float | None = None, workdir: Path | None = None) -> int:
    """Run the demo; returns the process exit code."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dcud-demo-")))
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            broker = start_mosquitto(workdir / "mosquitto")
        except PeerMissing as exc:
            print(f"dcud demo: {exc}", file=sys.stderr)
            return 1
        stack.callback(broker.stop)
        push_wme = ""
        ftp_root = _start_ftp(workdir, stack)
        if ftp_root is not None:  # the FTP data push (issue 5), when pyftpdlib is installed
            push_wme = f"datapush_host={ftp_root[0]}\ndatapush_prefix=DEMO\n"
        config = workdir / "dcud.toml"
        try:
            simulators = start_simulators(workdir)
            stack.callback(stop_process, simulators)
            stack.callback(stop_process, start_dlms_simulator(workdir))  # one DLMS/COSEM meter (HDLC)
        except RuntimeError as exc:
            print(f"dcud demo: {exc}", file=sys.stderr)
            return 1
        # One event loop for the whole demo: the drive simulator's processes belong to it.
        runner = stack.enter_context(asyncio.Runner())
        drives_toml = ""
        try:
            drives_toml, drives_cleanup = runner.run(start_demo_drives(workdir))
        except (OSError, PeerMissing, TimeoutError) as exc:
            print(f"dcud demo: no simulated drives ({exc})", file=sys.stderr)
        else:
            stack.callback(lambda: runner.run(drives_cleanup()))
        config.write_text(
            DEMO_TOML.format(device_id=DEVICE_ID, state_dir=workdir / "state", mqtt_url=broker.url)
            + site_toml(workdir)
            + drives_toml
        )
        # Listening ports on free loopback ports, so the demo never clashes with a real DCU's 9000-9002.
        ports = f"tm_server_port={free_port()}\ntm2.port={free_port()}\nfw_server_port={free_port()}\n"
        (workdir / "wme.conf").write_text(DEMO_WME + push_wme + ports)
        print(f"dcud demo: broker {broker.url}, files in {workdir}", flush=True)
        if ftp_root is not None:
            print(f"dcud demo: FTP data push every minute into {ftp_root[1]}", flush=True)
        print(f"dcud demo: watching dcu/{DEVICE_ID}/# (Ctrl-C stops)", flush=True)
        log_file = (workdir / "dcud.log").open("ab")
        stack.callback(log_file.close)
        daemon = subprocess.Popen(
            [sys.executable, "-m", "dcud", "run", "-c", str(config)],
            stdout=log_file,
            stderr=log_file,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

        def stop_daemon() -> None:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()

        stack.callback(stop_daemon)
        stop = asyncio.Event()

        async def main() -> None:
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGINT, stop.set)
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            drive_demo = asyncio.create_task(_enable_first_drive(broker, drives_toml))
            await _watch(broker, duration_s, stop)
            drive_demo.cancel()

        runner.run(main())
        stop_daemon()
        print(f"dcud demo: stopped (daemon exit {daemon.returncode}); daemon log: {workdir / 'dcud.log'}")
        return 0 if daemon.returncode == 0 else 1
    return 1
