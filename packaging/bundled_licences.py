"""Print the distributions of the running venv with version and licence, one line each.

Run by scripts/build_deb.sh with /opt/dcud/bin/python; the output becomes
/usr/share/doc/dcud/bundled-python-packages.txt in the package.
"""

from __future__ import annotations

import importlib.metadata as md

LICENCE_WIDTH = 60


def licence_of(dist: md.Distribution) -> str:
    """The SPDX expression, else the licence classifiers, else the first line of the License field."""
    meta = dist.metadata
    expression = meta.get("License-Expression")
    if expression:
        return str(expression)
    classifiers = [
        c.split(" :: ")[-1] for c in meta.get_all("Classifier") or [] if c.startswith("License ::")
    ]
    if classifiers:
        return ", ".join(classifiers)
    text = str(meta.get("License") or "").strip()
    if text:
        return text.splitlines()[0][:LICENCE_WIDTH]
    files = meta.get_all("License-File") or []
    return f"see {', '.join(files)} in its .dist-info" if files else "not stated"


def main() -> None:
    """Print the table, sorted by distribution name."""
    rows = sorted((str(d.metadata["Name"]).lower(), d.version, licence_of(d)) for d in md.distributions())
    for name, version, licence in rows:
        print(f"{name:<20} {version:<12} {licence}")


if __name__ == "__main__":
    main()
