"""Upstream connections and the per-endpoint pool of idle keep-alive ones.

Raw gevent sockets rather than an HTTP client library: the proxy needs TCP_NODELAY,
one socket per in-flight request, byte-exact control of what was sent (to know when a
retry is safe) and as little Python per request as possible. The protocol on top of
these sockets lives in :mod:`cluster.proxy.http`.

Timeouts are socket timeouts: the connect timeout while connecting, then the read
timeout for every later send and recv. That is exactly an idle timeout ("silent for
longer than N seconds"), the meaning nginx gives ``proxy_read_timeout``, and it costs
no timer object per request the way ``gevent.Timeout`` would on this hot path.
"""

from __future__ import annotations

import ipaddress
import logging
import socket as stdsocket
import time
from typing import Any
from urllib.parse import urlsplit

from gevent import socket as gsocket

from cluster.errors import UpstreamConnectError

log = logging.getLogger(__name__)

#: An idle connection older than this is not reused: the upstream may be about to close
#: it (nginx's upstream ``keepalive_timeout`` is 60 s), and a reused connection that
#: the upstream closes under us costs a retry or, for a streamed body, an error.
IDLE_TIMEOUT = 30.0


class Target:
    """Where an endpoint URL points: parsed once, then cached by the pool."""

    __slots__ = ("url", "host", "port", "hostport", "family", "literal")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            # https upstreams would need TLS here; endpoints are plain http by design.
            raise UpstreamConnectError(url, "not an http://host[:port] endpoint URL")
        self.url = url
        self.host: str = parts.hostname
        self.port: int = parts.port or 80
        self.hostport = parts.netloc.rsplit("@", 1)[-1]
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

    __slots__ = ("sock", "target", "buf", "idle_since", "reused")

    def __init__(self, sock: Any, target: Target) -> None:
        self.sock = sock
        self.target = target
        self.buf = b""
        self.idle_since = 0.0
        self.reused = False

    def close(self) -> None:
        self.sock.close()

    def __repr__(self) -> str:
        state = "closed" if self.sock.fileno() < 0 else "open"
        return f"<Connection {self.target.url} {state}{' reused' if self.reused else ''}>"


def connect(target: Target, connect_timeout: float, read_timeout: float) -> Connection:
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
        raise UpstreamConnectError(target.url, f"connect failed: {exc}") from exc
    sock.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, 1)
    sock.settimeout(read_timeout)
    return Connection(sock, target)


class Pool:
    """Idle keep-alive connections, a LIFO stack per endpoint URL.

    A connection is either checked out (owned by exactly one request) or idle here;
    nothing is shared between requests. Stacks are bounded by ``max_idle``: a released
    connection that does not fit is closed.
    """

    def __init__(self, connect_timeout: float, read_timeout: float, max_idle: int) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
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
        """An idle connection to ``url`` recent enough to reuse, or None."""
        stack = self._idle.get(url)
        if not stack:
            return None
        oldest_ok = time.monotonic() - IDLE_TIMEOUT
        while stack:
            conn = stack.pop()
            if conn.idle_since >= oldest_ok:
                conn.reused = True
                return conn
            conn.close()
        return None

    def open(self, url: str) -> Connection:
        """A new connection; raises UpstreamConnectError."""
        return connect(self.target(url), self.connect_timeout, self.read_timeout)

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
