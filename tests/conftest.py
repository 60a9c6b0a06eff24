"""Fixtures for every test: real peers on loopback, a notify socket, private directories per worker.

Plain helpers that a test calls with its own arguments (``write_site``, ``start_daemon``...) are in the
``helpers`` package (tests/helpers/), imported normally; nothing imports this file. The suite runs in
parallel (pytest-xdist, scripts/test.sh): whatever a test binds or writes is its own (free ports,
``tmp_path``), and what third-party programs keep in shared places is redirected per worker below.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dcud.sim.peers import Mosquitto, start_mosquitto

from helpers.commands import Commander
from helpers.netns import HOW_TO_RUN, netns_problem
from helpers.notify import NotifySocket

pytest_plugins = ["peers.dlms_fixture"]  # the DLMS/COSEM test peer's ``dlms_peer`` (tests/peers/README.md)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "netns(user_ns=False): runs in a network namespace of its own (helpers.netns); skipped with the "
        "reason where it cannot be made, a failure instead when CI is set",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    mark = item.get_closest_marker("netns")
    if mark is None or os.environ.get("CI"):
        return
    problem = netns_problem(bool(mark.kwargs.get("user_ns", False)))
    if problem:
        pytest.skip(f"network namespace test: {problem}{HOW_TO_RUN}")


@pytest.fixture(scope="session", autouse=True)
def private_shared_directories(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Per worker: the temporary directory and Net-SNMP's persistent directory, for this process and
    every program it starts.

    pysnmp keeps an engine's boot counter in ``<tempdir>/__pysnmp/<engine id>`` and Net-SNMP's tools
    their state in ``/var/lib/snmp`` (or ``~/.snmp``): shared by every test of every run on the machine.
    ``cert_indexes`` is made beforehand, else Net-SNMP's first run in a directory says so on stderr.
    """
    base = tmp_path_factory.mktemp("shared")
    temp, snmp = base / "tmp", base / "snmp"
    temp.mkdir()
    (snmp / "cert_indexes").mkdir(mode=0o700, parents=True)
    patch = pytest.MonkeyPatch()
    patch.setenv("TMPDIR", str(temp))
    patch.setattr(tempfile, "tempdir", str(temp))
    patch.setenv("SNMP_PERSISTENT_DIR", str(snmp))
    try:
        yield base
    finally:
        patch.undo()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real Mosquitto on a free loopback port (CI installs it; missing is a failure, not a skip)."""
    b = start_mosquitto(tmp_path / "mosquitto")
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def commander(broker: Mosquitto) -> Iterator[Commander]:
    """A ``<p>/cmd/<verb>`` client (:class:`helpers.commands.Commander`) on the ``broker`` fixture."""
    c = Commander(broker.port)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    """A NOTIFY_SOCKET for a daemon (``start_daemon(config, notify_socket)``)."""
    ns = NotifySocket(tmp_path / "notify.sock")
    try:
        yield ns
    finally:
        ns.close()
