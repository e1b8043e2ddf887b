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
#: Most pipes at once (kept for reuse or in use), so that splicing holds at most
#: 2 * LIMIT descriptors of those config.connection_cap keeps in reserve; an answer
#: that finds them all in use is copied. A body that moves without waiting gives its
#: pipe back at once, so a few serve many connections.
LIMIT = 8
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

_free: list[tuple[int, int]] = []
_made = [0]  # pipes open now, free or in use


def take() -> tuple[int, int] | None:
    """An empty pipe (read end, write end), or None (no ``os.splice``, LIMIT pipes in
    use, out of descriptors): the caller copies instead."""
    if _free:
        return _free.pop()
    if not AVAILABLE or _made[0] >= LIMIT:
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
    _made[0] += 1
    return rfd, wfd


def give_back(pipe: tuple[int, int], empty: bool) -> None:
    """Return ``pipe`` for reuse if ``empty`` (everything moved out), else close it."""
    if empty:
        _free.append(pipe)
        return
    _made[0] -= 1
    os.close(pipe[0])
    os.close(pipe[1])
