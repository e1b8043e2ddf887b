"""Streaming HTTP/1.1 forwarding of one WSGI request to one endpoint.

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
  header line folding is refused as broken (502) rather than mangled.
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
from http import HTTPStatus
from typing import Any, Iterator, NamedTuple, Sequence
from urllib.parse import quote

from cluster.errors import UpstreamBroken, UpstreamError, UpstreamTimeout
from cluster.proxy.upstream import Connection, Pool

log = logging.getLogger(__name__)

#: Request bodies up to this size (with a Content-Length) are read first, so a
#: request can be replayed on a fresh connection when a pooled one is found dead.
BUFFER_LIMIT = 64 * 1024
#: environ key holding a small request body already read from wsgi.input.
BODY_KEY = "cluster.body"
#: Largest piece read from a socket or wsgi.input at once.
RECV_SIZE = 256 * 1024
INPUT_CHUNK = 64 * 1024
#: A response head larger than this is refused (nginx's default is 4-8 KiB).
MAX_HEAD = 64 * 1024
VIA = "1.1 cluster"

# Request headers (as WSGI environ keys) never forwarded: hop-by-hop ones, and
# Expect (answered by the WSGI server, see the module docstring).
_REQUEST_DROP = frozenset({
    "HTTP_CONNECTION", "HTTP_KEEP_ALIVE", "HTTP_TE", "HTTP_TRAILER",
    "HTTP_TRANSFER_ENCODING", "HTTP_UPGRADE", "HTTP_EXPECT",
    "HTTP_CONTENT_LENGTH", "HTTP_CONTENT_TYPE",  # only from non-pywsgi servers
})
# What _parse_head does with a response header, by lower-case name; Proxy-* (hop-by-hop)
# is matched by prefix, every other header is passed back.
_HOP, _CONNECTION, _LENGTH, _TRANSFER = range(4)
_RESPONSE_SPECIAL = {"keep-alive": _HOP, "te": _HOP, "trailer": _HOP, "upgrade": _HOP,
                     "connection": _CONNECTION, "content-length": _LENGTH,
                     "transfer-encoding": _TRANSFER}

_HEADER_NAMES: dict[str, str] = {
    "HTTP_ACCEPT": "Accept", "HTTP_ACCEPT_ENCODING": "Accept-Encoding",
    "HTTP_ACCEPT_LANGUAGE": "Accept-Language", "HTTP_AUTHORIZATION": "Authorization",
    "HTTP_CACHE_CONTROL": "Cache-Control", "HTTP_COOKIE": "Cookie",
    "HTTP_USER_AGENT": "User-Agent", "HTTP_REFERER": "Referer", "HTTP_ORIGIN": "Origin",
    "HTTP_IF_NONE_MATCH": "If-None-Match", "HTTP_IF_MODIFIED_SINCE": "If-Modified-Since",
}

_NO_BODY, _FIXED, _CHUNKED, _UNTIL_CLOSE = range(4)


def _header_name(key: str) -> str:
    """'HTTP_X_FORWARDED_FOR' -> 'X-Forwarded-For' (cached: names repeat)."""
    name = _HEADER_NAMES.get(key)
    if name is None:
        name = "-".join(part.capitalize() for part in key[5:].split("_"))
        if len(_HEADER_NAMES) < 2048:
            _HEADER_NAMES[key] = name
    return name


def _environ_key(name: str) -> str:
    return "HTTP_" + name.strip().upper().replace("-", "_")


_SYNTHESIZED = frozenset({"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                          "via", "content-type"})
_FRAMING_AND_HOP = frozenset({"content-length", "transfer-encoding", "connection",
                               "keep-alive", "te", "trailer", "upgrade", "expect"})


@functools.lru_cache(maxsize=64)
def _plan_added(add_headers: tuple[tuple[str, str], ...]) -> tuple[frozenset[str], frozenset[str]]:
    """(environ keys the added headers replace, synthesized names they override).

    Callers pass the same few tuples on every request (the hop marker), so the check
    and the sets are made once per distinct tuple, not once per request.
    """
    replaced = _check_add_headers(add_headers)
    drop = frozenset(_environ_key(n) for n in replaced if n not in _SYNTHESIZED)
    return drop, frozenset(replaced & _SYNTHESIZED)


def _check_add_headers(add_headers: Sequence[tuple[str, str]]) -> set[str]:
    """Lower-case names of ``add_headers``; ValueError for framing, hop-by-hop or
    malformed ones (a caller's mistake that would corrupt the request)."""
    names = set()
    for name, value in add_headers:
        lname = name.lower()
        if lname in _FRAMING_AND_HOP or not name or any(c in name for c in ":\r\n \t") or \
                "\r" in value or "\n" in value:
            raise ValueError(f"cannot add header {name!r}: {value!r}")
        names.add(lname)
    return names


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
                 max_idle_per_endpoint: int = 32) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._pool = Pool(connect_timeout, read_timeout, max_idle_per_endpoint)

    def __repr__(self) -> str:
        return f"<HttpForwarder [{self._pool.state()}]>"

    def close(self) -> None:
        """Close idle pooled connections; connections in use close when their request
        ends (nothing is pooled any more)."""
        self._pool.close()

    # --- the request -------------------------------------------------------------

    def forward(self, environ: dict[str, Any], endpoint_url: str, path_qs: str,
                add_headers: Sequence[tuple[str, str]] = ()) -> UpstreamResponse:
        """Send the WSGI request to ``endpoint_url`` ('http://host:port') with
        request-target ``path_qs``; return once the response head is read.

        Raises UpstreamConnectError (nothing sent: another endpoint may be tried),
        UpstreamTimeout (silent past the read timeout), UpstreamBroken (closed or
        garbled the exchange). Errors reading the client's body propagate as they are.
        ``add_headers`` replace any incoming header of the same name; ValueError for a
        framing or hop-by-hop one, CR/LF in them or a space in ``path_qs``.
        """
        method = environ["REQUEST_METHOD"]
        pool = self._pool
        target = pool.target(endpoint_url)
        stream = environ["wsgi.input"]
        length_s = environ.get("CONTENT_LENGTH")
        body = b""
        length = 0
        chunked = False
        if length_s:
            length = int(length_s)
            framing = f"Content-Length: {length}\r\n"
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
        elif environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked":
            # pywsgi de-chunks wsgi.input; the length is unknown, so chunk again.
            chunked = True
            framing = "Transfer-Encoding: chunked\r\n"
        else:
            framing = ""
        streamed = chunked or length > BUFFER_LIMIT

        head = self._head(environ, method, path_qs, target.hostport, add_headers, framing)
        if body:
            head += body
        conn = None if streamed else pool.acquire(endpoint_url)
        while True:
            if conn is None:
                conn = pool.open(endpoint_url)  # UpstreamConnectError: nothing sent
            try:
                if streamed:
                    early = self._send_streamed(conn, head, stream, length, chunked)
                else:
                    early = False
                    self._send(conn, head)
                return self._response(conn, method, early)
            except _Stale:
                log.debug("%s: pooled connection was closed, retrying on a new one",
                          endpoint_url)
                conn.close()
                conn = None
            except BaseException:
                conn.close()
                raise

    def _head(self, environ: dict[str, Any], method: str, path_qs: str, hostport: str,
              add_headers: Sequence[tuple[str, str]], framing: str) -> bytes:
        """The request head, with hop-by-hop headers removed and X-Forwarded-* added."""
        drop = _REQUEST_DROP
        named = environ.get("HTTP_CONNECTION")
        if named:  # headers the client named in Connection are hop-by-hop too
            drop = drop | {_environ_key(t) for t in named.split(",") if t.strip()}
        overridden: frozenset[str] = frozenset()
        if add_headers:  # ours (Host, X-Forwarded-*...) are filtered below, after use
            replaced_keys, overridden = _plan_added(tuple(add_headers))
            if replaced_keys:
                drop = drop | replaced_keys
        if " " in path_qs or "\n" in path_qs or "\r" in path_qs or not path_qs:
            raise ValueError(f"bad request-target {path_qs[:60]!r}")
        host = xff = proto = fwd_host = via = None
        out = [f"{method} {path_qs} HTTP/1.1\r\n"]
        for key, value in environ.items():
            if key[:5] != "HTTP_" or key in drop:
                continue
            if key == "HTTP_HOST":
                host = value
            elif key[:16] == "HTTP_X_FORWARDED":
                if key == "HTTP_X_FORWARDED_FOR":
                    xff = value
                elif key == "HTTP_X_FORWARDED_PROTO":
                    proto = value
                elif key == "HTTP_X_FORWARDED_HOST":
                    fwd_host = value
                else:
                    out.append(f"{_header_name(key)}: {value}\r\n")
            elif key == "HTTP_VIA":
                via = value
            elif key[:11] != "HTTP_PROXY_":  # Proxy-* are hop-by-hop (and httpoxy)
                out.append(f"{_header_name(key)}: {value}\r\n")
        remote = environ.get("REMOTE_ADDR")
        if remote:
            xff = f"{xff}, {remote}" if xff else remote
        ctype = environ.get("CONTENT_TYPE")
        ours = [
            f"Host: {host or hostport}\r\n",
            f"X-Forwarded-For: {xff}\r\n" if xff else "",
            # A previous hop's scheme and host are the client's, so they win.
            f"X-Forwarded-Proto: {proto or environ.get('wsgi.url_scheme', 'http')}\r\n",
            f"X-Forwarded-Host: {fwd_host or host}\r\n" if (fwd_host or host) else "",
            f"Via: {via}, {VIA}\r\n" if via else f"Via: {VIA}\r\n",
            f"Content-Type: {ctype}\r\n" if ctype else "",
            framing,
        ]
        if add_headers:
            if overridden:
                ours = [line for line in ours
                        if line.split(":", 1)[0].lower() not in overridden]
            ours.extend(f"{name}: {value}\r\n" for name, value in add_headers)
        out[1:1] = ours
        out.append("\r\n")
        return "".join(out).encode("latin-1")

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
        buf = conn.buf
        got = bool(buf)
        while True:  # until a final (non-1xx) response head
            # The head ends at the first blank line, CRLF or (tolerated) bare LF; the
            # LF search stops where a CRLF end was found, so it stays short.
            end = buf.find(b"\r\n\r\n")
            sep = 4
            bare = buf.find(b"\n\n", 0, end if end >= 0 else len(buf))
            if bare >= 0:
                end, sep = bare, 2
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise UpstreamBroken(url, f"response head larger than {MAX_HEAD} bytes")
                try:
                    data = sock.recv(RECV_SIZE)
                except stdsocket.timeout as exc:
                    raise UpstreamTimeout(url, f"no response within {self.read_timeout}s") \
                        from exc
                except OSError as exc:
                    if conn.reused and not got and not early:
                        raise _Stale() from exc
                    raise UpstreamBroken(url, f"reading the response: {exc}") from exc
                if not data:
                    if conn.reused and not got and not early:
                        raise _Stale()
                    raise UpstreamBroken(url, "closed the connection before a response")
                got = True
                buf += data
                continue
            head = _parse_head(url, buf[:end], sep == 4)
            buf = buf[end + sep:]
            code = head.code
            if code >= 200:
                break
            if code == 101:
                raise UpstreamBroken(url, "switched protocols without being asked to")
            # 100 Continue, 102, 103 Early Hints: interim, skipped.

        mode, length, headers = _body_mode(url, method, head)
        keep = head.keep and not early and mode != _UNTIL_CLOSE
        if method == "HEAD":
            # Some servers (pywsgi among them) send the body anyway: were the connection
            # reused, those bytes would be read as the next response.
            keep = False
        status = head.status

        pool = self._pool
        if mode == _NO_BODY:
            conn.buf = buf
            body: Any = _EMPTY
        elif mode == _FIXED and len(buf) >= length:
            conn.buf = buf[length:]
            body = _Complete((buf[:length],)) if length else _EMPTY
        else:
            conn.buf = b""
            if mode == _FIXED:
                return UpstreamResponse(status, headers,
                                        self._fixed_body(conn, buf, length, keep), url)
            if mode == _CHUNKED:
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
        """Decode chunked framing incrementally, yielding data as it arrives."""
        url = conn.target.url
        ok = False
        done = 0
        try:
            while True:
                # chunk-size [; ext] CRLF
                while (eol := buf.find(b"\n")) < 0:
                    if len(buf) > 4096:
                        raise self._garbled(url, done, "chunk size line too long")
                    buf += self._recv(conn, RECV_SIZE, done)
                line = buf[:eol].split(b";", 1)[0].strip()
                buf = buf[eol + 1:]
                try:
                    size = int(line, 16)
                except ValueError:
                    size = -1
                if size < 0 or not line or line[:1] in b"+-":
                    raise self._garbled(url, done, f"bad chunk size {line[:20]!r}")
                if size == 0:
                    break
                while size > 0:
                    if not buf:
                        buf = self._recv(conn, RECV_SIZE, done)
                    piece = buf[:size]
                    buf = buf[len(piece):]
                    size -= len(piece)
                    done += len(piece)
                    yield piece
                while len(buf) < 2:
                    if buf == b"\n":
                        break
                    buf += self._recv(conn, RECV_SIZE, done)
                if buf[:2] == b"\r\n":
                    buf = buf[2:]
                elif buf[:1] == b"\n":
                    buf = buf[1:]
                else:
                    raise self._garbled(url, done, "chunk data not followed by CRLF")
            # trailer fields (dropped), then the empty line
            while True:
                while (eol := buf.find(b"\n")) < 0:
                    if len(buf) > MAX_HEAD:
                        raise self._garbled(url, done, "trailer too long")
                    buf += self._recv(conn, RECV_SIZE, done)
                line = buf[:eol]
                buf = buf[eol + 1:]
                if line in (b"", b"\r"):
                    break
            conn.buf = buf
            ok = True
        finally:
            if ok and keep:
                self._pool.release(conn)
            else:
                conn.close()

    @staticmethod
    def _garbled(url: str, done: int, reason: str) -> UpstreamBodyAborted:
        log.warning("%s: response body garbled after %d bytes: %s", url, done, reason)
        return UpstreamBodyAborted(url, f"response body garbled: {reason}")


class _Head(NamedTuple):
    status: str  # "200 OK"
    code: int
    headers: list[tuple[str, str]]  # end-to-end ones, Transfer-Encoding excluded
    keep: bool  # the upstream keeps the connection open after this response
    length: int  # Content-Length, or -1
    transfer: str | None  # Transfer-Encoding, when present


def _parse_head(url: str, raw: bytes, crlf: bool) -> _Head:
    """Parse one response head (without its blank line); hop-by-hop headers dropped.

    One pass over the lines: this runs once per proxied request.
    """
    text = raw.decode("latin-1")
    if crlf:
        lines = text.split("\r\n")
        stray = text.count("\r") != len(lines) - 1 or text.count("\n") != len(lines) - 1
    else:
        lines = [line.rstrip("\r") for line in text.split("\n")]
        stray = any("\r" in line for line in lines)
    first = lines[0]
    if stray:  # a CR or LF inside a line: never valid, and pywsgi would refuse to send it
        raise UpstreamBroken(url, "bare CR or LF in the response head")
    code_s = first[9:12]
    if first[:7] != "HTTP/1." or first[8:9] != " " or not code_s.isdigit() or \
            (len(first) > 12 and first[12] != " "):
        raise UpstreamBroken(url, f"bad status line {first[:40]!r}")
    code = int(code_s)
    status = first[9:].rstrip()
    if len(status) == 3:
        try:
            status = f"{code} {HTTPStatus(code).phrase}"
        except ValueError:
            status = f"{code} Unknown"
    headers: list[tuple[str, str]] = []
    append = headers.append
    named: list[str] = []
    length = -1
    transfer = None
    special = _RESPONSE_SPECIAL.get
    lines_iter = iter(lines)
    next(lines_iter)
    for line in lines_iter:
        name, sep, value = line.partition(":")
        # name[:1] / name[-1:] are "" for an empty name, and "" is in any string
        if not sep or name[-1:] in " \t" or name[:1] in " \t":
            # includes obsolete line folding, which a proxy must reject or unfold
            raise UpstreamBroken(url, f"bad header line {line[:40]!r}")
        value = value.strip(" \t")
        lname = name.lower()
        kind = special(lname)
        if kind is None:
            if lname[:6] != "proxy-":
                append((name, value))
        elif kind == _LENGTH:
            if not (value.isascii() and value.isdigit()) or \
                    (length >= 0 and int(value) != length):
                raise UpstreamBroken(url, f"bad Content-Length {value[:40]!r}")
            length = int(value)
            append((name, value))
        elif kind == _TRANSFER:
            transfer = value if transfer is None else f"{transfer}, {value}"
        elif kind == _CONNECTION:
            named.extend(token.strip().lower() for token in value.split(","))
    # HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 only when asked.
    keep = "close" not in named if first[7] == "1" else "keep-alive" in named
    drop = {token for token in named if token not in ("close", "keep-alive", "")}
    if drop:  # headers named by Connection are hop-by-hop too
        headers = [h for h in headers if h[0].lower() not in drop]
    return _Head(status, code, headers, keep, length, transfer)


def _body_mode(url: str, method: str, head: _Head) -> tuple[int, int, list[tuple[str, str]]]:
    """How the response body is framed (RFC 9112 6.3): (mode, length, headers to pass)."""
    headers = head.headers
    if method == "HEAD":
        return _NO_BODY, 0, headers
    if head.code == 204 or head.code == 304:
        # pywsgi refuses a non-zero Content-Length on them; a 304 may carry one.
        if head.length >= 0:
            headers = [h for h in headers if h[0].lower() != "content-length"]
        return _NO_BODY, 0, headers
    if head.transfer is not None:
        if head.transfer.strip().lower() != "chunked":
            raise UpstreamBroken(url, f"unsupported Transfer-Encoding {head.transfer[:40]!r}")
        if head.length >= 0:  # Transfer-Encoding wins; a Content-Length must not pass
            headers = [h for h in headers if h[0].lower() != "content-length"]
        return _CHUNKED, -1, headers
    if head.length >= 0:
        return _FIXED, head.length, headers
    return _UNTIL_CLOSE, -1, headers


__all__ = ["HttpForwarder", "UpstreamResponse", "UpstreamBodyAborted", "UpstreamError",
           "request_target"]
