"""The pywsgi request handler `cluster` serves with.

Three things stock pywsgi lacks: TCP_NODELAY on accepted sockets (without it Nagle
meets delayed ACKs when a response goes out in two sends: ~40 ms per small keep-alive
response, gevent issue #1233), access to the raw client socket, and a way to take the
connection away from pywsgi for an upgraded protocol (WebSocket) so that a byte pump
owns it and pywsgi neither writes a response nor reads another request.

And three cuts in pywsgi's own per-request cost, which dominates a proxied request
(measured in docs/benchmarks.md): the response head goes out in the same ``send`` as
a small first body piece; request headers are read by :func:`read_headers` instead of
the ``email`` package; no access-log line is formatted when there is no access log.
"""

from __future__ import annotations

import logging
import re
import socket
from typing import Any, Callable, Iterator

from gevent import pywsgi
from gevent.pywsgi import WSGIHandler

log = logging.getLogger(__name__)

#: environ key holding the accepted client socket (gunicorn uses 'gunicorn.socket').
SOCKET_KEY = "cluster.socket"
#: environ key holding :meth:`ClusterHandler.hijack` (absent under other servers).
HIJACK_KEY = "cluster.hijack"

#: What ``environ[HIJACK_KEY]`` is: ``hijack(status) -> (client socket, early bytes)``.
Hijack = Callable[[str], tuple[Any, bytes]]

#: Limits of the header reader pywsgi used (http.client's): longer lines or more
#: header fields are a 400.
MAX_HEADER_LINE = 65536
MAX_HEADERS = 100
#: A first body piece up to this size rides in the same ``send`` as the response head.
ONESEND_MAX = 65536

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+").fullmatch
#: pywsgi's "no access log" object (``log=None``); if gevent renames it, we just log.
_NO_ACCESS_LOG: Any = getattr(pywsgi, "_NoopLog", ())


class BadRequestHeaders(ValueError):
    """A malformed request head. A ValueError, so pywsgi answers 400 and logs one line."""


class RequestHeaders:
    """Request header fields as read off the wire, in order.

    Offers what pywsgi's handler (and gunicorn's, for its access log) use of the
    ``email``-based object it replaces: ``get``/``getheader`` (first value,
    case-insensitive), ``typeheader``, ``headers`` (the lines), ``items()``, ``in``,
    ``del`` and ``status`` (always empty: problems raise instead).
    """

    __slots__ = ("fields", "_first")
    status = ""

    def __init__(self, fields: list[tuple[str, str]]) -> None:
        self.fields = fields
        self._first: dict[str, str] = {}
        for name, value in fields:
            self._first.setdefault(name.lower(), value)

    def get(self, name: str, default: Any = None) -> Any:
        return self._first.get(name.lower(), default)

    getheader = get

    @property
    def typeheader(self) -> str | None:
        return self._first.get("content-type")

    @property
    def headers(self) -> list[str]:
        return [f"{name}: {value}\r\n" for name, value in self.fields]

    def items(self) -> list[tuple[str, str]]:
        return list(self.fields)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._first

    def __delitem__(self, name: str) -> None:
        key = name.lower()
        self._first.pop(key, None)
        self.fields = [(n, v) for n, v in self.fields if n.lower() != key]


def read_headers(rfile: Any) -> RequestHeaders:
    """Read header lines up to the blank line (or EOF) from ``rfile``.

    Stricter than the ``email`` parser it replaces, which silently dropped every header
    after a malformed line, kept obsolete line folding with the CR LF inside the value,
    and let a request through with two different Content-Lengths (taking the first):
    all request-smuggling material for a proxy. Each is a BadRequestHeaders here (400),
    as are lines over MAX_HEADER_LINE and more than MAX_HEADERS fields.
    Values are latin-1 decoded and stripped, as pywsgi's were.
    """
    fields: list[tuple[str, str]] = []
    length: str | None = None
    while True:
        line = rfile.readline(MAX_HEADER_LINE + 1)
        if len(line) > MAX_HEADER_LINE:
            raise BadRequestHeaders("header line too long")
        if line in (b"\r\n", b"\n", b""):
            return RequestHeaders(fields)
        if len(fields) >= MAX_HEADERS:
            raise BadRequestHeaders(f"more than {MAX_HEADERS} header fields")
        text = line.decode("latin-1").rstrip("\r\n")
        if text[:1] in (" ", "\t"):
            raise BadRequestHeaders("obsolete header line folding")
        name, sep, value = text.partition(":")
        if not sep or not _TOKEN(name) or "\r" in value or "\0" in value:
            raise BadRequestHeaders(f"malformed header line {text[:60]!r}")
        value = value.strip()
        if name.lower() == "content-length":
            if length is not None and value != length:
                raise BadRequestHeaders("conflicting Content-Length headers")
            length = value
        fields.append((name, value))


def set_nodelay(sock: Any) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # not TCP (a unix socket): nothing to tune


def take_buffered(rfile: Any, sock: Any) -> bytes:
    """Bytes the request reader already pulled off ``sock`` beyond the request head.

    A client may send its first frames right behind the upgrade request; pywsgi's
    buffered reader then holds them. ``read1`` returns the buffer without touching the
    socket when it is not empty; with the socket switched to non-blocking for the call,
    an empty buffer costs one ``recv`` that cannot wait.
    """
    timeout = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        data = rfile.read1(65536)
    except OSError:
        data = b""  # the client is gone already; the pump will find out
    finally:
        sock.settimeout(timeout)
    return bytes(data or b"")


class ClusterHandler(WSGIHandler):  # type: ignore[misc]
    """WSGIHandler with TCP_NODELAY, the raw socket and a hijack hook in the environ.

    After :meth:`hijack` the application owns the connection: whatever it returns is
    discarded, no status line or error page is written, and the connection is closed
    (not reused for keep-alive) once the application returns. gevent-websocket's
    handler and gunicorn's workers solve the same problem by flagging the connection
    as upgraded; here the flag is set by the one who takes the socket.
    """

    hijacked = False

    def handle(self) -> None:
        set_nodelay(self.socket)
        super().handle()

    def MessageClass(self, rfile: Any, *_: Any) -> RequestHeaders:  # noqa: N802
        """Request headers without the ``email`` package (pywsgi's costliest step)."""
        return read_headers(rfile)

    def _headers(self) -> Iterator[tuple[str, str]]:
        """(environ key, value) per header field, the keys pywsgi makes: HTTP_*, minus
        names with '_' (they could pose as others) and Content-Type/-Length, which
        get_environ sets without the prefix. get_environ joins repeats with ','."""
        headers = self.headers
        if not isinstance(headers, RequestHeaders):
            yield from super()._headers()
            return
        for name, value in headers.fields:
            if "_" in name:
                continue
            key = name.replace("-", "_").upper()
            if key != "CONTENT_TYPE" and key != "CONTENT_LENGTH":
                yield "HTTP_" + key, value

    def get_environ(self) -> dict[str, Any]:
        environ: dict[str, Any] = super().get_environ()
        # The request-target as received: PATH_INFO is decoded (%2F became /), and a
        # proxy must forward the path exactly (gunicorn's handler sets the same key).
        environ["RAW_URI"] = self.path
        environ[SOCKET_KEY] = self.socket
        environ[HIJACK_KEY] = self.hijack
        return environ

    def hijack(self, status: str = "101 Switching Protocols") -> tuple[Any, bytes]:
        """Hand the client connection to the caller; return it and its early bytes.

        ``status`` is only what the access log shows. The caller writes the response
        head itself and must close the socket when done. Raises RuntimeError when a
        response was already started on this request (too late to take over).
        """
        if self.headers_sent:
            raise RuntimeError("response already started; cannot hijack")
        if self.hijacked:
            raise RuntimeError("connection already hijacked")
        self.hijacked = True
        self.close_connection = True
        early = take_buffered(self.rfile, self.socket)
        # Closing the reader drops its reference on the socket, so closing the socket
        # from the pump really closes it (and wakes greenlets blocked on it); pywsgi's
        # request loop also stops at a closed reader.
        self.rfile.close()
        # For the access log only: format_request prefers the native status string, and
        # gunicorn's access log reads response_headers (possibly a previous request's).
        self.status = status.encode("latin-1")
        self._orig_status = status
        self.response_headers: list[tuple[bytes, bytes]] = []
        return self.socket, early

    def _write_with_headers(self, data: bytes) -> None:
        """Status line, headers and a first body piece up to ONESEND_MAX in one send.

        pywsgi sends the head and the body separately; a send that wakes the peer is
        the costliest call of a small response (see docs/benchmarks.md)."""
        self.headers_sent = True
        self.finalize_headers()
        head = bytearray(b"HTTP/1.1 ")
        head += self.status
        head += b"\r\n"
        for name, value in self.response_headers:
            head += name
            head += b": "
            head += value
            head += b"\r\n"
        head += b"\r\n"
        if data and len(data) <= ONESEND_MAX:
            if self.response_use_chunked:
                head += b"%x\r\n" % len(data)
                head += data
                head += b"\r\n"
            else:
                head += data
            self._sendall(head)
        else:
            self._sendall(head)
            self._write(data)

    def log_request(self) -> None:
        """Skip formatting a line nobody writes (``log=None``); else log as the base
        class does (pywsgi's line, or gunicorn's access log under gunicorn)."""
        if isinstance(self.server.log, _NO_ACCESS_LOG):
            return
        super().log_request()

    def process_result(self) -> None:
        if self.hijacked:
            return  # the new owner already answered; never append an HTTP response
        super().process_result()

    def _send_error_response_if_possible(self, error_code: int) -> None:
        if self.hijacked:
            # An error after the takeover: a 500 page would be garbage in the middle
            # of a WebSocket stream. Just make sure the connection is not reused.
            self.close_connection = True
            return
        super()._send_error_response_if_possible(error_code)

    def handle_one_request(self) -> Any:
        self.hijacked = False
        return super().handle_one_request()

    def handle_one_response(self) -> None:
        try:
            super().handle_one_response()
        finally:
            # The bound method in the environ is a handler -> environ -> handler cycle:
            # break it so a finished connection is freed by refcounting, not by the gc.
            environ = getattr(self, "environ", None)
            if environ is not None:
                environ.pop(HIJACK_KEY, None)
