"""Data push (WM-E ``datapush_*``): scheduled delivery of readings from the outbox to FTP or MQTT.

The target is ``datapush_host`` (:func:`parse_push_target`): ``ftp://``/``ftps://`` (explicit TLS) files
(:mod:`dcud.service.ftp_push`) or ``mqtt://``/``mqtts://`` messages (:mod:`dcud.service.mqtt_push`).
The policy is here, as a small pure state machine (:class:`PushMachine`) that takes the time as an
argument, so tests drive it with an explicit clock:

Schedule
    Push cycles start on the boundaries of ``datapush_periodic`` (1, 5, 10, 15, 30, 60 minutes, 1 day),
    aligned to the wall clock in the configured time zone (:mod:`dcud.config.timekeeping`): a 15-minute
    cycle runs at :00, :15, :30, :45 local time, a daily one at local midnight. ``0`` ("table") means
    the per-meter schedules of dcud.toml: a cycle starts on every boundary of any meter's ``interval_s``
    (meters without one: 900 s). dcud.toml ``[datapush] period_s`` overrides the period (tests, demos);
    periods under a minute align on UTC epoch multiples.
Attempts
    A cycle takes up to ``[datapush] batch_items`` readings (in outbox order) and delivers them in one
    attempt (one FTP file set, or one batch of MQTT messages), bounded by ``datapush_timeout``. The items
    are acked only when the attempt succeeded; otherwise they go back to the outbox, in order. When a
    batch was full, the next attempt follows at once (a catch-up is a run of attempts, oldest first).
    An attempt that timed out halves the batch for the next one (a slow link still makes progress); each
    success doubles it again, up to ``batch_items``.
Retries and rest
    A failed attempt is retried after ``datapush_retry_delay`` seconds, up to ``datapush_max_retries``
    times (so at most ``1 + datapush_max_retries`` attempts in a row). After the last one fails, the push
    rests for ``datapush_interval`` seconds and then starts again with a fresh set of retries. Cycle
    boundaries that pass meanwhile add nothing: the data stays in the outbox and the next successful
    attempt takes it, oldest first.
State
    The retained state ``<p>/push/ftp/state`` (or ``<p>/push/mqtt/state``) shows the phase
    (``waiting``, ``due``, ``attempting``, ``retry_wait``, ``resting``), the attempt number, the next
    wake-up, last success, last error, counters and the outbox backlog of the consumer.

The WM-E modem case: when dcud.toml lists no meter and has exactly one RS-232/RS-485 line,
``datapush_iec_address`` (and ``datapush_iec_readout_baudrate``, the cap of the mode C baud switch) make
that line's IEC 62056-21 meter the source meter ``iec-1``, read on the push period.
"""

from __future__ import annotations

import datetime as dt
import math
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import unquote, urlsplit

from dcud.config.model import DataPushConfig
from dcud.config.timekeeping import TimeSettings
from dcud.errors import DcudError
from dcud.runtime.bus import EventBus
from dcud.runtime.supervisor import Service, ServiceContext
from dcud.runtime.timefmt import rfc3339
from dcud.service.outbox import Outbox, OutboxItem
from dcud.service.outbox_sink import AttemptRecord, ClockTimer, OutboxSink, SinkPolicy, Timer
from dcud.service.tls_banks import TlsBankError, file_client_context

if TYPE_CHECKING:
    from dcud.config.loader import LoadedConfig
    from dcud.runtime.events import EventSink
    from dcud.service.commands import CommandRouter
    from dcud.service.line import LineRegistry

__all__ = [
    "DEFAULT_TABLE_PERIOD_S",
    "READING_KINDS",
    "DataPushService",
    "DataPushServiceConfig",
    "Phase",
    "PushClock",
    "PushError",
    "PushMachine",
    "PushSchedule",
    "PushTarget",
    "RetryPolicy",
    "Uploader",
    "WallClock",
    "build_push_services",
    "next_boundary_s",
    "parse_push_target",
    "push_consumers",
    "rfc3339_or_none",
    "tls_context",
]

READING_KINDS: Final = frozenset({"reading"})
"""Outbox kinds the data push delivers (events go to the event push and MQTT)."""
DEFAULT_TABLE_PERIOD_S: Final = 900
"""Cycle of a meter without ``interval_s`` when ``datapush_periodic`` is 0 ("table")."""
SOURCE_METER_NAME: Final = "iec-1"
"""Name of the source meter of the WM-E modem case (no [[meter]] in dcud.toml)."""
_DEFAULT_PORTS: Final = {"ftp": 21, "ftps": 21, "mqtt": 1883, "mqtts": 8883}
_DAY_S: Final = 86_400


class PushError(DcudError):
    """A push attempt failed for a reason the target gave (refused login, bad reply, broker error)."""


# ------------------------------------------------------------------------------------------- target


@dataclass(frozen=True)
class PushTarget:
    """A parsed ``datapush_host``; the password is kept out of ``repr`` so it never reaches a log."""

    scheme: str
    host: str
    port: int
    username: str | None
    password: str | None = field(repr=False)
    path: str = ""

    @property
    def kind(self) -> str:
        """``ftp`` or ``mqtt``."""
        return "ftp" if self.scheme in ("ftp", "ftps") else "mqtt"

    @property
    def tls(self) -> bool:
        """Whether the connection uses TLS (``ftps``: explicit, AUTH TLS; ``mqtts``: from the start)."""
        return self.scheme in ("ftps", "mqtts")

    def redacted(self) -> str:
        """The URL with the password masked, for logs and state documents."""
        auth = f"{self.username}:***@" if self.password else (f"{self.username}@" if self.username else "")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{auth}{host}:{self.port}{self.path}"


def parse_push_target(url: str) -> PushTarget:
    """Parse ``datapush_host``; ``ValueError`` naming what is wrong (never the password)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"expected ftp://, ftps://, mqtt:// or mqtts://, got {scheme or 'no'} scheme")
    if not parts.hostname:
        raise ValueError("the URL has no host")
    path = unquote(parts.path).rstrip("/")
    return PushTarget(
        scheme=scheme,
        host=parts.hostname,
        port=port or _DEFAULT_PORTS[scheme],
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        path=path,
    )


# ----------------------------------------------------------------------------------------- schedule


def _offset_s(epoch_s: float, zone: dt.tzinfo) -> float:
    offset = dt.datetime.fromtimestamp(epoch_s, tz=dt.UTC).astimezone(zone).utcoffset()
    return offset.total_seconds() if offset is not None else 0.0


def next_boundary_s(now_s: float, period_s: float, zone: dt.tzinfo) -> float:
    """The first cycle boundary strictly after ``now_s`` (Unix seconds) for one period.

    Boundaries of periods of a minute or more are the instants whose local wall-clock time in ``zone``
    is a multiple of the period (for the WM-E periods: local midnight plus multiples). Around a DST
    switch they follow real time: in spring the first boundary after the gap is the switch itself (02:00
    does not exist; 03:00 is the next hour), in autumn the repeated hour has its boundaries twice, so a
    cycle still comes once per period of real time. Shorter periods (test overrides) align on UTC epoch
    multiples.
    """
    if period_s <= 0:
        raise ValueError(f"period must be positive, got {period_s}")
    if period_s < 60:
        return (math.floor(now_s / period_s) + 1) * period_s
    t = now_s
    offset = _offset_s(t, zone)
    candidate = (math.floor((t + offset) / period_s) + 1) * period_s - offset
    for _ in range(4):  # one offset change per candidate interval at most, in practice
        new_offset = _offset_s(candidate, zone)
        if new_offset == offset:
            return candidate
        # The offset changes in (lo, hi]; zone switches fall on whole seconds: find that second.
        lo, hi = math.floor(t), math.ceil(candidate)
        for _ in range(64):
            if hi - lo <= 1:
                break
            mid = (lo + hi) // 2
            if _offset_s(mid, zone) == offset:
                lo = mid
            else:
                hi = mid
        t, offset = float(hi), _offset_s(hi, zone)
        candidate = max(math.ceil((t + offset) / period_s) * period_s - offset, now_s)
        if candidate <= now_s:
            candidate += period_s
    return candidate


@dataclass(frozen=True)
class PushSchedule:
    """Cycle boundaries of one or more periods (several in "table" mode) in a time zone."""

    periods_s: tuple[float, ...]
    zone: dt.tzinfo = dt.UTC

    def __post_init__(self) -> None:
        if not self.periods_s or min(self.periods_s) <= 0:
            raise ValueError(f"need at least one positive period, got {self.periods_s}")

    def next_cycle_s(self, now_s: float) -> float:
        """The first boundary of any period strictly after ``now_s``."""
        return min(next_boundary_s(now_s, p, self.zone) for p in set(self.periods_s))


# ------------------------------------------------------------------------------------ state machine


@dataclass(frozen=True)
class RetryPolicy:
    """``datapush_timeout``, ``datapush_retry_delay``, ``datapush_max_retries``, ``datapush_interval``."""

    timeout_s: float = 15.0
    retry_delay_s: float = 60.0
    max_retries: int = 3
    rest_s: float = 86_400.0


class Phase(StrEnum):
    """Where the push is in its cycle."""

    WAITING = "waiting"
    """For the next cycle boundary."""
    DUE = "due"
    """An attempt should start now."""
    ATTEMPTING = "attempting"
    RETRY_WAIT = "retry_wait"
    """After a failed attempt, for ``retry_delay_s``."""
    RESTING = "resting"
    """After ``1 + max_retries`` failed attempts in a row, for ``rest_s``."""


class PushMachine:
    """Schedule and retry policy of one push target; pure: every method takes ``now`` (Unix seconds).

    The driver calls :meth:`poll` with the current time; when it returns True it calls :meth:`begin`,
    makes the attempt and reports :meth:`succeeded` (``more`` when the batch was full) or
    :meth:`failed`. :attr:`wake_at` is when :meth:`poll` will next return True.
    """

    def __init__(self, policy: RetryPolicy, next_cycle: Callable[[float], float], now: float) -> None:
        self.policy = policy
        self._next_cycle = next_cycle
        self.phase = Phase.WAITING
        self.wake_at = next_cycle(now)
        self.failures = 0
        """Failed attempts in a row in the current round (reset by a success and after a rest)."""
        self.attempts = 0
        self.successes = 0
        self.failures_total = 0
        self.rests = 0
        self.cycles = 0
        self.last_error: str | None = None
        self._last_now = now

    def _clock_went_back(self, now: float) -> None:
        # A backward clock step (NTP) must not stretch a retry delay or a rest by the step.
        step = now - self._last_now
        if self.phase in (Phase.RETRY_WAIT, Phase.RESTING):
            self.wake_at += step
        elif self.phase is Phase.WAITING:
            self.wake_at = self._next_cycle(now)

    def poll(self, now: float) -> bool:
        """Advance to ``now``; True when an attempt is due."""
        if now < self._last_now - 1.0:
            self._clock_went_back(now)
        self._last_now = now
        if self.phase in (Phase.WAITING, Phase.RETRY_WAIT, Phase.RESTING) and now >= self.wake_at:
            if self.phase is Phase.RESTING:
                self.failures = 0  # a fresh round of retries after the rest
            elif self.phase is Phase.WAITING:
                self.cycles += 1
            self.phase = Phase.DUE
        return self.phase is Phase.DUE

    def begin(self, now: float) -> int:
        """Start an attempt; returns its number within the current round (1 = first try)."""
        if self.phase is not Phase.DUE:
            raise RuntimeError(f"begin() in phase {self.phase}")
        self.phase = Phase.ATTEMPTING
        self.attempts += 1
        self._last_now = now
        return self.failures + 1

    def succeeded(self, now: float, more: bool) -> None:
        """The attempt delivered its batch; ``more``: the batch was full, go on at once."""
        self._expect_attempt()
        self.successes += 1
        self.failures = 0
        self.last_error = None
        if more:
            self.phase, self.wake_at = Phase.DUE, now
        else:
            self.phase, self.wake_at = Phase.WAITING, self._next_cycle(now)

    def failed(self, now: float, error: str) -> None:
        """The attempt failed: retry after the delay, or rest once the retries are spent."""
        self._expect_attempt()
        self.failures += 1
        self.failures_total += 1
        self.last_error = error
        if self.failures <= self.policy.max_retries:
            self.phase, self.wake_at = Phase.RETRY_WAIT, now + self.policy.retry_delay_s
        else:
            self.rests += 1
            self.phase, self.wake_at = Phase.RESTING, now + self.policy.rest_s

    waits_for_items = False
    """A due cycle runs on an empty outbox too (an attempt with nothing to push)."""
    overlapping = False

    @property
    def resting(self) -> bool:
        """The retries are spent: the push rests for ``datapush_interval``."""
        return self.phase is Phase.RESTING

    def _expect_attempt(self) -> None:
        if self.phase is not Phase.ATTEMPTING:
            raise RuntimeError(f"attempt outcome reported in phase {self.phase}")


# ----------------------------------------------------------------------------------------- service


PushClock = Timer
"""Where the push service gets "now" and how it waits (injectable for tests): the engine's Timer."""


class WallClock(ClockTimer):
    """The real clock: ``time.time()`` and the supervisor's beating sleep."""


class Uploader(Protocol):
    """One push transport: delivers a batch of outbox items, or raises."""

    consumer: str
    """Outbox consumer name (``ftp``, ``mqtt-push``)."""

    async def deliver(self, items: Sequence[OutboxItem], now_s: float) -> dict[str, Any]:
        """Deliver ``items`` completely or raise (``PushError``, ``OSError``, ``TimeoutError``).

        Returns details for the state document (file names...). May keep a session open between calls.
        """
        ...

    async def close(self) -> None:
        """End the session (after a cycle, a failure or at stop); never raises."""
        ...


@dataclass(frozen=True)
class DataPushServiceConfig:
    """The data push service's slice of the configuration."""

    target: PushTarget
    policy: RetryPolicy
    periods_s: tuple[float, ...]
    time: TimeSettings
    device_id: str
    prefix: str
    table_mask: int
    options: DataPushConfig
    state_dir: Path

    @classmethod
    def from_config(cls, config: LoadedConfig) -> DataPushServiceConfig | None:
        """The slice, or None when ``datapush_host`` is unset."""
        params = config.params
        url = params.get_opt_str("datapush_host")
        if not url:
            return None
        target = parse_push_target(url)  # the catalogue validated the scheme; this cannot fail then
        options = config.toml.datapush
        if options.period_s is not None:
            periods: tuple[float, ...] = (options.period_s,)
        else:
            periodic = params.get_int("datapush_periodic")
            if periodic > 0:
                periods = (float(periodic),)
            else:
                periods = tuple(
                    sorted(
                        {
                            float(m.interval_s or DEFAULT_TABLE_PERIOD_S)
                            for m in config.toml.meter
                            if m.enabled
                        }
                    )
                ) or (float(DEFAULT_TABLE_PERIOD_S),)
        return cls(
            target=target,
            policy=RetryPolicy(
                timeout_s=params.get_float("datapush_timeout"),
                retry_delay_s=params.get_float("datapush_retry_delay"),
                max_retries=params.get_int("datapush_max_retries"),
                rest_s=params.get_float("datapush_interval"),
            ),
            periods_s=periods,
            time=TimeSettings.from_config(config),
            device_id=config.device_id,
            prefix=params.get_opt_str("datapush_prefix") or "dcud",
            table_mask=params.get_int("datapush_table_mask"),
            options=options,
            state_dir=config.state_dir,
        )

    @property
    def state_name(self) -> str:
        """Subtopic of the retained state: ``push/ftp`` or ``push/mqtt``."""
        return f"push/{self.target.kind}"


def tls_context(options: DataPushConfig) -> ssl.SSLContext:
    """Client TLS context for ``ftps://``/``mqtts://`` from dcud.toml ``[datapush]`` (the one factory,
    :func:`dcud.service.tls_banks.file_client_context`); an unusable file is a failed attempt."""
    try:
        return file_client_context(
            ca_file=options.ca_file,
            cert_file=options.cert_file,
            key_file=options.key_file,
            verify=options.tls_verify,
        )
    except TlsBankError as exc:
        raise PushError(f"TLS: {exc}") from exc


def rfc3339_or_none(epoch_s: float | None) -> str | None:
    """UTC RFC 3339 with ``Z``, or None."""
    return None if epoch_s is None else rfc3339(epoch_s)


class DataPushService:
    """Supervised service ``datapush``: the outbox consumer engine on the :class:`PushMachine` schedule,
    delivering through one :class:`Uploader` (all or nothing per attempt)."""

    name = "datapush"

    def __init__(
        self,
        config: DataPushServiceConfig,
        bus: EventBus,
        outbox: Outbox,
        uploader: Uploader,
        clock: PushClock | None = None,
    ) -> None:
        self.config = config
        self._bus = bus
        self._uploader = uploader
        self._clock: PushClock = clock or WallClock()
        self.schedule = PushSchedule(config.periods_s, config.time.zone())
        self.machine: PushMachine | None = None
        self.last_details: dict[str, Any] = {}
        self.engine = OutboxSink(
            outbox,
            SinkPolicy(
                uploader.consumer,
                batch_items=config.options.batch_items,
                kinds=READING_KINDS,
                timeout_s=config.policy.timeout_s,
                adaptive_batch=True,
                retry_on=(PushError, OSError, TimeoutError),
                failed_message="data push failed",
                recovered_message="data push recovered",
            ),
            PushMachine(config.policy, self.schedule.next_cycle_s, self._clock.now()),
            timer=self._clock,
            hold=self._on_battery,
            on_change=self._publish,
            log_fields={"target": config.target.redacted()},
        )

    @property
    def consumer(self) -> str:
        """The outbox consumer this service delivers for."""
        return self._uploader.consumer

    @property
    def pushed_items(self) -> int:
        """Items delivered (acked) since this service object was made."""
        return self.engine.delivered_items

    @property
    def attempt_log(self) -> deque[AttemptRecord]:
        """The latest attempts (bounded)."""
        return self.engine.attempt_log

    @property
    def last_success_s(self) -> float | None:
        """When the last attempt with readings succeeded."""
        return self.engine.last_success_s

    @property
    def last_error(self) -> dict[str, Any] | None:
        """``{"ts", "message", "attempt"}`` of the last failed attempt."""
        return self.engine.last_error

    async def run(self, ctx: ServiceContext) -> None:
        """Wait for due attempts and make them, until stopped (the engine's loop)."""
        machine = PushMachine(self.config.policy, self.schedule.next_cycle_s, self._clock.now())
        self.machine = machine
        self.engine.schedule = machine
        ctx.log.info(
            "data push ready",
            target=self.config.target.redacted(),
            periods_s=list(self.config.periods_s),
            next_cycle=rfc3339_or_none(machine.wake_at),
        )
        await self.engine.run(ctx, self, close=self._uploader.close)

    async def deliver(self, items: Sequence[OutboxItem]) -> list[int]:
        """The engine's :class:`~dcud.service.outbox_sink.Sink`: one attempt through the uploader,
        stamped with the attempt's start (FTP file names); all or nothing."""
        started = self.engine.attempt_started_s
        self.last_details = await self._uploader.deliver(
            items, self._clock.now() if started is None else started
        )
        return [item.seq for item in items]

    def _on_battery(self) -> bool:
        from dcud.service.power import power_ok

        return not power_ok(self._bus)  # no pushes on hold-up energy; the data waits in the outbox

    def state_document(self) -> dict[str, Any]:
        """The retained ``push/<target>`` document."""
        machine = self.machine
        engine = self.engine
        doc: dict[str, Any] = {
            "target": self.config.target.redacted(),
            "consumer": self.consumer,
            "backlog": engine.backlog(),
            "in_flight": engine.in_flight(),
            "pushed_items": engine.delivered_items,
            "last_success": rfc3339_or_none(engine.last_success_s),
            "last_error": engine.last_error,
            "batch_items": engine.batch_items,
        }
        if machine is not None:
            doc.update(
                {
                    "phase": str(machine.phase),
                    "attempt": machine.failures + (1 if machine.phase is Phase.ATTEMPTING else 0),
                    "max_retries": machine.policy.max_retries,
                    "retry_delay_s": machine.policy.retry_delay_s,
                    "rest_s": machine.policy.rest_s,
                    "next_wakeup": None
                    if machine.phase is Phase.ATTEMPTING
                    else rfc3339_or_none(machine.wake_at),
                    "counters": {
                        "cycles": machine.cycles,
                        "attempts": machine.attempts,
                        "successes": machine.successes,
                        "failures": machine.failures_total,
                        "rests": machine.rests,
                    },
                }
            )
        files = self.last_details.get("files")
        if files:
            doc["last_files"] = files
        return doc

    def _publish(self) -> None:
        self._bus.set_state(self.config.state_name, self.state_document())


# ----------------------------------------------------------------------------------------- builders


def push_consumers(config: LoadedConfig) -> list[str]:
    """Outbox consumers of the push services this configuration runs (``consumers_for`` adds them)."""
    from dcud.service.eventpush import EventPushConfig

    consumers: list[str] = []
    url = config.params.get_opt_str("datapush_host")
    if url:
        consumers.append("ftp" if parse_push_target(url).kind == "ftp" else "mqtt-push")
    event = EventPushConfig.from_config(config)
    if event is not None and event.sends:
        consumers.append(event.consumer)
    return consumers


def _make_uploader(slice_: DataPushServiceConfig) -> Uploader:
    if slice_.target.kind == "ftp":
        from dcud.service.ftp_push import FtpUploader

        return FtpUploader.from_slice(slice_)
    from dcud.service.mqtt_push import MqttPusher

    return MqttPusher.from_slice(slice_)


def _source_meter_services(
    config: LoadedConfig,
    lines: LineRegistry,
    bus: EventBus,
    outbox: Outbox,
    commands: CommandRouter,
    event: EventSink,
) -> list[Service]:
    """The WM-E modem case: one IEC meter on the only serial line, without a [[meter]] list."""
    toml, params = config.toml, config.params
    if toml.meter or len(toml.line) != 1:
        return []
    from dcud.config.model import MeterConfig
    from dcud.service.polling import FALLBACK_INTERVAL_S, PollingConfig, PollingService

    iec_lines = [line for line in toml.line if line.kind != "mbus"]
    address = params.get_opt_str("datapush_iec_address")
    if len(iec_lines) != 1 or len(toml.line) != 1:
        return []
    if address is None and not params.get_opt_str("datapush_host"):
        return []
    baud = params.get_opt_int("datapush_iec_readout_baudrate")
    meter = MeterConfig(
        name=SOURCE_METER_NAME,
        line=iec_lines[0].name,
        protocol="iec62056-21",
        address=address or "",
        max_baud=baud,  # type: ignore[arg-type]  # the catalogue allows only valid Baud values
    )
    periodic = params.get_int("datapush_periodic")
    slice_ = PollingConfig(
        meters=(meter,),
        lines=(iec_lines[0],),
        default_interval_s=periodic or FALLBACK_INTERVAL_S,
        iec_max_baud=baud,
        state_dir=str(config.state_dir),
    )
    return [PollingService(slice_, lines, bus, outbox, commands=commands, event=event)]


def build_push_services(
    config: LoadedConfig,
    *,
    lines: LineRegistry,
    bus: EventBus,
    outbox: Outbox,
    commands: CommandRouter,
    event: EventSink,
    status: Callable[[], dict[str, object]],
) -> Sequence[Service]:
    """Data push, event push, device-manager push and the WM-E source meter (``SERVICE_BUILDERS``)."""
    from dcud.service.dm_push import DmPushConfig, DmPushService
    from dcud.service.eventpush import EventPushConfig, EventPushService

    services: list[Service] = []
    data = DataPushServiceConfig.from_config(config)
    if data is not None:
        services.append(DataPushService(data, bus, outbox, _make_uploader(data)))
    services.extend(_source_meter_services(config, lines, bus, outbox, commands, event))
    event_push = EventPushConfig.from_config(config)
    if event_push is not None:
        services.append(EventPushService(event_push, bus, outbox))
    dm = DmPushConfig.from_config(config)
    if dm is not None:
        services.append(DmPushService(dm, bus, status))
    return services
