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

A connection read over and over (a front-door client, a pooled endpoint connection)
waits through a :class:`Reader`, which leaves the socket's read watcher running
between waits: gevent starts and stops it around every wait, and each restart costs a
failing ``epoll_ctl`` (libev re-adds a descriptor the kernel still holds).
"""

from __future__ import annotations

import errno
import socket
import struct
from time import monotonic
from typing import Any, Callable

import gevent
from gevent import get_hub, sleep
from gevent import socket as gsocket
from greenlet import getcurrent

_CLOSED = OSError(errno.EBADF, "socket closed")


def let_others_run() -> None:
    """Wait for the event loop's next turn, in which it polls I/O: for a greenlet in a
    long stretch of work (a big message), so the process's other connections are
    served in between. ``sleep(0)`` may resume before any I/O is polled (gevent runs
    the callbacks it adds in the same turn); ``idle()`` may wait without end on a busy
    process; a timer, however short, fires after the next poll."""
    sleep(1e-6)


#: Longest a greenlet moving one client's bytes without waiting (a body or a pipeline
#: sent faster than it is handled: a read and a send that never block) runs before it
#: lets the process's other connections have a turn. Without it, one client uploading
#: a body of 1-byte chunks held every other client of the process for the whole body.
SLICE = 0.005


class Turns:
    """Gives the other greenlets a turn once :data:`SLICE` has passed since the last
    one (or since :meth:`restart`): one clock read per call, a turn at most every
    SLICE seconds. A wait for I/O in between already let the others run; an extra
    turn after one costs a pass of the event loop."""

    __slots__ = ("since",)

    def __init__(self) -> None:
        self.since = monotonic()

    def restart(self) -> None:
        self.since = monotonic()

    def check(self) -> None:
        if monotonic() - self.since >= SLICE:
            let_others_run()
            self.since = monotonic()


#: how long a peer may go on sending after our last answer before its connection is
#: closed anyway
LINGER_SECONDS = 5.0


def linger(sock: Any, read: Callable[[int], bytes], seconds: float = LINGER_SECONDS) -> None:
    """After a last answer the peer may not have waited for: end our side (FIN), then
    read and drop what it still sends (the rest of a body we did not want, a
    WebSocket's last frames) until it closes too or ``seconds`` pass. A socket closed
    with bytes unread sends a reset instead, and the reset can overtake the answer:
    Python's http.client, still uploading, reports "connection reset by peer" rather
    than the 503, and node's ws, still sending, 1006 rather than the close code
    (RFC 9112 9.6: a server that closes SHOULD close lingering)."""
    try:
        sock.shutdown(socket.SHUT_WR)
        with gevent.Timeout(seconds, False):
            while read(65536):
                pass
    except OSError:
        pass


def reset_on_close(sock: Any) -> None:
    """Make the close of ``sock`` send a reset instead of a FIN (SO_LINGER 0): a body
    that ends at the close and was cut short must not look complete to the client."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


def is_plain(sock: Any) -> bool:
    return type(sock) is gsocket.socket


def wait_recv(sock: Any, size: int) -> bytes:
    """Wait until ``sock`` is readable, then read up to ``size`` bytes (b"" at EOF)."""
    if type(sock) is not gsocket.socket:
        return sock.recv(size)  # type: ignore[no-any-return]
    hub = get_hub()
    while True:
        event = sock._read_event
        if event is None:
            raise _CLOSED
        hub.wait(event)
        try:
            return sock._sock.recv(size)  # type: ignore[no-any-return]
        except BlockingIOError:
            continue  # woken without data (spurious): wait again


class Reader:
    """Waits for one socket to be readable, then reads it, keeping its read watcher
    running from one wait to the next.

    While nobody waits, a watcher that fires (bytes or EOF the reader did not ask for
    yet: a pooled connection the endpoint closed, a pipelined request) stops itself
    until the next wait, so the loop never spins on it. It is gevent's own watcher of
    the socket, so closing the socket still wakes the waiting greenlet with an error
    (gevent's ``cancel_wait`` calls :meth:`throw`), as the sweeper needs. One greenlet
    reads through it at a time; nothing may read the socket with gevent's own
    ``recv`` while it is armed (gevent refuses two waiters on one watcher): hand the
    socket over with :meth:`disarm` first.
    """

    __slots__ = ("sock", "hub", "waiting")

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.hub = get_hub()
        self.waiting: Any = None  # the greenlet in wait(), if any

    def recv(self, size: int) -> bytes:
        """Wait until readable, then read up to ``size`` bytes (b"" at EOF)."""
        sock = self.sock
        if type(sock) is not gsocket.socket:
            return sock.recv(size)  # type: ignore[no-any-return]
        while True:
            self.wait()
            try:
                return sock._sock.recv(size)  # type: ignore[no-any-return]
            except BlockingIOError:
                continue  # woken without data (spurious): wait again

    def recv_into(self, view: memoryview) -> int:
        """Like :meth:`recv`, into ``view``."""
        sock = self.sock
        if type(sock) is not gsocket.socket:
            return sock.recv_into(view)  # type: ignore[no-any-return]
        while True:
            self.wait()
            try:
                return sock._sock.recv_into(view)  # type: ignore[no-any-return]
            except BlockingIOError:
                continue

    def wait(self) -> None:
        """Until the socket is readable (a plain gevent socket); OSError once closed."""
        event = self.sock._read_event
        if event is None:
            raise _CLOSED
        if not event.active:
            event.start(self._fired)
        self.waiting = getcurrent()
        try:
            self.hub.switch()
        finally:
            self.waiting = None

    def _fired(self) -> None:
        waiting = self.waiting
        if waiting is not None:
            waiting.switch()
            return
        event = self.sock._read_event
        if event is not None:
            event.stop()

    def throw(self, *args: Any) -> None:
        """gevent's ``cancel_wait`` when the socket is closed: raise in the waiter."""
        waiting = self.waiting
        if waiting is not None:
            waiting.throw(*args)

    def disarm(self) -> None:
        """Stop the watcher, before something else reads the socket its own way."""
        event = getattr(self.sock, "_read_event", None)
        if event is not None and self.waiting is None and \
                getattr(event.callback, "__self__", None) is self:
            event.stop()


def wait_writable(sock: Any) -> None:
    """Until a plain gevent socket can take more bytes; OSError once it is closed
    (closing it wakes the waiter, as for reads: the sweeper relies on that)."""
    event = sock._write_event
    if event is None:
        raise _CLOSED
    get_hub().wait(event)


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
