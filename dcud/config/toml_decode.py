"""Field-by-field decoding of TOML data into msgspec structs, collecting every error with its line.

msgspec stops at the first error of a struct; an installer wants all of them at once, each pointing
at a line. So each field is converted on its own (with its ``Meta`` constraints), unknown keys are
listed with a "did you mean" hint, and only a clean table is built into the struct.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

from dcud.errors import ConfigIssue

T = TypeVar("T", bound=msgspec.Struct)

_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\"' -]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\"'.-]+)\s*=")


class LineLocator:
    """Maps key paths (``line[0].baud``) to 1-based line numbers of a TOML text.

    tomllib keeps no positions; this scanner understands the subset installers write (tables, arrays
    of tables, ``key = value``), which is where errors point. Unknown paths fall back to their table.
    """

    def __init__(self, text: str) -> None:
        self.lines: dict[str, int] = {}
        counters: dict[str, int] = {}
        table = ""
        for number, raw in enumerate(text.splitlines(), start=1):
            stripped = raw.strip()
            if not stripped or stripped.startswith("#"):
                continue
            header = _HEADER.match(raw)
            if header and stripped.startswith("["):
                name = header.group(2).replace('"', "").replace("'", "").strip()
                if header.group(1) == "[[":
                    index = counters.get(name, 0)
                    counters[name] = index + 1
                    table = f"{name}[{index}]"
                else:
                    parts = name.split(".")
                    # "[drive.registers]" after "[[drive]]" belongs to the last drive.
                    if parts[0] in counters and len(parts) > 1:
                        table = f"{parts[0]}[{counters[parts[0]] - 1}]." + ".".join(parts[1:])
                    else:
                        table = name
                self.lines.setdefault(table, number)
                continue
            key = _KEY.match(raw)
            if key:
                name = key.group(1).replace('"', "").replace("'", "")
                path = f"{table}.{name}" if table else name
                self.lines.setdefault(path, number)

    def line_of(self, path: str) -> int:
        """Best line for ``path``: the key itself, else the nearest enclosing table, else 0."""
        probe = path
        while probe:
            if probe in self.lines:
                return self.lines[probe]
            cut = max(probe.rfind("."), probe.rfind("["))
            probe = probe[:cut] if cut > 0 else ""
        return 0


def _clean_message(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    return text.split(" - at `", 1)[0].replace("`", "")


def _struct_type(tp: Any) -> type[msgspec.Struct] | None:
    """The struct class inside ``tp`` (``X``, ``X | None``), else None."""
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return tp
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        structs = [a for a in typing.get_args(tp) if isinstance(a, type) and issubclass(a, msgspec.Struct)]
        if len(structs) == 1:
            return structs[0]
    return None


def _list_struct_type(tp: Any) -> type[msgspec.Struct] | None:
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp)
        return _struct_type(inner)
    return None


def decode_table(
    cls: type[T], data: Any, keypath: str, file: str, locator: LineLocator
) -> tuple[T | None, list[ConfigIssue]]:
    """Decode ``data`` into ``cls``; returns the struct (None on error) and every issue found."""
    issues: list[ConfigIssue] = []

    def issue(path: str, message: str) -> None:
        issues.append(ConfigIssue(file, locator.line_of(path), path, message))

    if not isinstance(data, Mapping):
        issue(keypath, f"expected a table, got {type(data).__name__}")
        return None, issues
    fields = {f.encode_name: f for f in msgspec.structs.fields(cls)}
    for key in data:
        if key not in fields:
            hint = difflib.get_close_matches(key, list(fields), n=1)
            suffix = f' (did you mean "{hint[0]}"?)' if hint else ""
            issue(_join(keypath, key), f"unknown key{suffix}")
    clean: dict[str, Any] = {}
    for name, info in fields.items():
        path = _join(keypath, name)
        if name not in data:
            if info.required:
                issue(path, "required key is missing")
            continue
        value = data[name]
        struct = _struct_type(info.type)
        list_struct = _list_struct_type(info.type)
        if struct is not None and isinstance(value, Mapping):
            sub, sub_issues = decode_table(struct, value, path, file, locator)
            issues.extend(sub_issues)
            clean[name] = sub
        elif list_struct is not None and isinstance(value, list):
            items = []
            for index, element in enumerate(value):
                item, sub_issues = decode_table(list_struct, element, f"{path}[{index}]", file, locator)
                issues.extend(sub_issues)
                items.append(item)
            clean[name] = items
        else:
            try:
                clean[name] = msgspec.convert(value, info.type, strict=True)
            except msgspec.ValidationError as exc:
                issue(path, f"{_clean_message(exc)}, {_shown(name, value)}")
    if issues:
        return None, issues
    try:
        return msgspec.convert(data, cls, strict=True), []
    except msgspec.ValidationError as exc:  # cross-field checks of the struct itself
        issue(keypath, _clean_message(exc))
        return None, issues


def _join(keypath: str, key: str) -> str:
    return f"{keypath}.{key}" if keypath else key


def _shown(key: str, value: Any) -> str:
    """``got <value>`` for an error message; never the value of a secret key (``agent_community``...)."""
    from dcud.log import is_secret_key

    return "value not shown (secret)" if is_secret_key(key) else f"got {_show(value)}"


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"' if len(value) <= 40 else f'"{value[:37]}..."'
    if isinstance(value, (dict, list)):
        return "a table" if isinstance(value, dict) else "an array"
    return repr(value)
