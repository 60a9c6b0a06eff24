"""Refresh README.md's generated blocks: the WM-E parameter table and the included docs/*.md pages.

``<!-- include: docs/NAME.md -->`` ... ``<!-- end include -->`` is replaced by the page with its headings
demoted to sit under the README's level-2 sections, so each feature is documented once (in docs/) and
the README carries all of it. ``tests/test_readme.py`` fails when the README is stale.

Usage: ``python scripts/build_readme.py`` (rewrites README.md in place).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import gen_params_table  # noqa: E402

INCLUDE = re.compile(r"<!-- include: (?P<path>[\w./-]+) -->\n.*?<!-- end include -->", re.DOTALL)


def demote(markdown: str) -> str:
    """Headings one level deeper per level the page starts at above ``##``; code blocks untouched."""
    lines = markdown.rstrip("\n").split("\n")
    levels = [len(m.group(1)) for line in lines if (m := re.match(r"^(#+) ", line))]
    shift = 3 - min(levels) if levels else 0
    out, fenced = [], False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        heading = not fenced and shift > 0 and re.match(r"^#+ ", line)
        out.append("#" * shift + line if heading else line)
    return "\n".join(out)


def render(readme: str) -> str:
    """The README with every generated block refreshed."""

    def include(match: re.Match[str]) -> str:
        path = match.group("path")
        body = demote((REPO / path).read_text(encoding="utf-8"))
        return f"<!-- include: {path} -->\n{body}\n<!-- end include -->"

    text = INCLUDE.sub(include, readme)
    start = text.index(gen_params_table.BEGIN)
    end = text.index(gen_params_table.END) + len(gen_params_table.END)
    return text[:start] + gen_params_table.render_compact() + text[end:]


def main() -> int:
    """Rewrite README.md in place."""
    path = REPO / "README.md"
    path.write_text(render(path.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
