"""The config port's limits in one process (issue 13): source grouping, the body rate bound, the
plain-write refusal and the counters on the state document. The daemon-level proofs are in
tests/service/test_config_port_hostile.py; these pin the rules themselves, fast."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from dcud.config.model import ConfigPortConfig
from dcud.runtime.bus import EventBus
from dcud.service.config_port import (
    ConfigPortService,
    ConfigPortSettings,
    _RateBound,
    source_key,
)
from dcud.service.firmware import FirmwareStager
from dcud.service.remote_config import ApplyResult


@pytest.mark.parametrize(
    ("peer", "key"),
    [
        ("10.1.2.3", "10.1.2.3"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),  # same subscriber prefix, same budget
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("local", "local"),
    ],
)
def test_sources_are_counted_per_address_and_ipv6_per_64(peer: str, key: str) -> None:
    assert source_key(peer) == key


def test_rate_bound_needs_the_minimum_in_every_window() -> None:
    rate = _RateBound(min_rate_bytes_s=100, window_s=10.0, now=0.0)
    assert rate.min_bytes == 1000 and rate.window_end == 10.0
    rate.feed(999, now=9.0)
    assert rate.window_end == 10.0  # not enough yet: the window is not renewed
    rate.feed(1, now=9.5)
    assert rate.window_end == 19.5  # enough: a new window from now
    rate.feed(10_000, now=10.0)  # a burst does not buy more than one window
    assert rate.window_end == 20.0


class _Api:
    def __init__(self) -> None:
        self.applied: list[str] = []

    @property
    def current(self) -> Any:
        raise AssertionError("not used")

    def current_text(self) -> str:
        return "ntp_interval=600\n"

    async def apply_text(self, text: str, **_kw: Any) -> ApplyResult:
        self.applied.append(text)
        return ApplyResult({}, [], "test", False)


class _Writer:
    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, data: bytes) -> None:
        self.buffer += data

    async def drain(self) -> None:
        return None

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        return None

    def close(self) -> None:
        return None

    async def wait_closed(self) -> None:
        return None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.7", 40000) if name == "peername" else default


def _service(tmp_path: Path, bus: EventBus, **limits: Any) -> tuple[ConfigPortService, _Api]:
    settings = ConfigPortSettings(
        port=0,
        host="127.0.0.1",
        encrypt=False,
        key_text=None,
        limits=ConfigPortConfig(**limits),
        state_dir=str(tmp_path),
        device_id="dcu-t",
    )
    api = _Api()
    service = ConfigPortService(settings, api, bus)
    service._firmware = FirmwareStager(tmp_path / "firmware", None, 4096)
    return service, api


async def _request(service: ConfigPortService, data: bytes) -> bytes:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    writer = _Writer()
    await service._connection(reader, writer)  # type: ignore[arg-type]
    return bytes(writer.buffer)


PATCH = b"PATCH /config HTTP/1.1\r\nHost: d\r\nContent-Length: 17\r\n\r\nntp_interval=300\n"


async def test_plain_writes_are_refused_and_counted_on_the_state(tmp_path: Path) -> None:
    bus = EventBus()
    service, api = _service(tmp_path, bus)
    answer = await _request(service, PATCH)
    assert answer.startswith(b"HTTP/1.1 403") and b"plain_writes = true" in answer
    assert api.applied == []
    counters = bus.states["config_port"]["counters"]
    assert counters["plain_writes_refused"] == 1 and counters["requests"] == {"403": 1}
    assert bus.states["config_port"]["plain_writes"] is False
    # GET is a read: served.
    assert (await _request(service, b"GET /config HTTP/1.1\r\nHost: d\r\n\r\n")).startswith(b"HTTP/1.1 200")


async def test_plain_writes_with_the_opt_in(tmp_path: Path) -> None:
    service, api = _service(tmp_path, EventBus(), plain_writes=True)
    assert (await _request(service, PATCH)).startswith(b"HTTP/1.1 200")
    assert api.applied == ["ntp_interval=300\n"]


async def test_a_stalled_body_is_cut_by_the_rate_bound_and_counted(tmp_path: Path) -> None:
    bus = EventBus()
    service, api = _service(tmp_path, bus, plain_writes=True, body_rate_window_s=0.05)
    reader = asyncio.StreamReader()
    reader.feed_data(b"PUT /config HTTP/1.1\r\nHost: d\r\nContent-Length: 100\r\n\r\nntp")  # then nothing
    writer = _Writer()
    await asyncio.wait_for(service._connection(reader, writer), 30)  # type: ignore[arg-type]
    assert bytes(writer.buffer).startswith(b"HTTP/1.1 408") and b"body slower than" in writer.buffer
    assert bus.states["config_port"]["counters"]["slow_bodies"] == 1
    assert api.applied == []


async def test_the_per_source_limit_is_counted(tmp_path: Path) -> None:
    bus = EventBus()
    service, _api = _service(tmp_path, bus, max_connections_per_source=1, header_timeout_s=30)
    held = asyncio.StreamReader()  # a client that sends nothing yet: it holds its slot
    first = asyncio.create_task(service._connection(held, _Writer()))  # type: ignore[arg-type]
    for _ in range(100):  # bounded: until the first connection is counted
        if service._per_source:
            break
        await asyncio.sleep(0)
    answer = await _request(service, b"GET /config HTTP/1.1\r\nHost: d\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 503") and b"from this address" in answer
    assert bus.states["config_port"]["counters"]["refused_per_source"] == 1
    held.feed_data(b"GET /config HTTP/1.1\r\nHost: d\r\n\r\n")
    held.feed_eof()
    await asyncio.wait_for(first, 30)
    assert service._per_source == {}  # released: the map never grows past the open connections
