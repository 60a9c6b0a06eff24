"""Honest replies (issue 16): parameters that have no effect on this DCU (support level "accepted")
are named by ``dcud check-config``; ``dcud params`` shows every parameter's support level.
(``param/set``: tests/service/test_remote_config.py; ``PUT /config``: tests/service/test_config_port.py.)"""

from __future__ import annotations

import json
from pathlib import Path

from dcud.config.wme import CATALOGUE, Support, no_effect

from helpers.daemon import run_dcud, write_site


def test_no_effect_lists_exactly_the_accepted_names() -> None:
    assert no_effect(["ntp_interval", "com_apn_name", "nope", "com_apn_name"]) == ["com_apn_name"]
    accepted = {n for n, p in CATALOGUE.items() if p.support is Support.ACCEPTED}
    assert set(no_effect(CATALOGUE)) == accepted and accepted


def test_check_config_prints_a_line_per_parameter_without_effect(tmp_path: Path) -> None:
    config = write_site(tmp_path / "site", wme="ntp_interval=600\ncom_apn_name=iot.example\ncom.in_rings=2\n")
    result = run_dcud("check-config", "-c", str(config))
    assert result.returncode == 0, result.stderr
    wme = config.parent / "wme.conf"
    lines = [line for line in result.stdout.splitlines() if "no effect on this DCU" in line]
    assert [line.split(": no effect")[0] for line in lines] == [
        f"{wme}:3: com.in_rings",
        f"{wme}:2: com_apn_name",
    ]
    assert "ModemManager" in lines[1]  # the catalogue's note says why
    clean = write_site(tmp_path / "clean", wme="ntp_interval=600\n")
    assert "no effect" not in run_dcud("check-config", "-c", str(clean)).stdout


def test_params_shows_the_support_level_in_the_table_and_json(tmp_path: Path) -> None:
    config = write_site(tmp_path / "site", wme="com_apn_name=iot.example\n")
    table = run_dcud("params", "-c", str(config))
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["name", "*", "value", "unit", "support"]
    by_name = {row.split()[0]: row for row in rows if not row.startswith("#")}
    assert by_name["com_apn_name"].split()[-1] == "accepted"
    assert by_name["ntp_interval"].split()[-1] == "applied"
    assert by_name["lastimei"].split()[-1] == "read-only"
    rows_json = {
        row["name"]: row for row in json.loads(run_dcud("params", "-c", str(config), "--json").stdout)
    }
    assert rows_json["com_apn_name"]["support"] == "accepted" and rows_json["com_apn_name"]["set"] is True
    assert {row["support"] for row in rows_json.values()} == {"applied", "accepted", "read-only"}
