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
            f"velocity={payload.get('velocity')} error={payload.get('error_text') or 'none'}"
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


def _start_ftp(workdir: Path, stack: contextlib.ExitStack) -> tuple[str, Path] | str:
    """A local FTP server for the data push: (datapush_host URL, local directory), or why there is none."""
    try:
        import pyftpdlib  # noqa: F401  (the `demo` extra; the rest of the demo works without it)
    except ImportError:
        return (
            "pyftpdlib is not installed (the `demo` extra: scripts/demo.sh installs it, "
            "or .venv/bin/pip install -e '.[demo]')"
        )
    from dcud.sim.ftp_server import start_ftp_server

    try:
        ftp = start_ftp_server(workdir / "ftp")
    except (OSError, TimeoutError) as exc:
        return f"the local FTP server did not start ({exc})"
    stack.callback(ftp.stop)
    return ftp.url("/push"), ftp.root / "push"


def closing_line(returncode: int | None, workdir: Path, kept: bool) -> str:
    """The demo's last line: where the daemon log is, or that it went with the temporary directory."""
    head = f"dcud demo: stopped (daemon exit {returncode})"
    if kept:
        return f"{head}; daemon log: {workdir / 'dcud.log'}"
    return f"{head}; its files and log were in a temporary directory, now removed (--workdir DIR keeps them)"


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
        kept = workdir is not None
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
        ftp = _start_ftp(workdir, stack)
        if not isinstance(ftp, str):  # the FTP data push, when the `demo` extra is installed
            push_wme = f"datapush_host={ftp[0]}\ndatapush_prefix=DEMO\n"
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
        where = workdir if kept else f"{workdir} (temporary: removed at the end; --workdir DIR keeps it)"
        print(f"dcud demo: broker {broker.url}, files in {where}", flush=True)
        if isinstance(ftp, str):
            print(f"dcud demo: FTP data push off: {ftp}", flush=True)
        else:
            print(f"dcud demo: FTP data push every minute into {ftp[1]}", flush=True)
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
        log_file.flush()
        if daemon.returncode != 0 and not kept:  # the log goes with the directory: show its end now
            tail = (workdir / "dcud.log").read_text(errors="replace").splitlines()[-20:]
            print("dcud demo: the daemon log ended with:", *tail, sep="\n", file=sys.stderr)
        print(closing_line(daemon.returncode, workdir, kept))
        return 0 if daemon.returncode == 0 else 1
    return 1
