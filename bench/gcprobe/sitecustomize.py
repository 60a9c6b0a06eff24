"""A debug probe for the benchmarks: when does Python's cyclic GC run in a process, and for how long.

Every Python process started with this directory on ``PYTHONPATH`` and ``GCPROBE_DIR`` set (the
benchmarks pass their environment on to the daemon, the relay, the echo devices...) records each
collection (seconds since start, generation, microseconds) through ``gc.callbacks`` and writes
``GCPROBE_DIR/<pid>.json`` when it exits (also on ``os._exit``, which the bench's relay uses)::

    PYTHONPATH=bench/gcprobe GCPROBE_DIR=/tmp/gc BENCH_TRIALS=1 python bench/bench_bridge.py

Without ``GCPROBE_DIR`` it does nothing. A debugging aid, not part of any measurement: the callback
costs a little per collection.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from typing import Any

_OUT = os.environ.get("GCPROBE_DIR")


def _install(out: str) -> None:
    started = time.monotonic()
    counts = [0, 0, 0]
    series: list[tuple[float, int, int]] = []
    began = [0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            began[0] = time.perf_counter_ns()
            return
        generation = int(info["generation"])
        counts[generation] += 1
        took_us = (time.perf_counter_ns() - began[0]) // 1000
        series.append((round(time.monotonic() - started, 3), generation, took_us))

    def dump() -> None:
        record = {
            "argv": sys.orig_argv,
            "wall_s": round(time.monotonic() - started, 1),
            "collections": counts,
            "series": series,
            "tracked": len(gc.get_objects()),
            "frozen": gc.get_freeze_count(),
            "threshold": gc.get_threshold(),
        }
        with open(os.path.join(out, f"{os.getpid()}.json"), "w") as file:
            json.dump(record, file)

    real_exit = os._exit

    def exit_now(code: int) -> None:
        dump()
        real_exit(code)

    gc.callbacks.append(on_gc)
    import atexit

    atexit.register(dump)
    os._exit = exit_now  # type: ignore[assignment]


if _OUT:
    _install(_OUT)
