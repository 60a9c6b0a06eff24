"""FTP data push against a real FTP server (pyftpdlib in a process, loopback): names, contents, no half
files, retries against a server that is down / refuses login / stalls, kill -9 mid-upload, FTPS."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import io
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from dcud.codec.iec62056 import IecReceiver
from dcud.config.loader import load_config
from dcud.runtime.bus import EventBus
from dcud.runtime.supervisor import ServiceContext
from dcud.service.datapush import DataPushService, DataPushServiceConfig, Phase, PushError
from dcud.service.ftp_push import COLUMNS, FtpUploader, obis_tariff, render_csv, tariff_selected
from dcud.service.outbox import Outbox, OutboxItem, OutboxLimits
from dcud.sim.ftp_server import FtpPeer, start_ftp_server
from dcud.sim.readings import iec_reading, mbus_reading, reading_bytes

from helpers.certs import make_cert
from helpers.daemon import daemon_log, start_daemon, write_site

NAME_RE = re.compile(r"^WM115_dcu-test_(\d{8}T\d{6}Z)\.(csv|iec)$")
T0 = dt.datetime(2026, 3, 10, 10, 7, tzinfo=dt.UTC).timestamp()


@pytest.fixture
def ftp(tmp_path: Path) -> Iterator[FtpPeer]:
    peer = start_ftp_server(tmp_path / "ftp")
    try:
        yield peer
    finally:
        peer.stop()


# ---------------------------------------------------------------------------------------- helpers


class HeldClock:
    """Virtual time for the schedule (sleeps jump), which stops while ``hold()`` is true."""

    def __init__(self, start: float) -> None:
        self.t = start
        self.hold: Callable[[], bool] = lambda: False
        self.released = asyncio.Event()

    def now(self) -> float:
        return self.t

    async def sleep(self, ctx: ServiceContext, delay_s: float) -> bool:
        while self.hold() and not ctx.stopping.is_set():
            self.released.clear()
            stop = asyncio.ensure_future(ctx.stopping.wait())
            await asyncio.wait(
                [stop, asyncio.ensure_future(self.released.wait())], return_when="FIRST_COMPLETED"
            )
            stop.cancel()
        self.t += delay_s
        await asyncio.sleep(0)
        return ctx.stopping.is_set()

    def release(self) -> None:
        self.hold = lambda: False
        self.released.set()


def site(tmp_path: Path, peer: FtpPeer, wme: str = "", toml: str = "") -> Path:
    return write_site(
        tmp_path / "site",
        wme=f"datapush_host={peer.url('/in')}\ndatapush_prefix=WM115\ndatapush_periodic=5\n{wme}",
        toml_extra=toml,
    )


async def filled_outbox(path: Path, consumers: Sequence[str], iec: int, mbus: int = 0) -> list[OutboxItem]:
    outbox = Outbox(path, OutboxLimits(), consumers, "dcu-test")
    await outbox.open()
    try:
        rows = [
            ("reading", f"meter/e{n % 3}/reading", reading_bytes(iec_reading(f"e{n % 3}", n, T0 + n)))
            for n in range(iec)
        ]
        rows += [
            ("reading", f"meter/w{n % 2}/reading", reading_bytes(mbus_reading(f"w{n % 2}", n, T0 + n)))
            for n in range(mbus)
        ]
        return await outbox.put_many(rows)
    finally:
        await outbox.close()


def final_files(root: Path) -> list[str]:
    directory = root / "in"
    return sorted(n for n in os.listdir(directory) if NAME_RE.match(n)) if directory.exists() else []


def csv_uids(root: Path) -> list[str]:
    """Every distinct uid per CSV file, concatenated over the files in name order."""
    uids: list[str] = []
    for name in final_files(root):
        if name.endswith(".csv"):
            rows = list(csv.DictReader(io.StringIO((root / "in" / name).read_text(encoding="utf-8"))))
            uids.extend(dict.fromkeys(r["uid"] for r in rows))
    return uids


class DirectoryWatcher(threading.Thread):
    """Polls the upload directory: the first content seen under every final name, and any .part seen."""

    def __init__(self, directory: Path) -> None:
        super().__init__(daemon=True)
        self.directory = directory
        self.first_seen: dict[str, bytes] = {}
        self.parts_seen: set[str] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 120
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                names = os.listdir(self.directory)
            except FileNotFoundError:
                names = []
            for name in names:
                if name.endswith(".part"):
                    self.parts_seen.add(name)
                elif name not in self.first_seen:
                    with contextlib.suppress(FileNotFoundError):
                        self.first_seen[name] = (self.directory / name).read_bytes()
            time.sleep(0.001)


async def wait_until(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


async def run_service(service: DataPushService, done: Callable[[], bool], timeout_s: float = 60.0) -> None:
    ctx = ServiceContext("datapush", 30.0, lambda: None)
    task = asyncio.create_task(service.run(ctx))
    try:
        await wait_until(lambda: done() or task.done(), timeout_s)
        if task.done():
            task.result()
            raise AssertionError("service ended early")
    finally:
        ctx.stopping.set()
        async with asyncio.timeout(20):
            await task


def push_service(config_path: Path, outbox: Outbox, clock: HeldClock) -> tuple[DataPushService, EventBus]:
    slice_ = DataPushServiceConfig.from_config(load_config(config_path))
    assert slice_ is not None
    bus = EventBus()
    return DataPushService(slice_, bus, outbox, FtpUploader.from_slice(slice_), clock), bus


# ------------------------------------------------------------------------------------ pure contents


def test_table_mask_and_obis_tariffs() -> None:
    assert [
        obis_tariff(x) for x in ("1.8.0", "1.8.2", "1-0:2.8.3*255", "1.6.1", "1.7.0", "C.1.0", "0.9.1")
    ] == [
        0,
        2,
        3,
        1,
        None,
        None,
        None,
    ]
    assert tariff_selected(None, 0) and tariff_selected(0, 0)
    assert tariff_selected(1, 1) and not tariff_selected(2, 1) and not tariff_selected(3, 1)
    assert tariff_selected(2, 16) and tariff_selected(3, 32) and tariff_selected(5, 32)
    assert tariff_selected(1, 33) and tariff_selected(3, 33) and not tariff_selected(2, 33)

    def ids(mask: int) -> list[str]:
        body = render_csv(
            [("u-1", iec_reading("e", 1, T0, tariffs=3)), ("u-2", mbus_reading("w", 2, T0))], mask
        )
        rows = list(csv.DictReader(io.StringIO(body.decode())))
        return [f"{r['uid']}:{r['id']}" for r in rows]

    assert ids(1) == ["u-1:C.1.0", "u-1:1.8.0", "u-1:1.8.1", "u-1:1.7.0", "u-2:0", "u-2:1", "u-2:3"]
    assert ids(16) == ["u-1:C.1.0", "u-1:1.8.0", "u-1:1.8.2", "u-1:1.7.0", "u-2:0", "u-2:2", "u-2:3"]
    assert ids(49) == [
        "u-1:C.1.0", "u-1:1.8.0", "u-1:1.8.1", "u-1:1.8.2", "u-1:1.8.3", "u-1:1.7.0",
        "u-2:0", "u-2:1", "u-2:2", "u-2:3",
    ]  # fmt: skip
    body = render_csv([("u-3", {"meter": "x", "protocol": "mbus", "values": [{"id": 0, "tariff": 2}]})], 1)
    assert body.decode().splitlines()[1] == "u-3,x,,mbus,,,,,,,"  # accounted for even when all is masked


# ------------------------------------------------------------------------- files, names, never half


async def test_files_arrive_complete_with_names_and_contents(tmp_path: Path, ftp: FtpPeer) -> None:
    config = site(tmp_path, ftp, "datapush_table_mask=49\n", "[datapush]\nbatch_items = 40\n")
    state = tmp_path / "site" / "state"
    items = await filled_outbox(state / "outbox.sqlite", ["ftp"], iec=90, mbus=30)
    ftp.set_mode("ok", rate_bytes_per_s=150_000)  # slow enough for the watcher to see uploads in progress
    watcher = DirectoryWatcher(ftp.root / "in")
    watcher.start()
    outbox = Outbox(state / "outbox.sqlite", OutboxLimits(), ["ftp"], "dcu-test")
    await outbox.open()
    try:
        service, bus = push_service(config, outbox, HeldClock(T0))
        await run_service(service, lambda: outbox.stats().backlog["ftp"] == 0)
    finally:
        await outbox.close()
        watcher.stop.set()
        watcher.join()
    names = final_files(ftp.root)
    stamps = sorted({NAME_RE.match(n).group(1) for n in names})  # type: ignore[union-attr]
    assert len(stamps) == 3  # 120 readings in sets of 40
    assert names == sorted(names) and all(f"WM115_dcu-test_{s}.csv" in names for s in stamps)
    assert stamps[0] == "20260310T101000Z"  # the first 5-minute boundary after 10:07 UTC
    # never half a file: whatever a reader saw first under a final name is the final content
    assert watcher.parts_seen, "the watcher never saw an upload in progress"
    for name, first in watcher.first_seen.items():
        assert first == (ftp.root / "in" / name).read_bytes(), name
    assert not [n for n in os.listdir(ftp.root / "in") if n.endswith(".part")]
    # CSV: every reading exactly once, in outbox order, with the documented header
    assert csv_uids(ftp.root) == [item.uid for item in items]
    first_csv = (ftp.root / "in" / f"WM115_dcu-test_{stamps[0]}.csv").read_bytes().decode()
    assert first_csv.splitlines()[0] == ",".join(COLUMNS) and first_csv.endswith("\r\n")
    # IEC: the raw readouts as received, parseable by an IEC 62056-21 receiver, BCC intact
    raw_sets = [n for n in names if n.endswith(".iec")]
    assert len(raw_sets) == 3
    receiver = IecReceiver()
    for name in raw_sets:
        receiver.receive_data((ftp.root / "in" / name).read_bytes())
    kinds = []
    while (message := receiver.next_message()) is not None:
        kinds.append(type(message).__name__)
    assert kinds.count("Identification") == 90 and len(kinds) == 180
    assert bus.states["push/ftp"]["last_files"][-1].endswith(".csv")


# --------------------------------------------------------------------------------------- retries


@pytest.mark.parametrize("failure", ["down", "refuse_login", "stall"])
async def test_retry_spacing_rest_and_exactly_once_after_recovery(
    tmp_path: Path, ftp: FtpPeer, failure: str
) -> None:
    wme = "datapush_retry_delay=60\ndatapush_max_retries=2\ndatapush_interval=3600\ndatapush_timeout=1500\n"
    config = site(tmp_path, ftp, wme, "[datapush]\nbatch_items = 25\n")
    state = tmp_path / "site" / "state"
    items = await filled_outbox(state / "outbox.sqlite", ["ftp"], iec=60)
    if failure == "down":
        ftp.stop()
    elif failure == "refuse_login":
        ftp.set_mode("refuse_login")
    else:
        ftp.set_mode("stall", stall_after_bytes=100)
    outbox = Outbox(state / "outbox.sqlite", OutboxLimits(), ["ftp"], "dcu-test")
    await outbox.open()
    clock = HeldClock(T0)
    try:
        service, bus = push_service(config, outbox, clock)
        # hold the clock when the second round's first attempt failed: 3 + 1 failures
        clock.hold = lambda: service.machine is not None and service.machine.failures_total >= 4
        ctx = ServiceContext("datapush", 30.0, lambda: None)
        task = asyncio.create_task(service.run(ctx))
        await wait_until(clock.hold)
        log = list(service.attempt_log)
        t_first = dt.datetime(2026, 3, 10, 10, 10, tzinfo=dt.UTC).timestamp()
        assert [(r.started_s - t_first, r.number) for r in log] == [(0, 1), (60, 2), (120, 3), (3720, 1)]
        assert all(r.outcome not in ("ok", "empty") for r in log)
        assert service.machine is not None and service.machine.phase is Phase.RETRY_WAIT
        assert bus.states["push/ftp"]["counters"]["rests"] == 1
        assert bus.states["push/ftp"]["backlog"] == 60
        if failure == "refuse_login":
            assert len(ftp.events("login_refused")) == 4
            assert "530" in log[0].outcome
        if failure == "stall":
            assert len(ftp.events("stall")) == 4
            assert "timed out" in log[0].outcome
        assert final_files(ftp.root) == []  # nothing half-done under a final name
        # recovery
        if failure == "down":
            ftp.start()
        ftp.set_mode("ok")
        clock.release()
        await wait_until(lambda: outbox.stats().backlog["ftp"] == 0)
        ctx.stopping.set()
        await task
    finally:
        await outbox.close()
    assert csv_uids(ftp.root) == [item.uid for item in items]  # no gaps, no duplicates, in order
    assert not [n for n in os.listdir(ftp.root / "in") if n.endswith(".part")]  # stalled leftovers removed
    if failure == "stall":
        assert len(ftp.events("dele")) >= 1


# ------------------------------------------------------------------------------------- kill -9


@pytest.mark.slow
def test_kill_9_mid_upload_then_restart_completes(tmp_path: Path, ftp: FtpPeer) -> None:
    wme = "datapush_retry_delay=1\ndatapush_max_retries=3\ndatapush_timeout=120000\n"
    config = site(tmp_path, ftp, wme, "[datapush]\nperiod_s = 1\nbatch_items = 100\n")
    state = tmp_path / "site" / "state"
    items = asyncio.run(filled_outbox(state / "outbox.sqlite", ["ftp"], iec=200))
    ftp.set_mode("ok", rate_bytes_per_s=8_000)  # one file set takes several seconds
    proc = start_daemon(config)
    try:
        deadline = time.monotonic() + 60
        parts: list[Path] = []
        while not parts:
            assert time.monotonic() < deadline, daemon_log(config)
            assert proc.poll() is None, daemon_log(config)
            parts = (
                [p for p in (ftp.root / "in").glob("*.part") if p.stat().st_size > 0]
                if (ftp.root / "in").exists()
                else []
            )
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert final_files(ftp.root) == []
        leftover = {p.name for p in (ftp.root / "in").glob("*.part")}
        assert leftover
        ftp.set_mode("ok")
        proc = start_daemon(config)
        deadline = time.monotonic() + 60
        while len(csv_uids(ftp.root)) < len(items):
            assert time.monotonic() < deadline, daemon_log(config)
            assert proc.poll() is None, daemon_log(config)
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, daemon_log(config)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert csv_uids(ftp.root) == [item.uid for item in items]
    assert not list((ftp.root / "in").glob("*.part"))
    assert {e["name"] for e in ftp.events("dele")} >= leftover
    names = final_files(ftp.root)
    assert min(names) > max(leftover)  # the new set has a later name than the interrupted one


# ------------------------------------------------------------------------------------------- FTPS


def self_signed(directory: Path) -> tuple[Path, Path]:
    cert_pem, key_pem = make_cert("127.0.0.1")
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    return cert_path, key_path


async def test_ftps_explicit_tls(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path / "tls")
    other, _ = self_signed(tmp_path / "other")
    peer = start_ftp_server(tmp_path / "ftps", tls_cert=cert, tls_key=key)
    try:
        state = tmp_path / "site" / "state"
        items = await filled_outbox(state / "outbox.sqlite", ["ftp"], iec=5)

        def uploader(ca: Path) -> FtpUploader:
            config = write_site(
                tmp_path / "site",
                wme=f"datapush_host={peer.url('/in', scheme='ftps')}\ndatapush_prefix=WM115\n",
                toml_extra=f'[datapush]\nca_file = "{ca}"\n',
            )
            slice_ = DataPushServiceConfig.from_config(load_config(config))
            assert slice_ is not None and slice_.target.tls
            return FtpUploader.from_slice(slice_)

        wrong = uploader(other)
        with pytest.raises(OSError):  # ssl.SSLCertVerificationError: an unknown CA is refused
            await wrong.deliver(items, T0)
        await wrong.close()
        good = uploader(cert)
        result: dict[str, Any] = await good.deliver(items, T0)
        await good.close()
        assert result["files"] == [
            "WM115_dcu-test_20260310T100700Z.iec",
            "WM115_dcu-test_20260310T100700Z.csv",
        ]
        assert csv_uids(peer.root) == [item.uid for item in items]
    finally:
        peer.stop()


async def test_refused_login_is_a_push_error(tmp_path: Path, ftp: FtpPeer) -> None:
    ftp.set_mode("refuse_login")
    config = site(tmp_path, ftp)
    slice_ = DataPushServiceConfig.from_config(load_config(config))
    assert slice_ is not None
    uploader = FtpUploader.from_slice(slice_)
    with pytest.raises(PushError, match="530"):
        await uploader.deliver([OutboxItem(1, "u-1", "reading", "meter/x/reading", b"{}", T0)], T0)
    await uploader.close()
