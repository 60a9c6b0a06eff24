"""Sans-I/O M-Bus master sessions: readout, scans and single commands (EN 13757-2/-3).

Style of h11/aioquic: the caller owns the serial line and the clock. It calls ``start(now)``, feeds every
received chunk to ``receive_data(data, now)``, calls ``handle_timer(now)`` once ``now`` reaches
``next_deadline()``, and performs the returned actions in order:

- :class:`Flush`: discard whatever the line has buffered but not yet delivered;
- :class:`Send`: write the bytes;
- :class:`SetBaud`: switch the line to a new rate (after a slave acknowledged a baud change);
- :class:`Done` / :class:`Failed`: the session is over (``result`` or ``error``).

Times are ``float`` seconds on the caller's monotonic clock. Nothing here sleeps or reads a clock.

Deadlines follow EN 13757-2: a slave starts answering within 330 bit times + 50 ms of the end of the
request. The default response timeout adds 100 ms for converters and USB latency (0.29 s at 2400 Bd,
1.25 s at 300 Bd; libmbus uses 0.3 s / 1.3 s) and the request's own wire time (11 bits per character).
While bytes keep arriving the deadline moves to ``last byte + response timeout`` (a long frame at 300 Bd
takes 9.5 s), capped at the longest legal frame.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from dcud.codec.actions import Done, Failed, Flush, Send, SetBaud
from dcud.codec.mbus import (
    ADDRESS_BROADCAST_REPLY,
    ADDRESS_MAX_SLAVE,
    ADDRESS_NETWORK,
    BAUD_RATES,
    MAX_LONG_FRAME_BYTES,
    FrameKind,
    Garbage,
    LinkEvent,
    MbusFrame,
    MbusLinkParser,
    encode_req_ud2,
    encode_select,
    encode_set_baud,
    encode_snd_nke,
    secondary_address_bytes,
)
from dcud.codec.mbus_app import MbusRecord, MbusTelegram, decode_telegram
from dcud.errors import DcudError, LocalProtocolError, NegativeResponse, PeerTimeout, RemoteProtocolError

RESPONSE_BITS = 330
"""EN 13757-2: latest start of a slave's answer, in bit times after the request (plus 50 ms)."""
RESPONSE_EXTRA_S = 0.050
TRANSPORT_MARGIN_S = 0.100
"""Allowance for level converters, USB serial adapters and OS scheduling."""
BITS_PER_CHARACTER = 11
"""8E1: start + 8 data + parity + stop."""
DEFAULT_RETRIES = 2
"""Repeats of a request after a timeout or a garbled reply (common practice, then: slave absent)."""

# ---------------------------------------------------------------------------------------------------
# Actions


# ---------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, slots=True)
class MbusReadoutResult:
    """Every telegram of one readout, the raw frames, and the FCB the next REQ_UD2 must carry."""

    telegrams: list[MbusTelegram]
    frames: list[bytes]
    next_fcb: bool
    retries: int = 0

    @property
    def records(self) -> list[MbusRecord]:
        """Records of all telegrams, renumbered 0..n-1 across telegrams (multi-telegram readouts).

        The empty DIF 1F marker that only says "ask again" is left out; manufacturer data is kept.
        """
        out: list[MbusRecord] = []
        for telegram in self.telegrams:
            for record in telegram.records:
                if record.quantity == "more_records_follow" and not record.raw_data:
                    continue
                out.append(_renumber(record, len(out)))
        return out

    def to_values(self) -> list[dict[str, object]]:
        """The MQTT ``values`` list."""
        return [r.to_json() for r in self.records]


def _renumber(record: MbusRecord, index: int) -> MbusRecord:
    if record.index == index:
        return record
    return MbusRecord(
        index=index,
        value=record.value,
        unit=record.unit,
        quantity=record.quantity,
        storage=record.storage,
        tariff=record.tariff,
        subunit=record.subunit,
        function=record.function,
        raw_dif=record.raw_dif,
        raw_vif=record.raw_vif,
        raw_data=record.raw_data,
    )


@dataclass(frozen=True, slots=True)
class ScanHit:
    """One slave found by a scan: primary address (None for secondary scans) and what it told us."""

    address: int | None
    secondary_address: str = ""
    telegram: MbusTelegram | None = None


@dataclass(frozen=True, slots=True)
class MbusScanResult:
    """Slaves found, probes that stayed ambiguous (``collisions``) and probes sent."""

    found: list[ScanHit]
    collisions: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    probes: int = 0
    complete: bool = True


@dataclass(frozen=True, slots=True)
class MbusCommandResult:
    """A command the slave acknowledged (E5)."""

    request: bytes
    retries: int = 0


MbusResult = MbusReadoutResult | MbusScanResult | MbusCommandResult

Action = Send | Flush | SetBaud | Done[MbusResult] | Failed
"""Everything a session asks its driver to do."""
"""What :class:`Done` carries."""

# ---------------------------------------------------------------------------------------------------
# Timing


def default_response_timeout_s(baud: int) -> float:
    """Time allowed from the end of a request to the first byte of the answer."""
    if baud <= 0:
        raise LocalProtocolError(f"baud must be positive, not {baud}")
    return RESPONSE_BITS / baud + RESPONSE_EXTRA_S + TRANSPORT_MARGIN_S


def _wire_s(size_bytes: int, baud: int) -> float:
    return size_bytes * BITS_PER_CHARACTER / baud


# ---------------------------------------------------------------------------------------------------
# Exchange machinery


class _Expect(enum.Enum):
    ACK = "ack"
    OPTIONAL_ACK = "optional_ack"
    RSP_UD = "rsp_ud"
    WINDOW = "window"


@dataclass(slots=True)
class _Pending:
    request: bytes
    expect: _Expect
    address: int | None
    retries_left: int


class _MbusSession:
    """One request/answer exchange at a time, with deadlines, retries and resynchronisation."""

    def __init__(self, baud: int, response_timeout_s: float | None, retries: int) -> None:
        if baud not in BAUD_RATES:
            raise LocalProtocolError(f"unsupported M-Bus baud rate {baud}")
        if retries < 0:
            raise LocalProtocolError("retries must not be negative")
        self.baud = baud
        self.response_timeout_s = (
            default_response_timeout_s(baud) if response_timeout_s is None else float(response_timeout_s)
        )
        if self.response_timeout_s <= 0:
            raise LocalProtocolError("response_timeout_s must be positive")
        self.retries = retries
        self.retries_used = 0
        self._parser = MbusLinkParser()
        self._pending: _Pending | None = None
        self._deadline: float | None = None
        self._hard_deadline = 0.0
        self._window: list[MbusFrame] = []
        self._garbled = False
        self._started = False
        self._finished = False

    # -- public API ------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once Done or Failed was handed out."""
        return self._finished

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` must be called next (None: nothing pending)."""
        return None if self._finished else self._deadline

    def start(self, now: float) -> list[Action]:
        """Begin: the first actions (Flush, Send)."""
        if self._started:
            raise LocalProtocolError("session already started")
        self._started = True
        return self._begin(now)

    def receive_data(self, data: bytes, now: float) -> list[Action]:
        """Bytes from the line; returns what to do next (often nothing: wait for more)."""
        if self._finished or self._pending is None or not data:
            return []
        self._parser.receive_data(data)
        actions = self._take(self._parser.events(), now)
        if actions is not None:
            return actions
        # The line is busy: keep listening until it has been idle for a response timeout.
        if self._deadline is not None:
            self._deadline = min(max(self._deadline, now + self.response_timeout_s), self._hard_deadline)
        return []

    def _take(self, events: list[LinkEvent], now: float) -> list[Action] | None:
        """Sort received events; the actions once the awaited answer is among them, else None."""
        pending = self._pending
        assert pending is not None
        for event in events:
            if isinstance(event, Garbage):
                self._garbled = True
            elif event.from_master:
                continue  # our own request echoed by the level converter
            elif pending.expect is _Expect.WINDOW:
                self._window.append(event)
            elif self._matches(event, pending):
                self._pending = None
                self._deadline = None
                return self._on_reply(event, now)
            else:
                self._garbled = True
        return None

    def handle_timer(self, now: float) -> list[Action]:
        """Call when ``now >= next_deadline()``; earlier calls do nothing."""
        if self._finished or self._deadline is None or now < self._deadline or self._pending is None:
            return []
        actions = self._take(self._parser.flush(), now)
        if actions is not None:
            return actions
        pending = self._pending
        self._deadline = None
        if pending.expect is _Expect.WINDOW:
            self._pending = None
            window, garbled = list(self._window), self._garbled
            return self._on_window(window, garbled, now)
        if pending.expect is _Expect.OPTIONAL_ACK:
            self._pending = None
            return self._on_reply(None, now)
        if pending.retries_left > 0:
            pending.retries_left -= 1
            self.retries_used += 1
            return self._send(now)
        self._pending = None
        error: DcudError
        if self._garbled:
            error = RemoteProtocolError(
                f"garbled answer to {pending.request.hex(' ').upper()}", pending.request
            )
        else:
            error = PeerTimeout(f"no answer to {pending.request.hex(' ').upper()}")
        return self._on_failure(error, now)

    # -- helpers for subclasses ------------------------------------------------------------------

    def _transmit(
        self,
        now: float,
        request: bytes,
        expect: _Expect,
        address: int | None = None,
        retries: int | None = None,
    ) -> list[Action]:
        self._pending = _Pending(request, expect, address, self.retries if retries is None else retries)
        return self._send(now)

    def _send(self, now: float) -> list[Action]:
        assert self._pending is not None
        request = self._pending.request
        self._parser.clear()
        self._window.clear()
        self._garbled = False
        self._deadline = now + _wire_s(len(request), self.baud) + self.response_timeout_s
        self._hard_deadline = (
            self._deadline + _wire_s(MAX_LONG_FRAME_BYTES, self.baud) + self.response_timeout_s
        )
        return [Flush(), Send(request)]

    @staticmethod
    def _matches(frame: MbusFrame, pending: _Pending) -> bool:
        if pending.expect in (_Expect.ACK, _Expect.OPTIONAL_ACK):
            return frame.kind is FrameKind.ACK
        if not frame.is_rsp_ud:
            return False
        return pending.address is None or frame.address == pending.address

    def _finish(self, result: MbusResult) -> list[Action]:
        self._finished = True
        self._deadline = None
        return [Done(result)]

    def _fail(self, error: DcudError) -> list[Action]:
        self._finished = True
        self._deadline = None
        self._pending = None
        return [Failed(error)]

    # -- hooks -----------------------------------------------------------------------------------

    def _begin(self, now: float) -> list[Action]:
        raise NotImplementedError

    def _on_reply(self, frame: MbusFrame | None, now: float) -> list[Action]:
        raise NotImplementedError

    def _on_window(self, frames: list[MbusFrame], garbled: bool, now: float) -> list[Action]:
        raise NotImplementedError

    def _on_failure(self, error: DcudError, now: float) -> list[Action]:
        return self._fail(error)


def _check_primary(address: int) -> None:
    if not (0 <= address <= ADDRESS_MAX_SLAVE or address in (ADDRESS_NETWORK, ADDRESS_BROADCAST_REPLY)):
        raise LocalProtocolError(f"primary address must be 0..250, 253 or 254, not {address}")


def _normalise_mask(secondary: str) -> str:
    mask = secondary.upper()
    if len(mask) == 8:
        mask += "FFFFFFFF"
    secondary_address_bytes(mask)  # validates
    return mask


# ---------------------------------------------------------------------------------------------------
# Readout


class _ReadoutStep(enum.Enum):
    NKE = "nke"
    SELECT = "select"
    REQUEST = "request"


class MbusReadout(_MbusSession):
    """Read one meter: [SND_NKE] [select by secondary address] REQ_UD2 ... until no more telegrams.

    Give ``address`` (primary 0..250, or 254 point-to-point) or ``secondary`` (8 ID digits or a 16-hex
    digit mask ``IIIIIIIIMMMMVVDD``, F = wildcard); secondary readouts select the slave with SND_UD CI 52
    to address 253 and then send REQ_UD2 to 253. ``fcb`` is the FCB of the first REQ_UD2: after SND_NKE
    it is True by default (FT1.2: the first FCV message after a reset carries FCB 1); without SND_NKE
    pass the ``next_fcb`` of the meter's previous result. The FCB toggles after every good reply; a
    repeat after a timeout or a garbled answer keeps it, so the slave resends the same telegram. An
    answer that passes the link checks but is an application error (CI 70: NegativeResponse) or does not
    decode (RemoteProtocolError) ends the readout at once: asking again would return the same telegram.
    """

    def __init__(
        self,
        address: int | None = None,
        *,
        secondary: str | None = None,
        send_nke: bool = True,
        fcb: bool = True,
        baud: int = 2400,
        response_timeout_s: float | None = None,
        retries: int = DEFAULT_RETRIES,
        max_telegrams: int = 16,
    ) -> None:
        super().__init__(baud, response_timeout_s, retries)
        if (address is None) == (secondary is None):
            raise LocalProtocolError("give exactly one of address or secondary")
        if max_telegrams < 1:
            raise LocalProtocolError("max_telegrams must be at least 1")
        self.secondary = None if secondary is None else _normalise_mask(secondary)
        if address is not None:
            _check_primary(address)
        self.address = ADDRESS_NETWORK if address is None else address
        self.send_nke = send_nke
        self.fcb = fcb
        self.max_telegrams = max_telegrams
        self._step = _ReadoutStep.NKE
        self._telegrams: list[MbusTelegram] = []
        self._frames: list[bytes] = []

    def _begin(self, now: float) -> list[Action]:
        if self.send_nke:
            self._step = _ReadoutStep.NKE
            return self._transmit(now, encode_snd_nke(self.address), _Expect.OPTIONAL_ACK, retries=0)
        return self._after_nke(now)

    def _after_nke(self, now: float) -> list[Action]:
        if self.secondary is not None:
            self._step = _ReadoutStep.SELECT
            return self._transmit(now, encode_select(self.secondary), _Expect.ACK)
        return self._request(now)

    def _request(self, now: float) -> list[Action]:
        self._step = _ReadoutStep.REQUEST
        expected = None if self.address in (ADDRESS_NETWORK, ADDRESS_BROADCAST_REPLY) else self.address
        return self._transmit(now, encode_req_ud2(self.address, self.fcb), _Expect.RSP_UD, expected)

    def _on_reply(self, frame: MbusFrame | None, now: float) -> list[Action]:
        if self._step is _ReadoutStep.NKE:
            return self._after_nke(now)
        if self._step is _ReadoutStep.SELECT:
            return self._request(now)
        assert frame is not None
        self.fcb = not self.fcb
        try:
            telegram = decode_telegram(frame)
        except (RemoteProtocolError, NegativeResponse) as exc:
            return self._fail(exc)
        self._telegrams.append(telegram)
        self._frames.append(frame.encode())
        if telegram.more_records_follow and len(self._telegrams) < self.max_telegrams:
            return self._request(now)
        return self._finish(
            MbusReadoutResult(list(self._telegrams), list(self._frames), self.fcb, self.retries_used)
        )

    def _on_failure(self, error: DcudError, now: float) -> list[Action]:
        if self._step is _ReadoutStep.SELECT and isinstance(error, PeerTimeout):
            error = PeerTimeout(f"no slave answers selection {self.secondary}")
        return self._fail(error)


# ---------------------------------------------------------------------------------------------------
# Command


class MbusCommand(_MbusSession):
    """Send one request that the slave acknowledges with E5 (SND_NKE, SND_UD, set address, set baud).

    With ``new_baud`` the session emits :class:`SetBaud` after the acknowledgement (the slave answers at
    the old rate and listens at the new one from then on). Broadcasts to 255 expect no answer.
    """

    def __init__(
        self,
        request: bytes,
        *,
        new_baud: int | None = None,
        expect_ack: bool = True,
        baud: int = 2400,
        response_timeout_s: float | None = None,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        super().__init__(baud, response_timeout_s, retries)
        if new_baud is not None and new_baud not in BAUD_RATES:
            raise LocalProtocolError(f"unsupported M-Bus baud rate {new_baud}")
        self.request = bytes(request)
        self.new_baud = new_baud
        self.expect_ack = expect_ack

    @classmethod
    def set_baud(
        cls,
        address: int,
        new_baud: int,
        *,
        baud: int = 2400,
        response_timeout_s: float | None = None,
        retries: int = DEFAULT_RETRIES,
    ) -> MbusCommand:
        """Switch a slave's baud rate (CI B8..BF), then the line's (:class:`SetBaud`)."""
        return cls(
            encode_set_baud(address, new_baud),
            new_baud=new_baud,
            baud=baud,
            response_timeout_s=response_timeout_s,
            retries=retries,
        )

    def _begin(self, now: float) -> list[Action]:
        if not self.expect_ack:
            # Nobody answers (broadcast 255): done once the request has left the wire.
            return [Flush(), Send(self.request), *self._finish(MbusCommandResult(self.request))]
        return self._transmit(now, self.request, _Expect.ACK)

    def _on_reply(self, frame: MbusFrame | None, now: float) -> list[Action]:
        actions: list[Action] = []
        if self.new_baud is not None:
            actions.append(SetBaud(self.new_baud))
        return actions + self._finish(MbusCommandResult(self.request, self.retries_used))


# ---------------------------------------------------------------------------------------------------
# Scans


class MbusScan(_MbusSession):
    """Base of the two scans; build them with :meth:`primary` or :meth:`secondary`."""

    def __init__(
        self, *, baud: int, response_timeout_s: float | None, retries: int, max_probes: int | None
    ) -> None:
        super().__init__(baud, response_timeout_s, retries)
        if max_probes is not None and max_probes < 1:
            raise LocalProtocolError("max_probes must be at least 1")
        self.max_probes = max_probes
        self.probes = 0
        self.progress = ""
        """The address or mask being probed (for progress reports)."""
        self._found: list[ScanHit] = []
        self._collisions: list[str] = []
        self._unreadable: list[str] = []

    @classmethod
    def primary(
        cls,
        first_address: int = 0,
        last_address: int = ADDRESS_MAX_SLAVE,
        *,
        method: str = "req_ud2",
        baud: int = 2400,
        response_timeout_s: float | None = None,
        retries: int = 1,
        max_probes: int | None = None,
    ) -> MbusPrimaryScan:
        """Probe every primary address with REQ_UD2 (header and data) or SND_NKE (presence only)."""
        return MbusPrimaryScan(
            first_address,
            last_address,
            method=method,
            baud=baud,
            response_timeout_s=response_timeout_s,
            retries=retries,
            max_probes=max_probes,
        )

    @classmethod
    def secondary(
        cls,
        mask: str = "FFFFFFFFFFFFFFFF",
        *,
        send_nke: bool = True,
        baud: int = 2400,
        response_timeout_s: float | None = None,
        retries: int = DEFAULT_RETRIES,
        max_probes: int | None = None,
    ) -> MbusSecondaryScan:
        """Wildcard search over the ID digits of ``mask`` (libmbus algorithm, protocols.md section 2)."""
        return MbusSecondaryScan(
            mask,
            send_nke=send_nke,
            baud=baud,
            response_timeout_s=response_timeout_s,
            retries=retries,
            max_probes=max_probes,
        )

    def _budget_left(self) -> bool:
        return self.max_probes is None or self.probes < self.max_probes

    def _result(self, complete: bool = True) -> list[Action]:
        return self._finish(
            MbusScanResult(
                list(self._found), list(self._collisions), list(self._unreadable), self.probes, complete
            )
        )


class MbusPrimaryScan(MbusScan):
    """REQ_UD2 (or SND_NKE) to each address in turn; a garbled answer after the retries is a collision."""

    def __init__(
        self,
        first_address: int = 0,
        last_address: int = ADDRESS_MAX_SLAVE,
        *,
        method: str = "req_ud2",
        baud: int = 2400,
        response_timeout_s: float | None = None,
        retries: int = 1,
        max_probes: int | None = None,
    ) -> None:
        super().__init__(
            baud=baud, response_timeout_s=response_timeout_s, retries=retries, max_probes=max_probes
        )
        if not 0 <= first_address <= last_address <= ADDRESS_MAX_SLAVE:
            raise LocalProtocolError("scan range must lie within 0..250")
        if method not in ("req_ud2", "snd_nke"):
            raise LocalProtocolError(f"unknown scan method {method!r}")
        self.method = method
        self.last_address = last_address
        self._address = first_address

    def _begin(self, now: float) -> list[Action]:
        return self._probe(now)

    def _probe(self, now: float) -> list[Action]:
        if self._address > self.last_address:
            return self._result()
        if not self._budget_left():
            return self._result(complete=False)
        self.probes += 1
        self.progress = str(self._address)
        if self.method == "snd_nke":
            return self._transmit(now, encode_snd_nke(self._address), _Expect.ACK)
        return self._transmit(now, encode_req_ud2(self._address, False), _Expect.RSP_UD, self._address)

    def _on_reply(self, frame: MbusFrame | None, now: float) -> list[Action]:
        telegram: MbusTelegram | None = None
        if frame is not None and frame.is_rsp_ud:
            try:
                telegram = decode_telegram(frame)
            except (RemoteProtocolError, NegativeResponse):
                telegram = None
        secondary = telegram.secondary_address if telegram is not None else ""
        self._found.append(ScanHit(self._address, secondary, telegram))
        self._address += 1
        return self._probe(now)

    def _on_failure(self, error: DcudError, now: float) -> list[Action]:
        if isinstance(error, RemoteProtocolError):
            self._collisions.append(str(self._address))
        self._address += 1
        return self._probe(now)


class _SecondaryStep(enum.Enum):
    NKE = "nke"
    PROBE = "probe"
    READ = "read"


@dataclass(slots=True)
class _Level:
    pos: int
    mask: str
    digit: int = 0


class MbusSecondaryScan(MbusScan):
    """Wildcard search: per ID digit position try 0..9; one clean E5 -> read it, garbage -> go deeper.

    Each probe waits out the whole answer window (a second slave may answer late), then classifies:
    silence -> nothing there; exactly one E5 and nothing else -> one slave (REQ_UD2 to 253 reads its
    header); anything else -> collision, fix the digit and recurse into the next position. A collision
    with all 8 ID digits fixed (two meters with one ID) is reported in ``collisions``.
    """

    def __init__(
        self,
        mask: str = "FFFFFFFFFFFFFFFF",
        *,
        send_nke: bool = True,
        baud: int = 2400,
        response_timeout_s: float | None = None,
        retries: int = DEFAULT_RETRIES,
        max_probes: int | None = None,
    ) -> None:
        super().__init__(
            baud=baud, response_timeout_s=response_timeout_s, retries=retries, max_probes=max_probes
        )
        self.mask = _normalise_mask(mask)
        self.send_nke = send_nke
        self._stack: list[_Level] = []
        self._step = _SecondaryStep.NKE
        self._probe_mask = ""

    def _begin(self, now: float) -> list[Action]:
        if "F" in self.mask[:8]:
            self._push(0, self.mask)
        else:
            # A fully specified ID: probe it once as given.
            self._stack.append(_Level(-1, self.mask, 9))
        if self.send_nke:
            self._step = _SecondaryStep.NKE
            return self._transmit(now, encode_snd_nke(ADDRESS_NETWORK), _Expect.OPTIONAL_ACK, retries=0)
        return self._next_probe(now)

    def _push(self, pos: int, mask: str) -> None:
        while pos < 8 and mask[pos] != "F":
            pos += 1  # a digit the caller fixed
        if pos >= 8:
            self._collisions.append(mask)
            return
        self._stack.append(_Level(pos, mask))

    def _next_probe(self, now: float) -> list[Action]:
        while self._stack and self._stack[-1].digit > 9:
            self._stack.pop()
        if not self._stack:
            return self._result()
        if not self._budget_left():
            return self._result(complete=False)
        level = self._stack[-1]
        if level.pos < 0:
            mask = level.mask
        else:
            mask = level.mask[: level.pos] + str(level.digit) + level.mask[level.pos + 1 :]
        level.digit += 1
        self.probes += 1
        self.progress = mask
        self._probe_mask = mask
        self._step = _SecondaryStep.PROBE
        return self._transmit(now, encode_select(mask), _Expect.WINDOW)

    def _on_window(self, frames: list[MbusFrame], garbled: bool, now: float) -> list[Action]:
        if not frames and not garbled:
            return self._next_probe(now)
        if len(frames) == 1 and frames[0].kind is FrameKind.ACK and not garbled:
            self._step = _SecondaryStep.READ
            return self._transmit(now, encode_req_ud2(ADDRESS_NETWORK, False), _Expect.RSP_UD)
        # Collision: fix this digit and search the next position.
        level = self._stack[-1]
        self._push(level.pos + 1, self._probe_mask)
        return self._next_probe(now)

    def _on_reply(self, frame: MbusFrame | None, now: float) -> list[Action]:
        if self._step is _SecondaryStep.NKE:
            return self._next_probe(now)
        assert frame is not None
        try:
            telegram = decode_telegram(frame)
        except (RemoteProtocolError, NegativeResponse):
            self._unreadable.append(self._probe_mask)
            return self._next_probe(now)
        self._found.append(ScanHit(None, telegram.secondary_address, telegram))
        return self._next_probe(now)

    def _on_failure(self, error: DcudError, now: float) -> list[Action]:
        if self._step is _SecondaryStep.READ and isinstance(error, RemoteProtocolError):
            # Two slaves' E5s can merge into one clean E5; their RSP_UDs then collide. libmbus treats
            # a garbled answer to the read as a collision too: fix the digit and search deeper.
            level = self._stack[-1]
            self._push(level.pos + 1, self._probe_mask)
            return self._next_probe(now)
        # The selected slave did not deliver its RSP_UD: note it and keep scanning.
        self._unreadable.append(self._probe_mask)
        return self._next_probe(now)
