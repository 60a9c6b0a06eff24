"""No module under dcud/ is over 1,000 lines (issue 14): a module that long holds more than one thing.

The WM-E parameter catalogue is exempt: it is data (one entry per row of the parameter table), not
code. Modules that are being split on another branch right now are allowed until that branch is
merged; an entry that is no longer needed (the module is short enough, or gone) fails too, so the
allow-list empties as the branches come in.
"""

from __future__ import annotations

from pathlib import Path

from helpers import REPO

MAX_LINES = 1000

DATA_MODULES = frozenset({"dcud/config/wme_catalogue.py"})
"""Exempt for good: data, not code."""

BEING_SPLIT: frozenset[str] = frozenset()
"""Over the limit today, being split elsewhere: the lead removes each entry when its branch is merged."""


def line_count(path: Path) -> int:
    """Lines as ``wc -l`` counts them."""
    return path.read_bytes().count(b"\n")


def oversized(root: Path, package: str = "dcud", max_lines: int = MAX_LINES) -> dict[str, int]:
    """Every ``.py`` file under ``root/package`` longer than ``max_lines``, by repository path."""
    found: dict[str, int] = {}
    for path in sorted((root / package).rglob("*.py")):
        lines = line_count(path)
        if lines > max_lines:
            found[path.relative_to(root).as_posix()] = lines
    return found


def offenders(found: dict[str, int], exempt: frozenset[str]) -> list[str]:
    """``path: N lines`` for each oversized module that is not exempt, longest first."""
    return [
        f"{path}: {lines} lines"
        for path, lines in sorted(found.items(), key=lambda item: -item[1])
        if path not in exempt
    ]


def test_no_module_is_over_the_limit() -> None:
    found = oversized(REPO)
    too_long = offenders(found, DATA_MODULES | BEING_SPLIT)
    assert not too_long, (
        f"modules over {MAX_LINES} lines (split them by responsibility, see CONTRIBUTING.md): "
        + "; ".join(too_long)
    )


def test_the_allow_list_holds_only_modules_that_need_it() -> None:
    found = oversized(REPO)
    stale = sorted(BEING_SPLIT - found.keys())
    assert not stale, f"no longer over {MAX_LINES} lines (or gone), remove from BEING_SPLIT: {stale}"
    missing = sorted(path for path in DATA_MODULES if not (REPO / path).is_file())
    assert not missing, f"exempt data modules that do not exist: {missing}"


def test_the_check_finds_a_long_module(tmp_path: Path) -> None:
    # The check itself can fail: a module one line over the limit is reported, with its length.
    package = tmp_path / "dcud" / "sub"
    package.mkdir(parents=True)
    (package / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    (package / "fine.py").write_text("x = 1\n" * MAX_LINES)
    (tmp_path / "dcud" / "data.py").write_text("x = 1\n" * (MAX_LINES * 2))
    found = oversized(tmp_path)
    assert found == {"dcud/sub/long.py": MAX_LINES + 1, "dcud/data.py": 2 * MAX_LINES}
    assert offenders(found, frozenset({"dcud/data.py"})) == [f"dcud/sub/long.py: {MAX_LINES + 1} lines"]
