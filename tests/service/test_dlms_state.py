"""Durable DLMS state: invocation counters never reused (also after a crash), cursors, and the outbox marks
that commit a cursor in the same transaction as its rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dcud.codec.dlms.client import DlmsClient, DlmsClientConfig, GetRequest
from dcud.codec.dlms.cosem import CLOCK_TIME
from dcud.codec.dlms.security import Keys, SecurityPolicy
from dcud.errors import LocalProtocolError
from dcud.service.dlms_state import (
    COUNTER_LOW_WATER,
    COUNTER_RESERVE,
    DlmsStateLocked,
    DlmsStateStore,
    MeterState,
    keyset_id,
    lock_state_dir,
    unlock_state_dir,
)
from dcud.service.outbox import Outbox, OutboxFull, OutboxLimits, OverflowPolicy

from helpers import REPO
from helpers.dlms import IdleLink

KEYS = Keys(bytes(range(16)), bytes(range(16, 32)))


def test_counters_are_reserved_before_use_and_never_reused_after_a_crash(tmp_path: Path) -> None:
    store = DlmsStateStore(tmp_path)
    state = store.get("em-1")
    first, limit = state.counter_range("k")
    assert (first, limit) == (1, COUNTER_RESERVE)
    assert state.dirty  # the caller saves before the session starts
    store.save("em-1")
    state.counter_used("k", 1 + 4000)  # a session used 4000 values
    start, limit = state.counter_range("k")
    assert (start, limit) == (4001, COUNTER_RESERVE) and not state.dirty  # enough left: no write
    state.counter_used("k", 4001 + 2000)
    start, limit = state.counter_range("k")  # fewer than the low water left: reserve ahead
    assert start == 6001 and limit == 6001 + COUNTER_RESERVE - 1 and state.dirty
    store.save("em-1")
    state.counter_used("k", 6500)  # ... and the process is killed before it writes anything more
    after_crash = DlmsStateStore(tmp_path).get("em-1")
    resumed, _ = after_crash.counter_range("k")
    assert resumed == 6001 + COUNTER_RESERVE > 6500  # above everything the lost session may have used
    assert resumed - 6500 < COUNTER_RESERVE + COUNTER_LOW_WATER


def test_a_session_cannot_go_past_its_reservation() -> None:
    config = DlmsClientConfig(
        security=SecurityPolicy.AUTHENTICATED,
        keys=KEYS,
        system_title=b"DCU\x00\x00\x00\x00\x01",
        invocation_counter=10,
        invocation_counter_limit=10,
    )

    client = DlmsClient(IdleLink(), config, [GetRequest(CLOCK_TIME)])
    client.start(0.0)  # the AARQ's ciphered initiate took 10, the last value of the reservation
    assert client.last_invocation_counter == 10
    with pytest.raises(LocalProtocolError, match="reservation exhausted"):
        client._counter.take()
    assert client.next_invocation_counter == 11


def test_state_round_trip_cursors_and_a_damaged_file(tmp_path: Path) -> None:
    wall = 1_800_000_000.0
    store = DlmsStateStore(tmp_path, lambda: wall)
    state = store.get("em-1")
    state.counter_range("k")
    state.set_server_counter("k", 77)
    state.set_server_counter("k", 5)  # never goes back
    state.set_profile_cursor("1.0.99.1.0.255", 1000.0)
    state.set_profile_cursor("1.0.99.1.0.255", 900.0)  # never goes back for the same profile
    state.set_event_cursor("0.0.99.98.0.255", 50.0)
    state.clock = {"drift_s": 1.5}
    store.save("em-1")
    assert oct(os.stat(tmp_path / "em-1.json").st_mode & 0o777) == "0o600"
    again = DlmsStateStore(tmp_path).get("em-1")
    assert again.server_counters == {"k": 77}
    assert again.profile_cursor("1.0.99.1.0.255") == 1000.0 and again.profile_cursor("1.0.99.2.0.255") is None
    assert again.event_cursors_s == {"0.0.99.98.0.255": 50.0} and again.clock == {"drift_s": 1.5}
    assert again.counter_range("k")[0] == COUNTER_RESERVE + 1
    # A damaged file: kept aside, the meter starts fresh, counters start above any the file could hold.
    (tmp_path / "em-2.json").write_text('{"invocation_counters": {"k": {"reserved": 12')
    fresh = DlmsStateStore(tmp_path, lambda: wall).get("em-2")
    assert fresh.counter_range("k")[0] == int(wall)
    assert list(tmp_path.glob("em-2.json.corrupt-*"))
    # Values of the wrong type are dropped, not trusted.
    state = MeterState.from_json("x", {"invocation_counters": {"k": {"reserved": "9"}}, "profile": [1]})
    assert state.reserved == {} and state.profile_cursor_s is None


def test_a_command_line_read_gives_the_rest_of_its_reservation_back(tmp_path: Path) -> None:
    store = DlmsStateStore(tmp_path)
    state = store.get("em-1")
    start, _ = state.counter_range("k")
    store.save("em-1")
    state.counter_used("k", start + 7)
    state.give_back_reservation()
    store.save("em-1")
    assert DlmsStateStore(tmp_path).get("em-1").counter_range("k")[0] == start + 7


def test_keyset_ids_differ_per_key_set_and_hide_the_keys() -> None:
    base = {"keys": KEYS, "system_title": b"DCU12345", "client_sap": 1, "logical_device": 1}
    ident = keyset_id(**base)  # type: ignore[arg-type]
    assert len(ident) == 16 and KEYS.block_cipher_key.hex() not in ident
    other_keys = Keys(bytes(16), bytes(16))
    for change in (
        {"keys": other_keys},
        {"client_sap": 16},
        {"logical_device": 2},
        {"system_title": b"DCU12346"},
    ):
        assert keyset_id(**{**base, **change}) != ident  # type: ignore[arg-type]


def test_the_state_directory_is_held_by_one_process(tmp_path: Path) -> None:
    directory = tmp_path / "dlms"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, pathlib; from dcud.service.dlms_state import lock_state_dir as l;"
            f"l(pathlib.Path({str(directory)!r}), wait=False); print('held', flush=True); sys.stdin.read()",
        ],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(DlmsStateLocked, match="in use by another dcud process"):
            lock_state_dir(directory, wait=False)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
    lock_state_dir(directory, wait=False)  # free again once the holder exited
    lock_state_dir(directory, wait=False)  # taking it twice in one process is fine
    unlock_state_dir(directory)


async def test_outbox_marks_commit_with_their_items_and_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path, OutboxLimits(), ["mqtt"], "dcu-7")
    await outbox.open()
    try:
        assert outbox.mark("dlms:em-1:profile") is None
        items = [("reading", "meter/em-1/reading", json.dumps({"n": n}).encode()) for n in range(3)]
        stored = await outbox.put_many(items, marks={"dlms:em-1:profile": "1.0.99.1.0.255 1000"})
        assert len(stored) == 3 and outbox.mark("dlms:em-1:profile") == "1.0.99.1.0.255 1000"
        await outbox.put_many(items[:1], marks={"dlms:em-1:profile": "1.0.99.1.0.255 1900"})
        assert outbox.mark("dlms:em-1:profile") == "1.0.99.1.0.255 1900"
    finally:
        await outbox.close()
    reopened = Outbox(path, OutboxLimits(), ["mqtt"], "dcu-7")
    await reopened.open()
    try:
        assert reopened.mark("dlms:em-1:profile") == "1.0.99.1.0.255 1900"
        assert reopened.stats().items == 4
    finally:
        await reopened.close()


async def test_an_outbox_that_refuses_the_items_keeps_the_old_mark(tmp_path: Path) -> None:
    limits = OutboxLimits(max_bytes=65536, policy=OverflowPolicy.REJECT_NEW)
    outbox = Outbox(tmp_path / "outbox.sqlite", limits, ["mqtt"], "dcu-7")
    await outbox.open()
    try:
        await outbox.put_many([("reading", "r", b"x")], marks={"m": "1"})
        with pytest.raises(OutboxFull):
            await outbox.put_many([("reading", "r", b"x" * 70000)], marks={"m": "2"})
        assert outbox.mark("m") == "1"
    finally:
        await outbox.close()
    reopened = Outbox(tmp_path / "outbox.sqlite", limits, ["mqtt"], "dcu-7")
    await reopened.open()
    try:
        assert reopened.mark("m") == "1"
    finally:
        await reopened.close()
