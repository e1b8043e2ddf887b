"""Kernel pipes for moving a body from one socket to another with ``os.splice``.

A large answer's body goes endpoint socket -> pipe -> client socket without ever being
copied into Python: two ``splice`` calls move page references where a ``recv`` into a
new bytes object and a ``send`` out of it copy every byte twice (docs/benchmarks.md
has the figures). A pipe is taken for one body and given back once it is empty; a
pipe that may still hold bytes (an error in the middle of a body) is closed instead,
so no byte of one answer can reach another client. Linux only (``os.splice``, Python
3.10+); elsewhere :func:`take` returns None and the relay copies as before.
"""

from __future__ import annotations

import fcntl
import logging
import os

log = logging.getLogger(__name__)

#: Whether this platform can splice at all.
AVAILABLE = hasattr(os, "splice")
#: Pipe capacity asked for: a 64 KiB body in one move, whatever its pages' layout
#: (a pipe holds a number of page references, not of bytes; the default is 16).
PIPE_SIZE = 262144
#: Pipes kept for reuse (one per answer being moved at the same time).
KEEP = 16
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

_free: list[tuple[int, int]] = []


def take() -> tuple[int, int] | None:
    """An empty pipe (read end, write end), or None when none can be made (no
    ``os.splice``, or out of descriptors): the caller copies instead."""
    if _free:
        return _free.pop()
    if not AVAILABLE:
        return None
    try:
        rfd, wfd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        log.debug("no pipe for splicing (%s); copying instead", exc)
        return None
    try:
        fcntl.fcntl(wfd, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # past the user's pipe-buffer allowance: a default pipe still works
    return rfd, wfd


def give_back(pipe: tuple[int, int], empty: bool) -> None:
    """Return ``pipe`` for reuse if ``empty`` (everything moved out), else close it."""
    if empty and len(_free) < KEEP:
        _free.append(pipe)
        return
    os.close(pipe[0])
    os.close(pipe[1])
