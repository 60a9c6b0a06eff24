"""Outbox throughput: committed puts per second (group commit, real fsync) and take+ack drain rate.

Prints one JSON line. Usage: python bench/bench_outbox.py [--items N] [--producers N] [--payload-bytes N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dcud.service.outbox import Outbox, OutboxLimits


async def run(
    items: int, producers: int, payload_bytes: int, take_limit: int, state_dir: Path
) -> dict[str, object]:
    payload = b"x" * payload_bytes
    outbox = Outbox(state_dir / "outbox.db", OutboxLimits(), ["mqtt"], "bench")
    await outbox.open()
    try:
        per_task, extra = divmod(items, producers)

        async def producer(n: int) -> None:
            for _ in range(n):
                await outbox.put("reading", "meter/bench/reading", payload)

        start = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for i in range(producers):
                tg.create_task(producer(per_task + (1 if i < extra else 0)))
        commit_s = time.perf_counter() - start
        commits = outbox.stats().commits

        drained = 0
        start = time.perf_counter()
        while True:
            batch = await outbox.take("mqtt", take_limit)
            if not batch:
                break
            await outbox.ack("mqtt", [item.seq for item in batch])
            drained += len(batch)
        drain_s = time.perf_counter() - start
        if drained != items:
            raise SystemExit(f"drained {drained} of {items} items")
    finally:
        await outbox.close()
    return {
        "bench": "outbox",
        "commit_items_per_s": round(items / commit_s),
        "take_ack_items_per_s": round(drained / drain_s),
        "items": items,
        "payload_bytes": payload_bytes,
        "producers": producers,
        "take_limit": take_limit,
        "items_per_commit": round(items / max(1, commits), 1),
        "synchronous": "FULL",
        "cpus": os.cpu_count(),
    }


def fsync_ms(state_dir: Path, rounds: int = 50) -> float:
    """Median time of a 4 KiB write + fsync in ``state_dir``: what one commit costs on this disk."""
    times = []
    fd = os.open(state_dir / "fsync-probe", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(rounds):
            start = time.perf_counter()
            os.pwrite(fd, b"\0" * 4096, 0)
            os.fsync(fd)
            times.append(time.perf_counter() - start)
    finally:
        os.close(fd)
    return round(sorted(times)[len(times) // 2] * 1000, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--producers", type=int, default=50)
    parser.add_argument("--payload-bytes", type=int, default=200)
    parser.add_argument("--take-limit", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-outbox-") as tmp:
        state_dir = Path(tmp)
        result = asyncio.run(run(args.items, args.producers, args.payload_bytes, args.take_limit, state_dir))
        result["db_bytes_after_close"] = sum(p.stat().st_size for p in state_dir.iterdir())
        result["fsync_ms"] = fsync_ms(state_dir)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
