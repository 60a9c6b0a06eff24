"""The relay output (``em_relay``) and the LEDs (``led1``..``led6``): applied where the hardware exists.

One supervised service ``outputs``. At start it looks for the hardware, applies the parameters, publishes
the retained states ``relay`` and ``leds`` (``<p>/relay/state``, ``<p>/leds/state``) and logs one line
saying what is present and what is not; a part that is not present is reported so, never an error.

Relay (dcud.toml ``[relay]``: ``source = "file"`` with ``path``, or ``"gpio"`` with ``chip`` and
``gpio_line``; ``active_low``; default ``none``: this DCU has no relay)
    ``em_relay`` is the WM-E's "Tariff Mode Selection / Relay control for e-meter" (values 0-None,
    10-1R, 20-1T, 30-1T2, 40-1T; the seed's labels are garbled: 20 and 40 are both "1T"). dcud reads
    the value as the position of one tariff relay contact: 0 (None), 20 and 40 (tariff 1) release it,
    10 (relay) and 30 (tariff 2) energise it. Unset (the seed's default ``-``): dcud does not touch the
    relay at all (a GPIO line is not even requested). A file relay is present when its file exists
    (``1``/``0`` is written, inverted by ``active_low``); a GPIO relay when its line can be requested as
    an output (its first value travels in the request, so the contact never glitches).

LEDs (dcud.toml ``[leds]``: ``root``, default ``/sys/class/leds``, and which Linux LED is WM-E LED N,
default ``led1``..``led6``)
    An LED is present when ``<root>/<name>/brightness`` exists. The seed gives no list for the LED
    meaning codes, so the codes are dcud's own (:data:`LED_MEANINGS`): 0 off, 1 on (dcud runs), 2 uplink
    reachable (connectivity watchdog), 3 clock synchronised (NTP), 4 every meter reading ``ok``, 5 alarm
    (power lost or an input active). dcud takes an LED it drives from its kernel trigger (writes
    ``none`` to ``trigger``) and sets ``brightness`` to 0 or ``max_brightness``; other codes leave the
    LED to the kernel and the ``leds`` state says "not implemented". The LEDs follow the bus states
    (power, clock, uplink, meters, inputs) as they change; they are left as they are when dcud stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from dcud.config.model import LedsConfig
from dcud.runtime.bus import EventBus, JsonObject
from dcud.runtime.supervisor import ServiceContext
from dcud.service.levels import GpioOutput

if TYPE_CHECKING:
    from dcud.config.loader import LoadedConfig

LED_PARAMS: Final = ("led1", "led2", "led3", "led4", "led5", "led6")

LED_MEANINGS: Final[dict[int, str]] = {
    0: "off",
    1: "on",
    2: "uplink",
    3: "clock",
    4: "meters",
    5: "alarm",
}
"""dcud's LED meaning codes (the seed has no list); other codes are not implemented."""

RELAY_MODES: Final[dict[int, tuple[str, bool]]] = {
    0: ("None", False),
    10: ("1R", True),
    20: ("1T", False),
    30: ("1T2", True),
    40: ("1T", False),
}
"""``em_relay`` value -> (seed label, relay energised)."""

_WATCHED_STATES: Final = ("power", "clock", "uplink")
_WATCHED_PREFIXES: Final = ("meter/", "input/")


def led_wanted(meaning: int, states: Mapping[str, JsonObject]) -> bool | None:
    """Whether an LED with ``meaning`` is lit given the bus states; None when the code is not dcud's."""
    name = LED_MEANINGS.get(meaning)
    if name is None:
        return None
    if name == "off":
        return False
    if name == "on":
        return True
    if name == "uplink":
        return states.get("uplink", {}).get("reachable") is True
    if name == "clock":
        return states.get("clock", {}).get("synced") is True
    if name == "meters":
        meters = [doc for topic, doc in states.items() if topic.startswith("meter/")]
        return bool(meters) and all(doc.get("quality") == "ok" for doc in meters)
    # alarm
    if states.get("power", {}).get("state") == "lost":
        return True
    return any(topic.startswith("input/") and doc.get("state") == "active" for topic, doc in states.items())


@dataclass(frozen=True)
class OutputsConfig:
    """The outputs service's slice: ``[leds]``, ``[relay]``, ``led1``..``led6`` and ``em_relay``."""

    leds_root: str
    leds: tuple[tuple[str, str, int], ...]
    """(parameter, Linux LED name or "" when not wired, meaning code) per WM-E LED."""
    relay_source: str
    relay_path: str
    relay_chip: str
    relay_gpio_line: int
    relay_active_low: bool
    relay_mode: int | None

    @classmethod
    def from_config(cls, config: LoadedConfig) -> OutputsConfig:
        """The slice."""
        params = config.params
        table = config.toml.leds
        # Without [leds] (the service runs for a [relay] alone) no LED is looked for: none is wired.
        names = table.names() if table is not None else dict.fromkeys(LED_PARAMS, "")
        leds = tuple((p, names[p], params.get_opt_int(p) or 0) for p in LED_PARAMS)
        relay = config.toml.relay
        return cls(
            leds_root=table.root if table is not None else LedsConfig().root,
            leds=leds,
            relay_source=relay.source,
            relay_path=relay.path,
            relay_chip=relay.chip,
            relay_gpio_line=relay.gpio_line,
            relay_active_low=relay.active_low,
            relay_mode=params.get_opt_int("em_relay"),
        )


@dataclass
class _Led:
    param: str
    name: str
    meaning: int
    directory: Path | None
    on: bool | None = None
    max_brightness: int = 1
    error: str = ""

    @property
    def present(self) -> bool:
        return self.directory is not None

    def document(self) -> dict[str, Any]:
        implemented = self.meaning in LED_MEANINGS
        return {
            "name": self.name or None,
            "present": self.present,
            "meaning": self.meaning,
            "meaning_name": LED_MEANINGS.get(self.meaning),
            "applied": self.present and implemented and not self.error,
            "on": self.on,
            "note": None if implemented else f"meaning {self.meaning} not implemented; left to the kernel",
            "error": self.error or None,
        }


def _write(path: Path, text: str) -> None:
    with open(path, "w", encoding="ascii") as handle:
        handle.write(text)


class OutputsService:
    """Supervised service ``outputs``: relay and LEDs (module doc)."""

    name = "outputs"

    def __init__(self, config: OutputsConfig, bus: EventBus) -> None:
        self.config = config
        self._bus = bus
        self._leds: list[_Led] = []
        self._relay: GpioOutput | None = None
        self.relay_on: bool | None = None
        self.relay_present: bool | None = None
        self.relay_error = ""

    # -- relay ---------------------------------------------------------------------------------

    def _apply_relay(self) -> None:
        cfg = self.config
        mode = cfg.relay_mode
        wanted = RELAY_MODES[mode][1] if mode in RELAY_MODES else None
        if cfg.relay_source == "none":
            self.relay_present = False
        elif cfg.relay_source == "file":
            self.relay_present = os.path.exists(cfg.relay_path)
            if self.relay_present and wanted is not None:
                try:
                    _write(Path(cfg.relay_path), "1\n" if wanted != cfg.relay_active_low else "0\n")
                    self.relay_on = wanted
                except OSError as exc:
                    self.relay_error = f"cannot write {cfg.relay_path}: {exc.strerror or exc}"
        elif wanted is None:
            # Requesting the line as an output would drive it: with em_relay unset it is not touched.
            self.relay_present = os.path.exists(cfg.relay_chip)
        else:
            try:
                self._relay = GpioOutput(
                    cfg.relay_chip, cfg.relay_gpio_line, wanted, cfg.relay_active_low, consumer="dcud-relay"
                )
                self.relay_present = True
                self.relay_on = wanted
            except OSError as exc:
                self.relay_present = False
                self.relay_error = (
                    f"cannot drive line {cfg.relay_gpio_line} of {cfg.relay_chip}: {exc.strerror or exc}"
                )

    def _relay_document(self) -> dict[str, Any]:
        cfg = self.config
        mode = cfg.relay_mode
        return {
            "present": self.relay_present,
            "source": cfg.relay_source,
            "em_relay": mode,
            "label": RELAY_MODES[mode][0] if mode in RELAY_MODES else None,
            "on": self.relay_on,
            "applied": self.relay_on is not None,
            "error": self.relay_error or None,
        }

    # -- LEDs ----------------------------------------------------------------------------------

    def _discover_leds(self) -> None:
        root = Path(self.config.leds_root)
        self._leds = []
        for param, name, meaning in self.config.leds:
            directory = root / name if name else None
            if directory is not None and not (directory / "brightness").exists():
                directory = None
            led = _Led(param, name, meaning, directory)
            if directory is not None:
                with contextlib.suppress(OSError, ValueError):
                    led.max_brightness = max(1, int((directory / "max_brightness").read_text().strip()))
            self._leds.append(led)

    def _take_from_trigger(self, led: _Led) -> None:
        assert led.directory is not None
        trigger = led.directory / "trigger"
        with contextlib.suppress(FileNotFoundError):
            current = trigger.read_text()
            # The kernel lists every trigger with the active one in brackets.
            if "[none]" not in current and current.strip() != "none":
                _write(trigger, "none")

    def _apply_leds(self, ctx: ServiceContext) -> bool:
        """Set every present LED with a dcud meaning to what the states say; True when a state changed."""
        changed = False
        states = self._bus.states
        for led in self._leds:
            if not led.present or led.meaning not in LED_MEANINGS:
                continue
            wanted = led_wanted(led.meaning, states)
            if wanted is None or wanted == led.on:
                continue
            assert led.directory is not None
            try:
                if led.on is None:  # not driven yet: take it from its kernel trigger first
                    self._take_from_trigger(led)
                _write(led.directory / "brightness", str(led.max_brightness if wanted else 0))
            except OSError as exc:
                error = f"cannot write {led.directory}: {exc.strerror or exc}"
                if error != led.error:
                    ctx.log.warning("LED not applied", led=led.param, name=led.name, error=error)
                    led.error = error
                    changed = True
                continue
            changed = True
            led.on = wanted
            led.error = ""
        return changed

    def _leds_document(self) -> dict[str, Any]:
        return {"root": self.config.leds_root, "leds": {led.param: led.document() for led in self._leds}}

    def _publish(self) -> None:
        self._bus.set_state("relay", self._relay_document())
        self._bus.set_state("leds", self._leds_document())

    # -- service -------------------------------------------------------------------------------

    def _summary(self, ctx: ServiceContext) -> None:
        """The one start-up line: what is present, what is applied, what is not there."""
        cfg = self.config
        present = [f"{led.param}={led.name}" for led in self._leds if led.present]
        absent = [led.param for led in self._leds if not led.present]
        if not self.relay_present:
            relay = "not present"
        elif self.relay_on is None:
            relay = "present, em_relay unset: not driven"
        else:
            relay = f"{'on' if self.relay_on else 'off'} (em_relay={cfg.relay_mode})"
        fields: dict[str, Any] = {"relay": relay, "leds_root": cfg.leds_root}
        if self.relay_error:
            fields["relay_error"] = self.relay_error
        fields["leds_present"] = ", ".join(present) or "none"
        if absent:
            fields["leds_not_present"] = ", ".join(absent)
        ctx.log.info("relay and LEDs", **fields)

    async def run(self, ctx: ServiceContext) -> None:
        """Apply, report, then keep the LEDs following the states until stopped."""
        self._apply_relay()
        self._discover_leds()
        self._apply_leds(ctx)
        self._publish()
        self._summary(ctx)
        ctx.set_ready()
        try:
            dynamic = any(
                led.present and LED_MEANINGS.get(led.meaning) not in (None, "off", "on") for led in self._leds
            )
            if not dynamic:
                await ctx.heartbeat_forever()
                return
            await self._follow(ctx)
        finally:
            if self._relay is not None:
                self._relay.close()
                self._relay = None

    async def _follow(self, ctx: ServiceContext) -> None:
        dirty = asyncio.Event()

        def on_state(subtopic: str, _payload: JsonObject) -> None:
            if subtopic in _WATCHED_STATES or subtopic.startswith(_WATCHED_PREFIXES):
                dirty.set()

        unlisten: Callable[[], None] = self._bus.listen(on_state)
        stopping = asyncio.ensure_future(ctx.stopping.wait())
        try:
            while not ctx.stopping.is_set():
                waiter = asyncio.ensure_future(dirty.wait())
                try:
                    await asyncio.wait(
                        [waiter, stopping], timeout=ctx.liveness_s / 3, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    waiter.cancel()
                ctx.beat()
                if dirty.is_set() and not ctx.stopping.is_set():
                    dirty.clear()
                    if self._apply_leds(ctx):
                        self._bus.set_state("leds", self._leds_document())
        finally:
            stopping.cancel()
            unlisten()
