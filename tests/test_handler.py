"""ClusterHandler's fast paths: its header reader, one-send responses, RAW_URI, logging.

The reader replaces pywsgi's email-based one, so valid requests are checked against
stock pywsgi itself: the same bytes sent to a real WSGIServer with pywsgi's handler and
to one with ClusterHandler must give the same environ. Bad requests get a clean 400.
Servers run in-process on 127.0.0.1 and are driven by real gevent sockets.
"""

from __future__ import annotations

import io
import json
from typing import Any, Callable, Iterator

import gevent
import pytest
from gevent import socket as gsocket
from gevent.pywsgi import WSGIHandler, WSGIServer

from cluster.handler import (
    MAX_HEADER_LINE,
    MAX_HEADERS,
    BadRequestHeaders,
    ClusterHandler,
    read_headers,
)

TIMEOUT = 10


# --- the reader on its own ---------------------------------------------------------

def parse(raw: bytes) -> Any:
    return read_headers(io.BytesIO(raw))


def test_read_headers_keeps_order_repeats_and_first_value() -> None:
    rfile = io.BytesIO(b"Host: a\r\nX-A: 1\r\nx-a:  2 \r\nContent-Type:\tt/x\t\r\n\r\nBODY")
    headers = read_headers(rfile)
    assert headers.fields == [("Host", "a"), ("X-A", "1"), ("x-a", "2"),
                              ("Content-Type", "t/x")]
    assert headers.get("X-a") == "1" and headers.getheader("missing", "d") == "d"
    assert headers.typeheader == "t/x" and "HOST" in headers
    assert headers.items() == headers.fields
    assert headers.headers[0] == "Host: a\r\n"
    assert rfile.read() == b"BODY"  # stops right after the blank line
    del headers["x-a"]
    assert "X-A" not in headers and headers.fields == [("Host", "a"), ("Content-Type", "t/x")]


def test_read_headers_accepts_bare_lf_eof_and_latin1() -> None:
    assert parse(b"A: 1\nB: 2\n\n").fields == [("A", "1"), ("B", "2")]
    assert parse(b"A: 1\r\n").fields == [("A", "1")]  # EOF ends the head, as before
    assert parse(b"A: \xe9t\xe9\r\n\r\n").get("a") == "\xe9t\xe9"
    assert parse(b"A: x: y\r\nB:\r\n\r\n").fields == [("A", "x: y"), ("B", "")]
    assert parse(b"Content-Length: 3\r\nContent-Length: 3\r\n\r\n").get("content-length") == "3"


@pytest.mark.parametrize("raw, reason", [
    (b"A: 1\r\n  folded\r\n\r\n", "folding"),
    (b"\tA: 1\r\n\r\n", "folding"),
    (b"no colon\r\n\r\n", "malformed"),
    (b"Host : a\r\n\r\n", "malformed"),
    (b": empty name\r\n\r\n", "malformed"),
    (b"A\x00: 1\r\n\r\n", "malformed"),
    (b"A: 1\r2\r\n\r\n", "malformed"),
    (b"A: 1\x002\r\n\r\n", "malformed"),
    (b"Content-Length: 1\r\ncontent-length: 2\r\n\r\n", "conflicting Content-Length"),
    (b"A: " + b"x" * MAX_HEADER_LINE + b"\r\n\r\n", "too long"),
    (b"".join(b"X-%d: 1\r\n" % i for i in range(MAX_HEADERS + 1)) + b"\r\n", "more than"),
])
def test_read_headers_rejects(raw: bytes, reason: str) -> None:
    with pytest.raises(BadRequestHeaders, match=reason):
        parse(raw)
    assert issubclass(BadRequestHeaders, ValueError)  # what makes pywsgi answer 400


def test_read_headers_limits_are_inclusive() -> None:
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(MAX_HEADERS)) + b"\r\n"
    assert len(parse(many).fields) == MAX_HEADERS
    line = b"A: " + b"x" * (MAX_HEADER_LINE - 5) + b"\r\n"
    assert len(line) == MAX_HEADER_LINE and parse(line + b"\r\n").get("a")


# --- real servers ------------------------------------------------------------------

class Lines:
    """A log target for WSGIServer (access or error log): keeps what is written."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, text: str) -> None:
        self.lines.append(text)

    def flush(self) -> None:
        pass


def environ_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """Answers with the request's header-derived environ keys (and the body it read)."""
    keys = {k: v for k, v in environ.items()
            if k.startswith(("HTTP_", "CONTENT_")) or k in ("PATH_INFO", "QUERY_STRING",
                                                             "RAW_URI")}
    keys["body"] = environ["wsgi.input"].read().decode("latin-1")
    data = json.dumps(keys, sort_keys=True).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(data)))])
    return [data]


class Server:
    def __init__(self, app: Any, handler: type = ClusterHandler, log: Any = None) -> None:
        self.errors = Lines()
        self.server = WSGIServer(("127.0.0.1", 0), app, handler_class=handler, log=log,
                                 error_log=self.errors)
        self.server.start()
        self.port = self.server.server_port

    def exchange(self, raw: bytes) -> bytes:
        """Send raw bytes, half-close, return everything the server answered."""
        with gsocket.create_connection(("127.0.0.1", self.port)) as sock:
            sock.sendall(raw)
            sock.shutdown(gsocket.SHUT_WR)
            return read_all(sock)


def read_all(sock: Any) -> bytes:
    data = b""
    with gevent.Timeout(TIMEOUT):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def read_response(sock: Any, buffered: bytearray, head_only: bool = False
                  ) -> tuple[bytes, bytes]:
    """One response (Content-Length or chunked framing) from a keep-alive connection;
    ``head_only`` for the answer to a HEAD request."""
    def fill() -> None:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed mid-response")
        buffered.extend(chunk)

    with gevent.Timeout(TIMEOUT):
        while b"\r\n\r\n" not in buffered:
            fill()
        head, _, rest = bytes(buffered).partition(b"\r\n\r\n")
        buffered[:] = rest
        lower = head.lower()
        if b"transfer-encoding: chunked" in lower:
            body = b""
            while True:
                while b"\r\n" not in buffered:
                    fill()
                size_line, _, rest = bytes(buffered).partition(b"\r\n")
                size = int(size_line, 16)
                while len(rest) < size + 2:
                    fill()
                    size_line, _, rest = bytes(buffered).partition(b"\r\n")
                body += rest[:size]
                buffered[:] = rest[size + 2:]
                if size == 0:
                    return head, body
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        status = int(head.split(b" ", 2)[1])
        if head_only or status in (204, 304) or head.startswith(b"HTTP/1.1 1"):
            length = 0
        while len(buffered) < length:
            fill()
        body = bytes(buffered[:length])
        buffered[:] = buffered[length:]
        return head, body


@pytest.fixture()
def servers() -> Iterator[tuple[Server, Server]]:
    stock, ours = Server(environ_app, WSGIHandler), Server(environ_app)
    try:
        yield stock, ours
    finally:
        stock.server.stop()
        ours.server.stop()


VALID = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /p?q=1 HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nX-A: 2\r\nx-a: 3\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX_Under: 1\r\nX-Ok: 2\r\n\r\n",
    b"GET / HTTP/1.1\r\nContent-Type: a\r\ncontent-type: b\r\nX-E:\r\nX-S:  s  \r\n\r\n",
    b"POST /e HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Type: t/x\r\n\r\nabc",
    b"POST /e HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\nHost: a\nX-N: 1\n\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-U: \xe9t\xe9\r\nX-C: a:b\r\n\r\n",
    b"GET / HTTP/1.0\r\nHost: a\r\n\r\n",
]


@pytest.mark.parametrize("raw", VALID)
def test_environ_matches_stock_pywsgi(servers: tuple[Server, Server], raw: bytes) -> None:
    stock, ours = servers
    expected = json.loads(stock.exchange(raw).partition(b"\r\n\r\n")[2])
    got = json.loads(ours.exchange(raw).partition(b"\r\n\r\n")[2])
    assert got.pop("RAW_URI") == raw.split(b" ")[1].decode()
    assert got == expected


BAD = [
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Fold: 1\r\n  more\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nbad line\r\nX-B: 2\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
    b"GET / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
    b"GET / HTTP/1.1\r\nX-Ctl: a\x01b\r\n\r\n",
    b"GET / HTTP/1.1\r\nX-Del: a\x7fb\r\n\r\n",
    b"GET / HTTP/1.1\r\nX-Long: " + b"a" * (MAX_HEADER_LINE + 10) + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n",
    # a version without its minor number: pywsgi's check raised IndexError (a traceback)
    b"GET / HTTP/1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.x\r\nHost: a\r\n\r\n",
]


@pytest.mark.parametrize("raw", BAD)
def test_bad_request_heads_get_a_clean_400(raw: bytes, capsys: Any) -> None:
    server = Server(environ_app)
    try:
        answer = server.exchange(raw)
    finally:
        server.server.stop()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert len(server.errors.lines) == 1 and "Traceback" not in server.errors.lines[0]
    assert "Traceback" not in capsys.readouterr().err


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.mark.parametrize("fields, body, status", [
    # RFC 9112 6.1: a server MUST close after such a request; stock pywsgi dropped the
    # Content-Length, read the chunks and served what followed them
    (b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n", 400),
    (b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n", 400),
    # codings pywsgi ignored (no body: the chunks were read as the next request)
    (b"Transfer-Encoding: chunked, chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n", 501),
    (b"Transfer-Encoding: gzip, chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n", 501),
    (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
     b"3\r\nabc\r\n0\r\n\r\n", 501),
    (b"Transfer-Encoding: xchunked\r\n", b"3\r\nabc\r\n0\r\n\r\n", 400),
    (b'Transfer-Encoding: "chunked"\r\n', b"3\r\nabc\r\n0\r\n\r\n", 400),
    (b"Transfer-Encoding: chunked;q=1\r\n", b"3\r\nabc\r\n0\r\n\r\n", 400),
    # what str.strip() took for whitespace: read as chunked here, unknown elsewhere
    (b"Transfer-Encoding: \x0bchunked\r\n", b"3\r\nabc\r\n0\r\n\r\n", 400),
    (b"Transfer-Encoding: chunked\x0c\r\n", b"3\r\nabc\r\n0\r\n\r\n", 400),
    (b"Transfer-Encoding: \xa0chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n", 400),
    # int() reads these as numbers
    (b"Content-Length: +3\r\n", b"abc", 400),
    (b"Content-Length: 0_3\r\n", b"abc", 400),
    (b"Content-Length: 99999999999999999999\r\n", b"abc", 400),
], ids=["cl-te", "te-cl", "chunked-twice", "gzip-chunked", "two-lines", "xchunked",
        "quoted", "parameter", "vtab", "formfeed", "nbsp", "plus", "underscore", "huge"])
def test_a_body_a_proxy_could_frame_another_way_is_refused(fields: bytes, body: bytes,
                                                           status: int) -> None:
    """cluster.wrap()'s server holds body framing to the front door's rules: the answer
    is the door's status, the connection ends, and nothing after the head is served."""
    server = Server(environ_app)
    try:
        answer = server.exchange(b"POST /e HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n" + body
                                 + SMUGGLED)
    finally:
        server.server.stop()
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    assert len(server.errors.lines) == 1 and "Traceback" not in server.errors.lines[0]


@pytest.mark.parametrize("size_line", [b"\r\n", b";ext\r\n"],
                         ids=["empty", "extension-only"])
@pytest.mark.parametrize("then", [b"abc\r\n0\r\n\r\n", b"0\r\n\r\n" + SMUGGLED],
                         ids=["hex-looking-data", "last-chunk-then-a-request"])
def test_a_chunk_size_line_without_digits_is_a_clean_400_and_the_end(
        size_line: bytes, then: bytes, capsys: Any) -> None:
    """pywsgi read a size line with no digits as int(b"", 16): a ValueError, so the log
    got a traceback and the client a 500 for its own mistake, and only once it stopped
    sending: pywsgi skipped the rest of the body by reading the chunk data ("abc") as a
    size line first. h11, llhttp, nginx and the front door refuse the line (400)."""
    server = Server(environ_app)
    try:
        answer = server.exchange(b"POST /e HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked"
                                 b"\r\n\r\n" + size_line + then + SMUGGLED)
    finally:
        server.server.stop()
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert answer.count(b"HTTP/1.1 ") == 1 and b"/smuggled" not in answer, answer
    assert "Traceback" not in "".join(server.errors.lines) + capsys.readouterr().err


def test_a_huge_content_length_is_read_as_the_bytes_come(capsys: Any) -> None:
    """pywsgi read a body in one rfile.read(Content-Length), allocating it all first: a
    one-line request claiming a terabyte was a MemoryError (a traceback, a 500) in an
    app that reads its input. Now the bytes that came are read, then the client's end."""
    server = Server(environ_app)
    try:
        answer = server.exchange(b"POST /e HTTP/1.1\r\nHost: a\r\n"
                                 b"Content-Length: 999999999999\r\n\r\nabc")
        whole = server.exchange(b"POST /e HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n"
                                % (3 << 20) + b"x" * (3 << 20))
    finally:
        server.server.stop()
    errors = "".join(server.errors.lines) + capsys.readouterr().err
    assert "MemoryError" not in errors and "Traceback" not in errors, errors
    assert b" 500 " not in answer, answer
    assert whole.startswith(b"HTTP/1.1 200 "), whole[:200]
    assert json.loads(whole.partition(b"\r\n\r\n")[2])["body"] == "x" * (3 << 20)


@pytest.mark.parametrize("value", [b"chunked ", b"\tChunked", b",chunked", b"CHUNKED, "])
def test_chunked_spelled_any_valid_way_is_read_as_chunked(value: bytes) -> None:
    """RFC 9110 5.6.1 lists and case-insensitive codings: what the front door reads as
    chunked, pywsgi (which wants exactly 'chunked') now reads so too."""
    server = Server(environ_app)
    try:
        answer = server.exchange(b"POST /e HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: " + value
                                 + b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n" + SMUGGLED)
    finally:
        server.server.stop()
    first, _, rest = answer.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 ")
    seen = json.loads(rest[:rest.index(b"}") + 1])
    assert (seen["body"], seen["HTTP_TRANSFER_ENCODING"]) == ("abc", "chunked")
    assert answer.count(b"HTTP/1.1 200 ") == 2 and b"/smuggled" in answer


def test_raw_uri_keeps_the_request_target(servers: tuple[Server, Server]) -> None:
    _, ours = servers
    answer = ours.exchange(b"GET /a%2Fb/%7E?x=%2F HTTP/1.1\r\nHost: a\r\n\r\n")
    got = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert got["RAW_URI"] == "/a%2Fb/%7E?x=%2F" and got["PATH_INFO"] == "/a/b/~"


def responses_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    path = environ["PATH_INFO"]
    if path == "/chunked":  # no length: pywsgi frames it chunked
        start_response("200 OK", [("Content-Type", "text/plain")])
        return iter([b"first", b"", b"x" * 70000, b"last"])
    if path in ("/204", "/304"):
        start_response(f"{path[1:]} X", [])
        return []
    if path == "/big":
        start_response("200 OK", [("Content-Length", "200000")])
        return [b"b" * 200000]
    if path == "/echo":
        body = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]
    body = b"" if environ["REQUEST_METHOD"] == "HEAD" else b"hello"
    start_response("200 OK", [("Content-Length", "5")])
    return [body]


def test_keep_alive_responses_of_every_shape() -> None:
    server = Server(responses_app)
    try:
        with gsocket.create_connection(("127.0.0.1", server.port)) as sock:
            buffered = bytearray()

            def ask(request: bytes) -> tuple[bytes, bytes]:
                sock.sendall(request)
                return read_response(sock, buffered, request.startswith(b"HEAD "))

            head, body = ask(b"GET /small HTTP/1.1\r\nHost: a\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ") and body == b"hello"
            head, body = ask(b"GET /chunked HTTP/1.1\r\nHost: a\r\n\r\n")
            assert b"Transfer-Encoding: chunked" in head
            assert body == b"first" + b"x" * 70000 + b"last"
            head, body = ask(b"HEAD /small HTTP/1.1\r\nHost: a\r\n\r\n")
            assert b"Content-Length: 5" in head and body == b""
            for code in (b"204", b"304"):
                head, body = ask(b"GET /" + code + b" HTTP/1.1\r\nHost: a\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 " + code) and body == b""
                assert b"Transfer-Encoding" not in head
            head, body = ask(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
            assert body == b"b" * 200000
            # Expect: 100-continue: the interim answer comes before the body is sent
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
                         b"Expect: 100-continue\r\n\r\n")
            head, _ = read_response(sock, buffered)
            assert head.startswith(b"HTTP/1.1 100 ")
            sock.sendall(b"ping")
            head, body = read_response(sock, buffered)
            assert head.startswith(b"HTTP/1.1 200 ") and body == b"ping"
            head, body = ask(b"GET /small HTTP/1.1\r\nHost: a\r\n\r\n")
            assert body == b"hello"  # the same connection, still in step
            assert buffered == b""
    finally:
        server.server.stop()


def test_a_streamed_body_to_an_http_1_0_keep_alive_client_ends_with_the_connection() -> None:
    """An HTTP/1.0 client gets no chunks, so a body without a length ends when the
    connection does. pywsgi (gevent 26.9) answers such a client that asked for
    keep-alive with "Connection: keep-alive" and leaves the connection open: the client
    waits for the end of the body forever. ClusterHandler says close, and closes."""
    server = Server(responses_app)
    try:
        with gsocket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"GET /chunked HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            data, closed = b"", False
            with gevent.Timeout(2, False):
                while chunk := sock.recv(65536):
                    data += chunk
                closed = True
        head, _, body = data.partition(b"\r\n\r\n")
        assert body == b"first" + b"x" * 70000 + b"last"
        assert b"Connection: close" in head and b"keep-alive" not in head and closed, head
    finally:
        server.server.stop()


def test_a_str_body_piece_gets_a_500_not_an_empty_200() -> None:
    """PEP 3333 bodies are bytes. Stock pywsgi sends the 200 head and then fails on the
    str (the client waits for 15 bytes that never come); ClusterHandler refuses the
    piece before the head goes out, so the app's error is a whole 500."""
    def app(environ: dict[str, Any], start_response: Any) -> list[str]:
        start_response("200 OK", [("Content-Length", "15")])
        return ["a str not bytes"]

    server = Server(app)
    try:
        answer = server.exchange(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    finally:
        server.server.stop()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500 ") and body == b"Internal Server Error", answer


def test_access_log_written_when_configured() -> None:
    log = Lines()
    server = Server(responses_app, log=log)
    try:
        server.exchange(b"GET /small?q=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        with gevent.Timeout(TIMEOUT):
            while not log.lines:
                gevent.sleep(0.01)
    finally:
        server.server.stop()
    assert len(log.lines) == 1 and '"GET /small?q=1 HTTP/1.1" 200' in log.lines[0]


def test_under_gunicorn_its_access_log_and_environ_still_apply() -> None:
    """cluster.gunicorn.Handler = (ClusterHandler, gunicorn's PyWSGIHandler): our
    log_request must hand over to gunicorn's, which reads the parsed headers."""
    from cluster.gunicorn import Handler

    calls: list[tuple[Any, ...]] = []

    class GunicornLog(Lines):
        def access(self, resp: Any, req_headers: Any, environ: Any, elapsed: Any) -> None:
            calls.append((resp.status, list(req_headers), environ["RAW_URI"],
                          environ["gunicorn.sock"] is environ["cluster.socket"]))

    server = Server(responses_app, Handler, log=GunicornLog())
    try:
        server.exchange(b"GET /a%2Fb HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nConnection: close\r\n\r\n")
        with gevent.Timeout(TIMEOUT):
            while not calls:
                gevent.sleep(0.01)
    finally:
        server.server.stop()
    assert calls == [("200 OK", [("Host", "h"), ("X-A", "1"), ("Connection", "close")],
                      "/a%2Fb", True)]
