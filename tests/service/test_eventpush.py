"""Event push: UDP datagrams received by a real socket in the test; notify mask, texts, suppression
window (explicit clock), the last-gasp fast path sent once, phone numbers, and the catalogue forms."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dcud.app import Shared
from dcud.config.loader import load_config
from dcud.runtime.bus import EventBus
from dcud.runtime.supervisor import ServiceContext
from dcud.service.commands import CommandRouter
from dcud.service.eventpush import (
    DEFAULT_PORT,
    GATE,
    NO_SMS_MODEM,
    EventPushConfig,
    EventPushGate,
    EventPushService,
    Verdict,
    notify_bit,
    parse_push_address,
    send_event_push,
    suppression_key,
)
from dcud.service.outbox import Outbox, OutboxLimits


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.05)
    try:
        yield sock
    finally:
        sock.close()


def drain(sock: socket.socket) -> list[str]:
    out = []
    for _ in range(1000):
        try:
            out.append(sock.recv(2048).decode())
        except TimeoutError:
            break
    return out


def addr_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()
    return f"{host}:{port}"


# --------------------------------------------------------------------------------------------- pure


def test_addresses_and_default_port() -> None:
    assert parse_push_address("192.0.2.1") == ("192.0.2.1", DEFAULT_PORT) and DEFAULT_PORT == 9003
    assert parse_push_address("hes.example.net:7000") == ("hes.example.net", 7000)
    assert parse_push_address("[2001:db8::1]:7000") == ("2001:db8::1", 7000)
    assert parse_push_address("2001:db8::1") == ("2001:db8::1", DEFAULT_PORT)
    for bad in ("+36201234567", "host:x", "host:70000", ""):
        with pytest.raises(ValueError):
            parse_push_address(bad)


def test_catalogue_accepts_host_port(tmp_path: Path) -> None:
    (tmp_path / "wme.conf").write_text("eventpush_addr=hes.example.net:7000\n")
    (tmp_path / "dcud.toml").write_text('device_id = "d"\nstate_dir = "s"\n')
    assert load_config(tmp_path / "dcud.toml").params.get_str("eventpush_addr") == "hes.example.net:7000"


def test_notify_bits_partition_the_event_types() -> None:
    assert [notify_bit(t) for t in ("power_loss", "power_return", "power_loss_unsurvived")] == [1, 1, 1]
    assert notify_bit("input_change") == 2
    assert [notify_bit(t) for t in ("uplink_unreachable", "clock_unsync")] == [4, 4]
    assert [notify_bit(t) for t in ("line_down", "meter_silent", "outbox_full", "drive_fault")] == [
        8,
        8,
        8,
        8,
    ]


def test_gate_dedupes_identical_and_suppresses_repeats() -> None:
    clock = FakeClock()
    gate = EventPushGate(clock, ignore_s=30)
    a = "d: Power loss 2026-01-01T00:00:00Z"
    b = "d: Power loss 2026-01-01T00:00:10Z"
    assert suppression_key(a) == suppression_key(b) == "d: Power loss"
    assert gate.admit("h:1", a)[0] is Verdict.SEND
    assert gate.admit("h:1", a)[0] is Verdict.DUPLICATE  # the other path already sent it
    clock.t += 10
    assert gate.admit("h:1", b)[0] is Verdict.SUPPRESSED  # a repeat within 30 s
    assert gate.admit("h:2", b)[0] is Verdict.SEND  # another address is not a repeat
    assert gate.admit("h:1", "d: Power return 2026-01-01T00:00:11Z")[0] is Verdict.SEND
    clock.t += 21
    verdict, claim = gate.admit("h:1", b)
    assert verdict is Verdict.SEND and claim is not None
    gate.release(claim)  # the send failed: the next try is neither a duplicate nor a repeat
    assert gate.admit("h:1", b)[0] is Verdict.SEND
    no_window = EventPushGate(clock)
    assert [no_window.admit("h", f"x {i}")[0] for i in range(3)] == [Verdict.SEND] * 3


# ------------------------------------------------------------------------------------------ service


def site(tmp_path: Path, wme: str) -> EventPushConfig:
    (tmp_path / "wme.conf").write_text(wme)
    (tmp_path / "dcud.toml").write_text('device_id = "dcu-9"\nstate_dir = "state"\n')
    config = EventPushConfig.from_config(load_config(tmp_path / "dcud.toml"))
    assert config is not None
    return config


async def run_service(
    service: EventPushService, body: Callable[[], Any], stop_when: Callable[[], bool]
) -> None:
    ctx = ServiceContext("eventpush", 30.0, lambda: None)
    task = asyncio.create_task(service.run(ctx))
    await body()
    for _ in range(2000):
        if stop_when() or task.done():
            break
        await asyncio.sleep(0.005)
    ctx.stopping.set()
    async with asyncio.timeout(10):
        await task


async def test_events_become_datagrams_by_mask_with_the_configured_texts(
    tmp_path: Path, receiver: socket.socket
) -> None:
    config = site(
        tmp_path,
        f"eventpush_addr={addr_of(receiver)}\neventpush_sms_notify=3\n"
        "eventpush_sms_lost_text=Netz weg\neventpush_sms_return_text=Netz da\n"
        "eventpush_sms_text=Tuer offen\n",
    )
    outbox = Outbox(tmp_path / "outbox.sqlite", OutboxLimits(), ["udp-event"], "dcu-9")
    await outbox.open()
    try:
        runtime = Shared.create("dcu-9", "dcu/dcu-9", EventBus(), outbox, CommandRouter())
        await outbox.put("reading", "meter/x/reading", b"{}")  # readings are not for the event push
        service = EventPushService(config, runtime.bus, outbox, EventPushGate())

        async def produce() -> None:
            await runtime.event("power_loss", "power lost", since="2026-03-10T10:00:00Z")
            await runtime.event("line_down", "line rs485-1 down: EIO", line="rs485-1")  # bit 8: not selected
            await runtime.event("input_change", "input 1 changed", input=1)
            await runtime.event("power_return", "power back", since="2026-03-10T10:05:00Z")

        await run_service(service, produce, lambda: outbox.stats().backlog["udp-event"] == 0)
        got = drain(receiver)
        assert got[0] == "dcu-9: Netz weg 2026-03-10T10:00:00Z"
        assert got[1].startswith("dcu-9: Tuer offen ")
        assert got[2] == "dcu-9: Netz da 2026-03-10T10:05:00Z"
        assert len(got) == 3
        state = runtime.bus.states["push/event"]
        assert state["counters"] == {"sent": 3, "suppressed": 0, "duplicate": 0, "filtered": 1, "failed": 0}
        assert state["backlog"] == 0
    finally:
        await outbox.close()


async def test_debug_bit_sends_other_events_with_their_own_text(
    tmp_path: Path, receiver: socket.socket
) -> None:
    config = site(tmp_path, f"eventpush_addr={addr_of(receiver)}\neventpush_sms_notify=8\n")
    outbox = Outbox(tmp_path / "outbox.sqlite", OutboxLimits(), ["udp-event"], "dcu-9")
    await outbox.open()
    try:
        runtime = Shared.create("dcu-9", "dcu/dcu-9", EventBus(), outbox, CommandRouter())
        service = EventPushService(config, runtime.bus, outbox, EventPushGate())

        async def produce() -> None:
            await runtime.event("power_loss", "power lost", since="2026-03-10T10:00:00Z")
            await runtime.event("meter_silent", "meter flat-12: no answer", meter="flat-12")

        await run_service(service, produce, lambda: outbox.stats().backlog["udp-event"] == 0)
        got = drain(receiver)
        assert len(got) == 1 and got[0].startswith("dcu-9: meter flat-12: no answer ")
    finally:
        await outbox.close()


async def test_suppression_window_follows_the_parameter(tmp_path: Path, receiver: socket.socket) -> None:
    config = site(
        tmp_path, f"eventpush_addr={addr_of(receiver)}\neventpush_sms_notify=1\neventpush_sms_ignore=60\n"
    )
    clock = FakeClock()
    outbox = Outbox(tmp_path / "outbox.sqlite", OutboxLimits(), ["udp-event"], "dcu-9")
    await outbox.open()
    try:
        runtime = Shared.create("dcu-9", "dcu/dcu-9", EventBus(), outbox, CommandRouter())
        service = EventPushService(config, runtime.bus, outbox, EventPushGate(clock))
        sent = lambda: runtime.bus.states.get("push/event", {}).get("counters", {})  # noqa: E731
        settled = lambda: outbox.stats().backlog["udp-event"] == 0  # noqa: E731

        async def produce() -> None:
            for minute in range(4):  # power flapping: loss, loss, loss, loss within one minute
                await runtime.event("power_loss", "lost", since=f"2026-03-10T10:0{minute}:00Z")
            for _ in range(400):
                if settled() and sent().get("suppressed") == 3:
                    break
                await asyncio.sleep(0.005)
            clock.t += 61  # the window is over
            await runtime.event("power_loss", "lost", since="2026-03-10T10:09:00Z")
            clock.t += 10
            await runtime.event("power_return", "back", since="2026-03-10T10:09:30Z")  # another text

        await run_service(service, produce, lambda: settled() and sent().get("sent") == 3)
        got = drain(receiver)
        assert got == [
            "dcu-9: Power loss 2026-03-10T10:00:00Z",
            "dcu-9: Power loss 2026-03-10T10:09:00Z",
            "dcu-9: Power return 2026-03-10T10:09:30Z",
        ]
        assert sent()["suppressed"] == 3
    finally:
        await outbox.close()


async def test_last_gasp_fast_path_and_outbox_send_one_datagram(
    tmp_path: Path, receiver: socket.socket
) -> None:
    config = site(tmp_path, f"eventpush_addr={addr_of(receiver)}\n")  # default mask 1: power events
    outbox = Outbox(tmp_path / "outbox.sqlite", OutboxLimits(), ["udp-event"], "dcu-9")
    await outbox.open()
    try:
        runtime = Shared.create("dcu-9", "dcu/dcu-9", EventBus(), outbox, CommandRouter())
        service = EventPushService(config, runtime.bus, outbox, GATE)
        since = "2026-03-10T11:11:11Z"

        async def produce() -> None:
            # what dcud.service.power does: commit the event, then push it directly
            await runtime.event("power_loss", "power lost", since=since, source="file")
            await send_event_push(config.addr, f"dcu-9: Power loss {since}")

        await run_service(service, produce, lambda: outbox.stats().backlog["udp-event"] == 0)
        assert drain(receiver) == [f"dcu-9: Power loss {since}"]
    finally:
        await outbox.close()


async def test_phone_number_is_reported_once_and_holds_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = site(tmp_path, "eventpush_addr=+36201234567\n")
    assert not config.sends
    outbox = Outbox(tmp_path / "outbox.sqlite", OutboxLimits(), [], "dcu-9")
    await outbox.open()
    try:
        bus = EventBus()
        service = EventPushService(config, bus, outbox, EventPushGate())
        runtime = Shared.create("dcu-9", "dcu/dcu-9", bus, outbox, CommandRouter())

        async def produce() -> None:
            for _ in range(5):
                await runtime.event("power_loss", "lost", since="2026-03-10T10:00:00Z")

        await run_service(service, produce, lambda: "push/event" in bus.states)
        assert bus.states["push/event"]["last_error"]["message"] == NO_SMS_MODEM
        assert capsys.readouterr().out.count(NO_SMS_MODEM) == 1
    finally:
        await outbox.close()
    with pytest.raises(ValueError, match="SMS"):
        await send_event_push("+36201234567", "x")
