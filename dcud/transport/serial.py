"""The serial byte mover: one tty opened with pyserial-asyncio, no protocol knowledge (design.md rule 2).

:class:`SerialPort` opens a tty (a UART, a USB adapter, a pty), applies baud and framing, optionally the
kernel's RS485 mode (``TIOCSRS485``: the UART driver toggles RTS around each transmission) and
exclusive access (``flock``), and moves bytes:

- received bytes go into a bounded buffer (oldest bytes dropped and counted when it overflows), or,
  while a receiver is set (:meth:`SerialPort.set_receiver`), straight to that callback;
- :meth:`SerialPort.write` hands bytes to the driver at once when nothing is queued before them and
  queues the rest, :meth:`SerialPort.drain` waits until the UART has put them on the wire (tcdrain),
  which is what a baud switch must wait for; :meth:`SerialPort.output_pending` counts what is not out;
- the echo filter drops the echo of our own transmission that half-duplex converters (and RS485 2-wire
  transceivers with the receiver always on) hand back ("purge first frame" in libmbus);
- a device that fails (EIO from an unplugged USB adapter, a closed pty) closes the port; the owner
  (the line service) sees :attr:`SerialPort.closed` and reopens.

Everything here is policy-free: who may talk and when is the line service's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import struct
import termios
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import serial
import serial_asyncio

from dcud.errors import PeerTimeout, TransportError

DEFAULT_BUFFER_BYTES = 64 * 1024
READ_CHUNK_BYTES = 4096
"""Most bytes taken from the tty per readiness callback."""

Receiver = Callable[[bytes], None]
"""Takes received chunks synchronously (see :meth:`SerialPort.set_receiver`); ``b""`` means closed."""

_os_write = os.write
_RETRY_ERRNOS = frozenset((errno.EAGAIN, errno.EALREADY, errno.EWOULDBLOCK, errno.EINPROGRESS, errno.EINTR))

# struct serial_rs485 (include/uapi/linux/serial.h): flags, delay_rts_before_send, delay_rts_after_send,
# then padding; 32 bytes on every Linux architecture.
_RS485_STRUCT = struct.Struct("=IIIIIIII")
SER_RS485_ENABLED = 1 << 0
SER_RS485_RTS_ON_SEND = 1 << 1
SER_RS485_RTS_AFTER_SEND = 1 << 2
SER_RS485_RX_DURING_TX = 1 << 4
TIOCSRS485: int = getattr(termios, "TIOCSRS485", 0x542F)
PTY_SLAVE_MAJORS = range(136, 144)
"""Linux device majors of Unix98 pty slaves (/dev/pts/N): a pty has no wire, so no parity to set."""
TIOCGRS485: int = getattr(termios, "TIOCGRS485", 0x542E)

_PARITIES = {"N": serial.PARITY_NONE, "E": serial.PARITY_EVEN, "O": serial.PARITY_ODD}
_PARITIES.update({"M": serial.PARITY_MARK, "S": serial.PARITY_SPACE})


@dataclass(frozen=True, slots=True)
class Framing:
    """Character framing such as ``8E1``: data bits, parity letter (N/E/O/M/S), stop bits."""

    data_bits: int
    parity: str
    stop_bits: int

    @classmethod
    def parse(cls, text: str) -> Framing:
        """Parse ``"7E1"``/``"8N1"``...; ``ValueError`` on anything else."""
        text = text.strip().upper()
        if len(text) != 3 or text[0] not in "5678" or text[1] not in _PARITIES or text[2] not in "12":
            raise ValueError(f"framing must look like 8E1 or 7E1, got {text!r}")
        return cls(int(text[0]), text[1], int(text[2]))

    @property
    def bits_per_char(self) -> int:
        """Bits on the wire per character: start + data + parity + stop."""
        return 1 + self.data_bits + (0 if self.parity == "N" else 1) + self.stop_bits

    def __str__(self) -> str:
        return f"{self.data_bits}{self.parity}{self.stop_bits}"


@dataclass(frozen=True, slots=True)
class Rs485Settings:
    """Kernel RS485 mode: RTS drives the transceiver's driver enable while we send.

    ``rts_on_send`` is the RTS level during transmission (most transceivers: high); ``rx_during_tx``
    keeps the receiver on while sending (4-wire full duplex; on 2-wire it produces an echo).
    """

    enabled: bool = True
    rts_on_send: bool = True
    rx_during_tx: bool = False
    delay_before_send_ms: int = 0
    delay_after_send_ms: int = 0

    def to_struct(self) -> bytes:
        """The ``struct serial_rs485`` for TIOCSRS485."""
        flags = 0
        if self.enabled:
            flags |= SER_RS485_ENABLED
            flags |= SER_RS485_RTS_ON_SEND if self.rts_on_send else SER_RS485_RTS_AFTER_SEND
            if self.rx_during_tx:
                flags |= SER_RS485_RX_DURING_TX
        return _RS485_STRUCT.pack(flags, self.delay_before_send_ms, self.delay_after_send_ms, 0, 0, 0, 0, 0)


def char_time_s(baud: int, bits_per_char: int = 11) -> float:
    """Time one character occupies the wire."""
    return bits_per_char / baud


@dataclass
class PortCounters:
    """Byte and error counters of one open port (the line service sums them over reopens)."""

    bytes_rx: int = 0
    bytes_tx: int = 0
    rx_dropped: int = 0
    echo_dropped: int = 0
    echo_mismatches: int = 0


class _Transport(serial_asyncio.SerialTransport):  # type: ignore[misc]
    """pyserial-asyncio's transport, reading the tty with one ``os.read`` per readiness callback.

    pyserial's ``read`` adds a ``select`` (with its abort pipe) before every read although the loop
    just said the fd is readable; the errors stay the ones pyserial raises, so a failing device closes
    the transport exactly as before. Received bytes go straight to the port's receiver when it has
    one and no echo to strip (the bridge's hot path: no call in between), else to the port's
    ``_on_data``; never through the protocol object.
    """

    port: SerialPort
    """Set by :meth:`SerialPort.open` right after construction, before the reader is registered."""

    def _read_ready(self) -> None:
        try:
            data = os.read(self._serial.fd, READ_CHUNK_BYTES)
        except OSError as exc:
            if exc.errno in _RETRY_ERRNOS:
                return
            self._close(exc=serial.SerialException(f"read failed: {exc}"))
            return
        if not data:
            # A vanished device (an unplugged adapter, a dead pty peer) reads as ready but empty.
            self._close(
                exc=serial.SerialException(
                    "device reports readiness to read but returned no data "
                    "(device disconnected or multiple access on port?)"
                )
            )
            return
        port = self.port
        receiver = port._receiver
        if receiver is not None and not port._echo:
            receiver(data)  # the holder first (a bridge's client waits for these), the count after
            port.counters.bytes_rx += len(data)
        else:
            port._on_data(data)


class _Protocol(asyncio.Protocol):
    """The port's side of the transport's callbacks: end of the connection and write flow control
    (received bytes bypass it, see :class:`_Transport`)."""

    def __init__(self, port: SerialPort) -> None:
        self._port = port

    def connection_lost(self, exc: Exception | None) -> None:
        self._port._on_lost(exc)
        self._port._emptied.set()  # a drain waiting on the queue wakes and finds the port closed

    def pause_writing(self) -> None:
        self._port._emptied.clear()  # the port's write limits are 0: bytes wait in user space

    def resume_writing(self) -> None:
        self._port._emptied.set()  # the queue in user space is empty again


class SerialPort:
    """One tty: open, configure, move bytes. See the module docstring.

    ``exclusive`` takes an ``flock`` on the device so that a second process (``dcud read`` while the
    daemon runs) cannot open the same line by accident. ``rs485`` is applied after the open; when the
    device refuses it (a pty, a USB adapter with automatic direction control) the port still works and
    :attr:`rs485_error` says why.
    """

    def __init__(
        self,
        device: str,
        baud: int,
        framing: str | Framing = "8N1",
        *,
        rs485: Rs485Settings | None = None,
        echo_filter: bool = False,
        exclusive: bool = True,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    ) -> None:
        self.device = device
        self.baud = baud
        self.framing = framing if isinstance(framing, Framing) else Framing.parse(framing)
        self.rs485 = rs485
        self.echo_filter = echo_filter
        self.exclusive = exclusive
        self.buffer_bytes = buffer_bytes
        self.counters = PortCounters()
        self.rs485_applied = False
        self.rs485_error = ""
        self.framing_error = ""
        self.is_pty = False
        """True when the open device is a pseudo-terminal (a simulator's end, socat), not a UART."""
        self.failure: BaseException | None = None
        self._serial: Any = None
        self._transport: Any = None
        self._fd = -1
        self._buffer = bytearray()
        self._echo = bytearray()
        self._data_event = asyncio.Event()
        self._emptied = asyncio.Event()
        """Set while nothing written waits in user space (the transport's queue is empty)."""
        self._closed: asyncio.Future[BaseException | None] | None = None
        self._receiver: Receiver | None = None

    # -- life cycle ----------------------------------------------------------------------------

    def _open_serial(self, framing: Framing) -> Any:
        ser = serial.Serial(
            port=None,
            baudrate=self.baud,
            bytesize=framing.data_bits,
            parity=_PARITIES[framing.parity],
            stopbits=framing.stop_bits,
            timeout=0,
            write_timeout=0,
            exclusive=self.exclusive,
        )
        ser.port = self.device
        ser.open()
        return ser

    async def open(self) -> None:
        """Open and configure the tty; raises TransportError (OSError kept as ``__cause__``)."""
        loop = asyncio.get_running_loop()
        self.framing_error = ""
        try:
            try:
                ser = self._open_serial(self.framing)
            except termios.error as exc:
                if str(self.framing) == "8N1":
                    raise
                # A device that refuses the framing (a pty on recent kernels): run 8N1, say so.
                ser = self._open_serial(Framing(8, "N", 1))
                self.framing_error = f"device refuses {self.framing} ({_reason(exc)}); running 8N1"
        except (termios.error, OSError, serial.SerialException, ValueError) as exc:
            raise TransportError(f"cannot open {self.device}: {_reason(exc)}") from exc
        self.is_pty = _is_pty(ser.fileno())
        self._probe_framing(ser)
        self._serial = ser
        if self.rs485 is not None:
            self._apply_rs485(self.rs485)
        self._closed = loop.create_future()
        self._buffer.clear()
        self._echo.clear()
        self._receiver = None
        self.failure = None
        self._fd = ser.fd
        self._transport = _Transport(loop, _Protocol(self), ser)
        self._transport.port = self
        # Write limits of 0: the protocol hears "paused" as soon as a byte waits in user space and
        # "resumed" when none does, which is what drain() waits for (no polling of the queue).
        self._transport.set_write_buffer_limits(high=0, low=0)
        self._emptied.set()
        # The transport registers its reader with call_soon; one turn of the loop makes it live.
        await asyncio.sleep(0)

    def _probe_framing(self, ser: Any) -> None:
        """Apply the settings once more; a device that refuses the framing runs 8N1 and says so.

        Linux ptys refuse parity and 7-bit characters (EINVAL) on recent kernels; a pty has no wire,
        so the simulators and tests lose nothing, and a real UART never takes this path.
        """
        if self.framing_error:
            return
        try:
            ser.timeout = 0
        except (termios.error, OSError, ValueError, serial.SerialException) as exc:
            if str(self.framing) == "8N1":
                ser.close()
                raise TransportError(f"cannot configure {self.device}: {_reason(exc)}") from exc
            self.framing_error = f"device refuses {self.framing} ({_reason(exc)}); running 8N1"
            with contextlib.suppress(termios.error, OSError, ValueError, serial.SerialException):
                ser.bytesize = 8
            with contextlib.suppress(termios.error, OSError, ValueError, serial.SerialException):
                ser.parity = serial.PARITY_NONE
            with contextlib.suppress(termios.error, OSError, ValueError, serial.SerialException):
                ser.stopbits = 1

    def _apply_rs485(self, settings: Rs485Settings) -> None:
        try:
            fcntl.ioctl(self._serial.fileno(), TIOCSRS485, settings.to_struct())
        except OSError as exc:
            self.rs485_applied = False
            self.rs485_error = exc.strerror or str(exc)
        else:
            self.rs485_applied = True
            self.rs485_error = ""

    @property
    def is_open(self) -> bool:
        """True while the tty is open and has not failed."""
        return self._closed is not None and not self._closed.done()

    async def wait_closed(self) -> BaseException | None:
        """Wait until the port closes; returns the failure (None for a deliberate close)."""
        if self._closed is None:
            return self.failure
        return await asyncio.shield(self._closed)

    def close(self) -> None:
        """Close the tty now (buffered output is dropped)."""
        transport = self._transport
        if transport is not None and not transport.is_closing():
            # Discard what the driver still holds, so closing never waits for the wire (tcdrain).
            with contextlib.suppress(termios.error, OSError, serial.SerialException):
                self._serial.reset_output_buffer()
            transport.abort()  # closes the tty on the next loop turn
        self._finish(None)

    def _on_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.failure is None:
            self.failure = exc
        self._finish(exc)

    def _finish(self, exc: BaseException | None) -> None:
        if self._transport is None and self._serial is not None:
            with contextlib.suppress(Exception):
                self._serial.close()
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(exc)
        self._data_event.set()  # wake readers so they see the closed port
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            try:
                receiver(b"")
            except Exception as error:  # the receiver's bug must not stop the port from closing
                asyncio.get_running_loop().call_exception_handler(
                    {"message": f"{self.device}: receiver failed on close", "exception": error}
                )

    def _check_open(self) -> None:
        if not self.is_open:
            reason = f": {_reason(self.failure)}" if self.failure is not None else ""
            raise TransportError(f"{self.device} is not open{reason}")

    # -- receive -------------------------------------------------------------------------------

    def _on_data(self, data: bytes) -> None:
        self.counters.bytes_rx += len(data)
        if self._echo:
            data = self._strip_echo(data)
            if not data:
                return
        receiver = self._receiver
        if receiver is not None:
            receiver(data)
            return
        self._buffer += data
        overflow = len(self._buffer) - self.buffer_bytes
        if overflow > 0:
            del self._buffer[:overflow]
            self.counters.rx_dropped += overflow
        self._data_event.set()

    def _strip_echo(self, data: bytes) -> bytes:
        echo = self._echo
        n = 0
        limit = min(len(data), len(echo))
        while n < limit and data[n] == echo[n]:
            n += 1
        self.counters.echo_dropped += n
        if n < limit:
            # Not our echo after all (a converter without echo, or line noise): stop filtering.
            self.counters.echo_mismatches += 1
            echo.clear()
        else:
            del echo[:n]
        return data[n:]

    def set_receiver(self, receiver: Receiver | None) -> None:
        """Hand every received chunk to ``receiver`` synchronously, from the transport's callback.

        Bytes buffered so far go first (within this call), then each chunk as it arrives (after the
        echo filter); when the port closes the receiver gets ``b""`` once and is dropped. A receiver
        set on a closed port gets the buffered bytes and then ``b""`` at once. ``None`` goes back to
        buffering for :meth:`read`. The receiver must not raise: it runs inside the event loop's
        reader callback.
        """
        self._receiver = receiver
        if receiver is None:
            return
        if self._buffer:
            receiver(self._take(len(self._buffer)))
        if not self.is_open and self._receiver is receiver:
            self._receiver = None
            receiver(b"")

    @property
    def in_waiting(self) -> int:
        """Bytes received and not yet read."""
        return len(self._buffer)

    def _take(self, size: int) -> bytes:
        chunk = bytes(self._buffer[:size])
        del self._buffer[:size]
        return chunk

    async def _wait_data(self, timeout_s: float) -> bool:
        """Wait until the buffer holds unread bytes; False on timeout. TransportError when closed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout_s)
        while not self._buffer:
            self._check_open()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._data_event.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._data_event.wait()
        return True

    async def read(self, max_bytes: int = 4096, timeout_s: float = 1.0) -> bytes:
        """Up to ``max_bytes`` bytes once at least one is there; ``b""`` after ``timeout_s`` of silence."""
        if not await self._wait_data(timeout_s):
            return b""
        return self._take(max_bytes)

    async def read_until(self, separator: bytes, timeout_s: float, max_bytes: int = 4096) -> bytes:
        """Bytes up to and including ``separator``; PeerTimeout (input kept) when it does not come."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        start = 0
        while True:
            index = self._buffer.find(separator, start)
            if index >= 0:
                return self._take(index + len(separator))
            if len(self._buffer) >= max_bytes:
                return self._take(max_bytes)
            start = max(0, len(self._buffer) - len(separator) + 1)
            remaining = deadline - loop.time()
            self._check_open()
            if remaining <= 0:
                raise PeerTimeout(f"no {separator!r} on {self.device} within {timeout_s} s")
            self._data_event.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._data_event.wait()

    def flush_input(self) -> None:
        """Drop every received byte not yet read (and what the driver still holds)."""
        self._buffer.clear()
        self._echo.clear()
        if self.is_open:
            with contextlib.suppress(OSError, serial.SerialException):
                self._serial.reset_input_buffer()

    # -- transmit ------------------------------------------------------------------------------

    def write(self, data: bytes) -> int:
        """Send ``data`` (never blocks); TransportError when the port is closed.

        When nothing is queued, the bytes go to the driver at once (one non-blocking ``write``);
        whatever it does not take is queued behind, and anything written while bytes are queued is
        queued after them, so the order on the wire is the order of the calls. Returns how many
        bytes wait in user space after this call (0: the driver took everything).
        """
        closed = self._closed
        if closed is None or closed.done():
            self._check_open()
        if not data:
            return 0
        self.counters.bytes_tx += len(data)
        if self.echo_filter:
            self._echo += data
        transport = self._transport
        if transport._closing or transport._write_buffer:
            transport.write(bytes(data))
            return int(transport.get_write_buffer_size())
        try:
            sent = os.write(self._serial.fd, data)
        except OSError:
            # EAGAIN, or a failing device: the transport retries and reports a failure as before.
            sent = 0
        if sent < len(data):
            transport.write(bytes(data[sent:]))
            return int(transport.get_write_buffer_size())
        return 0

    def write_direct(self, data: bytes) -> int:
        """:meth:`write` for a lease holder's hot path: the common case (nothing queued, no echo to
        filter, the port open, the driver takes it all) in a few operations; anything else is
        :meth:`write` itself, so the order on the wire and the errors stay the same."""
        transport = self._transport
        if transport._closing or transport._write_buffer or self.echo_filter or not data:
            return self.write(data)
        self.counters.bytes_tx += len(data)
        try:
            sent = _os_write(self._fd, data)
        except OSError:
            sent = 0  # EAGAIN, or a failing device: the transport retries and reports it
        if sent < len(data):
            transport.write(bytes(data[sent:]))
            return int(transport.get_write_buffer_size())
        return 0

    def output_pending(self) -> int:
        """Bytes written and not on the wire yet: the transport's queue plus the driver's (TIOCOUTQ).

        0 on a closed port. A pty has no wire: its driver count stays 0 and only the queue counts.
        """
        closed = self._closed
        if closed is None or closed.done():
            return 0
        transport = self._transport
        queued = sum(map(len, transport._write_buffer)) if transport._write_buffer else 0
        return queued + self._kernel_pending()

    def _kernel_pending(self) -> int:
        """The driver's output queue (TIOCOUTQ); 0 when the device does not say."""
        try:
            return _tiocoutq(self._serial.fd)
        except (OSError, ValueError, TypeError):
            return 0

    def _drain_timeout_s(self) -> float:
        """Default bound of :meth:`drain`: twice the wire time of everything queued, plus a second."""
        pending = int(self._transport.get_write_buffer_size()) + self._kernel_pending() + 64
        return 1.0 + 2 * pending * char_time_s(self.baud, self.framing.bits_per_char)

    async def drain(self, timeout_s: float | None = None) -> None:
        """Wait until every written byte has left the UART (tcdrain); PeerTimeout if it takes too long."""
        self._check_open()
        loop = asyncio.get_running_loop()
        if timeout_s is None:
            timeout_s = self._drain_timeout_s()
        deadline = loop.time() + timeout_s
        while self._transport.get_write_buffer_size():
            self._check_open()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise PeerTimeout(f"{self.device}: output not drained within {timeout_s:.2f} s")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._emptied.wait()
        self._check_open()  # closed while waiting: the queue was dropped, not written
        fd = self._serial.fileno()
        try:
            async with asyncio.timeout(max(0.0, deadline - loop.time()) + 0.1):
                await loop.run_in_executor(None, _tcdrain, fd)
        except TimeoutError as exc:
            raise PeerTimeout(f"{self.device}: UART not drained within {timeout_s:.2f} s") from exc
        except OSError as exc:
            self._check_open()
            raise TransportError(f"{self.device}: tcdrain failed: {_reason(exc)}") from exc

    # -- settings ------------------------------------------------------------------------------

    def set_baud(self, baud: int) -> None:
        """Switch the rate now (call :meth:`drain` first, or bytes still queued go out at the new rate)."""
        self._check_open()
        if baud == self.baud:
            return
        try:
            self._serial.baudrate = baud
        except (termios.error, OSError, ValueError, serial.SerialException) as exc:
            raise TransportError(f"{self.device}: cannot set {baud} Bd: {_reason(exc)}") from exc
        self.baud = baud

    def set_framing(self, framing: str | Framing) -> None:
        """Switch the character framing now (``"8N1"``, ``"7E1"``...)."""
        self._check_open()
        new = framing if isinstance(framing, Framing) else Framing.parse(framing)
        if new == self.framing:
            return
        if self.framing_error:
            self.framing = new  # the device refused framing at open: keep it logical only
            return
        try:
            self._serial.bytesize = new.data_bits
            self._serial.parity = _PARITIES[new.parity]
            self._serial.stopbits = new.stop_bits
        except (termios.error, OSError, ValueError, serial.SerialException) as exc:
            raise TransportError(f"{self.device}: cannot set {new}: {_reason(exc)}") from exc
        self.framing = new


def _tiocoutq(fd: int) -> int:
    """Bytes in the driver's output queue of ``fd``."""
    count: int = _INT_STRUCT.unpack(fcntl.ioctl(fd, termios.TIOCOUTQ, bytes(_INT_STRUCT.size)))[0]
    return count


_INT_STRUCT = struct.Struct("i")


def _tcdrain(fd: int) -> None:
    try:
        termios.tcdrain(fd)
    except termios.error as exc:
        raise OSError(*exc.args) from exc


def _is_pty(fd: int) -> bool:
    """True when ``fd`` is a Unix98 pty slave."""
    try:
        return os.major(os.fstat(fd).st_rdev) in PTY_SLAVE_MAJORS
    except OSError:
        return False


def _reason(exc: BaseException | None) -> str:
    if exc is None:
        return "closed"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, termios.error) and len(exc.args) == 2:
        return str(exc.args[1])
    return str(exc) or type(exc).__name__
