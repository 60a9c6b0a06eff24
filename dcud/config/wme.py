"""The WM-E parameter catalogue (typed), parameter sets and the WM-E parameter-file parser and renderer.

Every row of the WM-E8S parameter table (``../shared/seeds/000_c032507ce4234a0b.txt``) is a
:class:`Param` in :data:`CATALOGUE`, in seed order; the data itself lives in
:mod:`dcud.config.wme_catalogue`. Names with two spellings in the table (``ntp_address`` and
``ntp.address``...) are two distinct parameters.

File syntax (``wme.conf``)
--------------------------
- UTF-8 text (a leading byte order mark is ignored), one ``name=value`` per line, ``\\n`` or ``\\r\\n``.
- Blank lines are ignored. A line whose first non-blank character is ``#`` is a comment. A ``#``
  anywhere else is part of the value: passwords and SMS texts may contain ``#``, so there are no
  trailing comments.
- Whitespace around the name and around ``=`` is stripped, as is trailing whitespace (space, tab,
  CR) of the value; the rest of the value is kept as it is (it may contain ``=`` and ``#``). A value
  therefore cannot begin or end with a space.
- An empty value (``name=``) means unset: the parameter keeps its default.
- Names are case-sensitive and exactly as in the table.
- Errors, all reported together: a line without ``=``, an empty name, an unknown name (with a
  did-you-mean hint), a name set twice (the first one is kept in the returned set, the second is
  reported), a bad value (type, range, allowed values), a read-only status value being set, a line
  that is not UTF-8 (:func:`load_parameter_file`), and a few cross-parameter rules (colliding
  listening ports, encryption without a key, SNMP algorithms without keys, EI authentication without
  credentials). Messages never contain the value of a secret parameter.

Units are converted once, at load: minutes, hours and (into float) milliseconds become seconds, so
``ei_client_top_keepalive=10`` yields ``600`` and ``datapush_timeout=15000`` yields ``15.0``.
:class:`Param.display` turns a typed value back into the file's form. ``minimum``/``maximum`` are in
the file's unit (what the user writes), or bound the length for text kinds.

What one parameter is (:class:`Param`, :class:`Kind`, :class:`Support`, the value types and the
converter of each kind) lives in :mod:`dcud.config.wme_param` and is re-exported here; this module holds
the catalogue built from it, :class:`ParameterSet`, and reading, checking and writing ``wme.conf``.
"""

from __future__ import annotations

import difflib
import pathlib
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from dcud.config.wme_catalogue import ENTRIES
from dcud.config.wme_param import DatedTime, HexDate, Kind, Param, ParamValue, Support, key_bytes
from dcud.errors import ConfigError, ConfigIssue

__all__ = [
    "CATALOGUE",
    "DatedTime",
    "HexDate",
    "Kind",
    "Param",
    "ParamValue",
    "ParameterSet",
    "Support",
    "key_bytes",
    "load_parameter_file",
    "parse_parameter_text",
    "render_parameter_file",
    "suggest",
]


def no_effect(names: Iterable[str]) -> list[str]:
    """The names among ``names`` whose support level is "accepted": validated and stored, but with no
    effect on this DCU (the OS owns it, or there is no such hardware). Sorted, unknown names skipped.

    ``param/set``, ``PUT /config`` and ``dcud check-config`` list them instead of a silent OK.
    """
    return sorted({n for n in names if n in CATALOGUE and CATALOGUE[n].support is Support.ACCEPTED})


# -- the catalogue --------------------------------------------------------------------------------


def _build() -> Mapping[str, Param]:
    params: dict[str, Param] = {}
    for e in ENTRIES:
        if e.name in params:  # pragma: no cover - guarded by tests
            raise AssertionError(f"duplicate catalogue entry {e.name}")
        params[e.name] = Param(
            name=e.name,
            group=e.group,
            term=e.term,
            default=e.default,
            unit=e.unit,
            seed_unit=e.seed_unit,
            kind=Kind(e.kind),
            allowed=e.allowed,
            minimum=e.minimum,
            maximum=e.maximum,
            support=Support(e.support),
            secret=e.secret,
            note=e.note,
            description=e.description,
        )
    return types.MappingProxyType(params)


CATALOGUE: Mapping[str, Param] = _build()
"""Every WM-E parameter by name, in seed order."""

# Typed defaults, converted once: a default that does not convert fails at import (and in the tests).
_DEFAULTS: Mapping[str, ParamValue] = types.MappingProxyType(
    {n: (p.convert(p.default) if p.default is not None else None) for n, p in CATALOGUE.items()}
)
_LOWER_NAMES: Mapping[str, str] = {n.lower(): n for n in CATALOGUE}
_SUGGEST_CUTOFF = 0.75
_KEY_SHOWN_MAX = 64


def suggest(name: str) -> str | None:
    """The catalogue name closest to ``name`` for a "did you mean" hint, or ``None`` if none is close.

    Case is ignored; ``name`` itself (when it is a catalogue name) is never suggested.
    """
    key = name.strip().lower()[:100]
    if not key:
        return None
    exact = _LOWER_NAMES.get(key)
    if exact is not None:
        return exact if exact != name else None
    matches = difflib.get_close_matches(key, list(_LOWER_NAMES), n=1, cutoff=_SUGGEST_CUTOFF)
    return _LOWER_NAMES[matches[0]] if matches else None


# -- parameter sets -------------------------------------------------------------------------------


def _unknown_message(name: str) -> str:
    hint = suggest(name)
    return f'unknown parameter, did you mean "{hint}"?' if hint else "unknown parameter"


def _shown_key(name: str) -> str:
    shown = name if name.isprintable() else name.encode("unicode_escape").decode("ascii")
    return shown if len(shown) <= _KEY_SHOWN_MAX else shown[:_KEY_SHOWN_MAX] + "..."


@dataclass(frozen=True)
class ParameterSet:
    """The WM-E parameters of one file: what it sets, and typed values (defaults for the rest).

    ``raw`` maps the names the file sets (with a valid, non-empty value) to their text; ``lines``
    maps them to their 1-based line (0 when the value came from :meth:`with_updates`). Constructing
    one directly validates ``raw`` and raises ``ValueError`` on an unknown, read-only or bad entry.
    """

    path: str
    raw: Mapping[str, str] = field(default_factory=dict)
    lines: Mapping[str, int] = field(default_factory=dict)
    _values: Mapping[str, ParamValue] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        raw = dict(self.raw)
        values = dict(_DEFAULTS)
        for name, text in raw.items():
            param = CATALOGUE.get(name)
            if param is None:
                raise ValueError(f"{name}: {_unknown_message(name)}")
            if param.support is Support.READ_ONLY:
                raise ValueError(f"{name}: read-only status value, cannot be set")
            values[name] = param.convert(text)
        lines = {n: int(self.lines.get(n, 0)) for n in raw}
        object.__setattr__(self, "raw", types.MappingProxyType(raw))
        object.__setattr__(self, "lines", types.MappingProxyType(lines))
        object.__setattr__(self, "_values", types.MappingProxyType(values))

    def __hash__(self) -> int:
        return hash((self.path, tuple(self.raw.items()), tuple(self.lines.items())))

    @classmethod
    def defaults(cls, path: str = "") -> ParameterSet:
        """A set with nothing set: every parameter at its default."""
        return cls(path)

    def get(self, name: str) -> ParamValue:
        """The typed value of ``name``: the file's value, else the default (``KeyError`` if unknown)."""
        if name not in CATALOGUE:
            raise KeyError(name)
        return self._values[name]

    def get_int(self, name: str) -> int:
        """The value as ``int``; ``TypeError`` if it is unset or of another type."""
        value = self.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: value is {type(value).__name__}, not int")
        return value

    def get_float(self, name: str) -> float:
        """The value as ``float`` (ints widen); ``TypeError`` if it is unset or not a number."""
        value = self.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name}: value is {type(value).__name__}, not a number")
        return float(value)

    def get_str(self, name: str) -> str:
        """The value as ``str``; ``TypeError`` if it is unset or of another type."""
        value = self.get(name)
        if not isinstance(value, str):
            raise TypeError(f"{name}: value is {type(value).__name__}, not str")
        return value

    def get_bool(self, name: str) -> bool:
        """The value of a checkbox; an unset checkbox without default (``snmp_trap``) is ``False``."""
        value = self.get(name)
        if value is None and CATALOGUE[name].kind is Kind.CHECKBOX:
            return False
        if not isinstance(value, bool):
            raise TypeError(f"{name}: value is {type(value).__name__}, not bool")
        return value

    def get_opt_int(self, name: str) -> int | None:
        """The value as ``int``, or ``None`` when unset without default."""
        return None if self.get(name) is None else self.get_int(name)

    def get_opt_str(self, name: str) -> str | None:
        """The value as ``str``, or ``None`` when unset without default."""
        return None if self.get(name) is None else self.get_str(name)

    def is_set(self, name: str) -> bool:
        """Whether the file sets ``name`` (``KeyError`` if unknown)."""
        if name not in CATALOGUE:
            raise KeyError(name)
        return name in self.raw

    def masked(self) -> dict[str, str]:
        """Every catalogue name to the file form of its current value, secrets as ``***``."""
        return {name: param.display(self._values[name]) for name, param in CATALOGUE.items()}

    def changed(self, other: ParameterSet) -> set[str]:
        """Names whose typed value differs between this set and ``other``."""
        return {name for name in CATALOGUE if self._values[name] != other._values[name]}

    def with_updates(self, updates: Mapping[str, str]) -> tuple[ParameterSet, list[ConfigIssue]]:
        """A copy with ``updates`` (name -> file text) applied, and the issues found.

        Values are stripped like file values; an empty value unsets. Invalid updates are left out
        and reported (line 0); valid ones are applied. Callers that need all-or-nothing (remote
        config) keep the old set when the issue list is not empty.
        """
        raw = dict(self.raw)
        lines = dict(self.lines)
        issues: list[ConfigIssue] = []
        for name, text in updates.items():
            value = text.strip(" \t\r")
            issue = _check(self.path, 0, name, value)
            if issue is not None:
                issues.append(issue)
            elif value == "":
                raw.pop(name, None)
                lines.pop(name, None)
            else:
                raw[name] = value
                lines[name] = 0
        result = ParameterSet(self.path, raw, lines)
        issues.extend(_cross_check(result))
        return result, issues


def _check(path: str, line: int, name: str, value: str) -> ConfigIssue | None:
    """The issue with one assignment, or ``None`` when it is fine (an empty value is fine)."""
    param = CATALOGUE.get(name)
    if param is None:
        return ConfigIssue(path, line, _shown_key(name), _unknown_message(name))
    if value == "":
        return None
    if param.support is Support.READ_ONLY:
        return ConfigIssue(path, line, name, "read-only status value, cannot be set")
    try:
        param.convert(value)
    except ValueError as exc:
        return ConfigIssue(path, line, name, str(exc))
    return None


def _cross_check(ps: ParameterSet) -> list[ConfigIssue]:
    """Rules that span parameters; each issue points at the explicitly set parameter involved."""
    issues: list[ConfigIssue] = []

    def report(names: tuple[str, ...], message: str) -> None:
        set_names = [n for n in names if ps.is_set(n)]
        if not set_names:
            return  # defaults never conflict with each other
        name = max(set_names, key=lambda n: ps.lines.get(n, 0))
        issues.append(ConfigIssue(ps.path, ps.lines.get(name, 0), name, message))

    ports = ("tm_server_port", "fw_server_port", "tm2.port")
    for i, a in enumerate(ports):
        for b in ports[i + 1 :]:
            involved = [n for n in (a, b) if ps.is_set(n)]
            if involved and ps.get(a) == ps.get(b):
                name = max(involved, key=lambda n: ps.lines.get(n, 0))
                other = b if name == a else a
                issues.append(
                    ConfigIssue(
                        ps.path, ps.lines.get(name, 0), name, f"port {ps.get(name)} is also used by {other}"
                    )
                )
    if ps.get_bool("fw_server_encrypt") and ps.get("fw_server_key") is None:
        report(("fw_server_encrypt",), "encryption needs fw_server_key")
    if ps.get("snmp_version") == 3:
        if ps.get("snmp_auth_algo") != 0 and ps.get("snmp_auth_key") is None:
            report(("snmp_auth_algo",), "an authentication algorithm needs snmp_auth_key")
        if ps.get("snmp_priv_algo") != 0:
            if ps.get("snmp_priv_key") is None:
                report(("snmp_priv_algo",), "a privacy algorithm needs snmp_priv_key")
            if ps.get("snmp_auth_algo") == 0:
                report(("snmp_priv_algo", "snmp_auth_algo"), "privacy needs an authentication algorithm")
    if ps.get("ei_client_auth_mode") == "E":
        missing = [n for n in ("ei_client_type", "ei_client_pass") if ps.get(n) is None]
        if missing:
            report(("ei_client_auth_mode",), f"authentication E needs {' and '.join(missing)}")
    return issues


def parse_parameter_text(text: str, path: str) -> tuple[ParameterSet, list[ConfigIssue]]:
    """Parse WM-E parameter-file text; never raises for bad content, reports every issue.

    The returned set holds the valid assignments (for a duplicate, the first); the issues are in
    line order.
    """
    if text.startswith("\ufeff"):
        text = text[1:]
    issues: list[ConfigIssue] = []
    raw: dict[str, str] = {}
    lines: dict[str, int] = {}
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.split("\n"), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if "=" not in line:
            issues.append(ConfigIssue(path, lineno, "", 'expected name=value (no "=" on this line)'))
            continue
        name, _, value = line.partition("=")
        name = name.strip()
        value = value.strip(" \t\r")
        if not name:
            issues.append(ConfigIssue(path, lineno, "", 'missing parameter name before "="'))
            continue
        if name in CATALOGUE and name in seen:
            issues.append(ConfigIssue(path, lineno, name, f"set twice, first on line {seen[name]}"))
            continue
        issue = _check(path, lineno, name, value)
        if name in CATALOGUE:
            seen[name] = lineno
        if issue is not None:
            issues.append(issue)
        elif value:
            raw[name] = value
            lines[name] = lineno
    ps = ParameterSet(path, raw, lines)
    issues.extend(_cross_check(ps))
    issues.sort(key=lambda i: i.line)
    return ps, issues


def _decode(data: bytes, path: str) -> tuple[str, list[ConfigIssue]]:
    """UTF-8 text of ``data`` line by line; undecodable lines become empty and are reported."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    issues: list[ConfigIssue] = []
    out: list[str] = []
    for lineno, chunk in enumerate(data.split(b"\n"), start=1):
        try:
            out.append(chunk.decode("utf-8"))
        except UnicodeDecodeError as exc:
            issues.append(
                ConfigIssue(
                    path,
                    lineno,
                    "",
                    f"not valid UTF-8 (byte 0x{chunk[exc.start]:02X} at column {exc.start + 1}), "
                    "line ignored",
                )
            )
            out.append("")
    return "\n".join(out), issues


def load_parameter_file(path: pathlib.Path) -> ParameterSet:
    """Read and parse a WM-E parameter file; ``ConfigError`` with every issue if anything is wrong.

    A missing or unreadable file is one issue (line 0).
    """
    where = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError.single(where, 0, "", "file not found") from None
    except OSError as exc:
        raise ConfigError.single(where, 0, "", f"cannot read: {exc.strerror or exc}") from exc
    text, issues = _decode(data, where)
    ps, parse_issues = parse_parameter_text(text, where)
    issues.extend(parse_issues)
    if issues:
        raise ConfigError(sorted(issues, key=lambda i: i.line))
    return ps


def render_parameter_file(ps: ParameterSet) -> str:
    """``name=value`` lines of the names ``ps`` sets, in catalogue order (parses back to ``ps``)."""
    return "".join(f"{name}={ps.raw[name]}\n" for name in CATALOGUE if name in ps.raw)
