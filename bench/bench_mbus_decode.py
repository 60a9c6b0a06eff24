"""M-Bus decode throughput: link + application layer over every decodable vector; one JSON line.

Bounded: at most ``--max-rounds`` passes over the vectors and at most ``--budget-s`` seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from dcud.codec.mbus import MbusFrame, MbusLinkParser, decode_frame
from dcud.codec.mbus_app import decode_telegram

VECTORS = Path(__file__).resolve().parent.parent / "tests" / "vectors"


def load_frames() -> list[bytes]:
    paths = sorted((VECTORS / "libmbus" / "test-frames").glob("*.hex")) + sorted(
        (VECTORS / "pyMeterBus").glob("*.hex")
    )
    return [bytes(int(t, 16) for t in p.read_text().split()) for p in paths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget-s", type=float, default=2.0)
    parser.add_argument("--max-rounds", type=int, default=2000)
    args = parser.parse_args()
    frames = load_frames()
    total_bytes = sum(len(f) for f in frames)
    records = sum(len(decode_telegram(decode_frame(f)).records) for f in frames)  # warm-up and check

    rounds = 0
    start = time.perf_counter()
    while rounds < args.max_rounds and time.perf_counter() - start < args.budget_s:
        for frame in frames:
            decode_telegram(decode_frame(frame))
        rounds += 1
    decode_s = time.perf_counter() - start

    # Stream parsing: all vectors back to back in 64-byte chunks through the incremental parser.
    stream = b"".join(frames)
    chunks = [stream[i : i + 64] for i in range(0, len(stream), 64)]
    stream_rounds = 0
    start = time.perf_counter()
    while stream_rounds < args.max_rounds and time.perf_counter() - start < args.budget_s / 2:
        link = MbusLinkParser()
        for chunk in chunks:
            link.receive_data(chunk)
            for event in link.events():
                if isinstance(event, MbusFrame):
                    decode_telegram(event)
        stream_rounds += 1
    stream_s = time.perf_counter() - start

    print(
        json.dumps(
            {
                "bench": "mbus_decode",
                "vectors": len(frames),
                "records_per_round": records,
                "bytes_per_round": total_bytes,
                "rounds": rounds,
                "frames_per_s": round(rounds * len(frames) / decode_s),
                "records_per_s": round(rounds * records / decode_s),
                "stream_frames_per_s": round(stream_rounds * len(frames) / stream_s),
                "stream_bytes_per_s": round(stream_rounds * total_bytes / stream_s),
                "python": platform.python_version(),
                "machine": platform.machine(),
            }
        )
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
