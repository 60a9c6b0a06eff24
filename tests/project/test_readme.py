"""README.md and the docs say only what exists: links, commands, paths; the parameter table is generated.

README is the front door (at most ~400 lines, one line per docs page); docs/*.md, CONTRIBUTING.md and
SECURITY.md are the reference. Checked in all of them:

- every relative link resolves: the file, and the ``#anchor`` against the target's headings (GitHub's
  slugs);
- every ``dcud <subcommand>`` shown as a command (in code) exists in the CLI, with its ``--options``;
- every repository path shown (``scripts/...``, ``bench/...``, ``tests/...``...) exists;
- every docs page is linked from README; docs/parameters.md is what gen_params_table generates.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dcud.__main__ import build_parser
from dcud.config.wme import CATALOGUE, Support

from helpers import REPO

sys.path.insert(0, str(REPO / "scripts"))

import gen_params_table  # scripts/ is put on the path first

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, REPO / "CONTRIBUTING.md", REPO / "SECURITY.md", *DOCS]
MAX_README_LINES = 400

FENCE = re.compile(r"^\s*```")
LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
TOP_DIRS = r"(?:scripts|bench|tests|systemd|config|mibs|docs|dcud|packaging|\.ci)"
REPO_PATH = re.compile(rf"(?<![\w./~$<-]){TOP_DIRS}/[\w./@+-]*")
# `dcud` as the program: at the start of a line or code span (after `$ `, `sudo [-u user]`, `exec`, a
# path such as .venv/bin/), after a shell separator, or in ExecStart=. Elsewhere it is the user, the
# service or the project's name.
COMMAND = re.compile(
    r"(?:^|[;&|(]\s*|\bexec\s+|\$\s+|ExecStart=|\bsudo\s+(?:-\w\s+\S+\s+)*)"
    r"(?:[\w./-]*/)?dcud\s+(?P<word>[a-z][a-z0-9-]*)(?![\w])(?P<rest>.*)"
)


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _prose_and_code(text: str) -> tuple[list[str], list[str]]:
    """(lines outside code, with inline code removed; code: fenced lines and inline code spans)."""
    prose: list[str] = []
    code: list[str] = []
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            code.append(line)
        else:
            code += re.findall(r"`([^`]+)`", line)
            prose.append(re.sub(r"`[^`]*`", "", line))
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: links reduced to their text, lower case, punctuation dropped."""
    text = LINK.sub(lambda m: m.group("text"), heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a page offers (duplicate headings get -1, -2...)."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced or not (m := HEADING.match(line)):
            continue
        base = slug(m.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(path: Path) -> Iterator[tuple[str, str]]:
    """(target, context) of every link outside code on a page."""
    prose, _ = _prose_and_code(path.read_text(encoding="utf-8"))
    for line in prose:
        for m in LINK.finditer(line):
            yield m.group("target"), line.strip()


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return set(parser._option_string_actions)


def command_problem(line: str, parser: argparse.ArgumentParser) -> str | None:
    """Why ``line`` shows a dcud command that does not exist (None when it does or shows none)."""
    m = COMMAND.search(line)
    if m is None:
        return None
    commands = _subcommands(parser)
    word = m.group("word")
    if word not in commands:
        return f"`dcud {word}`: no such subcommand (dcud has {', '.join(sorted(commands))})"
    sub = commands[word]
    # Up to a shell separator (an escaped \| is a table's literal bar) or a comment.
    rest = re.split(r"(?<!\\)\||;|&&|\s#|>", m.group("rest"))[0]
    tokens = rest.split()
    nested = _subcommands(sub)
    if nested and tokens and re.fullmatch(r"[a-z][a-z0-9-]*", tokens[0]):
        if tokens[0] not in nested:
            return f"`dcud {word} {tokens[0]}`: no such command (has {', '.join(sorted(nested))})"
        sub = nested[tokens[0]]
    known = _options(sub)
    for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest):
        if option not in known:
            return f"`dcud {word}` has no option {option}"
    return None


# -- README as a front door --------------------------------------------------------------------------


def test_readme_is_a_front_door() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_README_LINES
    assert "bash scripts/demo.sh" in text and "bash scripts/test.sh" in text
    assert "git clone" in text and "Python 3.11" in text  # how to get the code, on what
    assert ".venv/bin" in text  # dcud is not on PATH after the scripts


def test_readme_links_every_docs_page() -> None:
    linked = {(README.parent / target.split("#")[0]).resolve() for target, _ in links(README)}
    missing = [_rel(page) for page in DOCS if page.resolve() not in linked]
    assert not missing, f"add one line per page to README's Documentation list: {missing}"
    for name in ("LICENSE", "CONTRIBUTING.md", "SECURITY.md", "docs/design.md"):
        assert (REPO / name).resolve() in linked, name


def test_readme_parameter_counts_match_the_catalogue() -> None:
    counts = {s: sum(p.support is s for p in CATALOGUE.values()) for s in Support}
    text = README.read_text(encoding="utf-8")
    stated = (
        f"all {len(CATALOGUE)} are known, {counts[Support.APPLIED]} applied, "
        f"{counts[Support.ACCEPTED]} accepted"
    )
    assert stated in " ".join(text.split())
    assert f"{counts[Support.READ_ONLY]} read-only" in text


def test_license_is_the_apache_2_0_text() -> None:
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert 'license = { text = "Apache-2.0" }' in (REPO / "pyproject.toml").read_text(encoding="utf-8")


# -- every page ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_relative_link_resolves(page: Path) -> None:
    problems = []
    for target, context in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (page.parent / file_part).resolve() if file_part else page
        if not resolved.exists():
            problems.append(f"{target}: no such file ({context[:80]})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{target}: no heading with anchor #{anchor} in {_rel(resolved)}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_dcud_command_shown_exists(page: Path) -> None:
    parser = build_parser()
    _, code = _prose_and_code(page.read_text(encoding="utf-8"))
    problems = [f"{why}: {line.strip()[:100]}" for line in code if (why := command_problem(line, parser))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_repository_path_shown_exists(page: Path) -> None:
    prose, code = _prose_and_code(page.read_text(encoding="utf-8"))
    candidates = [(m, True) for line in code for m in REPO_PATH.finditer(line)]
    # In prose "config/firmware port" is words, not a path: only names with a suffix count there.
    candidates += [(m, False) for line in prose for m in REPO_PATH.finditer(line)]
    problems = []
    for m, in_code in candidates:
        path = m.group(0).rstrip(".,:;)")
        after = m.string[m.end() : m.end() + 1]
        if after in ("*", "<", "{") or (not in_code and not re.search(r"\.\w+$", path)):
            continue  # a pattern (tests/test_*.py), a placeholder, or words
        if not (REPO / path).exists():
            problems.append(f"{path} does not exist: {m.string.strip()[:100]}")
    assert not problems, "\n".join(problems)


def test_full_parameter_table_is_current() -> None:
    assert (REPO / "docs" / "parameters.md").read_text(encoding="utf-8") == gen_params_table.render(), (
        "run python scripts/gen_params_table.py -o docs/parameters.md"
    )


# -- the checks themselves ---------------------------------------------------------------------------


def test_the_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    parser = build_parser()
    assert command_problem("dcud frobnicate -c x", parser) is not None
    assert command_problem("$ .venv/bin/dcud demo --durration 60", parser) is not None
    assert command_problem("dcud sim robots", parser) is not None
    assert command_problem("sudo -u dcud dcud read -c /etc/dcud.toml --meter m --via-mqtt", parser) is None
    assert command_problem("dcud scan -c FILE --line NAME [--primary\\|--secondary]", parser) is None
    assert command_problem("journalctl -u dcud -o cat | jq --arg x", parser) is None
    assert command_problem("authUser log dcud priv", parser) is None
    page = tmp_path / "page.md"
    page.write_text("# A page\n\n## Two words\n\n## Two words\n\n[x](#two-words-1) and [y](other.md#z).\n")
    assert anchors(page) == {"a-page", "two-words", "two-words-1"}
    assert slug("MQTT: `<p>/cmd/param/get` and `<p>/cmd/param/set`") == "mqtt-pcmdparamget-and-pcmdparamset"
    assert [target for target, _ in links(page)] == ["#two-words-1", "other.md#z"]
