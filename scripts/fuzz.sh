#!/usr/bin/env bash
# Fuzz every target for a fixed time, on demand (CI runs the hypothesis harnesses in tests/fuzz at
# the "ci" budget on every run; this is the long, coverage-guided run):
#
#   scripts/fuzz.sh [seconds per target, default 60] [target ...]
#
# With atheris installed (pip install atheris; x86_64 wheels on PyPI) each target runs under
# libFuzzer for that long (tests/fuzz/atheris_fuzz.py); without it, the hypothesis harnesses run at
# the "deep" profile instead. Crash inputs land in build/fuzz-crashes/<target>/; keep each one in
# tests/vectors/fuzz-regressions/<target>/ together with its fix. Exit status 1 if any target crashed.
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET_S="${1:-60}"
shift || true
TARGETS=("$@")
[ "${#TARGETS[@]}" -gt 0 ] || TARGETS=(iec mbus wme http envelope)
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PY=.venv/bin/python

if "$PY" -c "import atheris" 2>/dev/null; then
    failed=()
    for target in "${TARGETS[@]}"; do
        echo "== atheris $target for ${BUDGET_S}s"
        if ! timeout --kill-after=30 "$((BUDGET_S + 120))" "$PY" tests/fuzz/atheris_fuzz.py "$target" \
            -max_total_time="$BUDGET_S" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
            2> >(grep -E "^(#[0-9]+ *DONE|stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+== ERROR|.*Test unit written|.*Uncaught Python exception)" >&2); then
            failed+=("$target")
        fi
    done
    if [ "${#failed[@]}" -gt 0 ]; then
        echo "crashes in: ${failed[*]} (see build/fuzz-crashes/)" >&2
        exit 1
    fi
    echo "no crashes"
else
    echo "== atheris not installed: hypothesis harnesses at the deep profile"
    DCUD_FUZZ_PROFILE=deep "$PY" -m pytest -q -p no:cacheprovider tests/fuzz
fi
