"""The NTP client against a real chronyd on a loopback port, answer checks, spellings, clock owner."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from dcud.config.loader import load_config
from dcud.runtime.bus import EventBus
from dcud.runtime.supervisor import ServiceContext
from dcud.service import ntp
from dcud.sim.alarm_peers import Chronyd, start_chronyd

from helpers.daemon import write_site


class Events:
    """Collects what the service commits through ``Runtime.event``."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    async def __call__(self, event_type: str, text: str, **fields: Any) -> None:
        self.items.append({"type": event_type, "text": text, **fields})

    def types(self) -> list[str]:
        return [item["type"] for item in self.items]


@pytest.fixture
def chronyd(tmp_path: Path) -> Any:
    server = start_chronyd(tmp_path / "chrony")
    try:
        yield server
    finally:
        server.stop()


def site_config(tmp_path: Path, wme: str, toml: str = "") -> ntp.NtpServiceConfig:
    return ntp.NtpServiceConfig.from_config(
        load_config(write_site(tmp_path / "site", wme=wme, toml_extra=toml))
    )


async def wait_clock(bus: EventBus, predicate: Any, timeout_s: float = 30.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s):
        while True:
            state = bus.states.get("clock")
            if state is not None and predicate(state):
                return dict(state)
            await asyncio.sleep(0.02)


class Running:
    def __init__(self, service: ntp.NtpService) -> None:
        self.service = service
        self.ctx = ServiceContext("ntp", 30.0, lambda: None)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Running:
        self.task = asyncio.create_task(self.service.run(self.ctx))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.ctx.stopping.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 30)


async def test_synchronised_with_a_small_offset_then_unsynchronised_when_the_server_dies(
    tmp_path: Path, chronyd: Chronyd
) -> None:
    cfg = site_config(
        tmp_path, f"ntp.address=127.0.0.1\nntp.port={chronyd.port}\nntp.interval=1\nntp.timeout=1\n"
    )
    bus = EventBus()
    events = Events()
    service = ntp.NtpService(cfg, bus, events)
    async with Running(service):
        state = await wait_clock(bus, lambda s: s["synced"] is True)
        assert abs(state["offset_s"]) < 0.05  # same host: the offset is measurement noise
        assert 0 <= state["delay_s"] < 0.05
        assert state["stratum"] == 8  # chronyd serves its local clock at "local stratum 8"
        assert state["server"] == f"127.0.0.1:{chronyd.port}"
        assert state["last_sync_ts"].endswith("Z")
        assert ntp.clock_synced(bus) is True
        chronyd.stop()
        state = await wait_clock(bus, lambda s: s["synced"] is False)
        assert state["failures"] == cfg.unsync_after == 3  # the documented default
        assert ntp.clock_synced(bus) is False
        assert events.types() == ["clock_unsync"]
        assert events.items[0]["server"] == f"127.0.0.1:{chronyd.port}"


async def test_recovery_raises_clock_sync(tmp_path: Path) -> None:
    port_holder = start_chronyd(tmp_path / "chrony-a")
    port = port_holder.port
    port_holder.stop()
    cfg = site_config(
        tmp_path,
        f"ntp_address=127.0.0.1\nntp_port={port}\nntp_interval=1\nntp_timeout=1\n",
        "\n[ntp]\nunsync_after = 2\n",
    )
    bus = EventBus()
    events = Events()
    async with Running(ntp.NtpService(cfg, bus, events)):
        await wait_clock(bus, lambda s: s["synced"] is False)
        server = start_chronyd(tmp_path / "chrony-b", port=port)
        try:
            await wait_clock(bus, lambda s: s["synced"] is True)
        finally:
            server.stop()
    assert events.types() == ["clock_unsync", "clock_sync"]


def test_dotted_spelling_wins_when_both_are_set(tmp_path: Path) -> None:
    both = site_config(
        tmp_path / "a",
        "ntp_address=192.0.2.1\nntp.address=192.0.2.2\nntp_port=1123\nntp.port=2123\n"
        "ntp_interval=600\nntp.interval=60\nntp_timeout=30\nntp.timeout=5\n",
    )
    assert (both.server, both.port, both.interval_s, both.timeout_s) == ("192.0.2.2", 2123, 60, 5)
    legacy = site_config(tmp_path / "b", "ntp_address=192.0.2.1\nntp_interval=600\n")
    assert (legacy.server, legacy.port, legacy.interval_s, legacy.timeout_s) == ("192.0.2.1", 123, 600, 10)
    none = site_config(tmp_path / "c", "")
    assert (none.server, none.interval_s) == (None, 30)


TRANSMIT = bytes.fromhex("8badf00ddeadbeef")


def ntp_time_bytes(unix_s: float) -> bytes:
    seconds = unix_s + ntp.NTP_EPOCH_OFFSET_S
    return struct.pack("!II", int(seconds), int((seconds % 1) * 2**32))


def answer(
    origin: bytes = TRANSMIT,
    *,
    mode: int = 4,
    stratum: int = 2,
    leap: int = 0,
    ref_id: int = 0x7F000001,
    receive_s: float | None = None,
    transmit_s: float | None = None,
) -> bytes:
    """An NTP server answer as bytes; the server clock defaults to ours plus 2 ms."""
    now = time.time() + 0.002
    receive = ntp_time_bytes(now if receive_s is None else receive_s) if receive_s != 0 else bytes(8)
    transmit = ntp_time_bytes(now if transmit_s is None else transmit_s) if transmit_s != 0 else bytes(8)
    head = struct.pack("!BBbb", leap << 6 | 4 << 3 | mode, stratum, 6, -20)
    return head + bytes(8) + struct.pack("!I", ref_id) + bytes(8) + origin + receive + transmit


def check(data: bytes) -> ntp.NtpSample:
    now = time.time()
    return ntp.check_answer(data, TRANSMIT, now - 0.001, now + 0.001, max_delay_s=1.5)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (answer(mode=3), "mode 3"),
        (answer(stratum=16), "stratum 16"),
        (answer(leap=3), "leap indicator 3"),
        (answer(transmit_s=0), "transmit timestamp is zero"),
        (answer(receive_s=0), "receive timestamp is zero"),
        (answer(receive_s=time.time() + 1, transmit_s=time.time()), "before its receive"),
        (answer(receive_s=time.time() - 9, transmit_s=time.time() - 3), "round-trip delay"),
    ],
    ids=lambda value: (
        value if isinstance(value, str) else "answer"
    ),  # stable ids: pytest-xdist workers compare them
)
def test_insane_answers_are_rejected(data: bytes, reason: str) -> None:
    with pytest.raises(ntp.NtpRejected, match=reason) as info:
        check(data)
    assert not isinstance(info.value, ntp.NtpNotOurAnswer)


@pytest.mark.parametrize(
    "data",
    [
        answer(origin=bytes(8)),
        answer(origin=TRANSMIT[:7] + b"\xee"),  # one bit pattern off is not close enough
        answer(origin=ntp_time_bytes(time.time())),  # the time of day: what ntplib sends and checks
        answer()[:47],
        b"",
    ],
    ids=["zero origin", "one byte off", "time of day", "short", "empty"],
)
def test_datagrams_that_do_not_echo_our_transmit_timestamp_are_not_answers(data: bytes) -> None:
    with pytest.raises(ntp.NtpNotOurAnswer):
        check(data)


def test_kiss_of_death_is_recognised_only_with_the_right_origin() -> None:
    rate = int.from_bytes(b"RATE", "big")
    with pytest.raises(ntp.NtpRejected) as info:
        check(answer(stratum=0, ref_id=rate))
    assert info.value.kiss == "RATE"
    with pytest.raises(ntp.NtpNotOurAnswer) as info:
        check(answer(origin=bytes(8), stratum=0, ref_id=rate))  # a spoofed kiss cannot slow us down
    assert info.value.kiss == ""
    sample = check(answer())
    assert sample.offset_s == pytest.approx(0.002, abs=0.0015) and sample.refused == 0


def test_requests_carry_random_transmit_timestamps() -> None:
    request = ntp.build_request(TRANSMIT)
    assert len(request) == 48 and request[0] == 0x23 and request[40:] == TRANSMIT  # v4, mode 3
    assert len({ntp.new_transmit_timestamp() for _ in range(64)}) == 64


class CraftedServer:
    """A UDP "NTP server" on loopback that answers each request with the datagrams ``script`` makes.

    ``script(request) -> [datagram, ...]``; it serves at most ``max_requests`` requests (bounded) and
    records them.
    """

    def __init__(self, script: Any, max_requests: int = 4) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(30)
        self.port: int = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self._script = script
        self._max = max_requests
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            for _ in range(self._max):
                request, peer = self.sock.recvfrom(512)
                if self._stopping:
                    return
                self.requests.append(request)
                for datagram in self._script(request):
                    self.sock.sendto(datagram, peer)

    def close(self) -> None:
        self._stopping = True
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as waker:  # wakes the blocked recvfrom
            waker.sendto(b"", ("127.0.0.1", self.port))
        self._thread.join(10)
        self.sock.close()


def spoofed(request: bytes) -> bytes:
    """What an off-path attacker who guesses the time sends: origin = the time of day, offset +1 h."""
    later = time.time() + 3600
    return answer(origin=ntp_time_bytes(time.time()), receive_s=later, transmit_s=later)


def genuine(request: bytes) -> bytes:
    return answer(origin=request[40:48])


@pytest.fixture
def crafted() -> Iterator[Any]:
    servers: list[CraftedServer] = []

    def start(script: Any) -> CraftedServer:
        servers.append(CraftedServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_a_spoofed_answer_is_refused_and_the_real_one_still_accepted(crafted: Any) -> None:
    server = crafted(lambda request: [spoofed(request), b"short", genuine(request)])
    sample = ntp.query_server("127.0.0.1", server.port, 10.0, 1.5)
    assert sample.refused == 2
    assert abs(sample.offset_s) < 0.5  # the genuine answer's offset, not the spoofed hour
    (request,) = server.requests
    assert len(request) == 48 and request[0] & 0x07 == 3


def test_only_spoofed_answers_fail_the_query_and_are_counted(crafted: Any) -> None:
    server = crafted(lambda request: [spoofed(request), spoofed(request)])
    with pytest.raises(ntp.NtpRejected, match="none answered our request") as info:
        ntp.query_server("127.0.0.1", server.port, 2.0, 1.5)
    assert info.value.refused == 2


def test_a_flood_of_wrong_answers_is_bounded(crafted: Any) -> None:
    flood = ntp.MAX_REFUSED_PER_QUERY + 10
    server = crafted(lambda request: [spoofed(request)] * flood + [genuine(request)])
    with pytest.raises(ntp.NtpRejected) as info:
        ntp.query_server("127.0.0.1", server.port, 10.0, 1.5)
    assert info.value.refused == ntp.MAX_REFUSED_PER_QUERY


def test_the_transmit_timestamp_differs_per_request_and_is_echoed(crafted: Any) -> None:
    server = crafted(lambda request: [genuine(request)])
    for _ in range(2):
        assert ntp.query_server("127.0.0.1", server.port, 10.0, 1.5).refused == 0
    first, second = server.requests
    assert first[40:] != second[40:]
    assert ntp.query_server("127.0.0.1", server.port, 10.0, 1.5, transmit=TRANSMIT).refused == 0
    assert server.requests[2][40:] == TRANSMIT


async def test_the_service_counts_refused_answers_and_does_not_sync_on_them(
    tmp_path: Path, crafted: Any
) -> None:
    server = crafted(lambda request: [spoofed(request)])
    cfg = site_config(tmp_path, f"ntp.address=127.0.0.1\nntp.port={server.port}\nntp.timeout=1\n")
    bus = EventBus()
    service = ntp.NtpService(cfg, bus, Events())
    ctx = ServiceContext("ntp", 30.0, lambda: None)
    with structlog.testing.capture_logs() as logs:
        for _ in range(2):
            await service.poll_once(ctx)
    state = bus.states["clock"]
    assert state["refused_answers"] == 2 and state["failures"] == 2
    assert state["synced"] is None and state["offset_s"] is None  # never synced on the spoofed hour
    assert "transmit timestamp" in state["last_error"]
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "NTP datagrams refused: they do not echo our transmit timestamp (spoofed or stale)"
    ]  # once, not once per query


def test_chronyd_echoes_our_random_transmit_timestamp(chronyd: Chronyd) -> None:
    sample = ntp.query_server("127.0.0.1", chronyd.port, 5.0, 1.5)
    assert sample.refused == 0 and abs(sample.offset_s) < 0.05 and sample.stratum == 8


async def test_large_offset_is_unsynchronised_and_stepping_only_without_an_owner(tmp_path: Path) -> None:
    cfg = site_config(
        tmp_path,
        "ntp.address=127.0.0.1\nntp.interval=1\n",
        "\n[ntp]\nstep_clock = true\nmax_offset_s = 1.0\n",
    )
    steps: list[float] = []
    bus = EventBus()
    events = Events()

    def query(host: str, port: int, timeout_s: float, max_delay_s: float) -> ntp.NtpSample:
        return ntp.NtpSample(offset_s=7.5, delay_s=0.01, stratum=2, ref_id="GPS", leap=0)

    service = ntp.NtpService(cfg, bus, events, query=query, stepper=steps.append)
    ctx = ServiceContext("ntp", 30.0, lambda: None)
    service.owner = "chrony"
    await service.poll_once(ctx)
    assert steps == []  # a time daemon owns the clock: never step
    assert bus.states["clock"]["synced"] is False and events.types() == ["clock_unsync"]
    service.owner = None
    await service.poll_once(ctx)
    assert steps == [7.5]
    assert ntp.should_step(cfg, None, 0.1) is False  # below the threshold


def test_clock_owner_detection(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    root = tmp_path / "root"
    (proc / "1").mkdir(parents=True)
    (proc / "1" / "comm").write_text("systemd\n")
    root.mkdir()
    assert ntp.detect_clock_owner(proc, root) is None
    (proc / "812").mkdir()
    (proc / "812" / "comm").write_text("systemd-timesyn\n")
    assert ntp.detect_clock_owner(proc, root) == "systemd-timesyncd"
    (root / "run" / "chrony").mkdir(parents=True)
    (root / "run" / "chrony" / "chronyd.pid").write_text("1\n")
    assert ntp.detect_clock_owner(proc, root) == "chrony"


async def test_no_server_configured_reports_no_verdict(tmp_path: Path) -> None:
    cfg = site_config(tmp_path, "")
    bus = EventBus()
    async with Running(ntp.NtpService(cfg, bus, Events())):
        state = await wait_clock(bus, lambda s: "owner" in s)
    assert state["synced"] is None and state["server"] is None
    assert ntp.clock_synced(bus) is None
