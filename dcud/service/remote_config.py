"""Remote configuration: the one path through which the WM-E parameter file changes while dcud runs.

The config port (``PUT``/``PATCH /config``), MQTT ``<p>/cmd/param/set`` and SIGHUP all end up in
:class:`Reloader`, which serialises them (one job at a time, behind a lock, from a bounded queue):

1. **validate** the candidate with the same code as ``dcud check-config``
   (:func:`dcud.config.loader.load_config` with the candidate text; ``dcud.toml`` is read from disk
   as on SIGHUP). Any issue refuses the whole change: nothing is written, nothing restarts;
2. **write** it atomically to ``<state_dir>/params/wme.conf`` (:func:`atomic_write_parameters`):
   the previous file in force is first saved as ``wme.conf.bak``, then the new text goes to a temp
   file in the same directory, is fsynced, renamed over ``wme.conf``, and the directory is fsynced.
   A power cut at any point leaves the old or the new file in force, never a mix. The file is
   created ``0640`` (it holds secrets);
3. **reload** like SIGHUP: ``RELOADING=1``, the supervisor restarts only the services whose slice of
   the configuration changed, ``READY=1``;
4. **report**: an event ``config_changed`` (who, via, and every changed parameter with old and new
   values, secrets shown as ``***``), and the result to the caller.

Why ``state_dir``: ``/etc/dcud`` is read-only to dcud under the systemd sandbox (docs/systemd.md);
the loader takes ``<state_dir>/params/wme.conf`` as the file in force whenever it exists.

Who may change what (:data:`PROTECTED_PARAMETERS`, one policy for every channel): every apply says
whether its request was ``authenticated`` (an envelope under ``fw_server_key`` whose tag matched).
An unauthenticated change that would change a protected parameter (one that decides who can reach
or control the DCU) is refused whole; whether plain changes are accepted at all is the caller's
opt-in (``[remote] plain_param_set`` for MQTT, ``[config_port] plain_writes`` for the port). SIGHUP
reads the files on the DCU, which are the installer's: no policy applies there.

Whole and partial uploads (:func:`merge_parameter_text`): a whole file replaces the file in force
(parameters it does not name go back to their defaults); a partial one changes only the names it
lists (``name=`` unsets one), keeping the other lines and comments of the file in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import msgspec
import structlog

from dcud.config.loader import LoadedConfig, load_config, remote_parameters_path
from dcud.config.wme import CATALOGUE, Kind, ParameterSet, no_effect
from dcud.errors import ConfigError, ConfigIssue, DcudError
from dcud.runtime.durable import write_durably
from dcud.runtime.events import EventSink
from dcud.runtime.sdnotify import Notifier
from dcud.runtime.supervisor import Service
from dcud.service.commands import (
    BadRequestError,
    CommandContext,
    CommandError,
    CommandRouter,
    NotAuthorizedError,
    Request,
    envelope_context,
)
from dcud.service.crypto_envelope import EnvelopeKeys, Opened, ReplayGuard

log = structlog.get_logger("dcud.remote_config")

UPLOAD = "upload"
"""The path shown in issues that point into an uploaded file."""
MAX_PENDING_JOBS = 8
BACKUP_SUFFIX = ".bak"

Via = Literal["config-port", "mqtt", "sighup", "local"]


class ReloadBusyError(DcudError):
    """Too many configuration changes are queued, or dcud is stopping: try again later."""


class ProtectedParameterError(ConfigError):
    """An unauthenticated change would change a protected parameter: refused whole, nothing changed."""


class ParameterWriteError(DcudError):
    """The new parameter file could not be written (disk full, read-only...): nothing changed."""


class SupervisorLike(Protocol):
    """What the reloader needs of :class:`~dcud.runtime.supervisor.Supervisor`."""

    @property
    def stopping(self) -> bool:
        """True once a stop was requested."""
        ...

    async def replace(self, services: Sequence[Service]) -> list[str]:
        """Apply a new service list; returns the names that were (re)started or stopped."""
        ...


@dataclass(frozen=True)
class ApplyResult:
    """What a configuration change did (the 200 answer and the MQTT reply)."""

    changed: dict[str, dict[str, str]]
    """Changed parameter -> ``{"old": ..., "new": ...}`` in file form, secrets as ``***``."""
    restarted: list[str]
    """Services that were restarted, started or stopped."""
    file: str
    dry_run: bool = False
    no_effect: list[str] = field(default_factory=list)
    """Parameters the request sets whose support level is "accepted": validated and stored, but with
    no effect on this DCU (APN, SIM, bands... are the OS's; ``dcud params`` has each one's note)."""

    def to_json(self) -> dict[str, Any]:
        """The JSON document of the result."""
        return {
            "ok": True,
            "dry_run": self.dry_run,
            "changed": self.changed,
            "restarted": self.restarted,
            "file": self.file,
            "no_effect": self.no_effect,
        }


# -- who may change what --------------------------------------------------------------------------

_PROTECTED_PREFIXES = ("fw_server_", "ei_client_", "dm.", "snmp_")
_PROTECTED_NAMES = frozenset(
    {"tm.tls_enable", "tm.cert", "tm.ca_cert", "tm.verify", "tm.use_crl", "com_ping_host"}
)


def _is_protected(name: str) -> bool:
    return name.startswith(_PROTECTED_PREFIXES) or name in _PROTECTED_NAMES


PROTECTED_PARAMETERS: frozenset[str] = frozenset(name for name in CATALOGUE if _is_protected(name))
"""Parameters that decide who can reach or control the DCU: the config port and its key
(``fw_server_*``), the EI client's destination and password (``ei_client_*``), the transparent
ports' TLS and client verification (``tm.tls_enable``, ``tm.cert``, ``tm.ca_cert``, ``tm.verify``,
``tm.use_crl``), the device manager (``dm.*``), SNMP (``snmp_*``: the manager and the v2c
community/v3 user) and the watchdog's ping target (``com_ping_host``). They change only in an
envelope (authenticated) or in the files on the DCU, never over a plain channel."""


def protected_changes(changed: Mapping[str, object]) -> list[str]:
    """The protected parameters among ``changed`` names, sorted."""
    return sorted(name for name in changed if name in PROTECTED_PARAMETERS)


# -- text helpers ---------------------------------------------------------------------------------


def _assignment(line: str) -> tuple[str, str] | None:
    """``(name, value)`` of a ``name=value`` line as the WM-E parser reads it, else None."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#") or "=" not in line:
        return None
    name, _, value = line.partition("=")
    return name.strip(), value.strip(" \t\r")


def parse_updates(text: str) -> tuple[dict[str, str], dict[str, int], list[ConfigIssue]]:
    """The assignments of a partial upload: ``(updates, line of each, issues)``.

    Same syntax as the parameter file; ``name=`` (empty) unsets. Lines without ``=`` and names
    given twice are issues; values are checked later, in the merged file.
    """
    if text.startswith("\ufeff"):
        text = text[1:]
    updates: dict[str, str] = {}
    lines: dict[str, int] = {}
    issues: list[ConfigIssue] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pair = _assignment(line)
        if pair is None:
            issues.append(ConfigIssue(UPLOAD, lineno, "", 'expected name=value (no "=" on this line)'))
            continue
        name, value = pair
        if not name:
            issues.append(ConfigIssue(UPLOAD, lineno, "", 'missing parameter name before "="'))
        elif name in updates:
            issues.append(ConfigIssue(UPLOAD, lineno, name, f"set twice, first on line {lines[name]}"))
        else:
            updates[name] = value
            lines[name] = lineno
    return updates, lines, issues


def merge_parameter_text(old_text: str, updates: Mapping[str, str]) -> tuple[str, dict[int, str]]:
    """Apply ``updates`` to the text of a parameter file; returns the text and its updated lines.

    The first assignment of a named parameter is replaced in place (an empty value removes the line),
    later duplicates of it are dropped, names the file does not have are appended in update order;
    every other line (comments included) stays as it was. The map gives the 1-based line of each
    written update in the new text, to point issues back at the upload.
    """
    out: list[str] = []
    written: dict[int, str] = {}
    done: set[str] = set()
    lines = old_text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for line in lines:
        pair = _assignment(line)
        if pair is None or pair[0] not in updates:
            out.append(line)
            continue
        name = pair[0]
        if name in done:
            continue
        done.add(name)
        if updates[name] != "":
            out.append(f"{name}={updates[name]}")
            written[len(out)] = name
    for name, value in updates.items():
        if name not in done and value != "":
            out.append(f"{name}={value}")
            written[len(out)] = name
    return "".join(f"{line}\n" for line in out), written


def _masked_value(name: str, value: str) -> str:
    param = CATALOGUE.get(name)
    if param is None or not value:
        return value
    if param.kind is Kind.URL:
        with contextlib.suppress(ValueError):
            return param.display(param.convert(value))
        return "***"
    return "***" if param.secret else value


def mask_parameter_text(text: str) -> str:
    """The file text with the value of every secret parameter replaced by ``***`` (URL: the password)."""
    out = []
    for line in text.split("\n"):
        pair = _assignment(line)
        masked = _masked_value(*pair) if pair is not None else None
        out.append(f"{pair[0]}={masked}" if pair is not None and masked != pair[1] else line)
    return "\n".join(out)


def changed_parameters(old: ParameterSet, new: ParameterSet) -> dict[str, dict[str, str]]:
    """Every parameter whose typed value changed, ``{"old", "new"}`` in file form with secrets masked."""
    old_shown = old.masked()
    new_shown = new.masked()
    return {
        name: {"old": old_shown[name], "new": new_shown[name]}
        for name in CATALOGUE
        if name in old.changed(new)
    }


# -- the atomic write -----------------------------------------------------------------------------


def atomic_write_parameters(target: Path, new_text: str, previous_text: str | None) -> None:
    """Write ``new_text`` to ``target`` so that a crash leaves the old or the new file, never a mix.

    ``previous_text`` (the file in force before; None when there was none) is saved first as
    ``target + ".bak"`` the same way. Mode 0640: the file holds secrets.
    """
    if previous_text is not None:
        write_durably(target.with_name(target.name + BACKUP_SUFFIX), previous_text.encode(), 0o640)
    write_durably(target, new_text.encode(), 0o640)


# -- the reloader ---------------------------------------------------------------------------------


@dataclass
class _Job:
    kind: Literal["reload", "apply"]
    future: asyncio.Future[ApplyResult] | None = None
    text: str = ""
    partial: bool = False
    dry_run: bool = False
    who: str = ""
    via: Via = "local"
    authenticated: bool = False


@dataclass
class ReloadStats:
    """Counters of the reloader (for status and tests)."""

    reloads: int = 0
    applies: int = 0
    refused: int = 0
    protected_refused: int = 0
    """Unauthenticated changes refused because they touched a protected parameter."""
    busy: int = 0


@dataclass
class Reloader:
    """Serialises SIGHUP reloads and remote changes; the only place that swaps the configuration.

    ``build`` turns a configuration into the service list; ``prepare`` runs before the swap (the
    daemon reopens the outbox there when the set of uplinks changed); ``event`` commits an event.
    Call :meth:`attach` once the supervisor exists and run :meth:`run` as a helper task.
    """

    config_path: Path
    current: LoadedConfig
    build: Callable[[LoadedConfig], Sequence[Service]]
    notifier: Notifier = field(default_factory=lambda: Notifier(""))
    prepare: Callable[[LoadedConfig], Awaitable[None]] | None = None
    event: EventSink | None = None
    max_pending: int = MAX_PENDING_JOBS
    stats: ReloadStats = field(default_factory=ReloadStats)

    def __post_init__(self) -> None:
        self._supervisor: SupervisorLike | None = None
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=self.max_pending)
        self._lock = asyncio.Lock()
        self._reload_pending = False
        self._running = False

    def attach(self, supervisor: SupervisorLike) -> None:
        """Give the reloader the supervisor whose services it swaps."""
        self._supervisor = supervisor

    # -- requests ------------------------------------------------------------------------------

    def request_reload(self) -> None:
        """SIGHUP: queue one reload (several signals before it runs coalesce into one)."""
        if self._reload_pending:
            return
        try:
            self._queue.put_nowait(_Job("reload"))
        except asyncio.QueueFull:
            self.stats.busy += 1
            log.warning("reload request dropped: too many changes queued")
            return
        self._reload_pending = True

    async def apply_text(
        self,
        text: str,
        *,
        partial: bool,
        who: str,
        via: Via,
        authenticated: bool,
        dry_run: bool = False,
    ) -> ApplyResult:
        """Validate, write and apply a parameter file (``partial``: only the names it lists).

        ``authenticated``: the request came in an envelope whose tag matched. When False, a change of
        any :data:`PROTECTED_PARAMETERS` refuses the whole request (ProtectedParameterError).
        Raises ConfigError with every issue (nothing changed), or ReloadBusyError. Cancelling the caller
        does not cancel the change once queued: it completes, and its event records it.
        """
        if not self._running or (self._supervisor is not None and self._supervisor.stopping):
            raise ReloadBusyError("dcud is not accepting configuration changes now (starting or stopping)")
        future: asyncio.Future[ApplyResult] = asyncio.get_running_loop().create_future()
        job = _Job("apply", future, text, partial, dry_run, who, via, authenticated)
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.stats.busy += 1
            raise ReloadBusyError(f"{self.max_pending} configuration changes already queued") from None
        return await asyncio.shield(future)

    async def apply_updates(
        self, updates: Mapping[str, str], *, who: str, via: Via, authenticated: bool, dry_run: bool = False
    ) -> ApplyResult:
        """A partial change given as a mapping (MQTT ``param/set``); ``authenticated`` as for apply_text."""
        bad = [n for n, v in updates.items() if "\n" in n or "\n" in v or "\r" in n or "=" in n]
        if bad:
            raise ConfigError([ConfigIssue(UPLOAD, 0, n[:64], "name or value spans lines") for n in bad])
        text = "".join(f"{name}={value}\n" for name, value in updates.items())
        return await self.apply_text(
            text, partial=True, who=who, via=via, authenticated=authenticated, dry_run=dry_run
        )

    def current_text(self) -> str:
        """The text of the parameter file in force ("" when it cannot be read)."""
        try:
            return Path(self.current.params.path).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    # -- the worker ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Process jobs one at a time until cancelled."""
        self._running = True
        try:
            while True:
                job = await self._queue.get()
                if job.kind == "reload":
                    self._reload_pending = False
                try:
                    async with self._lock:
                        if job.kind == "reload":
                            await self._reload()
                        else:
                            await self._apply(job)
                except Exception as exc:  # a failed job must not end the worker
                    log.error("configuration change failed", error=repr(exc))
                    if job.future is not None and not job.future.done():
                        job.future.set_exception(exc)
        finally:
            self._running = False
            while not self._queue.empty():
                pending = self._queue.get_nowait()
                if pending.future is not None and not pending.future.done():
                    pending.future.set_exception(ReloadBusyError("dcud is stopping"))

    async def reload(self) -> list[str]:
        """Reload both files now (under the lock); returns the restarted services (tests, tools)."""
        async with self._lock:
            return await self._reload()

    async def _reload(self) -> list[str]:
        self.notifier.notify("RELOADING=1", _monotonic_usec(), "STATUS=reloading")
        try:
            new = await asyncio.to_thread(load_config, self.config_path)
        except ConfigError as exc:
            self.stats.refused += 1
            for issue in exc.issues:
                log.error("reload refused, keeping the running configuration", issue=str(issue))
            self.notifier.notify("READY=1", "STATUS=reload refused: configuration invalid")
            return []
        old = self.current
        restarted = await self._swap(new, notify=False)
        self.stats.reloads += 1
        changed = changed_parameters(old.params, new.params)
        if changed:
            await self._event(changed, who="local", via="sighup", file=new.params.path)
        return restarted

    async def _apply(self, job: _Job) -> None:
        assert job.future is not None
        if job.future.cancelled():
            return
        old = self.current
        target = remote_parameters_path(old.state_dir)
        previous = await asyncio.to_thread(_read_or_none, Path(old.params.path))
        if job.partial:
            updates, upload_lines, issues = parse_updates(job.text)
            candidate, written = merge_parameter_text(previous or "", updates)
        else:
            issues, upload_lines, written = [], {}, {}
            candidate = job.text[1:] if job.text.startswith("\ufeff") else job.text
        try:
            new = await asyncio.to_thread(load_config, self.config_path, params_text=candidate)
        except ConfigError as exc:
            issues = issues + _point_at_upload(exc.issues, old.params.path, target, written, upload_lines)
        if issues:
            self.stats.refused += 1
            log.warning("configuration change refused", via=job.via, who=job.who, issues=len(issues))
            job.future.set_exception(ConfigError(issues))
            return
        # The parameters now come from the remote file (messages and later reloads point at it).
        new = dataclasses.replace(new, params=ParameterSet(str(target), new.params.raw, new.params.lines))
        changed = changed_parameters(old.params, new.params)
        protected = [] if job.authenticated else protected_changes(changed)
        if protected:
            self.stats.refused += 1
            self.stats.protected_refused += 1
            log.warning(
                "configuration change refused: protected parameters",
                via=job.via,
                who=job.who,
                names=protected,
            )
            where = upload_lines if job.partial else _assigned_lines(candidate)
            job.future.set_exception(ProtectedParameterError([_protected_issue(n, where) for n in protected]))
            return
        # What the request sets (a partial change: the names it lists; a whole file: every assignment).
        inert = no_effect(updates if job.partial else _assigned_lines(candidate))
        if job.dry_run:
            job.future.set_result(ApplyResult(changed, [], str(target), dry_run=True, no_effect=inert))
            return
        try:
            await asyncio.to_thread(atomic_write_parameters, target, candidate, previous)
        except OSError as exc:
            log.error("parameter file not written", file=str(target), error=str(exc))
            raise ParameterWriteError(f"cannot write {target}: {exc.strerror or exc}") from exc
        log.info(
            "parameter file written",
            file=str(target),
            via=job.via,
            who=job.who,
            changed=sorted(changed),
            no_effect=inert,
        )
        restarted = await self._swap(new, notify=True)
        self.stats.applies += 1
        if changed:
            await self._event(changed, who=job.who, via=job.via, file=str(target))
        if not job.future.cancelled():
            job.future.set_result(ApplyResult(changed, restarted, str(target), no_effect=inert))

    async def _swap(self, new: LoadedConfig, *, notify: bool) -> list[str]:
        if self._supervisor is None:
            raise ReloadBusyError("no supervisor attached")
        if notify:
            self.notifier.notify("RELOADING=1", _monotonic_usec(), "STATUS=reloading")
        if self.prepare is not None:
            await self.prepare(new)
        restarted = await self._supervisor.replace(self.build(new))
        self.current = new
        log.info("reloaded", restarted=restarted)
        self.notifier.notify("READY=1", f"STATUS=reloaded; restarted: {', '.join(restarted) or 'none'}")
        return restarted

    async def _event(self, changed: dict[str, dict[str, str]], *, who: str, via: str, file: str) -> None:
        if self.event is None:
            return
        names = ", ".join(sorted(changed))
        try:
            await self.event(
                "config_changed",
                f"parameters changed by {who or 'unknown'} via {via}: {names}",
                who=who,
                via=via,
                file=file,
                changed=changed,
            )
        except Exception as exc:  # the change is made; a failed event must not undo or hide it
            log.error("config_changed event not committed", error=repr(exc))


def _monotonic_usec() -> str:
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def _read_or_none(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        return path.read_bytes().decode("utf-8", errors="replace")


def _point_at_upload(
    issues: Sequence[ConfigIssue],
    params_path: str,
    target: Path,
    written: Mapping[int, str],
    upload_lines: Mapping[str, int],
) -> list[ConfigIssue]:
    """Issues of the candidate file, pointed at the upload where they come from it."""
    out = []
    for issue in issues:
        if issue.path not in (params_path, str(target)):
            out.append(issue)  # dcud.toml, as on disk
        elif not written and not upload_lines:
            out.append(ConfigIssue(UPLOAD, issue.line, issue.key, issue.message))  # a whole upload
        elif issue.line in written:
            line = upload_lines.get(written[issue.line], 0)
            out.append(ConfigIssue(UPLOAD, line, issue.key, issue.message))
        else:
            out.append(ConfigIssue("merged file", issue.line, issue.key, issue.message))
    return out


def _assigned_lines(text: str) -> dict[str, int]:
    """Name -> line of its first assignment in a parameter file text."""
    lines: dict[str, int] = {}
    for lineno, line in enumerate(text.split("\n"), start=1):
        pair = _assignment(line)
        if pair is not None and pair[0] not in lines:
            lines[pair[0]] = lineno
    return lines


def _protected_issue(name: str, lines: Mapping[str, int]) -> ConfigIssue:
    line = lines.get(name, 0)
    how = "" if line else " (a whole file that leaves it out resets it)"
    return ConfigIssue(
        UPLOAD,
        line,
        name,
        f"protected: it decides who can reach or control the DCU and changes only in an envelope "
        f"(fw_server_key) or in the files on the DCU, never over a plain channel{how}",
    )


def issues_json(issues: Sequence[ConfigIssue]) -> list[dict[str, Any]]:
    """Issues as JSON objects (``text`` is the ``file:line: key: message`` form)."""
    return [
        {"file": i.path, "line": i.line, "key": i.key, "message": i.message, "text": str(i)} for i in issues
    ]


# -- MQTT commands --------------------------------------------------------------------------------


MQTT_SET_CONTEXT = envelope_context("param/set")
"""Envelope context of a sealed ``param/set`` request, ``MQTT param/set`` (docs/remote-config.md)."""

ParameterName = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
ParameterValue = (
    Annotated[str, msgspec.Meta(max_length=4096)] | Annotated[int, msgspec.Meta(ge=-(2**53), le=2**53)]
)


class ParamGetRequest(Request, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``param/get``: the named parameters (default: all)."""

    names: Annotated[list[ParameterName], msgspec.Meta(max_length=len(CATALOGUE))] | None = None


class ParamSetRequest(Request, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``param/set``: a partial change (``set``) or a whole file (``text``), exactly one of them."""

    set: (
        Annotated[dict[ParameterName, msgspec.Raw], msgspec.Meta(min_length=1, max_length=len(CATALOGUE))]
        | None
    ) = None
    """Name -> value (a string, or an integer); each value is checked by :func:`parameter_updates`,
    so that an error names the parameter (``$.set.ntp_interval``), which msgspec's path would not."""
    text: Annotated[str, msgspec.Meta(max_length=256 * 1024)] | None = None
    who: Annotated[str, msgspec.Meta(max_length=64)] = "mqtt"
    dry_run: bool = False


_VALUE_DECODER = msgspec.json.Decoder(ParameterValue)
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def parameter_updates(raw: Mapping[str, msgspec.Raw]) -> dict[str, str]:
    """The values of a ``param/set`` ``set`` object as file text; BadRequestError names the parameter."""
    updates: dict[str, str] = {}
    for name, value in raw.items():
        try:
            updates[name] = str(_VALUE_DECODER.decode(value))
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            where = f"$.set.{name}" if _PLAIN_NAME.match(name) else f"$.set[{json.dumps(name)}]"
            text = str(exc).split(" - at `", 1)[0]
            raise BadRequestError(f"{text} - at `{where}`", field=where) from None
    return updates


class EnvelopeSealing:
    """The router's :class:`~dcud.service.commands.Sealing` from the parameters in force.

    Keys come from ``fw_server_key`` (None when unset); replays are refused by one ReplayGuard per
    state file and window, ``<state_dir>/config_port/mqtt-replay.json`` and
    ``[config_port] replay_window_s``, shared by every sealed verb (nonces are unique across verbs).
    """

    def __init__(self, reloader: Reloader, clock_trusted: Callable[[], bool] = lambda: False) -> None:
        self._reloader = reloader
        self._clock_trusted = clock_trusted
        self._keys: tuple[str, EnvelopeKeys] | None = None
        self._guard: tuple[tuple[str, float], ReplayGuard] | None = None

    def keys(self) -> EnvelopeKeys | None:
        """The keys of the ``fw_server_key`` in force (derived once per key)."""
        text = self._reloader.current.params.get_opt_str("fw_server_key")
        if not text:
            return None
        if self._keys is None or self._keys[0] != text:
            self._keys = (text, EnvelopeKeys.from_parameter(text))
        return self._keys[1]

    def device_id(self) -> str:
        """The device_id in force (envelopes are bound to it)."""
        return self._reloader.current.device_id

    def check_replay(self, opened: Opened) -> None:
        """ReplayedEnvelopeError unless the envelope is fresh; remembers it (persisted)."""
        config = self._reloader.current
        window = config.toml.config_port.replay_window_s
        state = config.state_dir / "config_port" / "mqtt-replay.json"
        where = (str(state), window)
        if self._guard is None or self._guard[0] != where:
            self._guard = (where, ReplayGuard(window, state_path=state, clock_trusted=self._clock_trusted))
        self._guard[1].check(opened.timestamp_s, opened.nonce, time.time())


def register_param_commands(
    commands: CommandRouter, reloader: Reloader, clock_trusted: Callable[[], bool] = lambda: False
) -> None:
    """Serve ``<p>/cmd/param/get`` and ``<p>/cmd/param/set`` (docs/remote-config.md).

    ``param/get`` (:class:`ParamGetRequest`) -> ``{"values": {name: value}, "set": [...], "file": ...}``,
    secrets as ``***``. ``param/set`` (:class:`ParamSetRequest`, state-changing) -> the
    :class:`ApplyResult`, or an error reply whose message lists every issue. A plain ``param/set`` is
    refused unless ``[remote] plain_param_set = true``; protected parameters change only in an envelope
    (context ``MQTT param/set``), which is required whenever ``fw_server_key`` is set. Also installs
    :class:`EnvelopeSealing` as the router's source of envelope keys.
    """
    commands.set_sealing(EnvelopeSealing(reloader, clock_trusted))

    async def get(request: ParamGetRequest, _ctx: CommandContext) -> Mapping[str, Any]:
        params = reloader.current.params
        shown = params.masked()
        if request.names is not None:
            unknown = [n for n in request.names if n not in CATALOGUE]
            if unknown:
                listed = ", ".join(json.dumps(n) for n in unknown[:10])
                raise CommandError(f"unknown parameters: {listed}", field="$.names")
            shown = {n: shown[n] for n in request.names}
        return {"values": shown, "set": sorted(params.raw), "file": params.path}

    async def set_(request: ParamSetRequest, ctx: CommandContext) -> Mapping[str, Any]:
        if not ctx.authenticated and not reloader.current.toml.remote.plain_param_set:
            raise NotAuthorizedError(
                "plain param/set is off on this DCU: send it in an envelope (fw_server_key), or the "
                "installer sets [remote] plain_param_set = true in dcud.toml",
                field="$.envelope",
            )
        who = request.who if request.who.isprintable() and request.who else "mqtt"
        if (request.set is None) == (request.text is None):
            raise CommandError(
                'param/set needs exactly one of "set": {name: value} or "text": "<file>"', field="$"
            )
        try:
            if request.set is not None:
                updates = parameter_updates(request.set)
                result = await reloader.apply_updates(
                    updates, who=who, via="mqtt", authenticated=ctx.authenticated, dry_run=request.dry_run
                )
            else:
                assert request.text is not None
                result = await reloader.apply_text(
                    request.text,
                    partial=False,
                    who=who,
                    via="mqtt",
                    authenticated=ctx.authenticated,
                    dry_run=request.dry_run,
                )
        except ProtectedParameterError:
            raise
        except ConfigError as exc:
            raise ParamSetRefusedError(exc.issues) from None
        return result.to_json()

    commands.register("param/get", ParamGetRequest, get)
    commands.register("param/set", ParamSetRequest, set_, state_changing=True)


class ParamSetRefusedError(ConfigError):
    """``param/set`` refused: the message lists every issue (secret values are never in it)."""
