"""FTP/FTPS data push: one file set per push attempt, uploaded under a temporary name, then renamed.

File set
    Every attempt of :class:`dcud.service.datapush.DataPushService` (a cycle, or one step of a catch-up)
    that has readings produces one file set, named ``<datapush_prefix>_<device_id>_<YYYYmmddTHHMMSSZ>``
    (UTC; ``datapush_prefix`` unset: ``dcud``) with these extensions:

    ``.iec``  only when the set holds IEC 62056-21 readings: their raw readouts, concatenated in outbox
              order, each exactly as received: the identification line (``/XXXZ...`` CR LF) and the data
              message (STX .. ``!`` CR LF ETX BCC). Never altered, so the BCC stays valid.
    ``.csv``  every reading of the set (IEC, M-Bus and DLMS/COSEM, whose load-profile rows are readings
              with their capture time as ``ts``), decoded: one row per value (see :data:`COLUMNS`).

    Names strictly increase (the stamp is the attempt's time, or the previous stamp plus one second when
    that is not later), so a head-end that sorts by name processes the sets in order.
Never half a file
    Each file is stored as ``<name>.part`` and renamed to its final name after the upload completed
    (RNFR/RNTO); the ``.csv`` is renamed last and marks the set complete. Items are acked in the outbox
    only after the last rename. A failed or killed upload leaves at most ``.part`` files: their names are
    recorded (``state_dir/ftp-push.json``, fsynced) before the upload starts, and the next session deletes
    them. After a crash between the renames and the ack, the same readings are sent again in a new set:
    delivery is at-least-once, and the head-end dedupes on the ``uid`` column.
Table mask
    ``datapush_table_mask`` selects the tariff tables whose registers go into the CSV: bit 1 = T1 (tariff
    1), bit 16 = T2 (tariff 2), bit 32 = T3 (tariff 3 and higher). The tariff of an IEC or DLMS value is the
    E field of its OBIS code for energy and demand registers (C.D.E with D = 2, 6, 8 or 9: ``1.8.2`` is
    tariff 2; ``1.8.0`` is the total); an M-Bus value carries its own ``tariff``. Rows without a tariff
    (totals, instantaneous values, identification, status) are always included. The raw readout is
    never filtered. A reading none of whose rows pass the mask still has one row (empty ``id``), so
    every reading of the set is accounted for.
Target path
    The URL path is relative to the login directory (RFC 1738); ``%2F`` at its start makes it absolute.
    It is created when missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aioftp

from dcud.config.model import DataPushConfig
from dcud.runtime.durable import write_durably
from dcud.service.datapush import DataPushServiceConfig, PushError, PushTarget, tls_context
from dcud.service.outbox import OutboxItem

__all__ = [
    "COLUMNS",
    "STATE_FILE",
    "TABLE_BITS",
    "FileSet",
    "FtpUploader",
    "build_file_set",
    "file_stamp",
    "obis_tariff",
    "render_csv",
    "render_iec",
    "tariff_selected",
]

CONSUMER: Final = "ftp"
STATE_FILE: Final = "ftp-push.json"
TEMP_SUFFIX: Final = ".part"
COLUMNS: Final = (
    "uid",
    "meter",
    "address",
    "protocol",
    "ts",
    "seq",
    "id",
    "value",
    "unit",
    "tariff",
    "storage",
)
"""CSV header. ``uid``: the outbox item id (dedupe key); ``ts``: reading time (RFC 3339 UTC); ``seq``:
the meter's reading sequence number; ``id``: OBIS code (IEC) or record index (M-Bus); ``value``: a
number with ``.`` as decimal mark, or text; ``unit``: SI-style symbol; ``tariff``/``storage``: empty
when the value has none."""
TABLE_BITS: Final = {1: 1, 2: 16, 3: 32}
"""Tariff -> ``datapush_table_mask`` bit (tariffs above 3 use the T3 bit)."""
_OBIS_RE = re.compile(r"^(?:\d+-\d+:)?(\d+|[A-Z])\.(\d+)\.(\d+)(?:[*&]\d+)?$")
_TARIFF_D: Final = frozenset({2, 6, 8, 9})  # cumulative max demand, max demand, time integrals 1 and 2
_QUIT_TIMEOUT_S: Final = 2.0


# ------------------------------------------------------------------------------------ file contents


def obis_tariff(obis: str) -> int | None:
    """The tariff of an energy/demand register's OBIS code (E of C.D.E, C 1..80, D 2/6/8/9), else None."""
    match = _OBIS_RE.match(obis.strip())
    if match is None or not match.group(1).isdigit() or not 1 <= int(match.group(1)) <= 80:
        return None  # C = 0 (general), 96..99 and letters (service entries) are not quantities
    if int(match.group(2)) not in _TARIFF_D:
        return None
    return int(match.group(3))


def tariff_selected(tariff: int | None, mask: int) -> bool:
    """Whether a row of ``tariff`` goes into the CSV under ``datapush_table_mask`` (module doc)."""
    if tariff is None or tariff <= 0:
        return True
    return bool(mask & TABLE_BITS[min(tariff, 3)])


def _value_tariff(value: Mapping[str, Any], protocol: str) -> int | None:
    tariff = value.get("tariff")
    if isinstance(tariff, int) and not isinstance(tariff, bool):
        return tariff
    if protocol == "iec62056-21":
        return obis_tariff(str(value.get("id", "")))
    if protocol == "dlms":  # the full code A.B.C.D.E.F: the same rule on its C.D.E
        parts = str(value.get("id", "")).split(".")
        return (
            obis_tariff(f"{parts[0]}-{parts[1]}:{'.'.join(parts[2:5])}*{parts[5]}")
            if len(parts) == 6
            else None
        )
    return None


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (int, str)):
        return str(value)
    return json.dumps(value, separators=(",", ":"), default=str)


def render_csv(readings: Sequence[tuple[str, Mapping[str, Any]]], table_mask: int) -> bytes:
    """The CSV of ``(uid, reading payload)`` pairs: UTF-8, comma, RFC 4180 quoting, CRLF, header first."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    for uid, reading in readings:
        protocol = str(reading.get("protocol", ""))
        head = [
            uid,
            _cell(reading.get("meter")),
            _cell(reading.get("address")),
            protocol,
            _cell(reading.get("ts")),
            _cell(reading.get("seq")),
        ]
        rows = 0
        values = reading.get("values")
        for value in values if isinstance(values, list) else []:
            if not isinstance(value, Mapping):
                continue
            tariff = _value_tariff(value, protocol)
            if not tariff_selected(tariff, table_mask):
                continue
            writer.writerow(
                [
                    *head,
                    _cell(value.get("id")),
                    _cell(value.get("value")),
                    _cell(value.get("unit")),
                    _cell(tariff),
                    _cell(value.get("storage")),
                ]
            )
            rows += 1
        if rows == 0:
            writer.writerow([*head, "", "", "", "", ""])
    return buffer.getvalue().encode("utf-8")


def render_iec(readings: Sequence[tuple[str, Mapping[str, Any]]]) -> bytes:
    """The raw IEC 62056-21 readouts of the IEC readings, concatenated, exactly as received."""
    out = bytearray()
    for _uid, reading in readings:
        raw = reading.get("raw")
        if reading.get("protocol") != "iec62056-21" or not isinstance(raw, str):
            continue
        encoding = str(reading.get("raw_encoding") or "latin-1")
        ident = reading.get("ident")
        if isinstance(ident, str) and ident:
            out += ident.encode(encoding, errors="replace") + b"\r\n"
        out += raw.encode(encoding, errors="replace")
    return bytes(out)


def file_stamp(epoch_s: int) -> str:
    """``YYYYmmddTHHMMSSZ`` (UTC) for file names."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(epoch_s))


@dataclass(frozen=True)
class FileSet:
    """The files of one push attempt, in upload order; the CSV is always last."""

    files: tuple[tuple[str, bytes], ...]
    readings: int


def build_file_set(items: Sequence[OutboxItem], base_name: str, table_mask: int) -> FileSet:
    """Decode the items' payloads and render the ``.iec`` (when any) and ``.csv`` files."""
    readings: list[tuple[str, Mapping[str, Any]]] = []
    for item in items:
        try:
            payload = json.loads(item.payload)
        except ValueError:
            payload = {"meter": item.subtopic, "values": []}  # never drop an item the HES should see
        readings.append((item.uid, payload if isinstance(payload, dict) else {"values": []}))
    files: list[tuple[str, bytes]] = []
    raw = render_iec(readings)
    if raw:
        files.append((f"{base_name}.iec", raw))
    files.append((f"{base_name}.csv", render_csv(readings, table_mask)))
    return FileSet(tuple(files), len(readings))


# ------------------------------------------------------------------------------------ durable state


@dataclass
class FtpPushState:
    """Last stamp used and temporary names possibly left on the server (``state_dir/ftp-push.json``)."""

    path: Path
    last_stamp: int = 0
    pending: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> FtpPushState:
        """Read the file; a missing or unreadable one starts fresh."""
        state = cls(path)
        with contextlib.suppress(OSError, ValueError, TypeError):
            data = json.loads(path.read_text())
            state.last_stamp = int(data.get("last_stamp", 0))
            state.pending = [str(n) for n in data.get("pending", []) if str(n).endswith(TEMP_SUFFIX)]
        return state

    def next_stamp(self, now_s: float) -> int:
        """A stamp later than every one used before (names never repeat, even across restarts)."""
        return max(int(now_s), self.last_stamp + 1)

    def save(self) -> None:
        """Write atomically and fsync (runs in a worker thread)."""
        write_durably(
            self.path, json.dumps({"last_stamp": self.last_stamp, "pending": self.pending}).encode()
        )


# ---------------------------------------------------------------------------------------- uploader


class FtpUploader:
    """:class:`~dcud.service.datapush.Uploader` for ``ftp://`` and ``ftps://`` (explicit TLS)."""

    consumer = CONSUMER

    def __init__(
        self,
        target: PushTarget,
        *,
        options: DataPushConfig,
        device_id: str,
        prefix: str,
        table_mask: int,
        state_dir: Path,
    ) -> None:
        self.target = target
        self.options = options
        self.device_id = device_id
        self.prefix = prefix
        self.table_mask = table_mask
        self.state = FtpPushState.load(state_dir / STATE_FILE)
        self._client: aioftp.Client | None = None
        self.sets_uploaded = 0

    @classmethod
    def from_slice(cls, slice_: DataPushServiceConfig) -> FtpUploader:
        """Build from the data push service's slice."""
        return cls(
            slice_.target,
            options=slice_.options,
            device_id=slice_.device_id,
            prefix=slice_.prefix,
            table_mask=slice_.table_mask,
            state_dir=slice_.state_dir,
        )

    async def _session(self) -> aioftp.Client:
        if self._client is not None:
            return self._client
        target = self.target
        client = aioftp.Client(encoding="utf-8")
        self._client = client
        try:
            await client.connect(target.host, target.port)
            if target.tls:
                await client.upgrade_to_tls(tls_context(self.options))
            await client.login(target.username or "anonymous", target.password or "anonymous@")
            if target.path:
                directory = target.path[1:] if target.path.startswith("/") else target.path
                if directory:
                    try:
                        await client.change_directory(directory)
                    except aioftp.StatusCodeError:
                        await client.make_directory(directory)
                        await client.change_directory(directory)
            await self._remove_leftovers(client)
        except aioftp.StatusCodeError as exc:
            raise PushError(_status_text(exc)) from exc
        except OSError:  # network and TLS errors as they are (ssl errors are also ValueErrors)
            raise
        except (aioftp.AIOFTPException, EOFError, ValueError) as exc:  # server hung up / bad reply
            raise PushError(f"FTP: {type(exc).__name__}: {exc}") from exc
        return client

    async def _remove_leftovers(self, client: aioftp.Client) -> None:
        if not self.state.pending:
            return
        for name in list(self.state.pending):
            with contextlib.suppress(aioftp.StatusCodeError):  # already renamed or never created
                await client.remove_file(name)
        self.state.pending = []
        await asyncio.to_thread(self.state.save)

    async def deliver(self, items: Sequence[OutboxItem], now_s: float) -> dict[str, Any]:
        """Upload one file set for ``items`` (module doc); raises PushError/OSError/TimeoutError."""
        client = await self._session()  # first: it removes the leftovers of earlier attempts
        stamp = self.state.next_stamp(now_s)
        base = f"{self.prefix}_{self.device_id}_{file_stamp(stamp)}"
        file_set = build_file_set(items, base, self.table_mask)
        names = [name for name, _ in file_set.files]
        self.state.last_stamp = stamp
        self.state.pending = sorted({*self.state.pending, *(n + TEMP_SUFFIX for n in names)})
        await asyncio.to_thread(self.state.save)  # before the first byte: a crash leaves known leftovers
        try:
            for name, data in file_set.files:
                async with client.upload_stream(name + TEMP_SUFFIX) as stream:
                    await stream.write(data)
            for name in names:  # the CSV last: it completes the set
                await client.rename(name + TEMP_SUFFIX, name)
        except aioftp.StatusCodeError as exc:
            raise PushError(_status_text(exc)) from exc
        except OSError:  # network and TLS errors as they are (ssl errors are also ValueErrors)
            raise
        except (aioftp.AIOFTPException, EOFError, ValueError) as exc:  # server hung up / bad reply
            raise PushError(f"FTP: {type(exc).__name__}: {exc}") from exc
        self.state.pending = [p for p in self.state.pending if p[: -len(TEMP_SUFFIX)] not in names]
        await asyncio.to_thread(self.state.save)
        self.sets_uploaded += 1
        return {"files": names, "readings": file_set.readings}

    async def close(self) -> None:
        """QUIT politely (bounded), else drop the connection."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            async with asyncio.timeout(_QUIT_TIMEOUT_S):
                await client.quit()
        except (aioftp.AIOFTPException, OSError, TimeoutError, ConnectionError):
            pass
        finally:
            with contextlib.suppress(Exception):
                client.close()


def _status_text(exc: aioftp.StatusCodeError) -> str:
    received = ",".join(str(c) for c in exc.received_codes)
    info = " ".join(str(line).strip() for line in exc.info)[:200]
    return f"FTP server answered {received}: {info}".rstrip(": ")
