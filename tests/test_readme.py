"""The README's generated parameter table matches the catalogue; the README shows the two set-up commands."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import build_readme  # noqa: E402 (scripts/ is put on the path first)
import gen_params_table  # noqa: E402


def test_readme_parameter_table_is_generated_from_the_catalogue() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(gen_params_table.BEGIN)
    end = text.index(gen_params_table.END) + len(gen_params_table.END)
    assert text[start:end] == gen_params_table.render_compact(), (
        "run scripts/gen_params_table.py --readme README.md"
    )


def test_readme_includes_are_current() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert "<!-- include: docs/" in text
    assert text == build_readme.render(text), "run python scripts/build_readme.py"


def test_full_parameter_table_is_current() -> None:
    assert (REPO / "docs" / "parameters.md").read_text(encoding="utf-8") == gen_params_table.render()


def test_readme_has_the_two_setup_commands() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert "bash scripts/demo.sh" in text and "bash scripts/test.sh" in text
    assert "dcud demo" in text
