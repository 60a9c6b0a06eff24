"""Helper process for tests/service/test_outbox_crash.py: works on an outbox until it is killed with SIGKILL.

``put DB``: ``--producers`` tasks put items in a loop; right after each ``put`` returns (committed) it
prints ``P <seq> <uid>``.

``consume DB``: takes batches for consumer ``mqtt`` and prints ``T <seq> <uid>`` for each item taken;
acks the batch in up to three calls in random order, printing ``K <seq> <uid>`` just before each call
(ack requested: only such an item may legitimately not come back after a crash), and only once every ack
of the batch has returned prints ``A <seq> <uid>`` for each. Meanwhile a producer task puts
``--produce`` items (printing ``P`` lines), so transactions commit while items are in flight. Prints
``DONE`` and exits when the producer is done and nothing is left.

Every line is one ``write`` (shorter than PIPE_BUF), flushed, so a kill never leaves half a line.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from pathlib import Path

from dcud.service.outbox import Outbox, OutboxLimits

CONSUMERS = ("mqtt",)


def emit(lines: list[str]) -> None:
    for line in lines:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


async def put_loop(db: Path, producers: int, max_items: int, seed: int) -> None:
    async with Outbox(db, OutboxLimits(), CONSUMERS, "dcu-crash") as outbox:
        left = max_items

        async def producer(n: int) -> None:
            nonlocal left
            while left > 0:
                left -= 1
                payload = f'{{"producer": {n}, "seed": {seed}}}'.encode()
                item = await outbox.put("reading", f"meter/m{n}/reading", payload)
                emit([f"P {item.seq} {item.uid}"])

        async with asyncio.TaskGroup() as tg:
            for n in range(producers):
                tg.create_task(producer(n))


async def consume_loop(db: Path, seed: int, max_batch: int, produce: int) -> None:
    rng = random.Random(seed)
    async with Outbox(db, OutboxLimits(), CONSUMERS, "dcu-crash") as outbox:

        async def producer() -> None:
            for n in range(produce):
                item = await outbox.put("event", "event", b'{"n": %d}' % n)
                emit([f"P {item.seq} {item.uid}"])
                await asyncio.sleep(0)

        producing = asyncio.create_task(producer())
        while True:
            items = await outbox.take("mqtt", rng.randint(1, max_batch))
            if not items:
                if producing.done():
                    await producing
                    emit(["DONE"])
                    return
                await outbox.wait_for_items("mqtt")
                continue
            emit([f"T {i.seq} {i.uid}" for i in items])
            shuffled = list(items)
            rng.shuffle(shuffled)
            cuts = sorted(rng.randint(0, len(shuffled)) for _ in range(2))
            for part in (shuffled[: cuts[0]], shuffled[cuts[0] : cuts[1]], shuffled[cuts[1] :]):
                emit([f"K {i.seq} {i.uid}" for i in part])
                await outbox.ack("mqtt", [i.seq for i in part])
                await asyncio.sleep(0)  # let the producer commit while the rest is in flight
            emit([f"A {i.seq} {i.uid}" for i in items])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["put", "consume"])
    parser.add_argument("db", type=Path)
    parser.add_argument("--producers", type=int, default=8)
    parser.add_argument("--max-items", type=int, default=200_000)
    parser.add_argument("--max-batch", type=int, default=40)
    parser.add_argument("--produce", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.mode == "put":
        asyncio.run(put_loop(args.db, args.producers, args.max_items, args.seed))
    else:
        asyncio.run(consume_loop(args.db, args.seed, args.max_batch, args.produce))


if __name__ == "__main__":
    main()
