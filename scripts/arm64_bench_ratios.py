"""The ratios of a benchmark run (JSON lines of bench/bench_bridge.py, bench_drives.py, bench_footprint.py).

``python scripts/arm64_bench_ratios.py RESULTS.jsonl`` prints one JSON line per ratio group. Made for
scripts/arm64_bench.sh, whose absolute timings under qemu mean little while ratios of programs measured
side by side in the same run carry over (docs/arm.md); it reads a run on the host just the same.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _ratio(a: object, b: object) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float) and b:
        return round(a / b, 3)
    return None


def bridge(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """dcud over socat, ser2net and the bare relay: p50, p99 and CPU per round trip, per frame size."""
    out = []
    sizes = sorted({line["frame_bytes"] for line in lines if line.get("bench") == "bridge_latency"})
    for size in sizes:
        group = {
            line["bridge"]: line
            for line in lines
            if line.get("bench") == "bridge_latency" and line["frame_bytes"] == size
        }
        dcud = group.get("dcud")
        if dcud is None:
            continue
        row: dict[str, Any] = {"ratio": "bridge", "frame_bytes": size, "rounds": dcud.get("rounds")}
        for other in ("socat", "ser2net", "relay"):
            if other in group:
                row[f"over_{other}"] = {
                    key: _ratio(dcud.get(field), group[other].get(field))
                    for key, field in (("p50", "p50_us"), ("p99", "p99_us"), ("cpu", "cpu_us_per_round_trip"))
                }
        row["lost"] = sum(int(line.get("lost") or 0) for line in group.values())
        row["reordered"] = sum(int(line.get("reordered") or 0) for line in group.values())
        out.append(row)
    for line in lines:
        if line.get("bench") == "bridge_note":
            out.append({"ratio": "bridge_note", **{k: v for k, v in line.items() if k != "bench"}})
        if line.get("bench") == "bridge_idle_sessions":
            out.append({"ratio": "bridge_idle", **{k: v for k, v in line.items() if k != "bench"}})
    return out


def drives(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """CPU of dcud with 8 drives, and over the floor where the benchmark measured one."""
    out = []
    for line in lines:
        if line.get("bench") != "drives":
            continue
        for interface, result in (line.get("results") or {}).items():
            row: dict[str, Any] = {"ratio": "drives", "interface": interface}
            if "skipped" in result:
                row["skipped"] = result["skipped"]
            for key in ("cpu_pct_of_core", "cpu_pct_by_thread", "floor_cpu_pct_of_core", "rss_mib"):
                if key in result:
                    row[key] = result[key]
            row["latency_ms_p50"] = (result.get("latency_ms") or {}).get("p50")
            row["tpdo_per_s_per_drive"] = result.get("tpdo_per_s_per_drive")
            floor = result.get("floor_cpu_pct_of_core")
            if floor is not None:
                row["over_floor"] = _ratio(result.get("cpu_pct_of_core"), floor)
            out.append(row)
    return out


def footprint(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What each feature's imports add, and idle RSS over the import floor of the same configuration.

    Under qemu-user the process's RSS also holds the emulator's cache of translated code, which grows
    with the code that ran: ``over_import_floor`` is the emulator's as much as dcud's there, while the
    import floors (``import_adds_mib``) compare with a native run's.
    """
    out = []
    for line in lines:
        if line.get("bench") != "footprint":
            continue
        row: dict[str, Any] = {"ratio": "footprint", "scenario": line.get("scenario")}
        for key in ("import_adds_mib", "adds_mib", "rss_mib", "import_floor_mib", "skipped"):
            if key in line:
                row[key] = line[key]
        if "rss_mib" in line:
            row["over_import_floor"] = _ratio(line.get("rss_mib"), line.get("import_floor_mib"))
        out.append(row)
    return out


def main() -> None:
    """Read the file named on the command line, print the ratios."""
    lines = []
    for row in Path(sys.argv[1]).read_text().splitlines():
        text = row.strip()
        if text.startswith("{"):
            try:
                lines.append(json.loads(text))
            except ValueError:
                continue
    for row in bridge(lines) + drives(lines) + footprint(lines):
        print(json.dumps(row))
    failed = [line["bench"] for line in lines if line.get("failed")]
    if failed:
        print(json.dumps({"ratio": "failed", "benches": failed}))


if __name__ == "__main__":
    main()
