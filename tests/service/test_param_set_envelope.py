"""MQTT ``param/set`` envelopes (format 2): bound to the DCU's device_id, refused when the replay
state cannot be saved (issue 13). The reloader is a stand-in that records applies: this file is
about the envelope check in front of it (tests/service/test_remote_config.py covers the apply itself)."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from dcud.config.loader import LoadedConfig, load_config
from dcud.service import remote_config as rc
from dcud.service.commands import CommandRouter
from dcud.service.crypto_envelope import EnvelopeKeys, seal
from dcud.service.remote_config import ApplyResult, register_param_commands

from helpers.daemon import write_site

KEY = "3c" * 32
KEYS = EnvelopeKeys.from_parameter(KEY)


class RecordingReloader:
    """Only what ``param/set`` uses: the configuration in force, and applies (recorded)."""

    def __init__(self, config: LoadedConfig) -> None:
        self.current = config
        self.applied: list[dict[str, str]] = []

    async def apply_updates(self, updates: dict[str, str], **_kw: Any) -> ApplyResult:
        self.applied.append(updates)
        return ApplyResult({}, [], "test", False)

    async def apply_text(self, text: str, **_kw: Any) -> ApplyResult:
        raise AssertionError("not used here")


@pytest.fixture
def setup(tmp_path: Path) -> tuple[CommandRouter, RecordingReloader]:
    site = write_site(tmp_path / "site", wme=f"fw_server_key={KEY}\nfw_server_encrypt=1\n", device_id="dcu-b")
    reloader = RecordingReloader(load_config(site))
    router = CommandRouter()
    register_param_commands(router, reloader)  # type: ignore[arg-type]
    return router, reloader


_ids = itertools.count(1)


async def _set(router: CommandRouter, envelope: bytes) -> dict[str, Any]:
    # A fresh id per request: a repeated id is answered from the first reply (idempotency).
    request = {"id": next(_ids), "envelope": base64.b64encode(envelope).decode()}
    return await router.dispatch("param/set", json.dumps(request).encode())


INNER = json.dumps({"set": {"ntp_interval": "300"}, "who": "hes"}).encode()


async def test_an_envelope_for_another_dcu_is_refused(setup: tuple[CommandRouter, RecordingReloader]) -> None:
    # Regression (issue 13): with a fleet-wide key, an envelope for dcu-a was accepted by dcu-b.
    router, reloader = setup
    reply = await _set(router, seal(KEYS, INNER, rc.MQTT_SET_CONTEXT, device_id="dcu-a"))
    assert not reply["ok"] and reply["error"]["type"] == "EnvelopeAuthError"
    assert reloader.applied == []
    reply = await _set(router, seal(KEYS, INNER, rc.MQTT_SET_CONTEXT, device_id="dcu-b"))
    assert reply["ok"], reply
    assert reloader.applied == [{"ntp_interval": "300"}]


async def test_a_replay_state_that_cannot_be_saved_refuses_param_set(
    setup: tuple[CommandRouter, RecordingReloader],
) -> None:
    # Regression (issue 13): the failed save was swallowed and the change applied.
    router, reloader = setup
    assert (await _set(router, seal(KEYS, INNER, rc.MQTT_SET_CONTEXT, device_id="dcu-b")))["ok"]
    blocker = reloader.current.state_dir / "config_port"
    shutil.rmtree(blocker)
    blocker.write_text("not a directory")  # the disk fails later; unwritable for root too
    reply = await _set(router, seal(KEYS, INNER, rc.MQTT_SET_CONTEXT, device_id="dcu-b"))
    assert not reply["ok"] and reply["error"]["type"] == "ReplayStateError", reply
    assert len(reloader.applied) == 1
