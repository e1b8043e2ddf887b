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

A stop (:meth:`Tunnel.going_away`) is the one time the tunnel speaks WebSocket
itself: its close frame (1001) must reach the client between the endpoint's frames,
never inside one (the client would see a broken frame and report 1006 or 1002, not
the 1001 that asks it to reconnect). So the endpoint's side is followed frame by frame
(:class:`FrameEdge`: one comparison per read while a frame goes on, a few operations per
frame header), and a frame being relayed is finished before the close frame follows it.
The client's frames are not followed (a flood of tiny frames would cost a balancer a
Python loop per frame): the endpoint gets the client's own answer to the 1001, and from
a client that never answers, only the end of the connection.

Known weak spots: no idle timeout after the upgrade (WebSocket apps ping on their own);
TLS tunnels (the two greenlets, :func:`pump`) still end on the first EOF, and their
write timeout bounds each send of one read, not each wait for progress; their 1001
frames (door._Pumped) are sent wherever the streams are.
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


class FrameEdge:
    """Where the next frame starts in a stream of WebSocket frames, fed as it is read:
    ``left`` bytes of the current frame are still to come (0 with no ``partial``
    header: the stream is between two frames)."""

    __slots__ = ("left", "partial")

    def __init__(self) -> None:
        self.left = 0
        self.partial = b""  # the start of a frame header cut by the end of a read

    @property
    def at_edge(self) -> bool:
        return not self.left and not self.partial

    def feed(self, data: bytes) -> None:
        if self.partial:
            data = self.partial + data
            self.partial = b""
        elif len(data) <= self.left:  # the common case of a large frame: no look
            self.left -= len(data)
            return
        at, end = self.left, len(data)
        while at < end:
            if end - at < 2:
                self.partial = bytes(data[at:])
                self.left = 0
                return
            second = data[at + 1]
            size = second & 0x7F
            head = 2 + (2 if size == 126 else 8 if size == 127 else 0) + (4 if second & 0x80 else 0)
            if end - at < head:
                self.partial = bytes(data[at:])
                self.left = 0
                return
            if size == 126:
                size = int.from_bytes(data[at + 2:at + 4], "big")
            elif size == 127:
                size = int.from_bytes(data[at + 2:at + 10], "big")
            at += head + size
        self.left = at - end

    def want(self) -> int:
        """How many bytes may be read without reading past the end of the current
        frame (0: at its end already)."""
        if self.left or not self.partial:
            return self.left
        part = self.partial
        if len(part) < 2:
            return 2 - len(part)
        size = part[1] & 0x7F
        head = 2 + (2 if size == 126 else 8 if size == 127 else 0) + (4 if part[1] & 0x80 else 0)
        return head - len(part)


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
                 "moved_at", "edge", "finishing", "closed_frame")

    def __init__(self, tunnel: Tunnel, src: Any, dst: Any, loop: Any,
                 edge: FrameEdge | None = None) -> None:
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
        #: the frames of ``src`` followed (the endpoint's, towards the client), or None
        self.edge = edge
        #: going away: the frame being relayed is finished, then the close frame follows
        self.finishing = False
        #: the close frame went to ``dst``: what ``src`` still sends is read and dropped
        self.closed_frame = False

    def readable(self) -> None:
        edge = self.edge
        want = CHUNK
        if self.finishing and edge is not None:
            want = min(edge.want(), CHUNK)
            if not want:
                self.send_close()
                return
        try:
            data = self.src.recv(want)
        except BlockingIOError:
            return
        except OSError:
            self.tunnel.close()
            return
        if not data:
            self.tunnel.ended(self)
            return
        if self.closed_frame:
            return  # after the close frame nothing more may reach the client
        if edge is not None:
            edge.feed(data)
        try:
            sent = self.dst.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.tunnel.close()
            return
        if sent < len(data):
            self.park(data[sent:])
        elif self.finishing and edge is not None and edge.at_edge:
            self.send_close()

    def send_close(self) -> None:
        """Going away, between two frames of ``src``: the close frame (1001) to
        ``dst``, after what is pending; once it is out, ``dst``'s side ends (FIN) and
        ``src`` is read and dropped until it ends (so it gets no reset while its own
        close frame, the answer to the client's, is on its way)."""
        self.finishing = False
        self.closed_frame = True
        if self.pending:  # writable() sends it after the rest, then ends dst's side
            self.pending += CLOSE_TO_CLIENT
            return
        try:
            sent = self.dst.send(CLOSE_TO_CLIENT)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.tunnel.close()
            return
        if sent < len(CLOSE_TO_CLIENT):
            self.park(CLOSE_TO_CLIENT[sent:])
        else:
            self.close_sent()

    def close_sent(self) -> None:
        try:
            self.dst.shutdown(SHUT_WR)
        except OSError:
            self.tunnel.close()
            return
        if self.reader is not None:
            self.reader.start(self.readable)

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
            if self.closed_frame:
                self.close_sent()
            elif self.finishing and self.edge is not None and self.edge.at_edge:
                self.send_close()
            else:
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
                 write_timeout: float = 0.0, sent_to_a: bytes = b"") -> None:
        self.a = a
        self.b = b
        self.on_close = on_close
        self.write_timeout = write_timeout
        self.closed = False
        self.loop = get_hub().loop
        raw_a, raw_b = _raw(a), _raw(b)
        assert raw_a is not None and raw_b is not None, "use pump() for TLS sockets"
        # ``a`` is the client, ``b`` the endpoint, whose frames (the first of them
        # passed on with its 101: ``sent_to_a``) are followed for going_away()
        edge = FrameEdge()
        edge.feed(sent_to_a)
        self.ways = (_Direction(self, raw_a, raw_b, self.loop),
                     _Direction(self, raw_b, raw_a, self.loop, edge))
        self.timer: Any = None

    @staticmethod
    def supports(a: Any, b: Any) -> bool:
        return _raw(a) is not None and _raw(b) is not None

    def start(self) -> None:
        for way in self.ways:
            way.reader.start(way.readable)

    def going_away(self) -> None:
        """This instance is stopping: a WebSocket close frame with 1001 (going away)
        to the client, as soon as the endpoint's frame being relayed (if any) has gone
        through; the client reconnects, to a live instance. Its answering close frame
        goes on to the endpoint, as a client's close would; the tunnel closes once both
        ended, or HALF_CLOSED_SECONDS from now."""
        if self.closed:
            return
        up, down = self.ways
        if up.ended or down.ended or down.finishing or down.closed_frame:
            if up.ended or down.ended:
                self.close()  # a close is under way already: no frame of ours after it
            return
        if self.timer is None:
            self.timer = self.loop.timer(HALF_CLOSED_SECONDS)
            self.timer.start(self.close)
        down.finishing = True
        if down.edge is not None and down.edge.at_edge and not down.pending:
            down.send_close()
        # else the frame is finished by readable(), or writable() once what is pending
        # is out, and the close frame follows it

    @property
    def going(self) -> bool:
        """going_away() was called and the tunnel is not closed yet."""
        down = self.ways[1]
        return not self.closed and (down.finishing or down.closed_frame)

    def ended(self, way: _Direction) -> None:
        """``way``'s source sent EOF: pass it on, keep the other way going (bounded)."""
        way.ended = True
        way.reader.stop()
        try:
            way.dst.shutdown(SHUT_WR)
        except OSError:
            self.close()
            return
        if all(w.ended for w in self.ways) or (way is self.ways[0] and self.ways[1].closed_frame):
            # (going away: the client answered our close frame and ended, its close
            # frame is passed on to the endpoint, nothing more is owed to either)
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
