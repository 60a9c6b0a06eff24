"""Simulated meter lines on ptys: IEC 62056-21 meters and M-Bus slaves, paced like a real wire.

A *simulated line* is a pty (``os.openpty()``; dcud opens the slave side, whose path is printed and
optionally symlinked) or an existing tty such as one end of a ``socat`` pty pair. Every meter of the line
hears every byte, so several meters on one line form a multidrop bus: IEC meters answer only their
address, M-Bus slaves are merged electrically by :class:`~dcud.sim.mbus_slave.MbusBusModel` (two answers
at once become a collision).

A pty has no baud rate, so the timing of the wire is modelled in software:

- bytes from the master are handed to the meter models when they would have *finished arriving* at the
  line's current rate (``bytes x bits-per-char / baud`` after they were written);
- answers start after the standard's reaction time (IEC: 200 ms, or 20 ms for a lower-case third
  manufacturer letter; M-Bus: 11 bit times) and are written in step with the wire time of each
  character, at the rate the model runs at (an IEC meter's ``SetBaud`` switches the pacing rate).

A control file (``--control FILE``, JSON ``{"silent": ["<address>", ...]}``) silences meters while the
simulator runs, for tests of meter_silent/meter_back. The configuration file format is in
``docs/meters.md`` and :func:`load_sim_config`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import math
import os
import sys
import time
import tomllib
import tty
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar

from dcud.codec.actions import Drain, Send, SetBaud
from dcud.codec.iec62056 import BccMode, DataSet, numeric_value
from dcud.codec.mbus_app import DataField
from dcud.sim.iec_meter import IecMeter
from dcud.sim.mbus_slave import MbusBusModel, MbusSlave, SlaveRecord

IEC_BITS_PER_CHAR = 10
MBUS_BITS_PER_CHAR = 11
_WRITE_SLICE_S = 0.002
"""Pacing granularity: characters due within this window go out in one write."""

SimProtocol = Literal["mbus", "iec62056-21"]

# -- configuration ---------------------------------------------------------------------------------


@dataclass
class SimMeterSpec:
    """One simulated meter (see ``docs/meters.md`` for the TOML keys)."""

    address: str
    kind: str = "electricity"
    manufacturer: str = ""
    ident: str = ""
    secondary: str = ""
    baud_char: str = "5"
    bcc: BccMode = "xor"
    base: float = 1000.0
    rate_per_h: float = 0.0
    telegrams: int = 1
    extra_lines: int = 0
    fast_reaction: bool = False
    silent: bool = False


@dataclass
class SimLineSpec:
    """One simulated line: a new pty (``link`` optional) or an existing tty (``device``)."""

    name: str
    protocol: SimProtocol
    meters: list[SimMeterSpec]
    link: str = ""
    device: str = ""
    baud: int = 0

    @property
    def line_baud(self) -> int:
        """Rate of the line at rest: 2400 for M-Bus, 300 (IEC sign-on) otherwise, unless set."""
        if self.baud:
            return self.baud
        return 2400 if self.protocol == "mbus" else 300


@dataclass
class SimConfig:
    """Every simulated line of one simulator process."""

    lines: list[SimLineSpec]
    control: str = ""


class SimConfigError(ValueError):
    """A bad simulator configuration (message names the key)."""


_METER_KEYS = {f.name for f in SimMeterSpec.__dataclass_fields__.values()}


def _meter_spec(raw: dict[str, Any], where: str) -> SimMeterSpec:
    unknown = set(raw) - _METER_KEYS
    if unknown:
        raise SimConfigError(f"{where}: unknown keys {sorted(unknown)}")
    if "address" not in raw:
        raise SimConfigError(f"{where}: address is required")
    values = dict(raw)
    values["address"] = str(values["address"])
    try:
        return SimMeterSpec(**values)
    except TypeError as exc:
        raise SimConfigError(f"{where}: {exc}") from exc


def sim_config_from_dict(data: dict[str, Any]) -> SimConfig:
    """Build a SimConfig from parsed TOML (``[[line]]`` tables with ``[[line.meter]]`` arrays)."""
    lines: list[SimLineSpec] = []
    for index, raw_line in enumerate(data.get("line", [])):
        where = f"line[{index}]"
        if not isinstance(raw_line, dict):
            raise SimConfigError(f"{where}: expected a table")
        protocol = raw_line.get("protocol", "mbus")
        if protocol not in ("mbus", "iec62056-21"):
            raise SimConfigError(f"{where}.protocol: mbus or iec62056-21, not {protocol!r}")
        meters = [_meter_spec(m, f"{where}.meter[{i}]") for i, m in enumerate(raw_line.get("meter", []))]
        if not meters:
            raise SimConfigError(f"{where}: no [[line.meter]]")
        lines.append(
            SimLineSpec(
                name=str(raw_line.get("name", f"sim-{index}")),
                protocol=protocol,
                meters=meters,
                link=str(raw_line.get("link", "")),
                device=str(raw_line.get("device", "")),
                baud=int(raw_line.get("baud", 0)),
            )
        )
    if not lines:
        raise SimConfigError("no [[line]] in the simulator configuration")
    return SimConfig(lines, control=str(data.get("control", "")))


def load_sim_config(path: Path) -> SimConfig:
    """Read a simulator TOML file; relative ``link``/``device``/``control`` paths are relative to it."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SimConfigError(f"{path}: {exc}") from exc
    config = sim_config_from_dict(data)
    base = path.parent
    for line in config.lines:
        line.link = resolve_relative(base, line.link)
        line.device = resolve_relative(base, line.device)
    config.control = resolve_relative(base, config.control)
    return config


def resolve_relative(base: Path, path: str) -> str:
    """``path`` of a simulator file as one relative to the file's directory ``base`` (empty and absolute
    paths stay as they are)."""
    return str(base / path) if path and not os.path.isabs(path) else path


# -- meter models from specs -----------------------------------------------------------------------


def _grown(spec: SimMeterSpec, factor: float = 1.0) -> float:
    """The meter's counter now: ``base`` plus ``rate_per_h`` per hour of wall-clock time."""
    if not spec.rate_per_h:
        return spec.base * factor
    return (spec.base + spec.rate_per_h * (time.time() % 1e6) / 3600.0) * factor


def iec_datasets(spec: SimMeterSpec) -> list[DataSet]:
    """The data block an IEC meter of this spec sends now."""
    energy = _grown(spec)
    sets = [
        DataSet("0.0.0", [(spec.address, None)]),
        DataSet("1.8.0", [(f"{energy:010.3f}", "kWh")]),
        DataSet("1.8.1", [(f"{energy * 0.6:010.3f}", "kWh")]),
        DataSet("1.8.2", [(f"{energy * 0.4:010.3f}", "kWh")]),
        DataSet("2.8.0", [(f"{spec.base / 10:010.3f}", "kWh")]),
        DataSet("32.7.0", [("230.1", "V")]),
        DataSet("31.7.0", [("4.20", "A")]),
    ]
    for i in range(spec.extra_lines):
        sets.append(DataSet(f"1.8.0*{i + 1:02d}", [(f"{energy - i:010.3f}", "kWh")]))
    sets.append(DataSet("F.F", [("00000000", None)]))
    return sets


def iec_expected_values(spec: SimMeterSpec) -> dict[str, float | str]:
    """What a reader should decode from a static (``rate_per_h = 0``) meter: OBIS id -> value."""
    return {ds.address: numeric_value(*ds.values[0], ds.address) for ds in iec_datasets(spec)}


def make_iec_meter(spec: SimMeterSpec) -> IecMeter:
    """An :class:`IecMeter` for the spec; the third letter is lower case for 20 ms reaction."""
    manufacturer = spec.manufacturer or ("SIm" if spec.fast_reaction else "SIM")
    return IecMeter(
        spec.address,
        manufacturer=manufacturer,
        baud_char=spec.baud_char,
        ident=spec.ident or f"DCUSIM{spec.address[-6:]}",
        datasets=lambda _now: iec_datasets(spec),
        bcc_mode=spec.bcc,
    )


_MEDIUM = {"electricity": 0x02, "gas": 0x03, "heat": 0x04, "water": 0x07, "warm water": 0x06}


def mbus_records(spec: SimMeterSpec, storage: int = 0) -> list[SlaveRecord | bytes]:
    """Records of one telegram of an M-Bus meter of this spec (values as raw integers)."""
    value = round(_grown(spec))
    i32 = DataField.INT32
    if spec.kind == "water":
        return [
            SlaveRecord(value, 0x13, i32, storage=storage),  # volume, m3 x 10^-3
            SlaveRecord(value // 1000, 0x3B, DataField.INT16, storage=storage),  # flow, m3/h x 10^-3
            SlaveRecord(1234, 0x24 + 2, i32, storage=storage),  # operating time, hours
        ]
    if spec.kind == "heat":
        return [
            SlaveRecord(value, 0x06, i32, storage=storage),  # energy, kWh
            SlaveRecord(value * 10, 0x14, i32, storage=storage),  # volume, m3 x 10^-2
            SlaveRecord(1500, 0x2B, i32, storage=storage),  # power, W
            SlaveRecord(650, 0x5A, DataField.INT16, storage=storage),  # flow temp, degC x 10^-1
            SlaveRecord(420, 0x5E, DataField.INT16, storage=storage),  # return temp, degC x 10^-1
        ]
    return [
        SlaveRecord(value, 0x04, i32, storage=storage),  # energy, Wh x 10
        SlaveRecord(2300, 0x2B, i32, storage=storage),  # power, W
    ]


def mbus_expected_values(spec: SimMeterSpec) -> list[tuple[float, str]]:
    """``(value, unit)`` per record of a static meter's first telegram, in record order."""
    value = round(spec.base)
    if spec.kind == "water":
        return [(value * 1e-3, "m3"), ((value // 1000) * 1e-3, "m3/h"), (1234 * 3600.0, "s")]
    if spec.kind == "heat":
        return [
            (value * 1e3, "Wh"),
            (value * 10 * 1e-2, "m3"),
            (1500.0, "W"),
            (65.0, "degC"),
            (42.0, "degC"),
        ]
    return [(value * 10.0, "Wh"), (2300.0, "W")]


def make_mbus_slave(spec: SimMeterSpec) -> MbusSlave:
    """An :class:`MbusSlave` for the spec (primary address from ``address`` when it is 0..250)."""
    primary = int(spec.address) if spec.address.isdigit() and len(spec.address) <= 3 else 0
    ident = spec.secondary or (spec.address if len(spec.address) == 8 else f"{10000000 + primary:08d}")
    slave = MbusSlave(
        primary_address=primary,
        ident=ident,
        manufacturer=(spec.manufacturer or "DCU")[:3].upper(),
        medium=_MEDIUM.get(spec.kind, 0x07),
        telegrams=[mbus_records(spec, storage=i) for i in range(max(1, spec.telegrams))],
    )
    return slave


# -- simulated lines -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outgoing:
    """Bytes a meter sends: at ``baud``, not before ``not_before`` (loop time)."""

    data: bytes
    baud: int
    not_before: float


class SimLine(Protocol):
    """A line's meters as seen by the pty runner."""

    bits_per_char: int

    def inbound_baud(self, data: bytes) -> int:
        """Rate at which the master's ``data`` is taken to arrive."""
        ...

    def receive(self, data: bytes, now: float) -> list[Outgoing]:
        """Bytes that finished arriving at ``now``."""
        ...

    def next_deadline(self) -> float | None:
        """Earliest timer of any meter."""
        ...

    def handle_timer(self, now: float) -> list[Outgoing]:
        """Run every expired meter timer."""
        ...

    def set_silent(self, addresses: set[str]) -> None:
        """Meters whose address is listed stop answering (until removed again)."""
        ...

    def refresh(self) -> None:
        """Bring time-dependent values up to date (called before each request is handled)."""
        ...


def _norm(address: str) -> str:
    return address.lstrip("0") or "0"


class IecSimLine:
    """IEC 62056-21 meters on one line; every meter hears every byte and answers its own address."""

    bits_per_char = IEC_BITS_PER_CHAR

    def __init__(self, specs: Sequence[SimMeterSpec], line_baud: int = 300) -> None:
        self.specs = list(specs)
        self.meters = [make_iec_meter(spec) for spec in self.specs]
        self.line_baud = line_baud
        for meter in self.meters:
            meter.initial_baud = line_baud
            meter._baud = line_baud  # the model starts at its initial rate
        self._silent: set[str] = {_norm(s.address) for s in specs if s.silent}

    def inbound_baud(self, data: bytes) -> int:
        """Sign-on requests and option selects come at the sign-on rate; a NAK and programming
        commands (``SOH``) at the data rate."""
        if data[:1] in (b"\x15", b"\x01"):
            return max(meter.baud for meter in self.meters)
        return self.line_baud

    @staticmethod
    def _run(before_baud: int, actions: Sequence[Send | Drain | SetBaud], now: float) -> list[Outgoing]:
        """Sends go out at the rate in force at their place in the batch (the model switches itself)."""
        out: list[Outgoing] = []
        baud = before_baud
        for action in actions:
            if isinstance(action, Send):
                out.append(Outgoing(action.data, baud, now))
            elif isinstance(action, SetBaud):
                baud = action.baud
        return out

    def receive(self, data: bytes, now: float) -> list[Outgoing]:
        """Feed every listening meter."""
        out: list[Outgoing] = []
        for meter in self.meters:
            if _norm(meter.address) in self._silent:
                continue
            before = meter.baud
            out += self._run(before, meter.receive_data(data, now), now)
        return out

    def next_deadline(self) -> float | None:
        """Earliest meter deadline."""
        deadlines = [d for m in self.meters if (d := m.next_deadline()) is not None]
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> list[Outgoing]:
        """Expired meter timers."""
        out: list[Outgoing] = []
        for meter in self.meters:
            deadline = meter.next_deadline()
            if deadline is not None and deadline <= now:
                before = meter.baud
                out += self._run(before, meter.handle_timer(now), deadline)
        return out

    def set_silent(self, addresses: set[str]) -> None:
        """Silence the listed addresses."""
        self._silent = {_norm(a) for a in addresses} | {_norm(s.address) for s in self.specs if s.silent}

    def refresh(self) -> None:
        """IEC datasets are computed when sent; nothing to do."""


class MbusSimLine:
    """M-Bus slaves on one line (an :class:`MbusBusModel`): answers start 11 bit times after a request."""

    bits_per_char = MBUS_BITS_PER_CHAR

    def __init__(self, specs: Sequence[SimMeterSpec], line_baud: int = 2400) -> None:
        self.specs = list(specs)
        self.slaves = [make_mbus_slave(spec) for spec in self.specs]
        for index, slave in enumerate(self.slaves):
            slave.baud = line_baud
            # Real slaves start answering at slightly different times; identical starts would let two
            # E5 acknowledgements merge into one clean E5 and hide a collision from a secondary scan.
            slave.reply_delay_bits = 11 + index % 4
        self.bus = MbusBusModel(list(self.slaves), baud=line_baud)
        self._silent: set[str] = set()
        self.set_silent(set())

    def inbound_baud(self, data: bytes) -> int:
        """The bus rate."""
        return self.bus.baud

    def receive(self, data: bytes, now: float) -> list[Outgoing]:
        """Deliver a request to the bus; merged answers after the slaves' reply delay."""
        reply = self.bus.request(data)
        if not reply:
            return []
        delay_bits = min(s.reply_delay_bits for s in self.bus.slaves) if self.bus.slaves else 11
        return [Outgoing(reply, self.bus.baud, now + delay_bits / self.bus.baud)]

    def next_deadline(self) -> float | None:
        """M-Bus slaves answer synchronously; no timers."""
        return None

    def handle_timer(self, now: float) -> list[Outgoing]:
        """No timers."""
        return []

    def set_silent(self, addresses: set[str]) -> None:
        """Take silenced slaves off the bus (by primary or secondary address)."""
        silent = {_norm(a) for a in addresses} | {_norm(s.address) for s in self.specs if s.silent}
        self._silent = silent
        self.bus.slaves = [
            slave
            for slave, spec in zip(self.slaves, self.specs, strict=True)
            if _norm(spec.address) not in silent and _norm(slave.ident) not in silent
        ]

    def refresh(self) -> None:
        """Recompute growing counters into the slaves' telegrams."""
        for slave, spec in zip(self.slaves, self.specs, strict=True):
            if spec.rate_per_h:
                slave.telegrams = [mbus_records(spec, storage=i) for i in range(max(1, spec.telegrams))]


def make_sim_line(spec: SimLineSpec) -> IecSimLine | MbusSimLine:
    """The line model for a spec."""
    if spec.protocol == "mbus":
        return MbusSimLine(spec.meters, spec.line_baud)
    return IecSimLine(spec.meters, spec.line_baud)


# -- the pty runner --------------------------------------------------------------------------------


@dataclass
class SimStats:
    """Counters of one simulated line."""

    bytes_in: int = 0
    bytes_out: int = 0
    answers: int = 0
    reopens: int = 0


@dataclass
class _Endpoint:
    fd: int = -1
    keep_fd: int = -1
    path: str = ""


class LineEndpoint(Protocol):
    """Where a simulated line lives: a new pty (symlinked at ``link`` when set) or the tty ``device``."""

    name: str
    link: str
    device: str


SpecT = TypeVar("SpecT", bound=LineEndpoint)


class SimLineRunner(Generic[SpecT]):
    """Runs one :class:`SimLine` on a pty or tty with wire-accurate pacing (module docstring).

    ``model`` may be left out for a :class:`SimLineSpec` (IEC or M-Bus meters); other simulators (the
    DLMS meters of :mod:`dcud.sim.dlms_sim`) bring their own line model.
    """

    def __init__(self, spec: SpecT, model: SimLine | None = None) -> None:
        self.spec = spec
        if model is None:
            if not isinstance(spec, SimLineSpec):
                raise TypeError("a line model is needed for anything but a SimLineSpec")
            model = make_sim_line(spec)
        self.model: SimLine = model
        self.stats = SimStats()
        self.path = ""
        self.ready = asyncio.Event()
        self._ep = _Endpoint()
        self._rx_clock = 0.0
        self._tx_free = 0.0
        self._out: asyncio.Queue[Outgoing] = asyncio.Queue(maxsize=256)
        self._wake = asyncio.Event()
        self._lost = asyncio.Event()

    # endpoint management

    def _open(self) -> None:
        if self.spec.device:
            fd = os.open(self.spec.device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
            with contextlib.suppress(OSError):
                tty.setraw(fd)
            self._ep = _Endpoint(fd, -1, self.spec.device)
        else:
            master, slave = os.openpty()
            tty.setraw(slave)
            tty.setraw(master)
            os.set_blocking(master, False)
            path = os.ttyname(slave)
            # Keeping the slave open ourselves means dcud may close and reopen it without the master
            # seeing EIO (a pty whose last slave closed hangs up).
            self._ep = _Endpoint(master, slave, path)
            if self.spec.link:
                link = Path(self.spec.link)
                link.parent.mkdir(parents=True, exist_ok=True)
                tmp = link.with_name(f".{link.name}.{os.getpid()}")
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                tmp.symlink_to(path)
                tmp.replace(link)
        self.path = self._ep.path

    def _close(self) -> None:
        for fd in (self._ep.fd, self._ep.keep_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._ep = _Endpoint()

    # byte paths

    def _on_readable(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            data = os.read(self._ep.fd, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EBADF, errno.ENXIO):
                self._lost.set()
                return
            raise
        if not data:
            self._lost.set()
            return
        self.stats.bytes_in += len(data)
        now = loop.time()
        char_s = self.model.bits_per_char / self.model.inbound_baud(data)
        # The bytes were written at once into the pty; on a wire they arrive one character time apart.
        start = max(now, self._rx_clock)
        arrive = start + len(data) * char_s
        self._rx_clock = arrive
        loop.call_at(arrive, self._deliver, data, arrive)

    def _deliver(self, data: bytes, arrived: float) -> None:
        self.model.refresh()
        self._emit(self.model.receive(data, arrived))

    def _emit(self, outgoing: Sequence[Outgoing]) -> None:
        for item in outgoing:
            with contextlib.suppress(asyncio.QueueFull):
                self._out.put_nowait(item)
        self._wake.set()

    async def _timers(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            deadline = self.model.next_deadline()
            self._wake.clear()
            if deadline is None:
                await self._wake.wait()
                continue
            delay = deadline - loop.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                continue
            self._emit(self.model.handle_timer(loop.time()))

    async def _writer(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await self._out.get()
            char_s = self.model.bits_per_char / item.baud
            start = max(loop.time(), item.not_before, self._tx_free)
            if start > loop.time():
                await asyncio.sleep(start - loop.time())
            self._tx_free = start + len(item.data) * char_s
            sent = 0
            data = item.data
            while sent < len(data):
                # Every character whose last bit is due (within a small slice) goes out now.
                elapsed = loop.time() - start + _WRITE_SLICE_S
                due = min(len(data), max(sent + 1, math.floor(elapsed / char_s)))
                await self._write_all(data[sent:due])
                sent = due
                if sent < len(data):
                    next_due = start + (sent + 1) * char_s
                    await asyncio.sleep(max(0.0, next_due - loop.time()))
            self.stats.bytes_out += len(data)
            self.stats.answers += 1

    async def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        for _ in range(10_000):
            if not view:
                return
            try:
                n = os.write(self._ep.fd, view)
            except BlockingIOError:
                await asyncio.sleep(0.001)
                continue
            except OSError:
                self._lost.set()
                return
            view = view[n:]

    def _apply_control(self, control: dict[str, Any]) -> None:
        silent = control.get("silent", [])
        if isinstance(silent, list):
            self.model.set_silent({str(a) for a in silent})

    async def run(self, control: Callable[[], dict[str, Any] | None] | None = None) -> None:
        """Serve until cancelled; a lost tty (socat killed) is reopened when its path comes back."""
        loop = asyncio.get_running_loop()
        tasks = [
            asyncio.create_task(self._timers(), name="sim:timers"),
            asyncio.create_task(self._writer(), name="sim:writer"),
        ]
        try:
            while True:
                try:
                    self._open()
                except OSError:
                    await asyncio.sleep(0.1)
                    continue
                self._lost.clear()
                loop.add_reader(self._ep.fd, self._on_readable, loop)
                self.ready.set()
                try:
                    while not self._lost.is_set():
                        if control is not None:
                            update = control()
                            if update is not None:
                                self._apply_control(update)
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(0.2):
                                await self._lost.wait()
                finally:
                    loop.remove_reader(self._ep.fd)
                    self._close()
                self.stats.reopens += 1
                await asyncio.sleep(0.1)
        finally:
            await cancel_and_wait(tasks)
            self._close()


class ControlFile:
    """Polls a JSON control file; returns its content when it changed since the last call."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None

    def __call__(self) -> dict[str, Any] | None:
        """The new content, or None when unchanged, missing or unreadable."""
        if not self.path:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            if self._stamp is not None:
                self._stamp = None
                return {"silent": []}
            return None
        stamp = (st.st_mtime, st.st_size)
        if stamp == self._stamp:
            return None
        try:
            content = json.loads(Path(self.path).read_text() or "{}")
        except (OSError, ValueError):
            return None
        self._stamp = stamp
        return content if isinstance(content, dict) else None


@dataclass
class SimHandle:
    """What :func:`serve` reports once every line is up."""

    runners: list[SimLineRunner[SimLineSpec]] = field(default_factory=list)

    def paths(self) -> dict[str, str]:
        """Line name -> tty path dcud should open."""
        return {r.spec.name: (r.spec.link or r.path) for r in self.runners}


async def serve(
    config: SimConfig,
    *,
    on_ready: Callable[[SimHandle], None] | None = None,
    stop: asyncio.Event | None = None,
) -> SimHandle:
    """Run every line of ``config`` until ``stop`` is set (or forever); ``on_ready`` once all are open."""
    handle = SimHandle([SimLineRunner(spec) for spec in config.lines])
    tasks = []
    for runner in handle.runners:
        control = ControlFile(config.control) if config.control else None
        tasks.append(asyncio.create_task(runner.run(control), name=f"sim:{runner.spec.name}"))
    try:
        for runner in handle.runners:
            await runner.ready.wait()
        if on_ready is not None:
            on_ready(handle)
        if stop is None:
            await asyncio.gather(*tasks)
        else:
            await stop.wait()
    finally:
        await cancel_and_wait(tasks)
    return handle


def quick_config(
    protocol: SimProtocol,
    addresses: Sequence[str],
    *,
    link: str = "",
    device: str = "",
    baud: int = 0,
    kind: str = "",
) -> SimConfig:
    """One line from command-line flags."""
    default_kind = "water" if protocol == "mbus" else "electricity"
    meters = [
        SimMeterSpec(address=a, kind=kind or default_kind, base=1000.0 + 111 * i)
        for i, a in enumerate(addresses)
    ]
    return SimConfig([SimLineSpec("sim-0", protocol, meters, link=link, device=device, baud=baud)])


def expand_addresses(text: str) -> list[str]:
    """``"1-3,7,12345678"`` -> ``["1", "2", "3", "7", "12345678"]``."""
    out: list[str] = []
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        if "-" in part and all(p.strip().isdigit() for p in part.split("-", 1)):
            first, last = (int(p) for p in part.split("-", 1))
            out.extend(str(n) for n in range(first, last + 1))
        else:
            out.append(part)
    return out


def run_cli(config: SimConfig) -> int:
    """``dcud sim meters``: serve, print one JSON line per simulated line, run until SIGINT/SIGTERM."""

    def announce(handle: SimHandle) -> None:
        for runner in handle.runners:
            print(
                json.dumps(
                    {
                        "line": runner.spec.name,
                        "protocol": runner.spec.protocol,
                        "path": runner.path,
                        "link": runner.spec.link or None,
                        "meters": [m.address for m in runner.spec.meters],
                    }
                ),
                flush=True,
            )
        print(json.dumps({"ready": True}), flush=True)

    return run_until_signalled(lambda stop: serve(config, on_ready=announce, stop=stop))


# -- what every simulator program runs with --------------------------------------------------------


async def cancel_and_wait(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until each has ended."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


def run_until_signalled(serve: Callable[[asyncio.Event], Awaitable[object]]) -> int:
    """A simulator's ``run_cli``: ``serve(stop)`` in a new event loop until SIGINT or SIGTERM sets
    ``stop``; returns the exit code 0."""
    import signal

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await serve(stop)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    sys.stdout.flush()
    return 0
