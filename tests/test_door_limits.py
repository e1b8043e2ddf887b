"""The front door's bounds, against real `cluster serve` processes and raw sockets.

Each case sends exact bytes and checks what a client relies on: the status, and whether
the connection is closed afterwards (``recv`` returns ``b""``) where RFC 9112 says so, so
that nothing after a refused head is ever read as a second request.

Two doors get the same bytes: one serving the test backend itself (``local``) and a
balancer-only one relaying to a registered instance (``front``). The request corpora in
tests/request_corpus/ (shared with tests/test_http1.py) give the framing and syntax cases; the
limit cases are built here from the limits the servers are started with.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import resource
import selectors
import socket
import ssl
import time
from typing import Iterator
from urllib.parse import quote

import pytest

from helpers import (
    CorpusCase,
    Path,
    Proc,
    RawResponse,
    cluster_argv,
    exchange,
    load_corpus,
    needs_ipv6,
    parse_responses,
    python,
    read_port_file,
    read_response,
    read_until_close,
    request_bytes,
    start_instance,
    start_library_app,
    start_serve,
    wait_until,
)

REQUEST_LINE, HEADER_LINE, HEAD_SIZE, HEADER_COUNT = 1024, 512, 4096, 100
LIMITS = ("--max-request-line", str(REQUEST_LINE), "--max-header-line", str(HEADER_LINE),
          "--max-head-size", str(HEAD_SIZE), "--max-header-count", str(HEADER_COUNT))
#: long enough that a close seen by a test is the door's answer, not an idle timeout
PATIENT = ("--header-timeout", "10", "--keepalive-timeout", "30", "--write-timeout", "1",
           "--ping-interval", "1", "--expiry-grace", "1")
WRITE_TIMEOUT = 1.0
CLOSE_WAIT = 4.0  # seconds a test waits for a close the door owes at once
FOLLOW_UP = b"GET /whoami HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


class Door:
    """A running `cluster serve` and the name its backend answers /whoami with."""

    def __init__(self, proc: Proc, port: int, name: str) -> None:
        self.proc, self.port, self.name = proc, port, name

    def __repr__(self) -> str:
        return f"<Door {self.name} :{self.port}>"


def status_view(port: int) -> dict:
    """GET /_cluster/status on a connection of its own that is closed after."""
    responses, _ = exchange(port, request_bytes(target="/_cluster/status",
                                                headers=[("Connection", "close")]))
    assert responses and responses[0].status == 200, responses
    return json.loads(responses[0].body)


def errors_counted(port: int) -> int:
    """The errors the door at ``port`` has counted against the endpoints it relays to."""
    return sum(e["traffic"]["errors"] for e in status_view(port)["endpoints"])


def wait_front_sees(port: int, service: str) -> None:
    """Until the balancer on ``port`` has an endpoint of ``service`` in its table."""
    wait_until(lambda: any(e["service"] == service for e in status_view(port)["endpoints"]),
               timeout=15, what="the front sees the member")


def stop_clean(proc: Proc) -> str:
    """Stop by PID; the door must still be alive and must never have logged a traceback."""
    alive = proc.poll() is None
    proc.stop()
    output = proc.output()
    assert alive, f"{proc} died during the tests:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-5000:]
    return output


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite://{tmp_path_factory.mktemp('door') / 'discovery.sqlite3'}"


@pytest.fixture(scope="module")
def local(store: str) -> Iterator[Door]:
    proc, port = start_serve("--service", "doorlocal", "--app", "backend:app", *LIMITS,
                             *PATIENT, name="local",
                             env={"CLUSTER_DISCOVERY_URL": store, "BACKEND_NAME": "local"})
    try:
        yield Door(proc, port, "local")
    finally:
        stop_clean(proc)


@pytest.fixture(scope="module")
def front(store: str) -> Iterator[Door]:
    """A balancer-only door with the same limits, in front of one registered instance.

    The instance behind it accepts larger heads: the door adds forwarding headers, and
    these tests are about the front's own limits.
    """
    member, member_port = start_instance(store, "member", "--max-header-count", "200",
                                         "--max-head-size", "131072", service="doorproxied")
    proc = None
    try:
        proc, port = start_serve("--ui-service", "doorproxied", *LIMITS, *PATIENT,
                                 name="front", env={"CLUSTER_DISCOVERY_URL": store})
        wait_front_sees(port, "doorproxied")
        yield Door(proc, port, "member")
    finally:
        if proc is not None:
            stop_clean(proc)
        stop_clean(member)


@pytest.fixture(params=["local", "front"])
def door(request: pytest.FixtureRequest) -> Door:
    return request.getfixturevalue(request.param)


def only_response(responses: list[RawResponse], raw: bytes) -> RawResponse:
    assert len(responses) == 1, f"expected one response to {raw[:300]!r}, got {responses}"
    return responses[0]


def assert_refused(door: Door, raw: bytes, status: int) -> None:
    """``raw`` gets exactly one response, ``status``, and the connection is closed."""
    responses, closed = exchange(door.port, raw + FOLLOW_UP, timeout=CLOSE_WAIT)
    got = only_response(responses, raw)
    assert got.status == status, f"{raw[:300]!r}: expected {status}, got {got}"
    assert closed, f"{raw[:300]!r}: connection left open after {status}"


def assert_served(door: Door, raw: bytes) -> RawResponse:
    """``raw`` is answered 200 by the backend and the connection serves the next request."""
    responses, closed = exchange(door.port, raw + FOLLOW_UP, timeout=CLOSE_WAIT)
    assert len(responses) == 2, f"{raw[:300]!r}: expected two responses, got {responses}"
    assert responses[0].status == 200, f"{raw[:300]!r}: {responses[0]}"
    assert responses[1].status == 200 and responses[1].body == door.name.encode()
    assert closed
    return responses[0]


# --- the corpora --------------------------------------------------------------------


@pytest.mark.parametrize("case", load_corpus("invalid"), ids=lambda c: c.name)
def test_invalid_head_gets_its_status_and_nothing_after_it_is_read(door: Door,
                                                                   case: CorpusCase) -> None:
    """The bytes after a refused head (a GET /smuggled in most cases, then a GET /whoami)
    are never answered when the door must close."""
    statuses = case.expect["status"]
    statuses = statuses if isinstance(statuses, list) else [statuses]
    responses, closed = exchange(door.port, case.raw + FOLLOW_UP, timeout=CLOSE_WAIT)
    if not responses:
        assert None in statuses and closed, \
            f"{case.name}: no response to {case.raw!r} (expected {statuses})"
        return
    first = responses[0]
    assert first.status in statuses, f"{case.name}: {case.raw!r} -> {first}, expected {statuses}"
    if case.expect["close"]:
        assert len(responses) == 1, f"{case.name}: answered after {first.status}: {responses}"
        assert closed, f"{case.name}: connection left open after {first.status}"
    for later in responses[1:]:
        assert b"smuggled" not in later.body


@pytest.mark.parametrize("case", load_corpus("valid"), ids=lambda c: c.name)
def test_valid_head_is_served_and_the_connection_frames_the_next_one(door: Door,
                                                                     case: CorpusCase) -> None:
    keep_alive = case.expect["keep_alive"]
    data = case.raw + (FOLLOW_UP if keep_alive else b"")
    head = 1 if case.expect["method"] == "HEAD" else 0
    responses, closed = exchange(door.port, data, timeout=CLOSE_WAIT, head_requests=head)
    assert responses, f"{case.name}: no response to {case.raw!r}"
    first = responses[0]
    served = case.expect["served"]
    if served is not None:
        assert first.status == served, f"{case.name}: {case.raw!r} -> {first}"
    else:  # a valid request the app may not know: any answer but a server error
        assert first.status < 500 or first.status == 501, f"{case.name}: {first}"
    if "body" in case.expect:
        assert first.body == case.expect["body"].encode("latin-1"), f"{case.name}: {first}"
    if keep_alive:
        assert len(responses) == 2, f"{case.name}: expected 2 responses, got {responses}"
        assert (responses[1].status, responses[1].body) == (200, door.name.encode())
    else:
        assert len(responses) == 1, f"{case.name}: {responses}"
    assert closed, f"{case.name}: not closed after Connection: close"


# --- framing: the cases named in the issue, spelled out -------------------------------


def test_body_that_looks_like_a_request_is_not_a_second_request(door: Door) -> None:
    smuggled = b"GET /whoami HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    raw = (b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: gzip\r\n"
           b"Content-Length: %d\r\n\r\n" % len(smuggled)) + smuggled
    responses, closed = exchange(door.port, raw, timeout=CLOSE_WAIT)
    assert [r.status for r in responses] == [400], responses
    assert closed


def test_absolute_form_reaches_the_app_as_the_origin_form(door: Door) -> None:
    """RFC 9112 3.2.2: the path the app sees is /headers, and the host is the target's
    authority, not the Host field (a path starting with 'http:' was a 404)."""
    got = assert_served(door, b"GET http://127.0.0.1/headers?x=1 HTTP/1.1\r\n"
                              b"Host: other.example\r\n\r\n")
    seen = json.loads(got.body)
    assert (seen["path"], seen["query"], seen["headers"]["Host"]) == \
        ("/headers", "x=1", "127.0.0.1")


@pytest.mark.parametrize("raw", [b"GET /headers HTTP/1.0\r\n\r\n",
                                 b"GET /headers HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n"],
                         ids=["http10-no-host", "empty-host"])
def test_a_relayed_request_without_a_host_names_the_address_it_came_in_by(front: Door,
                                                                          raw: bytes) -> None:
    """RFC 9112 3.3: the authority is then the address the client connected to, as the
    local app's SERVER_NAME is; the endpoint saw its own address, and built its links
    (redirects, absolute URLs) past the balancer, to an address clients may not reach."""
    responses, _ = exchange(front.port, raw, timeout=CLOSE_WAIT)
    assert [r.status for r in responses] == [200], responses
    assert json.loads(responses[0].body)["headers"]["Host"] == f"127.0.0.1:{front.port}"


def test_a_request_without_a_host_relayed_by_cluster_wrap_names_its_server(
        front: Door, store: str) -> None:
    """The same through a cluster.wrap() balancer (pywsgi's SERVER_NAME and its port)."""
    proc, port = start_library_app({"CLUSTER_DISCOVERY_URL": store, "CLUSTER_SERVICE": "doorwrap",
                                    "CLUSTER_UI_SERVICE": "doorproxied",
                                    "CLUSTER_SELF_WEIGHT": "0"})
    try:
        wait_until(lambda: exchange(port, FOLLOW_UP)[0][0].body == b"member", timeout=15,
                   what="the wrap() balancer relays to the member")
        responses, _ = exchange(port, b"GET /headers HTTP/1.0\r\n\r\n", timeout=CLOSE_WAIT)
        host = json.loads(responses[0].body)["headers"]["Host"]
        assert host.endswith(f":{port}"), host
    finally:
        stop_clean(proc)


def test_content_length_with_chunked_is_refused_and_closed(door: Door) -> None:
    assert_refused(door, b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400)


@pytest.mark.parametrize("value", ["+5", "0_5", "-1", "1 0", "5, 6"])
def test_content_length_that_is_not_plain_digits_is_refused(door: Door, value: str) -> None:
    assert_refused(door, b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: "
                         + value.encode() + b"\r\n\r\nhelloworld", 400)


def test_content_length_surrounded_by_whitespace_is_that_length(door: Door) -> None:
    got = assert_served(door, b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                              b"Content-Length:  5 \r\n\r\nhello")
    assert got.body == b"hello"


def chunked(body: bytes, sizes: list[int]) -> bytes:
    """``body`` in chunks of the given sizes (cycled), with an extension now and then."""
    out, pos, i = [], 0, 0
    while pos < len(body):
        piece = body[pos:pos + sizes[i % len(sizes)]]
        ext = b";n=%d" % i if i % 3 == 0 else b""
        out.append(b"%x%s\r\n%s\r\n" % (len(piece), ext, piece))
        pos, i = pos + len(piece), i + 1
    return b"".join(out) + b"0\r\n\r\n"


def test_chunked_upload_arrives_whole_and_the_next_request_is_served(door: Door) -> None:
    body = os.urandom(300_000)
    raw = (b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
           + chunked(body, [1, 4096, 65536, 17, 100_000]))
    got = assert_served(door, raw)
    assert json.loads(got.body) == {"sha256": hashlib.sha256(body).hexdigest(),
                                    "bytes": len(body)}
    echo = assert_served(door, b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               b"Transfer-Encoding: chunked\r\n\r\n" + chunked(b"x" * 999, [7]))
    assert echo.body == b"x" * 999


def test_a_clients_broken_body_is_not_held_against_the_endpoint(front: Door) -> None:
    """A bad chunked body, or a client that vanishes mid-body, is the client's fault: the
    endpoint behind the front stays in its picks, with no error counted against it."""
    errors_before = errors_counted(front.port)
    bad = (b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\nzz\r\n")
    _responses, closed = exchange(front.port, bad, timeout=CLOSE_WAIT)
    assert closed  # its status is the corpus' business (invalid/chunk_size_invalid)
    with socket.create_connection(("127.0.0.1", front.port)) as sock:
        sock.sendall(b"POST /whoami HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000"
                     b"\r\n\r\n" + b"x" * 1000)
        time.sleep(0.2)
    time.sleep(0.3)
    assert status_view(front.port)["ejected"] == []
    # the bad body counts as the 400 the client got, the one that left as a 499 (as
    # nginx logs them): each was a status 0, an error of the endpoint's
    assert errors_counted(front.port) == errors_before
    responses, _ = exchange(front.port, FOLLOW_UP)
    assert [(r.status, r.body) for r in responses] == [(200, b"member")]


#: chunk data that is a request of its own, behind a chunk-size line pywsgi refuses
SMUGGLED = b"GET /headers?smuggled=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.fixture(scope="module")
def library(store: str) -> Iterator[Door]:
    """cluster.wrap() serving the test backend under a plain pywsgi server."""
    proc, port = start_library_app({"CLUSTER_DISCOVERY_URL": store, "BACKEND_NAME": "library",
                                    "CLUSTER_SERVICE": "doorlibrary"}, "backend:app")
    try:
        yield Door(proc, port, "library")
    finally:
        stop_clean(proc)


@pytest.mark.parametrize("size", [b"%x \r\n" % len(SMUGGLED), b"%017x" % len(SMUGGLED)],
                         ids=["space-after-size", "17-digits"])
@pytest.mark.parametrize("where", ["local", "front", "library"])
def test_chunk_data_behind_a_size_line_pywsgi_refused_is_never_served_as_a_request(
        request: pytest.FixtureRequest, where: str, size: bytes) -> None:
    """pywsgi refuses the size line while the app reads the body; an app that catches
    the error and answers (as frameworks do) left pywsgi reading the next request from
    the middle of the body, which it does not skip: the chunk data was served as a
    request of its own, and through a balancer its answer was the next client's."""
    door = request.getfixturevalue(where)
    raw = (b"POST /read-or-400 HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
           b"\r\n" + size + SMUGGLED + b"\r\n0\r\n\r\n")
    responses, closed = exchange(door.port, raw + FOLLOW_UP, timeout=CLOSE_WAIT)
    assert responses and closed, responses
    assert responses[0].status == 400, responses
    assert not any(b"smuggled" in r.body for r in responses), responses
    # a connection that says nothing of its end must not end: the answer said it would
    assert responses[0].header("connection") == "close" or len(responses) == 2, responses


@pytest.mark.parametrize("size_line", [b"\r\n", b";ext\r\n"], ids=["empty", "extension-only"])
@pytest.mark.parametrize("where", ["local", "front", "library"])
def test_a_chunk_size_line_without_digits_is_a_prompt_400_and_the_end(
        request: pytest.FixtureRequest, where: str, size_line: bytes) -> None:
    """h11, llhttp, nginx and the door refuse a size line with no digits. Under
    cluster.wrap() pywsgi raised a ValueError into the app (a traceback), then skipped
    the body by reading its data ("abc") as the next size: no answer at all until the
    client gave up."""
    door = request.getfixturevalue(where)
    raw = (b"POST /read-or-400 HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked"
           b"\r\n\r\n" + size_line + b"abc\r\n0\r\n\r\n")
    responses, closed = exchange(door.port, raw + FOLLOW_UP, timeout=CLOSE_WAIT)
    assert closed and [r.status for r in responses] == [400], (responses, closed)


@pytest.mark.parametrize("where", ["local", "front", "library"])
def test_a_chunk_size_past_2_63_is_a_prompt_400_and_a_large_one_is_read_as_it_comes(
        request: pytest.FixtureRequest, where: str) -> None:
    """Under cluster.wrap() pywsgi read a chunk's data with one read of its whole size:
    a one-line request with a size of ``ffffffffff`` was a MemoryError in the app (a
    traceback and a 500), one past ``sys.maxsize`` an OverflowError. The door refused
    sizes past 2**63 - 1 (400) and read the rest as the bytes came; so does the
    library now: a client that sends 3 bytes of a 1 TB chunk and leaves gets no 500."""
    door = request.getfixturevalue(where)
    start = b"POST /read-or-400 HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    responses, closed = exchange(door.port, start + b"ffffffffffffffff\r\nabc\r\n0\r\n\r\n"
                                 + FOLLOW_UP, timeout=CLOSE_WAIT)
    assert closed and [r.status for r in responses] == [400], (responses, closed)
    with socket.create_connection(("127.0.0.1", door.port), timeout=CLOSE_WAIT) as sock:
        sock.sendall(start + b"ffffffffff\r\nabc")
        sock.shutdown(socket.SHUT_WR)  # and leaves
        data, closed = read_until_close(sock, CLOSE_WAIT)
    assert closed and not data.startswith(b"HTTP/1.1 500"), data[:300]
    responses, _ = exchange(door.port, FOLLOW_UP)
    assert [r.status for r in responses] == [200], responses


def test_an_answer_to_a_body_the_doors_scanner_refused_says_the_connection_ends(
        local: Door) -> None:
    """A control byte in a chunk extension: pywsgi skips extensions unread, the door's
    scanner refuses the line, the app's read raises and it answers 400 anyway. The
    connection then ends (RFC 9112 9.6: and the answer says so)."""
    raw = (b"POST /read-or-400 HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
           b"\r\n%x;a\x01\r\n" % len(SMUGGLED) + SMUGGLED + b"\r\n0\r\n\r\n")
    responses, closed = exchange(local.port, raw + FOLLOW_UP, timeout=CLOSE_WAIT)
    assert [r.status for r in responses] == [400] and closed, responses
    assert responses[0].header("connection") == "close", responses[0].headers


def test_under_cluster_wrap_a_body_framed_two_ways_is_refused_and_closed(library: Door) -> None:
    """pywsgi (cluster.wrap()'s server) dropped the Content-Length, read the chunks, and
    served the request behind them: with a proxy in front that goes by the length, the
    classic CL.TE smuggle. The door's answer: 400, and the connection ends."""
    raw = (b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" % (5 + len(SMUGGLED))) + SMUGGLED
    responses, closed = exchange(library.port, raw + FOLLOW_UP, timeout=CLOSE_WAIT)
    assert [r.status for r in responses] == [400] and closed, responses


@pytest.mark.parametrize("start", [
    b"Content-Length: 100000\r\n\r\n" + b"x" * 1000,
    b"Transfer-Encoding: chunked\r\n\r\n100\r\nabc",
], ids=["content-length", "chunked"])
@pytest.mark.parametrize("how", ["leaves", "goes-silent"])
def test_an_upload_cut_short_is_no_server_error(local: Door, start: bytes, how: str) -> None:
    """A client that leaves in the middle of its body, or stops sending it for the write
    timeout, makes the local app's read raise: one log line, no traceback, no 500 sent
    into a connection nobody reads, and the door serves on."""
    before = local.proc.output()
    with socket.create_connection(("127.0.0.1", local.port)) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\n" + start)
        if how == "goes-silent":
            data, closed = read_until_close(sock, WRITE_TIMEOUT + CLOSE_WAIT)
            assert closed and b"500" not in data, data
        else:
            time.sleep(0.2)
    wait_until(lambda: "in the middle of its request body" in local.proc.output()[len(before):],
               timeout=CLOSE_WAIT, what="the log line")
    assert "Traceback" not in local.proc.output()[len(before):]
    responses, _ = exchange(local.port, FOLLOW_UP)
    assert [(r.status, r.body) for r in responses] == [(200, b"local")]


@pytest.mark.parametrize("start", [
    b"Content-Length: 100000\r\n\r\n" + b"x" * 1000,
    b"Transfer-Encoding: chunked\r\n\r\n100\r\nabc",
    b"Content-Length: 999999999999\r\n\r\n" + b"x" * 1000,
], ids=["content-length", "chunked", "huge-length"])
def test_an_upload_cut_short_under_cluster_wrap_is_no_traceback(library: Door,
                                                                start: bytes) -> None:
    """As at the door: the app's read raises, and pywsgi logged a traceback for it (any
    client could write one per request). A length of a terabyte was a MemoryError at
    once: pywsgi allocated the whole body before reading it."""
    before = len(library.proc.output())
    with socket.create_connection(("127.0.0.1", library.port)) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n" + start)
        time.sleep(0.2)
    time.sleep(0.5)  # the read fails at the client's FIN; pywsgi wrote its traceback then
    assert "Traceback" not in library.proc.output()[before:]  # (its log is at warning)
    responses, _ = exchange(library.port, FOLLOW_UP)
    assert [(r.status, r.body) for r in responses] == [(200, b"library")]


@pytest.mark.parametrize("said, sent", [(2, 7), (10, 5)], ids=["more", "fewer"])
@pytest.mark.parametrize("where", ["local", "front", "library"])
def test_an_app_that_breaks_its_own_content_length_does_not_desync_the_connection(
        request: pytest.FixtureRequest, where: str, said: int, sent: int) -> None:
    """PEP 3333: never more bytes than the app's Content-Length. Bytes past it would be
    read as the next response (they are dropped, and the next request is answered); a
    body short of it would swallow the next response (the connection is closed).
    Under cluster.wrap() too (ClusterHandler): stock pywsgi sends what the app gives and
    keeps the connection, as gunicorn does."""
    door = request.getfixturevalue(where)
    raw = request_bytes(target=f"/wrong-length?said={said}&sent={sent}") + FOLLOW_UP
    with socket.create_connection(("127.0.0.1", door.port)) as sock:
        sock.sendall(raw)
        data, closed = read_until_close(sock, CLOSE_WAIT)
    assert closed, data
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"\r\nContent-Length: %d\r\n" % said in head
    if sent > said:
        assert rest[:said] == b"x" * said
        after = rest[said:]  # the answer to the next request
        assert after.startswith(b"HTTP/1.1 200 ") and \
            after.endswith(b"\r\n\r\n" + door.name.encode()), data
    else:
        assert rest == b"x" * sent, data  # cut, and closed: the client knows


@pytest.mark.parametrize("where", ["local", "front", "library"])
def test_an_app_that_frames_its_body_itself_never_sends_a_length_too(
        request: pytest.FixtureRequest, where: str) -> None:
    """RFC 9112 6.1: Content-Length never beside Transfer-Encoding (pywsgi added one to the
    app's own 'Transfer-Encoding: chunked'); the app's framing goes out, then a close."""
    door = request.getfixturevalue(where)
    with socket.create_connection(("127.0.0.1", door.port)) as sock:
        sock.sendall(request_bytes(target="/self-chunked"))
        data, _closed = read_until_close(sock, CLOSE_WAIT)
    responses, rest = parse_responses(data)
    assert [(r.status, r.body) for r in responses] == [(200, b"hello")] and rest == b"", data
    assert responses[0].header("content-length") is None, data


@pytest.mark.parametrize("where", ["local", "front", "library"])
def test_an_app_content_length_given_twice_alike_goes_out_once(
        request: pytest.FixtureRequest, where: str) -> None:
    """The same length twice is one length (RFC 9110 8.6), passed on once: Node's
    llhttp refuses a head with two ("Duplicate Content-Length")."""
    door = request.getfixturevalue(where)
    with socket.create_connection(("127.0.0.1", door.port)) as sock:
        sock.sendall(request_bytes(target="/lengths?values=2|2") + FOLLOW_UP)
        data, _closed = read_until_close(sock, CLOSE_WAIT)
    responses, rest = parse_responses(data)
    assert [(r.status, r.body) for r in responses] == [(200, b"ok"), (200, door.name.encode())]
    assert data.lower().count(b"\r\ncontent-length:") == 2, data[:500]


@pytest.mark.parametrize("raw", [
    b"GET /says-keep-alive HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"GET /says-keep-alive HTTP/1.0\r\n\r\n"], ids=["close", "http-1.0"])
@pytest.mark.parametrize("where", ["local", "front", "library"])
def test_a_connection_that_ends_says_so_whatever_the_app_said(
        request: pytest.FixtureRequest, where: str, raw: bytes) -> None:
    """RFC 9112 9.6: the answer on a connection that ends says ``Connection: close``.
    An app's own ``Connection: keep-alive`` (hop-by-hop: PEP 3333 leaves it to the
    server, gunicorn drops it) went out as it was, to a client that asked for close or
    an HTTP/1.0 one, and the connection was closed: the client took it for reusable."""
    door = request.getfixturevalue(where)
    responses, closed = exchange(door.port, raw, timeout=CLOSE_WAIT)
    assert [r.status for r in responses] == [200] and closed, responses
    said = [value.lower() for name, value in responses[0].headers if name == "connection"]
    assert said == ["close"], responses[0].headers
    assert responses[0].header("keep-alive") is None, responses[0].headers


def test_pipelined_requests_are_answered_in_order(door: Door) -> None:
    raw = b"".join(b"GET /echo-%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % i for i in range(20))
    raw += b"".join(b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n\r\n%03d"
                    % i for i in range(20))
    responses, closed = exchange(door.port, raw + FOLLOW_UP, timeout=10)
    assert [r.status for r in responses] == [404] * 20 + [200] * 21, responses
    assert [r.body for r in responses[20:40]] == [b"%03d" % i for i in range(20)]
    assert closed


@pytest.mark.parametrize("where", ["local", "front", "library"])
@pytest.mark.parametrize("value", [b"100-continue", b"100-Continue"])
def test_expect_100_continue_is_answered_before_the_body_is_sent(
        request: pytest.FixtureRequest, where: str, value: bytes) -> None:
    """Its value is case-insensitive (RFC 9110 10.1.1): pywsgi under cluster.wrap()
    answered only '100-continue', and the client waited for nothing."""
    door = request.getfixturevalue(where)
    with socket.create_connection(("127.0.0.1", door.port), timeout=5) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: " + value + b"\r\n"
                     b"Content-Length: 5\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
        assert data.startswith(b"HTTP/1.1 100 Continue\r\n"), data
        sock.sendall(b"hello")
        rest = data[data.index(b"\r\n\r\n") + 4:]
        while not parse_responses(rest)[0]:
            chunk = sock.recv(4096)
            assert chunk, rest
            rest += chunk
        got = parse_responses(rest)[0][0]
    assert (got.status, got.body) == (200, b"hello")


@pytest.mark.parametrize("where", ["local", "library"])
@pytest.mark.parametrize("framing", [b"Content-Length: 2000", b"Transfer-Encoding: chunked"])
def test_an_answer_before_the_100_continue_ends_the_connection(
        request: pytest.FixtureRequest, where: str, framing: bytes) -> None:
    """An app that answers an upload (a 404, a 401) without reading it, while the client
    still waits for its 100 (Continue): the client may never send the body (RFC 9110
    10.1.1), and curl does not; it reuses the connection. pywsgi then read curl's next
    request as the body it waited for, and the next request hung. The answer says
    ``Connection: close`` and the connection ends (as Go's net/http server does). (A
    relaying door sends its 100 at once, as gunicorn does: the body then comes.)"""
    door = request.getfixturevalue(where)
    with socket.create_connection(("127.0.0.1", door.port), timeout=5) as sock:
        sock.sendall(b"POST /status/404 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Expect: 100-continue\r\n" + framing + b"\r\n\r\n")
        data, closed = read_until_close(sock, CLOSE_WAIT)
    responses, rest = parse_responses(data)
    assert [r.status for r in responses] == [404] and rest == b"", data
    assert responses[0].header("connection") == "close", data
    assert closed, data


@pytest.mark.parametrize("where", ["local", "library"])
def test_a_body_sent_after_an_answer_without_100_continue_meets_no_reset(
        request: pytest.FixtureRequest, where: str) -> None:
    """The same answer, to a client that sends its body anyway once its wait for the 100
    is over (curl after a second): the connection ends lingering, its body read and
    dropped, so that no reset overtakes the answer (under cluster.wrap() a plain close
    left 4 MB unread: the client's send failed with a broken pipe, the answer lost)."""
    door = request.getfixturevalue(where)
    size = 4 << 20
    with socket.create_connection(("127.0.0.1", door.port), timeout=5) as sock:
        sock.sendall(b"POST /status/404 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % size)
        first = sock.recv(65536)  # the answer, before any byte of the body
        sock.sendall(b"z" * size)
        data, closed = read_until_close(sock, CLOSE_WAIT)
    responses, rest = parse_responses(first + data)
    assert [r.status for r in responses] == [404] and rest == b"", first + data
    assert responses[0].header("connection") == "close" and closed, first + data


@pytest.mark.parametrize("where", ["local", "front", "library"])
def test_an_http_1_0_client_gets_no_100_continue(request: pytest.FixtureRequest,
                                                 where: str) -> None:
    """RFC 9110 10.1.1: a 100-continue expectation in an HTTP/1.0 request is ignored
    (15.2: no 1xx to a 1.0 client). The client takes the first status line it reads
    for its answer: a 100 was a bodiless answer, and the real one garbage after it."""
    door = request.getfixturevalue(where)
    with socket.create_connection(("127.0.0.1", door.port), timeout=5) as sock:
        sock.sendall(b"POST /echo HTTP/1.0\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 5\r\n\r\n")
        # a 100 comes at once; well within --write-timeout (1 s), the door's wait for
        # the body (a wait of exactly 1 s raced it: the door closed first, in CI)
        sock.settimeout(WRITE_TIMEOUT / 2)
        with pytest.raises(socket.timeout):
            early = sock.recv(4096)
            pytest.fail(f"sent before the body: {early!r}")
        sock.sendall(b"hello")
        data, closed = read_until_close(sock, CLOSE_WAIT)
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"\r\n\r\nhello"), data
    assert closed


@pytest.mark.parametrize("target", ["/whoami", "/chunked?n=2&delay=0", "/download?size=100000",
                                    "/status/404"])
@pytest.mark.parametrize("where", ["local", "front", "library"])
def test_head_gets_the_head_of_a_get_and_no_content(request: pytest.FixtureRequest,
                                                    where: str, target: str) -> None:
    """RFC 9110 9.3.2; a body after it would be read as the start of the next response
    (pywsgi under cluster.wrap() sent it)."""
    door = request.getfixturevalue(where)
    raw = request_bytes("HEAD", target) + FOLLOW_UP
    with socket.create_connection(("127.0.0.1", door.port)) as sock:
        sock.sendall(raw)
        data, closed = read_until_close(sock, CLOSE_WAIT)
    responses, rest = parse_responses(data, head_requests=1)
    assert rest == b"" and closed, data
    assert [(r.status, r.body) for r in responses][1:] == [(200, door.name.encode())], data
    assert responses[0].status == (404 if target.startswith("/status") else 200)
    assert responses[0].body == b""


@pytest.mark.parametrize("raw", [
    b"GET /whoami HTTP/1.1\nHost: 127.0.0.1\n\n",
    b"GET /whoami HTTP/1.1\r\nHost: 127.0.0.1\nX-Mixed: 1\r\n\r\n",
], ids=["bare-lf", "mixed"])
def test_bare_lf_line_endings_are_refused(door: Door, raw: bytes) -> None:
    """RFC 9112 2.2 lets a recipient accept a bare LF as a line end; this door does not
    (cluster/http1.py: a bare-LF head is a 400, not guessed at) and closes, so nothing
    after it is read as a second request."""
    assert_refused(door, raw, 400)


# --- limits --------------------------------------------------------------------------


def request_line_of(length: int) -> bytes:
    """A GET /whoami request whose request line (without CRLF) is ``length`` bytes."""
    fixed = len("GET /whoami?pad= HTTP/1.1")
    return request_bytes(target="/whoami?pad=" + "a" * (length - fixed))


def header_line_of(length: int) -> bytes:
    """A request with one field line (without CRLF) of ``length`` bytes."""
    return request_bytes(headers=[("X-Long", "b" * (length - len("X-Long: ")))])


def head_of(size: int, width: int = 80) -> bytes:
    """A request head of exactly ``size`` bytes (terminator included), in field lines of
    about ``width`` bytes: each line and the field count stay within their limits."""
    base = request_bytes()
    fields: list[tuple[str, str]] = []
    left = size - len(base)
    while left > 0:
        line = min(left, width)
        if line < len("X-F999: ") + 2 + 1:  # too short for a field: widen the previous one
            name, value = fields.pop()
            left += len(name) + 2 + len(value) + 2
            line = left
        name = f"X-F{len(fields)}"
        fields.append((name, "c" * (line - len(name) - 4)))
        left -= line
    raw = request_bytes(headers=fields)
    assert len(raw) == size and len(fields) + 1 < HEADER_COUNT
    assert all(len(f"{k}: {v}") <= HEADER_LINE for k, v in fields)
    return raw


def test_request_line_limit(door: Door) -> None:
    assert_served(door, request_line_of(REQUEST_LINE - 2))
    assert_refused(door, request_line_of(REQUEST_LINE + 1), 414)
    assert_refused(door, request_line_of(REQUEST_LINE * 8), 414)


def test_a_request_line_at_the_limit_is_served_however_its_bytes_arrive(door: Door) -> None:
    """A request line of exactly --max-request-line bytes whose CR came in one segment
    and its LF in the next was a 414: the door took the line's own CR for a byte past
    the limit. A line that is past the limit still gets its 414 as soon as it is."""
    raw = request_line_of(REQUEST_LINE) + FOLLOW_UP
    for cut in (REQUEST_LINE + 1, REQUEST_LINE, REQUEST_LINE + 2):  # after CR, before, after LF
        with socket.create_connection(("127.0.0.1", door.port), timeout=CLOSE_WAIT) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(raw[:cut])
            time.sleep(0.2)  # the door reads the first part alone
            sock.sendall(raw[cut:])
            data, closed = read_until_close(sock, CLOSE_WAIT)
        responses, _ = parse_responses(data)
        assert [r.status for r in responses] == [200, 200], (cut, data[:300])
        assert closed
    too_long = request_line_of(REQUEST_LINE + 1)
    with socket.create_connection(("127.0.0.1", door.port), timeout=CLOSE_WAIT) as sock:
        sock.sendall(too_long[:REQUEST_LINE + 1])  # the line alone, no CRLF yet
        data, closed = read_until_close(sock, CLOSE_WAIT)
    assert data.startswith(b"HTTP/1.1 414 ") and closed, data[:300]


def test_empty_lines_before_a_request_do_not_count_its_body_in_its_head(door: Door) -> None:
    """RFC 9112 2.2: old clients send an extra CRLF after a POST body, so it comes before
    their next request. When that request and its body arrived with the CRLF, the door
    counted the body in the head's size: a 431 for a body longer than --max-head-size,
    on a new connection and behind a request on a kept one alike."""
    body = bytes(range(256)) * (HEAD_SIZE * 2 // 256)
    post = request_bytes("POST", "/echo", headers=[("Content-Length", str(len(body)))], body=body)
    first = request_bytes("POST", "/echo", headers=[("Content-Length", "2")], body=b"ab")
    for raw, bodies in ((b"\r\n" + post, [body]), (first + b"\r\n" + post, [b"ab", body])):
        responses, closed = exchange(door.port, raw + FOLLOW_UP, timeout=CLOSE_WAIT)
        assert [r.status for r in responses] == [200] * (len(bodies) + 1), responses
        assert [r.body for r in responses[:-1]] == bodies
        assert closed


def test_header_line_limit(door: Door) -> None:
    assert_served(door, header_line_of(HEADER_LINE - 2))
    assert_refused(door, header_line_of(HEADER_LINE + 1), 431)
    assert_refused(door, header_line_of(HEADER_LINE * 64), 431)


def test_head_size_limit(door: Door) -> None:
    assert_served(door, head_of(HEAD_SIZE - 4))
    assert_refused(door, head_of(HEAD_SIZE + 5), 431)
    assert_refused(door, head_of(HEAD_SIZE * 4, width=400), 431)


def test_many_cookie_lines_are_bounded_by_the_head_size(door: Door) -> None:
    """99 Cookie lines of 100 bytes each: every line and the count are within limits,
    the head is not."""
    cookies = [("Cookie", f"c{i:02d}=" + "v" * 88) for i in range(99)]
    assert all(len(f"{k}: {v}") <= HEADER_LINE for k, v in cookies)
    assert_refused(door, request_bytes(headers=cookies), 431)


def test_header_count_limit(door: Door) -> None:
    fields = [(f"X-N{i}", "1") for i in range(HEADER_COUNT - 1)]  # plus Host
    assert_served(door, request_bytes(headers=fields))
    assert_refused(door, request_bytes(headers=[*fields, ("X-One-More", "1")]), 431)


def test_a_client_that_stops_reading_is_dropped_after_the_write_timeout(door: Door) -> None:
    """A 50 MB download the client never reads: the door gives up after the write
    timeout instead of holding the connection (and the app's greenlet) forever."""
    size = 50_000_000
    with socket.create_connection(("127.0.0.1", door.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(request_bytes(target=f"/download?size={size}"))
        time.sleep(WRITE_TIMEOUT + 1.5)
        data, closed = read_until_close(sock, 3)
    assert closed and len(data) < size // 2, (len(data), closed)
    responses, _ = exchange(door.port, FOLLOW_UP)  # and the door carries on
    assert [(r.status, r.body) for r in responses] == [(200, door.name.encode())]


# --- timeouts: slowloris, idle keep-alive ----------------------------------------------

HEADER_TIMEOUT, KEEPALIVE_TIMEOUT = 2.0, 1.0


@pytest.fixture(scope="module")
def impatient(store: str) -> Iterator[Door]:
    proc, port = start_serve("--service", "doortimeouts", "--app", "backend:app",
                             "--header-timeout", str(HEADER_TIMEOUT),
                             "--keepalive-timeout", str(KEEPALIVE_TIMEOUT),
                             name="impatient",
                             env={"CLUSTER_DISCOVERY_URL": store, "BACKEND_NAME": "impatient"})
    try:
        yield Door(proc, port, "impatient")
    finally:
        stop_clean(proc)


def test_slowloris_connections_are_closed_after_the_header_timeout(impatient: Door) -> None:
    head = request_bytes(headers=[("X-Slow", "s" * 200)])
    count = 50
    socks = [socket.create_connection(("127.0.0.1", impatient.port)) for _ in range(count)]
    opened = time.monotonic()
    sel = selectors.DefaultSelector()
    for i, sock in enumerate(socks):
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, i)
    received: dict[int, bytes] = {i: b"" for i in range(count)}
    closed_at: dict[int, float] = {}
    normal_took = None
    try:
        offset = 0
        next_tick = opened
        while len(closed_at) < count and time.monotonic() - opened < HEADER_TIMEOUT + 4:
            now = time.monotonic()
            if now >= next_tick:  # one more byte on every open connection
                for i, sock in enumerate(socks):
                    if i not in closed_at:
                        try:
                            sock.send(head[offset:offset + 1])
                        except OSError:
                            pass  # the door closed it; the read side records when
                offset, next_tick = offset + 1, next_tick + 1.0
            if normal_took is None and now - opened > 1.2:  # a normal client, mid-attack
                started = time.monotonic()
                responses, _ = exchange(impatient.port, FOLLOW_UP, timeout=5)
                normal_took = time.monotonic() - started
                assert [(r.status, r.body) for r in responses] == [(200, b"impatient")]
            for key, _ in sel.select(timeout=max(0.0, min(0.05, next_tick - now))):
                i = key.data
                try:
                    chunk = socks[i].recv(4096)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    received[i] += chunk
                else:
                    closed_at[i] = time.monotonic() - opened
                    sel.unregister(socks[i])
    finally:
        sel.close()
        for sock in socks:
            sock.close()
    assert len(closed_at) == count, f"{count - len(closed_at)} slow connections still open"
    assert max(closed_at.values()) <= HEADER_TIMEOUT + 1.5, sorted(closed_at.values())
    assert min(closed_at.values()) >= HEADER_TIMEOUT - 0.5, sorted(closed_at.values())
    answers = {data[:12] for data in received.values()}
    assert answers <= {b"", b"HTTP/1.1 408"}, answers
    assert b"HTTP/1.1 408" in answers, "a partial head gets 408 before the close"
    assert normal_took is not None and normal_took < 1.0, normal_took


def test_partial_head_gets_408_and_a_silent_connection_is_closed(impatient: Door) -> None:
    partial = socket.create_connection(("127.0.0.1", impatient.port))
    silent = socket.create_connection(("127.0.0.1", impatient.port))
    started = time.monotonic()
    with partial, silent:
        partial.sendall(b"GET /whoami HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        data, closed = read_until_close(partial, HEADER_TIMEOUT + 3)
        assert closed and data.startswith(b"HTTP/1.1 408"), data
        assert time.monotonic() - started <= HEADER_TIMEOUT + 1.5
        data, closed = read_until_close(silent, HEADER_TIMEOUT + 3)
        assert closed and data == b"", data
        assert time.monotonic() - started <= HEADER_TIMEOUT + 1.5


def test_idle_keep_alive_connection_is_closed_after_the_idle_timeout(impatient: Door) -> None:
    with socket.create_connection(("127.0.0.1", impatient.port)) as sock:
        sock.sendall(request_bytes())
        assert read_response(sock).body == b"impatient"
        idle_from = time.monotonic()
        data, closed = read_until_close(sock, KEEPALIVE_TIMEOUT + 3)
        idle = time.monotonic() - idle_from
    assert closed and data == b"", data
    assert KEEPALIVE_TIMEOUT - 0.3 <= idle <= KEEPALIVE_TIMEOUT + 0.8, idle


def test_a_request_waiting_unread_at_the_keep_alive_timeout_is_served(
        impatient: Door) -> None:
    """The next request arrives as the idle timeout runs out, in a process too busy to
    have read it yet (another request's app holds the CPU until the timeout has passed).
    It is answered, as nginx reads what arrived before it acts on its timers; the sweep
    used to close the connection over it, and its unread bytes made that a reset: a
    lost request for Node's http.Agent and fetch, which do not resend."""
    address = ("127.0.0.1", impatient.port)
    with socket.create_connection(address) as sock, \
            socket.create_connection(address) as busy:
        sock.sendall(request_bytes())
        assert read_response(sock).body == b"impatient"
        busy.sendall(request_bytes(target=f"/busy?seconds={KEEPALIVE_TIMEOUT + 1}"))
        time.sleep(KEEPALIVE_TIMEOUT + 0.5)  # past the deadline, the door still busy
        sock.sendall(request_bytes())
        assert read_response(busy).body == b"busy impatient"
        got = read_response(sock)
    assert (got.status, got.body) == (200, b"impatient")


def test_empty_lines_after_a_body_leave_the_connection_idle_not_in_a_head(
        store: str) -> None:
    """An old client's CRLF after its POST body (RFC 9112 2.2: ignored) made the door
    time the kept connection as a head being read: closed after --header-timeout, not
    --keepalive-timeout, under a client that reused it in between (a POST it cannot
    resend). The CRLF alike with the body and after it, on connections of their own."""
    proc, port = start_serve("--service", "doorstray", "--app", "backend:app",
                             "--header-timeout", "0.5", "--keepalive-timeout", "10",
                             name="stray", env={"CLUSTER_DISCOVERY_URL": store,
                                                "BACKEND_NAME": "stray"})
    post = request_bytes("POST", "/echo", headers=[("Content-Length", "3")], body=b"abc")
    try:
        socks = [socket.create_connection(("127.0.0.1", port), timeout=CLOSE_WAIT)
                 for _ in range(3)]
        socks[0].sendall(post + b"\r\n")
        socks[1].sendall(post)
        socks[2].sendall(post + b"\r\n\r\n")
        for sock in socks:
            assert read_response(sock).body == b"abc"
        socks[1].sendall(b"\r\n")
        time.sleep(1.5)  # three header timeouts, well within the keep-alive one
        for sock in socks:
            sock.sendall(FOLLOW_UP)
        for sock in socks:
            data, closed = read_until_close(sock, CLOSE_WAIT)
            assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"stray"), data[:300]
            sock.close()
    finally:
        stop_clean(proc)


def test_active_keep_alive_connection_stays_open(impatient: Door) -> None:
    """Requests every 0.3 s for longer than both timeouts: each head is timed on its own."""
    with socket.create_connection(("127.0.0.1", impatient.port)) as sock:
        started = time.monotonic()
        served = 0
        while time.monotonic() - started < HEADER_TIMEOUT + KEEPALIVE_TIMEOUT:
            sock.sendall(request_bytes())
            got = read_response(sock)
            assert (got.status, got.body) == (200, b"impatient")
            served += 1
            time.sleep(0.3)
    assert served >= 8


# --- the connection cap -----------------------------------------------------------------


def start_capped(store: str, name: str, cap: int) -> tuple[Proc, int]:
    """A door serving backend:app itself (answering /whoami with ``name``) that holds at
    most ``cap`` connections."""
    return start_serve("--service", f"door{name}", "--app", "backend:app",
                       "--max-connections", str(cap), "--header-timeout", "8", name=name,
                       env={"CLUSTER_DISCOVERY_URL": store, "BACKEND_NAME": name})


def test_past_the_connection_cap_a_short_503_while_existing_connections_carry_on(
        store: str) -> None:
    cap = 20
    proc, port = start_capped(store, "capped", cap)
    socks: list[socket.socket] = []
    try:
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(cap)]
        time.sleep(0.5)  # accepted, normally; which one is refused is the door's order
        socks.append(socket.create_connection(("127.0.0.1", port)))
        sel = selectors.DefaultSelector()
        for sock in socks:
            sel.register(sock, selectors.EVENT_READ)
        ready = {key.fileobj for key, _ in sel.select(timeout=3)}
        time.sleep(0.3)  # any other answer would be here by now
        ready |= {key.fileobj for key, _ in sel.select(timeout=0)}
        sel.close()
        assert len(ready) == 1, f"{len(ready)} of {cap + 1} connections were answered"
        refused = ready.pop()
        assert isinstance(refused, socket.socket)
        data, closed = read_until_close(refused, 3)
        assert closed and data.startswith(b"HTTP/1.1 503"), data
        assert len(data) < 512, data
        socks.remove(refused)
        refused.close()
        for sock in socks:  # the ones inside the cap still work
            sock.sendall(request_bytes())
            got = read_response(sock)
            assert (got.status, got.body) == (200, b"capped")
        socks.pop().close()  # one leaves: a newcomer gets its place

        def newcomer_served() -> bool:
            responses, _ = exchange(port, FOLLOW_UP, timeout=3)
            return bool(responses) and responses[0].status == 200
        wait_until(newcomer_served, timeout=3, interval=0.1, what="a freed slot")
    finally:
        for sock in socks:
            sock.close()
        stop_clean(proc)


def test_past_the_connection_cap_the_503_answers_the_request_not_the_connect(
        store: str) -> None:
    """The 503 used to go out as soon as the connection was accepted, before the client
    had written its request: a response to no request. ab then never finished (it
    read the 503, closed, and opened no other connection: "apr_pollset_poll: The
    timeout specified has expired"), and Go's client logged "Unsolicited response
    received on idle HTTP channel" and failed the request. It waits for the request."""
    cap = 5
    proc, port = start_capped(store, "capped2", cap)
    socks: list[socket.socket] = []
    try:
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(cap)]
        for sock in socks:  # in, and served: the cap is reached
            sock.sendall(request_bytes())
            assert read_response(sock).status == 200
            sock.sendall(b"G")  # a next request begun: not idle, so never reclaimed
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port)) as late:
                late.setblocking(False)
                time.sleep(0.2)  # long after the accept: the door answered at once
                with pytest.raises(BlockingIOError):
                    late.recv(100)  # nothing came before the request
                late.setblocking(True)
                started = time.monotonic()
                late.sendall(request_bytes())
                data, closed = read_until_close(late, 3)
                assert closed and data.startswith(b"HTTP/1.1 503"), data
                assert time.monotonic() - started < 0.4  # the answer, not a timeout
    finally:
        for sock in socks:
            sock.close()
        stop_clean(proc)


def test_at_the_connection_cap_an_idle_connection_makes_room(store: str) -> None:
    """A cap full of idle keep-alive connections (browsers keep several per visitor) or
    of connections never used refused every newcomer 503 for --keepalive-timeout (or
    --header-timeout). As nginx reuses its idle connections, the one idle longest is
    closed for the newcomer; one idle for under a second is not (its client may be
    sending its next request), nor one in the middle of a request."""
    cap = 4
    proc, port = start_capped(store, "capped3", cap)
    socks: list[socket.socket] = []

    def connect() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        socks.append(sock)
        return sock

    def served(sock: socket.socket) -> bool:
        sock.sendall(request_bytes())
        return read_response(sock).status == 200

    try:
        oldest, recent, busy = connect(), connect(), connect()
        assert served(oldest) and served(recent) and served(busy)
        busy.sendall(b"GET /whoami HTTP/1.1\r\n")  # its next request under way
        time.sleep(1.3)
        unused = connect()  # never sends anything
        time.sleep(0.2)  # accepted before the next request is read
        assert served(recent)  # idle again, for a moment only
        assert served(connect())  # a newcomer: the cap was full
        data, closed = read_until_close(oldest, 2)  # the one idle longest made room
        assert closed and data == b"", data
        # none other idle for a second: the next newcomer is refused
        responses, _ = exchange(port, FOLLOW_UP, timeout=3)
        assert responses and responses[0].status == 503, responses
        time.sleep(1.2)  # now the connection never used is the one idle longest
        responses, _ = exchange(port, FOLLOW_UP, timeout=3)
        assert responses and responses[0].status == 200, responses
        data, closed = read_until_close(unused, 2)
        assert closed and data == b"", data
        busy.sendall(b"Host: 127.0.0.1\r\n\r\n")  # the busy one carried on
        assert read_response(busy).status == 200
        assert served(recent)
    finally:
        for sock in socks:
            sock.close()
        stop_clean(proc)


# --- --bind HOST:0 --port-file ---------------------------------------------------------


def test_port_zero_is_bound_reported_in_the_port_file_and_logged(tmp_path: Path,
                                                                 store: str) -> None:
    port_file = tmp_path / "sub" / "port"
    port_file.parent.mkdir()
    proc = Proc(cluster_argv("serve", "--ui-service", "nothing", "--bind", "127.0.0.1:0",
                             "--port-file", str(port_file)),
                env={"CLUSTER_DISCOVERY_URL": store}, name="portfile")
    try:
        port = read_port_file(port_file, proc)
        assert port_file.read_text() == f"127.0.0.1:{port}\n"
        assert port != 0
        responses, _ = exchange(port, request_bytes(target="/_cluster/status",
                                                    headers=[("Connection", "close")]))
        assert responses[0].status == 200
        wait_until(lambda: f"127.0.0.1:{port}" in proc.output(), timeout=5,
                   what="the log names the bound address")
    finally:
        stop_clean(proc)


LIBRARY_ON_PORT_ZERO = """
from gevent import monkey; monkey.patch_all()
import signal, gevent, cluster
from cluster.demo import app
server = cluster.make_server(app, service="web", bind="127.0.0.1:0")
gevent.signal_handler(signal.SIGTERM, server.stop)
server.serve_forever()
"""


def test_in_library_mode_port_zero_is_reported_in_the_port_file(tmp_path: Path,
                                                                store: str) -> None:
    """cluster.make_server() with CLUSTER_PORT_FILE (or port_file=): the file names the
    bound address, as under cluster serve. It was accepted and never written."""
    port_file = tmp_path / "port"
    proc = Proc(python("-c", LIBRARY_ON_PORT_ZERO),
                env={"CLUSTER_DISCOVERY_URL": store, "CLUSTER_PORT_FILE": str(port_file)},
                name="library")
    try:
        port = read_port_file(port_file, proc, timeout=10)
        assert port != 0 and port_file.read_text() == f"127.0.0.1:{port}\n"
        responses, _ = exchange(port, request_bytes(target="/whoami",
                                                    headers=[("Connection", "close")]))
        assert responses[0].status == 200
    finally:
        stop_clean(proc)


@needs_ipv6
def test_an_ipv6_bind_serves_and_balances_over_ipv6(tmp_path: Path, store: str) -> None:
    """--bind [::1]:0 listens on IPv6 (it used to fail: "Address family for hostname not
    supported"), the port file and the endpoint URL bracket the address, and a balancer
    on ::1 relays to a member on ::1."""
    member, _ = start_instance(store, "six", "--bind", "[::1]:0", service="doorsix")
    front = None
    try:
        port_file = tmp_path / "port"
        front = Proc(cluster_argv("serve", "--ui-service", "doorsix", "--bind", "[::1]:0",
                                  "--port-file", str(port_file)),
                     env={"CLUSTER_DISCOVERY_URL": store}, name="front6")
        port = read_port_file(port_file, front)
        assert port_file.read_text() == f"[::1]:{port}\n"

        def whoami() -> bytes | None:
            with socket.create_connection(("::1", port), timeout=5) as sock:
                sock.sendall(b"GET /whoami HTTP/1.1\r\nHost: [::1]\r\nConnection: close"
                             b"\r\n\r\n")
                data, _ = read_until_close(sock, CLOSE_WAIT)
            return data if data.startswith(b"HTTP/1.1 200 ") else None
        answer = wait_until(whoami, timeout=15, what="the front relays to the member")
        assert answer.endswith(b"\r\n\r\nsix"), answer
        assert f"http://[::1]:{port}" in front.output()
    finally:
        if front is not None:
            stop_clean(front)
        stop_clean(member)


@needs_ipv6
def test_workers_keep_an_ipv6_endpoint_url_in_brackets(tmp_path: Path, store: str) -> None:
    """--workers-count with --endpoint-url http://[::1]:PORT: each worker registers the
    configured host with its own port, still in brackets (it registered http://::1:N)."""
    port_file = tmp_path / "port"
    proc = Proc(cluster_argv("serve", "--service", "doorsixw", "--app", "backend:app",
                             "--workers-count", "2", "--bind", "[::1]:0",
                             "--endpoint-url", "http://[::1]:9", "--port-file", str(port_file),
                             "--ping-interval", "1", "--expiry-grace", "1"),
                env={"CLUSTER_DISCOVERY_URL": store, "BACKEND_NAME": "sixw"}, name="sixw")
    try:
        port = read_port_file(port_file, proc)

        def two_workers() -> list[str] | None:
            with socket.create_connection(("::1", port), timeout=5) as sock:
                sock.sendall(b"GET /_cluster/status HTTP/1.1\r\nHost: [::1]\r\n"
                             b"Connection: close\r\n\r\n")
                data, _ = read_until_close(sock, CLOSE_WAIT)
            if not data.startswith(b"HTTP/1.1 200 "):
                return None
            urls = [e["endpoint"] for e in json.loads(data.partition(b"\r\n\r\n")[2])[
                "endpoints"] if e["service"] == "doorsixw"]
            return urls if len(urls) == 2 else None
        urls = wait_until(two_workers, timeout=15, what="both workers registered")
        assert all(url.startswith("http://[::1]:") and not url.endswith(":9") for url in urls), \
            urls
    finally:
        stop_clean(proc)


# --- a low descriptor limit --------------------------------------------------------------


def test_silent_connections_under_a_low_descriptor_limit_do_not_break_the_instance(
        store: str) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1024 and hard >= 1024:  # this test process needs ~330 descriptors itself
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    env = {"CLUSTER_DISCOVERY_URL": store, "BACKEND_NAME": "lowfd"}
    proc, port = start_serve("--service", "doorlowfd", "--app", "backend:app",
                             "--max-connections", "auto", "--header-timeout", "2",
                             "--ping-interval", "1", "--expiry-grace", "1", name="lowfd",
                             env=env, wrapper=("prlimit", "--nofile=256:256"))
    other = None
    socks: list[socket.socket] = []
    try:
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]
        # meanwhile another instance of the service registers: discovery must see it
        other, _ = start_instance(store, "lowfd2", service="doorlowfd")
        refused = held = 0
        sel = selectors.DefaultSelector()
        for sock in socks:
            sel.register(sock, selectors.EVENT_READ)
        answered: set[socket.socket] = set()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                data, closed = read_until_close(sock, 1)
                assert closed and (data == b"" or data.startswith(b"HTTP/1.1 503")), data
                refused += 1
                answered.add(sock)
                sel.unregister(sock)
        sel.close()
        held = len(socks) - len(answered)
        assert refused > 0, "300 connections under 256 descriptors: some must be refused"
        # a normal client meanwhile: a clean answer, never a hang or a reset
        responses, _ = exchange(port, FOLLOW_UP, timeout=5)
        assert responses and responses[0].status in (200, 503), responses
        # after the header timeout the held ones are gone and everything works
        for sock in socks:
            sock.close()
        socks = []

        def sees_both() -> bool:
            responses, _ = exchange(port, request_bytes(target="/_cluster/status",
                                                        headers=[("Connection", "close")]),
                                    timeout=5)
            if not responses or responses[0].status != 200:
                return False
            names = {e["endpoint"] for e in json.loads(responses[0].body)["endpoints"]
                     if e["service"] == "doorlowfd"}
            return len(names) == 2
        wait_until(sees_both, timeout=10, what="discovery lists both instances")
        assert held <= 256, held
        output = proc.output()
        assert "Too many open files" not in output and "EMFILE" not in output, output[-3000:]
    finally:
        for sock in socks:
            sock.close()
        if other is not None:
            stop_clean(other)
        stop_clean(proc)


@pytest.mark.parametrize("door", ["local", "front"], indirect=True)
@pytest.mark.parametrize("ask", [("HTTP/1.1", "close"), ("HTTP/1.0", "")])
def test_a_connection_that_ends_says_so(door: Door, ask: tuple[str, str]) -> None:
    """Connection: close (or HTTP/1.0 without keep-alive) gets Connection: close back,
    from the local app as from a proxied endpoint, and then the connection ends."""
    version, connection = ask
    headers = [("Connection", connection)] if connection else []
    raw = request_bytes(headers=headers, version=version)
    responses, closed = exchange(door.port, raw, timeout=CLOSE_WAIT)
    got = only_response(responses, raw)
    assert got.status == 200 and closed
    assert (got.header("connection") or "").lower() == "close", got


def test_a_tls_handshake_at_the_plain_port_gets_400_at_once(door: Door) -> None:
    """A client speaking TLS to the plain port (https:// for an http:// URL) gets 400 as
    soon as its ClientHello arrives. Before, the door waited for a request line that
    never came, and the client hung for the whole header timeout (10 s here)."""
    outgoing = ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), outgoing,
                                                server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()  # writes the ClientHello, then wants the server's answer
    client_hello = outgoing.read()
    assert client_hello[:1] == b"\x16", client_hello[:16]  # a TLS handshake record
    with socket.create_connection(("127.0.0.1", door.port), timeout=10) as sock:
        sock.sendall(client_hello)
        data, closed = read_until_close(sock, CLOSE_WAIT)
    assert closed and data.startswith(b"HTTP/1.1 400 "), data[:200]


def test_a_streamed_body_to_an_http_1_0_keep_alive_client_ends_with_the_connection(
        door: Door) -> None:
    """No chunks for HTTP/1.0: a body without a length ends when the connection does, so
    the answer says close (not the keep-alive the client asked for) and closes."""
    raw = b"GET /chunked?n=3&delay=0 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    with socket.create_connection(("127.0.0.1", door.port), timeout=10) as sock:
        sock.sendall(raw)
        data, closed = read_until_close(sock, CLOSE_WAIT)
    head, _, body = data.partition(b"\r\n\r\n")
    assert closed, data[:300]
    assert b"\r\nConnection: close" in head and b"keep-alive" not in head.lower(), head
    assert body.count(b"\n") == 3 and b"Transfer-Encoding" not in head, data[:300]


@pytest.mark.parametrize("where", ["local", "library"])
def test_an_empty_body_without_start_response_is_a_500_not_silence(
        request: pytest.FixtureRequest, where: str) -> None:
    """An app that returns ``[]`` (an empty generator: a middleware's early return)
    without calling start_response: pywsgi sent nothing and kept the connection, so the
    client waited for an answer that never came (curl until its timeout) or, pipelining,
    took the next request's answer for this one. gunicorn answers 500; so does cluster."""
    door = request.getfixturevalue(where)
    raw = request_bytes(target="/nothing-started") + FOLLOW_UP
    responses, closed = exchange(door.port, raw, timeout=CLOSE_WAIT)
    assert [(r.status, r.body) for r in responses] == [(500, b"Internal Server Error")], \
        responses
    assert closed


@pytest.mark.parametrize("path", ["/no-start-response", "/str-body"])
def test_an_app_that_breaks_pep_3333_gets_a_whole_500(store: str, path: str) -> None:
    """No start_response, or a str for a body piece: a whole 500, locally and through a
    balancer. The 500 page was cut to 8 bytes of its Content-Length (the refused piece
    was counted as sent); a str left the client with nothing (the connection's greenlet
    died on gevent-websocket's assert) and a balancer in front said 503, no endpoint."""
    member, member_port = start_instance(store, "buggy", service="doorbuggy")
    front = None
    try:
        front, front_port = start_serve("--ui-service", "doorbuggy", *PATIENT, name="buggyfront",
                                        env={"CLUSTER_DISCOVERY_URL": store})
        wait_front_sees(front_port, "doorbuggy")
        for port in (member_port, front_port):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: a\r\n"
                             b"Connection: close\r\n\r\n")
                data, closed = read_until_close(sock, CLOSE_WAIT)
            (error,), rest = parse_responses(data)
            assert (error.status, error.body, rest) == (500, b"Internal Server Error", b""), \
                data[:500]
            assert closed
    finally:
        alive = [p.poll() is None for p in (member, front) if p is not None]
        for proc in (member, front):
            if proc is not None:
                proc.stop()
    assert all(alive)
    for proc in (member, front):
        if proc is not None:
            assert "Greenlet at" not in proc.output(), proc.output()[-3000:]


# --- closing while the client still sends ---------------------------------------------

UPLOAD = 20_000_000  # more than loopback's socket buffers hold between the two ends


@pytest.fixture(scope="module")
def unserved(store: str) -> Iterator[Door]:
    """A balancer for a service nobody serves: the door answers every request 503."""
    proc, port = start_serve("--ui-service", "doornobody", *PATIENT, name="unserved",
                             env={"CLUSTER_DISCOVERY_URL": store})
    try:
        yield Door(proc, port, "")
    finally:
        stop_clean(proc)


def test_an_upload_answered_before_its_body_is_read_gets_the_answer_not_a_reset(
        unserved: Door) -> None:
    """Python's http.client sends the whole body before it reads a byte: a door that
    answered 503 and closed with the body unread made the kernel send a reset, and the
    client saw "connection reset by peer" instead of the 503 (so did urllib)."""
    conn = http.client.HTTPConnection("127.0.0.1", unserved.port, timeout=10)
    try:
        conn.request("POST", "/upload", body=b"x" * UPLOAD)
        response = conn.getresponse()
        assert response.status == 503
        assert (response.getheader("Connection") or "").lower() == "close"
        assert b"no live endpoint" in response.read()
    finally:
        conn.close()


def test_a_refused_head_with_a_body_behind_it_gets_its_status_and_a_clean_close(
        door: Door) -> None:
    """The door refuses the head (Content-Length with chunked) while the body is still
    coming: the client can send it all, then reads the 400 and an end of stream."""
    with socket.create_connection(("127.0.0.1", door.port), timeout=10) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" % UPLOAD)
        sock.sendall(b"x" * UPLOAD)  # a reset would fail this, or the read below
        data, closed = read_until_close(sock, CLOSE_WAIT)
    assert closed and data.startswith(b"HTTP/1.1 400 "), data[:200]


def test_a_client_that_never_stops_sending_is_closed_in_the_end(unserved: Door) -> None:
    """Draining is bounded (LINGER_SECONDS, 5 s): a client sending without end does not
    hold its connection."""
    with socket.create_connection(("127.0.0.1", unserved.port), timeout=10) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000000000"
                     b"\r\n\r\n")
        started = time.monotonic()
        piece = b"x" * 65536
        with pytest.raises(OSError):  # the door closed: a reset now, as it should be
            while time.monotonic() - started < 20:
                sock.sendall(piece)
                time.sleep(0.01)
        elapsed = time.monotonic() - started
    assert 4 < elapsed < 10, elapsed


def test_connect_under_cluster_wrap_is_refused_as_at_the_door(library: Door) -> None:
    """The door answers CONNECT 501 and closes; under cluster.wrap() pywsgi passed it
    on, to the local app or relayed to another endpoint, and read what the client sent
    after it as the next request (a tunnel's bytes, served as HTTP)."""
    raw = b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n"
    responses, closed = exchange(library.port, raw + FOLLOW_UP, timeout=CLOSE_WAIT)
    assert [r.status for r in responses] == [501] and closed, (responses, closed)
    assert responses[0].header("connection") == "close", responses[0].headers



def test_an_app_status_or_field_http_cannot_carry_is_a_prompt_500(store: str) -> None:
    """An app's ``"103 X"`` (or 100, 199, or a 101 to a request that asked no upgrade)
    went out as it was, with the body after it: curl, Go's client and a balancer in
    front took it for an interim answer and waited for the final one (the balancer for
    its 300 s read timeout). ``"20 X"`` and ``"2000 X"`` went out as status lines clients
    refuse. So did a header field name that is no token (``X Bad``) or a value with a
    NUL or an ESC (Node's client: "Parse Error: Invalid header token"). So did two
    different Content-Lengths (RFC 9110 8.6), on a kept connection: pywsgi framed the
    body by the last (``2``) and http.client (requests) reads the first (``50``), taking
    48 bytes of the next answer for the rest of this one; and values that are no number
    (``2, 2``, ``+2``). Each is the app's error now, as under gunicorn's own workers: a
    whole 500, at once, served here, through a balancer, and under cluster.wrap()."""
    member, member_port = start_instance(store, "statuses", service="doorstatuses")
    procs = [member]
    try:
        front, front_port = start_serve("--ui-service", "doorstatuses", *PATIENT,
                                        name="statusfront",
                                        env={"CLUSTER_DISCOVERY_URL": store})
        procs.append(front)
        library, library_port = start_library_app(
            {"CLUSTER_DISCOVERY_URL": store, "BACKEND_NAME": "library",
             "CLUSTER_SERVICE": "doorstatuslib"}, "backend:app")
        procs.append(library)
        wait_front_sees(front_port, "doorstatuses")
        targets = [b"/status/%d" % code for code in (100, 103, 199, 101, 20, 2000)] + \
            [b"/bad-field?kind=" + kind for kind in (b"space", b"colon", b"nul", b"esc")] + \
            [b"/lengths?values=" + quote(values).encode()
             for values in ("50|2", "2|50", "2, 2", "+2", "\u0662")]
        for port in (member_port, front_port, library_port):
            for target in targets:
                raw = b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % target
                started = time.monotonic()
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    sock.sendall(raw + FOLLOW_UP)
                    data, closed = read_until_close(sock, CLOSE_WAIT)
                assert data.startswith(b"HTTP/1.1 500 "), (port, target, data[:300])
                responses, rest = parse_responses(data)
                # the next request answered, or the connection closed after the 500
                assert [r.status for r in responses] in ([500], [500, 200]), data[:500]
                assert rest == b"" and closed, data[:500]
                assert time.monotonic() - started < CLOSE_WAIT
            # a real status still goes out as the app gave it
            responses, _ = exchange(port, b"GET /status/599 HTTP/1.1\r\nHost: a\r\n"
                                          b"Connection: close\r\n\r\n")
            assert [r.status for r in responses] == [599], responses
    finally:
        alive = [p.poll() is None for p in procs]
        for proc in procs:
            proc.stop()
    assert all(alive)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time the process ``pid`` has used."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_empty_lines_trickled_in_cost_the_door_no_search_each(store: str) -> None:
    """Empty lines before a request line, sent two bytes at a time, are dropped as they
    come (still counted in the head's size): kept in the buffer, each new byte searched
    them all again (12 000 bytes of them: seconds of the door's CPU, quadratic in their
    number)."""
    proc, port = start_serve("--service", "doorcrlf", "--app", "backend:app", *PATIENT,
                             name="crlf", env={"CLUSTER_DISCOVERY_URL": store,
                                               "BACKEND_NAME": "crlf"})
    try:
        before = cpu_seconds(proc.pid)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(6000):
                sock.send(b"\r\n")
                time.sleep(0.0002)  # the door reads them a few at a time
            sock.sendall(FOLLOW_UP)
            data, closed = read_until_close(sock, CLOSE_WAIT)
        assert data.startswith(b"HTTP/1.1 200 ") and closed, data[:300]
        assert cpu_seconds(proc.pid) - before < 1.0
        # and more of them than a head may hold are a 431, as a head that large is
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            for _ in range(20):
                sock.sendall(b"\r\n" * 2000)
            data, closed = read_until_close(sock, CLOSE_WAIT)
        assert data.startswith(b"HTTP/1.1 431 ") and closed, data[:300]
    finally:
        stop_clean(proc)


def test_empty_lines_after_a_body_do_not_end_the_connection(door: Door) -> None:
    """RFC 9112 2.2: empty lines before a request line are ignored. A client that ends a
    body with an extra CRLF CRLF (old browsers after a POST) got a 400 and a close for
    its next request: two empty lines were taken for an empty head. nginx serves both."""
    raw = (b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n\r\nabc"
           b"\r\n\r\n" + FOLLOW_UP)
    responses, closed = exchange(door.port, raw, timeout=CLOSE_WAIT)
    assert [(r.status, r.body) for r in responses] == [(200, b"abc"), (200, door.name.encode())], \
        responses
    assert closed
