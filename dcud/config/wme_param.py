"""One WM-E parameter, typed: its kind, its support level, and how its file text converts and displays.

:class:`Param` is one row of the WM-E8S parameter table with dcud's typing: a :class:`Kind` (what the
value looks like in ``wme.conf`` and the Python type it becomes), a :class:`Support` level, bounds and
allowed values. :meth:`Param.convert` turns file text into the typed value (one converter per kind,
with messages that never show a secret) and :meth:`Param.display` turns it back. Units are converted
once, here: minutes, hours and (into float) milliseconds become seconds, so
``ei_client_top_keepalive=10`` yields ``600`` and ``datapush_timeout=15000`` yields ``15.0``;
``minimum``/``maximum`` are in the file's unit (what the user writes), or bound the length for text kinds.

This is the typing of a single value; the catalogue of every parameter, parameter sets and the file
parser are :mod:`dcud.config.wme`, which re-exports these names.
"""

from __future__ import annotations

import datetime
import enum
import ipaddress
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias


class Support(enum.StrEnum):
    """How far dcud honours a parameter (design.md section 3)."""

    APPLIED = "applied"
    """dcud implements its meaning."""
    ACCEPTED = "accepted"
    """Validated and reported; the OS owns it on Linux, or the hardware has no such thing."""
    READ_ONLY = "read-only"
    """A status value: reported, and setting it in the file is an error."""


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


__all__ = [
    "DatedTime",
    "HexDate",
    "Kind",
    "Param",
    "ParamValue",
    "Support",
    "key_bytes",
]
