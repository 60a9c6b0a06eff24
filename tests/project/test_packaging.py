"""The Debian package (scripts/build_deb.sh, packaging/) and the ARM wheel check (scripts/arm_wheels.py).

The fast tests here run in every suite: they put a package together from a stand-in venv with
dpkg-deb (no chroot, no network, no root) and check what an installation depends on: the unit,
sysusers and tmpfiles files are the repository's, the examples are conffiles, ExecStart= exists in
the package, the maintainer scripts parse. The real build and the install/upgrade/purge check in a
fresh Debian 12 rootfs (debootstrap, arm64 under qemu: minutes) run only when asked, as root:

    sudo DCUD_DEB_CHECK="amd64 arm64" .venv/bin/python -m pytest -q tests/project/test_packaging.py

(docs/debian.md; the same as `scripts/build_deb.sh && scripts/deb_check.sh`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from helpers import REPO

BUILD_DEB = REPO / "scripts" / "build_deb.sh"
UNIT_EXEC = "/opt/dcud/bin/dcud"
ELF_AARCH64_HEADER = b"\x7fELF\x02\x01\x01\x00" + bytes(8) + b"\x03\x00\xb7\x00" + bytes(44)
ELF_X86_64_HEADER = b"\x7fELF\x02\x01\x01\x00" + bytes(8) + b"\x03\x00\x3e\x00" + bytes(44)

needs_dpkg_deb = pytest.mark.skipif(
    shutil.which("dpkg-deb") is None and not os.environ.get("CI"),
    reason="dpkg-deb (Debian's dpkg) is not installed; CI runs on Debian and never skips",
)


def fake_venv(root: Path, version: str = "0.1.0", native: bytes = ELF_X86_64_HEADER) -> Path:
    """A stand-in for /opt/dcud: the layout assemble looks at, a console script and one native module."""
    site = root / "lib" / "python3.11" / "site-packages"
    (site / f"dcud-{version}.dist-info").mkdir(parents=True)
    (site / f"dcud-{version}.dist-info" / "METADATA").write_text(f"Name: dcud\nVersion: {version}\n")
    (site / "_native.cpython-311-x86_64-linux-gnu.so").write_bytes(native)
    (root / "bin").mkdir()
    script = root / "bin" / "dcud"
    script.write_text("#!/opt/dcud/bin/python\n")
    script.chmod(0o755)
    return root


def assemble(tmp_path: Path, venv: Path, arch: str = "amd64") -> subprocess.CompletedProcess[str]:
    """scripts/build_deb.sh --assemble: the package of ``venv`` in tmp_path/out."""
    return subprocess.run(
        ["bash", str(BUILD_DEB), "--assemble", str(venv), arch, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def extract(deb: Path, dest: Path) -> Path:
    """The file system tree of ``deb`` (dpkg-deb -x) plus its control area in DEBIAN/."""
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True, timeout=60)
    subprocess.run(["dpkg-deb", "-e", str(deb), str(dest / "DEBIAN")], check=True, timeout=60)
    return dest


def field(deb: Path, name: str) -> str:
    """One field of the package's control file."""
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()


@needs_dpkg_deb
def test_package_carries_the_repository_files_and_the_examples_as_conffiles(tmp_path: Path) -> None:
    result = assemble(tmp_path, fake_venv(tmp_path / "venv"))
    assert result.returncode == 0, result.stderr
    deb = Path(result.stdout.strip())
    assert deb.name == "dcud_0.1.0-1_amd64.deb"
    assert field(deb, "Package") == "dcud"
    assert field(deb, "Architecture") == "amd64"
    depends = {item.strip().split(" ")[0] for item in field(deb, "Depends").split(",")}
    # The venv's interpreter, ExecReload='s /bin/kill, systemd-sysusers/-tmpfiles, IANA zones.
    assert {"python3.11", "procps", "systemd", "tzdata"} <= depends

    tree = extract(deb, tmp_path / "tree")
    for repo_file, installed in [
        ("systemd/dcud.service", "usr/lib/systemd/system/dcud.service"),
        ("systemd/dcud.sysusers.conf", "usr/lib/sysusers.d/dcud.conf"),
        ("systemd/dcud.tmpfiles.conf", "usr/lib/tmpfiles.d/dcud.conf"),
        ("config/dcud.toml", "etc/dcud/dcud.toml"),
        ("config/wme.conf", "etc/dcud/wme.conf"),
        ("config/dcud.toml", "usr/share/dcud/examples/dcud.toml"),
        ("config/wme.conf", "usr/share/dcud/examples/wme.conf"),
        ("systemd/dcud.service.d/clock-step.conf", "usr/share/dcud/examples/clock-step.conf"),
        ("systemd/dcud-reboot.rules", "usr/share/dcud/examples/dcud-reboot.rules"),
    ]:
        assert (tree / installed).read_bytes() == (REPO / repo_file).read_bytes(), installed
    conffiles = (tree / "DEBIAN" / "conffiles").read_text().split()
    assert conffiles == ["/etc/dcud/dcud.toml", "/etc/dcud/wme.conf"]
    for conffile in conffiles:
        assert (tree / conffile.lstrip("/")).stat().st_mode & 0o777 == 0o640, conffile

    # What the unit starts is in the package, and on PATH.
    unit = (tree / "usr/lib/systemd/system/dcud.service").read_text()
    assert f"ExecStart={UNIT_EXEC} " in unit
    assert (tree / UNIT_EXEC.lstrip("/")).is_file()
    assert os.readlink(tree / "usr/bin/dcud") == UNIT_EXEC

    md5sums = (tree / "DEBIAN" / "md5sums").read_text()
    assert "opt/dcud/bin/dcud" in md5sums
    assert "etc/dcud" not in md5sums  # dpkg keeps the conffiles' sums itself
    for script in ("postinst", "prerm", "postrm"):
        path = tree / "DEBIAN" / script
        assert os.access(path, os.X_OK), script
        subprocess.run(["sh", "-n", str(path)], check=True, timeout=30)


@needs_dpkg_deb
def test_prerelease_versions_sort_before_the_release(tmp_path: Path) -> None:
    result = assemble(tmp_path, fake_venv(tmp_path / "venv", version="0.2.0rc1"))
    assert result.returncode == 0, result.stderr
    version = field(Path(result.stdout.strip()), "Version")
    assert version == "0.2.0~rc1-1"
    older = subprocess.run(["dpkg", "--compare-versions", version, "lt", "0.2.0-1"], check=False, timeout=30)
    assert older.returncode == 0


@needs_dpkg_deb
def test_a_venv_of_another_architecture_is_refused(tmp_path: Path) -> None:
    result = assemble(tmp_path, fake_venv(tmp_path / "venv", native=ELF_AARCH64_HEADER), arch="amd64")
    assert result.returncode != 0
    assert "is not an amd64 ELF file" in result.stderr
    assert not list((tmp_path / "out").glob("*.deb"))


def test_shell_scripts_parse() -> None:
    for script in [
        "scripts/build_deb.sh",
        "scripts/deb_check.sh",
        "scripts/arm64_check.sh",
        "packaging/rootfs.sh",
        "packaging/debian/postinst",
        "packaging/debian/prerm",
        "packaging/debian/postrm",
    ]:
        shell = "sh" if script.startswith("packaging/debian/") else "bash"
        result = subprocess.run(
            [shell, "-n", str(REPO / script)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, f"{script}: {result.stderr}"


def load_arm_wheels() -> ModuleType:
    """scripts/arm_wheels.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("arm_wheels", REPO / "scripts" / "arm_wheels.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arm_wheel_check_reads_pyproject_and_its_markers(tmp_path: Path) -> None:
    arm_wheels = load_arm_wheels()
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        "[project]\n"
        'dependencies = ["msgspec>=0.18", "uvloop>=0.19; platform_machine == \'x86_64\' or '
        "platform_machine == 'aarch64'\"]\n"
        '[project.optional-dependencies]\ntest = ["pytest>=8"]\n'
    )
    assert arm_wheels.requirements(pyproject, [], "armv7l") == ["msgspec>=0.18"]
    assert arm_wheels.requirements(pyproject, ["test"], "aarch64") == [
        "msgspec>=0.18",
        "uvloop>=0.19",
        "pytest>=8",
    ]
    # The real file: every runtime requirement is checked, not a copy of the list.
    project_deps = arm_wheels.requirements(REPO / "pyproject.toml", [], "aarch64")
    assert any(dep.startswith("cryptography") for dep in project_deps)
    assert not any(
        dep.startswith("uvloop") for dep in arm_wheels.requirements(REPO / "pyproject.toml", [], "armv7l")
    )


ON_DEMAND_ARCHES = os.environ.get("DCUD_DEB_CHECK", "").split()


@pytest.mark.skipif(not ON_DEMAND_ARCHES, reason='on demand: DCUD_DEB_CHECK="amd64 arm64" (as root, minutes)')
@pytest.mark.timeout(7200)
def test_build_install_upgrade_purge_in_fresh_debian_rootfs(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "debootstrap, chroot and mounts need root"
    env = {**os.environ, "DCUD_DEB_OUT": str(tmp_path), "DCUD_DEB_DIR": str(tmp_path)}
    build = subprocess.run(
        ["bash", str(REPO / "scripts" / "build_deb.sh"), *ON_DEMAND_ARCHES],
        env=env, capture_output=True, text=True, timeout=5400, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-4000:]
    built = [json.loads(line) for line in build.stdout.splitlines() if line.startswith('{"arch"')]
    assert [row["arch"] for row in built] == ON_DEMAND_ARCHES
    check = subprocess.run(
        ["bash", str(REPO / "scripts" / "deb_check.sh"), *ON_DEMAND_ARCHES],
        env=env, capture_output=True, text=True, timeout=5400, check=False,
    )  # fmt: skip
    results = [json.loads(line) for line in check.stdout.splitlines() if line.startswith('{"arch"')]
    sys.stderr.write(build.stdout + check.stdout)
    assert check.returncode == 0, check.stderr[-4000:]
    assert [row["arch"] for row in results] == ON_DEMAND_ARCHES
    assert all(row["ok"] and not row["failed"] for row in results), results
