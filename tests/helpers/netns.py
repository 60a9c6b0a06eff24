"""Network namespaces of a test's own: whether this process can make one, and running a script in one.

A test that needs one carries ``@pytest.mark.netns`` (root: ``unshare --net``) or
``@pytest.mark.netns(user_ns=True)`` (a user namespace too: any user); tests/conftest.py skips it, with the
reason and how to run it, where the namespace cannot be made, and fails it instead when ``CI`` is set.
Each test makes namespaces of its own, so tests running in parallel never share one.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence

from helpers import REPO

HOW_TO_RUN = (
    "; to run it: as root on a machine or VM (not a chroot), e.g. `sudo .venv/bin/python -m pytest "
    "tests -m netns`. With CI set this is a failure, not a skip."
)


def _unshare_argv(user_ns: bool) -> list[str]:
    """``unshare`` for a network namespace: as root plainly, else (or on request) in a user namespace."""
    unshare = shutil.which("unshare")
    assert unshare, "needs util-linux unshare (scripts/test.sh installs it)"
    if user_ns or os.geteuid() != 0:
        return [unshare, "--map-root-user", "--net"]
    return [unshare, "--net"]


@functools.cache
def netns_problem(user_ns: bool) -> str:
    """Why this process cannot make the network namespace the test needs ("" when it can).

    Tried, not guessed: ``unshare ... true`` is run once per process. Without ``user_ns`` the test needs
    real root (CAP_SYS_ADMIN to create the namespace, CAP_NET_ADMIN inside it for sysctls such as
    ``ping_group_range``); with it, a user namespace of its own, which any user may create unless the
    kernel forbids unprivileged user namespaces or the process runs in a chroot.
    """
    if not user_ns and os.geteuid() != 0:
        return (
            "needs root (CAP_SYS_ADMIN to create a network namespace, CAP_NET_ADMIN to set its "
            "ping_group_range); this user is not root"
        )
    if shutil.which("unshare") is None:
        return "needs util-linux `unshare`, which is not installed (scripts/test.sh installs it)"
    argv = _unshare_argv(user_ns)
    try:
        result = subprocess.run([*argv, "true"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`{' '.join(argv[1:])}` could not run here: {exc}"
    if result.returncode == 0:
        return ""
    said = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
    if user_ns:
        return (
            f"`unshare --map-root-user --net` failed here ({said}): the kernel refuses a user "
            "namespace to this process (sysctl kernel.unprivileged_userns_clone=0, a chroot, or a "
            "container without user namespaces)"
        )
    return f"`unshare --net` failed here ({said}): this root lacks CAP_SYS_ADMIN (a container?)"


def run_in_own_netns(
    script: str, setup: Sequence[str] = (), timeout_s: float = 60.0, *, user_ns: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run python ``script`` in a network namespace of our own (``unshare --net``, from the repository).

    ``setup``: shell commands run inside it first, ``{ip}`` standing for iproute2's ``ip``. Nothing in
    the namespace reaches the host's network, so multicast and raw sockets stay inside the test.
    ``user_ns``: inside a user namespace of its own too (``--map-root-user``), which needs no root.
    """
    ip = shutil.which("ip", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    assert ip, "needs iproute2 ip (scripts/test.sh installs it)"
    commands = "".join(f"{command.format(ip=ip)} && " for command in setup)
    return subprocess.run(
        [*_unshare_argv(user_ns), "sh", "-c", f'{commands}exec {sys.executable} -c "$0"', script],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        cwd=REPO,
    )
