"""Plans for dlms-cosem's client (tests/peers/cosem_client.py, its own process) and the checks of its
report; shared by the tests of the independent peer and of dcud's own DLMS simulator.

No dcud import: the peer's tests stay independent of the code they are a check on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from helpers import REPO

COSEM_CLIENT = REPO / "tests" / "peers" / "cosem_client.py"
"""The client script: ``python cosem_client.py plan.json`` prints its JSON report as the last line."""


def get(class_id: int, obis: str, attr: int, **extra: Any) -> dict[str, Any]:
    """A plan step: GET ``class_id``/``obis``/``attr`` (``extra``: ``as_time``, ``rows``, ``range``...)."""
    return {"op": "get", "class_id": class_id, "obis": obis, "attr": attr, **extra}


def register_gets(*obis: str) -> list[dict[str, Any]]:
    """Plan steps: of each register (class 3) in turn, its value (attribute 2) and scaler_unit (3)."""
    return [get(3, code, attr) for code in obis for attr in (2, 3)]


def profile_get(obis: str, start: str, end: str) -> dict[str, Any]:
    """A plan step: the rows of profile ``obis`` (class 7, attribute 2) selected by range."""
    return get(7, obis, 2, rows=True, range={"from": start, "to": end})


def write_plan(tmp_path: Path, plan: dict[str, Any]) -> Path:
    """``plan`` as a JSON file of its own in ``tmp_path`` (``timeout_s`` 5 unless the plan names one)."""
    path = tmp_path / f"plan-{os.urandom(4).hex()}.json"
    path.write_text(json.dumps({"timeout_s": 5, **plan}))
    return path


def report_of(returncode: int | None, stdout: str, stderr: str) -> dict[str, Any]:
    """The client's report (the last line of its output); AssertionError when it failed or crashed."""
    assert returncode == 0, stderr[-3000:]
    report: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    assert "crashed" not in report, report
    return report


def ok_steps(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The steps of a report whose connect, association, every step and release succeeded."""
    assert report["connect"]["ok"] and report["associate"]["ok"], report
    assert all(step["ok"] for step in report["steps"]), report["steps"]
    assert report["release"]["ok"], report
    return list(report["steps"])
