"""Digital levels: file and GPIO sources, a GPIO output, debounce and the watcher loop.

Shared by the power monitor (``[power]``, :mod:`dcud.service.power`), the digital inputs (``[[input]]``,
:mod:`dcud.service.inputs`) and the relay output (``[relay]``, :mod:`dcud.service.outputs`), so that
there is one way to read a contact, one debounce and one GPIO uAPI binding.

Sources
    :class:`FileSource`: a sysfs-style file holding an integer (non-zero = high), re-opened at every read
    and polled. :class:`GpioSource`: one line of a GPIO chip through the kernel's character device (GPIO
    v2 uAPI, Linux >= 5.10), driven with plain ``ioctl`` calls (no library, so no libgpiod v1/v2 API split
    to track); the line is requested as an input with edge events on both edges and the event fd wakes
    the watcher at once (polling remains the fallback). ``active_low`` inverts either source.

Debounce
    A new level is accepted once it has been stable for ``debounce_s`` (sampled at the poll interval and
    once more exactly at the deadline): an input that flaps faster than that produces no change at all,
    one that settles produces exactly one. Latency is at most ``poll_interval_s + debounce_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final, Literal, Protocol

# -- debounce (pure) -------------------------------------------------------------------------------


class Debouncer:
    """Accepts a new level once it has been stable for ``debounce_s`` (explicit clock, no I/O)."""

    def __init__(self, debounce_s: float, initial: bool | None) -> None:
        self.debounce_s = debounce_s
        self.accepted = initial
        self._candidate: bool | None = None
        self._since = 0.0

    def update(self, level: bool, now: float) -> bool | None:
        """Feed one sample taken at ``now``; returns the newly accepted level, else None."""
        if self.accepted is None:
            self.accepted = level
            return None
        if level == self.accepted:
            self._candidate = None
            return None
        if level != self._candidate:
            self._candidate = level
            self._since = now
        if now - self._since >= self.debounce_s:
            self.accepted = level
            self._candidate = None
            return level
        return None

    def deadline(self) -> float | None:
        """When the pending candidate level would be accepted, or None when nothing is pending."""
        return None if self._candidate is None else self._since + self.debounce_s


# -- sources ---------------------------------------------------------------------------------------


class LevelSource(Protocol):
    """Where a level comes from (a power-fail input, a door contact...)."""

    def read(self) -> bool | None:
        """True = high (active), False = low, None = cannot be read right now."""
        ...

    async def wait(self, timeout_s: float) -> None:
        """Return after ``timeout_s``, or earlier when the source signals a change."""
        ...

    def close(self) -> None:
        """Release the file descriptor(s)."""
        ...


class FileSource:
    """A sysfs-style file holding an integer, re-opened at every read (sysfs and atomic renames work)."""

    def __init__(self, path: str, active_low: bool = False) -> None:
        self.path = path
        self.active_low = active_low
        self.last_error = ""

    def read(self) -> bool | None:
        """Read and parse the file (a few microseconds on sysfs; never blocks on a device)."""
        try:
            with open(self.path, "rb") as handle:
                text = handle.read(64).strip()
            present = int(text) != 0
        except (OSError, ValueError) as exc:
            self.last_error = repr(exc)
            return None
        self.last_error = ""
        return present != self.active_low

    async def wait(self, timeout_s: float) -> None:
        """Plain sleep: a file gives no change notification worth its cost here."""
        await asyncio.sleep(timeout_s)

    def close(self) -> None:
        """Nothing to release."""


# GPIO character device, v2 uAPI (include/uapi/linux/gpio.h).
_GPIO_V2_LINES_MAX: Final = 64
_GPIO_V2_LINE_NUM_ATTRS_MAX: Final = 10
_GPIO_V2_LINE_FLAG_INPUT: Final = 1 << 2
_GPIO_V2_LINE_FLAG_OUTPUT: Final = 1 << 3
_GPIO_V2_LINE_FLAG_EDGE_RISING: Final = 1 << 4
_GPIO_V2_LINE_FLAG_EDGE_FALLING: Final = 1 << 5
_GPIO_V2_LINE_ATTR_ID_OUTPUT_VALUES: Final = 2
_LINE_ATTR = struct.Struct("=IIQQ")  # struct gpio_v2_line_config_attribute: attr {id, padding, values}, mask
_LINE_CONFIG = struct.Struct(f"=QI5I{_LINE_ATTR.size * _GPIO_V2_LINE_NUM_ATTRS_MAX}s")
_LINE_REQUEST = struct.Struct(f"={_GPIO_V2_LINES_MAX}I32s{_LINE_CONFIG.size}sII5Ii")
_LINE_VALUES = struct.Struct("=QQ")
_LINE_EVENT_SIZE: Final = 48  # struct gpio_v2_line_event


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (0xB4 << 8) | nr


GPIO_V2_GET_LINE_IOCTL: Final = _iowr(0x07, _LINE_REQUEST.size)
GPIO_V2_LINE_GET_VALUES_IOCTL: Final = _iowr(0x0E, _LINE_VALUES.size)
GPIO_V2_LINE_SET_VALUES_IOCTL: Final = _iowr(0x0F, _LINE_VALUES.size)


def gpio_line_request(offset: int, consumer: str, edges: bool) -> bytearray:
    """The ``struct gpio_v2_line_request`` (592 bytes) for one input line, optionally with edge events."""
    flags = _GPIO_V2_LINE_FLAG_INPUT
    if edges:
        flags |= _GPIO_V2_LINE_FLAG_EDGE_RISING | _GPIO_V2_LINE_FLAG_EDGE_FALLING
    config = _LINE_CONFIG.pack(flags, 0, 0, 0, 0, 0, 0, b"")
    return _request(offset, consumer, config)


def gpio_output_request(offset: int, consumer: str, value: bool) -> bytearray:
    """The line request for one output line whose first value is ``value`` (physical level).

    The value travels in the request (an ``OUTPUT_VALUES`` attribute) so that the line never shows
    the kernel's default low for a moment before dcud sets it.
    """
    attr = _LINE_ATTR.pack(_GPIO_V2_LINE_ATTR_ID_OUTPUT_VALUES, 0, int(value), 1)
    config = _LINE_CONFIG.pack(_GPIO_V2_LINE_FLAG_OUTPUT, 1, 0, 0, 0, 0, 0, attr)
    return _request(offset, consumer, config)


def _request(offset: int, consumer: str, config: bytes) -> bytearray:
    offsets = [offset] + [0] * (_GPIO_V2_LINES_MAX - 1)
    return bytearray(_LINE_REQUEST.pack(*offsets, consumer.encode()[:31], config, 1, 0, 0, 0, 0, 0, 0, 0))


def _request_line(chip: str, request: bytearray) -> int:
    """Issue a line request on ``chip``; returns the line's fd (the chip fd is closed again)."""
    chip_fd = os.open(chip, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(chip_fd, GPIO_V2_GET_LINE_IOCTL, request)
    finally:
        os.close(chip_fd)
    fd: int = _LINE_REQUEST.unpack(bytes(request))[-1]
    return fd


class GpioSource:
    """One GPIO line through ``/dev/gpiochipN`` (GPIO v2 uAPI via ``ioctl``; the unit's ``gpio`` group)."""

    def __init__(self, chip: str, line: int, active_low: bool = False, consumer: str = "dcud") -> None:
        self.active_low = active_low
        self.edges = True
        try:
            self.fd = _request_line(chip, gpio_line_request(line, consumer, edges=True))
        except OSError:
            # Some drivers cannot do edge detection on every line: fall back to polling values.
            self.edges = False
            self.fd = _request_line(chip, gpio_line_request(line, consumer, edges=False))
        os.set_blocking(self.fd, False)

    def read(self) -> bool | None:
        """The line's current value (active high unless ``active_low``)."""
        values = bytearray(_LINE_VALUES.pack(0, 1))
        try:
            fcntl.ioctl(self.fd, GPIO_V2_LINE_GET_VALUES_IOCTL, values)
        except OSError:
            return None
        bits, _mask = _LINE_VALUES.unpack(bytes(values))
        return bool(bits & 1) != self.active_low

    async def wait(self, timeout_s: float) -> None:
        """Wait for an edge event (drained) or the timeout."""
        if not self.edges:
            await asyncio.sleep(timeout_s)
            return
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_reader(self.fd, lambda: None if ready.done() else ready.set_result(None))
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ready, timeout_s)
        finally:
            loop.remove_reader(self.fd)
        with contextlib.suppress(BlockingIOError, InterruptedError):
            os.read(self.fd, _LINE_EVENT_SIZE * 16)

    def close(self) -> None:
        """Release the line."""
        with contextlib.suppress(OSError):
            os.close(self.fd)


class GpioOutput:
    """One GPIO line driven as an output (the relay); the line stays requested until :meth:`close`."""

    def __init__(
        self, chip: str, line: int, on: bool, active_low: bool = False, consumer: str = "dcud"
    ) -> None:
        self.active_low = active_low
        self.fd = _request_line(chip, gpio_output_request(line, consumer, on != active_low))

    def set(self, on: bool) -> None:
        """Drive the line (``OSError`` when the kernel refuses)."""
        values = bytearray(_LINE_VALUES.pack(int(on != self.active_low), 1))
        fcntl.ioctl(self.fd, GPIO_V2_LINE_SET_VALUES_IOCTL, values)

    def close(self) -> None:
        """Release the line (the kernel keeps or resets its value, depending on the driver)."""
        with contextlib.suppress(OSError):
            os.close(self.fd)


# -- the watcher loop ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LevelChange:
    """What the watcher reports.

    ``first``: the first readable level when the source could not be read at start; ``change``: a
    debounced change; ``unreadable`` / ``readable``: the source stopped / started answering (once each
    way, so a caller logs one line per state change).
    """

    kind: Literal["first", "change", "unreadable", "readable"]
    level: bool | None


class LevelWatcher:
    """Samples a source, debounces it and yields :class:`LevelChange` items.

    ``clock`` is monotonic seconds (injectable: the debounce runs on it, the source's ``wait`` on real
    time or on whatever a test's source does). A stop is noticed at the next sample, at most
    ``poll_interval_s`` later.
    """

    def __init__(
        self,
        source: LevelSource,
        *,
        poll_interval_s: float,
        debounce_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.poll_interval_s = poll_interval_s
        self.clock = clock
        self.debouncer = Debouncer(debounce_s, None)
        self.unreadable = False

    def read_initial(self) -> bool | None:
        """Take the first sample (no debounce: the level at start is the level); None if unreadable."""
        level = self.source.read()
        self.debouncer = Debouncer(self.debouncer.debounce_s, level)
        return level

    async def changes(self, stopping: asyncio.Event, beat: Callable[[], None]) -> AsyncIterator[LevelChange]:
        """Sample until ``stopping`` is set; ``beat`` is called after every sample."""
        debouncer = self.debouncer
        while not stopping.is_set():
            deadline = debouncer.deadline()
            timeout = self.poll_interval_s
            if deadline is not None:
                timeout = min(timeout, max(0.0, deadline - self.clock()))
            await self.source.wait(timeout)
            beat()
            sample = self.source.read()
            if sample is None:
                if not self.unreadable:
                    self.unreadable = True
                    yield LevelChange("unreadable", None)
                continue
            if self.unreadable:
                self.unreadable = False
                yield LevelChange("readable", sample)
            if debouncer.accepted is None:
                debouncer.update(sample, self.clock())
                yield LevelChange("first", sample)
                continue
            changed = debouncer.update(sample, self.clock())
            if changed is not None:
                yield LevelChange("change", changed)
