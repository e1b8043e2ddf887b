"""WebSocket proxying: a transparent tunnel for upgraded connections.

The upgrade request goes upstream as an HTTP/1.1 request head; if the endpoint answers
``101``, that answer is copied to the client verbatim and from then on bytes are pumped
both ways, one greenlet per direction, until either side closes. Frames are never
parsed, so text, binary, fragments, ping/pong, close codes and reasons, subprotocols
and extensions pass exactly as the two ends wrote them. Any other answer (403, 404...)
reaches the client as an ordinary HTTP response.

nginx equivalent::

    proxy_http_version 1.1;
    proxy_set_header Upgrade $http_upgrade;
    proxy_set_header Connection "upgrade";
    proxy_read_timeout 1d;   # here: no idle timeout at all once upgraded

Known weak spots: no idle timeout after the upgrade (WebSocket apps ping on their own);
a peer that half-closes ends the whole tunnel (WebSocket has its own close handshake, so
nothing that speaks it needs half-open TCP); https endpoints use the default TLS context
and are not covered by the end-to-end tests.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import urlsplit

import gevent
from gevent import socket as gsocket
from gevent.event import AsyncResult

from cluster.errors import UpstreamBroken, UpstreamConnectError, UpstreamTimeout
from cluster.handler import HIJACK_KEY, set_nodelay

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


def is_websocket_upgrade(environ: dict[str, Any]) -> bool:
    """True for ``GET`` with ``Upgrade: websocket`` and ``Connection: upgrade`` (RFC 6455 4.1)."""
    if environ.get("REQUEST_METHOD") != "GET":
        return False
    upgrade = _tokens(environ.get("HTTP_UPGRADE", ""))
    return "websocket" in upgrade and "upgrade" in _tokens(environ.get("HTTP_CONNECTION", ""))


def _tokens(value: str) -> set[str]:
    return {part.strip().lower() for part in value.split(",") if part.strip()}


def _header_name(key: str) -> str:
    """``HTTP_SEC_WEBSOCKET_KEY`` -> ``Sec-WebSocket-Key`` (names are case-insensitive,
    but some servers are not)."""
    name = "-".join(part.capitalize() for part in key[5:].split("_"))
    return name.replace("Websocket", "WebSocket")


def _check_value(text: str) -> str:
    if "\r" in text or "\n" in text:
        raise ValueError(f"CR or LF in header or request target: {text!r}")
    return text


def upgrade_request_head(environ: dict[str, Any], path_qs: str, endpoint_host: str,
                         add_headers: Sequence[tuple[str, str]] = (),
                         preserve_host: bool = True) -> bytes:
    """The request head sent upstream: end-to-end headers, this hop's Upgrade/Connection,
    X-Forwarded-*, Via, then ``add_headers`` (replacing any same-named header).

    Host is the client's when ``preserve_host`` and it sent one, else ``endpoint_host``
    (host:port). Proxy-* headers stop here (hop-by-hop, and httpoxy), as in the HTTP
    forwarder. Raises ValueError when ``path_qs`` or an added header would break the head.
    """
    if not path_qs.startswith("/") or " " in path_qs:
        raise ValueError(f"bad request target: {path_qs!r}")
    dropped = HOP_BY_HOP | _tokens(environ.get("HTTP_CONNECTION", ""))
    headers: list[tuple[str, str]] = []
    for key, value in environ.items():
        if not key.startswith("HTTP_"):
            continue
        name = _header_name(key)
        lower = name.lower()
        if (lower in dropped or lower.startswith("proxy") or lower == "host"
                or lower in ("via", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")):
            continue
        headers.append((name, value))
    client_host = environ.get("HTTP_HOST")
    headers.insert(0, ("Host", client_host if preserve_host and client_host else endpoint_host))
    for key, name in (("CONTENT_TYPE", "Content-Type"), ("CONTENT_LENGTH", "Content-Length")):
        if environ.get(key):
            headers.append((name, environ[key]))

    headers.append(("Upgrade", environ.get("HTTP_UPGRADE", "websocket")))
    headers.append(("Connection", "Upgrade"))
    remote = environ.get("REMOTE_ADDR", "")
    forwarded_for = environ.get("HTTP_X_FORWARDED_FOR")
    if remote:
        forwarded_for = f"{forwarded_for}, {remote}" if forwarded_for else remote
    if forwarded_for:
        headers.append(("X-Forwarded-For", forwarded_for))
    proto = environ.get("HTTP_X_FORWARDED_PROTO") or environ.get("wsgi.url_scheme", "http")
    headers.append(("X-Forwarded-Proto", proto))
    forwarded_host = environ.get("HTTP_X_FORWARDED_HOST") or environ.get("HTTP_HOST")
    if forwarded_host:
        headers.append(("X-Forwarded-Host", forwarded_host))
    via = environ.get("HTTP_VIA")
    headers.append(("Via", f"{via}, {VIA}" if via else VIA))

    replaced = {name.lower() for name, _ in add_headers}
    headers = [(n, v) for n, v in headers if n.lower() not in replaced]
    headers.extend(add_headers)

    lines = [f"{environ.get('REQUEST_METHOD', 'GET')} {_check_value(path_qs)} HTTP/1.1"]
    lines.extend(f"{_check_value(name)}: {_check_value(value)}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse_response_head(head: bytes) -> tuple[int, str, list[tuple[str, str]]]:
    """``HTTP/1.1 403 Forbidden\\r\\nA: b\\r\\n\\r\\n`` -> ``(403, 'Forbidden', [('A', 'b')])``.

    Raises ValueError on anything that is not an HTTP/1.x status line and header lines.
    """
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"bad status line: {lines[0][:80]!r}")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ValueError(f"bad header line: {line[:80]!r}")
        headers.append((name, value.strip()))
    return int(parts[1]), parts[2] if len(parts) > 2 else "", headers


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


class _Reader:
    """Buffered reads from the upstream socket for the handshake and a refusal body."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.buf = b""

    def fill(self) -> bool:
        data = self.sock.recv(CHUNK)
        self.buf += data
        return bool(data)

    def head(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head, self.buf = self.buf[:end + 4], self.buf[end + 4:]
                return head
            if len(self.buf) > MAX_HEAD:
                raise ValueError("response head too large")
            if not self.fill():
                raise EOFError("closed before the end of the response head")

    def exactly(self, size: int) -> bytes:
        while len(self.buf) < size:
            if not self.fill():
                raise EOFError("closed in the middle of the body")
        data, self.buf = self.buf[:size], self.buf[size:]
        return data

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if len(self.buf) > MAX_HEAD or not self.fill():
                raise EOFError("bad chunked body")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def body(self, status: int, headers: list[tuple[str, str]]) -> bytes:
        if status in (204, 304) or 100 <= status < 200:
            return b""
        if "chunked" in (_header(headers, "transfer-encoding") or "").lower():
            out = b""
            while True:
                size = int(self.line().split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.line():
                        pass  # trailers: dropped
                    return out
                out += self.exactly(size)
                self.exactly(2)
                if len(out) > MAX_REFUSAL_BODY:
                    raise ValueError("refusal body too large")
        length = _header(headers, "content-length")
        if length is not None:
            if int(length) > MAX_REFUSAL_BODY:
                raise ValueError("refusal body too large")
            return self.exactly(int(length))
        while len(self.buf) <= MAX_REFUSAL_BODY and self.fill():
            pass
        return self.buf[:MAX_REFUSAL_BODY]


def _close(sock: Any) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _pump(src: Any, dst: Any) -> int:
    """Copy ``src`` to ``dst`` until either fails or ``src`` ends; close both; return bytes.

    Closing both wakes the other direction's greenlet blocked on its socket (gevent
    cancels waits on a closed socket), so one closed side ends the whole tunnel.
    """
    moved = 0
    fast = _plain_gevent_socket(src) and _plain_gevent_socket(dst)
    try:
        while True:
            data = _wait_and_recv(src) if fast else src.recv(CHUNK)
            if not data:
                break
            if fast:
                _send(dst, data)
            else:
                dst.sendall(data)
            moved += len(data)
    except OSError:
        pass  # reset, broken pipe, or the other pump closed the socket under us
    finally:
        _close(src)
        _close(dst)
    return moved


# The fast path, for gevent's own plain sockets: a third less CPU per relayed message.
# gevent's ``sock.recv`` first tries the read and, on EAGAIN, raises, catches and waits:
# for WebSocket traffic (small messages, idle in between) every message costs a failed
# syscall and an exception. Waiting for readability first and then reading the real
# socket avoids both; a send goes straight to the real socket too. This relies on gevent
# socket internals (``_sock``, ``_wait``, ``_read_event``; there since gevent 1.x) and
# tests/test_websocket.py checks that they are still there.


def _plain_gevent_socket(sock: Any) -> bool:
    """True for gevent's own TCP socket (not TLS) with the internals the fast path uses."""
    return type(sock) is gsocket.socket and all(
        hasattr(sock, name) for name in ("_sock", "_wait", "_read_event"))


def _wait_and_recv(sock: Any) -> bytes:
    readable = sock._read_event
    if readable is None:
        return b""  # closed by the other direction
    sock._wait(readable)
    data: bytes = sock._sock.recv(CHUNK)
    return data


def _send(sock: Any, data: bytes) -> None:
    try:
        sent = sock._sock.send(data)
    except BlockingIOError:
        sent = 0
    if sent < len(data):
        sock.sendall(data[sent:])  # buffer full: let gevent wait for room


def _pump_into(src: Any, dst: Any, result: AsyncResult) -> None:
    moved = 0
    try:
        moved = _pump(src, dst)
    finally:
        result.set(moved)  # even if _pump failed in an unexpected way: never a hung join


class WebSocketBridge:
    """Tunnels upgraded connections to endpoints; one instance serves a whole process.

    ``connect_timeout`` bounds the TCP connect, ``handshake_timeout`` the exchange of
    upgrade request and response head (and a refusal body). There is no timeout once the
    tunnel is open.
    """

    def __init__(self, connect_timeout: float = 5.0, handshake_timeout: float = 10.0,
                 preserve_host: bool = True) -> None:
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
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
               add_headers: Sequence[tuple[str, str]] = ()) -> Iterable[bytes]:
        """Proxy the upgrade request in ``environ`` to ``endpoint_url`` + ``path_qs``.

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

        parts = urlsplit(endpoint_url)
        tls = parts.scheme in ("https", "wss")
        host, port = parts.hostname or "127.0.0.1", parts.port or (443 if tls else 80)
        netloc = parts.netloc.rpartition("@")[2]
        head = upgrade_request_head(environ, path_qs, netloc, add_headers, self.preserve_host)
        upstream = self._connect(endpoint_url, host, port, tls)
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
        first = response_head + reader.buf  # the 101 head, and any frame already behind it
        # This frame lives as long as the tunnel: drop what an idle tunnel does not need.
        del head, response_head, headers, reader, body, parts
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
            self._tunnel(client, upstream, endpoint_url)
        except OSError as exc:
            log.debug("tunnel to %s ended early: %s", endpoint_url, exc)
        finally:
            self.open -= 1
            _close(client)
            _close(upstream)
        return []

    def _connect(self, endpoint_url: str, host: str, port: int, tls: bool) -> Any:
        try:
            sock = gsocket.create_connection((host, port), timeout=self.connect_timeout)
        except socket.timeout as exc:
            error = UpstreamTimeout(endpoint_url, f"connect timed out: {exc}")
            error.retryable = True  # nothing was sent
            raise error from exc
        except OSError as exc:
            raise UpstreamConnectError(endpoint_url, f"connect failed: {exc}") from exc
        set_nodelay(sock)
        if tls:
            from gevent import ssl

            try:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            except (OSError, ssl.SSLError) as exc:
                _close(sock)
                raise UpstreamConnectError(endpoint_url, f"TLS failed: {exc}") from exc
        return sock

    def _handshake(self, endpoint_url: str, upstream: Any,
                   head: bytes) -> tuple[int, bytes, list[tuple[str, str]], _Reader, bytes]:
        reader = _Reader(upstream)
        upstream.settimeout(None)
        try:
            with gevent.Timeout(self.handshake_timeout) as timer:
                upstream.sendall(head)
                while True:
                    response_head = reader.head()
                    status, _reason, headers = parse_response_head(response_head)
                    if status == 101 or not 100 <= status < 200:
                        break  # skip stray 1xx such as 100 Continue
                # A refusal body is read now, still under the timer.
                body = b"" if status == 101 else reader.body(status, headers)
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            raise UpstreamTimeout(endpoint_url, "no upgrade answer in time") from None
        except (OSError, EOFError, ValueError) as exc:
            raise UpstreamBroken(endpoint_url, f"upgrade handshake failed: {exc}") from exc
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

    def _tunnel(self, client: Any, upstream: Any, endpoint_url: str) -> None:
        """Pump both ways: client->endpoint in a new greenlet, endpoint->client in this
        one (the request's own greenlet would otherwise sit idle in a join, holding its
        stack anyway); returns when both directions are done.

        spawn_raw rather than spawn: a Greenlet records its spawning stack and tree
        (about 3.8 KB each, measured), which an idle tunnel has no use for.
        """
        sent: AsyncResult = AsyncResult()
        gevent.spawn_raw(_pump_into, client, upstream, sent)
        down = 0
        try:
            down = _pump(upstream, client)
        finally:
            _close(client)
            _close(upstream)
            up = sent.get()
        log.debug("websocket to %s closed: %d bytes up, %d down", endpoint_url, up, down)
