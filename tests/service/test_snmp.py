"""SNMP traps against Net-SNMP's snmptrapd; DCUD-MIB loaded by snmptranslate and snmptrapd."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from dcud.config.loader import load_config
from dcud.service import snmp_mib
from dcud.service.snmp import SnmpServiceConfig, TrapSender, next_engine_boots
from dcud.sim.alarm_peers import SnmpTrapd
from dcud.sim.peers import find_program

from helpers import REPO
from helpers.alarm import (
    AUTH_KEY,
    COMMUNITY,
    DEVICE_ID,
    MIB_DIRS,
    USER,
    is_trap,
    running_service,
    snmp_params,
    trap_receiver,
)
from helpers.daemon import run_dcud, write_site
from helpers.meters import wait_until

EVENT = {
    "type": "line_down",
    "ts": "2026-11-21T14:00:00Z",
    "text": "line rs485-1 failed: device gone",
    "line": "rs485-1",
    "uid": "dcu-test-abcd-7",
}

# -- the MIB ---------------------------------------------------------------------------------------


def snmptranslate(*args: str, persistent_dir: Path) -> subprocess.CompletedProcess[str]:
    """Run snmptranslate on DCUD-MIB with a persistent directory of the test's own.

    Net-SNMP creates ``<persistent dir>/cert_indexes`` on its first run and says so on stderr
    ("Created directory: /var/lib/snmp/cert_indexes" on a fresh machine), so the system directory
    would make the output depend on whether anything ran Net-SNMP before. The test's own directory,
    with that subdirectory already there, makes every run a second run.
    """
    binary = find_program("snmptranslate", "snmp")
    mib_path = ":".join(str(d) for d in MIB_DIRS)
    (persistent_dir / "cert_indexes").mkdir(mode=0o700, parents=True, exist_ok=True)
    return subprocess.run(
        [binary, "-M", mib_path, "-m", "DCUD-MIB:SNMPv2-MIB", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "SNMP_PERSISTENT_DIR": str(persistent_dir)},
    )


# With -PW (mibwarnings 2) Net-SNMP reports every table's entry type as "No known translation for
# type (XxxEntry)", in any MIB with a table (its own NET-SNMP-AGENT-MIB included): that line, for
# exactly our five entry types, is the only warning allowed.
ENTRY_TYPE_NOTE = re.compile(
    r"^Warning: No known translation for type \((Dcud[A-Za-z]+Entry)\): At line \d+ in .*$"
)


def test_mib_loads_without_a_warning(tmp_path: Path) -> None:
    result = snmptranslate("-PW", "-Tp", "DCUD-MIB::dcudMIB", persistent_dir=tmp_path / "snmp")
    assert result.returncode == 0, result.stderr
    notes = [ENTRY_TYPE_NOTE.match(line) for line in result.stderr.splitlines()]
    assert all(notes), result.stderr
    assert sorted(m.group(1) for m in notes if m) == sorted(
        f"Dcud{t.name.removeprefix('dcud').removesuffix('Table')}Entry" for t in snmp_mib.TABLES
    )
    for trap in snmp_mib.TRAPS.values():
        assert f"{trap.name}({trap.arc})" in result.stdout
    for name, arc in snmp_mib.VARBINDS:
        assert f"{name}({arc})" in result.stdout
    assert "PLACEHOLDER" in (REPO / "mibs" / "DCUD-MIB.txt").read_text()


def test_a_first_net_snmp_run_says_so_on_stderr(tmp_path: Path) -> None:
    """Why :func:`snmptranslate` prepares its directory: without it the first run is not silent."""
    binary = find_program("snmptranslate", "snmp")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    result = subprocess.run(
        [binary, "-M", ":".join(str(d) for d in MIB_DIRS), "-m", "DCUD-MIB:SNMPv2-MIB", "DCUD-MIB::dcudMIB"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "SNMP_PERSISTENT_DIR": str(fresh)},
    )
    assert result.returncode == 0, result.stderr
    assert f"Created directory: {fresh}/cert_indexes" in result.stderr
    second = snmptranslate("DCUD-MIB::dcudMIB", persistent_dir=fresh)
    assert second.stderr == ""


def test_mib_and_code_agree_on_every_oid(tmp_path: Path) -> None:
    ent = snmp_mib.PLACEHOLDER_ENTERPRISE_OID
    for event_type, trap in snmp_mib.TRAPS.items():
        oid = snmp_mib.trap_oid(ent, event_type)
        assert oid is not None
        result = snmptranslate("-On", f"DCUD-MIB::{trap.name}", persistent_dir=tmp_path)
        assert result.stdout.strip() == "." + oid, result.stderr
    for name, arc in snmp_mib.VARBINDS:
        result = snmptranslate(snmp_mib.varbind_oid(ent, arc), persistent_dir=tmp_path)
        assert result.stdout.strip() == f"DCUD-MIB::{name}.0", result.stderr
    assert snmp_mib.trap_oid(ent, "reading") is None


# -- engine ID and boots ---------------------------------------------------------------------------


def test_engine_id_is_stable_per_device_and_configurable() -> None:
    a = snmp_mib.default_engine_id("dcu-0001")
    assert a == snmp_mib.default_engine_id("dcu-0001")
    assert a != snmp_mib.default_engine_id("dcu-0002")
    assert a[:5] == bytes.fromhex("80007ed905")  # 0x80000000 | PEN 32473, format 5 (octets)
    assert len(a) == 17
    assert snmp_mib.engine_id_for(
        "0x8000000001020304", "x", snmp_mib.PLACEHOLDER_ENTERPRISE_OID
    ) == bytes.fromhex("8000000001020304")
    assert snmp_mib.parse_engine_id("80:00:00:00:01:02") == bytes.fromhex("800000000102")
    with pytest.raises(ValueError):
        snmp_mib.parse_engine_id("0x1234")  # 2 octets: too short
    assert snmp_mib.default_engine_id("x", "1.3.6.1.4.1.8072")[:4] == (0x80000000 | 8072).to_bytes(4, "big")


def test_engine_boots_are_persisted_and_incremented(tmp_path: Path) -> None:
    assert next_engine_boots(tmp_path) == 1
    assert next_engine_boots(tmp_path) == 2
    (tmp_path / "snmp-engine-boots").write_text("garbage")
    assert next_engine_boots(tmp_path) == 1


def test_params_command_prints_the_engine_id(tmp_path: Path) -> None:
    config = write_site(tmp_path / "site", toml_extra='\n[snmp]\nengine_id = "0x80007ed9050102030405"\n')
    result = run_dcud("params", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert "# snmp engine id: 0x80007ed9050102030405" in result.stdout


def test_slice_maps_the_wme_values(tmp_path: Path) -> None:
    wme = (
        "snmp_trap=1\nsnmp_manager_ip=192.0.2.7\nsnmp_version=3\nsnmp_user=noc\nsnmp_auth_algo=1\n"
        "snmp_auth_key=12345678\nsnmp_priv_algo=2\nsnmp_priv_key=abcdefgh\n"
    )
    cfg = SnmpServiceConfig.from_config(load_config(write_site(tmp_path / "a", wme=wme)))
    assert cfg is not None
    assert (cfg.manager_port, cfg.auth, cfg.priv, cfg.security_level) == (162, "MD5", "3DES", "authPriv")
    assert "12345678" not in repr(cfg) and "abcdefgh" not in repr(cfg)
    assert cfg.engine_id == snmp_mib.default_engine_id(DEVICE_ID)
    v2 = SnmpServiceConfig.from_config(
        load_config(
            write_site(
                tmp_path / "b", wme="snmp_trap=1\nsnmp_manager_ip=192.0.2.7\nsnmp_version=2\nsnmp_user=noc\n"
            )
        )
    )
    assert v2 is not None and v2.community == "noc"
    unset = SnmpServiceConfig.from_config(
        load_config(
            write_site(tmp_path / "d", wme="snmp_trap=1\nsnmp_manager_ip=192.0.2.7\nsnmp_version=2\n")
        )
    )
    assert unset is None  # no default community (tests/config/test_secrets.py)
    off = SnmpServiceConfig.from_config(
        load_config(write_site(tmp_path / "c", wme="snmp_manager_ip=192.0.2.7\n"))
    )
    assert off is None


# -- traps to snmptrapd ----------------------------------------------------------------------------


def check_varbinds(trap: Any) -> None:
    assert trap.value("snmpTrapOID.0") == "DCUD-MIB::dcudLineDown"
    assert trap.value("dcudDeviceId.0") == DEVICE_ID
    assert trap.value("dcudEventType.0") == "line_down"
    assert trap.value("dcudEventTime.0") == "2026-11-21T14:00:00Z"
    assert trap.value("dcudEventText.0") == "line rs485-1 failed: device gone"
    assert trap.value("dcudEventSubject.0") == "rs485-1"
    assert trap.value("dcudEventId.0") == "dcu-test-abcd-7"
    assert trap.varbinds[0][0] == "SNMPv2-MIB::sysUpTime.0"


@pytest.fixture
def trapd(tmp_path: Path) -> Any:
    receiver = trap_receiver(tmp_path / "trapd", umd5=("MD5", "DES"))
    try:
        yield receiver
    finally:
        receiver.stop()


async def test_v2c_trap_with_the_community_from_snmp_user(tmp_path: Path, trapd: SnmpTrapd) -> None:
    config = write_site(tmp_path / "site", wme=snmp_params(trapd, version=2, user=COMMUNITY))
    async with running_service(config, tmp_path / "site" / "state") as emit:
        emit(EVENT)
        emit({"type": "reading", "text": "not an alarm"})  # no trap for other event types
        trap = await asyncio.to_thread(trapd.wait_for, is_trap("dcudLineDown"))
    assert trap.security == f"TRAP2, SNMP v2c, community {COMMUNITY}"
    check_varbinds(trap)


@pytest.mark.parametrize(
    ("user", "auth", "priv"),
    [(USER, 2, 3), ("umd5", 1, 1)],
    ids=["SHA+AES128", "MD5+DES"],
)
async def test_v3_authpriv_traps(tmp_path: Path, trapd: SnmpTrapd, user: str, auth: int, priv: int) -> None:
    config = write_site(tmp_path / "site", wme=snmp_params(trapd, version=3, auth=auth, priv=priv, user=user))
    async with running_service(config, tmp_path / "site" / "state") as emit:
        emit(EVENT)
        trap = await asyncio.to_thread(trapd.wait_for, is_trap("dcudLineDown"))
    assert trap.security == f"TRAP2, SNMP v3, user {user}, context "
    check_varbinds(trap)
    assert (tmp_path / "site" / "state" / "snmp-engine-boots").read_text().strip() == "1"


async def test_a_wrong_key_is_not_accepted(tmp_path: Path, trapd: SnmpTrapd) -> None:
    good = load_config(write_site(tmp_path / "good", wme=snmp_params(trapd)))
    slice_ = SnmpServiceConfig.from_config(good)
    assert slice_ is not None
    from dataclasses import replace

    wrong_auth = replace(slice_, auth_key=AUTH_KEY + "x")
    wrong_priv = replace(slice_, priv_key="wrong-priv-key")
    wrong = (
        (wrong_auth, "sent with a wrong auth key", "Authentication failed for dcud"),  # HMAC mismatch
        (wrong_priv, "sent with a wrong priv key", "error parsing ScopedPDU"),  # decrypts to garbage
    )
    for cfg, text, refused in wrong:
        sender = TrapSender(cfg, 1)
        await sender.wait_open()
        sender.send("power_loss", {"type": "power_loss", "text": text})
        # The trap reached snmptrapd and was refused: its log says so (then the sender may close).
        await wait_until(lambda refused=refused: refused in trapd.log_text(), 10, step_s=0.01)
        sender.close()
    sender = TrapSender(slice_, 1)
    await sender.wait_open()
    sender.send("power_loss", {"type": "power_loss", "text": "sent with the right keys"})
    try:
        await asyncio.to_thread(
            trapd.wait_for, lambda t: t.value("dcudEventText.0") == "sent with the right keys"
        )
    finally:
        sender.close()
    texts = [t.value("dcudEventText.0") for t in trapd.traps()]
    assert texts == ["sent with the right keys"]
    log = trapd.log_text()
    assert "Authentication failed for dcud" in log  # the wrong auth key: HMAC mismatch
    assert "error parsing ScopedPDU" in log  # the wrong priv key: decrypts to garbage
