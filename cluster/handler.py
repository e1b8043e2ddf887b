"""The pywsgi request handler `cluster` serves with.

Three things stock pywsgi lacks: TCP_NODELAY on accepted sockets (without it Nagle
meets delayed ACKs when a response goes out in two sends: ~40 ms per small keep-alive
response, gevent issue #1233), access to the raw client socket, and a way to take the
connection away from pywsgi for an upgraded protocol (WebSocket) so that a byte pump
owns it and pywsgi neither writes a response nor reads another request. For
``cluster.wrap()``, whose routing runs inside the application, also the WebSocket
handshake of an upgrade served here (:meth:`ClusterHandler.serve_websocket`).

And three cuts in pywsgi's own per-request cost, which dominates a proxied request
(measured in docs/benchmarks.md): the response head goes out in the same ``send`` as
a small first body piece; request headers are read by :func:`read_headers` instead of
the ``email`` package; no access-log line is formatted when there is no access log.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
import socket
from typing import Any, Callable, Iterable, Iterator

import gevent
from gevent import pywsgi
from gevent.pywsgi import WSGIHandler

from cluster.errors import UpstreamError
from cluster.http1 import simple_response
from cluster.netio import linger, reset_on_close

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
#: WebSocket versions accepted, gevent-websocket's (its handler serves the door's apps)
WEBSOCKET_VERSIONS = ("13", "8", "7")
_WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+").fullmatch
#: a control character in a field value (HTAB is allowed), as the front door refuses them
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]").search
#: pywsgi's "no access log" object (``log=None``); if gevent renames it, we just log.
_NO_ACCESS_LOG: Any = getattr(pywsgi, "_NoopLog", ())


class BadRequestHeaders(ValueError):
    """A malformed request head. A ValueError, so pywsgi answers 400 and logs one line.
    ``status``: what to answer instead (501 for a transfer coding not implemented)."""

    status = 400

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


def check_framing(headers: RequestHeaders, version: str) -> None:
    """Hold a request's body framing to the front door's rules (cluster.http1), for
    pywsgi under ``cluster.wrap()``: Transfer-Encoding whose only coding is ``chunked``
    (any other, or one before it: 400 or 501; with a Content-Length, or in HTTP/1.0:
    400), a Content-Length of plain digits. pywsgi reads a body as chunked only when the
    field is exactly ``chunked``, drops a Content-Length that comes with it, and takes
    ``+5`` or ``1_0`` as numbers: a body framed one way by a proxy in front and another
    way here is how requests are smuggled. A valid chunked field is left as the one
    word pywsgi reads."""
    transfer: list[str] = []
    length = None
    for name, value in headers.fields:
        key = name.lower()
        if key == "transfer-encoding":
            tokens = [t.strip(" \t").lower() for t in value.split(",") if t.strip(" \t")]
            transfer.extend(tokens or [""])
        elif key == "content-length":
            length = value
    if transfer:
        if length is not None:
            raise BadRequestHeaders("both Content-Length and Transfer-Encoding")
        if transfer[-1] != "chunked":
            raise BadRequestHeaders("Transfer-Encoding does not end in chunked")
        if len(transfer) > 1:
            raise BadRequestHeaders("unsupported transfer coding", 501)
        if version == "HTTP/1.0":
            raise BadRequestHeaders("Transfer-Encoding in an HTTP/1.0 request")
        headers.replace("Transfer-Encoding", "chunked")
    elif length is not None and not (length.isascii() and length.isdigit()
                                     and len(length) <= 18):
        raise BadRequestHeaders("bad Content-Length")


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

    def replace(self, name: str, value: str) -> None:
        """Every line of field ``name`` as one line of ``value``."""
        del self[name]
        self.fields.append((name, value))
        self._first[name.lower()] = value

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
        if not sep or not _TOKEN(name) or _CONTROL(value):
            raise BadRequestHeaders(f"malformed header line {text[:60]!r}")
        value = value.strip(" \t")
        if name.lower() == "content-length":
            if length is not None and value != length:
                raise BadRequestHeaders("conflicting Content-Length headers")
            length = value
        fields.append((name, value))


#: what pywsgi raises for a body it cannot read (an OSError: apps catch it as the end of
#: their input, and pywsgi answers 400 and closes when it is not caught)
_InvalidClientInput: type[OSError] = getattr(pywsgi, "_InvalidClientInput", OSError)


#: Largest single read of a request body with a Content-Length (see ClusterInput)
READ_PIECE = 1 << 20
#: the largest chunk size taken (cluster.http1.ChunkedScanner's)
MAX_CHUNK = 2 ** 63 - 1


class ExpectInput(pywsgi.Input):  # type: ignore[misc]
    """pywsgi's request body reader, which skips no body whose 100 (Continue) it never
    sent.

    pywsgi reads and discards what the app left unread of a body once the answer is
    out, on every kept connection; its ``socket`` is the one to send the 100 on until
    the first read sends it. A client that asked for one and had its final answer
    first need not send the body at all (RFC 9110 10.1.1): curl does not, and reuses
    the connection, whose next request pywsgi then read as that body, and waited for
    the rest of it (curl's uploads of more than 1 KiB ask for a 100: one the app
    refused unread, a 401 or a 404, hung the next request on the connection). The
    handler closes the connection after such an answer instead, saying so (Go's
    net/http server does the same), and nothing waits for a body here."""

    __slots__ = ()

    def _discard(self) -> None:
        if self.socket is not None:
            return  # the 100 never went out: the connection ends (finalize_headers)
        super()._discard()

    def awaited(self) -> bool:
        """True when the client waits for a 100 (Continue) nobody sent, with a body."""
        return self.socket is not None and self.send_100_continue_enabled and (
            bool(self.chunked_input) or (self.content_length or 0) > self.position)


class ClusterInput(ExpectInput):
    """pywsgi's request body reader, with every bad chunk-size line refused alike, and
    a large Content-Length read as it arrives.

    ``read()`` of a body with a Content-Length was one ``rfile.read(length)``, which
    allocates ``length`` bytes before a byte arrives: a one-line request claiming
    ``Content-Length: 999999999999`` was a MemoryError (a traceback and a 500) in any
    app that reads its input. Reads past READ_PIECE go in pieces, so memory follows
    the bytes that came, as at the front door.

    A size line with no digits (an empty line, or ``;ext`` alone) hit ``int(b"", 16)``
    in pywsgi: a ValueError, not pywsgi's bad-input error. The app saw an unexpected
    exception (a traceback and a 500 for a client's mistake), and pywsgi then skipped
    the rest of the body by reading the chunk data as size lines: data that looked like
    hex (``abc``) held the connection, unanswered, until the client gave up. h11,
    llhttp and nginx refuse such a line; so does the front door. Now it is pywsgi's
    bad-input error: a 400, and the connection closes after the answer.
    """

    __slots__ = ()

    def _do_read(self, length: int | None = None, use_readline: bool = False) -> bytes:
        left = (self.content_length or 0) - self.position
        if length is None or length > left:
            length = left
        if use_readline or length <= READ_PIECE:
            data: bytes = super()._do_read(length, use_readline)
            return data
        pieces = []
        while length > 0:  # a short read raises pywsgi's "unexpected end of file"
            piece = super()._do_read(min(length, READ_PIECE))
            pieces.append(piece)
            length -= len(piece)
        return b"".join(pieces)

    def _chunked_read(self, length: int | None = None, use_readline: bool = False) -> bytes:
        """pywsgi's, in pieces of READ_PIECE at most: pywsgi read a chunk's data with one
        ``rfile.read(size)``, so a one-line request with a chunk size of ``ffffffffff``
        was a MemoryError (a traceback and a 500), and one past ``sys.maxsize`` an
        OverflowError. A size past 2**63 - 1 is a 400, as at the front door."""
        if length is not None and length <= READ_PIECE:
            return self._chunked_piece(length, use_readline)
        pieces = []
        while True:
            piece = self._chunked_piece(
                READ_PIECE if length is None else min(length, READ_PIECE), use_readline)
            if not piece:
                break
            pieces.append(piece)
            if length is not None:
                length -= len(piece)
                if length <= 0:
                    break
            if use_readline and piece[-1:] == b"\n":
                break
        return b"".join(pieces)

    def _chunked_piece(self, length: int, use_readline: bool) -> bytes:
        try:
            data: bytes = super()._chunked_read(length, use_readline)
        except ValueError:  # only int(b"", 16): the digits read are checked hex ones
            # the stream is out of step: close after (a slot of pywsgi's Input)
            self._chunked_input_error = True  # type: ignore[misc]
            raise _InvalidClientInput("a chunk size line without a size") from None
        return data

    def _Input__read_chunk_length(self, rfile: Any) -> int:  # noqa: N802
        """pywsgi's reader of a chunk size line (its private name), refusing a size past
        2**63 - 1 as the front door does, before any of its data is waited for."""
        size: int = super()._Input__read_chunk_length(rfile)
        if size > MAX_CHUNK:
            self._chunked_input_error = True  # type: ignore[misc]
            raise _InvalidClientInput("chunk size past 2**63 - 1")
        return size


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
    #: read request bodies with :class:`ClusterInput` (a subclass whose reader already
    #: reads as bytes arrive and checks chunk lines first turns it off)
    checked_input = True
    body_sent = 0  # body bytes the app gave for this response (for its Content-Length)
    client_left = False  # a send to the client failed during this response
    cut = False  # the stop's drain ended during this response (the door's handler)
    body_unasked = False  # the answer went out before the 100 (Continue) the client awaits

    def handle(self) -> None:
        set_nodelay(self.socket)
        super().handle()

    def MessageClass(self, rfile: Any, *_: Any) -> RequestHeaders:  # noqa: N802
        """Request headers without the ``email`` package (pywsgi's costliest step), their
        body framing checked (:func:`check_framing`)."""
        headers = read_headers(rfile)
        check_framing(headers, self.request_version)
        return headers

    def _check_http_version(self) -> bool:
        """pywsgi's check, with a version lacking its minor number (``HTTP/1``) a 400
        like any other bad one: pywsgi indexed past it, and each such request line put
        a traceback in the log."""
        try:
            return bool(super()._check_http_version())
        except (IndexError, ValueError):
            return False

    def _handle_client_error(self, ex: Exception) -> Any:
        """pywsgi's (one log line and a 400), with the status a malformed head calls
        for when it is another (501)."""
        answer = super()._handle_client_error(ex)
        status = ex.status if isinstance(ex, BadRequestHeaders) else 400
        if status != 400:
            return str(status), simple_response(status, f"{ex}\n".encode(), close=True)
        return answer

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
        if type(self.wsgi_input) is pywsgi.Input:
            # pywsgi builds its Input itself: the same object, read by ClusterInput
            # (or ExpectInput, for a reader that checks the body itself)
            self.wsgi_input.__class__ = ClusterInput if self.checked_input else ExpectInput
        expect = environ.get("HTTP_EXPECT")
        if expect is not None:
            if self.request_version != "HTTP/1.1":
                # pywsgi answers 100-continue whatever the version; an HTTP/1.0 client
                # takes it for its answer (RFC 9110 10.1.1: the expectation is ignored;
                # 15.2: no 1xx to a 1.0 client)
                self.wsgi_input.socket = None
            elif expect.lower() == "100-continue":
                # case-insensitive (RFC 9110 10.1.1), as the door reads it; pywsgi
                # answered only the lower-case spelling, and the client waited
                self.wsgi_input.socket = self.socket
        if environ["wsgi.input"] is self.rfile and (
                self.content_length not in (None, "", "0")
                or "HTTP_TRANSFER_ENCODING" in environ):
            # pywsgi gives a request with an Upgrade the raw socket file as its input, and
            # after the response still skips its Content-Length from that file: a body
            # read through it was skipped twice, the next request's first bytes lost.
            # With a body the Upgrade is ignored (cluster.proxy.websocket
            # .is_websocket_upgrade): the body is read as any other.
            environ["wsgi.input"] = self.wsgi_input
            environ["wsgi.input_terminated"] = True
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

    def serve_websocket(self, app: Callable[..., Iterable[bytes]],
                        headers: Iterable[tuple[str, str]], max_message: int,
                        write_timeout: float = 0.0,
                        environ: dict[str, Any] | None = None) -> list[bytes]:
        """Answer this WebSocket handshake and run ``app`` with ``environ['wsgi.websocket']``
        as gevent-websocket's own handler would (the hardened object of
        cluster.app_websocket). For cluster.wrap(), whose routing picks the local app from
        inside the application call: the 101 goes out only then, so a handshake routed
        elsewhere is still the bridge's to take. ``headers`` go on the 101 as well.
        ``write_timeout`` (--write-timeout, 0: none) bounds each frame's send: the app's
        ``send()`` to a client that stopped reading then raises WebSocketError.
        ``environ``: the one routing made for the app (a SockJS session's
        ``/cluster-ddp/...`` path back to the app's own), else this request's."""
        from geventwebsocket.handler import Client
        from geventwebsocket.websocket import Stream, WebSocket

        from cluster.app_websocket import adopt, end_websocket, run_app

        if environ is None:
            environ = self.environ
        self.close_connection = True  # after a refusal, what comes next may be frames
        status, fields, body = handshake_answer(environ, getattr(app, "app_protocol", None))
        if body:
            self.start_response(status, [("Content-Type", "text/plain"), *fields])
            return [body]
        self.start_response(status, [*fields, *headers])
        self._write_with_headers(b"")
        self.hijacked = True  # the socket is the WebSocket's now: pywsgi adds nothing
        websocket = WebSocket(environ, Stream(self), self)
        adopt(websocket, max_message,
              timed_sendall(self.socket, write_timeout) if write_timeout else None)
        environ["wsgi.websocket_version"] = environ.get("HTTP_SEC_WEBSOCKET_VERSION")
        environ["wsgi.websocket"] = websocket
        # gevent-websocket's registry of the server's open sockets, which apps broadcast
        # over (ws.handler.server.clients, ws.handler.active_client; its chat example)
        clients = getattr(self.server, "clients", None)
        if clients is None:
            clients = self.server.clients = {}
        clients[self.client_address] = Client(self.client_address, websocket)
        try:
            run_app(app, environ, websocket)
        finally:
            clients.pop(self.client_address, None)
            if not websocket.closed:
                websocket.close()
            environ["wsgi.websocket"] = None
            end_websocket(self, self.socket, self.rfile.read)
        return []

    @property
    def active_client(self) -> Any:
        """gevent-websocket's handler's: this connection's entry in the server's
        ``clients``, while its WebSocket is open."""
        return self.server.clients[self.client_address]

    @property
    def logger(self) -> Any:
        """gevent-websocket's handler's, which is what an app's ``ws.logger`` is: the
        server's logger, made by gevent-websocket on first use."""
        from geventwebsocket.handler import WebSocketHandler

        return WebSocketHandler.logger.fget(self)

    def handle_error(self, t: Any, v: Any, tb: Any) -> None:
        """pywsgi's (a traceback), but one line for a WebSocket app served here that let
        gevent-websocket's WebSocketError out ("Socket is dead": the client reset the
        connection while the app sent): most apps do not catch it, and the socket's end
        is the client's doing. The socket is the app's once hijacked here, or once
        gevent-websocket's handler ran it (``websocket_used``: the door's handler).

        One line too for a client that left in the middle of its request body, which
        the app's read of it raises (pywsgi's "unexpected end of file while ..."): an
        upload cut short is no server error, and a traceback per request would let any
        client fill the log (the door's handler says so the same way)."""
        from geventwebsocket.exceptions import WebSocketError

        serving = self.hijacked or getattr(self, "websocket_used", False)
        if serving and isinstance(v, WebSocketError):
            log.info("client %s: WebSocket %s ended in the app: %s",
                     self.client_address, str(self.path)[:200], v)
            self.close_connection = True
            return
        if isinstance(v, OSError) and str(v).startswith("unexpected end of file while"):
            log.info("client %s left in the middle of its request body (%s %s): %s",
                     self.client_address, self.command, str(self.path)[:200], v)
            self.close_connection = True
            return
        super().handle_error(t, v, tb)

    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: Any = None) -> Any:
        """pywsgi's, refusing a status that is no final answer (a ValueError in the app:
        a 500): pywsgi sent any number it could parse, so an app's ``"103 X"`` with a body
        left every client (curl, Go, a balancer in front) waiting for the final answer
        that never came, and ``"20 X"`` or ``"2000 X"`` was a status line clients refuse.
        A 101 only answers a request that asked to upgrade (RFC 9110 15.2.2). So is a
        header field name that is no token or a value with a control byte (pywsgi
        refused only CR and LF; gunicorn's own workers refuse these too): ``X Bad``, a
        NUL or an ESC went out as they were, and Go's and Node's clients refused the
        whole answer (a balancer in front answered 502). So is a Content-Length that is
        no number, or two different ones: pywsgi framed the body by the last and sent
        both, and a client or proxy that reads the first (http.client, requests) took
        the next answer on the connection for the rest of this one. The same one twice
        goes out once (as the relay passes an endpoint's on)."""
        check_status(status, self.environ)
        if check_fields(headers):
            headers = once_length(headers)
        return super().start_response(status, headers, exc_info)

    def write(self, data: bytes) -> None:
        """pywsgi's, holding the app to its own Content-Length (PEP 3333: never more
        bytes than it says). Bytes past it would reach a keep-alive client as the start
        of its next response: they are dropped (the response as sent is whole)."""
        check_body_piece(data)
        length = self.provided_content_length
        if length is not None and data and self.command != "HEAD":
            room = declared_length(length) - self.body_sent
            if len(data) > room >= 0:
                log.warning("%s %s: the app gave more body bytes than its Content-Length: "
                            "%s; dropping %d", self.command, str(self.path)[:200],
                            length[:40], len(data) - room)
                data = data[:room]
        super().write(data)
        # counted once sent: a piece refused (no start_response yet) is not part of
        # the 500 page pywsgi sends next, whose own Content-Length this holds it to
        self.body_sent += len(data)

    def _sendall(self, data: bytes | bytearray) -> None:
        try:
            super()._sendall(data)
        except OSError:
            self.client_left = True
            raise

    def short_of_length(self) -> bool:
        """The app sent fewer body bytes than its Content-Length (or one that is no
        number): the client waits for the rest, and would take the next answer for it."""
        length = self.provided_content_length
        return length is not None and self.command != "HEAD" and \
            self.code not in (101, 204, 304) and not self.hijacked and \
            not 0 <= declared_length(length) <= self.body_sent

    def _write_with_headers(self, data: bytes) -> None:
        """Status line, headers and a first body piece up to ONESEND_MAX in one send.

        pywsgi sends the head and the body separately; a send that wakes the peer is
        the costliest call of a small response (see docs/benchmarks.md).

        A response to HEAD is the head a GET would get, without its content (RFC 9110
        9.3.2): pywsgi sends whatever the app returns, which a keep-alive client reads
        as the start of its next response (under cluster.wrap() as under the door)."""
        if self.command == "HEAD":
            data = b""
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

    def _write(self, data: bytes) -> None:
        if self.command != "HEAD":  # no content after a HEAD's head (_write_with_headers)
            super()._write(data)

    def finalize_headers(self) -> None:
        super().finalize_headers()
        if self.command == "HEAD":
            self.response_use_chunked = False  # no chunks, so no last-chunk either
        headers = self.response_headers
        if any(name.lower() == b"transfer-encoding" for name, _ in headers) and \
                any(name.lower() == b"content-length" for name, _ in headers):
            # An app that framed its body itself (a hop-by-hop field PEP 3333 leaves to
            # the server), and pywsgi added a Content-Length: never both (RFC 9112 6.1;
            # a proxy in front would pick one and desync). The app's framing goes out,
            # and the connection ends with the response.
            headers = self.response_headers = [(name, value) for name, value in headers
                                               if name.lower() != b"content-length"]
            self.provided_content_length = None
            self.close_connection = True
        if not self.response_use_chunked and self.command != "HEAD" and \
                self.code not in (101, 204, 304) and \
                not any(name.lower() == b"content-length" for name, _ in headers):
            # A streamed body to an HTTP/1.0 client (no chunks for it) ends when the
            # connection does. pywsgi has said keep-alive already to one that asked for
            # it (ab -k), which would then wait for the end of the body forever.
            self.close_connection = True
            self.response_headers = [(name, value) for name, value in headers
                                     if name.lower() != b"connection"]
            self.response_headers.append((b"Connection", b"close"))
            return
        if self.body_broken():
            # The app answers a request whose chunked body pywsgi refused (its read raised
            # and the app made a 400 or 500 of it): the connection ends with this answer.
            self.close_connection = True
        body = self.wsgi_input
        if isinstance(body, ExpectInput) and body.awaited():
            # The app answers before reading a body whose 100 (Continue) the client
            # still waits for: the client may never send it (ExpectInput), so the
            # connection ends with this answer, and no 100 comes after its head.
            self.close_connection = self.body_unasked = True
            body.send_100_continue_enabled = False
        environ = self.environ  # pywsgi's class default is None
        if self.code != 101 and environ and "HTTP_UPGRADE" in environ and \
                is_websocket_upgrade(environ):
            # A refused handshake ends the connection, as the front door's do: what the
            # client sends next may be frames, which a kept connection would read as
            # its next request head.
            self.close_connection = True
        if self.close_connection and self.code != 101:
            # pywsgi closes an HTTP/1.1 connection after the answer without saying so
            # (RFC 9112 9.6: it should): a client would take it as reusable
            self.response_headers = say_close(self.response_headers)

    def log_request(self) -> None:
        """Skip formatting a line nobody writes (``log=None``); else log as the base
        class does (pywsgi's line, or gunicorn's access log under gunicorn)."""
        if isinstance(self.server.log, _NO_ACCESS_LOG):
            return
        super().log_request()

    def process_result(self) -> None:
        if self.hijacked:
            return  # the new owner already answered; never append an HTTP response
        try:
            super().process_result()
        except UpstreamError:
            # An endpoint broke off the body being relayed (cluster.wrap()): pywsgi closes
            # the connection, and a reset instead of that FIN keeps a body that ends at
            # the close (for an HTTP/1.0 client) from looking whole, as at the door.
            reset_on_close(self.socket)
            raise
        if not self.status and not self.headers_sent and not self.hijacked:
            # An empty body, and start_response never called: pywsgi sent nothing and
            # kept the connection, and the client waited for an answer that never came
            # (gunicorn answers 500, as pywsgi does for a body without start_response).
            # The app's bug, in one line: it returned, there is no traceback to show.
            log.error("%s %s: the app returned an empty body without calling "
                      "start_response(); answering 500", self.command,
                      str(self.path)[:200])
            self._send_error_response_if_possible(500)

    def _send_error_response_if_possible(self, error_code: int) -> None:
        if self.hijacked:
            # An error after the takeover: a 500 page would be garbage in the middle
            # of a WebSocket stream. Just make sure the connection is not reused.
            self.close_connection = True
            return
        if self.headers_sent and not self.response_length:
            # the head was being built, nothing went out: the 500 can still be sent
            # (gevent-websocket's start_response asserts on headers_sent; its failure
            # here killed the connection's greenlet and the client got nothing)
            self.headers_sent = False
        super()._send_error_response_if_possible(error_code)

    def handle_one_request(self) -> Any:
        self.hijacked = False
        self.body_unasked = False
        result = super().handle_one_request()
        if result is None and self.body_unasked and not self.hijacked and \
                self.socket is not None:
            # A client that did not wait for the 100 may be sending the body still:
            # closed with its bytes unread, the socket sends a reset, which can overtake
            # the answer (the front door lingers the same way)
            linger(self.socket, self.socket.recv)
        return result

    def body_broken(self) -> bool:
        """pywsgi refused a line of this request's chunked body (a chunk size with a
        space, over 16 digits...) while the app read it."""
        return bool(getattr(getattr(self, "wsgi_input", None), "_chunked_input_error", False))

    def handle_one_response(self) -> None:
        self.body_sent = 0
        self.client_left = False
        try:
            super().handle_one_response()
            if self.short_of_length():
                # (a client that went, or the end of a stop's drain, cut it: not the app)
                if not (self.client_left or self.cut):
                    log.warning("%s %s: the app sent %d body bytes with Content-Length: "
                                "%s; closing the connection", self.command,
                                str(self.path)[:200], self.body_sent,
                                str(self.provided_content_length)[:40])
                self.close_connection = True
            if self.body_broken():
                # An app that catches the read error and answers (as frameworks do, with
                # a 400 or a 500) leaves pywsgi reading its next request from the middle
                # of the broken body, which pywsgi does not skip: bytes the client sent as
                # chunk data would be served as a request of their own (smuggled past
                # any proxy in front, which took them for a body). The connection ends.
                self.close_connection = True
        finally:
            # The bound method in the environ is a handler -> environ -> handler cycle:
            # break it so a finished connection is freed by refcounting, not by the gc.
            environ = getattr(self, "environ", None)
            if environ is not None:
                environ.pop(HIJACK_KEY, None)


def timed_sendall(sock: Any, seconds: float) -> Callable[[bytes], None]:
    """``sock.sendall`` that gives up after ``seconds`` with OSError, and shuts the
    socket so that what follows (a close frame) fails at once: the frame was cut."""
    def write(data: bytes) -> None:
        try:
            with gevent.Timeout(seconds):
                sock.sendall(data)
        except gevent.Timeout:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            raise OSError(f"the client took nothing for {seconds:g}s "
                          f"(--write-timeout)") from None

    return write


def declared_length(content_length: str) -> int:
    """An app's Content-Length value as a number (-1: not a number at all)."""
    value = content_length.strip()
    return int(value) if value.isdigit() else -1


def check_status(status: Any, environ: dict[str, Any] | None) -> None:
    """PEP 3333 / RFC 9112 4: an app's status is three digits, a final answer (200 or
    more; 1xx are the server's to send, a 101 only to a request with an Upgrade), then
    a space and the reason, if any. Raises ValueError (TypeError: not a str) otherwise."""
    if not isinstance(status, str):
        return  # pywsgi's own check says so
    code = status[:3]
    if len(code) != 3 or not code.isdigit() or not code.isascii() or \
            status[3:4] not in ("", " ") or code[0] == "0" or \
            (code[0] == "1" and (code != "101" or not environ
                                 or "HTTP_UPGRADE" not in environ)):
        raise ValueError(f"the app's status {status[:40]!r} is not a final HTTP status "
                         f"(three digits, 200 or more, or a 101 to an upgrade)")


#: header field names an app gave that are tokens (check_fields)
_FIELD_NAMES: set[str] = set()


def say_close(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` saying that the connection ends after this response (RFC 9112 9.6).
    An app's own Connection field that says otherwise (``keep-alive``: a hop-by-hop
    field PEP 3333 leaves to the server, which gunicorn drops) gives way, with its
    Keep-Alive: said to a client that asked for close, or to an HTTP/1.0 one, the
    client took the connection for reusable while the server closed it."""
    said = [value for name, value in headers if name.lower() == b"connection"]
    if any(b"close" in value.lower() for value in said):
        return headers
    if said:
        headers = [(name, value) for name, value in headers
                   if name.lower() not in (b"connection", b"keep-alive")]
    headers.append((b"Connection", b"close"))
    return headers


def check_fields(headers: Any) -> bool:
    """RFC 9110 5.1, 5.5: an app's header field names are tokens and its values hold no
    control byte but HTAB; 8.6: a Content-Length is digits, and one length however often
    it is given. Raises ValueError otherwise (pywsgi checks the types). True when the
    app gave that one length more than once (see :func:`once_length`)."""
    known = _FIELD_NAMES
    length = -1
    repeated = False
    try:
        for name, value in headers:
            # (per response: names seen before skip the regex; a printable value, the
            # usual one, skips it too)
            if name not in known:
                if not _TOKEN(name):
                    raise ValueError(f"the app's header field name {name[:40]!r} is not a "
                                     f"token (RFC 9110 5.1)")
                if len(known) >= 1024:
                    known.clear()
                known.add(name)
            if not value.isprintable() and _CONTROL(value):
                raise ValueError(f"the app's header field {name[:40]}: {value[:40]!r} has a "
                                 f"control byte (RFC 9110 5.5)")
            if len(name) == 14 and name.lower() == "content-length":
                digits = value.strip(" \t")
                if not digits.isdigit() or not digits.isascii():
                    raise ValueError(f"the app's Content-Length {value[:40]!r} is not a "
                                     f"number of bytes (RFC 9110 8.6)")
                if length >= 0:
                    if int(digits) != length:
                        raise ValueError(f"the app gave two different Content-Lengths "
                                         f"({length} and {digits[:40]}; RFC 9110 8.6)")
                    repeated = True
                length = int(digits)
    except (TypeError, AttributeError):
        return False  # not a str: pywsgi's own check says so, more plainly
    return repeated


def once_length(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``headers`` with only the first of its (equal) Content-Length fields: strict
    parsers (Node's llhttp: "Duplicate Content-Length") refuse the whole answer."""
    seen = False
    out = []
    for name, value in headers:
        if len(name) == 14 and name.lower() == "content-length":
            if seen:
                continue
            seen = True
        out.append((name, value))
    return out


def check_body_piece(data: Any) -> None:
    """PEP 3333: an app's body pieces are bytes. A str reached the socket's send after
    the head was marked sent, too late for the 500 the app's error deserves. (An empty
    str passes: gevent-websocket writes one to send the 101's head.)"""
    if data and not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"the app gave a {type(data).__name__} as a piece of its response "
                        f"body, not bytes (PEP 3333)")


def handshake_refusal(environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes] | None:
    """(status, header fields, body) refusing the WebSocket handshake in ``environ``, or
    None when it is well formed (RFC 6455 4.2.1): 426 with no version, 400 for another
    version or for a key that is not exactly 16 bytes of base64. Two key or version
    fields reach the environ joined by a comma, which is no base64 and no version: 400
    (RFC 6455 11.3.1, 11.3.5: each appears once). gevent-websocket decodes the key
    leniently (a comma, and whatever follows a padded key, are skipped), so ``k, k``
    got a 101 from it; the door answers with :func:`handshake_answer` too."""
    version = str(environ.get("HTTP_SEC_WEBSOCKET_VERSION") or "").strip()
    offered = ", ".join(WEBSOCKET_VERSIONS)
    if not version:
        return "426 Upgrade Required", [("Sec-WebSocket-Version", offered)], \
            b"No WebSocket version given\n"
    if version not in WEBSOCKET_VERSIONS:
        return "400 Bad Request", [("Sec-WebSocket-Version", offered)], \
            b"Unsupported WebSocket version\n"
    key = str(environ.get("HTTP_SEC_WEBSOCKET_KEY") or "").strip()
    try:
        nonce = base64.b64decode(key.encode("latin-1"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        nonce = b""
    if len(nonce) != 16:
        return "400 Bad Request", [], b"Invalid Sec-WebSocket-Key\n"
    return None


def handshake_answer(environ: dict[str, Any], choose: Callable[[str], Any] | None = None
                     ) -> tuple[str, list[tuple[str, str]], bytes]:
    """(status, header fields, body) answering the WebSocket handshake in ``environ``: a
    101 with an empty body, or the refusal gevent-websocket's handler gives (426 with no
    version, 400 for another version or a key that is not 16 bytes of base64). ``choose``
    is an app's ``app_protocol(path)``, gevent-websocket's way to pick a subprotocol."""
    refusal = handshake_refusal(environ)
    if refusal is not None:
        return refusal
    key = str(environ.get("HTTP_SEC_WEBSOCKET_KEY") or "").strip()
    accept = base64.b64encode(hashlib.sha1((key + _WEBSOCKET_GUID).encode("latin-1"))
                              .digest()).decode("latin-1")
    fields = [("Upgrade", "websocket"), ("Connection", "Upgrade"),
              ("Sec-WebSocket-Accept", accept)]
    if choose is not None:
        protocol = choose(str(environ.get("PATH_INFO", "")))
        offers = {part.strip() for part in
                  str(environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", "")).split(",")}
        if protocol and protocol in offers:
            fields.append(("Sec-WebSocket-Protocol", protocol))
    return "101 Switching Protocols", fields, b""


def is_websocket_upgrade(environ: dict[str, Any]) -> bool:
    """True for an HTTP/1.1 ``GET`` with ``Upgrade: websocket`` and ``Connection: upgrade``
    and no body (RFC 6455 4.1). The Upgrade of an HTTP/1.0 request, or of one with a
    body, is ignored (RFC 9110 7.8), as by the front door (RequestHead.is_websocket)."""
    if environ.get("REQUEST_METHOD") != "GET" or \
            environ.get("SERVER_PROTOCOL", "HTTP/1.1") != "HTTP/1.1" or \
            environ.get("CONTENT_LENGTH") not in (None, "", "0") or \
            "HTTP_TRANSFER_ENCODING" in environ:
        return False
    upgrade = _tokens(environ.get("HTTP_UPGRADE", ""))
    return "websocket" in upgrade and "upgrade" in _tokens(environ.get("HTTP_CONNECTION", ""))


def _tokens(value: str) -> set[str]:
    return {part.strip().lower() for part in value.split(",") if part.strip()}
