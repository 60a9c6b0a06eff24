"""Durable file writes: the one way dcud replaces a state file so that a crash or a power cut leaves the
old content or the new, never a mix and never an empty file.

The sequence is the POSIX recipe: write a temp file in the same directory, ``fsync`` it, ``rename`` it
over the target, then ``fsync`` the directory so the rename itself survives a power cut. Every state
file (replay guards, power record, polling sequence reservations, FTP push names, firmware record, SNMP
engine boots, certificate banks, the WM-E parameter file) goes through :func:`write_durably`.

Failures raise ``OSError``: a caller that must refuse a request when its state cannot be persisted
(the envelope replay guard) sees the error; a caller for which the state is advisory decides itself
to log and go on.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make a rename (or a create) in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(target: Path, data: bytes, mode: int = 0o600, *, make_parents: bool = True) -> None:
    """Replace ``target`` with ``data`` atomically and durably (temp file, fsync, rename, fsync dir).

    ``mode`` applies to the new file whatever the umask (state files hold secrets: 0600 by default).
    The temp file is removed again if anything fails before the rename.
    """
    if make_parents:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)
