"""kill -9 the outbox at random moments: nothing committed is lost, nothing acked comes back.

The helper process (tests/outbox_writer_proc.py) prints a line only after the outbox call returned, so
every printed ``P`` item was committed and every printed ``A`` item was durably acked. Kill moments are
random (after a random number of printed lines, plus a random pause); each cycle is bounded in time.
"""

from __future__ import annotations

import asyncio
import os
import random
import selectors
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dcud.service.outbox import Outbox, OutboxItem, OutboxLimits

from helpers import REPO, TESTS

HELPER = TESTS / "helpers" / "outbox_writer_proc.py"
CYCLES = 15
CYCLE_BUDGET_S = 60.0

pytestmark = pytest.mark.slow


def spawn(*args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, str(HELPER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )


def run_and_kill(
    proc: subprocess.Popen[bytes], kill_after_lines: int, pause_s: float
) -> tuple[list[str], bool]:
    """Read stdout until ``kill_after_lines`` lines (or exit), pause, SIGKILL; return complete lines.

    The second value is True when the process was killed (False: it exited by itself first).
    """
    assert proc.stdout is not None and proc.stderr is not None
    buf = b""
    deadline = time.monotonic() + CYCLE_BUDGET_S
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while buf.count(b"\n") < kill_after_lines:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                pytest.fail(f"helper made no progress within {CYCLE_BUDGET_S} s")
            if not sel.select(timeout=1.0):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
    if pause_s:
        time.sleep(pause_s)  # a random kill moment, not a timing assertion
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=CYCLE_BUDGET_S)
    buf += proc.stdout.read()
    stderr = proc.stderr.read().decode(errors="replace")
    if not killed:
        assert proc.returncode == 0, stderr
    else:
        assert proc.returncode == -signal.SIGKILL, stderr
    complete = buf[: buf.rfind(b"\n") + 1].decode()
    return complete.splitlines(), killed


def parse(lines: list[str], tag: str) -> list[tuple[int, str]]:
    out = []
    for line in lines:
        parts = line.split()
        if parts[0] == tag:
            out.append((int(parts[1]), parts[2]))
    return out


async def read_all(db: Path, consumer: str = "mqtt") -> list[OutboxItem]:
    """Everything takeable for ``consumer`` after a restart (its cursor is not moved: no acks)."""
    items: list[OutboxItem] = []
    async with Outbox(db, OutboxLimits(), ["mqtt"], "dcu-crash") as outbox:
        for _ in range(10_000):
            batch = await outbox.take(consumer, 1000)
            if not batch:
                break
            items.extend(batch)
    return items


def check_db_consistent(db: Path) -> None:
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        count, distinct = conn.execute("SELECT count(*), count(DISTINCT uid) FROM items").fetchone()
        assert count == distinct
    finally:
        conn.close()


def test_kill9_during_puts_loses_no_committed_item(tmp_path: Path) -> None:
    db = tmp_path / "state" / "outbox.db"
    rng = random.Random(20240611)
    committed: dict[int, str] = {}
    for cycle in range(CYCLES):
        # Some cycles die during start-up or schema creation, most in the middle of group commits.
        target = 0 if cycle % 5 == 0 else rng.randint(1, 400)
        pause_s = rng.uniform(0.0, 0.3) if target == 0 else rng.uniform(0.0, 0.02)
        lines, killed = run_and_kill(spawn("put", str(db), "--seed", str(cycle)), target, pause_s)
        assert killed
        for seq, uid in parse(lines, "P"):
            assert seq not in committed, f"seq {seq} handed out twice"
            assert uid.startswith("dcu-crash-") and uid.endswith(f"-{seq}")
            committed[seq] = uid

        if not db.exists():
            assert not committed
            continue
        stored = asyncio.run(read_all(db))
        seqs = [i.seq for i in stored]
        assert seqs == sorted(set(seqs)), "delivery order must be seq order, without repeats"
        assert len({i.uid for i in stored}) == len(stored)
        by_seq = {i.seq: i.uid for i in stored}
        missing = [s for s in committed if s not in by_seq]
        assert not missing, f"cycle {cycle}: committed items lost after kill -9: {missing[:10]}"
        assert all(by_seq[s] == uid for s, uid in committed.items()), "uid changed across restart"
        check_db_consistent(db)
    assert len(committed) > CYCLES  # the kills did land among committed puts


async def prefill(db: Path, n: int) -> list[OutboxItem]:
    async with Outbox(db, OutboxLimits(), ["mqtt"], "dcu-crash") as outbox:
        return await outbox.put_many([("reading", "meter/m/reading", b'{"v": %d}' % i) for i in range(n)])


def test_kill9_during_consume_resumes_in_order_without_loss(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    rng = random.Random(777)
    expected = {i.seq: i.uid for i in asyncio.run(prefill(db, 2000))}
    ack_requested: set[int] = set()  # only these may be missing from a resumed delivery
    max_acked = 0  # highest seq whose batch was fully acked (so the durable cursor is at least this)
    last_taken = 0

    def check_resume(first: int, cycle: int) -> None:
        assert first > max_acked, f"cycle {cycle}: acked item {first} redelivered"
        assert first <= last_taken + 1, (
            f"cycle {cycle}: never-taken items {last_taken + 1}..{first - 1} skipped"
        )
        skipped = [s for s in expected if s < first and s not in ack_requested]
        assert not skipped, f"cycle {cycle}: items skipped without an ack: {sorted(skipped)[:10]}"

    for cycle in range(CYCLES):
        if cycle % 3 == 1:  # other producers keep going between consumer crashes
            expected.update({i.seq: i.uid for i in asyncio.run(prefill(db, 150))})
        lines, killed = run_and_kill(
            spawn("consume", str(db), "--seed", str(cycle), "--produce", "200"),
            rng.randint(0, 250),
            rng.uniform(0.0, 0.01),
        )
        for seq, uid in parse(lines, "P"):
            assert seq not in expected, f"seq {seq} handed out twice"
            expected[seq] = uid
        taken = parse(lines, "T")
        for seq, uid in taken + parse(lines, "K") + parse(lines, "A"):
            assert expected.get(seq) == uid, f"unknown or changed item {seq} {uid}"
        seqs = [s for s, _ in taken]
        if seqs:
            check_resume(seqs[0], cycle)
            assert seqs == list(range(seqs[0], seqs[-1] + 1)), "one consumer, no nacks: contiguous, in order"
            last_taken = seqs[-1]
        ack_requested.update(s for s, _ in parse(lines, "K"))
        max_acked = max([max_acked, *(s for s, _ in parse(lines, "A"))])
        check_db_consistent(db)
        if not killed:
            assert lines[-1] == "DONE"
            break
    remaining = asyncio.run(read_all(db))
    if remaining:
        check_resume(remaining[0].seq, CYCLES)
    lost = sorted(set(expected) - ack_requested - {i.seq for i in remaining})
    assert not lost, f"committed items never delivered: {lost[:10]}"
