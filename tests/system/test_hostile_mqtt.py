"""Hostile input on every MQTT command verb of the running daemon (real Mosquitto, real client, simulators).

Two daemons (module-scoped): ``open`` (no envelope key, ``[remote] plain_param_set = true``: hostile
requests reach every handler) and ``sealed`` (``fw_server_key`` set: state-changing verbs need an
envelope, and none of these requests has a valid one). Each has an M-Bus meter simulator and a Modbus
RTU drive simulator on pty lines, so ``read``, ``scan`` and ``drive/*`` run for real when a request
happens to be valid.

Per verb, hypothesis (derandomized: the same requests every run) generates batches of requests: wrong
types, nulls, huge and non-finite numbers, deep nesting, long strings, unicode, junk fields, truncated
and binary payloads, junk envelopes; each is published with paho at QoS 1 and must get exactly one
reply. After every batch ``cmd/ping`` answers and the status shows zero service restarts and zero
internal errors. A second test sends retained, expired, duplicated and oversize requests to every verb.
At the end: no protected parameter changed, every ``config_changed`` event matches an accepted
``param/set``, and in ``sealed`` nothing changed at all. ``DCUD_HOSTILE_SUMMARY=<file>`` writes the
figures (SECURITY.md, "MQTT commands").
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcud.service.crypto_envelope import EnvelopeKeys, seal
from dcud.sim.peers import Mosquitto, start_mosquitto

from helpers import REPO
from helpers.commands import Commander
from helpers.daemon import daemon_log, start_daemon, write_site
from helpers.notify import NotifySocket

pytestmark = pytest.mark.slow

KEY = "00112233445566778899aabbccddeeff" * 2
OTHER_KEY = "ffeeddccbbaa99887766554433221100" * 2
PROTECTED = [
    "ei_client_addr",
    "ei_client_port",
    "fw_server_key",
    "tm.verify",
    "dm.server",
    "snmp_user",
    "com_ping_host",
]
HARMLESS = ["ntp_interval", "ntp_timeout"]
STATE_CHANGING = {
    "param/set",
    "drive/enable",
    "drive/disable",
    "drive/quick_stop",
    "drive/fault_reset",
    "drive/write",
}
VERBS = [
    "ping",
    "status",
    "param/get",
    "param/set",
    "read",
    "scan",
    "drive/enable",
    "drive/disable",
    "drive/quick_stop",
    "drive/fault_reset",
    "drive/read",
    "drive/write",
    "drive/state",
]
BATCHES_PER_VERB = 6
REQUESTS_PER_BATCH = 5


# -- the sites -------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What one daemon was sent and what it answered, per category of input (SECURITY.md's table)."""

    published: Counter[str] = field(default_factory=Counter)
    """Per category."""
    replies: Counter[str] = field(default_factory=Counter)
    ok: Counter[str] = field(default_factory=Counter)
    ok_by_verb: Counter[str] = field(default_factory=Counter)
    refused: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(category, error type)."""
    batches: int = 0
    accepted_changes: int = 0

    def sent(self, category: str, n: int = 1) -> None:
        self.published[category] += n

    def record(self, category: str, verb: str, reply: dict[str, Any], *, repeat: bool = False) -> None:
        """One reply; ``repeat``: the answer to a repeated id (the change, if any, was counted once)."""
        self.replies[category] += 1
        if reply.get("ok"):
            self.ok[category] += 1
            self.ok_by_verb[verb] += 1
            result = reply.get("result", {})
            if verb == "param/set" and result.get("changed") and not result.get("dry_run") and not repeat:
                self.accepted_changes += 1
        else:
            self.refused[(category, reply.get("error", {}).get("type", "?"))] += 1

    def summary(self) -> dict[str, Any]:
        categories = sorted(self.published)
        return {
            category: {
                "published": self.published[category],
                "replies": self.replies[category],
                "ok": self.ok[category],
                "refused": {t: n for (c, t), n in sorted(self.refused.items()) if c == category},
            }
            for category in categories
        }


@dataclass
class HostileSite:
    mode: str
    config: Path
    proc: subprocess.Popen[bytes]
    commander: Commander
    events: list[dict[str, Any]]
    tally: Tally
    initial_values: dict[str, str]
    sims: list[subprocess.Popen[bytes]]


def start_sim(args: list[str], link: Path, log: Path) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcud", "sim", *args, "--link", str(link)],
        stdin=subprocess.PIPE,  # the simulators stop at the end of their stdin
        stdout=out,
        stderr=out,
        cwd=REPO,
    )
    out.close()
    deadline = time.monotonic() + 20
    while not link.exists():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    return proc


def event_listener(port: int, prefix: str, events: list[dict[str, Any]]) -> mqtt.Client:
    subscribed = threading.Event()
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=f"events-{os.getpid()}-{time.monotonic_ns()}"
    )

    def on_message(_c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        events.append(json.loads(message.payload))

    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.subscribe(f"{prefix}/event", qos=1)
    assert subscribed.wait(10)
    return client


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    b = start_mosquitto(tmp_path_factory.mktemp("mosquitto"))
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="module", params=["open", "sealed"])
def site(
    request: pytest.FixtureRequest, broker: Mosquitto, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HostileSite]:
    mode: str = request.param
    root = tmp_path_factory.mktemp(f"hostile-{mode}")
    sims = [
        start_sim(["meters", "--protocol", "mbus", "--addresses", "1"], root / "mbus", root / "sim-mbus.log"),
        start_sim(["drive", "--unit", "1", "--baud", "9600"], root / "rs485", root / "sim-drive.log"),
    ]
    remote = "[remote]\nplain_param_set = true\n" if mode == "open" else ""
    toml = f"""{remote}
[config_port]
enabled = false

[[line]]
name = "mbus-1"
device = "{root / "mbus"}"
kind = "mbus"

[[meter]]
name = "m1"
line = "mbus-1"
protocol = "mbus"
address = "1"
interval_s = 3600

[[line]]
name = "rs485-1"
device = "{root / "rs485"}"
kind = "rs485"
baud = 9600
framing = "8E1"

[[drive]]
name = "axis-1"
bus = "rs485-1"
protocol = "modbus-rtu"
node_id = 1
commands = true
writable = ["8"]
poll_interval_s = 0.5
[drive.registers]
status = 0
control = 1
position = 2
velocity = 4
fault = 6
io = 7
"""
    wme = "ntp_interval=600\n" + (f"fw_server_key={KEY}\n" if mode == "sealed" else "")
    config = write_site(root / "site", mqtt_url=broker.url, toml_extra=toml, wme=wme)
    notify = NotifySocket(root / "notify.sock")
    events: list[dict[str, Any]] = []
    listener = event_listener(broker.port, "dcu/dcu-test", events)
    proc = start_daemon(config, notify)
    commander = Commander(broker.port)
    try:
        notify.wait_for("READY=1")
        commander.wait_serving()
        values = commander.request("param/get")["result"]["values"]
        yield HostileSite(mode, config, proc, commander, events, Tally(), values, sims)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        commander.close()
        listener.loop_stop()
        listener.disconnect()
        notify.close()
        for sim in sims:
            sim.kill()
            sim.wait(timeout=10)


# -- strategies --------------------------------------------------------------------------------------

_scalar_hostile = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, -1, 2**31, 2**63, 2**64, -(2**63) - 1]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308, -1e308, 5e-324, -0.0, 0.5]),
    st.text(max_size=40),
    st.text(
        alphabet=st.characters(min_codepoint=0x80, max_codepoint=0x10FFFF, exclude_categories=["Cs"]),
        max_size=20,
    ),
    st.sampled_from(
        ["", " ", "\x00", "0x", "0xFFFFFFFF", "../../etc/passwd", "a\nb=c", "☃" * 300, "x" * 5000]
    ),
)
HOSTILE = st.recursive(
    _scalar_hostile,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)


def either(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly plausible values (3 in 4), so that requests reach the handlers; the rest hostile."""
    return st.one_of(valid, valid, valid, HOSTILE)


_expires = st.one_of(
    st.just("2999-01-01T00:00:00Z"),
    st.just("2999-01-01T00:00:00+02:00"),
    st.sampled_from(["2001-01-01T00:00:00Z", "2030-01-01T00:00:00", "never", "", "9999-99-99T99:99:99Z", 5]),
)
_names = st.sampled_from(HARMLESS * 4 + PROTECTED + ["bogus", "ntp.interval", "fw_server_encrypt"])
_values = st.one_of(
    st.integers(min_value=1, max_value=86400).map(str), st.integers(min_value=1, max_value=86400)
)
_envelopes = st.one_of(
    st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode()),
    st.binary(max_size=120).map(lambda b: base64.b64encode(b"DCUE\x01\x01\x00\x00" + b).decode()),
    st.text(max_size=50),
    HOSTILE,
)

FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "ping": {},
    "status": {},
    "param/get": {"names": either(st.lists(_names | st.text(max_size=70), max_size=5))},
    "param/set": {
        "set": either(
            st.dictionaries(
                st.one_of(_names, _names, _names, st.text(max_size=70)),
                either(_values),
                min_size=1,
                max_size=3,
            )
        ),
        "text": either(
            st.lists(st.tuples(_names, _values), max_size=3).map(
                lambda kv: "".join(f"{k}={v}\n" for k, v in kv)
            )
        ),
        "who": either(st.text(max_size=80)),
        "dry_run": either(st.booleans()),
    },
    "read": {"meter": either(st.sampled_from(["m1", "nope", "mbus-1"]))},
    "scan": {
        "line": either(st.sampled_from(["mbus-1", "rs485-1", "nope"])),
        "mode": either(st.sampled_from(["primary", "secondary"])),
        "first": either(st.integers(min_value=0, max_value=250)),
        "last": either(st.integers(min_value=0, max_value=250)),
    },
    "drive/read": {
        "address": either(st.integers(min_value=0, max_value=20) | st.sampled_from(["0x0", "8", "65536"])),
        "count": either(st.integers(min_value=1, max_value=130)),
        "table": either(st.sampled_from(["holding", "input", "coils"])),
        "index": either(st.sampled_from(["0x6041", 0x6041, "zz"])),
    },
    "drive/write": {
        "address": either(st.integers(min_value=0, max_value=20) | st.sampled_from(["0x8", "8"])),
        "value": either(st.integers(min_value=0, max_value=70000)),
        "values": either(st.lists(st.integers(min_value=0, max_value=70000), max_size=130)),
        "index": either(st.sampled_from(["0x6060", 0x6040])),
        "type": either(st.sampled_from(["u16", "i32", "f32", "u128"])),
    },
}
for _verb in ("drive/enable", "drive/disable", "drive/quick_stop", "drive/fault_reset", "drive/state"):
    FIELDS[_verb] = {}
REQUIRED: dict[str, dict[str, st.SearchStrategy[Any]]] = {verb: {} for verb in VERBS}
for _verb in VERBS:
    if _verb.startswith("drive/"):
        REQUIRED[_verb]["drive"] = either(st.sampled_from(["axis-1", "axis-1", "axis-9"]))
    FIELDS[_verb]["id"] = either(st.text(min_size=1, max_size=20) | st.integers())
    FIELDS[_verb]["expires"] = _expires
REQUIRED["read"]["meter"] = FIELDS["read"].pop("meter")
REQUIRED["scan"]["line"] = FIELDS["scan"].pop("line")


def _tame(verb: str, request: dict[str, Any]) -> dict[str, Any]:
    """Keep valid requests short: a scan of at most 3 primary addresses (a full scan takes minutes)."""
    if verb == "scan" and request.get("line") == "mbus-1":
        request["mode"] = "primary"
        first, last = request.get("first", 0), request.get("last", 250)
        if isinstance(first, int) and not isinstance(first, bool) and 0 <= first <= 250:
            request["last"] = min(250, first + 2) if not isinstance(last, int) or last > first + 2 else last
    return request


def requests_for(verb: str) -> st.SearchStrategy[dict[str, Any]]:
    """A request object: the verb's fields (required ones mostly present), sometimes junk fields."""
    names = set(FIELDS[verb]) | set(REQUIRED[verb])
    junk = st.dictionaries(
        st.text(max_size=10).filter(lambda k: k not in names), HOSTILE, min_size=1, max_size=2
    )
    known = st.fixed_dictionaries(REQUIRED[verb], optional=FIELDS[verb])
    extra = st.one_of(st.just({}), st.just({}), st.just({}), junk)
    return st.builds(lambda a, b: _tame(verb, {**b, **a}), known, extra)


def sealed_with(key: str, verb: str) -> st.SearchStrategy[bytes]:
    """A well-formed envelope under a key this DCU does not have, or for another verb."""

    def make(inner: dict[str, Any], other_verb: bool) -> bytes:
        context = f"MQTT {'param/get' if other_verb else verb}".encode()
        envelope = seal(
            EnvelopeKeys.from_parameter(key), json.dumps(inner).encode(), context, device_id="dcu-test"
        )
        return json.dumps({"envelope": base64.b64encode(envelope).decode()}).encode()

    return st.builds(make, requests_for(verb), st.booleans())


def payloads_for(verb: str) -> st.SearchStrategy[bytes]:
    as_json = requests_for(verb).map(lambda r: json.dumps(r, ensure_ascii=False).encode())
    raw = st.one_of(
        st.builds(lambda b, k: b[:k], as_json, st.integers(min_value=0, max_value=40)),  # truncated
        st.sampled_from(
            [b"[" * 60000, b'{"a":' * 9 + b"1" + b"}" * 9, b"{" * 100, b"]]]]", b"", b" ", b"null"]
        ),
        st.sampled_from(
            [b'{"id": 1, "first": NaN}', b'{"first": Infinity}', b'{"first": 1e400}', b'{"x": -1e400}']
        ),
        st.binary(max_size=64),
        # long unicode (40 KB, under the 64 KiB bound: it must be answered)
        st.builds(
            lambda r: json.dumps({**r, "pad": "\u00e9" * 20000}, ensure_ascii=False).encode(),
            requests_for(verb),
        ),
        st.sampled_from([b"[1, 2, 3]", b'"string"', b"42", b"true"]),
    )
    options = [as_json, as_json, as_json, raw]
    if verb == "param/set":  # well-formed changes: harmless ones apply (open), protected ones never do
        plausible = st.dictionaries(_names, _values.map(str), min_size=1, max_size=2)
        options.append(plausible.map(lambda d: json.dumps({"set": d}).encode()))
    if verb in STATE_CHANGING:
        options.append(sealed_with(OTHER_KEY, verb))  # authentic-looking, but not under this DCU's key
        junk_envelope = st.builds(
            lambda r, e: {**r, "envelope": e},
            st.fixed_dictionaries({}, optional={"id": FIELDS[verb]["id"]}),
            _envelopes,
        )
        options.append(junk_envelope.map(lambda r: json.dumps(r).encode()))
    return st.one_of(*options)


# -- checks ------------------------------------------------------------------------------------------


def alive_and_unharmed(site: HostileSite) -> dict[str, Any]:
    assert site.proc.poll() is None, daemon_log(site.config)[-3000:]
    assert site.commander.request("ping")["ok"]
    status = site.commander.status()
    assert status["restarts"]["total"] == 0, status["restarts"]
    assert status["commands"]["internal_errors"] == 0, daemon_log(site.config)[-3000:]
    return status


def send_batch(site: HostileSite, verb: str, payloads: list[bytes]) -> None:
    topic = f"{site.commander.prefix}/cmd/{verb}/reply"
    before = len(site.commander.replies)
    for payload in payloads:
        site.commander.publish(verb, payload)
    site.tally.sent("generated", len(payloads))
    site.commander.wait_until(
        lambda rs: sum(1 for t, _r in rs[before:] if t == topic) >= len(payloads), timeout_s=60
    )
    with site.commander._cond:
        new = [r for t, r in site.commander.replies[before:] if t == topic]
    for reply in new[: len(payloads)]:
        site.tally.record("generated", verb, reply)
    site.tally.batches += 1
    alive_and_unharmed(site)


# -- the tests ---------------------------------------------------------------------------------------


def test_the_suite_covers_every_verb(site: HostileSite) -> None:
    served = site.commander.request("ping")["result"]["verbs"]
    # restart and reboot are not fed hostile batches here: in "open" a valid restart ends this daemon
    # by design. tests/service/test_device_commands.py covers them (authorisation, typed refusals, exit 75).
    assert sorted(served) == sorted([*VERBS, "reboot", "restart"])


@pytest.mark.parametrize("verb", VERBS)
def test_hostile_requests_get_a_reply_and_harm_nothing(site: HostileSite, verb: str) -> None:
    @settings(
        derandomize=True,
        database=None,
        deadline=None,
        max_examples=BATCHES_PER_VERB,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(batch=st.lists(payloads_for(verb), min_size=REQUESTS_PER_BATCH, max_size=REQUESTS_PER_BATCH))
    def run(batch: list[bytes]) -> None:
        send_batch(site, verb, batch)

    run()


VALID: dict[str, dict[str, Any]] = {
    **{verb: {"drive": "axis-1"} for verb in VERBS if verb.startswith("drive/")},
    "ping": {},
    "status": {},
    "param/get": {"names": ["ntp_interval"]},
    "param/set": {"set": {"ntp_interval": "301"}},
    "read": {"meter": "m1"},
    "scan": {"line": "mbus-1", "first": 1, "last": 1},
    "drive/read": {"drive": "axis-1", "address": 0},
    "drive/write": {"drive": "axis-1", "address": 8, "value": 1},
}
"""A request each verb would take, for the categories below (only their one defect is tested)."""


def test_retained_expired_duplicated_and_oversize(site: HostileSite) -> None:
    c = site.commander
    tally = site.tally
    before = c.status()["commands"]
    # Retained: never executed, no reply (MQTT 5 keeps the flag of a live retained publish).
    for verb in VERBS:
        c.publish(verb, json.dumps({"id": c.next_id(), **VALID[verb]}).encode(), retain=True)
        c.clear_retained(verb)
        tally.sent("retained", 2)
    # Expired: refused whatever the verb, before anything else is looked at.
    for verb in VERBS:
        reply = c.request(verb, {"expires": "2001-01-01T00:00:00Z", **VALID[verb]})
        tally.sent("expired")
        tally.record("expired", verb, reply)
        assert reply["error"]["type"] == "ExpiredError", (verb, reply)
    # Oversize (over [remote] max_request_bytes): dropped before it is queued, no reply.
    for verb in VERBS:
        c.publish(verb, json.dumps({"id": c.next_id(), **VALID[verb], "pad": "x" * 70000}).encode())
        tally.sent("oversize")
    # Duplicated ids on state-changing verbs: the same bytes twice, one execution, the same reply.
    for verb in sorted(STATE_CHANGING):
        body = {"id": c.next_id(), **VALID[verb]}
        if verb == "param/set":
            body["set"] = {"ntp_interval": "555"}
        payload = json.dumps(body).encode()
        c.publish(verb, payload)
        c.publish(verb, payload)
        tally.sent("duplicated", 2)
        c.wait_until(lambda rs, i=body["id"]: sum(1 for _t, r in rs if r.get("id") == i) >= 2)
        with c._cond:
            pair = [r for _t, r in c.replies if r.get("id") == body["id"]]
        assert pair[0] == pair[1]
        tally.record("duplicated", verb, pair[0])
        tally.record("duplicated", verb, pair[1], repeat=True)
    status = alive_and_unharmed(site)
    after = status["commands"]
    # Each verb: the retained request and the empty retained publish that clears it (a retained message too).
    assert after["retained_ignored"] - before["retained_ignored"] == 2 * len(VERBS)
    # Remembered only when the command ran: in "sealed" none did (no envelope), so none was remembered.
    assert after["duplicates"] - before["duplicates"] == (len(STATE_CHANGING) if site.mode == "open" else 0)
    assert after["oversize_dropped"] == before["oversize_dropped"]  # MQTT 5: the broker never sent them
    assert '"protocol": "5"' in daemon_log(site.config)


def test_zz_nothing_changed_by_a_refused_request(site: HostileSite) -> None:
    c = site.commander
    status = alive_and_unharmed(site)
    values = c.request("param/get")["result"]["values"]
    for name in [*PROTECTED, "fw_server_encrypt", "ei_client_pass"]:
        assert values[name] == site.initial_values[name], name
    changes = [e for e in site.events if e.get("type") == "config_changed"]
    if site.mode == "sealed":
        assert changes == [] and values == site.initial_values
        assert all(site.tally.ok_by_verb[v] == 0 for v in STATE_CHANGING)
    else:
        # Every change event is an accepted param/set (events come through the outbox: wait for them).
        deadline = time.monotonic() + 30
        while len(changes) < site.tally.accepted_changes and time.monotonic() < deadline:
            c.request("ping")
            changes = [e for e in site.events if e.get("type") == "config_changed"]
        assert len(changes) == site.tally.accepted_changes
        assert all(set(e["changed"]).isdisjoint(PROTECTED) for e in changes)
    summary = {
        "mode": site.mode,
        "categories": site.tally.summary(),
        "published": sum(site.tally.published.values()),
        "ok_by_verb": dict(site.tally.ok_by_verb),
        "batches": site.tally.batches,
        "accepted_param_changes": site.tally.accepted_changes,
        "config_changed_events": len(changes),
        "daemon_counters": status["commands"],
        "restarts": status["restarts"],
        "process_alive": site.proc.poll() is None,
    }
    print("HOSTILE-SUMMARY", json.dumps(summary, sort_keys=True))
    target = os.environ.get("DCUD_HOSTILE_SUMMARY")
    if target:
        with Path(target).open("a") as out:
            out.write(json.dumps(summary, sort_keys=True) + "\n")
