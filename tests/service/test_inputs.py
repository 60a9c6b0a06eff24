"""Digital inputs, relay and LEDs: the shared level watcher on an injected clock, the ``[[input]]`` /
``[leds]`` / ``[relay]`` tables, the input service in-process, the outputs against a temporary sysfs tree,
and an input on a file source end to end (``python -m dcud run`` with Mosquitto, snmptrapd and a UDP
receiver): flapping debounced, each change exactly one event, one UDP event push, one trap."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from dcud.config.loader import load_config
from dcud.errors import ConfigError
from dcud.runtime.bus import EventBus
from dcud.runtime.supervisor import ServiceContext
from dcud.service import levels, snmp_mib
from dcud.service.eventpush import EventPushConfig
from dcud.service.inputs import InputService, InputServiceConfig, event_text, load_record
from dcud.service.outputs import OutputsConfig, OutputsService, led_wanted
from dcud.sim.peers import Mosquitto

from helpers.alarm import PREFIX, UdpSink, is_trap, power_toml, set_power, snmp_params, trap_receiver
from helpers.daemon import daemon_log, start_daemon, write_site
from helpers.meters import wait_until
from helpers.mqtt import Subscriber
from helpers.notify import NotifySocket

# -- the watcher on an injected clock --------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class ScriptedSource:
    """A level that follows a script of (time, level) on the injected clock; ``wait`` advances the clock
    (to the next scripted edge, the way an edge-event source wakes early, or by the timeout)."""

    def __init__(self, clock: Clock, script: list[tuple[float, bool | None]], edges: bool = False) -> None:
        self.clock = clock
        self.script = sorted(script)
        self.edges = edges
        self.waits = 0

    def read(self) -> bool | None:
        level: bool | None = None
        for at, value in self.script:
            if at <= self.clock.t:
                level = value
        return level

    async def wait(self, timeout_s: float) -> None:
        self.waits += 1
        target = self.clock.t + timeout_s
        if self.edges:
            target = min([target] + [at for at, _ in self.script if self.clock.t < at < target])
        self.clock.t = target
        await asyncio.sleep(0)

    def close(self) -> None:
        pass


async def watch(
    source: levels.LevelSource, clock: Clock, until_t: float, **kw: float
) -> list[tuple[float, Any]]:
    watcher = levels.LevelWatcher(source, clock=clock, **{"poll_interval_s": 0.01, "debounce_s": 0.5, **kw})
    stopping = asyncio.Event()
    seen: list[tuple[float, Any]] = [(clock.t, ("initial", watcher.read_initial()))]

    def beat() -> None:
        if clock.t >= until_t:
            stopping.set()

    async for change in watcher.changes(stopping, beat):
        seen.append((round(clock.t, 6), (change.kind, change.level)))
        assert len(seen) < 100
    return seen


@pytest.mark.parametrize("edges", [False, True])
async def test_watcher_flapping_within_the_debounce_window_raises_nothing(edges: bool) -> None:
    clock = Clock()
    # Pulses to 1 of 0.4 s, each written back to 0 within one 0.5 s debounce window, for 4 s, then
    # shorter and shorter bounces; never stable at 1 for 0.5 s.
    script: list[tuple[float, bool | None]] = [(0.0, False)]
    t = 101.0
    for width in [0.4] * 10 + [0.2, 0.1, 0.05, 0.01, 0.001]:
        script += [(t, True), (t + width, False)]
        t += width + 0.05
    source = ScriptedSource(clock, script, edges=edges)
    seen = await watch(source, clock, until_t=t + 3)
    assert seen[0][1] == ("initial", False)
    assert seen[1:] == []
    assert source.waits <= 2000  # bounded: the loop samples at the poll interval, not faster


@pytest.mark.parametrize("edges", [False, True])
async def test_watcher_each_stable_change_is_reported_once_after_the_debounce_time(edges: bool) -> None:
    clock = Clock()
    # Bounces around each real edge, then stable: exactly one change per edge.
    script: list[tuple[float, bool | None]] = [
        (0.0, False),
        (101.0, True),
        (101.002, False),
        (101.004, True),  # stable from here
        (104.0, False),  # stable from here
    ]
    seen = await watch(ScriptedSource(clock, script, edges=edges), clock, until_t=106.0)
    changes = [(t, c) for t, c in seen[1:]]
    assert [c for _, c in changes] == [("change", True), ("change", False)]
    # On the injected clock: accepted debounce_s after the first sample of the settled level (polling
    # may not see a bounce between two samples at all), within one poll interval.
    assert 101.5 <= changes[0][0] <= 101.504 + 0.011
    assert 104.5 <= changes[1][0] <= 104.5 + 0.011


class ScriptedFile(levels.FileSource):
    """The real file source; its ``wait`` advances the injected clock and makes the scripted writes
    (atomic replaces, as sysfs never shows a half-written value) whose time has come."""

    def __init__(self, path: Path, clock: Clock, writes: list[tuple[float, int]]) -> None:
        super().__init__(str(path))
        self.clock = clock
        self.writes = sorted(writes)

    async def wait(self, timeout_s: float) -> None:
        self.clock.t += timeout_s
        while self.writes and self.writes[0][0] <= self.clock.t:
            set_level(Path(self.path), self.writes.pop(0)[1])
        await asyncio.sleep(0)


async def test_watcher_on_a_file_flapping_back_within_one_debounce_window(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "door"
    set_level(path, 0)
    writes: list[tuple[float, int]] = []
    t = 101.0
    for _ in range(30):  # 1 for 0.3 s, back to 0 within the 0.5 s window, 0 for 0.1 s: 12 s of flapping
        writes += [(t, 1), (t + 0.3, 0)]
        t += 0.4
    writes += [(t + 1, 1), (t + 3, 0)]  # then two stable changes
    source = ScriptedFile(path, clock, writes)
    seen = await watch(source, clock, until_t=t + 5)
    assert [c for _, c in seen] == [("initial", False), ("change", True), ("change", False)]
    assert [at for at, _ in seen[1:]] == [
        pytest.approx(t + 1.5, abs=0.011),
        pytest.approx(t + 3.5, abs=0.011),
    ]


async def test_watcher_reports_unreadable_and_first_level_once() -> None:
    clock = Clock()
    script: list[tuple[float, bool | None]] = [(0.0, None), (101.0, True), (102.0, None), (103.0, True)]
    seen = await watch(ScriptedSource(clock, script), clock, until_t=104.0)
    kinds = [c for _, c in seen]
    assert kinds == [
        ("initial", None),
        ("unreadable", None),  # once, not once per sample
        ("readable", True),
        ("first", True),  # the first readable level: no debounce, the caller reconciles
        ("unreadable", None),
        ("readable", True),  # same level as accepted: no change
    ]


def test_gpio_output_request_layout_matches_the_kernel_header() -> None:
    # linux/gpio.h: sizeof(struct gpio_v2_line_request) == 592, config at 288, config.attrs at 320,
    # GPIO_V2_LINE_SET_VALUES_IOCTL == _IOWR(0xB4, 0x0F, struct gpio_v2_line_values) == 0xC010B40F.
    request = levels.gpio_output_request(23, "dcud-relay", True)
    assert len(request) == 592
    assert levels.GPIO_V2_LINE_SET_VALUES_IOCTL == 0xC010B40F
    assert int.from_bytes(request[0:4], "little") == 23
    assert request[256:266] == b"dcud-relay"
    assert int.from_bytes(request[288:296], "little") == 1 << 3  # GPIO_V2_LINE_FLAG_OUTPUT
    assert int.from_bytes(request[296:300], "little") == 1  # num_attrs
    assert int.from_bytes(request[320:324], "little") == 2  # GPIO_V2_LINE_ATTR_ID_OUTPUT_VALUES
    assert int.from_bytes(request[328:336], "little") == 1  # values: line 0 high
    assert int.from_bytes(request[336:344], "little") == 1  # mask: line 0
    assert int.from_bytes(request[560:564], "little") == 1  # num_lines
    low = levels.gpio_output_request(23, "dcud-relay", False)
    assert int.from_bytes(low[328:336], "little") == 0


# -- configuration ---------------------------------------------------------------------------------


def write_config(tmp_path: Path, toml: str, wme: str = "") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "wme.conf").write_text(wme)
    path = tmp_path / "dcud.toml"
    path.write_text(f'device_id = "d"\nstate_dir = "{tmp_path / "state"}"\n{toml}')
    return path


def issues_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [str(i) for i in info.value.issues]


def test_input_tables_load_with_defaults(tmp_path: Path) -> None:
    config = load_config(
        write_config(
            tmp_path,
            '[[input]]\nname = "door"\nsource = "file"\npath = "/run/dcud/door"\n\n'
            '[[input]]\nname = "tamper"\nsource = "gpio"\ngpio_line = 5\nactive_low = true\n',
        )
    )
    door, tamper = config.toml.input
    assert (door.name, door.source, door.path, door.debounce_s, door.poll_interval_s) == (
        "door",
        "file",
        "/run/dcud/door",
        0.1,
        0.05,
    )
    assert (tamper.chip, tamper.gpio_line, tamper.active_low) == ("/dev/gpiochip0", 5, True)
    assert config.toml.leds is None  # no [leds]: the DCU's LEDs are not WM-E LEDs, no outputs service
    assert config.toml.relay.source == "none"


def test_input_errors_name_file_line_and_key(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[[input]]\nname = "door"\nsource = "file"\npath = "/a"\n\n'  # lines 3-6
        '[[input]]\nname = "door"\nsource = "file"\npath = "/b"\n\n'  # lines 8-11
        '[[input]]\nname = "nopath"\nsource = "file"\n\n'  # lines 13-15
        '[[input]]\nname = "g1"\nsource = "gpio"\ngpio_line = 3\n\n'  # 17-20
        '[[input]]\nname = "g2"\nsource = "gpio"\ngpio_line = 3\n\n'  # 22-25
        '[relay]\nsource = "gpio"\ngpio_line = 3\n',  # 27-29
    )
    found = issues_of(path)
    assert f'{path}:9: input[door].name: duplicate input name "door"' in found
    assert f"{path}:13: input[nopath].path: required when source is file" in found
    assert f"{path}:25: input[g2].gpio_line: line 3 of /dev/gpiochip0 is also input g1" in found
    assert f"{path}:29: relay.gpio_line: line 3 of /dev/gpiochip0 is also input g1" in found


def test_input_unknown_key_source_and_bad_led_name_are_errors(tmp_path: Path) -> None:
    found = issues_of(
        write_config(
            tmp_path,
            '[[input]]\nname = "door"\nsource = "file"\npath = "/a"\ndebounce = 1\n\n'
            '[[input]]\nname = "x"\nsource = "adc"\n\n'
            '[leds]\nled1 = "../../etc"\n',
        )
    )
    joined = "\n".join(found)
    assert "dcud.toml:7: input[door].debounce" in joined
    assert "input[x].source" in joined
    assert "leds.led1" in joined
    path = write_config(tmp_path / "relay", '[relay]\nsource = "file"\n')
    assert issues_of(path) == [f"{path}:3: relay.path: required when source is file"]


def test_eventpush_renders_input_change_with_name_level_and_millisecond_time() -> None:
    push = EventPushConfig(addr="127.0.0.1:9", device_id="dcu-1", notify_mask=2, input_text="Tuer")
    event = {"type": "input_change", "ts": "2026-01-01T00:00:00Z", "since": "2026-01-01T00:00:00.250Z"}
    assert (
        push.render({**event, "input": "door", "level": 1}) == "dcu-1: Tuer door=1 2026-01-01T00:00:00.250Z"
    )
    # Two edges within one second are two different datagrams (the gate would drop a repeat).
    back = {**event, "input": "door", "level": 0, "since": "2026-01-01T00:00:00.750Z"}
    assert push.render(back) == "dcu-1: Tuer door=0 2026-01-01T00:00:00.750Z"
    assert (
        push.render({"type": "input_change", "ts": "2026-01-01T00:00:00Z"})
        == "dcu-1: Tuer 2026-01-01T00:00:00Z"
    )
    assert event_text("Tuer", "door", True) == "Tuer door=1"


# -- the input service in-process ------------------------------------------------------------------


class Events:
    def __init__(self) -> None:
        self.items: list[tuple[str, str, dict[str, Any]]] = []

    async def __call__(self, event_type: str, text: str, **fields: Any) -> None:
        self.items.append((event_type, text, fields))


def input_config(tmp_path: Path, **kw: Any) -> InputServiceConfig:
    base: dict[str, Any] = {
        "name": "door",
        "source": "file",
        "path": str(tmp_path / "door"),
        "chip": "/dev/gpiochip0",
        "gpio_line": 0,
        "active_low": False,
        "poll_interval_s": 0.01,
        "debounce_s": 0.05,
        "text": "Input changed",
        "state_dir": tmp_path / "state",
    }
    return InputServiceConfig(**{**base, **kw})


def set_level(path: Path, level: int) -> None:
    """Replace the file atomically (as sysfs reads: never an empty or half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{level}\n")
    os.replace(tmp, path)


async def until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait (bounded) for a condition on the bus or on files that the service under test changes."""
    await wait_until(predicate, timeout_s, step_s=0.01)


async def run_service(service: Any, body: Callable[[ServiceContext], Awaitable[None]]) -> ServiceContext:
    ctx = ServiceContext(service.name, 30.0, lambda: None)
    task = asyncio.create_task(service.run(ctx))
    try:
        await body(ctx)
    finally:
        ctx.stopping.set()
        async with asyncio.timeout(10):
            await task
    return ctx


async def test_input_first_start_records_without_event_and_a_change_while_stopped_is_raised(
    tmp_path: Path,
) -> None:
    cfg = input_config(tmp_path)
    set_level(Path(cfg.path), 0)
    bus, events = EventBus(), Events()

    async def started(ctx: ServiceContext) -> None:
        await until(lambda: ctx.ready and "input/door" in bus.states)

    await run_service(InputService(cfg, bus, events), started)
    assert events.items == []
    assert bus.states["input/door"]["state"] == "inactive" and bus.states["input/door"]["level"] == 0
    assert load_record(cfg.record_path) == {"level": 0, "since": bus.states["input/door"]["since"]}

    set_level(Path(cfg.path), 1)  # the door opened while dcud was not running
    bus, events = EventBus(), Events()
    await run_service(InputService(cfg, bus, events), started)
    assert [(t, text, f["level"], f["at_start"]) for t, text, f in events.items] == [
        ("input_change", "Input changed door=1", 1, True)
    ]
    assert bus.states["input/door"]["state"] == "active"
    assert (load_record(cfg.record_path) or {}).get("level") == 1

    bus, events = EventBus(), Events()  # unchanged: nothing
    await run_service(InputService(cfg, bus, events), started)
    assert events.items == []


async def test_input_changes_raise_one_event_each_and_follow_active_low(tmp_path: Path) -> None:
    cfg = input_config(tmp_path, active_low=True, text="Kontakt")
    path = Path(cfg.path)
    set_level(path, 1)  # high = inactive with active_low
    bus, events = EventBus(), Events()

    async def body(ctx: ServiceContext) -> None:
        await until(lambda: bus.states.get("input/door", {}).get("state") == "inactive")
        set_level(path, 0)
        await until(lambda: len(events.items) == 1)
        set_level(path, 1)
        await until(lambda: len(events.items) == 2)

    await run_service(InputService(cfg, bus, events), body)
    assert [(text, f["input"], f["level"], f["source"]) for _, text, f in events.items] == [
        ("Kontakt door=1", "door", 1, "file"),
        ("Kontakt door=0", "door", 0, "file"),
    ]
    assert all(f["since"].endswith("Z") and "." in f["since"] for _, _, f in events.items)
    state = bus.states["input/door"]
    assert (state["state"], state["changes"], state["active_low"], state["error"]) == (
        "inactive",
        2,
        True,
        None,
    )


async def test_input_missing_gpio_chip_is_reported_not_fatal(tmp_path: Path) -> None:
    cfg = input_config(tmp_path, source="gpio", chip=str(tmp_path / "gpiochip9"))
    bus, events = EventBus(), Events()

    async def body(ctx: ServiceContext) -> None:
        await until(lambda: ctx.ready and "input/door" in bus.states)

    await run_service(InputService(cfg, bus, events), body)
    state = bus.states["input/door"]
    assert state["state"] == "unavailable" and "cannot open" in state["error"]
    assert events.items == []


async def test_input_file_vanishing_is_unavailable_then_back(tmp_path: Path) -> None:
    cfg = input_config(tmp_path)
    path = Path(cfg.path)
    set_level(path, 0)
    bus, events = EventBus(), Events()

    async def body(ctx: ServiceContext) -> None:
        await until(lambda: bus.states.get("input/door", {}).get("state") == "inactive")
        await asyncio.to_thread(path.unlink)
        await until(lambda: bus.states["input/door"]["state"] == "unavailable")
        set_level(path, 0)
        await until(lambda: bus.states["input/door"]["state"] == "inactive")

    await run_service(InputService(cfg, bus, events), body)
    assert events.items == []


def test_one_service_per_input_and_removed_inputs_lose_their_state(tmp_path: Path) -> None:
    from dcud.app import Shared, build_services
    from dcud.service.commands import CommandRouter

    config = load_config(
        write_config(
            tmp_path,
            '[[input]]\nname = "door"\nsource = "file"\npath = "/a"\n\n'
            '[[input]]\nname = "tamper"\nsource = "gpio"\ngpio_line = 2\n',
        )
    )
    runtime = Shared.create("d", "dcu/d", EventBus(), None, CommandRouter())  # type: ignore[arg-type]
    runtime.bus.set_state("input/gone", {"state": "active"})
    runtime.bus.set_state("input/door", {"state": "active"})
    names = [s.name for s in build_services(config, runtime)]
    assert [n for n in names if n.startswith("input.")] == ["input.door", "input.tamper"]
    assert "outputs" not in names  # neither [leds] nor a [relay]: nothing to drive (issue 17)
    assert set(runtime.bus.states) == {"input/door"}  # a reload that removed "gone" forgets its state

    # [leds] (even empty: the default names) or a [relay] source: the outputs service runs.
    for i, table in enumerate(("[leds]\n", '[relay]\nsource = "file"\npath = "/r"\n')):
        with_outputs = load_config(write_config(tmp_path / f"outputs-{i}", table))
        assert "outputs" in [s.name for s in build_services(with_outputs, runtime)]
    # A reload to a site with neither inputs nor outputs forgets their states.
    runtime.bus.set_state("relay", {"present": False})
    runtime.bus.set_state("leds", {"leds": {}})
    bare = load_config(write_config(tmp_path / "bare", ""))
    assert [s.name for s in build_services(bare, runtime) if s.name.startswith(("input.", "outputs"))] == []
    assert not {"input/door", "relay", "leds"} & set(runtime.bus.states)


# -- relay and LEDs against a temporary sysfs tree -------------------------------------------------


def make_led(
    root: Path, name: str, max_brightness: int = 255, trigger: str = "none [heartbeat] timer"
) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "brightness").write_text("0\n")
    (directory / "max_brightness").write_text(f"{max_brightness}\n")
    (directory / "trigger").write_text(trigger + "\n")
    return directory


def outputs_config(tmp_path: Path, toml: str, wme: str) -> OutputsConfig:
    return OutputsConfig.from_config(load_config(write_config(tmp_path, toml, wme)))


def test_led_meanings_follow_the_states() -> None:
    states: dict[str, Any] = {}
    assert [led_wanted(m, states) for m in range(7)] == [False, True, False, False, False, False, None]
    states.update(
        {
            "uplink": {"reachable": True},
            "clock": {"synced": True},
            "meter/a": {"quality": "ok"},
            "meter/b": {"quality": "ok"},
        }
    )
    assert [led_wanted(m, states) for m in (2, 3, 4, 5)] == [True, True, True, False]
    states["meter/b"] = {"quality": "failing"}
    states["input/door"] = {"state": "active"}
    assert [led_wanted(m, states) for m in (4, 5)] == [False, True]
    states["input/door"] = {"state": "inactive"}
    states["power"] = {"state": "lost"}
    assert led_wanted(5, states) is True


async def test_leds_and_file_relay_applied_where_present(tmp_path: Path) -> None:
    root = tmp_path / "leds"
    power_led = make_led(root, "green:power", max_brightness=1)
    alarm_led = make_led(root, "red:alarm")
    other_led = make_led(root, "amber:other", trigger="none [mmc0]")
    relay = tmp_path / "relay-value"
    relay.write_text("0\n")
    cfg = outputs_config(
        tmp_path,
        f'[leds]\nroot = "{root}"\nled1 = "green:power"\nled2 = "amber:other"\nled3 = "red:alarm"\n'
        f'led4 = ""\n\n[relay]\nsource = "file"\npath = "{relay}"\n',
        "led1=1\nled2=6\nled3=5\nem_relay=30\n",
    )
    bus = EventBus()

    async def body(ctx: ServiceContext) -> None:
        await until(lambda: ctx.ready)
        assert (power_led / "brightness").read_text() == "1"
        assert (power_led / "trigger").read_text() == "none"  # taken from the kernel's heartbeat
        assert (alarm_led / "brightness").read_text() == "0"
        bus.set_state("input/door", {"state": "active"})
        await until(lambda: (alarm_led / "brightness").read_text() == "255")
        await until(lambda: bus.states["leds"]["leds"]["led3"]["on"] is True)
        bus.set_state("input/door", {"state": "inactive"})
        await until(lambda: (alarm_led / "brightness").read_text() == "0")

    await run_service(OutputsService(cfg, bus), body)
    assert relay.read_text() == "1\n"  # 30 = 1T2: energised
    assert (other_led / "trigger").read_text() == "none [mmc0]\n"  # meaning 6: left to the kernel
    leds = bus.states["leds"]["leds"]
    assert leds["led1"] == {
        "name": "green:power",
        "present": True,
        "meaning": 1,
        "meaning_name": "on",
        "applied": True,
        "on": True,
        "note": None,
        "error": None,
    }
    assert leds["led2"]["applied"] is False and "not implemented" in leds["led2"]["note"]
    assert leds["led4"]["present"] is False and leds["led4"]["name"] is None  # not wired
    assert leds["led5"]["present"] is False  # led5 is not in the tree
    assert bus.states["relay"] == {
        "present": True,
        "source": "file",
        "em_relay": 30,
        "label": "1T2",
        "on": True,
        "applied": True,
        "error": None,
    }


@pytest.mark.parametrize(("mode", "written"), [("0", "0\n"), ("10", "1\n"), ("20", "0\n"), ("40", "0\n")])
async def test_relay_modes_and_active_low(tmp_path: Path, mode: str, written: str) -> None:
    relay = tmp_path / "relay"
    relay.write_text("x\n")
    cfg = outputs_config(tmp_path, f'[relay]\nsource = "file"\npath = "{relay}"\n', f"em_relay={mode}\n")
    await run_service(OutputsService(cfg, EventBus()), lambda ctx: until(lambda: ctx.ready))
    assert relay.read_text() == written
    inverted = outputs_config(
        tmp_path / "inv",
        f'[relay]\nsource = "file"\npath = "{relay}"\nactive_low = true\n',
        f"em_relay={mode}\n",
    )
    await run_service(OutputsService(inverted, EventBus()), lambda ctx: until(lambda: ctx.ready))
    assert relay.read_text() == ("0\n" if written == "1\n" else "1\n")


async def test_absent_hardware_is_reported_not_present(tmp_path: Path) -> None:
    relay = tmp_path / "no-such-relay"
    cfg = outputs_config(
        tmp_path,
        f'[leds]\nroot = "{tmp_path / "no-leds"}"\n\n[relay]\nsource = "file"\npath = "{relay}"\n',
        "em_relay=10\n",
    )
    bus = EventBus()
    await run_service(OutputsService(cfg, bus), lambda ctx: until(lambda: ctx.ready))
    assert not relay.exists()  # never created
    assert bus.states["relay"]["present"] is False and bus.states["relay"]["applied"] is False
    assert all(not led["present"] and not led["applied"] for led in bus.states["leds"]["leds"].values())
    # A GPIO relay on a chip that does not exist, and em_relay unset: nothing requested or driven.
    gpio = outputs_config(
        tmp_path / "g", f'[relay]\nsource = "gpio"\nchip = "{tmp_path / "gpiochip7"}"\n', ""
    )
    bus = EventBus()
    await run_service(OutputsService(gpio, bus), lambda ctx: until(lambda: ctx.ready))
    assert bus.states["relay"]["present"] is False and bus.states["relay"]["on"] is None
    gpio_set = outputs_config(
        tmp_path / "g2", f'[relay]\nsource = "gpio"\nchip = "{tmp_path / "gpiochip7"}"\n', "em_relay=10\n"
    )
    bus = EventBus()
    await run_service(OutputsService(gpio_set, bus), lambda ctx: until(lambda: ctx.ready))
    assert bus.states["relay"]["present"] is False and "cannot drive line 0" in bus.states["relay"]["error"]


async def test_write_failures_are_reported_in_the_states(tmp_path: Path) -> None:
    root = tmp_path / "leds"
    broken = root / "led1"
    (broken / "brightness").mkdir(parents=True)  # present, but a write fails (as on a read-only /sys)
    relay = tmp_path / "relay"
    relay.mkdir()
    cfg = outputs_config(
        tmp_path, f'[leds]\nroot = "{root}"\n\n[relay]\nsource = "file"\npath = "{relay}"\n', "em_relay=10\n"
    )
    bus = EventBus()
    await run_service(OutputsService(cfg, bus), lambda ctx: until(lambda: ctx.ready))
    led1 = bus.states["leds"]["leds"]["led1"]
    assert led1["present"] is True and led1["applied"] is False and "cannot write" in led1["error"]
    assert bus.states["relay"]["applied"] is False and "cannot write" in bus.states["relay"]["error"]


# -- end to end: python -m dcud run, Mosquitto, snmptrapd, UDP ------------------------------------


class Collector(Subscriber):
    """``<p>/event``, ``<p>/input/+/state`` and the relay and LED states from Mosquitto, in arrival order."""

    def __init__(self, port: int) -> None:
        topics = [f"{PREFIX}/{topic}" for topic in ("event", "input/+/state", "relay/state", "leds/state")]
        super().__init__(port, topics, PREFIX, name="in")

    @property
    def inputs(self) -> dict[str, dict[str, Any]]:
        """The latest ``<p>/input/<name>/state`` by input name."""
        return {
            key.removeprefix("input/"): state
            for key, state in self.states.items()
            if key.startswith("input/")
        }

    @property
    def outputs(self) -> dict[str, dict[str, Any]]:
        """The latest relay and LED states (``relay``, ``leds``)."""
        return {key: state for key, state in self.states.items() if not key.startswith("input/")}

    def input_events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == "input_change" and e.get("input") == name]


@pytest.mark.slow
async def test_file_input_end_to_end_flapping_debounced_each_change_one_event_push_and_trap(
    tmp_path: Path, broker: Mosquitto, notify_socket: NotifySocket
) -> None:
    trapd = trap_receiver(tmp_path / "trapd")
    sink = UdpSink()
    door, tamper, power_file = tmp_path / "door", tmp_path / "tamper", tmp_path / "online"
    set_level(door, 0)
    set_level(tamper, 0)
    set_power(power_file, True)
    toml = (
        power_toml(power_file)
        + f'\n[leds]\nroot = "{tmp_path / "no-leds"}"\n'
        + f'\n[[input]]\nname = "door"\nsource = "file"\npath = "{door}"\npoll_interval_s = 0.01\n'
        "debounce_s = 0.05\n"
        f'\n[[input]]\nname = "tamper"\nsource = "file"\npath = "{tamper}"\npoll_interval_s = 0.01\n'
        "debounce_s = 0.05\n"
    )
    wme = (
        snmp_params(trapd)
        + f"eventpush_addr=127.0.0.1:{sink.port}\neventpush_sms_notify=3\neventpush_sms_text=Kontakt\n"
    )
    config = write_site(tmp_path / "site", mqtt_url=broker.url, toml_extra=toml, wme=wme)
    proc = start_daemon(config, notify_socket)
    try:
        notify_socket.wait_for("READY=1")
        async with Collector(broker.port) as mqtt:
            await mqtt.wait(lambda: mqtt.inputs.get("door", {}).get("state") == "inactive")
            assert mqtt.inputs["door"]["level"] == 0 and mqtt.inputs["door"]["source"] == "file"
            # No relay, no LED tree: reported, retained.
            await mqtt.wait(lambda: {"relay", "leds"} <= set(mqtt.outputs))
            assert mqtt.outputs["relay"]["present"] is False
            assert not any(led["present"] for led in mqtt.outputs["leds"]["leds"].values())

            # Two real changes, each awaited on all three paths (flapping is proven on an injected clock
            # above: real time here only for stable changes).
            datagrams: list[str] = []
            for count, level in enumerate((1, 0), start=1):
                set_level(door, level)
                await mqtt.wait(lambda c=count: len(mqtt.input_events("door")) >= c)
                await mqtt.wait(lambda n=level: mqtt.inputs["door"]["level"] == n)
                datagrams.append((await asyncio.to_thread(sink.receive)).decode())

            # Sentinels behind them on every path: anything extra for the door would have come first.
            set_level(tamper, 1)
            await mqtt.wait(lambda: len(mqtt.input_events("tamper")) == 1)
            datagrams.append((await asyncio.to_thread(sink.receive)).decode())
            set_power(power_file, False)  # a trap that always exists, committed after all of the above
            await asyncio.to_thread(trapd.wait_for, is_trap("dcudPowerLoss"))

            events = mqtt.input_events("door")
            assert [(e["level"], e["text"]) for e in events] == [(1, "Kontakt door=1"), (0, "Kontakt door=0")]
            assert all(e["source"] == "file" and e["since"].endswith("Z") for e in events)
            assert datagrams[:2] == [f"dcu-test: Kontakt door={e['level']} {e['since']}" for e in events]
            assert datagrams[2].startswith("dcu-test: Kontakt tamper=1 ")
            assert mqtt.inputs["door"]["changes"] == 2 and mqtt.inputs["tamper"]["state"] == "active"

            traps = [t for t in trapd.traps() if t.value("dcudEventType.0") == "input_change"]
            trap = snmp_mib.TRAPS.get("input_change")
            if trap is None:
                # DCUD-MIB maps no trap to input_change yet (the SNMP work of issue 16 adds it).
                assert traps == []
            else:
                door_traps = [t for t in traps if "door=" in (t.value("dcudEventText.0") or "")]
                assert [t.value("snmpTrapOID.0") for t in door_traps] == [f"DCUD-MIB::{trap.name}"] * 2
                assert [t.value("dcudEventText.0") for t in door_traps] == [
                    "Kontakt door=1",
                    "Kontakt door=0",
                ]
        proc.terminate()
        assert proc.wait(timeout=20) == 0, daemon_log(config)
        said = [json.loads(line) for line in daemon_log(config).splitlines() if '"relay and LEDs"' in line]
        assert [line["relay"] for line in said] == ["not present"]  # one log line
    finally:
        proc.kill()
        trapd.stop()
        sink.close()
