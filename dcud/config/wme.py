"""The WM-E parameter catalogue (typed) and the WM-E parameter-file parser.

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
"""

from __future__ import annotations

import datetime
import difflib
import enum
import ipaddress
import pathlib
import re
import types
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeAlias

from dcud.config.wme_catalogue import ENTRIES
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


class Support(enum.StrEnum):
    """How far dcud honours a parameter (design.md section 3)."""

    APPLIED = "applied"
    """dcud implements its meaning."""
    ACCEPTED = "accepted"
    """Validated and reported; the OS owns it on Linux, or the hardware has no such thing."""
    READ_ONLY = "read-only"
    """A status value: reported, and setting it in the file is an error."""


def no_effect(names: Iterable[str]) -> list[str]:
    """The names among ``names`` whose support level is "accepted": validated and stored, but with no
    effect on this DCU (the OS owns it, or there is no such hardware). Sorted, unknown names skipped.

    ``param/set``, ``PUT /config`` and ``dcud check-config`` list them instead of a silent OK.
    """
    return sorted({n for n in names if n in CATALOGUE and CATALOGUE[n].support is Support.ACCEPTED})


class Kind(enum.StrEnum):
    """What a parameter's value looks like in the file, and the Python type it becomes.

    ========================  ===============================================  =====================
    kind                      file form                                        typed value
    ========================  ===============================================  =====================
    ``number``                integer in ``minimum..maximum``                  ``int``
    ``port``                  integer in ``minimum..maximum`` (0 = off)        ``int``
    ``seconds``               integer seconds                                  ``int`` seconds
    ``minutes``               integer minutes                                  ``int`` seconds
    ``hours``                 integer hours                                    ``int`` seconds
    ``milliseconds``          integer milliseconds                             ``float`` seconds
    ``seconds-list``          comma-separated integer seconds, 1..32 entries   ``tuple[int, ...]``
    ``selection``             one of ``allowed`` (or a code in the range)      ``int`` if numeric,
                                                                               else ``str``
    ``bitmask``               any sum of the ``allowed`` bit values            ``int``
    ``checkbox``              ``0`` or ``1``                                   ``bool``
    ``ip``                    IPv4/IPv6 address; ``0`` = none                  ``str`` or ``None``
    ``host``                  IP address or DNS name; ``0`` = none             ``str`` or ``None``
    ``url``                   ``scheme://user:password@host:port/path``        ``str``
                              (only host required), scheme from ``allowed``
    ``phone-or-ip``           ``+`` and 3..15 digits, IP address or DNS name   ``str``
    ``text``                  printable text, length ``minimum..maximum``      ``str``
    ``password``              as text; secret                                  ``str``
    ``key``                   64 hex digits or 32 ASCII characters; secret     ``str`` (key_bytes)
    ``pin``                   4..8 digits; secret                              ``str``
    ``apn``                   APN name: letters, digits, ``.``, ``-``          ``str``
    ``iec-address``           IEC 62056-21 device address, 1..32 chars         ``str``
    ``filename-prefix``       1..32 of ``A-Z a-z 0-9 . _ -``                   ``str``
    ``list-code``             ``-1`` or comma-separated codes (dec or 0x hex)  ``str``
    ``cops``                  ``mode[,format[,operator]]`` (AT+COPS)           ``str``
    ``date-format``           ``YY``/``YYYY``, ``MM``, ``DD`` and separators   ``str``
    ``hhmm``                  ``HH:MM``                                        ``datetime.time``
    ``hexdate``               16 hex digits                                    :class:`HexDate`
    ``dated-time``            8 hex digits of date, then ``HHMMSS``            :class:`DatedTime`
    ``utc-offset``            ``[UTC]+H:MM`` / ``-H:MM``                       ``int`` seconds
    ========================  ===============================================  =====================
    """

    NUMBER = "number"
    PORT = "port"
    SECONDS = "seconds"
    MINUTES = "minutes"
    HOURS = "hours"
    MILLISECONDS = "milliseconds"
    SECONDS_LIST = "seconds-list"
    SELECTION = "selection"
    BITMASK = "bitmask"
    CHECKBOX = "checkbox"
    IP = "ip"
    HOST = "host"
    URL = "url"
    PHONE_OR_IP = "phone-or-ip"
    TEXT = "text"
    PASSWORD = "password"
    KEY = "key"
    PIN = "pin"
    APN = "apn"
    IEC_ADDRESS = "iec-address"
    FILENAME_PREFIX = "filename-prefix"
    LIST_CODE = "list-code"
    COPS = "cops"
    DATE_FORMAT = "date-format"
    HHMM = "hhmm"
    HEXDATE = "hexdate"
    DATED_TIME = "dated-time"
    UTC_OFFSET = "utc-offset"


@dataclass(frozen=True, slots=True)
class HexDate:
    """A WM-E hexadecimal date/time (``calendar_dst_begin``/``_end``): 16 hex digits, 8 octets.

    The seed gives no field layout, so dcud keeps the octets as they are: ``raw`` is the value in
    upper case, :attr:`octets` the 8 bytes, and ``FF`` octets are the "not specified" wildcard of
    the WM-E/COSEM convention (:meth:`is_wildcard`).
    """

    raw: str

    @property
    def octets(self) -> bytes:
        """The 8 bytes the hex digits stand for."""
        return bytes.fromhex(self.raw)

    def is_wildcard(self, index: int) -> bool:
        """Whether octet ``index`` is ``FF`` (not specified)."""
        return self.octets[index] == 0xFF


@dataclass(frozen=True, slots=True)
class DatedTime:
    """``snrp_connect_start``: a hex date part and a time of day, written ``DDDDDDDDHHMMSS``.

    ``date`` is the 8 hex digits in upper case (``FFFFFFFF`` = any date); ``time`` the HH:MM:SS part.
    """

    date: str
    time: datetime.time

    @property
    def any_date(self) -> bool:
        """Whether the date part is the ``FFFFFFFF`` wildcard."""
        return self.date == "FFFFFFFF"


ParamValue: TypeAlias = (
    int | float | bool | str | datetime.time | HexDate | DatedTime | tuple[int, ...] | None
)
"""A typed parameter value; ``None`` when unset and without default."""

_TEXT_MAX_DEFAULT = 255
_SECONDS_LIST_MAX = 32
_INT_RE = re.compile(r"[+-]?[0-9]{1,12}")
_HEX64_RE = re.compile(r"[0-9A-Fa-f]{64}")
_PIN_RE = re.compile(r"[0-9]{4,8}")
_PHONE_RE = re.compile(r"\+?[0-9]{3,15}")
_HHMM_RE = re.compile(r"([01]?[0-9]|2[0-3]):([0-5][0-9])")
_HEXDATE_RE = re.compile(r"[0-9A-Fa-f]{16}")
_DATED_TIME_RE = re.compile(r"([0-9A-Fa-f]{8})([01][0-9]|2[0-3])([0-5][0-9])([0-5][0-9])")
_DATED_TIME_SEED_ALIAS = "FFFFFFFFF00000"  # the seed's garbled default, read as FFFFFFFF000000
_UTC_OFFSET_RE = re.compile(r"(?:UTC|GMT)?\s*([+-]?)([0-9]{1,2})(?::([0-9]{2}))?", re.IGNORECASE)
_APN_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.\-]{0,98}[A-Za-z0-9])?")
_IEC_ADDRESS_RE = re.compile(r"[\x20-\x7e]{1,32}")
_FILENAME_PREFIX_RE = re.compile(r"[A-Za-z0-9._\-]{1,32}")
_LIST_CODE_RE = re.compile(r"-1|(?:0[xX][0-9A-Fa-f]+|[0-9]+)(?:\s*,\s*(?:0[xX][0-9A-Fa-f]+|[0-9]+))*")
_COPS_RE = re.compile(r'[0-4](?:\s*,\s*[0-2](?:\s*,\s*(?:"[^"]{1,32}"|[^",]{1,32}))?)?')
_DATE_FORMAT_RE = re.compile(r"(?:YYYY|YY|MM|DD|[-./ ])+")
_DNS_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?")
_ECHO_MAX = 40


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_dns_name(text: str) -> bool:
    name = text[:-1] if text.endswith(".") else text
    if not name or len(name) > 253 or re.fullmatch(r"[0-9.]+", name):
        return False  # all digits and dots: a broken IP address, not a name
    return all(_DNS_LABEL_RE.fullmatch(label) for label in name.split("."))


def _is_host(text: str) -> bool:
    return _is_ip(text) or _is_dns_name(text)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _quote(raw: str) -> str:
    shown = raw if raw.isprintable() else raw.encode("unicode_escape").decode("ascii")
    if len(shown) > _ECHO_MAX:
        shown = shown[:_ECHO_MAX] + "..."
    return f'"{shown}"'


def key_bytes(text: str) -> bytes:
    """The 32 AES-256 key bytes of a ``key`` value: 64 hex digits, or 32 ASCII characters as they are."""
    if _HEX64_RE.fullmatch(text):
        return bytes.fromhex(text)
    if len(text) == 32 and text.isascii() and text.isprintable():
        return text.encode("ascii")
    raise ValueError("expected AES-256 key: 64 hex digits or 32 ASCII characters")


_UNIT_LABEL = {
    "seconds": "seconds",
    "minutes": "minutes",
    "hours": "hours",
    "milliseconds": "milliseconds",
    "number": "number",
    "port": "port",
}


@dataclass(frozen=True, slots=True)
class Param:
    """One WM-E parameter: the seed's facts plus dcud's typing and support decision.

    ``default`` is the text a file would hold (``None`` where the seed says ``-``); ``unit`` the unit
    of the typed value (``"s"`` for all durations), ``seed_unit`` the seed's unit text. ``allowed``
    lists the allowed file values (for ``url``: the allowed schemes; for ``bitmask``: the bits).
    ``minimum``/``maximum`` bound the file value (length for text kinds).
    """

    name: str
    group: str
    term: str
    default: str | None
    unit: str
    seed_unit: str
    kind: Kind
    allowed: tuple[str, ...] | None
    minimum: float | None
    maximum: float | None
    support: Support
    secret: bool
    note: str
    description: str

    # -- what a value must look like -------------------------------------------------------------

    def _range(self) -> str:
        lo, hi = self.minimum, self.maximum
        if lo is not None and hi is not None:
            return f"{_num(lo)}..{_num(hi)}"
        if lo is not None:
            return f">= {_num(lo)}"
        if hi is not None:
            return f"<= {_num(hi)}"
        return ""

    def _length(self) -> tuple[int, int]:
        lo = int(self.minimum) if self.minimum is not None else 1
        hi = int(self.maximum) if self.maximum is not None else _TEXT_MAX_DEFAULT
        return lo, hi

    def expected(self) -> str:
        """What a value must look like, as used in error messages (``seconds 1..86400``)."""
        k = self.kind
        if k in _UNIT_LABEL:
            label = _UNIT_LABEL[k]
            if self.allowed is not None:
                return f"{label}, one of {', '.join(self.allowed)}"
            rng = self._range()
            return f"{label} {rng}" if rng else f"{label} (integer)"
        if k is Kind.SECONDS_LIST:
            return f"comma-separated seconds {self._range()} (1..{_SECONDS_LIST_MAX} entries)"
        if k is Kind.SELECTION:
            if self.allowed is not None:
                return f"one of {', '.join(self.allowed)}"
            return f"code {self._range()}"
        if k is Kind.BITMASK:
            return f"a sum of {', '.join(self.allowed or ())}"
        if k is Kind.CHECKBOX:
            return "0 or 1"
        if k is Kind.IP:
            return "IP address (0 = none)"
        if k is Kind.HOST:
            return "IP address or DNS name (0 = none)"
        if k is Kind.URL:
            schemes = ", ".join(f"{s}://" for s in self.allowed or ())
            return (
                f"URL scheme://[user[:password]@]host[:port][/path] with scheme {schemes} "
                "(percent-encode @ : / # ? in user and password)"
            )
        if k is Kind.PHONE_OR_IP:
            return "phone number (+ and 3..15 digits), IP address or DNS name, optionally :port"
        if k in (Kind.TEXT, Kind.PASSWORD):
            lo, hi = self._length()
            return f"text of {lo}..{hi} printable characters"
        if k is Kind.KEY:
            return "AES-256 key: 64 hex digits or 32 ASCII characters"
        if k is Kind.PIN:
            return "PIN of 4..8 digits"
        if k is Kind.APN:
            return "APN name (letters, digits, '.', '-'; up to 100 characters)"
        if k is Kind.IEC_ADDRESS:
            return "IEC 62056-21 device address (1..32 printable ASCII characters, no / ? !)"
        if k is Kind.FILENAME_PREFIX:
            return "file name prefix (1..32 of A-Z a-z 0-9 . _ -)"
        if k is Kind.LIST_CODE:
            return "-1 or comma-separated codes (decimal or 0x hex)"
        if k is Kind.COPS:
            return "mode 0..4[,format 0..2[,operator]]"
        if k is Kind.DATE_FORMAT:
            return "date format of YY or YYYY, MM, DD (each once) and separators - . / space"
        if k is Kind.HHMM:
            return "time HH:MM (00:00..23:59)"
        if k is Kind.HEXDATE:
            return "16 hex digits"
        if k is Kind.DATED_TIME:
            return "8 hex digits of date then HHMMSS"
        if k is Kind.UTC_OFFSET:
            return "UTC offset +H:MM or -H:MM, -12:00..+14:00 in 15-minute steps"
        raise AssertionError(f"unhandled kind {k}")  # pragma: no cover

    def _bad(self, raw: str, detail: str = "") -> ValueError:
        message = f"expected {self.expected()}"
        if detail:
            message += f" ({detail})"
        if self.secret:
            return ValueError(f"{message}; value not shown")
        return ValueError(f"{message}, got {_quote(raw)}")

    # -- conversion --------------------------------------------------------------------------------

    def _int(self, raw: str) -> int:
        if not _INT_RE.fullmatch(raw):
            raise self._bad(raw)
        value = int(raw)
        if (
            self.allowed is not None
            and self.kind is not Kind.BITMASK
            and value not in {int(a) for a in self.allowed}
        ):
            raise self._bad(raw)
        if (self.minimum is not None and value < self.minimum) or (
            self.maximum is not None and value > self.maximum
        ):
            raise self._bad(raw)
        return value

    def convert(self, raw: str) -> ParamValue:
        """The typed value of file text ``raw`` (already stripped).

        Raises ``ValueError`` with a message like ``expected seconds 1..86400, got "ten"``; for a
        secret parameter the message says what is wrong without showing the value.
        """
        if not raw:
            raise self._bad(raw, "empty")
        if not raw.isprintable():
            raise self._bad(raw, "control characters are not allowed")
        return _CONVERTERS[self.kind](self, raw)

    # -- display -------------------------------------------------------------------------------------

    def display(self, value: ParamValue) -> str:
        """The file form of a typed value; ``***`` for secrets (only the password part of a URL)."""
        if value is None:
            return ""
        if self.kind is Kind.URL and isinstance(value, str):
            return _mask_url(value)
        if self.secret:
            return "***"
        return _file_form(self.kind, value)


def _file_form(kind: Kind, value: ParamValue) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, HexDate):
        return value.raw
    if isinstance(value, DatedTime):
        return value.date + value.time.strftime("%H%M%S")
    if isinstance(value, datetime.time):
        return value.strftime("%H:%M")
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, int | float):
        if kind is Kind.MILLISECONDS:
            return str(round(value * 1000))
        if kind is Kind.MINUTES:
            return _num(value / 60)
        if kind is Kind.HOURS:
            return _num(value / 3600)
        if kind is Kind.UTC_OFFSET:
            sign = "-" if value < 0 else "+"
            hours, minutes = divmod(abs(int(value)) // 60, 60)
            return f"{sign}{hours}:{minutes:02d}"
        return _num(value)
    return str(value)


def _mask_url(value: str) -> str:
    try:
        parts = urllib.parse.urlsplit(value)
        if parts.password is None:
            return value
    except ValueError:
        return "***"
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urllib.parse.urlunsplit((parts.scheme, f"{user}:***@{hostport}", parts.path, parts.query, ""))


# -- converters, one per kind ---------------------------------------------------------------------


def _c_int(p: Param, raw: str) -> ParamValue:
    return p._int(raw)


def _c_minutes(p: Param, raw: str) -> ParamValue:
    return p._int(raw) * 60


def _c_hours(p: Param, raw: str) -> ParamValue:
    return p._int(raw) * 3600


def _c_ms(p: Param, raw: str) -> ParamValue:
    return p._int(raw) / 1000.0


def _c_seconds_list(p: Param, raw: str) -> ParamValue:
    items = [item.strip() for item in raw.split(",")]
    if len(items) > _SECONDS_LIST_MAX:
        raise p._bad(raw, f"{len(items)} entries")
    values = []
    for item in items:
        if not _INT_RE.fullmatch(item):
            raise p._bad(raw)
        value = int(item)
        if (p.minimum is not None and value < p.minimum) or (p.maximum is not None and value > p.maximum):
            raise p._bad(raw)
        values.append(value)
    return tuple(values)


def _c_selection(p: Param, raw: str) -> ParamValue:
    if p.allowed is None or all(_INT_RE.fullmatch(a) for a in p.allowed):
        return p._int(raw)
    for allowed in p.allowed:
        if raw.casefold() == allowed.casefold():
            return allowed
    raise p._bad(raw)


def _c_bitmask(p: Param, raw: str) -> ParamValue:
    value = p._int(raw)
    mask = 0
    for bit in p.allowed or ():
        mask |= int(bit)
    if value < 0 or value & ~mask:
        raise p._bad(raw)
    return value


def _c_checkbox(p: Param, raw: str) -> ParamValue:
    if raw == "1":
        return True
    if raw == "0":
        return False
    raise p._bad(raw)


def _c_ip(p: Param, raw: str) -> ParamValue:
    if raw == "0":
        return None
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        raise p._bad(raw) from None


def _c_host(p: Param, raw: str) -> ParamValue:
    if raw == "0":
        return None
    if _is_ip(raw):
        return str(ipaddress.ip_address(raw))
    if _is_dns_name(raw):
        return raw
    raise p._bad(raw)


def _c_url(p: Param, raw: str) -> ParamValue:
    if any(ch.isspace() for ch in raw) or "#" in raw:
        raise p._bad(raw)
    try:
        parts = urllib.parse.urlsplit(raw)
        port = parts.port
    except ValueError:
        raise p._bad(raw) from None
    if parts.scheme.lower() not in (p.allowed or ()):
        raise p._bad(raw, f"scheme {parts.scheme or 'missing'!r}")
    host = parts.hostname
    if not host or not _is_host(host):
        raise p._bad(raw, "bad or missing host")
    if parts.scheme.lower() == "udp" and port is None:
        raise p._bad(raw, "udp needs a port")
    return raw


def _c_phone_or_ip(p: Param, raw: str) -> ParamValue:
    if _is_ip(raw):
        return str(ipaddress.ip_address(raw))
    if _PHONE_RE.fullmatch(raw) or _is_dns_name(raw):
        return raw
    # host:port or [v6]:port (the event push default port applies without one)
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]{1,5})|([^:\[\]]+):([0-9]{1,5})", raw)
    if match is not None:
        host = match.group(1) or match.group(3)
        port = int(match.group(2) or match.group(4))
        if 1 <= port <= 65535 and (_is_ip(host) if match.group(1) else _is_host(host)):
            return raw
    raise p._bad(raw)


def _c_text(p: Param, raw: str) -> ParamValue:
    lo, hi = p._length()
    if not lo <= len(raw) <= hi:
        raise p._bad(raw, f"{len(raw)} characters")
    return raw


def _c_key(p: Param, raw: str) -> ParamValue:
    try:
        key_bytes(raw)
    except ValueError:
        raise p._bad(raw) from None
    return raw


def _regex(pattern: re.Pattern[str]) -> Callable[[Param, str], ParamValue]:
    def convert(p: Param, raw: str) -> ParamValue:
        if not pattern.fullmatch(raw):
            raise p._bad(raw)
        return raw

    return convert


def _c_iec_address(p: Param, raw: str) -> ParamValue:
    if not _IEC_ADDRESS_RE.fullmatch(raw) or any(ch in raw for ch in "/?!"):
        raise p._bad(raw)
    return raw


def _c_date_format(p: Param, raw: str) -> ParamValue:
    if not _DATE_FORMAT_RE.fullmatch(raw):
        raise p._bad(raw)
    tokens = re.findall(r"YYYY|YY|MM|DD", raw)
    years = sum(t in ("YY", "YYYY") for t in tokens)
    if years != 1 or tokens.count("MM") != 1 or tokens.count("DD") != 1:
        raise p._bad(raw)
    return raw


def _c_hhmm(p: Param, raw: str) -> ParamValue:
    m = _HHMM_RE.fullmatch(raw)
    if not m:
        raise p._bad(raw)
    return datetime.time(int(m.group(1)), int(m.group(2)))


def _c_hexdate(p: Param, raw: str) -> ParamValue:
    if not _HEXDATE_RE.fullmatch(raw):
        raise p._bad(raw)
    return HexDate(raw.upper())


def _c_dated_time(p: Param, raw: str) -> ParamValue:
    text = "FFFFFFFF000000" if raw.upper() == _DATED_TIME_SEED_ALIAS else raw
    m = _DATED_TIME_RE.fullmatch(text)
    if not m:
        raise p._bad(raw)
    hh, mm, ss = (int(g) for g in m.group(2, 3, 4))
    return DatedTime(m.group(1).upper(), datetime.time(hh, mm, ss))


def _c_utc_offset(p: Param, raw: str) -> ParamValue:
    m = _UTC_OFFSET_RE.fullmatch(raw.strip())
    if not m:
        raise p._bad(raw)
    sign = -1 if m.group(1) == "-" else 1
    hours, minutes = int(m.group(2)), int(m.group(3) or 0)
    total = sign * (hours * 60 + minutes)
    if minutes % 15 or minutes >= 60 or not -12 * 60 <= total <= 14 * 60:
        raise p._bad(raw)
    return total * 60


_CONVERTERS: dict[Kind, Callable[[Param, str], ParamValue]] = {
    Kind.NUMBER: _c_int,
    Kind.PORT: _c_int,
    Kind.SECONDS: _c_int,
    Kind.MINUTES: _c_minutes,
    Kind.HOURS: _c_hours,
    Kind.MILLISECONDS: _c_ms,
    Kind.SECONDS_LIST: _c_seconds_list,
    Kind.SELECTION: _c_selection,
    Kind.BITMASK: _c_bitmask,
    Kind.CHECKBOX: _c_checkbox,
    Kind.IP: _c_ip,
    Kind.HOST: _c_host,
    Kind.URL: _c_url,
    Kind.PHONE_OR_IP: _c_phone_or_ip,
    Kind.TEXT: _c_text,
    Kind.PASSWORD: _c_text,
    Kind.KEY: _c_key,
    Kind.PIN: _regex(_PIN_RE),
    Kind.APN: _regex(_APN_RE),
    Kind.IEC_ADDRESS: _c_iec_address,
    Kind.FILENAME_PREFIX: _regex(_FILENAME_PREFIX_RE),
    Kind.LIST_CODE: _regex(_LIST_CODE_RE),
    Kind.COPS: _regex(_COPS_RE),
    Kind.DATE_FORMAT: _c_date_format,
    Kind.HHMM: _c_hhmm,
    Kind.HEXDATE: _c_hexdate,
    Kind.DATED_TIME: _c_dated_time,
    Kind.UTC_OFFSET: _c_utc_offset,
}


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
