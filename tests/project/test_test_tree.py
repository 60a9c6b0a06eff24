"""No test file imports another test file: shared pieces live in tests/helpers (plain code) or
tests/conftest.py (fixtures).

``tests/`` is on ``sys.path``, but a ``test_*`` module is not: ``from test_x import ...`` resolves only
when pytest happened to put test_x's directory on ``sys.path`` first (rootdir-relative import of a
file collected earlier), so running the importing file alone fails with ModuleNotFoundError. The
helpers, the test peers, the fuzz targets and the vectors are outside this rule (they are not test
modules and are not collected as such).
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import TESTS

EXEMPT_DIRS = ("helpers", "peers", "fuzz", "vectors")
"""Directories under tests/ that this rule does not look into."""


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, dotted module name) of every import in ``tree``, at any depth (functions included);
    ``from . import x`` counts as module ``x``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.module is not None:
                found.append((node.lineno, node.module))
            if node.level or node.module is None:
                found += [(node.lineno, alias.name) for alias in node.names]
    return found


def imports_of_test_modules(root: Path) -> list[str]:
    """``path:line: module`` for every import of a ``test_*`` module by a file under ``root``
    (outside EXEMPT_DIRS), by path relative to ``root``."""
    offenders: list[str] = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if relative.parts[0] in EXEMPT_DIRS:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, module in imported_modules(tree):
            if any(part.startswith("test_") for part in module.split(".")):
                offenders.append(f"{relative.as_posix()}:{line}: {module}")
    return offenders


def test_no_test_file_imports_another() -> None:
    assert imports_of_test_modules(TESTS) == [], "move what they share to tests/helpers or tests/conftest.py"


def test_the_check_sees_every_form_of_import(tmp_path: Path) -> None:
    """The rule is not blind: each way of importing a test module is found, the exempt directories
    and look-alike names are not."""
    (tmp_path / "service").mkdir()
    (tmp_path / "helpers").mkdir()
    (tmp_path / "service" / "test_a.py").write_text(
        "import os\n"
        "from test_b import X\n"
        "import test_c as c\n"
        "from service.test_d import Y\n"
        "from . import test_e\n"
        "from helpers.latest_x import Z\n"
        "def f() -> None:\n"
        "    from test_f import W\n"
    )
    (tmp_path / "conftest.py").write_text("from test_g import fixture\n")
    (tmp_path / "helpers" / "tools.py").write_text("from test_h import H\n")
    assert imports_of_test_modules(tmp_path) == [
        "conftest.py:1: test_g",
        "service/test_a.py:2: test_b",
        "service/test_a.py:3: test_c",
        "service/test_a.py:4: service.test_d",
        "service/test_a.py:5: test_e",
        "service/test_a.py:8: test_f",
    ]
