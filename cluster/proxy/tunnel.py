"""A transparent byte tunnel between two connected sockets (an upgraded WebSocket).

After the endpoint's ``101`` nothing is parsed: frames, fragments, ping/pong, close
codes, subprotocols and extensions pass exactly as the two ends wrote them.

Plain TCP on both sides runs as event-loop callbacks, with no greenlet at all: an idle
tunnel is two sockets and two read watchers, not two greenlet stacks (the figures are
in docs/benchmarks.md), and a message costs one ``recv`` and one ``send`` with no
switch between greenlets. A send that cannot finish parks the rest and stops reading
that direction until the other side drains it, so a slow reader is back-pressure, not
memory. TLS sockets (https endpoints) cannot be driven that way (a TLS record may need
reads to write), so they get the classic two pumping greenlets.

nginx equivalent::

    proxy_http_version 1.1;
    proxy_set_header Upgrade $http_upgrade;
    proxy_set_header Connection "upgrade";
    proxy_read_timeout 1d;   # here: no idle timeout once upgraded

A side that ends its sending (EOF) is passed on as such (``shutdown(SHUT_WR)`` of the
other socket) while the other way goes on, as nginx does for upgraded connections: a
server that closes a WebSocket first (RFC 6455 7.1.1) then reads the client's last
bytes and its close frame, and the client gets the close frame instead of a reset. The
tunnel closes once both ways ended, or HALF_CLOSED_SECONDS after the first did.

A side that takes nothing of what is sent to it for the write timeout (a client that
stopped reading) closes the tunnel: the timer for it runs only while a send is parked.

Known weak spots: no idle timeout after the upgrade (WebSocket apps ping on their own);
TLS tunnels (the two greenlets, :func:`pump`) still end on the first EOF, and their
write timeout bounds each send of one read, not each wait for progress;
the 1001 frames of :meth:`Tunnel.going_away` could land in the middle of a frame that
was being relayed at that instant (only at shutdown; the client reconnects either way).
"""

from __future__ import annotations

import logging
from socket import SHUT_WR
from typing import Any, Callable

import gevent
from gevent import get_hub
from gevent import socket as gsocket

from cluster.netio import send_all, wait_recv

log = logging.getLogger(__name__)

CHUNK = 65536
#: how long one way may stay open after the other ended
HALF_CLOSED_SECONDS = 5.0
_READ, _WRITE = 1, 2
#: WebSocket close frames with status 1001 (going away): unmasked towards the client,
#: masked (with a zero key, which leaves the payload as it is) towards the server.
CLOSE_TO_CLIENT = b"\x88\x02\x03\xe9"
CLOSE_TO_SERVER = b"\x88\x82\x00\x00\x00\x00\x03\xe9"


def _raw(sock: Any) -> Any:
    """The non-blocking OS socket under a plain gevent socket, or None (TLS, other)."""
    if type(sock) is gsocket.socket:
        return getattr(sock, "_sock", None)
    return None


def _close(sock: Any) -> None:
    try:
        sock.close()
    except OSError:
        pass


class _Direction:
    """One way of a tunnel: read ``src``, write ``dst``."""

    __slots__ = ("src", "dst", "reader", "writer", "pending", "tunnel", "ended", "stall",
                 "moved_at")

    def __init__(self, tunnel: Tunnel, src: Any, dst: Any, loop: Any) -> None:
        self.tunnel = tunnel
        self.src = src
        self.dst = dst
        self.reader = loop.io(src.fileno(), _READ)
        self.writer: Any = None
        self.pending = b""
        self.ended = False  # src sent EOF, passed on to dst
        #: runs out when ``dst`` takes nothing of ``pending`` for the write timeout;
        #: armed only while parked, so a send that does not block costs nothing more
        self.stall: Any = None
        self.moved_at = 0.0  # loop time ``dst`` last took bytes while parked

    def readable(self) -> None:
        try:
            data = self.src.recv(CHUNK)
        except BlockingIOError:
            return
        except OSError:
            self.tunnel.close()
            return
        if not data:
            self.tunnel.ended(self)
            return
        try:
            sent = self.dst.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.tunnel.close()
            return
        if sent < len(data):
            self.park(data[sent:])

    def park(self, rest: bytes) -> None:
        """``dst`` is full: keep ``rest``, stop reading until it is taken."""
        self.pending = rest
        self.reader.stop()
        loop = self.tunnel.loop
        if self.writer is None:
            self.writer = loop.io(self.dst.fileno(), _WRITE)
        self.writer.start(self.writable)
        timeout = self.tunnel.write_timeout
        if timeout:
            self.moved_at = loop.now()
            self.watch_stall(timeout)

    def watch_stall(self, seconds: float) -> None:
        if self.stall is not None:
            self.stall.close()
        self.stall = self.tunnel.loop.timer(seconds)
        self.stall.start(self.stalled)

    def stalled(self) -> None:
        """The stall timer ran out: close the tunnel if ``dst`` took nothing since it
        was armed, else wait for what is left of the timeout from the last progress."""
        if not self.pending:
            return
        timeout = self.tunnel.write_timeout
        left = self.moved_at + timeout - self.tunnel.loop.now()
        if left > 0.001:
            self.watch_stall(left)
            return
        log.info("closing a WebSocket tunnel: one side took nothing for %.1fs "
                 "(--write-timeout)", timeout)
        self.tunnel.close()

    def writable(self) -> None:
        try:
            sent = self.dst.send(self.pending)
        except BlockingIOError:
            return
        except OSError:
            self.tunnel.close()
            return
        self.pending = self.pending[sent:]
        if not self.pending:
            self.writer.stop()
            if self.stall is not None:
                self.stall.stop()
            self.reader.start(self.readable)
        elif sent:
            self.moved_at = self.tunnel.loop.now()

    def stop(self) -> None:
        for watcher in (self.reader, self.writer, self.stall):
            if watcher is not None:
                watcher.stop()
                watcher.close()
        self.reader = self.writer = self.stall = None
        self.pending = b""


class Tunnel:
    """Pumps bytes between gevent sockets ``a`` and ``b`` until both ways ended (or
    one ended HALF_CLOSED_SECONDS ago, or a socket failed, or one side took nothing of
    what was sent to it for ``write_timeout`` seconds, 0: never); then closes both and
    calls ``on_close``. Runs from the event loop: :meth:`start` returns at once."""

    __slots__ = ("a", "b", "loop", "ways", "on_close", "closed", "timer", "write_timeout")

    def __init__(self, a: Any, b: Any, on_close: Callable[[], None],
                 write_timeout: float = 0.0) -> None:
        self.a = a
        self.b = b
        self.on_close = on_close
        self.write_timeout = write_timeout
        self.closed = False
        self.loop = get_hub().loop
        raw_a, raw_b = _raw(a), _raw(b)
        assert raw_a is not None and raw_b is not None, "use pump() for TLS sockets"
        self.ways = (_Direction(self, raw_a, raw_b, self.loop),
                     _Direction(self, raw_b, raw_a, self.loop))
        self.timer: Any = None

    @staticmethod
    def supports(a: Any, b: Any) -> bool:
        return _raw(a) is not None and _raw(b) is not None

    def start(self) -> None:
        for way in self.ways:
            way.reader.start(way.readable)

    def going_away(self) -> None:
        """This instance is stopping: a WebSocket close frame with 1001 (going away)
        to each end, then close. The client reconnects, to a live instance."""
        if self.closed:
            return
        for way in self.ways:
            way.stop()
        for raw, frame in ((self.ways[0].src, CLOSE_TO_CLIENT),
                           (self.ways[1].src, CLOSE_TO_SERVER)):
            try:
                raw.send(frame)
            except OSError:
                pass
        self.close()

    def ended(self, way: _Direction) -> None:
        """``way``'s source sent EOF: pass it on, keep the other way going (bounded)."""
        way.ended = True
        way.reader.stop()
        try:
            way.dst.shutdown(SHUT_WR)
        except OSError:
            self.close()
            return
        if all(w.ended for w in self.ways):
            self.close()
        elif self.timer is None:
            self.timer = self.loop.timer(HALF_CLOSED_SECONDS)
            self.timer.start(self.close)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.stop()
            self.timer.close()
            self.timer = None
        for way in self.ways:
            way.stop()
        _close(self.a)
        _close(self.b)
        try:
            self.on_close()
        except Exception:  # noqa: BLE001 - a callback in the event loop must not raise
            log.exception("tunnel close callback failed")


class _Stalled(Exception):
    """A send to one side of a pumped tunnel took longer than the write timeout."""


def _pump(src: Any, dst: Any, write_timeout: float = 0.0) -> int:
    """Copy ``src`` to ``dst`` until either fails or ``src`` ends; close both; return bytes.

    Closing both wakes the other direction's greenlet blocked on its socket (gevent
    cancels waits on a closed socket), so one closed side ends the whole tunnel. With
    ``write_timeout``, passing on one read's worth (at most CHUNK bytes) to a ``dst``
    that takes longer than that ends it too: a client that stopped reading (the
    :class:`Tunnel`'s timer, for the sockets it cannot pump: TLS). A timer per send,
    but only on this path: the tunnels to https endpoints.
    """
    moved = 0
    fast = _plain_gevent_socket(src) and _plain_gevent_socket(dst)
    try:
        while True:
            data = _wait_and_recv(src) if fast else src.recv(CHUNK)
            if not data:
                break
            if write_timeout:
                with gevent.Timeout(write_timeout, _Stalled):
                    if fast:
                        send_all(dst, data)
                    else:
                        dst.sendall(data)
            elif fast:
                send_all(dst, data)
            else:
                dst.sendall(data)
            moved += len(data)
    except (OSError, ValueError):
        # reset, broken pipe, or the other pump closed the socket under us (gevent's
        # TLS socket says that with ValueError: "Read on closed or unwrapped SSL socket")
        pass
    except _Stalled:
        log.info("closing a WebSocket tunnel: one side took nothing for %.1fs "
                 "(--write-timeout)", write_timeout)
    finally:
        _close(src)
        _close(dst)
    return moved


def _plain_gevent_socket(sock: Any) -> bool:
    """True for gevent's own TCP socket (not TLS) with the internals the fast path uses."""
    return type(sock) is gsocket.socket and all(
        hasattr(sock, name) for name in ("_sock", "_wait", "_read_event"))


def _wait_and_recv(sock: Any) -> bytes:
    try:
        return wait_recv(sock, CHUNK)
    except OSError:
        return b""  # closed by the other direction


def pump(a: Any, b: Any, write_timeout: float = 0.0) -> None:
    """Both ways with two greenlets (TLS sockets, or a WSGI request that must block
    until the tunnel ends); returns when both are done."""
    other = gevent.spawn(_pump, a, b, write_timeout)
    try:
        _pump(b, a, write_timeout)
    finally:
        _close(a)
        _close(b)
        other.join()
