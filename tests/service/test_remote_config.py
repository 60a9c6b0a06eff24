"""The one apply path: validation, atomic write with backup, serialised reload, events, MQTT commands.

Crash safety is tested three ways: a crash injected at every step of the write (deterministic), a
writer process killed with SIGKILL at random moments, and (tests/service/test_config_port.py) the daemon
killed with SIGKILL while uploads are in flight.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dcud.config.loader import LoadedConfig, load_config, remote_parameters_path
from dcud.config.wme import CATALOGUE
from dcud.errors import ConfigError
from dcud.runtime.supervisor import ServiceContext, Supervisor, SupervisorOptions
from dcud.service import remote_config as rc
from dcud.service.commands import CommandRouter
from dcud.service.remote_config import (
    ReloadBusyError,
    Reloader,
    atomic_write_parameters,
    changed_parameters,
    mask_parameter_text,
    merge_parameter_text,
    parse_updates,
    register_param_commands,
)

from helpers import REPO
from helpers.daemon import write_site
from helpers.meters import wait_until
from helpers.notify import RecordingNotifier

KEY = "0123456789abcdef" * 4


# -- text helpers ----------------------------------------------------------------------------------


def test_merge_keeps_comments_and_order() -> None:
    old = "# site A\nntp_interval=600\n\n# push\ndatapush_periodic=1\nntp_address=10.0.0.1\n"
    text, written = merge_parameter_text(old, {"ntp_interval": "300", "ntp_port": "123"})
    assert (
        text
        == "# site A\nntp_interval=300\n\n# push\ndatapush_periodic=1\nntp_address=10.0.0.1\nntp_port=123\n"
    )
    assert written == {2: "ntp_interval", 7: "ntp_port"}


def test_merge_empty_value_unsets_and_duplicates_collapse() -> None:
    old = "ntp_interval=600\nntp_address=10.0.0.1\nntp_interval=700\n"
    text, written = merge_parameter_text(old, {"ntp_interval": "", "ntp_address": "10.0.0.2"})
    assert text == "ntp_address=10.0.0.2\n"
    assert written == {1: "ntp_address"}
    assert merge_parameter_text("", {})[0] == ""


def test_parse_updates_reports_syntax_with_upload_lines() -> None:
    updates, lines, issues = parse_updates("\ufeff# c\nntp_interval=300\nno equals\nntp_interval=5\n=x\n")
    assert updates == {"ntp_interval": "300"} and lines == {"ntp_interval": 2}
    assert [(i.line, i.key) for i in issues] == [(3, ""), (4, "ntp_interval"), (5, "")]
    assert all(i.path == "upload" for i in issues)


def test_mask_parameter_text_hides_every_secret() -> None:
    text = (
        f"fw_server_key={KEY}\nntp_interval=600\n# fw_server_key=not a value\n"
        "datapush_host=ftp://user:s3cret@10.0.0.1/in\n"
    )
    masked = mask_parameter_text(text)
    assert KEY not in masked and "s3cret" not in masked
    assert "fw_server_key=***" in masked and "ntp_interval=600" in masked
    assert "# fw_server_key=not a value" in masked


def test_changed_parameters_masks_secrets() -> None:
    old = load_params("ntp_interval=600\n")
    new = load_params(f"ntp_interval=300\nfw_server_key={KEY}\n")
    changed = changed_parameters(old, new)
    assert changed["ntp_interval"] == {"old": "600", "new": "300"}
    assert changed["fw_server_key"] == {"old": "", "new": "***"}
    assert KEY not in json.dumps(changed)


def load_params(text: str) -> Any:
    from dcud.config.wme import parse_parameter_text

    params, issues = parse_parameter_text(text, "x")
    assert not issues
    return params


# -- atomic write ------------------------------------------------------------------------------------


def test_atomic_write_keeps_a_backup_and_is_private(tmp_path: Path) -> None:
    target = tmp_path / "params" / "wme.conf"
    atomic_write_parameters(target, "a=1\n", None)
    assert target.read_text() == "a=1\n" and not target.with_name("wme.conf.bak").exists()
    atomic_write_parameters(target, "a=2\n", "a=1\n")
    assert target.read_text() == "a=2\n"
    assert target.with_name("wme.conf.bak").read_text() == "a=1\n"
    assert target.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in target.parent.iterdir()) == ["wme.conf", "wme.conf.bak"]


class _Crash(BaseException):
    """Stands for the power going off at this point (nothing after it runs)."""


def test_a_crash_at_any_step_leaves_the_old_or_the_new_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_text = "ntp_interval=600\n" * 50
    new_text = "ntp_interval=300\n" * 80
    real = {name: getattr(os, name) for name in ("write", "fsync", "replace", "open", "fchmod")}
    steps: list[str] = []

    def counting(name: str, limit: int) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            steps.append(name)
            if len(steps) > limit:
                raise _Crash
            return real[name](*args, **kwargs)

        return call

    limit = 0
    for limit in range(60):  # bounded: the write has far fewer steps than this
        directory = tmp_path / f"run{limit}"
        target = directory / "wme.conf"
        directory.mkdir()
        target.write_text(old_text)
        steps.clear()
        with monkeypatch.context() as m:
            for name in real:
                m.setattr(os, name, counting(name, limit))
            try:
                atomic_write_parameters(target, new_text, old_text)
            except _Crash:
                pass
            else:
                break
        assert target.read_text() in (old_text, new_text), f"mixed file after step {limit}"
        backup = target.with_name("wme.conf.bak")
        if backup.exists():
            assert backup.read_text() in (old_text,)
    else:
        pytest.fail("the write never completed")
    assert limit >= 6  # backup and new file, each written, synced and renamed


WRITER = """
import sys
from pathlib import Path
from dcud.service.remote_config import atomic_write_parameters
target = Path(sys.argv[1])
texts = [sys.argv[2], sys.argv[3]]
i = 0
while True:
    atomic_write_parameters(target, texts[i % 2], texts[(i + 1) % 2])
    i += 1
    if i == 1:
        print("started", flush=True)
"""


def test_kill_9_during_writes_never_leaves_a_mix(tmp_path: Path) -> None:
    rng = random.Random(8)
    a = "".join(f"ntp_interval={600 + i}\n" for i in range(400))
    b = "".join(f"datapush_periodic={i}\n" for i in range(700))
    target = tmp_path / "params" / "wme.conf"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for _cycle in range(12):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(target), a, b], stdout=subprocess.PIPE, env=env
        )
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"started\n"
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
        assert target.read_text() in (a, b)
        assert target.with_name("wme.conf.bak").read_text() in (a, b)


# -- the reloader with a real supervisor ----------------------------------------------------------


@dataclass
class Svc:
    name: str
    config: object
    runs: list[int] = field(default_factory=list)

    async def run(self, ctx: ServiceContext) -> None:
        self.runs.append(1)
        ctx.set_ready()
        await ctx.heartbeat_forever(0.05)


def build(config: LoadedConfig) -> list[Svc]:
    params = config.params
    return [
        Svc("ntp", params.get("ntp_interval")),
        Svc("push", params.get("datapush_periodic")),
        Svc("static", 0),
    ]


@dataclass
class Harness:
    reloader: Reloader
    supervisor: Supervisor
    notifier: RecordingNotifier
    events: list[dict[str, Any]]
    site: Path


@pytest.fixture
async def harness(tmp_path: Path) -> Any:
    site = write_site(tmp_path / "site")
    # Exactly this file (write_site adds a free fw_server_port for daemons; nothing listens here).
    (site.parent / "wme.conf").write_text("# installer\nntp_interval=600\n")
    config = load_config(site)
    notifier = RecordingNotifier()
    events: list[dict[str, Any]] = []

    async def event(kind: str, text: str, **fields: Any) -> None:
        events.append({"type": kind, "text": text, **fields})

    reloader = Reloader(site, config, build, notifier, event=event)
    supervisor = Supervisor(build(config), notifier, SupervisorOptions(grace_s=1.0))
    reloader.attach(supervisor)
    sup_task = asyncio.create_task(supervisor.run())
    worker = asyncio.create_task(reloader.run())
    await asyncio.wait_for(supervisor.all_ready.wait(), 5)
    try:
        yield Harness(reloader, supervisor, notifier, events, site)
    finally:
        worker.cancel()
        supervisor.request_stop()
        await asyncio.wait_for(sup_task, 10)
        with pytest.raises(asyncio.CancelledError):
            await worker


async def test_apply_writes_the_remote_file_and_restarts_only_what_changed(harness: Harness) -> None:
    r = harness.reloader
    state = r.current.state_dir
    result = await r.apply_text(
        "ntp_interval=300\n", partial=True, who="tester", via="mqtt", authenticated=False
    )
    assert result.changed == {"ntp_interval": {"old": "600", "new": "300"}}
    assert result.restarted == ["ntp"]
    target = remote_parameters_path(state)
    assert result.file == str(target)
    assert target.read_text() == "# installer\nntp_interval=300\n"
    assert target.with_name("wme.conf.bak").read_text() == "# installer\nntp_interval=600\n"
    assert (harness.site.parent / "wme.conf").read_text() == "# installer\nntp_interval=600\n"
    # The remote file is what the loader (and so check-config and a restart) takes from now on.
    assert load_config(harness.site).params.get("ntp_interval") == 300
    assert r.current.params.path == str(target)
    i = harness.notifier.sent.index("RELOADING=1")
    assert any(line.startswith("MONOTONIC_USEC=") for line in harness.notifier.sent[i:])
    assert "READY=1" in harness.notifier.sent[i:]
    assert harness.events[-1]["type"] == "config_changed"
    assert harness.events[-1]["who"] == "tester" and harness.events[-1]["via"] == "mqtt"


async def test_bad_change_is_refused_whole_and_nothing_changes(harness: Harness) -> None:
    r = harness.reloader
    before = list(harness.notifier.sent)
    with pytest.raises(ConfigError) as caught:
        await r.apply_text(
            "ntp_interval=300\nntp_interval=ten\nbogus=1\ndatapush_periodic=1\n",
            partial=True,
            who="t",
            via="config-port",
            authenticated=False,
        )
    shown = [(i.path, i.line, i.key) for i in caught.value.issues]
    assert ("upload", 2, "ntp_interval") in shown and ("upload", 3, "bogus") in shown
    assert not remote_parameters_path(r.current.state_dir).exists()
    assert r.current.params.get("ntp_interval") == 600
    assert harness.notifier.sent == before and harness.events == []


async def test_whole_file_replaces_and_unnamed_parameters_go_back_to_defaults(harness: Harness) -> None:
    r = harness.reloader
    await r.apply_text(
        "ntp_interval=300\ndatapush_periodic=1\n", partial=True, who="t", via="mqtt", authenticated=False
    )
    assert CATALOGUE["ntp_interval"].default != "300"
    result = await r.apply_text(
        "datapush_periodic=1\n", partial=False, who="t", via="config-port", authenticated=False
    )
    assert result.changed["ntp_interval"]["new"] == CATALOGUE["ntp_interval"].default
    assert remote_parameters_path(r.current.state_dir).read_text() == "datapush_periodic=1\n"


async def test_dry_run_reports_and_writes_nothing(harness: Harness) -> None:
    r = harness.reloader
    result = await r.apply_text(
        "ntp_interval=300\n", partial=True, who="t", via="mqtt", authenticated=False, dry_run=True
    )
    assert result.dry_run and result.changed["ntp_interval"]["new"] == "300" and result.restarted == []
    assert not remote_parameters_path(r.current.state_dir).exists()


async def test_cross_parameter_rules_apply_to_the_merged_file(harness: Harness) -> None:
    with pytest.raises(ConfigError, match="encryption needs fw_server_key"):
        await harness.reloader.apply_text(
            "fw_server_encrypt=1\n", partial=True, who="t", via="mqtt", authenticated=False
        )
    await harness.reloader.apply_text(
        f"fw_server_key={KEY}\n", partial=True, who="t", via="mqtt", authenticated=True
    )
    await harness.reloader.apply_text(
        "fw_server_encrypt=1\n", partial=True, who="t", via="mqtt", authenticated=True
    )
    assert KEY not in json.dumps(harness.events)


async def test_changes_are_serialised_in_order(harness: Harness) -> None:
    r = harness.reloader
    results = await asyncio.gather(
        *(
            r.apply_text(
                f"ntp_interval={100 + i}\n", partial=True, who=str(i), via="mqtt", authenticated=False
            )
            for i in range(5)
        )
    )
    olds = [res.changed["ntp_interval"]["old"] for res in results]
    news = [res.changed["ntp_interval"]["new"] for res in results]
    assert olds[1:] == news[:-1]  # each one saw the previous one's result
    assert r.current.params.get("ntp_interval") == 104


async def test_queue_is_bounded(harness: Harness) -> None:
    r = harness.reloader
    async with r._lock:  # hold the worker so the queue fills
        tasks = [
            asyncio.create_task(
                r.apply_text(
                    f"ntp_interval={100 + i}\n", partial=True, who="t", via="mqtt", authenticated=False
                )
            )
            for i in range(r.max_pending + 2)
        ]
        await wait_until(lambda: any(t.done() for t in tasks), 5, step_s=0.01)  # the full queue refused
        refused = [t for t in tasks if t.done()]
        assert refused and all(isinstance(t.exception(), ReloadBusyError) for t in refused)
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
    assert r.stats.busy >= 1


async def test_a_cancelled_caller_does_not_cancel_its_change(harness: Harness) -> None:
    r = harness.reloader
    async with r._lock:
        task = asyncio.create_task(
            r.apply_text("ntp_interval=333\n", partial=True, who="t", via="mqtt", authenticated=False)
        )
        await asyncio.sleep(0)  # one loop turn: the task queues its change and awaits the answer
        assert not task.done()
        task.cancel()
    for _ in range(200):
        if r.current.params.get("ntp_interval") == 333:
            break
        await asyncio.sleep(0.02)
    assert r.current.params.get("ntp_interval") == 333


async def test_sighup_reload_uses_the_same_path_and_coalesces(harness: Harness) -> None:
    r = harness.reloader
    (harness.site.parent / "wme.conf").write_text("ntp_interval=700\n")
    for _ in range(3):
        r.request_reload()
    for _ in range(200):
        if r.stats.reloads:
            break
        await asyncio.sleep(0.02)
    # Until the worker is idle: a second (uncoalesced) reload would have run by then.
    await wait_until(lambda: r._queue.empty() and not r._lock.locked(), 5, step_s=0.01)
    assert r.stats.reloads == 1
    assert r.current.params.get("ntp_interval") == 700
    assert harness.events[-1]["via"] == "sighup"


async def test_bad_sighup_keeps_the_running_configuration(harness: Harness) -> None:
    r = harness.reloader
    (harness.site.parent / "wme.conf").write_text("ntp_interval=never\n")
    assert await r.reload() == []
    assert r.current.params.get("ntp_interval") == 600
    assert "STATUS=reload refused: configuration invalid" in harness.notifier.sent


async def allow_plain_param_set(harness: Harness) -> None:
    """The installer's opt-in: [remote] plain_param_set = true in dcud.toml, then a reload (SIGHUP)."""
    harness.site.write_text(harness.site.read_text() + "\n[remote]\nplain_param_set = true\n")
    await harness.reloader.reload()
    assert harness.reloader.current.toml.remote.plain_param_set


async def test_param_commands(harness: Harness) -> None:
    router = CommandRouter()
    register_param_commands(router, harness.reloader)

    async def call(verb: str, request: dict[str, Any]) -> dict[str, Any]:
        return await router.dispatch(verb, json.dumps(request).encode())

    # Plain param/set is off by default: refused, nothing changes.
    reply = await call("param/set", {"set": {"ntp_interval": "300"}})
    assert reply["error"]["type"] == "NotAuthorizedError" and "plain_param_set" in reply["error"]["message"]
    assert harness.reloader.current.params.get("ntp_interval") == 600
    await allow_plain_param_set(harness)
    reply = await call("param/set", {"set": {"ntp_interval": "300"}, "who": "op"})
    assert reply["ok"], reply
    assert reply["result"]["changed"] == {"ntp_interval": {"old": "600", "new": "300"}}
    assert harness.events[-1]["who"] == "op"
    reply = await call("param/get", {"names": ["fw_server_key", "ntp_interval"]})
    assert reply["result"]["values"] == {"fw_server_key": "", "ntp_interval": "300"}
    reply = await call("param/set", {"set": {"ntp_interval": "x\nbogus=1"}})
    assert not reply["ok"]
    reply = await call("param/set", {"text": "ntp_interval=90\n", "dry_run": True})
    assert reply["ok"] and reply["result"]["dry_run"]
    reply = await call("param/get", {"names": ["nope"]})
    assert not reply["ok"] and reply["error"]["field"] == "$.names"
    reply = await call("param/set", {"set": {"ntp_interval": 1.5}})
    assert reply["error"]["type"] == "BadRequestError" and reply["error"]["field"] == "$.set.ntp_interval"
    reply = await call("param/set", {"set": {"ntp_interval": "1"}, "text": "x"})
    assert not reply["ok"] and "exactly one" in reply["error"]["message"]


async def test_protected_parameters_never_change_over_a_plain_channel(harness: Harness) -> None:
    """Even with plain_param_set = true: the EI client's destination, the key, SNMP, dm, tm TLS..."""
    router = CommandRouter()
    register_param_commands(router, harness.reloader)
    await allow_plain_param_set(harness)
    r = harness.reloader
    before = r.current_text()

    async def call(request: dict[str, Any]) -> dict[str, Any]:
        return await router.dispatch("param/set", json.dumps(request).encode())

    attempts: list[dict[str, Any]] = [
        {"set": {"ei_client_addr": "203.0.113.7", "ei_client_port": "4059"}},
        {"set": {"ntp_interval": "300", "fw_server_key": KEY}},  # one protected name refuses all of it
        {"set": {"tm.verify": "2"}},
        {"set": {"dm.server": "203.0.113.9"}},
        {"set": {"snmp_user": "public"}},
        {"set": {"com_ping_host": "203.0.113.1"}},
        {"text": "ntp_interval=300\nei_client_addr=203.0.113.7\nei_client_port=4059\n"},
        {"set": {"ei_client_addr": "203.0.113.7", "ei_client_port": "4059"}, "dry_run": True},
    ]
    for attempt in attempts:
        reply = await call(attempt)
        assert reply["error"]["type"] == "ProtectedParameterError", (attempt, reply)
        assert "protected" in reply["error"]["message"]
    assert r.current_text() == before and harness.events == []
    assert r.current.params.get("ntp_interval") == 600 and r.stats.protected_refused == len(attempts)
    # The same policy on the Reloader for every channel (the config port calls it with authenticated=False).
    with pytest.raises(rc.ProtectedParameterError) as caught:
        await r.apply_text(
            "# whole file\nei_client_addr=203.0.113.7\n",
            partial=False,
            who="x",
            via="config-port",
            authenticated=False,
        )
    assert [(i.line, i.key) for i in caught.value.issues] == [(2, "ei_client_addr")]
    # Authenticated (an envelope), the same change is applied.
    result = await r.apply_updates(
        {"ei_client_addr": "203.0.113.7", "ei_client_port": "4059"}, who="hes", via="mqtt", authenticated=True
    )
    assert set(result.changed) == {"ei_client_addr", "ei_client_port"}
    # A whole plain file that leaves a protected parameter out would reset it: refused too.
    with pytest.raises(rc.ProtectedParameterError, match="leaves it out"):
        await r.apply_text("ntp_interval=300\n", partial=False, who="x", via="mqtt", authenticated=False)
    # Re-stating the value in force is no change: allowed.
    await r.apply_updates(
        {"ei_client_port": "4059", "ntp_interval": "301"}, who="x", via="mqtt", authenticated=False
    )
    assert r.current.params.get("ntp_interval") == 301


def test_the_protected_set_is_exactly_the_documented_one() -> None:
    import re

    expected = {n for n in CATALOGUE if re.match(r"^(fw_server|ei_client|dm|snmp)[._]", n)}
    expected |= {"tm.tls_enable", "tm.cert", "tm.ca_cert", "tm.verify", "tm.use_crl", "com_ping_host"}
    assert expected == rc.PROTECTED_PARAMETERS
    assert {
        "ei_client_addr",
        "ei_client_port",
        "ei_client_pass",
        "fw_server_key",
        "fw_server_encrypt",
    } <= expected
    assert {"dm.verify", "dm.ca_cert", "snmp_user", "snmp_manager_ip"} <= expected
    assert "ntp_interval" not in expected and "tm.baud" not in expected
    # Every spelling of those families in the catalogue is covered (no dotted/underscored twin left out).
    for name in CATALOGUE:
        family = re.sub(r"[._]", "_", name)
        if family.startswith(("fw_server_", "ei_client_", "dm_", "snmp_")):
            assert name in rc.PROTECTED_PARAMETERS, name


def test_not_running_refuses(tmp_path: Path) -> None:
    site = write_site(tmp_path / "site")
    reloader = Reloader(site, load_config(site), build)

    async def go() -> None:
        with pytest.raises(ReloadBusyError):
            await reloader.apply_text(
                "ntp_interval=1\n", partial=True, who="t", via="mqtt", authenticated=False
            )

    asyncio.run(go())


def iter_lines(path: Path) -> Iterator[str]:
    yield from path.read_text().splitlines()


def test_module_exports_docstrings() -> None:
    assert rc.__doc__ and "atomically" in rc.__doc__


async def test_param_set_needs_an_envelope_while_a_key_is_set(harness: Harness) -> None:
    import base64

    from dcud.service.crypto_envelope import EnvelopeKeys, seal

    router = CommandRouter()
    register_param_commands(router, harness.reloader)
    r = harness.reloader
    await allow_plain_param_set(harness)  # even with the opt-in: a configured key requires the envelope
    await r.apply_text(f"fw_server_key={KEY}\n", partial=True, who="t", via="local", authenticated=True)

    async def call(request: dict[str, Any]) -> dict[str, Any]:
        return await router.dispatch("param/set", json.dumps(request).encode())

    reply = await call({"set": {"ntp_interval": "300"}})
    assert reply["error"]["type"] == "NotAuthorizedError" and "envelope" in reply["error"]["message"]
    keys = EnvelopeKeys.from_parameter(KEY)
    inner = json.dumps({"set": {"ntp_interval": "300", "ei_client_addr": "10.0.0.5"}, "who": "hes"}).encode()
    sealed = seal(keys, inner, rc.MQTT_SET_CONTEXT, device_id=r.current.device_id)
    reply = await call({"id": 5, "envelope": base64.b64encode(sealed).decode()})
    assert reply["ok"] and reply["id"] == 5, reply
    assert r.current.params.get("ntp_interval") == 300  # authenticated: protected names change too
    assert r.current.params.get("ei_client_addr") is not None
    # The same bytes again (a retry): answered from the first reply, not run twice, no replay error.
    again = await call({"id": 5, "envelope": base64.b64encode(sealed).decode()})
    assert again == reply and len(harness.events) == 2
    reply = await call({"id": 6, "envelope": base64.b64encode(sealed).decode()})  # replayed, new id
    assert not reply["ok"] and reply["error"]["type"] == "ReplayedEnvelopeError"
    tampered = bytearray(seal(keys, inner, rc.MQTT_SET_CONTEXT, device_id=r.current.device_id))
    tampered[50] ^= 1
    reply = await call({"envelope": base64.b64encode(bytes(tampered)).decode()})
    assert not reply["ok"] and reply["error"]["type"] == "EnvelopeAuthError"
    other = seal(keys, inner, b"PUT /config", device_id=r.current.device_id)  # made for the config port
    reply = await call({"envelope": base64.b64encode(other).decode()})
    assert reply["error"]["type"] == "EnvelopeAuthError"
    bad = seal(keys, b'{"set": {"ntp_interval": true}}', rc.MQTT_SET_CONTEXT, device_id=r.current.device_id)
    reply = await call({"envelope": base64.b64encode(bad).decode()})
    assert reply["error"]["field"] == "$.set.ntp_interval"
    assert harness.events[-1]["who"] == "hes"
    # param/get changes nothing: no envelope needed, and one is refused.
    reply = await router.dispatch("param/get", b'{"names": ["ntp_interval"]}')
    assert reply["ok"]
    reply = await router.dispatch("param/get", json.dumps({"envelope": "AAAA"}).encode())
    assert reply["error"]["type"] == "BadRequestError"


async def test_a_failed_write_changes_nothing(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def full(*_args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rc, "atomic_write_parameters", full)
    with pytest.raises(rc.ParameterWriteError, match="No space left"):
        await harness.reloader.apply_text(
            "ntp_interval=300\n", partial=True, who="t", via="mqtt", authenticated=False
        )
    assert harness.reloader.current.params.get("ntp_interval") == 600
    assert harness.events == []


@pytest.mark.parametrize(
    ("listen", "ok"), [("auto", True), ("::1", True), ("10.0.0.1", True), ("999.1.1.1", False)]
)
def test_config_port_listen_is_checked_at_load(tmp_path: Path, listen: str, ok: bool) -> None:
    site = write_site(tmp_path / "site", toml_extra=f'[config_port]\nlisten = "{listen}"\n')
    if ok:
        load_config(site)
    else:
        with pytest.raises(ConfigError, match=r"config_port\.listen"):
            load_config(site)


def test_bind_host_default_deny() -> None:
    from dcud.service.config_port import bind_host

    assert bind_host("auto", encrypt=False) == "127.0.0.1"
    assert bind_host("auto", encrypt=True) is None  # every interface, only with the key
    assert bind_host("loopback", encrypt=True) == "127.0.0.1"
    assert bind_host("any", encrypt=False) is None
    assert bind_host("10.1.2.3", encrypt=False) == "10.1.2.3"


async def test_param_set_names_the_parameters_that_have_no_effect(harness: Harness) -> None:
    # Issue 16: "param/set com_apn_name=... replies OK and changes nothing" -- now the reply says so.
    router = CommandRouter()
    register_param_commands(router, harness.reloader)
    await allow_plain_param_set(harness)

    async def call(request: dict[str, Any]) -> dict[str, Any]:
        return await router.dispatch("param/set", json.dumps(request).encode())

    reply = await call({"set": {"com_apn_name": "iot.example", "ntp_interval": "300"}})
    assert reply["ok"], reply
    assert reply["result"]["no_effect"] == ["com_apn_name"]
    assert set(reply["result"]["changed"]) == {"com_apn_name", "ntp_interval"}
    reply = await call({"set": {"ntp_interval": "301"}})
    assert reply["result"]["no_effect"] == []
    # A whole file: every accepted parameter it assigns; dry runs say it too.
    reply = await call(
        {"text": "ntp_interval=302\ncom_apn_name=iot.example\nsnrp_connect_interval=5\n", "dry_run": True}
    )
    assert reply["result"]["no_effect"] == ["com_apn_name", "snrp_connect_interval"]
