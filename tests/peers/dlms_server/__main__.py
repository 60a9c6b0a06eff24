"""``python -m tests.peers.dlms_server --config peer.json``: run the DLMS/COSEM test meter."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .server import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.peers.dlms_server", description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="the peer's JSON configuration")
    sys.exit(main(parser.parse_args().config))
