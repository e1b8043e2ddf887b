"""Report the port a test app bound, so tests never pick a port and hope it stays free.

An app started with ``--port 0 --port-file F`` binds a port the OS chooses and writes
``127.0.0.1:PORT\\n`` to F once it listens, the same format ``cluster serve --port-file``
writes (tests/helpers.py ``read_port_file`` reads both).
"""

from __future__ import annotations

import argparse
import os


def add_port_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=0, help="0: the OS chooses (the default)")
    parser.add_argument("--port-file", help="write HOST:PORT here once listening")


def report_port(address: tuple, path: str | None) -> None:
    """Write ``address`` to ``path`` atomically (a reader never sees half a line)."""
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as out:
        out.write(f"{address[0]}:{address[1]}\n")
    os.replace(tmp, path)
