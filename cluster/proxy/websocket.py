"""WebSocket proxying: a transparent tunnel for upgraded connections.

The upgrade request goes upstream as an HTTP/1.1 request head; if the endpoint answers
``101``, that answer is copied to the client verbatim and from then on bytes are pumped
both ways by the front door's :class:`~cluster.proxy.tunnel.Tunnel` (a half-close is
passed on), or for TLS sockets by one greenlet per direction until either side closes.
Frames are never
parsed, so text, binary, fragments, ping/pong, close codes and reasons, subprotocols
and extensions pass exactly as the two ends wrote them. Any other answer (403, 404...)
reaches the client as an ordinary HTTP response.

nginx equivalent::

    proxy_http_version 1.1;
    proxy_set_header Upgrade $http_upgrade;
    proxy_set_header Connection "upgrade";
    proxy_read_timeout 1d;   # here: no idle timeout at all once upgraded

Known weak spots: no idle timeout after the upgrade (WebSocket apps ping on their own);
over TLS a peer that half-closes ends the whole tunnel; https endpoints use the default
TLS context.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Sequence

import gevent
from gevent.event import AsyncResult, Event

from cluster.errors import UpstreamBroken, UpstreamTimeout, dropping
from cluster.handler import HIJACK_KEY, is_websocket_upgrade  # noqa: F401 (re-exported)
from cluster.http1 import (
    CHUNKED,
    FIXED,
    NO_BODY,
    ChunkedScanner,
    crlf_head,
    find_response_head,
    head_from_environ,
    response_framing,
)
from cluster.http1 import parse_response_head as parse_head
from cluster.placement import load_field
from cluster.proxy.attempts import closes_new
from cluster.proxy.relay import Forwarding, request_head
from cluster.proxy.tunnel import Tunnel, _close, _pump
from cluster.proxy.upstream import Target, connect
from cluster.trust import peer_address

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]

#: Largest upstream response head accepted (nginx's default large buffer is 8k x 4).
MAX_HEAD = 65536
#: Largest refusal body relayed (a 403 page, not a download).
MAX_REFUSAL_BODY = 1 << 20
#: recv size of the pumps; the bytes object is only allocated while data is there.
CHUNK = 65536

#: RFC 9110 7.6.1 plus the legacy ones; never forwarded as they are.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade",
})
VIA = "1.1 cluster"


_FORWARDING: dict[frozenset[str], Forwarding] = {}


def upgrade_request_head(environ: dict[str, Any], path_qs: str, endpoint_host: str,
                         add_headers: Sequence[tuple[str, str]] = (),
                         preserve_host: bool = True,
                         trusted_proxies: frozenset[str] = frozenset({"127.0.0.1", "::1"})
                         ) -> bytes:
    """The request head sent upstream, built by the same code as every proxied head
    (cluster.proxy.relay.request_head): end-to-end headers, this hop's Upgrade and
    Connection, X-Forwarded-* (the client's only from a trusted peer), Via, then
    ``add_headers`` (replacing any same-named header).

    Host is the client's when ``preserve_host`` and it sent one, else ``endpoint_host``
    (host:port). Raises ValueError when ``path_qs`` or an added header would break the
    head.
    """
    if not path_qs.startswith("/") or " " in path_qs or "\r" in path_qs or "\n" in path_qs:
        raise ValueError(f"bad request target: {path_qs!r}")
    head = head_from_environ(environ, path_qs.encode("latin-1"))
    if not head.upgrade:
        head.upgrade = b"websocket"
    names: set[bytes] = set()
    for name, value in add_headers:
        if "\r" in name or "\n" in name or "\r" in value or "\n" in value or ":" in name:
            raise ValueError(f"CR or LF in header {name!r}: {value!r}")
        names.add(name.lower().encode("latin-1"))
    forwarding = _FORWARDING.get(trusted_proxies)
    if forwarding is None:
        forwarding = _FORWARDING.setdefault(trusted_proxies, Forwarding(trusted_proxies))
    forwarded = forwarding.lines(head, peer_address(str(environ.get("REMOTE_ADDR") or "")))
    forwarded = [f for f in forwarded if f.partition(b":")[0].lower() not in names]
    head.fields = [f for f in head.fields if f.partition(b":")[0].lower() not in names]
    if not preserve_host:
        head.host = b""
    framing = b""
    if head.content_length >= 0:
        framing = b"Content-Length: %d" % head.content_length
    extra = "\r\n".join(f"{name}: {value}" for name, value in add_headers)
    return request_head(head, head.target, endpoint_host.encode("latin-1"), forwarded,
                        extra.encode("latin-1"), framing, upgrade=True)


def parse_response_head(head: bytes) -> tuple[int, str, list[tuple[str, str]]]:
    """``HTTP/1.1 403 Forbidden\\r\\nA: b\\r\\n\\r\\n`` -> ``(403, 'Forbidden', [('A', 'b')])``:
    cluster.http1's parse, as (status, reason, end-to-end headers plus Upgrade).

    Raises ValueError on anything that is not an HTTP/1.x status line and header lines.
    """
    parsed = parse_head(head[:-4] if head.endswith(b"\r\n\r\n") else head)
    reason = parsed.status_line[13:].decode("latin-1")
    headers = parsed.field_pairs()
    if parsed.upgrade:
        headers.insert(0, ("Upgrade", parsed.upgrade.decode("latin-1")))
    return parsed.code, reason, headers


class _Reader:
    """Buffered reads from the upstream socket for the handshake and a refusal body."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.buf = b""
        self.got = False  # any byte from the endpoint yet

    def fill(self) -> bool:
        data = self.sock.recv(CHUNK)
        self.got = self.got or bool(data)
        self.buf += data
        return bool(data)

    def head(self) -> bytes:
        """The next response head, its lines ended by CRLF, with the blank line. Lines
        that end in a bare LF are taken too (RFC 9112 2.2), as the door takes them: a
        101 so written was waited on until the handshake timeout (a 504)."""
        while True:
            end, sep = find_response_head(self.buf)
            if end > MAX_HEAD:  # its end came in a later read than the check below
                raise ValueError("response head too large")
            if end >= 0:
                head = crlf_head(self.buf[:end]) + b"\r\n\r\n"
                self.buf = self.buf[end + sep:]
                return head
            if len(self.buf) > MAX_HEAD:
                raise ValueError("response head too large")
            if not self.fill():
                raise EOFError("closed before the end of the response head")

    def body(self, code: int, parsed: Any) -> bytes:
        """A refusal's body, framed as cluster.http1 says, at most MAX_REFUSAL_BODY."""
        mode, length = response_framing(b"GET", parsed)
        if mode == NO_BODY:
            return b""
        if mode == CHUNKED:
            scanner = ChunkedScanner(decode=True)
            out: list[bytes] = []
            size = 0
            buf, self.buf = self.buf, b""
            while True:
                used, pieces = scanner.feed(buf)
                out += pieces
                size += sum(map(len, pieces))
                if size > MAX_REFUSAL_BODY:
                    raise ValueError("refusal body too large")
                if scanner.done:
                    return b"".join(out)
                buf = self.sock.recv(CHUNK)
                if not buf:
                    raise EOFError("closed in the middle of the body")
        if mode == FIXED:
            if length > MAX_REFUSAL_BODY:
                raise ValueError("refusal body too large")
            while len(self.buf) < length:
                if not self.fill():
                    raise EOFError("closed in the middle of the body")
            return self.buf[:length]
        # Until close: more than the limit is refused as the framed modes are (cut to
        # the limit, it went out with a Content-Length saying that was all of it).
        while len(self.buf) <= MAX_REFUSAL_BODY and self.fill():
            pass
        if len(self.buf) > MAX_REFUSAL_BODY:
            raise ValueError("refusal body too large")
        return self.buf


def _pump_into(src: Any, dst: Any, result: AsyncResult, write_timeout: float = 0.0) -> None:
    moved = 0
    try:
        moved = _pump(src, dst, write_timeout)
    finally:
        result.set(moved)  # even if _pump failed in an unexpected way: never a hung join


class WebSocketBridge:
    """Tunnels upgraded connections to endpoints; one instance serves a whole process.

    ``connect_timeout`` bounds the TCP connect, ``handshake_timeout`` the exchange of
    upgrade request and response head (and a refusal body). Once the tunnel is open
    there is no idle timeout; ``write_timeout`` (0: none) closes a plain-TCP tunnel one
    side of which takes nothing of what is sent to it for that long.
    """

    def __init__(self, connect_timeout: float = 5.0, handshake_timeout: float = 10.0,
                 preserve_host: bool = True, write_timeout: float = 0.0,
                 trusted_proxies: frozenset[str] = frozenset({"127.0.0.1", "::1"})
                 ) -> None:
        self.connect_timeout = connect_timeout
        #: --trusted-proxies: whose X-Forwarded-* go upstream as they came
        self.trusted_proxies = trusted_proxies
        self.handshake_timeout = handshake_timeout
        self.write_timeout = write_timeout
        #: True: the client's Host goes upstream (as meteorhacks:cluster's http-proxy
        #: does); False: the endpoint's host:port (nginx's default).
        self.preserve_host = preserve_host
        self.open = 0
        self.served = 0
        self.refused = 0

    def __repr__(self) -> str:
        return (f"<WebSocketBridge [open: {self.open} | served: {self.served} | "
                f"refused: {self.refused}]>")

    def bridge(self, environ: dict[str, Any], start_response: StartResponse,
               endpoint_url: str, path_qs: str,
               add_headers: Sequence[tuple[str, str]] = (),
               answer_headers: Sequence[tuple[str, str]] = ()) -> Iterable[bytes]:
        """Proxy the upgrade request in ``environ`` to ``endpoint_url`` + ``path_qs``;
        ``answer_headers`` (a new session's sticky cookie) go on the endpoint's 101.

        After a 101 the connection has been pumped to completion when this returns, and
        the returned iterable is empty (the handler knows the connection was taken).
        Another answer from the endpoint is returned as a normal WSGI response.

        Raises UpstreamConnectError (nothing was sent: another endpoint may be tried),
        UpstreamTimeout (connect or handshake too slow) or UpstreamBroken (the endpoint
        closed or garbled the handshake); ValueError when ``path_qs`` or ``add_headers``
        hold CR/LF or ``path_qs`` is not a path. Needs ClusterHandler: under another
        server the answer is 501.
        """
        hijack = environ.get(HIJACK_KEY)
        if hijack is None:
            log.warning("WebSocket upgrade on a server without cluster.handler.ClusterHandler")
            body = b"WebSocket proxying needs cluster.handler.ClusterHandler\n"
            start_response("501 Not Implemented", [("Content-Type", "text/plain"),
                                                   ("Content-Length", str(len(body)))])
            return [body]

        netloc = Target(endpoint_url).hostport
        head = upgrade_request_head(environ, path_qs, netloc, add_headers, self.preserve_host,
                                    self.trusted_proxies)
        upstream = self._connect(endpoint_url)
        try:
            status, response_head, headers, reader, body = self._handshake(
                endpoint_url, upstream, head)
        except BaseException:
            _close(upstream)
            raise
        if status != 101:
            _close(upstream)
            return self._refusal(start_response, status, response_head, headers, body)

        client, early = hijack("101 Switching Protocols")
        # the endpoint's live load is for a balancer's placement, never for the client
        # (this one's placement keeps no live figures: cluster.app)
        _, response_head = load_field(response_head)
        if answer_headers:
            response_head = response_head[:-2] + b"".join(
                f"{name}: {value}\r\n".encode("latin-1") for name, value in answer_headers
            ) + b"\r\n"
        first = response_head + reader.buf  # the 101 head, and any frame already behind it
        frames = bytes(reader.buf)  # the endpoint's, the tunnel follows them
        # This frame lives as long as the tunnel: drop what an idle tunnel does not need.
        del head, response_head, headers, reader, body
        self.open += 1
        self.served += 1
        try:
            # No idle timeout once upgraded (the server may have set one on the client).
            client.settimeout(None)
            upstream.settimeout(None)
            client.sendall(first)
            del first
            if early:
                upstream.sendall(early)
            del early
            self._tunnel(client, upstream, endpoint_url, frames)
        except OSError as exc:
            log.debug("tunnel to %s ended early: %s", endpoint_url, exc)
        finally:
            self.open -= 1
            _close(client)
            _close(upstream)
        return []

    def _connect(self, endpoint_url: str) -> Any:
        """A connection from the shared connect layer (http or https alike); raises
        UpstreamConnectError (nothing sent: another endpoint may be tried)."""
        conn = connect(Target(endpoint_url), self.connect_timeout, None)
        return conn.sock

    def _handshake(self, endpoint_url: str, upstream: Any,
                   head: bytes) -> tuple[int, bytes, list[tuple[str, str]], _Reader, bytes]:
        reader = _Reader(upstream)
        upstream.settimeout(None)
        try:
            with gevent.Timeout(self.handshake_timeout) as timer:
                upstream.sendall(head)
                while True:
                    response_head = reader.head()
                    parsed = parse_head(response_head[:-4])
                    status = parsed.code
                    if status == 101 or not 100 <= status < 200:
                        break  # skip stray 1xx such as 100 Continue
                headers = parsed.field_pairs()
                # A refusal body is read now, still under the timer.
                body = b"" if status == 101 else reader.body(status, parsed)
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            raise UpstreamTimeout(endpoint_url, "no upgrade answer in time") from None
        except (OSError, EOFError, ValueError) as exc:
            raise dropping(UpstreamBroken(endpoint_url, f"upgrade handshake failed: {exc}"),
                           not reader.got and not isinstance(exc, ValueError)
                           and closes_new(endpoint_url, self.connect_timeout)) from exc
        return status, response_head, headers, reader, body

    def _refusal(self, start_response: StartResponse, status: int, head: bytes,
                 headers: list[tuple[str, str]], body: bytes) -> list[bytes]:
        """Relay a non-101 answer; the connection is then closed, since the client may
        already have sent frames behind its upgrade request."""
        self.refused += 1
        reason = head.split(b"\r\n", 1)[0].split(b" ", 2)[2:]
        status_line = f"{status} {reason[0].decode('latin-1') if reason else ''}".rstrip()
        out = [(n, v) for n, v in headers
               if n.lower() not in HOP_BY_HOP and n.lower() != "content-length"]
        out.append(("Content-Length", str(len(body))))
        out.append(("Connection", "close"))
        start_response(status_line, out)
        return [body]

    def _tunnel(self, client: Any, upstream: Any, endpoint_url: str,
                frames: bytes = b"") -> None:
        """Pump both ways until both are done. Plain sockets go through the front
        door's :class:`~cluster.proxy.tunnel.Tunnel`, which passes a half-close on (a
        client still sending after the endpoint closed, or answering its close frame,
        is not reset); this greenlet waits for it. TLS sockets, which cannot be
        half-closed, are pumped client->endpoint in a new greenlet and endpoint->client
        in this one, and end on the first EOF.

        spawn_raw rather than spawn: a Greenlet records its spawning stack and tree
        (about 3.8 KB each, measured), which an idle tunnel has no use for.
        """
        if Tunnel.supports(client, upstream):
            ended = Event()
            Tunnel(client, upstream, ended.set, self.write_timeout, frames).start()
            del frames
            ended.wait()
            log.debug("websocket to %s closed", endpoint_url)
            return
        sent: AsyncResult = AsyncResult()
        gevent.spawn_raw(_pump_into, client, upstream, sent, self.write_timeout)
        down = 0
        try:
            down = _pump(upstream, client, self.write_timeout)
        finally:
            _close(client)
            _close(upstream)
            up = sent.get()
        log.debug("websocket to %s closed: %d bytes up, %d down", endpoint_url, up, down)
