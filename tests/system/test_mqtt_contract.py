"""Docs match the wire (issue 16): the MQTT contract of docs/mqtt.md against what the demo publishes.

``dcud demo`` runs (a short run); a real MQTT client subscribes to ``<p>/#`` on the demo's broker,
collects every topic and the top-level fields of every JSON payload, sends ``cmd/ping`` (the verbs
served) and one unknown verb (an error reply), and compares both ways with the tables of
docs/mqtt.md: an undocumented topic or field fails, a row marked "yes" in the demo that never
appears (or one of its fields that never appears) fails, and the served verbs must equal the
documented ones. Rows "not in the demo" must name an existing test that uses their topic.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from helpers import REPO

pytestmark = pytest.mark.slow

DOC = REPO / "docs" / "mqtt.md"
PREFIX = "dcu/dcu-demo"
DEMO_S = 30


@dataclass
class Row:
    pattern: str
    variant: tuple[str, str] | None
    fields: set[str] | None
    """None: the fields are on the area page (only for rows not in the demo)."""
    in_demo: bool
    test_file: str | None
    optional: set[str] = field(default_factory=set)
    """Fields marked ``?``: present only after something happened (checked when present)."""
    open_set: bool = False
    """"... and more": the listed fields are required, others are the event type's own."""
    sometimes: bool = False
    """Appears in the demo depending on timing: checked when it appears, never required."""
    seen_fields: set[str] = field(default_factory=set)
    seen: int = 0

    def regex(self, prefix: str) -> re.Pattern[str]:
        parts = re.split(r"(<[a-z]+>)", self.pattern)
        out = []
        for part in parts:
            if part == "<p>":
                out.append(re.escape(prefix))
            elif part == "<verb>":
                out.append(".+")
            elif part.startswith("<"):
                out.append("[^/]+")
            else:
                out.append(re.escape(part))
        return re.compile("".join(out) + "$")


def _table(name: str) -> list[list[str]]:
    text = DOC.read_text(encoding="utf-8")
    body = text.split(f"<!-- contract:{name} -->", 1)[1].split(f"<!-- /contract:{name} -->", 1)[0]
    rows = [line for line in body.strip().splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in rows[2:]]


def contract_rows() -> list[Row]:
    rows = []
    for topic, variant, _retained, fields, demo, _details in _table("topics"):
        pattern = topic.strip("`")
        where = None
        if variant:
            key, _, value = variant.partition("=")
            where = (key, value)
        names = set(re.findall(r"`([a-z_0-9]+)`", fields))
        in_demo = demo == "yes"
        test_file = None if in_demo else demo.split(":", 1)[1].strip()
        row = Row(pattern, where, None if fields.startswith("see ") else names, in_demo, test_file)
        row.optional = set(re.findall(r"`([a-z_0-9]+)`\?", fields))
        row.open_set = "and more" in fields
        row.sometimes = demo.startswith("sometimes:")
        rows.append(row)
    return rows


def contract_verbs() -> set[str]:
    return {cells[0].strip("`") for cells in _table("verbs")}


class Collector:
    """A paho client on ``<p>/#``: every message's topic and JSON payload (thread-safe)."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, Any]] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="contract-collector")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_args: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(f"{PREFIX}/#", qos=1)
        assert self._subscribed.wait(10), "no SUBACK"

    def _on_message(self, _client: Any, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            payload = json.loads(message.payload) if message.payload else None
        except ValueError:
            payload = message.payload
        with self._cond:
            self.messages.append((message.topic, payload))
            self._cond.notify_all()

    def wait_for(self, topic: str, timeout_s: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for seen, payload in self.messages:
                    if seen == topic:
                        return payload
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"nothing on {topic} within {timeout_s} s")
                self._cond.wait(remaining)

    def request(self, verb: str, body: dict[str, Any]) -> Any:
        info = self.client.publish(f"{PREFIX}/cmd/{verb}", json.dumps(body), qos=1)
        info.wait_for_publish(10)
        return self.wait_for(f"{PREFIX}/cmd/{verb}/reply")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture(scope="module")
def wire(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[tuple[str, Any]], list[str]]]:
    """Run the demo; yields every message published under ``<p>`` and the verbs ``cmd/ping`` lists."""
    workdir = tmp_path_factory.mktemp("demo")
    demo = subprocess.Popen(
        [sys.executable, "-m", "dcud", "demo", "--duration", str(DEMO_S), "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    collector = None
    try:
        assert demo.stdout is not None
        port = None
        for _ in range(50):  # the broker line comes first (bounded)
            line = demo.stdout.readline()
            if match := re.search(r"broker mqtt://127\.0\.0\.1:(\d+)", line):
                port = int(match.group(1))
                break
        assert port is not None, "the demo did not say where its broker is"
        collector = Collector(port)
        # The daemon answers once it has subscribed; retained states came with our subscription.
        deadline = time.monotonic() + 60
        ping: Any = None
        while ping is None and time.monotonic() < deadline:
            info = collector.client.publish(f"{PREFIX}/cmd/ping", json.dumps({"id": "contract"}), qos=1)
            info.wait_for_publish(10)
            try:
                ping = collector.wait_for(f"{PREFIX}/cmd/ping/reply", 2.0)
            except AssertionError:
                continue
        assert ping is not None and ping["ok"], ping
        unknown = collector.request("no/such/verb", {"id": "bad"})  # an error reply on the wire
        assert unknown["ok"] is False and unknown["error"]["type"] == "UnknownCommandError"
        demo.stdout.read()  # the demo's own duration bounds this
        assert demo.wait(timeout=60) == 0
        yield list(collector.messages), list(ping["result"]["verbs"])
    finally:
        if collector is not None:
            collector.close()
        if demo.poll() is None:
            demo.kill()
            demo.wait()


def _published_by_dcud(topic: str) -> bool:
    # Requests on <p>/cmd/<verb> are published by clients (the demo's operator and this test).
    return not topic.startswith(f"{PREFIX}/cmd/") or topic.endswith("/reply")


def test_every_topic_and_field_dcud_publishes_is_documented_and_every_documented_one_appears(
    wire: tuple[list[tuple[str, Any]], list[str]],
) -> None:
    messages, _verbs = wire
    rows = contract_rows()
    undocumented_topics: set[str] = set()
    undocumented_fields: set[str] = set()
    for topic, payload in messages:
        if not _published_by_dcud(topic):
            continue
        matches = [r for r in rows if r.regex(PREFIX).match(topic)]
        if isinstance(payload, dict):
            matches = [r for r in matches if r.variant is None or payload.get(r.variant[0]) == r.variant[1]]
        if not matches:
            undocumented_topics.add(topic)
            continue
        row = matches[0]
        row.seen += 1
        if isinstance(payload, dict):
            row.seen_fields |= set(payload)
            if row.fields is not None:
                extra = set() if row.open_set else set(payload) - row.fields
                missing_here = row.fields - row.optional - set(payload) if row.open_set else set()
                undocumented_fields |= {f"{row.pattern} {row.variant or ''}: {k}" for k in extra}
                undocumented_fields |= {f"{row.pattern}: {k} (required, absent)" for k in missing_here}
        if not row.in_demo and not row.sometimes:
            undocumented_topics.add(f"{topic} (the contract says: not in the demo)")
    assert not undocumented_topics, f"published but not in docs/mqtt.md: {sorted(undocumented_topics)}"
    assert not undocumented_fields, f"fields not in docs/mqtt.md: {sorted(undocumented_fields)}"
    missing = [f"{r.pattern} {r.variant or ''}" for r in rows if r.in_demo and r.seen == 0]
    assert not missing, f"documented as in the demo, never published: {missing}"
    never = [
        f"{r.pattern} {r.variant or ''}: {sorted(r.fields - r.optional - r.seen_fields)}"
        for r in rows
        if (r.in_demo or r.seen) and r.fields is not None and r.fields - r.optional - r.seen_fields
    ]
    assert not never, f"documented fields never published: {never}"


def test_rows_not_in_the_demo_name_a_test_that_uses_their_topic() -> None:
    rows = [r for r in contract_rows() if not r.in_demo]
    assert rows, "the contract parses"
    for row in rows:
        assert row.test_file, row.pattern
        path = REPO / row.test_file
        assert path.is_file(), f"{row.pattern}: {row.test_file} does not exist"
        # The distinctive part of the topic (without <p> and placeholders) is in that test.
        words = [w for w in re.split(r"<[a-z]+>|/", row.pattern.removeprefix("<p>/")) if w and w != "state"]
        text = path.read_text(encoding="utf-8")
        assert any(w in text for w in words), f"{row.pattern}: {row.test_file} never mentions {words}"
        assert row.fields is None or row.fields or row.open_set, row.pattern


def test_served_verbs_are_exactly_the_documented_ones(wire: tuple[list[tuple[str, Any]], list[str]]) -> None:
    _messages, verbs = wire
    assert set(verbs) == contract_verbs()


def test_docs_name_full_state_topics() -> None:
    # Every retained state is <p>/<path>/state (design.md section 6): a page that names <p>/clock or
    # <p>/push/ftp sends a subscriber to a topic nobody publishes.
    state_paths = [r.pattern.removesuffix("/state") for r in contract_rows() if r.pattern.endswith("/state")]
    pages = [*sorted((REPO / "docs").glob("*.md")), REPO / "SECURITY.md", REPO / "CONTRIBUTING.md"]
    wrong = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for path in state_paths:
            concrete = "".join(
                "<p>" if part == "<p>" else "[^`/ ]+" if part.startswith("<") else re.escape(part)
                for part in re.split(r"(<[a-z]+>)", path)
            )
            for match in re.finditer(f"`{concrete}`", text):
                wrong.append(f"{page.name}: {match.group(0)}")
    assert not wrong, f"state topics named without /state: {wrong}"
