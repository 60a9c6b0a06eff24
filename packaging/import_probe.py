"""Import every dcud module and the compiled dependencies; print one JSON line (scripts/deb_check.sh).

Run with the installed venv's Python as user dcud in a fresh rootfs: a native library that does not
load there (wrong architecture, a missing system library) shows up here and not only at the first
use of a feature.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import platform

import dcud

# The extension modules of the compiled dependencies on amd64 and arm64 (the only packaged architectures).
NATIVE = (
    "msgspec._core",
    "cryptography.hazmat.bindings._rust",
    "_cffi_backend",
    "uvloop.loop",
    "wrapt._wrappers",
)


def main() -> int:
    """Import everything, report what failed; 1 when something did."""
    failed = []
    names = [module.name for module in pkgutil.walk_packages(dcud.__path__, "dcud.")]
    for name in [*names, *NATIVE]:
        try:
            importlib.import_module(name)
        except Exception as exc:
            failed.append(f"{name}: {exc!r}")
    print(
        json.dumps(
            {
                "machine": platform.machine(),
                "python": platform.python_version(),
                "dcud_modules": len(names),
                "failed": failed,
            }
        )
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
