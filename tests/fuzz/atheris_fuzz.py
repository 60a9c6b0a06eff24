"""Coverage-guided fuzzing of the targets in ``targets.py`` with atheris (libFuzzer), on demand.

    python tests/fuzz/atheris_fuzz.py TARGET [-max_total_time=60] [other libFuzzer flags]

TARGET is one of iec, mbus, wme, http, envelope. The corpus lives in ``build/fuzz-corpus/<target>``
(seeded from ``tests/vectors`` and the regression corpus; libFuzzer adds to it), crash inputs go to
``build/fuzz-crashes/<target>/crash-<sha1>`` (``-artifact_prefix``). Keep a crash input as a regression
vector by copying it into ``tests/vectors/fuzz-regressions/<target>/`` with the fix.
``scripts/fuzz.sh`` runs every target for a fixed time.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import atheris
import structlog

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

with atheris.instrument_imports(include=["dcud"]):
    import targets

# The daemon's code logs refusals; at libFuzzer speed that is noise and slows every run down.
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))


def _seeds(target: str) -> list[bytes]:
    vectors = REPO / "tests" / "vectors"
    seeds: list[bytes] = []
    if target == "mbus":
        for path in sorted((vectors / "libmbus" / "test-frames").glob("*.hex"))[:200]:
            try:
                seeds.append(bytes.fromhex(path.read_text()))
            except ValueError:
                continue
    elif target == "iec":
        for path in sorted((vectors / "dcud-iec").glob("*.bin")):
            seeds.append(b"\x01\x00" + path.read_bytes())
        for path in sorted((vectors / "dsmr_parser").glob("*.txt"))[:20]:
            seeds.append(b"\x02\x00" + path.read_bytes())
    elif target == "wme":
        seeds.append((REPO / "config" / "wme.conf").read_bytes())
    elif target == "http":
        seeds.append(b"\x00PUT /config HTTP/1.1\r\nHost: d\r\nContent-Length: 17\r\n\r\nntp_interval=300\n")
        seeds.append(b"\x00GET /config HTTP/1.1\r\nHost: d\r\n\r\n")
        sealed = targets.seal_for_seed(b"ntp_interval=300\n", b"PUT /config")
        seeds.append(
            b"\x01PUT /config HTTP/1.1\r\nHost: d\r\nContent-Length: %d\r\n\r\n" % len(sealed) + sealed
        )
    return seeds


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in targets.TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(targets.TARGETS)}}} [libFuzzer flags]")
    target = sys.argv[1]
    corpus = REPO / "build" / "fuzz-corpus" / target
    crashes = REPO / "build" / "fuzz-crashes" / target
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    for index, seed in enumerate(_seeds(target)):
        (corpus / f"seed-{index}").write_bytes(seed)
    regressions = targets.REGRESSIONS / target
    dirs = [str(corpus)] + ([str(regressions)] if regressions.is_dir() else [])
    flags = [a for a in sys.argv[2:]]
    if not any(f.startswith("-artifact_prefix=") for f in flags):
        flags.append(f"-artifact_prefix={crashes}/")
    # The regression directory is read as extra corpus; new inputs go to the first (build/) directory.
    argv = [sys.argv[0], *flags, *dirs]
    function = targets.TARGETS[target]
    atheris.Setup(argv, function)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
