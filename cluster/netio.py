"""Socket reads and writes with gevent's bookkeeping cut to the minimum.

gevent's ``sock.recv`` first tries the read and, on EAGAIN, raises, catches and waits
with a timer; ``sendall`` loops in Python around ``send``. On a proxy's hot path the
read almost always has to wait (the answer is not there yet), so waiting first and then
reading the OS socket saves a failed system call, an exception and a timer per read.
Deadlines are kept by :class:`cluster.conn.Sweeper` instead. Reads are bounded to
64 KiB: a larger ``recv`` makes the allocator map and unmap a fresh buffer for every
read (three system calls), which cost more than the rest of a small proxied request.
Only plain gevent TCP sockets take the fast path (it uses ``_sock`` and
``_read_event``, there since gevent 1.x; tests/test_websocket.py checks they still
are); anything else (TLS) goes through its own methods.
"""

from __future__ import annotations

import errno
from typing import Any

from gevent import get_hub
from gevent import socket as gsocket

_CLOSED = OSError(errno.EBADF, "socket closed")


def is_plain(sock: Any) -> bool:
    return type(sock) is gsocket.socket


def wait_recv(sock: Any, size: int) -> bytes:
    """Wait until ``sock`` is readable, then read up to ``size`` bytes (b"" at EOF)."""
    data: bytes = _read_after_wait(sock, "recv", size)
    return data


def wait_recv_into(sock: Any, view: memoryview) -> int:
    """Like :func:`wait_recv`, into ``view`` (a reused buffer: no allocation per read)."""
    got: int = _read_after_wait(sock, "recv_into", view)
    return got


def _read_after_wait(sock: Any, method: str, arg: Any) -> Any:
    if type(sock) is not gsocket.socket:
        return getattr(sock, method)(arg)
    read = getattr(sock._sock, method)
    hub = get_hub()
    while True:
        event = sock._read_event
        if event is None:
            raise _CLOSED
        hub.wait(event)
        try:
            return read(arg)
        except BlockingIOError:
            continue  # woken without data (spurious): wait again


def send_all(sock: Any, data: bytes | bytearray | memoryview) -> None:
    """``sendall`` that tries one direct send first (it nearly always takes it all)."""
    if type(sock) is not gsocket.socket:
        sock.sendall(data)
        return
    try:
        sent = sock._sock.send(data)
    except BlockingIOError:
        sent = 0
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])
