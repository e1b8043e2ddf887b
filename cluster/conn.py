"""A client connection of the front door: its socket, its read buffer, its deadline.

Reads and writes never start a timer. Each connection carries a ``deadline`` and a
``phase`` instead, and one sweeper greenlet per server (:class:`Sweeper`) closes the
connections whose deadline has passed: a slowloris head, an idle keep-alive, a client
that stopped reading, an endpoint that stopped answering. Closing a gevent socket wakes
the greenlet blocked on it with an error, so the request unwinds as after any
disconnect. A timer per read would cost more than the rest of a small proxied request's
bookkeeping; a sweep per half second costs a loop over the open connections.
"""

from __future__ import annotations

import logging
import select
import socket
import time
import weakref
from typing import Any

import gevent
from gevent.monkey import get_original

from cluster.netio import Reader, reset_on_close
from cluster.trust import peer_address

log = logging.getLogger(__name__)

RECV_SIZE = 65536
#: what says a client has closed (or reset) its connection: a FIN, a hang-up, an error
_HUNG_UP = (select.POLLHUP | select.POLLERR | select.POLLNVAL
            | getattr(select, "POLLRDHUP", 0))
#: the OS's poll(): gevent's patching hides select.poll, and poll(0) never blocks anyway
_os_poll = get_original("select", "poll")

# What a connection is waiting for; the sweeper acts on an expired deadline by phase.
NONE, HEAD, IDLE, BODY, WRITE, UPSTREAM, TUNNEL, LINGER = range(8)
PHASE_NAMES = ("none", "head", "idle", "body", "write", "upstream", "tunnel", "linger")


class ClientConn:
    """One accepted client connection."""

    __slots__ = ("sock", "raw", "peer", "address", "buf", "deadline", "phase", "upstream",
                 "timed_out", "gone", "aborted", "requests", "write_timeout", "_relay",
                 "small_answers", "reader", "idle_since", "__weakref__")

    def __init__(self, sock: Any, address: Any, write_timeout: float) -> None:
        self.sock = sock
        self.raw = sock._sock  # the OS socket, non-blocking (gevent made it so)
        self.address = address
        self.peer: str = peer_address(address[0]) if isinstance(address, tuple) else ""
        self.buf = bytearray()
        self.deadline = 0.0  # 0: none
        self.phase = NONE
        #: time.monotonic() when it last went IDLE, or was accepted
        self.idle_since = time.monotonic()
        self.upstream: Any = None  # the endpoint connection in use, for the sweeper
        self.timed_out = False  # the sweeper closed the endpoint connection
        #: the client closed its connection while waiting for an endpoint: the sweeper
        #: closed the endpoint connection (see Sweeper.left)
        self.gone = False
        self.aborted = False  # to be closed with a reset (see abort)
        self.requests = 0
        self.reader = Reader(sock)
        self.write_timeout = write_timeout
        self._relay: memoryview | None = None
        #: the last answer relayed was small (relay.py batches the sends of small ones)
        self.small_answers = True

    def relay_buffer(self) -> memoryview:
        """A buffer for moving body bytes, made once per connection that needs one."""
        if self._relay is None:
            self._relay = memoryview(bytearray(RECV_SIZE))
        return self._relay

    def release(self) -> None:
        """Free the buffers once the connection is over. The objects that served it
        refer to each other (the door's Connection and pywsgi's handler, the handler and
        gevent-websocket's socket), so they wait for the cyclic garbage collector, which
        counts objects, not bytes: a buffer holding half a 16 MiB message or a large
        body would wait with them (20 such WebSockets grew the process by 160 MB at
        every round, until a full collection)."""
        self.buf.clear()  # in place: every reference to it sees it empty
        self._relay = None

    def __repr__(self) -> str:
        return (f"<ClientConn {self.peer} {PHASE_NAMES[self.phase]} requests={self.requests}"
                f" buffered={len(self.buf)}>")

    def expect(self, phase: int, seconds: float) -> None:
        """From now on, waiting for ``phase`` for at most ``seconds`` (0: forever)."""
        self.phase = phase
        self.deadline = time.monotonic() + seconds if seconds else 0.0

    def recv(self) -> bytes:
        """Some bytes from the client; b"" at EOF. Raises OSError once closed."""
        raw = self.raw
        while True:
            try:
                return raw.recv(RECV_SIZE)  # type: ignore[no-any-return]
            except BlockingIOError:
                self.reader.wait()

    def fill(self, wait_first: bool = False) -> bool:
        """Append what arrives to ``buf``; False at EOF. ``wait_first`` when nothing is
        likely to be there yet (a keep-alive client between requests)."""
        data = self.reader.recv(RECV_SIZE) if wait_first else self.recv()
        if not data:
            return False
        self.buf += data
        return True

    def take(self, size: int) -> bytes:
        """Up to ``size`` bytes: from the buffer if it has any, else from the socket."""
        if self.buf:
            data = bytes(self.buf[:size])
            del self.buf[:size]
            return data
        data = self.recv()
        if len(data) > size:
            self.buf += data[size:]
            data = data[:size]
        return data

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``; a client that takes none of it for the write timeout
        has its connection closed (the caller sees OSError). The deadline starts only
        when a send would block, and again at each progress: a slow reader of a large
        message is not cut, one that stopped reading is."""
        try:
            sent = self.raw.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            phase, deadline = self.phase, self.deadline
            rest = memoryview(data)[sent:]
            while rest:
                self.expect(WRITE, self.write_timeout)
                rest = rest[self.sock.send(rest):]
            self.phase, self.deadline = phase, deadline

    def send_parts(self, parts: list[bytes | memoryview], flags: int = 0) -> None:
        """Send ``parts`` in order with one system call when the socket takes them all
        (no joined copy of large pieces); the rest as :meth:`send` does. ``flags``
        (MSG_MORE) apply to that one call."""
        try:
            sent = self.raw.sendmsg(parts, (), flags)
        except BlockingIOError:
            sent = 0
        for part in parts:
            size = len(part)
            if sent >= size:
                sent -= size
                continue
            self.send(memoryview(part)[sent:] if sent else part)
            sent = 0

    def abort(self) -> None:
        """Have the close that ends this connection send a reset, not a FIN: an answer
        cut short by its endpoint must not look complete. A body that ends at the close
        (an endpoint's until-close answer, or a chunked one relayed to an HTTP/1.0 client
        without its chunks) ended by a FIN is whole as far as the client can tell: curl
        and requests took a download the endpoint broke off for a good one."""
        self.aborted = True
        reset_on_close(self.raw)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Sweeper:
    """Closes connections past their deadline; one greenlet per server."""

    INTERVAL = 0.25
    #: how often the connections waiting for an endpoint are checked for a client that
    #: closed its own (one poll for all of them)
    LEFT_EVERY = 1.0

    def __init__(self) -> None:
        self.conns: weakref.WeakSet[ClientConn] = weakref.WeakSet()
        self._greenlet: Any = None
        self._left_at = 0.0
        #: what was waiting for an endpoint at the last check: connection -> request number
        self._waited: dict[ClientConn, int] = {}

    def __len__(self) -> int:
        return len(self.conns)

    def add(self, conn: ClientConn) -> None:
        self.conns.add(conn)
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)

    def discard(self, conn: ClientConn) -> None:
        self.conns.discard(conn)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None

    def _run(self) -> None:
        while True:
            gevent.sleep(self.INTERVAL)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> int:
        """Act on every expired connection; returns how many."""
        expired = [c for c in list(self.conns) if c.deadline and c.deadline <= now]
        for conn in expired:
            conn.deadline = 0.0
            try:
                self._expire(conn)
            except Exception:  # noqa: BLE001 - one bad connection must not stop the sweeps
                log.exception("closing %r", conn)
        if now >= self._left_at:
            self._left_at = now + self.LEFT_EVERY
            try:
                self.left()
            except Exception:  # noqa: BLE001 - as above
                log.exception("checking for clients that left")
        return len(expired)

    def left(self) -> int:
        """Close the endpoint connection of each request whose client closed its own
        while waiting for the endpoint's answer (a head, or the next piece of a body);
        returns how many.

        As nginx (its 499): the endpoint then stops working for nobody, a client that
        gave up and retries does not stack requests on an endpoint that is stuck, and
        neither connection is held until the read timeout (5 minutes by default). A
        client that has sent more bytes (a pipelined request) has not left. The check
        is one poll for all of them, once a LEFT_EVERY, never per request.

        Only a request already waiting at the check before is looked at (it has waited
        LEFT_EVERY at least): a client that closes its sending side once its request is
        sent (a shell script's `nc -N`) gets every quick answer, whenever the sweep
        falls, and loses only a slow one, as under nginx.
        """
        before = self._waited
        now_waiting = {c: c.requests for c in list(self.conns)
                       if c.phase == UPSTREAM and c.upstream is not None and not c.buf
                       and not c.gone}
        self._waited = now_waiting
        waiting = {c.raw.fileno(): c for c, number in now_waiting.items()
                   if before.get(c) == number}
        waiting.pop(-1, None)
        if not waiting:
            return 0
        poller = _os_poll()
        for fd in waiting:
            poller.register(fd, _HUNG_UP)
        closed = 0
        for fd, _events in poller.poll(0):
            conn = waiting[fd]
            try:
                if conn.raw.recv(1, socket.MSG_PEEK):
                    continue  # bytes before the end: a client still talking
            except BlockingIOError:
                continue
            except OSError:
                pass  # reset: gone
            if conn.phase != UPSTREAM or conn.upstream is None:
                continue
            conn.gone = True
            conn.upstream.close()  # wakes the request with an error: it ends, unanswered
            closed += 1
        return closed

    @staticmethod
    def _expire(conn: ClientConn) -> None:
        phase = conn.phase
        if phase == UPSTREAM:
            conn.timed_out = True
            if conn.upstream is not None:
                conn.upstream.close()  # wakes the request with an error: it answers 504
            return
        if phase == IDLE and _request_waiting(conn.raw):
            # The next request came as the keep-alive timeout ran out and waits unread
            # (a process too busy to have read it yet): it is served, as nginx reads
            # what arrived before it acts on its timers. Closed, its unread bytes made
            # the close a reset, a lost request to any client that does not resend
            # (Node's http.Agent and fetch, an aiohttp POST). Its reader takes it now and
            # sets the head's own deadline; this one only looks again.
            conn.deadline = time.monotonic() + Sweeper.INTERVAL
            return
        if phase == HEAD and conn.buf:
            # Part of a head arrived and the rest did not in time: say so, best effort.
            try:
                conn.raw.send(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n"
                              b"Connection: close\r\n\r\n")
            except OSError:
                pass
        log.debug("closing %r: %s timeout", conn, PHASE_NAMES[phase])
        conn.close()


def _request_waiting(raw: socket.socket) -> bool:
    """Whether bytes of a request wait unread in ``raw`` (not an EOF or an error): a
    look that cannot block."""
    try:
        return bool(raw.recv(1, socket.MSG_PEEK))
    except OSError:  # BlockingIOError (nothing there), a reset, a closed socket
        return False
