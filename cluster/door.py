"""The front door: every client connection of a cluster member comes in here.

Per request: read the head within the limits (:mod:`cluster.http1`), decide with the
pure :func:`~cluster.routing.route`, then do one of

- relay the bytes to another instance (:mod:`cluster.proxy.relay`): no WSGI environ,
  no ``start_response``;
- run the local WSGI app through pywsgi's own handler (chunked bodies, 100-continue,
  HEAD and keep-alive as pywsgi gives them), with gevent-websocket's upgrade for a
  local WebSocket, so the app finds ``environ['wsgi.websocket']`` as under
  gevent-websocket's own handler (the 101 goes out only after routing chose the app);
- tunnel a WebSocket to another instance after its 101 (:mod:`cluster.proxy.tunnel`);
- answer itself (a short status, SockJS info, the status page).

Bounds, all settings: a whole head within ``--header-timeout``, an idle keep-alive
within ``--keepalive-timeout``, a client that stops reading, or stops in the middle of a
body or of a local WebSocket's frame, within ``--write-timeout``, head sizes (414/431),
and at most ``--max-connections`` open client connections per process, tunnelled
WebSockets included (past it the connection idle longest makes room, else a short 503
and close, so descriptors are never exhausted). nginx equivalents:
``client_header_timeout``, ``keepalive_timeout``, ``send_timeout`` and
``client_body_timeout``, ``large_client_header_buffers``, ``worker_connections``. A
client that sends faster than it is served never makes a read wait: it gets turns of at
most :data:`cluster.netio.SLICE` (the local app's reader, the relay of a streamed body)
or PIPELINE_TURN requests, then the process's other connections are served.

:class:`DoorServer` is a ``gevent.pywsgi.WSGIServer`` whose connection handler is the
door, so it plugs in wherever a WSGIServer does (gunicorn's ``server_class``).
"""

from __future__ import annotations

import errno
import logging
import os
import select as _select
import socket as _socket
import time
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterable
from urllib.parse import unquote_to_bytes

import gevent
from gevent.monkey import get_original
from gevent.pywsgi import WSGIServer, _InvalidClientInput
from geventwebsocket.handler import WebSocketHandler
from geventwebsocket.websocket import Stream, WebSocket

from cluster.app_websocket import adopt, end_websocket, run_app
from cluster.busypoll import BusyPoll, start_busy_poll
from cluster.config import host_port
from cluster.conn import (
    BODY,
    HEAD,
    IDLE,
    LINGER,
    NONE,
    RECV_SIZE,
    TUNNEL,
    ClientConn,
    Sweeper,
)
from cluster.cookies import cookie_attributes, set_cookie
from cluster.cpus import cgroup_cpu_limit
from cluster.errors import ClientLeft, RequestError, UpstreamError
from cluster.handler import (
    _NO_ACCESS_LOG,
    ClusterHandler,
    RequestHeaders,
    handshake_answer,
    set_nodelay,
)
from cluster.hop import HopMarker
from cluster.http1 import (
    HEAD_END,
    ChunkedScanner,
    ChunkError,
    Limits,
    RequestHead,
    empty_lines,
    find_head_end,
    head_only_response,
    parse_request_head,
    simple_response,
)
from cluster.load import LocalLoad
from cluster.netio import LINGER_SECONDS, Turns, is_plain, let_others_run, linger
from cluster.observe import NULL_OBSERVER, Observer, RequestRecord
from cluster.placement import LOAD_HEADER, Placement, load_field
from cluster.proxy.attempts import attempt, client_answer, replayable
from cluster.proxy.relay import Exchange, Forwarding, read_small_body, request_head
from cluster.proxy.tunnel import CLOSE_TO_CLIENT, CLOSE_TO_SERVER, Tunnel, pump
from cluster.proxy.upstream import SHED_BATCH, Pool
from cluster.rebalance import Rebalancer
from cluster.routing import (
    COOKIE_PREFIX,
    Policy,
    Proxy,
    Reply,
    RequestView,
    Serve,
    SockJSInfo,
    route,
)
from cluster.sockjs import MAX_INFO_BYTES, Fields, rewrite_info
from cluster.trust import forwarded_clients, trusted_peers

if TYPE_CHECKING:
    from cluster.admin import Response as AdminResponse

log = logging.getLogger(__name__)

# Declared here, not imported from cluster.app: under gunicorn the arbiter imports this
# module (for LocalHandler) before it sets PROMETHEUS_MULTIPROC_DIR, and cluster.app
# would pull in prometheus_client too early for the workers' metrics to be shared.
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

#: how often the door closes pooled connections nobody will reuse (see Door.tidy)
TIDY_SECONDS = 2.0
#: pipelined requests served in a row before the other connections get a turn
PIPELINE_TURN = 16
#: bytes of a refused request's line that its access log line keeps
MAX_REFUSED_LINE = 2048
_OVER_CAP = simple_response(503, b"too many connections\n", close=True)
#: connections past --max-connections that may wait (each up to REFUSED_WAIT seconds) for
#: their request before the 503: one sent before the client wrote anything answers no
#: request (ab then never finishes; Go's client logs "Unsolicited response" and fails).
#: Few, and briefly: a flood of silent connections holds no more descriptors than that.
REFUSED_WAITING = 32
REFUSED_WAIT = 0.5
_original_poll: Callable[[], Any] = get_original("select", "poll")

#: seconds a process at its --max-connections stops accepting on a listener it shares
#: with sibling processes (--workers-count N, gunicorn -w N), so that one with room
#: takes the connections; what none took by then is answered 503 as above
SHARED_CAP_PAUSE = 0.05
#: at the cap, a connection idle for at least this long (between requests, or never
#: used) is closed to admit a new one, as nginx reuses its idle connections: browsers
#: keep several idle per visitor, and a cap full of them refused every newcomer for
#: --keepalive-timeout (a flood of silent connections: for --header-timeout). Not one
#: idle for less: its client may be sending its next request right now.
RECLAIM_IDLE_AFTER = 1.0
#: seconds between searches for idle connections while none is found (one search looks
#: at every connection: a flood past the cap must not cost one per refusal)
RECLAIM_SEARCH_EVERY = 0.1
#: idle connections one search lines up to be reclaimed, the longest idle first
RECLAIM_BATCH = 32


class Door:
    """Everything the door needs to route and relay: shared by a process's servers."""

    def __init__(self, node: Any, policy: Policy, settings: Any, local_app: WSGIApp | None,
                 admin: Any, observer: Observer = NULL_OBSERVER) -> None:
        self.node = node
        self.policy = policy
        self.settings = settings
        self.local_app = local_app
        self.admin = admin
        self.observer = observer
        s = settings
        self.limits = Limits(s.max_request_line, s.max_header_line, s.max_head_size,
                             s.max_header_count)
        # Idle connections kept per endpoint: enough for every client of a busy balancer
        # to find one (nginx's "keepalive" in an upstream block).
        self.pool = Pool(s.connect_timeout, s.read_timeout, 256, timers=False)
        trusted = trusted_peers(s.trusted_proxies)
        self.forwarding = Forwarding(trusted)
        self.hop = HopMarker(s.secret, trusted)
        self.retries = s.retries
        #: the sticky cookies' attributes (--cookie-samesite)
        self.cookie_attributes = cookie_attributes(s.cookie_samesite)
        self.cap = s.connection_cap
        self.sweeper = Sweeper()
        self.active = 0
        self.websockets = 0
        #: every open WebSocket, as an object with going_away() (for a graceful stop)
        self.open_websockets: set[Any] = set()
        #: set by going_away(): a WebSocket that opens after it is closed at once
        self.stopping = False
        self._retained_for: Any = None
        #: this instance's own load, published in its record (cluster.load)
        self.load = LocalLoad()
        registrar = getattr(node, "registrar", None)
        if registrar is not None:
            registrar.load = self.load.current
        #: new sessions placed by load (cluster.placement); None: uniformly at random
        self.placement: Placement | None = None
        if getattr(s, "placement", "load") == "load":
            watcher = getattr(node, "watcher", None)
            lag = getattr(watcher, "refresh_interval", 0.5)
            self.placement = Placement(policy.self_hash if local_app is not None else None,
                                       self.load.current,
                                       read_at=lambda: getattr(watcher, "read_at", 0.0),
                                       lag=lag, max_age=2 * s.ping_interval + lag)
        #: sheds WebSockets to newcomers (--rebalance on; started by start())
        self.rebalancer: Rebalancer | None = None
        if getattr(s, "rebalance", False) and local_app is not None and policy.service \
                and policy.self_hash:
            refresh = getattr(getattr(node, "watcher", None), "refresh_interval", 0.5)
            self.rebalancer = Rebalancer(node, policy.service, policy.self_hash, self.load,
                                         s.rebalance_margin, s.rebalance_rate,
                                         settle=2 * s.ping_interval + refresh)
        self.busy_poll: BusyPoll | None = None
        self._tidier: gevent.Greenlet | None = None

    def __repr__(self) -> str:
        return (f"<Door [connections: {self.active} | websockets: {self.websockets} | "
                f"{self.pool.state()}]>")

    def start(self) -> None:
        """Start the door's own loops (tidying the pool; rebalancing and busy polling
        when they are on), in the thread whose event loop serves the door."""
        if self.rebalancer is not None:
            self.rebalancer.start()
        window = getattr(self.settings, "busy_poll_microseconds", lambda: 0)()
        self.busy_poll = start_busy_poll(window)
        if self.busy_poll is not None:
            log.info("busy polling: up to %d µs after I/O", window)
        else:
            quota = cgroup_cpu_limit()
            log.info("busy polling: off%s", f" (a CPU quota of {quota.cores:.2f} cores, "
                     f"{quota.where})" if quota is not None else "")
        self._tidier = gevent.spawn(self._tidy_forever)

    def close(self) -> None:
        if self.rebalancer is not None:
            self.rebalancer.stop()
        if self._tidier is not None:
            self._tidier.kill(block=False)
        if self.busy_poll is not None:
            self.busy_poll.stop()
        self.sweeper.stop()
        self.pool.close()

    def going_away(self) -> int:
        """Close every WebSocket with 1001 (going away), so clients reconnect to a live
        instance; returns how many. Called when this instance stops. One that opens
        later (an upgrade on a connection that was open before the stop) is closed with
        1001 as soon as it opens, not cut without a close frame when the drain ends."""
        self.stopping = True
        if self.rebalancer is not None:
            self.rebalancer.stop()
        sockets = list(self.open_websockets)
        for socket in sockets:
            try:
                socket.going_away()
            except Exception:  # noqa: BLE001 - one bad socket must not stop the others
                log.debug("closing a WebSocket failed", exc_info=True)
        return len(sockets)

    def tunnels_going(self) -> bool:
        """A tunnel this stop closes with 1001 is still finishing (Tunnel.going)."""
        return any(getattr(socket, "going", False) for socket in self.open_websockets)

    def tidy(self) -> None:
        """Close pooled connections of endpoints that left the table, and the idle ones
        their endpoint closed (every TIDY_SECONDS, from :meth:`start`)."""
        table = self.node.table
        if table is not self._retained_for:
            self._retained_for = table
            self.pool.retain(e.url for e in table.endpoints)
        self.pool.reap()

    def _tidy_forever(self) -> None:
        while True:
            gevent.sleep(TIDY_SECONDS)
            try:
                self.tidy()
            except Exception:  # noqa: BLE001 - a housekeeping loop must not die
                log.exception("tidying the endpoint connection pool failed")


class DoorServer(WSGIServer):  # type: ignore[misc]
    """A WSGIServer whose connections go through the :class:`Door`.

    ``application`` is the local app (or None for a balancer); ``handler_class`` is
    what runs it (a subclass of :class:`LocalHandler`).
    """

    def __init__(self, listener: Any, application: WSGIApp | None = None, *,
                 door: Door, shared: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("handler_class", LocalHandler)
        super().__init__(listener, application, **kwargs)
        self.door = door
        #: the listener is shared with sibling processes (see SHARED_CAP_PAUSE)
        self.shared = shared
        self._left_to_siblings = False
        self._handed_off: set[Any] = set()
        # One descriptor held in reserve: when accept() fails for want of descriptors,
        # it is given up for a moment to accept the waiting client and tell it 503,
        # instead of leaving it in the backlog (the listener would stay readable and
        # the accept loop spin) or printing gevent's traceback.
        self._spare: int | None = _open_spare()
        self._shedding_logged = 0.0
        self._refused_waiting = 0
        #: (idle since, connection) of idle connections to close at the cap (_reclaim_idle)
        self._reclaimable: list[tuple[float, ClientConn]] = []
        self._searched_at = -RECLAIM_SEARCH_EVERY

    def do_read(self) -> Any:
        door = self.door
        if self.shared and door.active >= door.cap and not self._left_to_siblings:
            # At the cap: a sibling process may have room. Without this pause the
            # process that woke first accepted a whole burst and refused past its own
            # cap while its siblings sat idle (the cap was in effect one per instance).
            self.stop_accepting()
            self._timer = self.loop.timer(SHARED_CAP_PAUSE)
            self._timer.start(self._after_pause)
            return None
        try:
            accepted = super().do_read()
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            # idle endpoint connections are a cache: they give way to a client (the
            # listener stays readable, so the next accept takes it)
            if not self.door.pool.shed(SHED_BATCH):
                self._shed_one()
            return None
        if accepted is None:
            self._left_to_siblings = False  # the backlog is empty: pause again next time
        return accepted

    def _after_pause(self) -> None:
        """Accept again; what is still waiting was left by the siblings (at their cap
        too, or busy): it is accepted, and answered 503 if this process is still full."""
        self._left_to_siblings = _readable(self.socket.fileno())
        self._start_accepting_if_started()

    def _shed_one(self) -> None:
        """Out of descriptors: answer one waiting client 503 using the spare one."""
        door = self.door
        now = time.monotonic()
        if now - self._shedding_logged > 10:
            self._shedding_logged = now
            log.warning("out of file descriptors with %d connections open: answering new "
                        "ones 503 (lower --max-connections or raise the limit)", door.active)
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
        try:
            # self.socket is the listener as gevent keeps it (a stdlib-level socket):
            # _accept() gives the new descriptor without wrapping it in a gevent socket
            fd, _ = self.socket._accept()
        except OSError:
            fd = None
        if fd is not None:
            door.observer.connection_refused()
            client = _socket.socket(fileno=fd)
            try:
                client.setblocking(False)
                client.send(_OVER_CAP)
                client.recv(RECV_SIZE)  # as in do_handle
            except OSError:
                pass
            client.close()
        self._spare = _open_spare()

    def do_handle(self, sock: Any, address: Any) -> None:
        """Count the connection as soon as it is accepted (gevent accepts up to
        ``max_accept`` at a time before any handler runs): past the cap it is answered
        503 and closed, here or, while its request is still to come, by a short-lived
        greenlet (at most REFUSED_WAITING of them) once it came."""
        door = self.door
        if door.active >= door.cap and not self._reclaim_idle():
            door.observer.connection_refused()
            if self._refused_waiting < REFUSED_WAITING and not _has_sent(sock):
                self._refused_waiting += 1
                gevent.spawn(self._refuse_once_asked, sock)
                return
            _refuse(sock)
            return
        door.active += 1
        try:
            super().do_handle(sock, address)
        except BaseException:
            door.active -= 1
            raise

    def _reclaim_idle(self) -> bool:
        """At the cap: close the connection idle longest (RECLAIM_IDLE_AFTER at least,
        see _reclaimable) to make room for a new one; False when there is none."""
        now = time.monotonic()
        if not self._reclaimable and now - self._searched_at >= RECLAIM_SEARCH_EVERY:
            self._searched_at = now
            idle = [(conn.idle_since, conn) for conn in list(self.door.sweeper.conns)
                    if _reclaimable(conn) and now - conn.idle_since >= RECLAIM_IDLE_AFTER]
            idle.sort(key=lambda pair: pair[0])
            self._reclaimable = idle[:RECLAIM_BATCH][::-1]  # popped from the end
        while self._reclaimable:
            since, conn = self._reclaimable.pop()
            if conn.idle_since == since and _reclaimable(conn) and not _has_sent(conn.sock):
                # (still waiting for the same next request, and none is waiting unread
                # in the socket of a process too busy to have read it: its handler sees
                # the close, ends and gives its place back; the descriptor is free at once)
                conn.close()
                return True
        return False

    def _refuse_once_asked(self, sock: Any) -> None:
        """The 503 for a connection past the cap, once its request came (or did not
        within REFUSED_WAIT)."""
        try:
            sock.settimeout(REFUSED_WAIT)
            sock.recv(RECV_SIZE)  # the head, an EOF, or a timeout: answered all the same
        except OSError:
            pass
        finally:
            self._refused_waiting -= 1
        _refuse(sock)

    def do_close(self, sock: Any, *args: Any) -> None:
        if sock in self._handed_off:  # a tunnel owns it now and closes it when done
            self._handed_off.discard(sock)
            return
        sock.close()

    def close(self) -> None:
        super().close()
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None

    def handle(self, sock: Any, address: Any) -> None:
        door = self.door
        set_nodelay(sock)
        conn = ClientConn(sock, address, door.settings.write_timeout)
        door.sweeper.add(conn)
        door.observer.connection_opened()
        try:
            if Connection(self, conn).serve():
                # (linger bounds itself; a drain closes it at once, as an idle one)
                conn.expect(LINGER, 0)
                linger(sock, conn.reader.recv)
        except OSError:
            pass  # the client went away, or the sweeper closed it: nothing to answer
        finally:
            door.sweeper.discard(conn)
            conn.release()
            if conn.sock not in self._handed_off:
                # (a tunnel holds its two descriptors on: it counts until it closes)
                door.active -= 1
                door.observer.connection_closed()
            if conn.upstream is not None:
                conn.upstream.close()


def _reclaimable(conn: ClientConn) -> bool:
    """Waiting for a request with nothing of it read: a keep-alive connection between
    requests, or one opened and never used (a browser's preconnect, or a silent flood),
    as the drain's close_idle_connections takes them."""
    return not conn.buf and (conn.phase == IDLE or (conn.phase == HEAD and not conn.requests))


def _readable(fd: int) -> bool:
    """Whether a listener has a connection waiting: a look that cannot block."""
    try:
        poll = _original_poll()
        poll.register(fd, _select.POLLIN)
        return any(event & _select.POLLIN for _, event in poll.poll(0))
    except (OSError, ValueError):  # closed meanwhile (a stop)
        return False


def _has_sent(sock: Any) -> bool:
    """Whether the client has sent anything (or closed) yet: a look that cannot block."""
    try:
        sock._sock.recv(1, _socket.MSG_PEEK)  # bytes, or b"" at EOF
    except BlockingIOError:
        return False
    except OSError:
        pass
    return True


def _refuse(sock: Any) -> None:
    """Answer a connection past the cap 503 and close it."""
    try:
        sock._sock.send(_OVER_CAP)
        # what came already (the head): closed unread, it would make a reset
        sock._sock.recv(RECV_SIZE)
    except OSError:
        pass
    sock.close()


def _open_spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return None


class Connection:
    """One client connection's request loop."""

    __slots__ = ("server", "door", "conn", "handler", "tunnelled", "request", "head",
                 "outcome", "fwd_host", "fwd_lines", "body", "last_raw", "last_head",
                 "last_view", "made", "refused")

    def __init__(self, server: DoorServer, conn: ClientConn) -> None:
        self.server = server
        self.door = server.door
        self.conn = conn
        self.handler: LocalHandler | None = None
        self.tunnelled = False
        self.fwd_host = b""
        self.fwd_lines: list[bytes] | None = None
        #: the last request head as received and parsed, and its view (a keep-alive
        #: client that sends the same head again gets both without a parse)
        self.last_raw = b""
        self.last_head: RequestHead | None = None
        self.last_view: RequestView | None = None
        #: the last head sent upstream: (request head, target, host:port, hop line, bytes)
        self.made: tuple[RequestHead, bytes, bytes, bytes, bytes] | None = None
        #: the head that parse_request_head refused, for record_refused
        self.refused: bytes | None = None

    def serve(self) -> bool:
        """Answer requests until the connection is to end. True when the client may
        still be sending (a refused head, a body the answer did not wait for, requests
        pipelined behind the last): the caller closes lingering."""
        door = self.door
        conn = self.conn
        settings = door.settings
        pipelined = 0
        while True:
            try:
                head = self.read_head(settings.header_timeout, settings.keepalive_timeout)
                if head is None:
                    return False
                conn.requests += 1
                if not self.one_request(head):  # RequestError too: a bad relayed body
                    # (no lingering close after an aborted answer: its FIN would come
                    # before the reset)
                    return not self.outcome.websocket and not conn.aborted and (
                        head.has_body or bool(conn.buf))
                if conn.buf:
                    # The next request is here already: a client pipelining faster than
                    # it is answered never makes this loop wait. Every PIPELINE_TURN
                    # requests the process's other connections get a turn.
                    pipelined += 1
                    if pipelined >= PIPELINE_TURN:
                        pipelined = 0
                        let_others_run()
            except RequestError as exc:
                log.info("bad request from %s: %s", conn.peer, exc)
                answer = simple_response(exc.status, exc.reason.encode() + b"\n",
                                         close=True)
                conn.send(answer)
                self.record_refused(exc.status, len(answer))
                return True

    def read_head(self, header_timeout: float, keepalive_timeout: float) -> RequestHead | None:
        conn = self.conn
        buf = conn.buf
        limits = self.door.limits
        if conn.requests and buf and empty_lines(buf) == len(buf):
            # Empty lines after the last request (an old client's CRLF after its POST
            # body, RFC 9112 2.2): ignored, so the connection is idle, not inside a head
            del buf[:]
        if not buf and conn.requests:
            # A keep-alive client between requests: wait for the next one, which nearly
            # always arrives whole in one read and is parsed straight from it.
            conn.phase = IDLE
            now = conn.idle_since = time.monotonic()
            conn.deadline = now + keepalive_timeout if keepalive_timeout else 0.0
            while True:
                data = conn.reader.recv(RECV_SIZE)
                if not data:
                    return None
                skip = empty_lines(data)
                if skip < len(data):
                    break
                # only empty lines: still idle, under the keep-alive deadline set above
                # (the --header-timeout closed a kept connection that had them)
            if skip:
                data = data[skip:]
            end = data.find(HEAD_END)
            # (0: empty lines before the request line, which find_head_end skips)
            if 0 < end <= limits.head_size and (
                    len(data) <= limits.request_line
                    or data.find(b"\r\n", 0, limits.request_line + 2) >= 0):
                conn.phase = NONE
                conn.deadline = 0.0
                if end + 4 < len(data):
                    buf += data[end + 4:]
                return self.parse(data[:end], limits)
            buf += data
            conn.expect(HEAD, header_timeout)
        else:
            conn.expect(HEAD, header_timeout)
        seen = 0  # bytes of buf searched already (each fill searches only the new ones)
        skipped = 0
        while True:
            if buf[:2] == b"\r\n":
                # empty lines before the request line (RFC 9112 2.2): dropped as they
                # come, so that a trickle of them is not searched again on each byte,
                # but counted in the head's size
                skip = empty_lines(buf)
                del buf[:skip]
                seen = max(seen - skip, 0)
                skipped += skip
                # Only the empty lines: what follows them in ``buf`` may be a whole
                # request with its body, which is no part of the head.
                if skipped > limits.head_size:
                    raise RequestError(431, "request head too large")
            # Before the head size: a request line longer than both is still a 414. One
            # byte past the limit may be the CR of the line's own CRLF, its LF not here
            # yet: a line at the limit is refused only by how its bytes arrived otherwise.
            if len(buf) > limits.request_line and \
                    buf.find(b"\r\n", 0, limits.request_line + 2) < 0 and \
                    buf[limits.request_line:limits.request_line + 2] != b"\r":
                raise RequestError(414, "request line too long")
            end = find_head_end(buf, limits.head_size - skipped,
                                max(seen - 3, 0)) if buf else -1
            if end >= 0:
                break
            seen = len(buf)
            if not conn.fill():
                return None
        conn.phase = NONE
        conn.deadline = 0.0
        raw = bytes(buf[:end - 4])
        del buf[:end]
        return self.parse(raw, limits)

    def parse(self, raw: bytes, limits: Limits) -> RequestHead:
        """parse_request_head, or the last head again when ``raw`` is the same bytes.
        A head is not changed once parsed, but for ``expect_continue`` (cleared once
        the 100 is sent): a head that asks for one is parsed afresh every time."""
        if raw == self.last_raw and self.last_head is not None:
            return self.last_head
        try:
            head = parse_request_head(raw, limits)
        except RequestError:
            self.refused = raw  # for its access log line (record_refused)
            raise
        if head.expect_continue:
            self.last_raw = b""
            self.last_head = None
        else:
            self.last_raw = raw
            self.last_head = head
        self.last_view = None
        return head

    # --- one request --------------------------------------------------------------

    def one_request(self, head: RequestHead) -> bool:
        """Answer ``head``; True when the connection may carry another request."""
        door = self.door
        started = time.monotonic()
        if door.stopping:
            # the last request of this connection, and its answer says so: a client
            # then opens a new one (to a process that still accepts) instead of racing
            # the close of an idle connection with its next request
            head.keep_alive = False
        self.request = self.view(head)
        self.head = head
        self.body: bytes | None = _UNREAD
        state = self.outcome = _Outcome()
        view = self.request
        admin = door.admin
        if view.path.startswith(admin.prefix) and not view.hop and admin.handles(view.path):
            # Before routing: trusted networks, or anyone with --admin-token.
            answer = admin.answer(view.path, view.remote_addr, view.query,
                                  _field(head, b"authorization"), view.method,
                                  forwarded_clients(
                                      head.forwarded_for.decode("latin-1"),
                                      head.forwarded.decode("latin-1"),
                                      head.real_ip.decode("latin-1")),
                                  _field(head, b"origin"))
            if answer is not None:
                try:
                    return self.admin_reply(head, state, answer)
                finally:
                    self.record(head, state, started)
        try:
            decision = self.pick(_NOTHING_TRIED)
            try:
                keep = self.send(decision)
            except UpstreamError as first:
                # The first try failed: the one attempt loop decides what happens next.
                keep = attempt(self.pick, self.send, endpoint_of=_endpoint_of,
                               node=door.node, retries=door.retries,
                               may_replay=replayable(head.method, head.has_body),
                               on_retry=self.retried, first=(decision, first),
                               gave_up=_no_endpoint_left)
        except RequestError as exc:
            # a relayed body that broke its framing: answered by the caller, and counted
            # as that answer (as status 0 it was an error of the endpoint's)
            if not state.sent:
                state.status = exc.status
            raise
        except UpstreamError as exc:
            if isinstance(exc, ClientLeft):  # not the endpoint's fault, nobody to answer
                log.info("%s %s: %s", head.method.decode("latin-1"),
                         head.target[:200].decode("latin-1"), exc)
                if not state.sent:
                    # nginx's 499 in the access log and a 4xx in the metrics: as status 0
                    # ("none") it was an error of the endpoint's on the dashboard, each
                    # long poll whose browser left a failure of a healthy endpoint.
                    state.status = exc.status
                return False
            log.warning("%s %s: %s", head.method.decode("latin-1"),
                        head.target[:200].decode("latin-1"), exc)
            if exc.answered or state.sent:
                keep = False  # part of an answer went out: cut the connection,
                self.conn.abort()  # with a reset, so that it cannot look complete
            else:
                status, text = client_answer(exc, self.door.policy.ui_service or "")
                keep = self.reply(head, state, status, text.encode() + b"\n", close=True)
        finally:
            if door.observer is not NULL_OBSERVER:
                self.record(head, state, started)
        return keep

    def retried(self, endpoint: Any, exc: UpstreamError) -> None:
        self.outcome.retry(endpoint, exc)
        # A label, not the message: "connect" (refused or not accepted, nothing sent)
        # or "replay" (broke before answering a replayable request).
        self.door.observer.retried(endpoint.url, "connect" if exc.retryable else "replay")

    def pick(self, tried: frozenset[str]) -> Any:
        door = self.door
        node = door.node
        table = node.table
        placement = door.placement
        if placement is None:
            # tried: never again; ejected: only when nothing else is left (panic mode)
            return route(self.request, table, door.policy, tried, ejected=node.ejected())
        decision = route(self.request, table, door.policy, tried, ejected=node.ejected(),
                         load=placement.scores(table))
        # A new long-lived session counts where it went until that endpoint's figure
        # has it; a plain request counts only while it runs, as in the figures (inflight)
        if type(decision) is Proxy:
            if decision.set_cookie is not None and self.head.is_websocket:
                placement.placed(decision.endpoint.hash)
        elif type(decision) is SockJSInfo and decision.endpoint is not None:
            placement.placed(decision.endpoint.hash)  # its session will follow
        return decision

    def send(self, decision: Any) -> bool:
        head = self.head
        state = self.outcome
        if type(decision) is Proxy:
            state.endpoint = decision.endpoint
            return self.proxy(head, decision, state)
        if isinstance(decision, Serve):
            return self.serve_local(head, decision, state)
        if isinstance(decision, Reply):
            state.endpoint = None  # answered here (after an endpoint that refused: a 503)
            return self.reply(head, state, decision.status, decision.body.encode() + b"\n")
        state.endpoint = decision.endpoint
        return self.sockjs_info(head, decision, state)

    def view(self, head: RequestHead) -> RequestView:
        """What routing looks at; the hop marker counts only if it proves membership.
        Kept with the last head, unless it has a marker (whose check depends on the
        clock or the table)."""
        if head is self.last_head and not head.hop:
            if self.last_view is None:
                self.last_view = self._view(head)
            return self.last_view
        return self._view(head)

    def _view(self, head: RequestHead) -> RequestView:
        target = head.target.decode("latin-1")
        path, _, query = target.partition("?")
        if "%" in path:
            path = unquote_to_bytes(path).decode("latin-1")
        hop = bool(head.hop) and self.door.hop.verify(head.hop, head.method, head.target,
                                                      self.conn.peer, self.door.node.table)
        return RequestView(
            head.method.decode("latin-1"), path or "/", query,
            head.cookie.decode("latin-1") if head.cookie else "", hop, "http",
            head.host.decode("latin-1") if head.host else self.local_address(),
            head.forwarded_proto.decode("latin-1") if head.forwarded_proto else "",
            head.forwarded_host.decode("latin-1") if head.forwarded_host else "",
            self.conn.peer, target)

    def forwarded_believed(self) -> bool:
        """May the local app see this request's forwarded fields? From a trusted proxy,
        or from a member whose hop marker proved it (across hosts members are seldom
        in each other's --trusted-proxies)."""
        return self.request.hop or self.conn.peer in self.door.forwarding.trusted

    def local_address(self) -> str:
        """HOST:PORT this connection came in on: the Host of an HTTP/1.0 request that
        sent none (as a WSGI server's SERVER_NAME; a SockJS base_url was "http:///")."""
        try:
            host, port = self.conn.sock.getsockname()[:2]
        except OSError:
            return ""
        return host_port(host, port)

    def forwarded_lines(self, head: RequestHead) -> list[bytes]:
        """Forwarding.lines for this connection's peer, kept while a keep-alive client
        sends the same Host and no forwarding fields of its own (the usual case)."""
        if head.forwarded_for or head.forwarded_proto or head.forwarded_host or \
                head.forwarded or head.real_ip or head.via:
            return self.door.forwarding.lines(head, self.conn.peer)
        if head.host != self.fwd_host or self.fwd_lines is None:
            self.fwd_lines = self.door.forwarding.lines(head, self.conn.peer)
            self.fwd_host = head.host
        return self.fwd_lines

    def record_refused(self, status: int, sent: int) -> None:
        """The access log line and the count of a request refused before it was
        parsed (400, 414, 431, 505...), as nginx logs them: its request line as far as
        it came (escaped by the log), answered by cluster (``-``). An operator saw
        such requests in no log but the info one, and not in the metrics."""
        observer = self.door.observer
        if observer is NULL_OBSERVER:
            return
        raw = self.refused if self.refused is not None else self.conn.buf
        self.refused = None
        line = bytes(raw[:MAX_REFUSED_LINE]).partition(b"\r\n")[0].decode("latin-1")
        method, _, rest = line.partition(" ")
        target, _, version = rest.rpartition(" ")
        if not version.startswith("HTTP/"):
            target, version = rest, ""
        observer.request_done(RequestRecord(
            self.conn.peer, method, target, version, status, sent, "-", "", 0.0, 0.0, 0,
            "", ""))

    def record(self, head: RequestHead, state: _Outcome, started: float) -> None:
        observer = self.door.observer
        if observer is NULL_OBSERVER:
            return
        endpoint = state.endpoint
        observer.request_done(RequestRecord.of_head(
            head, self.conn.peer, state.status, state.sent,
            endpoint.url if endpoint is not None else state.where,
            endpoint.service if endpoint is not None else state.service,
            state.upstream_seconds, time.monotonic() - started, state.retries,
            state.websocket))

    # --- answers ----------------------------------------------------------------------

    def admin_reply(self, head: RequestHead, state: _Outcome, page: AdminResponse) -> bool:
        return self.reply(head, state, page.status, page.body, page.content_type.encode(),
                          extra=tuple(f"{k}: {v}".encode("latin-1") for k, v in page.headers))

    def reply(self, head: RequestHead, state: _Outcome, status: int, body: bytes,
              ctype: bytes = b"text/plain; charset=utf-8", close: bool = False,
              extra: tuple[bytes, ...] = ()) -> bool:
        # a WebSocket handshake answered here is refused (not a 101): the connection
        # ends, as for any refusal, since what follows its head may be frames
        keep = head.keep_alive and not close and not head.has_body and not head.is_websocket
        if not ctype:  # a 204 or 304 passed on (SockJS info): its own fields, none added
            data = head_only_response(status, extra, close=not keep)
        else:
            data = simple_response(status, b"" if head.method == b"HEAD" else body, ctype,
                                   close=not keep, extra=extra)
            if head.method == b"HEAD":  # same head as a GET would get, without the body
                data = data.replace(b"Content-Length: 0", b"Content-Length: %d" % len(body),
                                    1)
        self.conn.send(data)
        state.status = status
        state.sent += len(data)
        state.where = "-"
        return keep

    def proxy(self, head: RequestHead, decision: Proxy, state: _Outcome) -> bool:
        door = self.door
        conn = self.conn
        endpoint = decision.endpoint
        hostport = door.pool.target(endpoint.url).hostport_b
        path_qs = decision.path_qs.encode("latin-1")
        upgrade = head.is_websocket
        hop = door.hop.line(head.method, path_qs)
        made = self.made
        if made is not None and made[0] is head and made[1] == path_qs and \
                made[2] == hostport and made[3] == hop:
            out = made[4]  # the same head to the same place: the same bytes
        else:
            if head.chunked:
                framing = b"Transfer-Encoding: chunked"
            elif head.content_length >= 0 and (head.content_length or
                                               head.method not in _BODILESS):
                framing = b"Content-Length: %d" % head.content_length
            else:
                framing = b""
            # No Host (HTTP/1.0) or an empty one: the authority the client reached is this
            # connection's address (RFC 9112 3.3), as the local app's SERVER_NAME says;
            # the endpoint's own address would send its links past the balancer.
            authority = hostport if head.host else (
                self.local_address().encode("latin-1") or hostport)
            out = request_head(head, path_qs, authority, self.forwarded_lines(head), hop,
                               framing, upgrade)
            self.made = (head, path_qs, hostport, hop, out)
        body = self.body
        if body is _UNREAD:
            # Taken once per request: every attempt (another endpoint after a refused
            # connect) sends the same bytes. A streamed body is read only after the
            # connect succeeded, so nothing of it is gone when an attempt is refused.
            if head.chunked or (head.content_length > len(conn.buf)) or \
                    head.content_length > 65536:
                body = None  # streamed from the client
            elif head.content_length > 0:
                body = bytes(conn.buf[:head.content_length])
                del conn.buf[:head.content_length]
            else:
                body = b""
            self.body = body
        exchange = Exchange(conn, head, door.pool, endpoint.url)
        if upgrade:
            exchange.send_request(out, b"")
        else:
            exchange.send_request(out, body)
        state.upstream_seconds = exchange.upstream_seconds
        response = exchange.response
        assert response is not None
        state.status = response.code
        extra = b""  # a new session's cookies, on its first answer (a 101 as well)
        if decision.set_cookie is not None:
            extra = _cookie_line(decision.set_cookie, door.cookie_attributes)
        if decision.set_version is not None:
            extra += _cookie_line(decision.set_version, door.cookie_attributes)
        if upgrade and response.code == 101:
            return self.tunnel(exchange, state, extra)
        try:
            keep = exchange.relay_response(extra, head.keep_alive and not upgrade)
        finally:
            state.sent = exchange.sent
        return keep

    def tunnel(self, exchange: Exchange, state: _Outcome, extra: bytes = b"") -> bool:
        """After the endpoint's 101: pass its answer on verbatim (but for the load
        figure meant for this balancer, and with the header lines ``extra``), then
        tunnel."""
        conn = self.conn
        upstream = exchange.upstream
        assert upstream is not None
        door = self.door
        raw_head = exchange.raw_head
        figure, raw_head = load_field(raw_head)
        conn.send(raw_head + extra + b"\r\n\r\n" + upstream.buf)
        early = bytes(conn.buf)
        conn.buf.clear()
        if early:
            upstream.sock.sendall(early)
        conn.upstream = None
        conn.phase = TUNNEL
        conn.deadline = 0.0
        state.websocket = True
        state.sent = len(exchange.raw_head)
        url = exchange.url
        door.websockets += 1
        door.observer.websocket_opened(url)
        if figure is not None and door.placement is not None and state.endpoint is not None:
            door.placement.heard(state.endpoint.hash, figure)
        upstream.sock.settimeout(None)
        conn.reader.disarm()  # the tunnel reads both sockets its own way from here
        upstream.reader.disarm()

        if Tunnel.supports(conn.sock, upstream.sock):
            # The tunnel keeps the client connection (and its endpoint's): it stays one
            # of the --max-connections until it closes, or WebSockets past the cap would
            # take descriptors until accept() and connect() fail.
            def closed() -> None:
                door.websockets -= 1
                door.active -= 1
                door.open_websockets.discard(tunnel)
                door.observer.websocket_closed(url)
                door.observer.connection_closed()

            tunnel = Tunnel(conn.sock, upstream.sock, closed,
                            door.settings.write_timeout, sent_to_a=bytes(upstream.buf))
            self.server._handed_off.add(conn.sock)
            door.sweeper.discard(conn)
            door.open_websockets.add(tunnel)
            tunnel.start()
            if door.stopping:
                tunnel.going_away()
        else:
            pumped = _Pumped(conn.sock, upstream.sock)
            door.open_websockets.add(pumped)
            if door.stopping:
                pumped.going_away()
            try:
                pump(conn.sock, upstream.sock, door.settings.write_timeout)
            finally:
                door.websockets -= 1
                door.open_websockets.discard(pumped)
                door.observer.websocket_closed(url)
        return False

    def serve_local(self, head: RequestHead, decision: Serve, state: _Outcome) -> bool:
        door = self.door
        app = door.local_app
        assert app is not None
        body = self.body
        if body is not _UNREAD and body:
            # An attempt to relay it took the body from the client's buffer, and its
            # endpoint refused: the app reads it from there. (It waited for bytes the
            # client had sent already, until the client or a stop gave up: a sticky
            # POST to a worker that had just stopped, then served here.)
            self.conn.buf[:0] = body
            self.body = _UNREAD
        handler = self.handler
        if handler is None:
            handler = self.handler = self.server.handler_class(
                self.conn.sock, self.conn.address, self.server, rfile=_Reader(self.conn))
            handler.connection = self
        if decision.set_cookie is not None:
            app = _with_cookie(app, set_cookie(decision.set_cookie, door.cookie_attributes))
        if decision.set_version is not None:
            app = _with_cookie(app, set_cookie(decision.set_version, door.cookie_attributes))
        load = door.load
        began = load.started()
        try:
            keep = handler.run(head, app, decision.path, self.forwarded_believed())
        finally:
            load.finished(began, handler.websocket_used)
        state.status = handler.code or 0
        state.sent = handler.response_length
        state.where = "local"
        state.service = door.policy.service or ""
        state.websocket = handler.websocket_used
        return keep

    def sockjs_info(self, head: RequestHead, decision: SockJSInfo, state: _Outcome) -> bool:
        """SockJS info from the chosen endpoint, asked with the client's own fields
        (Origin, Cookie...), passed on with its status and fields, ``base_url``
        pointing at it."""
        if decision.endpoint is None:
            code, fields, body = self.local_info(head, decision.path_qs)
        else:
            door = self.door
            path_qs = decision.path_qs.encode("latin-1")
            target = door.pool.target(decision.endpoint.url)
            out = request_head(head, path_qs, target.hostport.encode(),
                               door.forwarding.lines(head, self.conn.peer),
                               door.hop.line(b"GET", path_qs), b"")
            exchange = Exchange(self.conn, head, door.pool, decision.endpoint.url)
            exchange.send_request(out, b"")
            assert exchange.response is not None
            code = exchange.response.code
            fields = exchange.response.field_pairs()
            body = read_small_body(exchange, MAX_INFO_BYTES)
        answer = rewrite_info(code, fields, body, decision.base_url,
                              decision.endpoint.url if decision.endpoint else "local app")
        extra = tuple(f"{name}: {value}".encode("latin-1") for name, value in answer.fields)
        return self.reply(head, state, answer.status, answer.body,
                          answer.content_type.encode("latin-1"), extra=extra)

    def local_info(self, head: RequestHead, path_qs: str) -> tuple[int, Fields, bytes]:
        app = self.door.local_app
        assert app is not None
        path, _, query = path_qs.partition("?")
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": query,
                   "SCRIPT_NAME": "", "SERVER_NAME": head.host.decode("latin-1"),
                   "SERVER_PORT": "", "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.version": (1, 0),
                   "wsgi.url_scheme": "http", "wsgi.input": _Empty(), "wsgi.errors": _Empty(),
                   "wsgi.multithread": False, "wsgi.multiprocess": False,
                   "wsgi.run_once": False, "REMOTE_ADDR": self.conn.peer}
        # the fields the local app would see for any request
        for name, value in _pairs_for_app(head, self.forwarded_believed()):
            environ["HTTP_" + name.upper().replace("-", "_")] = value
        captured: dict[str, Any] = {}

        def capture(status: str, headers: Any, *exc: Any) -> Callable[[bytes], None]:
            captured["status"] = status
            captured["headers"] = list(headers)
            return lambda data: None

        result = app(environ, capture)
        try:
            body = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        status = captured.get("status", "500")
        return (int(status[:3]) if status[:3].isdigit() else 500,
                captured.get("headers", []), body)


_BODILESS = (b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE")
_NOTHING_TRIED: frozenset[str] = frozenset()
#: Connection.body before the request's body was looked at (b"" is "no body")
_UNREAD = b"\0unread"


class _Pumped:
    """A TLS tunnel run by greenlets, as the stop sees it."""

    __slots__ = ("client", "upstream")

    def __init__(self, client: Any, upstream: Any) -> None:
        self.client = client
        self.upstream = upstream

    def going_away(self) -> None:
        for sock, frame in ((self.client, CLOSE_TO_CLIENT), (self.upstream, CLOSE_TO_SERVER)):
            try:
                sock.send(frame)
            except OSError:
                pass
            sock.close()


class _LocalWebSocket:
    """A WebSocket served by the local app (gevent-websocket), as the stop sees it."""

    __slots__ = ("websocket", "conn")

    def __init__(self, websocket: Any, conn: ClientConn) -> None:
        self.websocket = websocket
        self.conn = conn

    def going_away(self) -> None:
        if getattr(self.websocket.raw_write, "busy", False):
            # The app's frame is on its way to a slow client: the close frame follows
            # it (app_websocket.FrameWriter), from a greenlet of its own, so the stop (a
            # drain, rebalancing) is not held by this client meanwhile.
            gevent.spawn(self._close_frame)
        else:
            self._close_frame()

    def _close_frame(self) -> None:
        # gevent-websocket's close() drops the status code: send the frame ourselves.
        try:
            self.websocket.send_frame(b"\x03\xe9server going away",
                                      self.websocket.OPCODE_CLOSE)
        except Exception:  # noqa: BLE001 - gevent-websocket raises several kinds
            self.conn.close()  # wakes the app's receive(): it sees the socket end
            return
        # Then a FIN, and the client's answering close frame ends the app's receive()
        # (run_websocket then closes). Closed at once, the socket answered that frame with a
        # reset, and browsers reported 1006, not the 1001 that asks them to reconnect.
        sock = self.conn.sock
        try:
            if not is_plain(sock):  # TLS (gunicorn's certfile): shutdown() drops the session
                raise OSError("not a plain socket")
            sock.shutdown(_socket.SHUT_WR)
        except OSError:
            self.conn.close()
            return
        gevent.spawn_later(LINGER_SECONDS, self.conn.close)  # a client that never answers


class _Outcome:
    """What happened to one request, for the access log and the metrics."""

    __slots__ = ("status", "sent", "endpoint", "where", "service", "upstream_seconds",
                 "retries", "websocket")

    def __init__(self) -> None:
        self.status = 0
        self.sent = 0
        self.endpoint: Any = None
        self.where = "-"
        self.service = ""
        self.upstream_seconds = 0.0
        self.retries = 0
        self.websocket = False

    def retry(self, endpoint: Any, exc: UpstreamError) -> None:
        self.retries += 1
        self.endpoint = None


def _endpoint_of(decision: Any) -> Any:
    return getattr(decision, "endpoint", None)


def _no_endpoint_left(decision: Any) -> bool:
    return isinstance(decision, Reply) and decision.status == 503


def _field(head: RequestHead, name: bytes) -> str:
    """The first value of an end-to-end field (only for logs: linear, not hot)."""
    for line in head.fields:
        key, _, value = line.partition(b":")
        if key.lower() == name:
            return value.strip().decode("latin-1")
    return ""


_COOKIE_LINES: dict[tuple[tuple[str, str], str], bytes] = {}


def _cookie_line(cookie: tuple[str, str], attributes: str) -> bytes:
    """The Set-Cookie line for a sticky cookie (a few endpoints: made once each)."""
    line = _COOKIE_LINES.get((cookie, attributes))
    if line is None:
        name, value = set_cookie(cookie, attributes)
        line = f"\r\n{name}: {value}".encode("latin-1")
        if len(_COOKIE_LINES) > 4096:  # endpoints come and go: never grow for ever
            _COOKIE_LINES.clear()
        _COOKIE_LINES[(cookie, attributes)] = line
    return line


def _with_cookie(app: WSGIApp, cookie: tuple[str, str]) -> WSGIApp:
    """``app``, its responses setting ``cookie``; with the ``app_protocol`` it may have
    (gevent-websocket's way for an app to pick a WebSocket subprotocol). Its
    ``sticky_cookies`` are the ones a 101 answered before the app runs must carry too
    (:meth:`LocalHandler.upgrade_websocket`)."""
    def with_cookie(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        def start(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
            return start_response(status, [*headers, cookie], *exc)

        return app(environ, start)

    choose = getattr(app, "app_protocol", None)
    if choose is not None:
        with_cookie.app_protocol = choose  # type: ignore[attr-defined]
    with_cookie.sticky_cookies = (  # type: ignore[attr-defined]
        *getattr(app, "sticky_cookies", ()), cookie)
    return with_cookie


class _Empty:
    def read(self, *args: Any) -> bytes:
        return b""

    def readline(self, *args: Any) -> bytes:
        return b""

    def write(self, *args: Any) -> None:
        pass

    def flush(self) -> None:
        pass


_ONE_BYTE = tuple(bytes((value,)) for value in range(256))


class _Reader:
    """The client connection as the file pywsgi's handler and gevent-websocket read
    (``read``, ``readline``, ``read1``); bytes come from the door's buffer first.

    A client that sends faster than the app takes its bytes never makes a read wait:
    every read lets the process's other connections have a turn once
    :data:`~cluster.netio.SLICE` has passed (:class:`~cluster.netio.Turns`), so one
    upload (a body of 1-byte chunks, a large message) cannot hold them all."""

    __slots__ = ("conn", "closed", "ended", "turns", "chunks", "bad", "in_message")

    def __init__(self, conn: ClientConn) -> None:
        self.conn = conn
        self.closed = False
        #: the client's side ended (EOF, or closed by the sweeper) while the app read
        self.ended = False
        self.turns = Turns()
        #: a chunked request body's framing, checked as pywsgi reads it (None: not one)
        self.chunks: ChunkedScanner | None = None
        #: why that body broke its framing ("": it did not); every read then fails
        self.bad = ""
        #: a local WebSocket is reading a frame's payload (app_websocket sets it)
        self.in_message = False

    def _check(self, data: bytes) -> None:
        """Hold a chunked body read by pywsgi to the rules a relayed one is held to
        (cluster.http1.ChunkedScanner): pywsgi bounds each line, not the trailer
        section, so a client could send trailer lines for as long as it liked, each
        parsed byte by byte. A break is pywsgi's own bad-input error, raised again by
        every later read (pywsgi would go on reading to discard the body): a 400, and
        the connection closed."""
        scanner = self.chunks
        assert scanner is not None
        try:
            scanner.feed(data)
        except ChunkError as exc:
            self.chunks = None
            self.bad = f"bad chunked body: {exc}"
            raise _InvalidClientInput(self.bad) from None
        if scanner.done:
            self.chunks = None

    def _fill(self) -> bool:
        """Read what the client sent into the buffer (False at EOF). A wait for it is
        bounded by --write-timeout (the sweeper closes a client silent for that long
        in the middle of its body, or of a WebSocket frame: a message held half-read
        holds its bytes), but an upgraded connection's wait between frames (no idle
        timeout once upgraded, by design). Only the wait: an app that works on after
        reading its body keeps its client however long it takes."""
        conn = self.conn
        try:
            try:
                data = conn.raw.recv(RECV_SIZE)
            except BlockingIOError:
                phase = conn.phase
                if phase == TUNNEL and not self.in_message:
                    data = conn.reader.recv(RECV_SIZE)
                else:
                    conn.expect(BODY, conn.write_timeout)
                    try:
                        data = conn.reader.recv(RECV_SIZE)
                    finally:
                        conn.phase = phase
                        conn.deadline = 0.0
                self.turns.restart()  # a wait: the others had their turn
        except OSError:
            self.ended = True
            raise
        if data:
            conn.buf += data
            return True
        self.ended = True
        return False

    def read(self, size: int = -1) -> bytes:
        if self.bad:
            raise _InvalidClientInput(self.bad)
        self.turns.check()
        conn = self.conn
        buf = conn.buf
        if size is None or size < 0:
            while self._fill():
                pass
            data = bytes(buf)
            buf.clear()
            return data
        while len(buf) < size:
            if not self._fill():
                break
            self.turns.check()  # a large body or message arriving at full speed
        if size == 1:
            # pywsgi reads chunk framing a byte at a time, and a body of 1-byte chunks
            # as 1-byte pieces it keeps in a list: one shared object per byte value,
            # not a new 33-byte one per byte (a 2 MB body of them took 260 MB)
            data = _ONE_BYTE[buf[0]] if buf else b""
        else:
            with memoryview(buf) as view:
                data = bytes(view[:size])
        del buf[:size]
        if self.chunks is not None:
            self._check(data)
        return data

    def read_some(self, size: int) -> bytes:
        """Up to ``size`` bytes: what is buffered, else what the next receive brings (b""
        at EOF). A WebSocket text frame is checked as it arrives (cluster.app_websocket)."""
        if not self.conn.buf and not self._fill():  # in a frame: bounded (in_message)
            return b""
        return self.read(min(size, len(self.conn.buf)))

    def readline(self, size: int = -1) -> bytes:
        if self.bad:
            raise _InvalidClientInput(self.bad)
        self.turns.check()
        conn = self.conn
        buf = conn.buf
        while True:
            eol = buf.find(b"\n")
            if eol >= 0 or (0 <= size <= len(buf)):
                break
            if not self._fill():
                eol = len(buf) - 1
                break
        end = eol + 1 if eol >= 0 else len(buf)
        if 0 <= size < end:
            end = size
        data = bytes(buf[:end])
        del buf[:end]
        if self.chunks is not None:
            self._check(data)
        return data

    def read1(self, size: int = -1) -> bytes:
        """What is buffered, or one read that does not wait (for a hijack)."""
        conn = self.conn
        if conn.buf:
            return self.read(min(size, len(conn.buf)) if size >= 0 else len(conn.buf))
        try:
            return conn.raw.recv(size if size > 0 else 65536)  # type: ignore[no-any-return]
        except BlockingIOError:
            return b""

    def close(self) -> None:
        self.closed = True


class LocalHandler(ClusterHandler, WebSocketHandler):  # type: ignore[misc]
    """pywsgi's handler, fed the head the door already parsed, with gevent-websocket's
    upgrade: runs one local request at a time for a :class:`Connection`."""

    connection: Connection
    websocket_used = False
    # the door's reader grows with the bytes that came, and its scanner refuses a bad
    # chunk line before pywsgi reads it: pywsgi's own Input is enough (and one copy less)
    checked_input = False

    def run(self, head: RequestHead, app: WSGIApp, path: str | None, trusted: bool) -> bool:
        """Run ``app`` for ``head``; True when the connection may carry another request."""
        # The app may read the socket its own way (environ, hijack): no kept watcher.
        self.connection.conn.reader.disarm()
        self.hijacked = False
        self.websocket_used = False
        self.command = head.method.decode("latin-1")
        target = head.target.decode("latin-1")
        if path is not None:
            _, sep, query = target.partition("?")
            target = path + sep + query
        self.path = target
        self.request_version = head.version.decode("latin-1")
        self.requestline = f"{self.command} {target} {self.request_version}"
        self.headers = RequestHeaders(_pairs_for_app(head, trusted))
        self.content_length = head.content_length if head.content_length >= 0 else None
        rfile = self.rfile
        rfile.chunks = ChunkedScanner() if head.chunked else None
        rfile.bad = ""
        self.close_connection = not head.keep_alive
        self.environ = self.get_environ()
        self.application = app
        self.body_sent = 0
        self.client_left = self.cut = False
        self.handle_one_response()
        if rfile.chunks is not None:
            # The chunked body's end was never reached (pywsgi refused a chunk line, and
            # the app answered anyway): where the next request starts is unknown, and
            # what follows is the client's body, not a request.
            self.close_connection = True
        if self.code != 101 and head.is_websocket:
            # A refused handshake ends the connection, as when the upgrade is relayed:
            # what the client sends next may be frames, not a request.
            self.close_connection = True
        # (fewer body bytes than the app's Content-Length: ClusterHandler closes)
        return not self.close_connection and not self.rfile.closed

    def _sendall(self, data: bytes | bytearray) -> None:
        """pywsgi's, through the door's send: a client that reads nothing for
        --write-timeout has its connection closed by the sweeper instead of holding this
        greenlet (and the app's response) for ever. Outside a door (a plain pywsgi
        server running this handler) it is pywsgi's own."""
        connection = getattr(self, "connection", None)
        if connection is None:
            super()._sendall(data)
            return
        try:
            connection.conn.send(data)
        except OSError as exc:
            self.client_left = True
            if exc.errno in self.ignored_socket_errors:
                raise
            # closed by the sweeper: as unremarkable as a client that went away
            raise BrokenPipeError(errno.EPIPE, f"client connection closed: {exc}") from None
        self.response_length += len(data)

    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: Any = None) -> Any:
        """pywsgi's; a WebSocket's 101 to a verified cluster member also carries this
        instance's live WebSocket count, so the balancer that opened it knows it at
        once (cluster.placement), not a heartbeat later."""
        if status[:3] == "101":
            connection = getattr(self, "connection", None)
            if connection is not None and connection.request.hop:
                count = len(connection.door.load.websockets) + 1  # this one too
                headers = [*headers, (LOAD_HEADER, str(count))]
        return super().start_response(status, headers, exc_info)

    def upgrade_websocket(self) -> Any:
        """gevent-websocket's upgrade, its handshake answered as under cluster.wrap()
        (:func:`~cluster.handler.handshake_answer`). As released, gevent-websocket
        returns its refusals as ``str`` bodies (a TypeError and a 500, or nothing at
        all, once pywsgi writes them), lets a key that is not base64 raise (a traceback
        and a 500), decodes the key leniently (two keys, joined by a comma, got a 101:
        RFC 6455 4.2.1 wants a 400), and picks the app's ``app_protocol(path)`` when
        its name is anywhere in the offer (``echo`` for ``echo.v2``: a subprotocol the
        client never offered). Here: 400, or 426 for a missing version; the
        subprotocol only when offered as such. The door passes the app's
        ``app_protocol`` on (:func:`_with_cookie`), so a new session's first socket gets
        it too. An HTTP/1.0 request's Upgrade is ignored (RFC 9110 7.8), as when the
        request is routed elsewhere (RequestHead.is_websocket): the app gets a plain
        request, not gevent-websocket's '402 Bad Request'."""
        environ = self.environ
        if self.request_version != "HTTP/1.1" or environ.get("REQUEST_METHOD") != "GET" \
                or str(environ.get("HTTP_UPGRADE", "")).lower() != "websocket" \
                or "upgrade" not in str(environ.get("HTTP_CONNECTION", "")).lower():
            return None  # gevent-websocket's test: not an upgrade, the app's request
        status, fields, body = handshake_answer(
            environ, getattr(self.application, "app_protocol", None))
        if body:
            self.start_response(status, [("Content-Type", "text/plain"), *fields])
            return [body]
        # as gevent-websocket's upgrade_connection: the socket first (start_response
        # looks for it), then the 101
        websocket = WebSocket(environ, Stream(self), self)
        adopt(websocket, self.connection.door.settings.max_websocket_message,
              self.connection.conn.send)
        environ["wsgi.websocket_version"] = environ.get("HTTP_SEC_WEBSOCKET_VERSION")
        environ["wsgi.websocket"] = self.websocket = websocket
        # a new session's sticky cookie, as on a 101 tunnelled from another instance
        self.start_response(status, [*fields, *getattr(self.application, "sticky_cookies", ())])
        return None

    def handle_error(self, t: Any, v: Any, tb: Any) -> None:
        """pywsgi's (a traceback and a 500), but for a client that left, or was closed
        for silence, in the middle of its request body: the app's read raised OSError
        ("unexpected end of file..."), nobody is there to answer, and an upload cut
        short is no server error. One line, as for a relayed body. (A WebSocket app's
        WebSocketError: ClusterHandler.handle_error.)"""
        if isinstance(v, OSError) and getattr(self.rfile, "ended", False):
            log.info("client %s left in the middle of its request body (%s %s): %s",
                     self.connection.conn.peer, self.command, self.path[:200], v)
            self.close_connection = True
            return
        if isinstance(v, gevent.GreenletExit):
            # The stop's drain is over and the request was cut (server.stop kills what
            # is left): the connection ends unanswered, as under gunicorn's graceful
            # timeout or nginx's worker_shutdown_timeout. pywsgi answered 500, as if
            # the app had failed, which a peer balancer passed on where it retries an
            # unanswered GET on another endpoint. (The stop logs how many were cut.)
            self.close_connection = self.cut = True
            return
        super().handle_error(t, v, tb)

    def body_broken(self) -> bool:
        """pywsgi refused the chunked body, or the door's scanner did (every read of it
        fails from then on): the answer says the connection ends. (Outside a door, as in
        a plain pywsgi server, the reader is pywsgi's own.)"""
        return bool(getattr(self.rfile, "bad", "")) or super().body_broken()

    def _handle_client_error(self, ex: Exception) -> tuple[str, bytes]:
        """pywsgi's, for a chunked body that breaks off or breaks the rules while the
        app reads it: the client's doing, worth one info line (pywsgi wrote an ERROR
        with the socket's repr). The 400 pywsgi sends next, if nothing was sent yet."""
        ended = getattr(self.rfile, "ended", False)
        log.info("client %s: %s request body (%s %s): %s", self.connection.conn.peer,
                 "left in the middle of its" if ended else "bad", self.command,
                 self.path[:200], ex)
        return "400", b""

    def log_request(self) -> None:
        """The server's access log (gunicorn's, under gunicorn), never gevent-websocket's
        own logger, and nothing at all without one."""
        if isinstance(self.server.log, _NO_ACCESS_LOG):
            return
        super(WebSocketHandler, self).log_request()

    def run_websocket(self) -> None:
        conn = self.connection.conn
        conn.phase = TUNNEL
        conn.deadline = 0.0
        self.websocket_used = True
        door = self.connection.door
        door.websockets += 1
        local = _LocalWebSocket(self.websocket, conn)
        door.open_websockets.add(local)
        # Pinned: its client's sticky cookie names this instance, so closed for
        # rebalancing it would come straight back (cluster.rebalance).
        service = door.policy.service
        pinned = service is not None and self.connection.request.cookie(
            COOKIE_PREFIX + service) == door.policy.self_hash
        door.load.websockets[local] = pinned
        door.load.pinned_opened += pinned
        door.observer.websocket_opened("local")
        if door.stopping:
            local.going_away()  # the app's first receive() sees the socket end
        app = self.application
        self.application = partial(_run_websocket_app, app, self.websocket)
        try:
            super().run_websocket()  # the app, then a close frame if it sent none
        finally:
            self.application = app
            door.websockets -= 1
            door.open_websockets.discard(local)
            door.load.websockets.pop(local, None)
            door.observer.websocket_closed("local")
            end_websocket(self, self.socket, self.rfile.read)


def _run_websocket_app(app: WSGIApp, websocket: Any, environ: dict[str, Any],
                       start_response: Callable[..., Any]) -> list[bytes]:
    """The app as gevent-websocket's run_websocket calls it, through
    :func:`~cluster.app_websocket.run_app` (1011 when it raises)."""
    run_app(app, environ, websocket)
    return []


_FORWARDED_NAMES = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                              "forwarded", "x-real-ip"})


def _pairs_for_app(head: RequestHead, trusted: bool) -> list[tuple[str, str]]:
    """The header fields the local app sees: forwarded ones only from trusted peers
    (or proven members);
    an Upgrade the door ignores (not a WebSocket handshake: HTTP/1.0, a body...) not
    at all, as a relayed request's endpoint would not see it (hop-by-hop). Else an app
    that upgrades on its own (engine.io) sets out to, finds no socket, and raises."""
    pairs = head.header_pairs()
    if not trusted:
        pairs = [p for p in pairs if p[0].lower() not in _FORWARDED_NAMES]
    if head.upgrade and not head.is_websocket:
        tokens = ", ".join(t.decode("latin-1") for t in head.connection if t != b"upgrade")
        pairs = [p for p in pairs if p[0].lower() not in ("upgrade", "connection")]
        if tokens:
            pairs.append(("Connection", tokens))
    return pairs
