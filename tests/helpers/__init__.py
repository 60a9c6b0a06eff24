"""Plain helpers of the tests (functions and classes, not fixtures), imported as ``helpers.<module>``.

Fixtures live in tests/conftest.py; what a test calls with its own arguments lives here. ``tests/`` is
on ``sys.path`` (pyproject.toml ``[tool.pytest.ini_options] pythonpath``), wherever the test file is.
"""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
"""The tests/ directory."""

REPO = TESTS.parent
"""The repository's root (the working directory of the daemons and tools the tests start)."""

VECTORS = TESTS / "vectors"
"""Real-world and recorded protocol vectors (tests/vectors/README files say where each came from)."""
