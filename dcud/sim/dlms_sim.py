"""``dcud sim dlms``: simulated DLMS/COSEM meters on HDLC lines (ptys or ttys) and on the TCP wrapper.

A simulator file (TOML, or JSON with the same keys) describes lines and meters::

    control = "dlms-control.json"   # optional: {"silent": [...], "clock_offset_s": {...}} at run time

    [[line]]
    name = "dlms"
    link = "dlms.tty"               # a new pty, symlinked here; or device = an existing tty
    baud = 9600                     # pace the pty like a wire at this rate (0: as fast as it goes)
    mode_e = false                  # IEC 62056-21 sign-on (300 Bd) before HDLC

    [[meter]]
    name = "em-1"
    line = "dlms"                   # HDLC on that line, at physical_address ...
    physical_address = 17
    tcp_port = 4059                 # ... and/or the wrapper on 127.0.0.1:tcp_port (0: any free port)

Each meter is a :class:`~dcud.sim.dlms_meter.DlmsMeter` (its keys: :class:`~dcud.sim.dlms_model.MeterSpec`).
On a line, every meter hears every byte and answers frames to its own physical address through its
own :class:`~dcud.codec.dlms.hdlc_server.HdlcServerLink`; the pty is run by the shared
:class:`~dcud.sim.serial_sim.SimLineRunner` (pacing, reopen after a hang-up). With ``mode_e`` each meter
first waits for the sign-on ``/?address!`` at 300 Bd, answers its mode E identification, and switches
to HDLC at the agreed rate on the option select ``ACK 2 Z 2``; after DISC or the inactivity timeout it
listens for a sign-on again. On TCP, each connection carries its own associations (one per client SAP).

The control file is read when it changes (every 0.2 s, like ``dcud sim meters``): ``silent`` lists
meter names (or physical addresses) that stop answering; ``clock_offset_s`` maps a meter name to an
offset from the host clock its clock is set to.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import tomllib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from dcud.codec.actions import Send
from dcud.codec.dlms.hdlc import HdlcParameters
from dcud.codec.dlms.hdlc_server import HdlcServerLink
from dcud.codec.dlms.transport import ApduIn, LinkDown, LinkUp
from dcud.codec.dlms.wrapper import WrapperFrame, WrapperReader, encode_wrapper
from dcud.codec.iec62056 import (
    INITIAL_BAUD,
    MODE_C_BAUD,
    REACTION_MIN_FAST_S,
    IecReceiver,
    OptionSelect,
    Request,
    address_matches,
    encode_identification,
    tx_time_s,
)
from dcud.errors import DcudError
from dcud.sim.dlms_meter import DlmsMeter
from dcud.sim.dlms_model import MeterSpec
from dcud.sim.serial_sim import (
    ControlFile,
    Outgoing,
    SimConfigError,
    SimLineRunner,
    cancel_and_wait,
    resolve_relative,
    run_until_signalled,
)

UNPACED_BAUD = 1_000_000_000
"""A rate so high that pacing costs nothing: the pty runs as fast as it can."""
BITS_PER_CHAR = 10
"""8N1 (HDLC) and 7E1 (the sign-on) both take ten bit times a character."""
OPTION_WINDOW_S = 2.2
"""How long the meter waits for the option select after its identification (IEC 62056-21 tt max)."""
CONTROL_POLL_S = 0.2
MAX_TCP_CONNECTIONS = 16
"""Connections per meter; more are closed at once."""
TCP_IDLE_TIMEOUT_S = 300.0
"""A wrapper connection that sends nothing this long is closed (meters do the same)."""


# ---------------------------------------------------------------------------------------------------
# Configuration


class LineSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One simulated HDLC line: a new pty (``link``) or an existing tty (``device``)."""

    name: str
    link: str = ""
    device: str = ""
    baud: int = 0
    mode_e: bool = False

    def __post_init__(self) -> None:
        if self.link and self.device:
            raise ValueError(f"line {self.name}: link or device, not both")
        if self.baud < 0:
            raise ValueError(f"line {self.name}: baud must not be negative")
        if self.mode_e and self.baud and self.baud not in MODE_C_BAUD.values():
            raise ValueError(f"line {self.name}: a mode E line runs at 300..19200 Bd, not {self.baud}")


class SimMeter(MeterSpec, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A meter of the simulator file: the meter's keys plus where it is reached."""

    line: str = ""
    tcp_port: int | None = None
    tcp_host: str = "127.0.0.1"
    hdlc_max_info_field: int = 128
    hdlc_window: int = 1
    inactivity_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.line and self.tcp_port is None:
            raise ValueError(f"meter {self.name}: give line (HDLC) and/or tcp_port (wrapper)")
        if self.tcp_port is not None and not 0 <= self.tcp_port <= 65535:
            raise ValueError(f"meter {self.name}: tcp_port must be 0..65535")
        if self.inactivity_timeout_s < 0:
            raise ValueError(f"meter {self.name}: inactivity_timeout_s must not be negative")
        HdlcParameters(
            self.hdlc_max_info_field, self.hdlc_max_info_field, self.hdlc_window, self.hdlc_window
        ).checked()


class DlmsSimConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Every line and meter of one simulator process."""

    line: list[LineSpec] = msgspec.field(default_factory=list)
    meter: list[SimMeter] = msgspec.field(default_factory=list)
    control: str = ""

    def __post_init__(self) -> None:
        if not self.meter:
            raise ValueError("no [[meter]] in the simulator configuration")
        lines = {line.name for line in self.line}
        if len(lines) != len(self.line):
            raise ValueError("two [[line]] share a name")
        names = [m.name for m in self.meter]
        if len(set(names)) != len(names):
            raise ValueError("two [[meter]] share a name")
        seen: set[tuple[str, int]] = set()
        for meter in self.meter:
            if meter.line and meter.line not in lines:
                raise ValueError(f"meter {meter.name}: no [[line]] named {meter.line!r}")
            if meter.line:
                if (meter.line, meter.physical_address) in seen:
                    raise ValueError(f"meter {meter.name}: physical address taken on line {meter.line}")
                seen.add((meter.line, meter.physical_address))
        ports = [m.tcp_port for m in self.meter if m.tcp_port]
        if len(set(ports)) != len(ports):
            raise ValueError("two meters share a tcp_port")


def config_from_dict(data: dict[str, Any], where: str = "simulator configuration") -> DlmsSimConfig:
    """Typed configuration from parsed TOML/JSON; SimConfigError names the key that is wrong."""
    try:
        return msgspec.convert(data, DlmsSimConfig, strict=True)
    except (msgspec.ValidationError, ValueError) as exc:
        raise SimConfigError(f"{where}: {exc}") from None


def load_config(path: Path) -> DlmsSimConfig:
    """Read a simulator file (``.json``: JSON, else TOML); relative paths are relative to it."""
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as exc:
        raise SimConfigError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise SimConfigError(f"{path}: expected a table at the top")
    config = config_from_dict(data, str(path))
    base = path.parent
    for line in config.line:
        line.link = resolve_relative(base, line.link)
        line.device = resolve_relative(base, line.device)
    config.control = resolve_relative(base, config.control)
    return config


def quick_config(
    *,
    link: str = "",
    device: str = "",
    tcp_port: int | None = None,
    baud: int = 0,
    mode_e: bool = False,
    physical_address: int = 17,
    silent: bool = False,
    control: str = "",
) -> DlmsSimConfig:
    """One meter from command-line flags (HDLC when ``link``/``device`` is given, TCP with ``tcp_port``)."""
    lines = (
        [LineSpec(name="dlms", link=link, device=device, baud=baud, mode_e=mode_e)] if link or device else []
    )
    try:
        meter = SimMeter(
            name="dlms-1",
            line="dlms" if lines else "",
            tcp_port=tcp_port,
            physical_address=physical_address,
            silent=silent,
        )
        return DlmsSimConfig(line=lines, meter=[meter], control=control)
    except ValueError as exc:
        raise SimConfigError(str(exc)) from None


# ---------------------------------------------------------------------------------------------------
# Mode E sign-on, meter side


_SIGN_ON = "sign_on"
_IDENT_DUE = "ident_due"
_WAIT_OPTION = "wait_option"
_HDLC = "hdlc"


class ModeEServer:
    """The meter side of the mode E sign-on (IEC 62056-21 then HDLC), sans-I/O.

    At 300 Bd it waits for ``/?address!`` (its own address or the general request), answers
    ``/DCu<Z>\\2<ident>`` after the 20 ms reaction time (lower-case third letter), and on ``ACK 2 Z 2``
    switches to rate Z and to HDLC (:attr:`hdlc` true). Anything else, or no option select within
    :data:`OPTION_WINDOW_S`, and it listens for a sign-on again. :meth:`back_to_sign_on` after the HDLC
    link ended.
    """

    def __init__(self, address: str, ident: str, hdlc_baud: int) -> None:
        self.address = address
        baud_char = next((c for c, rate in MODE_C_BAUD.items() if rate == hdlc_baud), "5")
        self.hdlc_baud = MODE_C_BAUD[baud_char]
        self.identification = encode_identification("DCu", baud_char, ident[:16], ("2",))
        self.baud = INITIAL_BAUD
        self.sign_ons = 0
        self._state = _SIGN_ON
        self._deadline: float | None = None
        self._receiver = IecReceiver(side="meter")

    @property
    def hdlc(self) -> bool:
        """Whether the line runs HDLC now."""
        return self._state == _HDLC

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` is due."""
        return self._deadline

    def receive_data(self, data: bytes, now: float) -> list[bytes]:
        """Sign-on bytes in; what to send (nothing: the answer is timed)."""
        self._receiver.receive_data(data)
        for _ in range(len(data) + 1):
            try:
                message = self._receiver.next_message()
            except DcudError:
                continue
            if message is None:
                break
            if isinstance(message, Request) and self._state in (_SIGN_ON, _WAIT_OPTION):
                if address_matches(message.address, self.address):
                    self._state = _IDENT_DUE
                    self._deadline = now + REACTION_MIN_FAST_S
            elif isinstance(message, OptionSelect) and self._state == _WAIT_OPTION:
                if message.protocol_control == "2" and message.mode_control == "2" and message.baud:
                    self._state = _HDLC
                    self._deadline = None
                    self.baud = message.baud
                    self.sign_ons += 1
                    self._receiver = IecReceiver(side="meter")
                else:
                    self.back_to_sign_on()
        return []

    def handle_timer(self, now: float) -> list[bytes]:
        """Send the identification when due, or give up waiting for the option select."""
        if self._deadline is None or now < self._deadline:
            return []
        if self._state == _IDENT_DUE:
            self._state = _WAIT_OPTION
            self._deadline = now + tx_time_s(len(self.identification), self.baud) + OPTION_WINDOW_S
            return [self.identification]
        self.back_to_sign_on()
        return []

    def back_to_sign_on(self) -> None:
        """Listen for a sign-on at 300 Bd again."""
        self._state = _SIGN_ON
        self._deadline = None
        self.baud = INITIAL_BAUD
        self._receiver = IecReceiver(side="meter")


# ---------------------------------------------------------------------------------------------------
# HDLC lines


@dataclass
class _LineMeter:
    meter: DlmsMeter
    link: HdlcServerLink
    channel: Hashable
    mode_e: ModeEServer | None = None


class DlmsSimLine:
    """The DLMS meters of one line, as the :class:`~dcud.sim.serial_sim.SimLineRunner` drives them."""

    bits_per_char = BITS_PER_CHAR

    def __init__(self, spec: LineSpec, meters: Sequence[tuple[SimMeter, DlmsMeter]]) -> None:
        self.spec = spec
        self.meters: list[_LineMeter] = []
        for meter_spec, meter in meters:
            link = HdlcServerLink(
                logical_device=meter_spec.logical_device,
                physical_address=meter_spec.physical_address,
                client_saps=[c.sap for c in meter_spec.clients],
                parameters=HdlcParameters(
                    meter_spec.hdlc_max_info_field,
                    meter_spec.hdlc_max_info_field,
                    meter_spec.hdlc_window,
                    meter_spec.hdlc_window,
                ),
                accept_one_byte_address=len(meters) == 1,
                inactivity_timeout_s=meter_spec.inactivity_timeout_s or None,
            )
            mode_e = None
            if spec.mode_e:
                mode_e = ModeEServer(
                    meter_spec.iec_address or meter_spec.serial, f"DLMS{meter_spec.serial}", spec.baud or 9600
                )
            channel = ("hdlc", spec.name, meter_spec.physical_address)
            self.meters.append(_LineMeter(meter, link, channel, mode_e))

    def _rate(self, baud: int) -> int:
        return baud if self.spec.baud else UNPACED_BAUD

    def _meter_baud(self, item: _LineMeter) -> int:
        if item.mode_e is not None:
            return self._rate(item.mode_e.baud)
        return self._rate(self.spec.baud)

    def inbound_baud(self, data: bytes) -> int:
        """The rate the master's bytes are taken to arrive at (the fastest meter's on a multidrop line)."""
        return max((self._meter_baud(m) for m in self.meters), default=self._rate(self.spec.baud))

    def receive(self, data: bytes, now: float) -> list[Outgoing]:
        """Bytes that finished arriving at ``now``, to every meter of the line."""
        out: list[Outgoing] = []
        for item in self.meters:
            if item.meter.silent:
                continue
            if item.mode_e is not None and not item.mode_e.hdlc:
                sends = item.mode_e.receive_data(data, now)
                out += [Outgoing(s, self._meter_baud(item), now) for s in sends]
                continue
            out += self._link_events(item, item.link.receive_data(data, now), now)
        return out

    def _link_events(self, item: _LineMeter, events: list[object], now: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        baud = self._meter_baud(item)
        for event in events:
            if isinstance(event, Send):
                out.append(Outgoing(event.data, baud, now))
            elif isinstance(event, LinkUp | LinkDown):
                item.meter.channel_closed(item.channel)
            elif isinstance(event, ApduIn):
                client_sap = item.link.client_sap
                if client_sap is None:
                    continue
                response = item.meter.handle(item.channel, client_sap, event.apdu)
                if response is not None and item.link.connected:
                    out += [
                        Outgoing(s.data, baud, now)
                        for s in item.link.send_apdu(response, now)
                        if isinstance(s, Send)
                    ]
        if (
            item.mode_e is not None
            and item.mode_e.hdlc
            and not item.link.connected
            and any(isinstance(e, LinkDown) for e in events)
        ):
            item.mode_e.back_to_sign_on()
        return out

    def next_deadline(self) -> float | None:
        """The earliest timer of any meter (inactivity, partial frames, the sign-on)."""
        deadlines = [
            d
            for item in self.meters
            for d in (item.link.next_deadline(), self._mode_e_deadline(item))
            if d is not None
        ]
        return min(deadlines) if deadlines else None

    @staticmethod
    def _mode_e_deadline(item: _LineMeter) -> float | None:
        return item.mode_e.next_deadline() if item.mode_e is not None else None

    def handle_timer(self, now: float) -> list[Outgoing]:
        """Run every expired timer."""
        out: list[Outgoing] = []
        for item in self.meters:
            deadline = item.link.next_deadline()
            if deadline is not None and now >= deadline:
                out += self._link_events(item, item.link.handle_timer(now), now)
            if item.mode_e is not None:
                deadline = item.mode_e.next_deadline()
                if deadline is not None and now >= deadline:
                    sends = item.mode_e.handle_timer(now)
                    out += [Outgoing(s, self._meter_baud(item), now) for s in sends]
        return out

    def set_silent(self, addresses: set[str]) -> None:
        """Meters named (or whose physical address is listed) stop answering."""
        for item in self.meters:
            spec = item.meter.spec
            item.meter.silent = spec.silent or bool({spec.name, str(spec.physical_address)} & addresses)

    def refresh(self) -> None:
        """Values are computed when asked for; nothing to do."""


# ---------------------------------------------------------------------------------------------------
# The TCP wrapper


class WrapperServer:
    """The IEC 62056-47 wrapper of one meter on TCP: each connection its own channel of associations."""

    def __init__(self, spec: SimMeter, meter: DlmsMeter) -> None:
        self.spec = spec
        self.meter = meter
        self.port = 0
        self.connections = 0
        self.refused = 0
        self._server: asyncio.Server | None = None
        self._ids = itertools.count(1)
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        """Listen; returns the bound port."""
        self._server = await asyncio.start_server(self._serve, self.spec.tcp_host, self.spec.tcp_port or 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= MAX_TCP_CONNECTIONS:
            self.refused += 1
            writer.close()
            return
        self.connections += 1
        self._writers.add(writer)
        channel = ("tcp", self.spec.name, next(self._ids))
        frames = WrapperReader()
        self.meter.record("connect", transport="tcp", channel=channel[2])
        try:
            while True:
                try:
                    async with asyncio.timeout(TCP_IDLE_TIMEOUT_S):
                        data = await reader.read(4096)
                except TimeoutError:
                    break
                if not data:
                    break
                frames.receive_data(data)
                for _ in range(len(data) + 1):
                    frame = frames.next_frame()
                    if frame is None:
                        break
                    if frame.destination != self.spec.logical_device:
                        self.meter.record("foreign_frame", wport=frame.destination)
                        continue
                    response = self.meter.handle(channel, frame.source, frame.apdu)
                    if response is not None:
                        writer.write(encode_wrapper(WrapperFrame(frame.destination, frame.source, response)))
                        await writer.drain()
        except (DcudError, OSError) as exc:
            self.meter.record("disconnect", transport="tcp", channel=channel[2], error=str(exc)[:200])
        finally:
            self.connections -= 1
            self._writers.discard(writer)
            self.meter.channel_closed(channel)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


# ---------------------------------------------------------------------------------------------------
# Running it


@dataclass
class DlmsSimHandle:
    """What :func:`serve` reports once every line and port is up."""

    config: DlmsSimConfig
    meters: dict[str, DlmsMeter] = field(default_factory=dict)
    runners: dict[str, SimLineRunner[LineSpec]] = field(default_factory=dict)
    servers: dict[str, WrapperServer] = field(default_factory=dict)

    def path(self, line: str) -> str:
        """The tty a client opens for ``line`` (the link when there is one)."""
        runner = self.runners[line]
        return runner.spec.link or runner.path

    def tcp_port(self, meter: str) -> int:
        """The bound wrapper port of ``meter``."""
        return self.servers[meter].port

    def announcements(self) -> list[dict[str, Any]]:
        """One JSON-ready line per meter: where it is reached."""
        out: list[dict[str, Any]] = []
        for spec in self.config.meter:
            item: dict[str, Any] = {
                "meter": spec.name,
                "physical_address": spec.physical_address,
                "logical_device": spec.logical_device,
                "system_title": spec.system_title,
            }
            if spec.line:
                runner = self.runners[spec.line]
                item |= {"line": spec.line, "path": runner.path, "link": runner.spec.link or None}
                item["mode_e"] = runner.spec.mode_e
            if spec.name in self.servers:
                item["tcp"] = f"{spec.tcp_host}:{self.servers[spec.name].port}"
            out.append(item)
        return out


class _Control:
    """Applies the control file to every meter when it changes."""

    def __init__(self, path: str, handle: DlmsSimHandle) -> None:
        self.file = ControlFile(path)
        self.handle = handle

    def apply(self, content: dict[str, Any]) -> None:
        silent = content.get("silent", [])
        names = {str(a) for a in silent} if isinstance(silent, list) else set()
        offsets = content.get("clock_offset_s", {})
        for meter in self.handle.meters.values():
            spec = meter.spec
            meter.silent = spec.silent or bool({spec.name, str(spec.physical_address)} & names)
            offset = offsets.get(spec.name) if isinstance(offsets, dict) else None
            if isinstance(offset, int | float) and not isinstance(offset, bool):
                meter.clock.set(meter.clock.host() + float(offset))
                meter.record("clock_set", was=None, to=None, offset_s=float(offset), by="control file")

    async def run(self) -> None:
        while True:
            update = self.file()
            if update is not None:
                self.apply(update)
            await asyncio.sleep(CONTROL_POLL_S)


async def serve(
    config: DlmsSimConfig,
    *,
    clock: Callable[[], float] = time.time,
    on_ready: Callable[[DlmsSimHandle], None] | None = None,
    stop: asyncio.Event | None = None,
) -> DlmsSimHandle:
    """Run every line and wrapper port of ``config`` until ``stop`` is set (or forever).

    ``clock`` is the host clock the meters' clocks run from (tests inject theirs); ``on_ready`` is
    called once every pty is open and every port listens.
    """
    handle = DlmsSimHandle(config)
    for spec in config.meter:
        handle.meters[spec.name] = DlmsMeter(spec, clock=clock)
    tasks: list[asyncio.Task[None]] = []
    try:
        for line in config.line:
            members = [(s, handle.meters[s.name]) for s in config.meter if s.line == line.name]
            runner: SimLineRunner[LineSpec] = SimLineRunner(line, DlmsSimLine(line, members))
            handle.runners[line.name] = runner
            tasks.append(asyncio.create_task(runner.run(), name=f"sim-dlms:{line.name}"))
        for spec in config.meter:
            if spec.tcp_port is not None:
                server = WrapperServer(spec, handle.meters[spec.name])
                await server.start()
                handle.servers[spec.name] = server
        if config.control:
            tasks.append(asyncio.create_task(_Control(config.control, handle).run(), name="sim-dlms:control"))
        for runner in handle.runners.values():
            await runner.ready.wait()
        if on_ready is not None:
            on_ready(handle)
        if stop is None:
            await asyncio.gather(*tasks) if tasks else await asyncio.Event().wait()
        else:
            await stop.wait()
    finally:
        await cancel_and_wait(tasks)
        for server in handle.servers.values():
            await server.close()
    return handle


def run_cli(config: DlmsSimConfig) -> int:
    """``dcud sim dlms``: serve, print one JSON line per meter and ``{"ready": true}``, run until
    SIGINT/SIGTERM."""

    def announce(handle: DlmsSimHandle) -> None:
        for item in handle.announcements():
            print(json.dumps(item), flush=True)
        print(json.dumps({"ready": True}), flush=True)

    return run_until_signalled(lambda stop: serve(config, on_ready=announce, stop=stop))


__all__ = [
    "DlmsSimConfig",
    "DlmsSimHandle",
    "DlmsSimLine",
    "LineSpec",
    "ModeEServer",
    "SimMeter",
    "WrapperServer",
    "config_from_dict",
    "load_config",
    "quick_config",
    "run_cli",
    "serve",
]
