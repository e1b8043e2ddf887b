"""Console-script entry point: monkey-patch first, then everything else.

gevent must patch sockets, ssl and threading before pymongo (or anything that
imports ssl or starts threads) is imported, or pymongo's monitors would block the
hub. So this module imports nothing but gevent's monkey at the top.

Ctrl-C while the program is still importing (before ``cluster serve`` puts its own
SIGINT handler in place) ends it with status 130 and no traceback, as it does later.
"""

from __future__ import annotations

from typing import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    import sys

    try:
        from gevent import monkey

        monkey.patch_all()

        import gevent

        # A KeyboardInterrupt raised while the hub runs is thrown into the main
        # greenlet (and handled below or by the command); gevent would also print it.
        hub = gevent.get_hub()
        hub.NOT_ERROR = (*hub.NOT_ERROR, KeyboardInterrupt)

        from cluster.cli import main as cli_main

        status = cli_main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        status = 130
    sys.exit(status)
