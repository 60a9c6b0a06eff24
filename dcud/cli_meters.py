"""``dcud read``, ``dcud scan``, ``dcud decode`` and ``dcud sim meters``: the meter commands of the CLI.

``dcud read`` and ``dcud scan`` open the line themselves (exclusive ``flock`` on the tty, the same lock
the daemon takes): while ``dcud run`` owns the line they fail at once with "line busy" instead of
garbling its traffic. ``dcud read --via-mqtt`` asks the running daemon instead (``cmd/read`` through its
lease) and needs the ``[mqtt]`` table. Exit codes are chosen by ``dcud.__main__``: these functions
return 0 or raise a :class:`~dcud.errors.DcudError` (exit 1).
"""

from __future__ import annotations

import asyncio
import json
import string
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TextIO

from dcud.config.loader import LoadedConfig, load_config
from dcud.config.model import LineConfig, MeterConfig
from dcud.errors import DcudError, TransportError
from dcud.service.line import LeasedPort, Line
from dcud.transport.serial import SerialPort


class CliError(DcudError):
    """A command-line request that cannot be served (unknown meter, line busy...)."""


def _meter(config: LoadedConfig, name: str) -> tuple[MeterConfig, LineConfig]:
    for meter in config.toml.meter:
        if meter.name == name:
            for line in config.toml.line:
                if line.name == meter.line:
                    return meter, line
    known = ", ".join(m.name for m in config.toml.meter) or "none"
    raise CliError(f'no meter named "{name}" in {config.path} (known: {known})')


def _line(config: LoadedConfig, name: str) -> LineConfig:
    for line in config.toml.line:
        if line.name == name:
            return line
    known = ", ".join(line.name for line in config.toml.line) or "none"
    raise CliError(f'no line named "{name}" in {config.path} (known: {known})')


@asynccontextmanager
async def open_line(line_cfg: LineConfig, owner: str) -> AsyncIterator[LeasedPort]:
    """Open a line directly (no daemon) and lease it to ``owner``."""
    port = SerialPort(
        line_cfg.device,
        line_cfg.effective_baud,
        line_cfg.effective_framing,
        echo_filter=line_cfg.echo_filter,
        exclusive=True,
    )
    try:
        await port.open()
    except TransportError as exc:
        cause = exc.__cause__
        if "lock" in str(exc).lower() or (isinstance(cause, OSError) and cause.errno == 11):
            raise CliError(
                f"line {line_cfg.name} ({line_cfg.device}) is in use - is the daemon running? "
                "It owns the line: use `dcud read --via-mqtt`, or stop it first."
            ) from exc
        raise
    line = Line(line_cfg)
    line.attach(port)
    try:
        async with line.lease(owner, "cli", timeout_s=5.0) as leased:
            yield leased
    finally:
        line.detach("closed")


# -- read ------------------------------------------------------------------------------------------


async def read_direct(config: LoadedConfig, name: str) -> dict[str, Any]:
    """One readout on a line this process opens itself; the reading document."""
    from dcud.service.meter_read import ReadDefaults, read_meter, reading_payload

    if any(m.name == name and m.protocol == "dlms" for m in config.toml.meter):
        from dcud.cli_dlms import read_dlms  # DLMS/COSEM: dcud.cli_dlms (HDLC line or TCP)

        return await read_dlms(config, name)
    meter, line_cfg = _meter(config, name)
    iec_max_baud = None
    try:
        iec_max_baud = config.params.get_opt_int("datapush_iec_readout_baudrate")
    except (KeyError, TypeError):
        iec_max_baud = None
    async with open_line(line_cfg, f"cli:{name}") as port:
        reading = await read_meter(port, meter, line_cfg, ReadDefaults(iec_max_baud=iec_max_baud))
    return reading_payload(reading, seq=0, line=line_cfg.name, address=meter.address, trigger="cli")


async def read_via_mqtt(config: LoadedConfig, name: str, timeout_s: float) -> dict[str, Any]:
    """Ask the running daemon (``<p>/cmd/read``) and return its reading (raises its error)."""
    import aiomqtt

    from dcud.config.mqtt_url import parse_mqtt_url

    if config.toml.mqtt is None:
        raise CliError("--via-mqtt needs an [mqtt] table in the configuration")
    url = parse_mqtt_url(config.toml.mqtt.url)
    request_id = uuid.uuid4().hex
    topic = f"{config.topic_prefix}/cmd/read"
    try:
        async with aiomqtt.Client(
            url.host,
            url.port,
            username=url.username,
            password=url.password,
            identifier=f"dcud-cli-{request_id}",
        ) as client:
            await client.subscribe(f"{topic}/reply", qos=1)
            await client.publish(topic, json.dumps({"meter": name, "id": request_id}), qos=1)
            async with asyncio.timeout(timeout_s):
                async for message in client.messages:
                    payload = message.payload
                    if not isinstance(payload, bytes | bytearray):
                        continue
                    with_id = json.loads(payload)
                    if not isinstance(with_id, dict) or with_id.get("id") != request_id:
                        continue
                    if with_id.get("ok"):
                        result: dict[str, Any] = with_id.get("result", {})
                        return result
                    error = with_id.get("error") or {}
                    raise CliError(f"daemon refused: {error.get('type')}: {error.get('message')}")
    except TimeoutError as exc:
        raise CliError(f"no reply on {topic}/reply within {timeout_s} s (is the daemon running?)") from exc
    except aiomqtt.MqttError as exc:
        raise CliError(f"MQTT: {exc}") from exc
    raise CliError("MQTT connection closed before the reply came")


def cmd_read(config_path: str, meter: str, via_mqtt: bool, timeout_s: float, out: TextIO = sys.stdout) -> int:
    """``dcud read``."""
    config = load_config(Path(config_path))
    coro = read_via_mqtt(config, meter, timeout_s) if via_mqtt else read_direct(config, meter)
    document = asyncio.run(coro)
    json.dump(document, out, indent=1)
    out.write("\n")
    return 0


# -- scan ------------------------------------------------------------------------------------------


class _Progress:
    """A one-line progress report on stderr (only on a terminal)."""

    def __init__(self, stream: TextIO, total: int | None) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.total = total
        self._last = 0.0

    def update(self, session: Any) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        probes = getattr(session, "probes", 0)
        found = len(getattr(session, "_found", []))
        if self.total:
            width = 30
            filled = min(width, int(width * probes / self.total))
            bar = "#" * filled + "." * (width - filled)
            text = f"[{bar}] {probes}/{self.total} probing {session.progress:<16} found {found}"
        else:
            text = f"probes {probes}  probing {session.progress:<16} found {found}"
        self.stream.write("\r" + text)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 78 + "\r")
            self.stream.flush()


async def scan_direct(
    line_cfg: LineConfig, mode: str, first: int, last: int, stream: TextIO
) -> dict[str, Any]:
    """An M-Bus scan on a line this process opens itself."""
    from dcud.codec.mbus_session import MbusScan, MbusScanResult
    from dcud.service.polling import scan_document
    from dcud.service.session_runner import run_session

    if line_cfg.kind != "mbus":
        raise CliError(f"line {line_cfg.name} is a {line_cfg.kind} line; scans are for M-Bus lines")
    if mode == "primary":
        session: MbusScan = MbusScan.primary(first, last, baud=line_cfg.effective_baud)
        total: int | None = last - first + 1
    else:
        session = MbusScan.secondary(baud=line_cfg.effective_baud)
        total = None
    progress = _Progress(stream, total)
    started = time.monotonic()
    try:
        async with open_line(line_cfg, f"cli:scan-{mode}") as port:
            result: MbusScanResult = await run_session(session, port, on_progress=progress.update)
    finally:
        progress.close()
    return {
        "line": line_cfg.name,
        "mode": mode,
        "duration_s": round(time.monotonic() - started, 1),
        **scan_document(result),
    }


def cmd_scan(
    config_path: str, line: str, *, mode: str, first: int, last: int, out: TextIO = sys.stdout
) -> int:
    """``dcud scan``."""
    config = load_config(Path(config_path))
    document = asyncio.run(scan_direct(_line(config, line), mode, first, last, sys.stderr))
    json.dump(document, out, indent=1)
    out.write("\n")
    return 0


# -- decode ----------------------------------------------------------------------------------------

_HEX_TEXT = set(string.hexdigits) | set(string.whitespace) | {":", ","}


def capture_bytes(data: bytes) -> bytes:
    """Hex text (``68 3C 3C 68 ...``; whitespace, ``:``/``,`` separators and ``0x`` allowed), else raw."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return data
    compact = text.replace("0x", "").replace("0X", "")
    if compact.strip() and set(compact) <= _HEX_TEXT:
        digits = "".join(ch for ch in compact if ch in string.hexdigits)
        if len(digits) % 2 == 0:
            return bytes.fromhex(digits)
    return data


def decode_mbus(data: bytes) -> dict[str, Any]:
    """Every frame of an M-Bus capture, RSP_UD frames decoded to records."""
    from dcud.codec.mbus import Garbage, MbusLinkParser
    from dcud.codec.mbus_app import decode_telegram

    parser = MbusLinkParser()
    parser.receive_data(data)
    items: list[dict[str, Any]] = []
    events = [*parser.events(), *parser.flush()]
    errors = 0
    for event in events:
        if isinstance(event, Garbage):
            errors += 1
            items.append({"type": "garbage", "bytes": event.size_bytes, "head": event.head.hex(" ").upper()})
            continue
        entry: dict[str, Any] = {
            "type": event.kind.name.lower(),
            "control": f"{event.control:02X}",
            "address": event.address,
            "ci": f"{event.ci:02X}" if event.ci is not None else None,
            "from_master": event.from_master,
        }
        if event.is_rsp_ud:
            try:
                entry["telegram"] = decode_telegram(event).to_json()
            except DcudError as exc:
                errors += 1
                entry["error"] = {"type": type(exc).__name__, "message": str(exc)}
        items.append(entry)
    return {"protocol": "mbus", "bytes": len(data), "frames": items, "errors": errors}


def decode_iec(data: bytes, bcc: str = "xor", p1: bool = False) -> dict[str, Any]:
    """Every message of an IEC 62056-21 capture (or DSMR P1 telegrams with ``p1``)."""
    from dcud.codec.iec62056 import (
        BCC_MODES,
        DataMessage,
        Identification,
        IecReceiver,
        P1Telegram,
        dataset_values,
    )

    mode = next((m for m in BCC_MODES if m == bcc), None)
    if mode is None:
        raise CliError(f"--bcc must be one of {', '.join(BCC_MODES)}")
    receiver = IecReceiver(side="p1" if p1 else "master", bcc_mode=mode)
    receiver.receive_data(data)
    items: list[dict[str, Any]] = []
    errors = 0
    for _ in range(100_000):
        try:
            msg = receiver.next_message()
        except DcudError as exc:
            errors += 1
            items.append({"type": "error", "error": type(exc).__name__, "message": str(exc)})
            continue
        if msg is None:
            break
        if isinstance(msg, Identification):
            items.append(
                {
                    "type": "identification",
                    "manufacturer": msg.manufacturer,
                    "mode": msg.mode,
                    "baud": msg.baud,
                    "ident": msg.ident,
                    "escapes": list(msg.escapes),
                }
            )
        elif isinstance(msg, DataMessage):
            items.append(
                {
                    "type": "data",
                    "bcc_ok": msg.bcc_ok,
                    "readout": msg.readout,
                    "values": dataset_values(msg.datasets),
                }
            )
        elif isinstance(msg, P1Telegram):
            items.append(
                {
                    "type": "p1",
                    "ident": msg.ident.ident,
                    "crc": f"{msg.crc:04X}" if msg.crc is not None else None,
                    "values": dataset_values(msg.datasets),
                }
            )
        else:
            items.append({"type": type(msg).__name__.lower()})
    if receiver.in_message:
        errors += 1
        items.append({"type": "error", "error": "Incomplete", "message": "capture ends inside a message"})
    return {"protocol": "iec62056-21", "bytes": len(data), "messages": items, "errors": errors}


def cmd_decode(protocol: str, source: str, bcc: str, p1: bool, out: TextIO = sys.stdout) -> int:
    """``dcud decode``: exit 0 when something decoded without errors, else raise (exit 1)."""
    if source == "-":
        raw = sys.stdin.buffer.read()
    else:
        try:
            raw = Path(source).read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read {source}: {exc.strerror}") from exc
    data = capture_bytes(raw)
    document = decode_mbus(data) if protocol == "mbus" else decode_iec(data, bcc, p1)
    json.dump(document, out, indent=1, default=str)
    out.write("\n")
    decoded = document.get("frames") or document.get("messages") or []
    if document["errors"] or not decoded:
        raise CliError(f"{document['errors']} error(s) decoding {source}" if decoded else "nothing decoded")
    return 0


# -- sim -------------------------------------------------------------------------------------------


def cmd_sim_meters(
    config: str | None,
    *,
    protocol: str,
    addresses: str,
    link: str,
    device: str,
    baud: int,
    control: str,
) -> int:
    """``dcud sim meters``."""
    from dcud.sim.serial_sim import (
        SimConfigError,
        expand_addresses,
        load_sim_config,
        quick_config,
        run_cli,
    )

    try:
        if config:
            sim_config = load_sim_config(Path(config))
        else:
            if not addresses:
                raise CliError("give --config FILE, or --protocol and --addresses")
            sim_config = quick_config(
                "mbus" if protocol == "mbus" else "iec62056-21",
                expand_addresses(addresses),
                link=link,
                device=device,
                baud=baud,
            )
    except SimConfigError as exc:
        raise CliError(str(exc)) from exc
    if control:
        sim_config.control = control
    return run_cli(sim_config)


def cmd_sim_dlms(args: Any) -> int:
    """``dcud sim dlms`` from parsed arguments (a file, or one meter from flags)."""
    from dcud.sim.dlms_sim import load_config as load_sim_config
    from dcud.sim.dlms_sim import quick_config, run_cli
    from dcud.sim.serial_sim import SimConfigError

    try:
        if args.sim_config:
            config = load_sim_config(Path(args.sim_config))
            if args.control:
                config.control = args.control
        else:
            if not (args.link or args.device or args.tcp_port is not None):
                raise CliError("give --config FILE, or --link/--device (HDLC) and/or --tcp-port (wrapper)")
            config = quick_config(
                link=args.link,
                device=args.device,
                tcp_port=args.tcp_port,
                baud=args.baud,
                mode_e=args.mode_e,
                physical_address=args.physical_address,
                silent=args.silent,
                control=args.control,
            )
    except SimConfigError as exc:
        raise CliError(str(exc)) from exc
    try:
        return run_cli(config)
    except OSError as exc:  # a port in use, a link that cannot be made
        raise CliError(f"cannot start the DLMS simulator: {exc}") from exc
