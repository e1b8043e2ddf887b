"""Streaming HTTP/1.1 forwarding of one WSGI request to one endpoint: the WSGI adapter's
proxy (``cluster.wrap()`` under a server we do not own; the front door relays bytes
itself, in cluster.proxy.relay). Both build heads and read framing with cluster.http1
and connect through cluster.proxy.upstream, so http and https endpoints work alike.

:class:`HttpForwarder` sends the request (head, then the body streamed from
``wsgi.input``) over a pooled keep-alive connection and returns as soon as the upstream
status line and headers are read; the response body is an iterator that yields each
piece as it arrives, so the WSGI server writes it to the client at the client's pace
(a slow client stalls the iterator, the upstream socket fills, the upstream waits:
back-pressure end to end, nothing buffered here). nginx equivalent::

    proxy_http_version 1.1; proxy_set_header Connection "";   # keep-alive upstream
    proxy_buffering off; proxy_request_buffering off;          # stream both ways
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; ...
    keepalive 32;  # in the upstream block: max_idle_per_endpoint

Policy choices and known weak spots:

- ``Expect: 100-continue`` is answered by the WSGI server (pywsgi sends the 100 when
  the body is first read) and is not forwarded: the upstream always gets the body
  straight after the head, so it cannot refuse a large upload before it is sent. In
  exchange there is no waiting on an upstream 100 that may never come. Any interim
  1xx the upstream sends anyway is skipped; 101 is a protocol error here because the
  Upgrade header is never forwarded (WebSocket goes through the WebSocket bridge).
- Bodies up to :data:`BUFFER_LIMIT` with a Content-Length are read before connecting,
  which makes them replayable: such a request, like a bodyless one, is retried once
  on a fresh connection when a reused keep-alive connection turns out to be closed
  (EOF or reset before any response byte). Larger or chunked bodies are streamed and
  cannot be replayed, so they always go over a fresh connection.
- The request body is sent completely before the response is read (one greenlet per
  request). An upstream that answers early and closes (413) is handled: its response
  is read after the failed send. An upstream that answers early but neither reads the
  rest nor closes stalls the request until the read timeout.
- Chunked request bodies are re-chunked in pieces of up to 64 KiB: fine for uploads,
  but a trickling chunked upload reaches the upstream in 64 KiB steps, not per chunk.
- A response with a Transfer-Encoding other than plain ``chunked`` or with obsolete
  header line folding is refused as broken (502) rather than mangled; a head whose
  lines end in bare LF is accepted (RFC 9112 2.2).
- A HEAD response that carried no Content-Length gets ``Content-Length: 0`` from
  pywsgi (the alternative, its chunked framing, would put body bytes after a HEAD).
- A connection that carried a HEAD is closed, not pooled: pywsgi, for one, sends the
  body of a HEAD response anyway.
- ``Via: 1.1 cluster`` is added to requests only (as nginx, which adds none at all).
"""

from __future__ import annotations

import errno
import functools
import logging
import socket as stdsocket
from typing import Any, Iterator, Sequence
from urllib.parse import quote

from cluster.config import host_port
from cluster.errors import (
    UpstreamBroken,
    UpstreamError,
    UpstreamTimeout,
    dropping,
    misbehaving,
)
from cluster.http1 import (
    CHUNKED,
    FIXED,
    MAX_INTERIM,
    NO_BODY,
    UNTIL_CLOSE,
    ChunkedScanner,
    ChunkError,
    crlf_head,
    find_response_head,
    head_from_environ,
    parse_response_head,
    plain_chunked,
    response_framing,
)
from cluster.proxy.attempts import closes_new
from cluster.proxy.relay import (
    Forwarding,
    closed_before_head,
    no_status_line,
    not_http,
    open_after_stale,
    request_head,
)
from cluster.proxy.upstream import Connection, Pool
from cluster.trust import peer_address

log = logging.getLogger(__name__)

#: Request bodies up to this size (with a Content-Length) are read first, so a
#: request can be replayed on a fresh connection when a pooled one is found dead.
BUFFER_LIMIT = 64 * 1024
#: environ key holding a small request body already read from wsgi.input.
BODY_KEY = "cluster.body"
#: Largest piece read from a socket or wsgi.input at once (see cluster.netio).
RECV_SIZE = 64 * 1024
INPUT_CHUNK = 64 * 1024
#: A response head larger than this is refused (nginx's default is 4-8 KiB).
MAX_HEAD = 64 * 1024

_FRAMING_AND_HOP = frozenset({"content-length", "transfer-encoding", "connection",
                               "keep-alive", "te", "trailer", "upgrade", "expect"})


@functools.lru_cache(maxsize=64)
def _added_lines(add_headers: tuple[tuple[str, str], ...]) -> tuple[bytes, frozenset[bytes]]:
    """(the CRLF-joined lines, their lower-case names) for ``add_headers``.

    Callers pass the same few tuples on every request (the hop marker), so the check
    is made once per distinct tuple, not once per request. ValueError for framing,
    hop-by-hop or malformed ones (a caller's mistake that would corrupt the request).
    """
    names = set()
    for name, value in add_headers:
        lname = name.lower()
        if lname in _FRAMING_AND_HOP or not name or any(c in name for c in ":\r\n \t") or \
                "\r" in value or "\n" in value:
            raise ValueError(f"cannot add header {name!r}: {value!r}")
        names.add(lname.encode("latin-1"))
    lines = "\r\n".join(f"{name}: {value}" for name, value in add_headers)
    return lines.encode("latin-1"), frozenset(names)


def request_target(environ: dict[str, Any]) -> str:
    """The request-target to send upstream: the raw one when the server kept it
    (gunicorn's RAW_URI, REQUEST_URI), else SCRIPT_NAME + PATH_INFO re-quoted."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        return str(raw)
    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    # PEP 3333 strings are latin-1 decoded bytes: quote those bytes back.
    target = quote(path.encode("latin-1"), safe="/;=,:@!$&'()*+~") or "/"
    query = environ.get("QUERY_STRING")
    return f"{target}?{query}" if query else target


class UpstreamBodyAborted(UpstreamBroken, ConnectionResetError):
    """The upstream failed in the middle of a response body.

    Also a ConnectionResetError (errno ECONNRESET) on purpose: pywsgi then closes the
    client connection quietly instead of printing a traceback, and the client sees a
    truncated response rather than a complete-looking one. It is logged once, here.
    """

    answered = True

    def __init__(self, endpoint: str, reason: str) -> None:
        UpstreamBroken.__init__(self, endpoint, reason)
        self.args = (errno.ECONNRESET, f"{endpoint}: {reason}")
        self.errno = errno.ECONNRESET

    def __str__(self) -> str:
        return f"{self.endpoint}: {self.reason}"


class _Stale(Exception):
    """A reused connection was found closed before any response byte: retry fresh."""


class _Complete(list):  # type: ignore[type-arg]
    """A body already read whole (or empty); pywsgi may take its length."""

    def close(self) -> None:
        pass


_EMPTY = _Complete()


class UpstreamResponse:
    """Status line and headers of an upstream response, ready for start_response."""

    __slots__ = ("status", "headers", "body", "endpoint")

    def __init__(self, status: str, headers: list[tuple[str, str]], body: Any,
                 endpoint: str) -> None:
        self.status = status
        self.headers = headers
        #: Iterable[bytes] with close(); the connection goes back to the pool when the
        #: body was read whole and the upstream keeps it alive, else it is closed.
        self.body = body
        self.endpoint = endpoint

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status!r} from {self.endpoint}>"


class HttpForwarder:
    """Forwards WSGI requests to endpoints over pooled keep-alive connections."""

    def __init__(self, connect_timeout: float = 5.0, read_timeout: float = 300.0,
                 max_idle_per_endpoint: int = 32,
                 trusted_proxies: frozenset[str] = frozenset({"127.0.0.1", "::1"})) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._pool = Pool(connect_timeout, read_timeout, max_idle_per_endpoint)
        self.forwarding = Forwarding(trusted_proxies)

    def __repr__(self) -> str:
        return f"<HttpForwarder [{self._pool.state()}]>"

    def close(self) -> None:
        """Close idle pooled connections; connections in use close when their request
        ends (nothing is pooled any more)."""
        self._pool.close()

    def retain(self, urls: Any) -> None:
        """Close idle connections of endpoints not in ``urls`` (they left the table)."""
        self._pool.retain(urls)

    # --- the request -------------------------------------------------------------

    def forward(self, environ: dict[str, Any], endpoint_url: str, path_qs: str,
                add_headers: Sequence[tuple[str, str]] = ()) -> UpstreamResponse:
        """Send the WSGI request to ``endpoint_url`` ('http(s)://host:port') with
        request-target ``path_qs``; return once the response head is read.

        Raises UpstreamConnectError (nothing sent: another endpoint may be tried),
        UpstreamTimeout (silent past the read timeout), UpstreamBroken (closed or
        garbled the exchange). Errors reading the client's body propagate as they are.
        ``add_headers`` replace any incoming header of the same name; ValueError for a
        framing or hop-by-hop one, CR/LF in them or a space in ``path_qs``.
        """
        if " " in path_qs or "\n" in path_qs or "\r" in path_qs or not path_qs:
            raise ValueError(f"bad request-target {path_qs[:60]!r}")
        method = environ["REQUEST_METHOD"]
        pool = self._pool
        target = pool.target(endpoint_url)
        stream = environ["wsgi.input"]
        head = head_from_environ(environ, path_qs.encode("latin-1"))
        body = b""
        length = head.content_length if head.content_length > 0 else 0
        if head.chunked:
            # pywsgi de-chunks wsgi.input; the length is unknown, so chunk again.
            framing = b"Transfer-Encoding: chunked"
        elif head.content_length >= 0:
            framing = b"Content-Length: %d" % head.content_length
            if length <= BUFFER_LIMIT:
                # Kept in the environ: when this endpoint refuses the connection, the
                # caller retries another one, and the client's body is read only once.
                kept = environ.get(BODY_KEY)
                if kept is None:
                    body = stream.read(length) if length else b""
                    if len(body) != length:
                        raise OSError(f"client body ended after {len(body)} of {length} bytes")
                    environ[BODY_KEY] = body
                else:
                    body = kept
        else:
            framing = b""
        streamed = head.chunked or length > BUFFER_LIMIT
        extra = b""
        forwarded = self.forwarding.lines(head, peer_address(str(environ.get("REMOTE_ADDR") or "")))
        if add_headers:
            extra, names = _added_lines(tuple(add_headers))
            head.fields = [f for f in head.fields
                           if f.partition(b":")[0].strip().lower() not in names]
            forwarded = [f for f in forwarded if f.partition(b":")[0].lower() not in names]
            if b"host" in names:  # the added Host replaces the client's
                head.host = b""
        authority = target.hostport.encode("latin-1")
        if not head.host and environ.get("SERVER_NAME"):
            # No Host (HTTP/1.0) or an empty one: the authority the client reached is this
            # server's (RFC 9112 3.3), as the local app's SERVER_NAME and SERVER_PORT say,
            # not the endpoint's, which would send its links past this balancer.
            port = str(environ.get("SERVER_PORT") or "")
            name = str(environ["SERVER_NAME"])
            authority = (host_port(name, int(port)) if port.isdigit() else name).encode(
                "latin-1")
        out = request_head(head, head.target, authority, forwarded, extra, framing)
        if add_headers and b"host" in names:
            out = out.replace(b"\r\nHost: " + authority + b"\r\n", b"\r\n", 1)
        if body:
            out += body
        conn = None if streamed else pool.acquire(endpoint_url)
        resent = False
        while True:
            if conn is None:  # UpstreamConnectError: nothing sent (see open_after_stale)
                conn = open_after_stale(pool, endpoint_url, resent, method,
                                        head.has_body)
            try:
                if streamed:
                    early = self._send_streamed(conn, out, stream, length, head.chunked)
                else:
                    early = False
                    self._send(conn, out)
                return self._response(conn, method, early)
            except _Stale:
                log.debug("%s: pooled connection was closed, retrying on a new one",
                          endpoint_url)
                conn.close()
                conn = None
                resent = True
            except BaseException:
                conn.close()
                raise

    def _send(self, conn: Connection, data: bytes) -> None:
        try:
            conn.sock.sendall(data)
        except stdsocket.timeout as exc:
            raise UpstreamTimeout(conn.target.url,
                                  f"not reading the request for {self.read_timeout}s") from exc
        except OSError as exc:
            if conn.reused:
                raise _Stale() from exc
            raise UpstreamBroken(conn.target.url, f"sending the request: {exc}") from exc

    def _send_streamed(self, conn: Connection, head: bytes, stream: Any, length: int,
                       chunked: bool) -> bool:
        """Send head and body; True when the upstream stopped taking it early (it may
        have answered already, e.g. 413). Errors reading the client propagate."""
        if not self._push(conn, head):
            return True
        if chunked:
            while True:
                data = stream.read(INPUT_CHUNK)
                if not data:
                    return not self._push(conn, b"0\r\n\r\n")
                if not self._push(conn, b"%x\r\n%b\r\n" % (len(data), data)):
                    return True
        left = length
        while left > 0:
            data = stream.read(min(INPUT_CHUNK, left))
            if not data:
                raise OSError(f"client body ended {left} bytes short")
            left -= len(data)
            if not self._push(conn, data):
                return True
        return False

    def _push(self, conn: Connection, data: bytes) -> bool:
        """sendall to the upstream; False when it closed or reset the connection."""
        try:
            conn.sock.sendall(data)
        except stdsocket.timeout as exc:
            raise UpstreamTimeout(conn.target.url, f"not reading the request body for "
                                  f"{self.read_timeout}s") from exc
        except OSError as exc:
            log.debug("%s: stopped taking the request: %s", conn.target.url, exc)
            return False
        return True

    # --- the response ------------------------------------------------------------

    def _response(self, conn: Connection, method: str, early: bool) -> UpstreamResponse:
        url = conn.target.url
        sock = conn.sock
        buf = bytes(conn.buf)  # always bytes here: no copy
        got = bool(buf)
        interim = 0
        while True:  # until a final (non-1xx) response head
            end, sep = find_response_head(buf)
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise misbehaving(UpstreamBroken(
                        url, f"response head larger than {MAX_HEAD} bytes"))
                if no_status_line(buf):
                    raise misbehaving(UpstreamBroken(url, not_http(buf)))
                try:
                    data = sock.recv(RECV_SIZE)
                except stdsocket.timeout as exc:
                    raise UpstreamTimeout(url, f"no response within {self.read_timeout}s") \
                        from exc
                except OSError as exc:
                    if conn.reused and not got and not early:
                        raise _Stale() from exc
                    raise dropping(UpstreamBroken(url, f"reading the response: {exc}"),
                                   not got and not conn.reused
                                   and closes_new(url, self.connect_timeout)) from exc
                if not data:
                    if conn.reused and not got and not early:
                        raise _Stale()
                    raise dropping(UpstreamBroken(url, closed_before_head(buf)),
                                   not got and not conn.reused
                                   and closes_new(url, self.connect_timeout))
                got = True
                buf += data
                if len(buf) > MAX_HEAD and find_response_head(buf)[0] < 0:
                    raise misbehaving(UpstreamBroken(
                        url, f"response head larger than {MAX_HEAD} bytes"))
                continue
            if end > MAX_HEAD:  # its end came in a later read than the limit's check
                raise misbehaving(UpstreamBroken(
                    url, f"response head larger than {MAX_HEAD} bytes"))
            raw = buf[:end] if sep == 4 else crlf_head(buf[:end])
            try:
                head = parse_response_head(raw)
            except ValueError as exc:
                # a CRLF head with a bare LF among its lines (RFC 9112 2.2), or no head
                error = misbehaving(UpstreamBroken(url, str(exc)))
                fixed = crlf_head(raw)
                if fixed == raw:
                    raise error from None
                try:
                    head = parse_response_head(fixed)
                except ValueError:
                    raise error from None
            buf = buf[end + sep:]
            if head.code >= 200:
                break
            if head.code == 101:
                raise UpstreamBroken(url, "switched protocols without being asked to")
            # 100 Continue, 102, 103 Early Hints: interim, skipped, but not forever.
            interim += 1
            if interim > MAX_INTERIM:
                raise misbehaving(UpstreamBroken(
                    url, f"more than {MAX_INTERIM} interim (1xx) answers"))
        mode, length = response_framing(method.encode("latin-1"), head)
        if head.transfer and not plain_chunked(head.transfer):
            # Only chunked was asked for: 'gzip, chunked' de-chunked and passed on would
            # give the client gzip bytes as the content, unmarked (a 502, as at the door).
            raise misbehaving(UpstreamBroken(
                url, f"unsupported Transfer-Encoding {head.transfer[:40]!r}"))
        headers = head.field_pairs()
        if head.length >= 0 and (mode == CHUNKED or (mode == NO_BODY and (
                method != "HEAD" or head.code in (204, 304)))):
            # pywsgi refuses a non-zero Content-Length on 204/304 (a 500), also to a HEAD,
            # where it is the length a GET would have had; with chunked framing the
            # Content-Length must not pass.
            headers = [h for h in headers if h[0].lower() != "content-length"]
        keep = head.keep_alive and not early and mode != UNTIL_CLOSE
        if method == "HEAD":
            # Some servers (pywsgi among them) send the body anyway: were the connection
            # reused, those bytes would be read as the next response.
            keep = False
        status = head.status_line[9:].decode("latin-1")

        pool = self._pool
        if mode == NO_BODY:
            conn.buf = buf
            body: Any = _EMPTY
        elif mode == FIXED and len(buf) >= length:
            conn.buf = buf[length:]
            body = _Complete((buf[:length],)) if length else _EMPTY
        else:
            conn.buf = b""
            if mode == FIXED:
                return UpstreamResponse(status, headers,
                                        self._fixed_body(conn, buf, length, keep), url)
            if mode == CHUNKED:
                return UpstreamResponse(status, headers,
                                        self._chunked_body(conn, buf, keep), url)
            return UpstreamResponse(status, headers, self._until_close_body(conn, buf), url)
        if keep:
            pool.release(conn)
        else:
            conn.close()
        return UpstreamResponse(status, headers, body, url)

    def _recv(self, conn: Connection, size: int, done: int, eof_ok: bool = False) -> bytes:
        """Next piece of a body; logs and raises UpstreamBodyAborted on failure.
        ``eof_ok``: the body ends at EOF (no framing), b"" is returned then."""
        try:
            data: bytes = conn.sock.recv(size)
        except stdsocket.timeout:
            reason = f"silent for {self.read_timeout}s"
        except OSError as exc:
            reason = str(exc)
        else:
            if data or eof_ok:
                return data
            reason = "closed the connection"
        log.warning("%s: response body cut after %d bytes: %s", conn.target.url, done,
                    reason)
        raise UpstreamBodyAborted(conn.target.url, f"response body cut: {reason}")

    def _fixed_body(self, conn: Connection, first: bytes, length: int,
                    keep: bool) -> Iterator[bytes]:
        ok = False
        try:
            done = len(first)
            if first:
                yield first
            while done < length:
                data = self._recv(conn, min(RECV_SIZE, length - done), done)
                done += len(data)
                yield data
            ok = True
        finally:
            if ok and keep:
                self._pool.release(conn)
            else:
                conn.close()

    def _until_close_body(self, conn: Connection, first: bytes) -> Iterator[bytes]:
        try:
            done = len(first)
            if first:
                yield first
            while True:
                data = self._recv(conn, RECV_SIZE, done, eof_ok=True)
                if not data:
                    return
                done += len(data)
                yield data
        finally:
            conn.close()

    def _chunked_body(self, conn: Connection, buf: bytes, keep: bool) -> Iterator[bytes]:
        """Decode chunked framing incrementally (cluster.http1's scanner), yielding data
        as it arrives."""
        url = conn.target.url
        scanner = ChunkedScanner(decode=True)
        ok = False
        done = 0
        try:
            while True:
                try:
                    used, pieces = scanner.feed(buf)
                except ChunkError as exc:
                    log.warning("%s: response body garbled after %d bytes: %s", url, done, exc)
                    raise UpstreamBodyAborted(url, f"response body garbled: {exc}") from None
                for piece in pieces:
                    done += len(piece)
                    yield piece
                if scanner.done:
                    conn.buf = buf[used:]
                    break
                buf = self._recv(conn, RECV_SIZE, done)
            ok = True
        finally:
            if ok and keep:
                self._pool.release(conn)
            else:
                conn.close()


__all__ = ["HttpForwarder", "UpstreamResponse", "UpstreamBodyAborted", "UpstreamError",
           "request_target"]
