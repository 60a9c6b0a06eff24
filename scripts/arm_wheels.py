"""Which of dcud's runtime dependencies have PyPI wheels for an ARM machine, and which would be compiled.

    python scripts/arm_wheels.py armv7l        # 32-bit ARM (Debian armhf), Python 3.11, glibc <= 2.36
    python scripts/arm_wheels.py aarch64       # 64-bit ARM (Debian arm64)
    python scripts/arm_wheels.py armv7l --extra test

Reads the dependency list from pyproject.toml (``[project] dependencies``, plus the named extras), drops
the requirements whose environment marker excludes the target machine (uvloop on armv7l), resolves the
whole tree with pip for this machine's Python (the same 3.11 as Debian 12), and then asks PyPI, with
``pip download --only-binary :all: --platform manylinux_2_X_<machine> --no-deps``, for a wheel of each
resolved distribution that is not pure Python. For one without such a wheel it also looks for the newest
release that has one. Prints one line per distribution and a JSON summary; exits 1 when a distribution
that has compiled wheels elsewhere has none for the target ("compile"). Distributions without any wheel
("sdist", built from source everywhere) are listed apart. Needs pip and access to PyPI; runs as any user.

Markers of transitive requirements are evaluated by pip for this machine, not for the target; a
dependency that exists only on ARM would be missed (none is known). piwheels (Raspberry Pi OS's armv7
index) is not asked: only PyPI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from packaging.markers import default_environment
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
# glibc of Debian 12 is 2.36: a manylinux wheel for any glibc up to that runs there.
GLIBC_MINORS = range(17, 37)
PYTHON_VERSION = "3.11"


def platform_tags(machine: str) -> list[str]:
    """Every manylinux tag pip should accept for ``machine`` on Debian 12."""
    tags = [f"manylinux_2_{minor}_{machine}" for minor in GLIBC_MINORS]
    return [*tags, f"manylinux2014_{machine}"]


def requirements(pyproject: Path, extras: list[str], machine: str) -> list[str]:
    """The requirement strings of pyproject.toml that apply on ``machine`` (Linux, CPython 3.11)."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    environment = {
        **default_environment(),
        "platform_machine": machine,
        "sys_platform": "linux",
        "platform_system": "Linux",
        "python_version": PYTHON_VERSION,
    }
    kept = []
    for line in lines:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            requirement.marker = None
            kept.append(str(requirement))
    return kept


def pip(*args: str) -> subprocess.CompletedProcess[str]:
    """Runs this interpreter's pip against PyPI only (no local find-links or constraints of the host)."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in {"PIP_FIND_LINKS", "PIP_CONSTRAINT", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"}
    }
    environment["PIP_CONFIG_FILE"] = os.devnull
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
        timeout=600,
    )


def resolve(reqs: list[str], workdir: Path) -> list[dict[str, Any]]:
    """The distributions pip installs for ``reqs`` here: name, version and the file it would take."""
    report = workdir / "report.json"
    result = pip(
        "install", "--dry-run", "--ignore-installed", "--quiet", "--prefer-binary",
        "--target", str(workdir / "target"), "--report", str(report), *reqs,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"pip could not resolve the dependencies here:\n{result.stderr}")
    installs = json.loads(report.read_text(encoding="utf-8"))["install"]
    return [
        {
            "name": item["metadata"]["name"],
            "version": item["metadata"]["version"],
            "file": item["download_info"]["url"].rsplit("/", 1)[-1],
        }
        for item in installs
    ]


def target_wheel(spec: str, machine: str, workdir: Path) -> str | None:
    """The file name of the wheel pip picks for ``spec`` on ``machine``, or None when there is none."""
    dest = Path(tempfile.mkdtemp(dir=workdir))
    platforms = [arg for tag in platform_tags(machine) for arg in ("--platform", tag)]
    result = pip(
        "download", "--quiet", "--no-deps", "--only-binary", ":all:", *platforms,
        "--python-version", PYTHON_VERSION, "--implementation", "cp",
        "--abi", "cp311", "--abi", "abi3", "--abi", "none", "--dest", str(dest), spec,
    )  # fmt: skip
    files = sorted(path.name for path in dest.iterdir())
    return files[0] if result.returncode == 0 and files else None


def is_pure(filename: str) -> bool:
    """A wheel tagged ``none-any`` is pure Python and runs on every machine."""
    return filename.endswith("-none-any.whl")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("machine", choices=["armv7l", "aarch64", "x86_64"], help="uname -m of the target")
    parser.add_argument("--extra", action="append", default=[], help="also check this extra (e.g. test)")
    parser.add_argument("--pyproject", type=Path, default=REPO / "pyproject.toml")
    args = parser.parse_args()
    if sys.version_info[:2] != (3, 11):
        print(f"note: resolving with Python {sys.version.split()[0]}; Debian 12 has 3.11", file=sys.stderr)

    reqs = requirements(args.pyproject, args.extra, args.machine)
    rows = []
    with tempfile.TemporaryDirectory(prefix="arm-wheels-") as tmp:
        workdir = Path(tmp)
        for dist in resolve(reqs, workdir):
            row: dict[str, Any] = {"name": dist["name"], "version": dist["version"]}
            if is_pure(dist["file"]):
                row["status"] = "pure"
                row["wheel"] = dist["file"]
            elif not dist["file"].endswith(".whl"):
                # No wheel for any machine: built from source everywhere (needs a compiler only if
                # it has extension modules).
                row["status"] = "sdist"
                row["wheel"] = f"no wheel at all, built from {dist['file']}"
            else:
                wheel = target_wheel(f"{dist['name']}=={dist['version']}", args.machine, workdir)
                if wheel is not None:
                    # A pure fallback wheel (wrapt publishes one) counts as pure: nothing to compile.
                    row["status"] = "pure" if is_pure(wheel) else "wheel"
                    row["wheel"] = wheel
                else:
                    row["status"] = "compile"
                    newest = target_wheel(dist["name"], args.machine, workdir)
                    row["newest_with_wheel"] = newest
            rows.append(row)

    width = max(len(row["name"]) for row in rows)
    for row in rows:
        detail = row.get("wheel") or f"no {args.machine} wheel; newest with one: {row['newest_with_wheel']}"
        print(f"{row['name']:<{width}}  {row['version']:<10}  {row['status']:<7}  {detail}")
    compile_list = [row["name"] for row in rows if row["status"] == "compile"]
    sdist_list = [row["name"] for row in rows if row["status"] == "sdist"]
    summary = {
        "machine": args.machine,
        "python": PYTHON_VERSION,
        "requirements": reqs,
        "pure": sum(row["status"] == "pure" for row in rows),
        "wheels": sum(row["status"] == "wheel" for row in rows),
        "compile": compile_list,
        "sdist_only": sdist_list,
        "ok": not compile_list,
    }
    print(json.dumps(summary))
    return 0 if not compile_list else 1


if __name__ == "__main__":
    raise SystemExit(main())
