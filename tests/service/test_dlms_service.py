"""DLMS/COSEM readouts (dcud.service.dlms_meter) against the independent test peer (tests/peers): HDLC on a
socat pty pair and the TCP wrapper, LLS and HLS-GMAC with global ciphering, registers with scalers, the
clock read and set (only when NTP-synced), the load profile by range in GET blocks, event logs, refusals,
backfill after silence (each row once, in order), a crash between the outbox commit and the state file,
a cancelled readout (the link is disconnected and the line is free), and mode E against dcud's simulator.

Everything runs in this event loop against real processes; the outbox is the real SQLite outbox."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dcud.codec.dlms.client import AssociationRefused
from dcud.codec.dlms.security import AuthenticationFailed
from dcud.config.model import DlmsConfig, LineConfig, MeterConfig
from dcud.errors import DcudError, PeerTimeout
from dcud.runtime.bus import EventBus
from dcud.service.commands import CommandRouter
from dcud.service.dlms_meter import (
    DlmsMeterSettings,
    DlmsReadouts,
    DlmsStateError,
    ObjectCache,
    ReadoutPlan,
    dlms_session,
)
from dcud.service.dlms_state import DlmsStateStore
from dcud.service.line import Line, LineRegistry
from dcud.service.outbox import Outbox, OutboxLimits
from dcud.service.polling import PollingConfig, PollingService
from dcud.transport.serial import SerialPort

from peers.dlms_fixture import GREEN_BOOK_AUTHENTICATION_KEY as AK
from peers.dlms_fixture import GREEN_BOOK_BLOCK_CIPHER_KEY as EK
from peers.dlms_fixture import DlmsPeer

Start = Callable[..., DlmsPeer]
NOW = "2024-06-01T12:00:00Z"
PROFILE_START = "2024-05-31T00:00:00Z"
PEER_CONFIG: dict[str, Any] = {"clock": {"start": NOW}, "profile": {"start": PROFILE_START}}
PROFILE = "1.0.99.1.0.255"
EVENT_LOG = "0.0.99.98.0.255"
OBJECTS = ["1.0.1.8.0.255", "1.0.2.8.0.255", "1.0.32.7.0.255"]


def ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def import_wh(at: float) -> int:
    """The peer's documented load (tests/peers/README.md): period k imports 250 + 25*(k mod 8) Wh."""
    periods = int((at - ts(PROFILE_START)) // 900)
    return 1_000_000 + sum(250 + 25 * (k % 8) for k in range(periods))


def export_wh(at: float) -> int:
    """Period k exports 50 + 10*(k mod 3) Wh; the register holds Wh // 10 with scaler 1."""
    periods = int((at - ts(PROFILE_START)) // 900)
    return (200_000 + sum(50 + 10 * (k % 3) for k in range(periods))) // 10 * 10


@dataclass
class Harness:
    """DlmsReadouts as the polling service builds them, on a real outbox (and a line, for HDLC)."""

    readouts: DlmsReadouts
    outbox: Outbox
    registry: LineRegistry
    synced: list[bool | None]

    async def read(self, meter: MeterConfig, kind: str = "poll") -> Any:
        return await self.readouts.read(
            meter, kind, f"{kind}:{meter.name}", lease_timeout_s=5, trigger="test"
        )

    async def items(self) -> list[tuple[str, dict[str, Any]]]:
        taken = await self.outbox.take("test", 10_000)
        await self.outbox.ack("test", [item.seq for item in taken])
        return [(item.kind, json.loads(item.payload)) for item in taken]


def meter_config(
    name: str, *, line: str = "", host: str = "", address: str = "", timeout_s: float = 1.0, **dlms: Any
) -> MeterConfig:
    return MeterConfig(
        name=name,
        protocol="dlms",
        line=line,
        host=host,
        address=address,
        retries=0,
        timeout_s=timeout_s,
        dlms=DlmsConfig(**dlms),
    )


@contextlib.asynccontextmanager
async def harness(
    tmp_path: Path, meters: list[MeterConfig], peer: DlmsPeer | None = None, state: str = "state"
) -> AsyncIterator[Harness]:
    """Readouts of ``meters``; the HDLC line (named "dlms") is the peer's pty when it has one."""
    outbox = Outbox(tmp_path / "outbox.sqlite", OutboxLimits(), ["test"], "dcu-test")
    await outbox.open()
    registry = LineRegistry()
    lines: list[LineConfig] = []
    port: SerialPort | None = None
    line: Line | None = None
    if peer is not None and peer.device is not None:
        line_cfg = LineConfig(name="dlms", device=peer.device, baud=9600, framing="8N1")
        lines.append(line_cfg)
        line = registry.attach(line_cfg)
        port = SerialPort(peer.device, 9600, "8N1")
        await port.open()
        line.attach(port)
    synced: list[bool | None] = [None]
    seq = iter(range(1, 1_000_000))
    readouts = DlmsReadouts(
        meters,
        lines,
        registry=registry,
        outbox=outbox,
        state_dir=tmp_path / state / "dlms",
        base_dir=tmp_path,
        device_id="dcu-test",
        next_seq=lambda _meter: next(seq),
        dcu_synced=lambda: synced[0],
    )
    try:
        yield Harness(readouts, outbox, registry, synced)
    finally:
        if line is not None:
            line.detach("closed")
        await outbox.close()


def profile_rows(items: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [p for kind, p in items if kind == "reading" and "profile" in p]


def served_rows(peer: DlmsPeer, since: int = 0) -> list[str]:
    return [
        row
        for r in peer.requests("get", since=since)
        if r.get("obis") == PROFILE
        for row in r.get("rows", [])
    ]


async def test_hdlc_lls_registers_with_scalers_and_the_profile_in_blocks(
    dlms_peer: Start, tmp_path: Path
) -> None:
    peer = await asyncio.to_thread(dlms_peer, "hdlc", max_pdu_size=256, **PEER_CONFIG)
    meter = meter_config(
        "em-1",
        line="dlms",
        address=str(peer.physical_address),
        client=32,
        auth="lls",
        password="12345678",
        objects=OBJECTS,
        profile=PROFILE,
        profile_backfill_s=12 * 3600,
    )
    async with harness(tmp_path, [meter], peer) as h:
        reading = await h.read(meter)
        items = await h.items()
        assert h.registry.get("dlms") is not None and h.registry["dlms"].holder is None  # the lease ended
    values = {v["id"]: (v["value"], v["unit"]) for v in reading.values}
    assert values["1.0.1.8.0.255"] == (import_wh(ts(NOW)), "Wh")
    assert values["1.0.2.8.0.255"] == (export_wh(ts(NOW)), "Wh")  # scaler 1: raw x 10
    voltage, unit = values["1.0.32.7.0.255"]
    assert unit == "V" and 229.5 <= voltage <= 230.5 and voltage * 10 == pytest.approx(round(voltage * 10))
    assert reading.publish and reading.details["meter_clock"] == NOW
    rows = profile_rows(items)
    expected = [ts(NOW) - 12 * 3600 + 900 * k for k in range(12 * 4 + 1)]
    assert [r["ts"] for r in rows] == [iso(t) for t in expected]
    for row, at in zip(rows, expected, strict=True):
        got = {v["id"]: (v["value"], v["unit"]) for v in row["values"]}
        assert got == {"1.0.1.8.0.255": (import_wh(at), "Wh"), "1.0.2.8.0.255": (export_wh(at), "Wh")}
        assert row["profile"] == PROFILE and row["protocol"] == "dlms" and row["line"] == "dlms"
    gets = [r for r in peer.requests("get") if r.get("obis") == PROFILE and r.get("attr") == 2]
    assert len(gets) == 1 and gets[0]["selector"] == 1 and gets[0]["blocks"] > 1  # by range, in blocks
    assert gets[0]["from"].startswith("2024-06-01T00:00:00") and gets[0]["to"].startswith(
        "2024-06-01T12:00:00"
    )
    assert peer.requests("aarq")[-1]["result"] == "accepted" and peer.wait_for("release")
    state = reading.state["dlms"]
    assert state["profile"]["last_capture"] == NOW and state["profile"]["last_read"]["committed"] == 49
    assert state["clock"]["drift_s"] < -1e7 and state["clock"]["action"] == "reported"  # a 2024 meter


async def test_tcp_hls_gmac_ciphered_registers_profile_and_event_log(
    dlms_peer: Start, tmp_path: Path
) -> None:
    events = [
        {"at": "2024-06-01T10:20:00Z", "code": 1},  # before the first contact's backfill: never read
        {"at": "2024-06-01T11:20:00Z", "code": 1},
        {"at": "2024-06-01T11:25:30Z", "code": 2},
        {"at": "2024-06-01T12:40:00Z", "code": 23},
    ]
    peer = await asyncio.to_thread(dlms_peer, "tcp", events=events, max_pdu_size=256, **PEER_CONFIG)
    meter = meter_config(
        "em-7",
        host=f"127.0.0.1:{peer.tcp_port}",
        client=1,
        auth="hls-gmac",
        security="authenticated-encrypted",
        block_cipher_key=EK,
        authentication_key=AK,
        objects=["1.0.1.8.0.255", "3/1.0.2.8.0.255/2"],
        profile=PROFILE,
        profile_backfill_s=3600,
        event_logs=[EVENT_LOG],
    )
    async with harness(tmp_path, [meter], peer) as h:
        reading = await h.read(meter)
        first = await h.items()
        await asyncio.to_thread(peer.advance_clock, 3600)
        await h.read(meter)
        second = await h.items()
    assert {v["id"]: v["value"] for v in reading.values} == {
        "1.0.1.8.0.255": import_wh(ts(NOW)),
        "1.0.2.8.0.255": export_wh(ts(NOW)),
    }
    assert reading.details["host"] == f"127.0.0.1:{peer.tcp_port}"
    assert [r["ts"] for r in profile_rows(first)] == [iso(ts(NOW) - 3600 + 900 * k) for k in range(5)]
    assert [r["ts"] for r in profile_rows(second)] == [iso(ts(NOW) + 900 * k) for k in range(1, 5)]
    meter_events = [p for kind, p in first if kind == "event"]
    assert [(e["type"], e["ts"], e["code"], e["log"]) for e in meter_events] == [
        ("meter_event", "2024-06-01T11:20:00Z", 1, EVENT_LOG),
        ("meter_event", "2024-06-01T11:25:30Z", 2, EVENT_LOG),
    ]
    assert (
        meter_events[0]["text"] == "meter em-7: event 1 (power down)" and meter_events[0]["meter"] == "em-7"
    )
    later = [(e["ts"], e["code"], e["text"]) for kind, e in second if kind == "event"]
    assert later == [("2024-06-01T12:40:00Z", 23, "meter em-7: event 23")]  # new entries only, once
    aarqs = peer.requests("aarq")
    assert all(a["ciphered"] and a["result"] == "accepted" for a in aarqs) and len(aarqs) == 2
    assert [r["result"] for r in peer.requests("hls")] == ["ok", "ok"]
    assert not peer.requests("refused") and not peer.requests("internal_error")


async def test_the_clock_is_set_only_when_the_dcu_is_synchronised_and_it_drifts(
    dlms_peer: Start, tmp_path: Path
) -> None:
    peer = await asyncio.to_thread(dlms_peer, "tcp", **PEER_CONFIG)
    meter = meter_config(
        "em-7",
        host=f"127.0.0.1:{peer.tcp_port}",
        client=32,
        auth="lls",
        password="12345678",
        clock_sync="set",
    )
    async with harness(tmp_path, [meter], peer) as h:
        h.synced[0] = None  # no NTP verdict yet
        unknown = (await h.read(meter)).state["dlms"]["clock"]
        h.synced[0] = False
        unsynced = (await h.read(meter)).state["dlms"]["clock"]
        assert not peer.requests("clock_set")
        h.synced[0] = True
        corrected = (await h.read(meter)).state["dlms"]["clock"]
        after = (await h.read(meter)).state["dlms"]["clock"]
    assert unknown["action"] == "not_set" and unknown["reason"] == "no NTP verdict yet"
    assert unsynced["action"] == "not_set" and unsynced["reason"] == "the DCU clock is not synchronised"
    assert corrected["action"] == "set" and corrected["drift_s"] < -1e7
    assert len(peer.requests("clock_set")) == 1
    assert abs(after["drift_s"]) < 5 and after["action"] == "none"


async def test_wrong_passwords_and_keys_are_refused_with_a_clear_error(
    dlms_peer: Start, tmp_path: Path
) -> None:
    peer = await asyncio.to_thread(dlms_peer, "tcp", **PEER_CONFIG)
    host = f"127.0.0.1:{peer.tcp_port}"
    wrong_pw = meter_config("pw", host=host, client=32, auth="lls", password="87654321", objects=OBJECTS)
    hls = {"client": 1, "auth": "hls-gmac", "security": "authenticated-encrypted", "objects": OBJECTS}
    wrong_ak = meter_config("ak", host=host, block_cipher_key=EK, authentication_key=EK, **hls)
    wrong_ek = meter_config("ek", host=host, block_cipher_key=AK, authentication_key=AK, **hls)
    async with harness(tmp_path, [wrong_pw, wrong_ak, wrong_ek], peer) as h:
        with pytest.raises(
            AuthenticationFailed, match="LLS authentication failed: the meter refused the password"
        ):
            await h.read(wrong_pw)
        with pytest.raises(DcudError, match="wrong key") as ak_error:
            await h.read(wrong_ak)
        with pytest.raises(AssociationRefused, match="wrong keys") as ek_error:
            await h.read(wrong_ek)
    assert EK not in str(ak_error.value) and AK not in str(ek_error.value)
    assert next(a["result"] for a in peer.requests("aarq")) == "rejected"
    assert not peer.requests("get") and not peer.requests("internal_error")


async def test_polling_state_shows_the_refusal_and_goes_on_reading_the_others(
    dlms_peer: Start, tmp_path: Path
) -> None:
    peer = await asyncio.to_thread(dlms_peer, "tcp", **PEER_CONFIG)
    host = f"127.0.0.1:{peer.tcp_port}"
    good = meter_config("good", host=host, objects=OBJECTS)
    bad = meter_config("bad", host=host, client=32, auth="lls", password="wrong-one", objects=OBJECTS)
    outbox = Outbox(tmp_path / "outbox.sqlite", OutboxLimits(), ["test"], "dcu-test")
    await outbox.open()
    bus = EventBus()
    events: list[tuple[str, str]] = []

    async def event(event_type: str, text: str, **_fields: object) -> None:
        events.append((event_type, text))

    polling = PollingService(
        PollingConfig(meters=(good, bad), lines=(), state_dir=str(tmp_path / "state"), device_id="dcu-test"),
        LineRegistry(),
        bus,
        outbox,
        commands=CommandRouter(),
        event=event,
    )
    try:
        polling.meters = {}
        from dcud.service.polling import MeterHealth

        for order, meter in enumerate((good, bad)):
            polling.meters[meter.name] = MeterHealth(meter, 900, order)
        reply = await polling.read_now("good")
        with pytest.raises(AuthenticationFailed):
            await polling.read_now("bad")
        reply_again = await polling.read_now("good")
    finally:
        await outbox.close()
    assert reply["protocol"] == "dlms" and {v["id"] for v in reply["values"]} == set(OBJECTS)
    assert reply_again["seq"] == reply["seq"] + 1
    bad_state = bus.states["meter/bad"]
    assert bad_state["last_error"]["type"] == "AuthenticationFailed"
    assert "refused the password" in bad_state["last_error"]["message"]
    good_state = bus.states["meter/good"]
    assert good_state["status"] == "ok" and good_state["dlms"]["transport"] == "tcp"
    assert good_state["dlms"]["clock"]["meter_time"] == NOW
    assert "wrong-one" not in json.dumps(bus.states)


async def test_backfill_after_silence_brings_every_missed_row_once_in_order(
    dlms_peer: Start, tmp_path: Path
) -> None:
    peer = await asyncio.to_thread(dlms_peer, "hdlc", **PEER_CONFIG)
    meter = meter_config(
        "em-1", line="dlms", address="17", profile=PROFILE, profile_backfill_s=3600, timeout_s=0.3
    )
    async with harness(tmp_path, [meter], peer) as h:
        await h.read(meter)
        await asyncio.to_thread(peer.silent)
        for _ in range(3):  # an outage over several capture periods: every readout fails
            await asyncio.to_thread(peer.advance_clock, 2 * 900)
            with pytest.raises(PeerTimeout):
                await h.read(meter)
        await asyncio.to_thread(peer.speak)
        await h.read(meter)
        await asyncio.to_thread(peer.advance_clock, 900)
        await h.read(meter)
        rows = profile_rows(await h.items())
    stamps = [r["ts"] for r in rows]
    expected = [iso(ts(NOW) - 3600 + 900 * k) for k in range(4 + 1 + 6 + 1)]
    assert stamps == expected  # every row, in order, once
    assert sorted(served_rows(peer)) == sorted(set(served_rows(peer)))  # the meter served each row once
    assert len(served_rows(peer)) == len(expected)
    assert [r["seq"] for r in rows] == sorted({r["seq"] for r in rows})


async def test_a_crash_after_the_commit_but_before_the_state_file_duplicates_nothing(
    dlms_peer: Start, tmp_path: Path
) -> None:
    peer = await asyncio.to_thread(dlms_peer, "tcp", **PEER_CONFIG)
    meter = meter_config("em-7", host=f"127.0.0.1:{peer.tcp_port}", profile=PROFILE, profile_backfill_s=1800)
    async with harness(tmp_path, [meter], peer) as h:
        await h.read(meter)
        first = profile_rows(await h.items())
    # The process dies after the outbox transaction and before the state file is replaced: the file
    # still holds the cursor of before (here: none at all).
    state_file = tmp_path / "state" / "dlms" / "em-7.json"
    saved = json.loads(state_file.read_text())
    saved["profile"] = None
    state_file.write_text(json.dumps(saved))
    await asyncio.to_thread(peer.advance_clock, 900)
    async with harness(tmp_path, [meter], peer) as h:
        await h.read(meter)
        second = profile_rows(await h.items())
    assert [r["ts"] for r in first] == [iso(ts(NOW) - 1800 + 900 * k) for k in range(3)]
    assert [r["ts"] for r in second] == [iso(ts(NOW) + 900)]  # the outbox's mark was the cursor
    assert json.loads(state_file.read_text())["profile"]["last_capture_s"] == ts(NOW) + 900


async def test_invocation_counters_go_on_across_restarts(dlms_peer: Start, tmp_path: Path) -> None:
    peer = await asyncio.to_thread(dlms_peer, "tcp", **PEER_CONFIG)
    meter = meter_config(
        "em-7",
        host=f"127.0.0.1:{peer.tcp_port}",
        client=1,
        auth="hls-gmac",
        security="authenticated-encrypted",
        block_cipher_key=EK,
        authentication_key=AK,
        objects=OBJECTS,
    )
    for _restart in range(3):  # each harness is a new process as far as the state is concerned
        async with harness(tmp_path, [meter], peer) as h:
            await h.read(meter)
            await h.read(meter)
    assert not peer.requests("refused")  # the meter saw every counter above the last one
    counters = json.loads((tmp_path / "state" / "dlms" / "em-7.json").read_text())["invocation_counters"]
    (entry,) = counters.values()
    assert entry["reserved"] > entry["next"] > 2 * 10_000  # each restart resumed after a reservation


async def test_a_cancelled_readout_disconnects_and_frees_the_line(dlms_peer: Start, tmp_path: Path) -> None:
    # A 9600 Bd line (the peer paces the pty): two days of rows take seconds, long enough to cancel.
    peer = await asyncio.to_thread(dlms_peer, "hdlc", hdlc={"baud": 9600}, **PEER_CONFIG)
    meter = meter_config("em-1", line="dlms", address="17", profile=PROFILE, profile_backfill_s=2 * 86400)
    async with harness(tmp_path, [meter], peer) as h:
        task = asyncio.create_task(h.read(meter))
        await asyncio.to_thread(peer.wait_for, "get_next", 2)
        since = peer.status()["last_seq"]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        line = h.registry["dlms"]
        assert line.holder is None and line.waiting == 0  # the lease ended
        assert await h.items() == []  # nothing committed: the cursor did not move
        disc = await asyncio.to_thread(peer.wait_for, "disc", 1, since)
        assert disc and not peer.status()["hdlc_connected"]
        assert peer.requests("aborted", since=since)  # the association ended with the link
        await h.read(meter)  # the line is clean: the next readout works and reads the same rows
        rows = profile_rows(await h.items())
    # the profile starts 36 h before the meter's time: every row of it, once
    assert [r["ts"] for r in rows] == [iso(ts(PROFILE_START) + 900 * k) for k in range(36 * 4 + 1)]


async def test_mode_e_readout_against_the_simulator(tmp_path: Path) -> None:
    from dcud.sim.dlms_sim import config_from_dict

    from helpers.dlms_sim import HostClock, running
    from helpers.meters import SocatPair

    pair = SocatPair(tmp_path / "client-tty", tmp_path / "meter-tty")
    await asyncio.to_thread(pair.start)
    sim = config_from_dict(
        {
            "line": [{"name": "dlms", "device": str(pair.b), "mode_e": True}],
            "meter": [
                {"name": "em-1", "line": "dlms", "physical_address": 17, "profile_start": PROFILE_START}
            ],
        }
    )
    meter = meter_config("em-1", line="dlms", address="17", mode_e=True, objects=["1.0.1.8.0.255"])
    # A mode E line on a pty is configured as an IEC line (300 Bd 7E1): the port then runs 8N1 and the
    # framing stays logical, as the lease switches it (docs/dlms.md, "Mode E").
    line_cfg = LineConfig(name="dlms", device=str(pair.a), baud=300, framing="7E1")
    outbox = Outbox(tmp_path / "outbox.sqlite", OutboxLimits(), ["test"], "dcu-test")
    await outbox.open()
    try:
        async with running(sim, HostClock(NOW)) as handle:
            registry = LineRegistry()
            line = registry.attach(line_cfg)
            port = SerialPort(str(pair.a), 300, "7E1")
            await port.open()
            line.attach(port)
            readouts = DlmsReadouts(
                [meter],
                [line_cfg],
                registry=registry,
                outbox=outbox,
                state_dir=None,
                base_dir=tmp_path,
                device_id="dcu-test",
                next_seq=lambda _m: 1,
                dcu_synced=lambda: None,
            )
            try:
                reading = await readouts.read(meter, "poll", "poll:em-1", lease_timeout_s=5, trigger="test")
            finally:
                line.detach("closed")
            sign_ons = handle.runners["dlms"].model.meters[0].mode_e.sign_ons  # type: ignore[attr-defined]
    finally:
        await outbox.close()
        pair.kill()
    (value,) = reading.values
    assert value["id"] == "1.0.1.8.0.255" and value["unit"] == "Wh" and value["value"] > 1_000_000
    assert sign_ons == 1 and reading.details["meter_clock"] == NOW


async def test_no_session_without_a_writable_state(dlms_peer: Start, tmp_path: Path) -> None:
    peer = await asyncio.to_thread(dlms_peer, "tcp", **PEER_CONFIG)
    meter = meter_config("em-7", host=f"127.0.0.1:{peer.tcp_port}", objects=OBJECTS)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "dlms").write_text("a file where the directory should be")
    async with harness(tmp_path, [meter], peer) as h:
        with pytest.raises(DlmsStateError, match="cannot lock the DLMS state directory"):
            await h.read(meter)
    assert not peer.requests("aarq")  # no counter was taken without its reservation on disk
    store = DlmsStateStore(tmp_path / "other")
    (tmp_path / "other").write_text("not a directory either")
    state = store.get("em-7")
    state.counter_range("k")
    settings = DlmsMeterSettings.from_config(meter, tmp_path, "dcu-test")
    plan = ReadoutPlan(settings, ObjectCache())
    with pytest.raises(DlmsStateError, match="cannot save the DLMS state"):
        await dlms_session(settings, None, TcpPortNever(), store, plan)


class TcpPortNever:
    """A port that must never be used (the session may not start)."""

    def write(self, data: bytes) -> None:
        raise AssertionError("a byte went out without the counter reservation on disk")

    async def drain(self) -> None:
        raise AssertionError("unused")

    async def read(self, max_bytes: int = 4096, timeout_s: float = 1.0) -> bytes:
        raise AssertionError("unused")

    async def set_baud(self, baud: int) -> None:
        raise AssertionError("unused")

    async def set_framing(self, framing: str) -> None:
        raise AssertionError("unused")

    def flush_input(self) -> None:
        raise AssertionError("unused")
