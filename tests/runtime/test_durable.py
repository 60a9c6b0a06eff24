"""The one durable-write helper (dcud.runtime.durable)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dcud.runtime import durable
from dcud.runtime.durable import write_durably


def test_replaces_content_with_the_mode_asked_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "state.json"
    write_durably(target, b"old")
    write_durably(target, b"new" * 10_000, 0o640)
    assert target.read_bytes() == b"new" * 10_000
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]


def test_a_failed_rename_keeps_the_old_file_and_removes_the_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "state"
    target.mkdir()  # os.replace of a file over a directory fails
    (target / "keep").write_text("x")
    with pytest.raises(OSError):
        write_durably(target, b"new")
    assert (target / "keep").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["state"]


def test_the_directory_is_synced_after_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(durable.os, "replace", lambda a, b: (order.append("rename"), real_replace(a, b)))
    monkeypatch.setattr(durable, "fsync_dir", lambda d: order.append(f"fsync_dir {d.name}"))
    write_durably(tmp_path / "f", b"x")
    assert order == ["rename", f"fsync_dir {tmp_path.name}"]
