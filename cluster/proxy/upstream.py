"""Upstream connections (http and https alike) and the per-endpoint pool of idle ones.

Raw gevent sockets rather than an HTTP client library: the proxy needs TCP_NODELAY,
one socket per in-flight request, byte-exact control of what was sent (to know when a
retry is safe) and as little Python per request as possible. The protocol on top of
these sockets lives in :mod:`cluster.http1` (heads and framing) and
:mod:`cluster.proxy.relay`; the front door, the WSGI forwarder and the WebSocket bridge
all connect through here, so an https endpoint works for each of them.

A pooled connection is checked before every reuse with a poll that cannot block: one
that is readable (bytes the endpoint sent after its response: they would be taken for
the next client's response) or closed is thrown away, never handed out; over TLS, so
is one whose TLS layer holds decrypted bytes nobody asked for. A poll, not a
``MSG_PEEK`` recv: the same answer without the exception an empty socket raises, about
a third of the cost on a busy balancer, so no connection is ever handed out unchecked.

Timeouts are socket timeouts: the connect timeout while connecting, then the read
timeout for every later send and recv. That is exactly an idle timeout ("silent for
longer than N seconds"), the meaning nginx gives ``proxy_read_timeout``, and it costs
no timer object per request the way ``gevent.Timeout`` would on this hot path.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import select
import socket as stdsocket
import time
from typing import Any, Iterable
from urllib.parse import urlsplit

import gevent
from gevent import socket as gsocket
from gevent.monkey import get_original

from cluster.errors import OutOfDescriptors, UpstreamConnectError, dropping, misbehaving
from cluster.netio import Reader, is_plain

log = logging.getLogger(__name__)

#: An idle connection older than this is not reused: the upstream may be about to close
#: it (nginx's upstream ``keepalive_timeout`` is 60 s), and a reused connection that
#: the upstream closes under us costs a retry or, for a streamed body, an error.
IDLE_TIMEOUT = 30.0
#: idle connections closed at once when descriptors run out (one per failed connect
#: would leave the next request of a burst to fail the same way)
SHED_BATCH = 16
#: what makes an idle connection unusable: bytes or EOF to read, a hang-up, an error
_UNUSABLE = (select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP
             | select.POLLNVAL | getattr(select, "POLLRDHUP", 0))
#: the OS's poll(): gevent's patching hides select.poll, and poll(0) never blocks anyway
_os_poll = get_original("select", "poll")


class Target:
    """Where an endpoint URL points: parsed once, then cached by the pool."""

    __slots__ = ("url", "host", "port", "hostport", "hostport_b", "family", "literal", "tls")

    def __init__(self, url: str) -> None:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:  # a port out of range or not a number
            raise UpstreamConnectError(url, "not an http(s)://host[:port] endpoint URL") \
                from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamConnectError(url, "not an http(s)://host[:port] endpoint URL")
        self.url = url
        self.tls = parts.scheme == "https"
        self.host: str = parts.hostname
        self.port: int = port or (443 if self.tls else 80)
        self.hostport = parts.netloc.rsplit("@", 1)[-1]
        self.hostport_b = self.hostport.encode("latin-1")
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            self.literal = False
            self.family = stdsocket.AF_UNSPEC
        else:
            self.literal = True
            self.family = stdsocket.AF_INET6 if ip.version == 6 else stdsocket.AF_INET


class Connection:
    """One TCP connection to an endpoint, with the bytes read past the last message."""

    __slots__ = ("sock", "target", "buf", "idle_since", "reused", "_poller", "reader",
                 "plain")

    def __init__(self, sock: Any, target: Target) -> None:
        self.sock = sock
        #: reads through a kept watcher (the front door's relay; see cluster.netio)
        self.reader = Reader(sock)
        #: a plain TCP socket (not TLS): its bytes may be spliced (cluster.proxy.relay)
        self.plain = is_plain(sock)
        self.target = target
        #: bytes read past the last response head (a view of a large read)
        self.buf: bytes | memoryview = b""
        self.idle_since = 0.0
        self.reused = False
        self._poller: Any = None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def usable(self) -> bool:
        """False when the endpoint closed this idle connection or sent bytes on it.

        An idle HTTP connection has nothing to read, so anything there (data or EOF)
        means it is out of step or dead. For TLS, bytes the TLS layer already
        decrypted count too: stray bytes an endpoint sent in the same record as the
        end of its last answer sit there, not in the socket, and were read as the
        next client's answer.
        """
        poller = self._poller
        try:
            if not self.plain and self.sock.pending():
                return False
            if poller is None:
                poller = self._poller = _os_poll()
                poller.register(self.sock.fileno(), _UNUSABLE)
            return not poller.poll(0)
        except (OSError, ValueError):
            return False

    def __repr__(self) -> str:
        state = "closed" if self.sock.fileno() < 0 else "open"
        return f"<Connection {self.target.url} {state}{' reused' if self.reused else ''}>"


def connect(target: Target, connect_timeout: float, read_timeout: float | None) -> Connection:
    """Open a connection; raises UpstreamConnectError when none could be made."""
    try:
        if target.literal:
            # No resolver round trip (gevent's default resolver is a thread pool).
            sock = gsocket.socket(target.family, stdsocket.SOCK_STREAM)
            try:
                sock.settimeout(connect_timeout)
                sock.connect((target.host, target.port))
            except BaseException:
                sock.close()
                raise
        else:
            sock = gsocket.create_connection((target.host, target.port), connect_timeout)
    except stdsocket.timeout as exc:
        raise UpstreamConnectError(target.url, f"connect timed out after {connect_timeout}s") \
            from exc
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise OutOfDescriptors(target.url, "no socket for it: this instance is out of "
                                               "file descriptors") from exc
        error = UpstreamConnectError(target.url, f"connect failed: {_reason(exc)}")
        error.refused = exc.errno == errno.ECONNREFUSED
        raise error from exc
    except Exception as exc:  # noqa: BLE001 - see below
        # Resolving a name can fail in other ways than OSError (the IDNA codec's
        # UnicodeError for a label it refuses, a ValueError for a NUL): that endpoint
        # cannot be reached, which the attempt loop handles (another is tried, or the
        # client is answered); escaping from here it closed the client's connection.
        raise UpstreamConnectError(
            target.url, f"connect failed: {type(exc).__name__}: {exc}") from exc
    sock.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, 1)
    if target.tls:
        sock = _wrap_tls(sock, target, connect_timeout)
    sock.settimeout(read_timeout)
    return Connection(sock, target)


def _wrap_tls(sock: Any, target: Target, timeout: float) -> Any:
    """TLS with the system's trust store and hostname checking (as a browser would)."""
    from gevent import ssl

    try:
        sock.settimeout(timeout)
        return _tls_context().wrap_socket(sock, server_hostname=target.host)
    except (OSError, ssl.SSLError) as exc:
        sock.close()
        # dropped: the endpoint takes connections, so neither a bare connect nor its
        # heartbeat says it serves again; the probe must complete a handshake
        raise dropping(misbehaving(UpstreamConnectError(target.url,
                                                        f"TLS handshake failed: {exc}")),
                       True) from exc


_TLS: list[Any] = []


def _tls_context() -> Any:
    if not _TLS:
        from gevent import ssl

        _TLS.append(ssl.create_default_context())
    return _TLS[0]


def _reason(exc: OSError) -> str:
    """'connection refused' rather than '[Errno 111] Connection refused'."""
    if exc.strerror:
        return exc.strerror.lower()
    return str(exc) or exc.__class__.__name__


class Pool:
    """Idle keep-alive connections, a LIFO stack per endpoint URL.

    A connection is either checked out (owned by exactly one request) or idle here;
    nothing is shared between requests. Stacks are bounded by ``max_idle``: a released
    connection that does not fit is closed.
    """

    def __init__(self, connect_timeout: float, read_timeout: float, max_idle: int,
                 timers: bool = True) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        #: False: sockets get no timeout after connecting; the caller enforces
        #: ``read_timeout`` itself (the front door's sweeper does, without a timer per
        #: read).
        self.timers = timers
        self._idle: dict[str, list[Connection]] = {}
        self._targets: dict[str, Target] = {}
        self.closed = False

    def target(self, url: str) -> Target:
        target = self._targets.get(url)
        if target is None:
            target = Target(url)
            if len(self._targets) > 4096:  # endpoints come and go; do not grow forever
                self._targets.clear()
            self._targets[url] = target
        return target

    def acquire(self, url: str) -> Connection | None:
        """An idle connection to ``url`` recent enough to reuse and still in step, or None."""
        stack = self._idle.get(url)
        if not stack:
            return None
        oldest_ok = time.monotonic() - IDLE_TIMEOUT
        while stack:
            conn = stack.pop()
            if conn.idle_since >= oldest_ok and conn.usable():
                conn.reused = True
                return conn
            conn.close()
        return None

    def open(self, url: str) -> Connection:
        """A new connection; raises UpstreamConnectError.

        Out of descriptors, the oldest idle connections (to any endpoint) are closed and
        the connect tried once more: idle ones are a cache, and after a burst to one
        endpoint they would otherwise keep requests to another from getting a socket
        (503s) for up to IDLE_TIMEOUT, with the clients well under --max-connections.
        """
        target = self.target(url)
        timeout = self.read_timeout if self.timers else None
        try:
            return connect(target, self.connect_timeout, timeout)
        except OutOfDescriptors:
            self.shed(SHED_BATCH)
        # gevent closes a socket with a watcher from a loop callback: after this pause
        # the ones shed here, and those another request shed just before, are free
        gevent.sleep(0)
        return connect(target, self.connect_timeout, timeout)

    def shed(self, count: int) -> int:
        """Close up to ``count`` idle connections, the longest idle first (of whichever
        endpoints): descriptors ran out. Returns how many were closed."""
        idle = sorted((conn.idle_since, id(conn), conn)
                      for stack in self._idle.values() for conn in stack)[:count]
        for _since, _key, conn in idle:
            self._idle[conn.target.url].remove(conn)
            conn.close()
        return len(idle)

    def release(self, conn: Connection) -> None:
        """Take back a connection whose last response was read completely."""
        if conn.buf or self.closed:  # bytes past the response: the stream is out of step
            conn.close()
            return
        stack = self._idle.setdefault(conn.target.url, [])
        if len(stack) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        stack.append(conn)

    def retain(self, urls: Iterable[str]) -> int:
        """Close the idle connections of endpoints not in ``urls`` (they left the table:
        nothing would reuse them, and the endpoint's end would sit in CLOSE-WAIT).
        Returns how many were closed."""
        keep = set(urls)
        closed = 0
        for url in [u for u in self._idle if u not in keep]:
            for conn in self._idle.pop(url):
                conn.close()
                closed += 1
            self._targets.pop(url, None)
        return closed

    def reap(self) -> int:
        """Close the idle connections the endpoint closed meanwhile, or that idled past
        IDLE_TIMEOUT: unreaped, each holds a descriptor (in CLOSE-WAIT) until a request
        to that endpoint happens to pop it, up to ``max_idle`` per endpoint. Returns how
        many were closed."""
        oldest_ok = time.monotonic() - IDLE_TIMEOUT
        closed = 0
        for stack in self._idle.values():
            keep = [c for c in stack if c.idle_since >= oldest_ok and c.usable()]
            if len(keep) < len(stack):
                for conn in stack:
                    if conn not in keep:
                        conn.close()
                        closed += 1
                stack[:] = keep
        return closed

    def close(self) -> None:
        """Close every idle connection; checked-out ones close when their request ends."""
        self.closed = True
        idle, self._idle = self._idle, {}
        for stack in idle.values():
            for conn in stack:
                conn.close()

    def state(self) -> str:
        """'idle: 3 over 2 endpoints' (what the reprs show)."""
        idle = sum(len(stack) for stack in self._idle.values())
        endpoints = sum(1 for stack in self._idle.values() if stack)
        return f"idle: {idle} over {endpoints} endpoints"

    def __repr__(self) -> str:
        return f"<Pool [{self.state()}]>"
