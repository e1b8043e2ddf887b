"""Console-script entry point: monkey-patch first, then everything else.

gevent must patch sockets, ssl and threading before pymongo (or anything that
imports ssl or starts threads) is imported, or pymongo's monitors would block the
hub. So this module imports nothing but gevent's monkey at the top.
"""

from __future__ import annotations

from typing import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    from gevent import monkey

    monkey.patch_all()

    import sys

    from cluster.cli import main as cli_main

    sys.exit(cli_main(sys.argv[1:] if argv is None else argv))
