"""The sans-IO HTTP/1.1 core (cluster/http1.py), without sockets.

The request corpora under tests/request_corpus/ (also sent to real doors by
tests/test_door_limits.py) give what a strict server does with each head; the rest
are boundaries at each limit, the framing rules of RFC 9112 6.3, the response side a
proxy relies on, and the chunked scanner fed in every possible way.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.errors import RequestError
from cluster.http1 import (
    CHUNKED,
    FIXED,
    NO_BODY,
    UNTIL_CLOSE,
    ChunkedScanner,
    ChunkError,
    Limits,
    RequestHead,
    find_head_end,
    parse_request_head,
    parse_response_head,
    response_framing,
    simple_response,
    without_field,
)
from helpers import CorpusCase, load_corpus

LIMITS = Limits(request_line=1024, header_line=512, head_size=4096, header_count=100)
#: request fields a parser may pull out of ``fields`` into attributes of their own
SPECIAL = {"host", "content-length", "transfer-encoding", "connection", "upgrade", "cookie",
           "expect", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded",
           "x-real-ip", "via", "x-cluster-hop"}


def parse(raw: bytes, limits: Limits = LIMITS) -> tuple[RequestHead, bytes]:
    """The head of ``raw`` parsed as the door does, and the bytes after it."""
    end = find_head_end(raw, limits.head_size)
    assert end > 0, f"no complete head in {raw[:200]!r}"
    return parse_request_head(raw[:end - 4], limits), raw[end:]


def body_of(head: RequestHead, rest: bytes) -> tuple[bytes, bytes]:
    """(the body, what follows it) by the head's framing; ChunkError for a bad body."""
    if head.chunked:
        scanner = ChunkedScanner(decode=True)
        used, pieces = scanner.feed(rest)
        assert scanner.done, f"chunked body not complete in {rest[:200]!r}"
        return b"".join(pieces), rest[used:]
    length = max(head.content_length, 0)
    return rest[:length], rest[length:]


def outcome(raw: bytes) -> int:
    """The status a strict server answers ``raw`` with (200: it is acceptable)."""
    try:
        head, rest = parse(raw)
        body_of(head, rest)
    except RequestError as exc:
        return exc.status
    except ChunkError:
        return 400
    return 200


# --- the corpora ---------------------------------------------------------------------


@pytest.mark.parametrize("case", load_corpus("valid"), ids=lambda c: c.name)
def test_valid_corpus(case: CorpusCase) -> None:
    expect = case.expect
    head, rest = parse(case.raw)
    assert head.method == expect["method"].encode("latin-1")
    assert head.target == expect["target"].encode("latin-1")
    assert head.version == expect["version"].encode()
    assert head.chunked is expect["chunked"]
    assert head.content_length == (-1 if expect["content_length"] is None
                                   else expect["content_length"])
    assert head.keep_alive is expect["keep_alive"]
    fields = [(k, v) for k, v in expect["headers"] if k.lower() not in SPECIAL]
    pairs = head.header_pairs()
    assert [p for p in pairs if p[0].lower() not in SPECIAL] == fields
    hosts = [v for k, v in expect["headers"] if k.lower() == "host"]
    assert head.host == (hosts[0].encode("latin-1") if hosts else b"")
    cookies = [v for k, v in expect["headers"] if k.lower() == "cookie"]
    assert head.cookie == "; ".join(cookies).encode("latin-1")
    body, after = body_of(head, rest)
    assert after == b"", "every valid case is one whole request"
    if "body" in expect:
        assert body == expect["body"].encode("latin-1")


@pytest.mark.parametrize("case", load_corpus("invalid"), ids=lambda c: c.name)
def test_invalid_corpus(case: CorpusCase) -> None:
    statuses = case.expect["status"]
    statuses = statuses if isinstance(statuses, list) else [statuses]
    assert outcome(case.raw) in statuses


@pytest.mark.parametrize("target, origin, host", [
    (b"http://a.example/x?y=1", b"/x?y=1", b"a.example"),
    (b"HTTPS://a.example:8443", b"/", b"a.example:8443"),
    (b"http://a.example?q", b"/?q", b"a.example"),
])
def test_absolute_form_is_the_origin_form_with_its_authority_as_host(
        target: bytes, origin: bytes, host: bytes) -> None:
    """RFC 9112 3.2.2: the authority of an absolute-form target wins over Host."""
    head = parse_request_head(b"GET " + target + b" HTTP/1.1\r\nHost: other.example")
    assert (head.target, head.host) == (origin, host)


@pytest.mark.parametrize("target", [b"http:///x", b"http://user@a.example/x"])
def test_absolute_form_without_a_valid_host_is_refused(target: bytes) -> None:
    with pytest.raises(RequestError) as caught:
        parse_request_head(b"GET " + target + b" HTTP/1.1\r\nHost: a.example")
    assert caught.value.status == 400


# --- limits, exactly at and just past each one ----------------------------------------


def request(target: str = "/", fields: list[tuple[str, str]] | None = None) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: h", *(f"{k}: {v}" for k, v in fields or [])]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status_of(raw: bytes, limits: Limits = LIMITS) -> int:
    try:
        parse(raw, limits)
    except RequestError as exc:
        return exc.status
    return 200


def test_request_line_at_the_limit_and_one_past() -> None:
    fixed = len("GET / HTTP/1.1")
    at = request("/" + "a" * (LIMITS.request_line - fixed))
    assert at.index(b"\r\n") == LIMITS.request_line
    assert status_of(at) == 200
    assert status_of(request("/" + "a" * (LIMITS.request_line - fixed + 1))) == 414


def test_header_line_at_the_limit_and_one_past() -> None:
    value = "v" * (LIMITS.header_line - len("X-Long: "))
    assert status_of(request(fields=[("X-Long", value)])) == 200
    assert status_of(request(fields=[("X-Long", value + "v")])) == 431


def test_header_count_at_the_limit_and_one_past() -> None:
    fields = [(f"X-{i}", "1") for i in range(LIMITS.header_count - 1)]  # and Host
    assert status_of(request(fields=fields)) == 200
    assert status_of(request(fields=[*fields, ("X-Last", "1")])) == 431


def test_head_size_at_the_limit_and_one_past() -> None:
    """The head up to its blank line may be head_size bytes; one more is a 431."""
    base = request(fields=[("X-Pad", "")])
    pad = LIMITS.head_size - (len(base) - 4)
    fits = request(fields=[("X-Pad", "p" * pad)])
    lines = fits[:-4].split(b"\r\n")
    assert len(fits) - 4 == LIMITS.head_size and max(map(len, lines)) > LIMITS.header_line
    big = Limits(LIMITS.request_line, 8192, LIMITS.head_size, LIMITS.header_count)
    assert find_head_end(fits, big.head_size) == len(fits)
    assert status_of(fits, big) == 200
    with pytest.raises(RequestError) as info:
        find_head_end(request(fields=[("X-Pad", "p" * (pad + 1))]), big.head_size)
    assert info.value.status == 431


@pytest.mark.parametrize("start", [b"", b"G", b"GET /x HT", b"\r", b"\r\n", b"\r\nPOS"])
def test_the_start_of_a_request_needs_more(start: bytes) -> None:
    assert find_head_end(start, LIMITS.head_size) == -1


@pytest.mark.parametrize("start", [b"\x16\x03\x01\x02\x00\x01", b"\r\n\x16\x03", b" GET",
                                   b"\x00", b"\xff\xfe"])
def test_bytes_that_cannot_start_a_request_line_are_refused_at_once(start: bytes) -> None:
    """A TLS ClientHello (0x16...) and the like: no request line will ever come."""
    with pytest.raises(RequestError) as info:
        find_head_end(start, LIMITS.head_size)
    assert info.value.status == 400


def test_an_incomplete_head_past_the_limit_is_431_and_within_it_needs_more() -> None:
    partial = b"GET / HTTP/1.1\r\nX-A: " + b"a" * LIMITS.head_size
    assert find_head_end(partial[:LIMITS.head_size], LIMITS.head_size) == -1
    with pytest.raises(RequestError) as info:
        find_head_end(partial, LIMITS.head_size)
    assert info.value.status == 431


def test_how_a_head_arrives_does_not_change_whether_it_fits() -> None:
    """A head of exactly head_size bytes is accepted whole; arriving byte by byte, no
    prefix of it may be refused either (the door calls find_head_end after each read)."""
    base = request(fields=[("X-Pad", "")])
    raw = request(fields=[("X-Pad", "p" * (LIMITS.head_size - (len(base) - 4)))])
    assert find_head_end(raw, LIMITS.head_size) == len(raw)
    for size in range(len(raw) - 8, len(raw)):
        assert find_head_end(raw[:size], LIMITS.head_size) == -1, size


# --- framing (RFC 9112 6.1-6.3) ---------------------------------------------------------


@pytest.mark.parametrize("fields, status", [
    ([("Transfer-Encoding", "chunked")], 200),
    ([("Transfer-Encoding", "CHUNKED")], 200),
    ([("Transfer-Encoding", "x")], 400),
    ([("Transfer-Encoding", "gzip")], 400),
    ([("Transfer-Encoding", "gzip, chunked")], 501),
    ([("Transfer-Encoding", "chunked, gzip")], 400),
    ([("Transfer-Encoding", "gzip"), ("Transfer-Encoding", "chunked")], 501),
    ([("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "gzip")], 400),
    ([("Transfer-Encoding", "chunked"), ("Content-Length", "5")], 400),
    ([("Content-Length", "5"), ("Transfer-Encoding", "chunked")], 400),
    ([("Transfer-Encoding", "gzip"), ("Content-Length", "5")], 400),
    ([("Transfer-Encoding", "")], 400),
    ([("Content-Length", "5")], 200),
    ([("Content-Length", "0")], 200),
    ([("Content-Length", "+5")], 400),
    ([("Content-Length", "-1")], 400),
    ([("Content-Length", "0_5")], 400),
    ([("Content-Length", "0x5")], 400),
    ([("Content-Length", "1 0")], 400),
    ([("Content-Length", "5.0")], 400),
    ([("Content-Length", "")], 400),
    ([("Content-Length", "5"), ("Content-Length", "6")], 400),
    ([("Content-Length", "5, 6")], 400),
])
def test_request_framing(fields: list[tuple[str, str]], status: int) -> None:
    assert status_of(request(fields=fields)) == status, fields


def test_unicode_digits_are_not_a_content_length() -> None:
    raw = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: \xd9\xa5\r\n\r\n"
    assert status_of(raw) == 400


def test_content_length_value_is_trimmed_and_read_as_decimal() -> None:
    head, _ = parse(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: \t 0012 \r\n\r\n")
    assert head.content_length == 12 and head.has_body


def test_transfer_encoding_in_http10_is_refused() -> None:
    raw = b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert status_of(raw) == 400


@pytest.mark.parametrize("version, connection, keep_alive", [
    ("HTTP/1.1", None, True),
    ("HTTP/1.1", "close", False),
    ("HTTP/1.1", "Keep-Alive, CLOSE", False),
    ("HTTP/1.0", None, False),
    ("HTTP/1.0", "keep-alive", True),
    ("HTTP/1.0", "Keep-Alive", True),
])
def test_keep_alive(version: str, connection: str | None, keep_alive: bool) -> None:
    lines = [f"GET / {version}", "Host: h"] + ([f"Connection: {connection}"]
                                              if connection else [])
    head, _ = parse(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert head.keep_alive is keep_alive


@pytest.mark.parametrize("version, value, expects", [
    ("HTTP/1.1", "100-continue", True),
    ("HTTP/1.1", "100-Continue", True),
    ("HTTP/1.1", "something-else", False),
    ("HTTP/1.0", "100-continue", False),  # RFC 9110 10.1.1: ignored in HTTP/1.0
])
def test_expect_100_continue(version: str, value: str, expects: bool) -> None:
    head, _ = parse(f"POST / {version}\r\nHost: h\r\nExpect: {value}\r\n"
                    f"Content-Length: 1\r\n\r\nx".encode())
    assert head.expect_continue is expects
    assert (("Expect", "100-continue") in head.header_pairs()) is expects


def test_websocket_upgrade_is_recognised_only_as_rfc_6455_says() -> None:
    def head(method: str, connection: str, upgrade: str) -> RequestHead:
        raw = (f"{method} /ws HTTP/1.1\r\nHost: h\r\nConnection: {connection}\r\n"
               f"Upgrade: {upgrade}\r\n\r\n").encode()
        return parse(raw)[0]

    assert head("GET", "keep-alive, Upgrade", "WebSocket").is_websocket
    assert not head("POST", "Upgrade", "websocket").is_websocket
    assert not head("GET", "keep-alive", "websocket").is_websocket
    assert not head("GET", "Upgrade", "h2c").is_websocket


def test_hop_by_hop_request_fields_are_not_passed_on() -> None:
    head, _ = parse(request(fields=[
        ("Keep-Alive", "timeout=5"), ("TE", "trailers"), ("Trailer", "X-T"),
        ("Proxy", "http://evil"), ("Proxy-Authorization", "Basic x"),
        ("Proxy-Connection", "keep-alive"), ("X-End", "1")]))
    assert head.fields == [b"X-End: 1"]


@pytest.mark.parametrize("spell", [str.lower, str.upper, str.title])
def test_field_names_are_recognised_in_any_case(spell: Callable[[str], str]) -> None:
    """Every field the door handles itself is found however its name is written; the
    ordinary fields around it pass on untouched (the parser skips those quickly)."""
    fields = [
        (spell("Host"), "h"), ("Accept", "*/*"), (spell("Cookie"), "a=1"),
        (spell("X-Forwarded-For"), "10.0.0.1"), (spell("X-Forwarded-Proto"), "https"),
        (spell("X-Forwarded-Host"), "f"), (spell("Forwarded"), "for=x"),
        (spell("X-Real-IP"), "10.0.0.2"), (spell("Via"), "1.1 p"),
        (spell("X-Cluster-Hop"), "m"), (spell("Expect"), "100-continue"),
        (spell("Upgrade"), "websocket"), (spell("Connection"), "Upgrade, X-Gone"),
        (spell("Keep-Alive"), "1"), (spell("TE"), "trailers"), (spell("Trailer"), "x"),
        (spell("Proxy"), "p"), (spell("Proxy-Authorization"), "x"),
        (spell("Content-Length"), "5"), ("user-agent", "u"), ("Sec-Fetch-Mode", "cors")]
    raw = "GET / HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields) + "\r\n"
    head, _ = parse(raw.encode())
    assert head.fields == [b"Accept: */*", b"user-agent: u", b"Sec-Fetch-Mode: cors"]
    assert (head.host, head.cookie, head.forwarded_for, head.forwarded_proto) == (
        b"h", b"a=1", b"10.0.0.1", b"https")
    assert (head.forwarded_host, head.forwarded, head.real_ip, head.via, head.hop) == (
        b"f", b"for=x", b"10.0.0.2", b"1.1 p", b"m")
    assert head.expect_continue and head.upgrade == b"websocket"
    assert head.connection == (b"upgrade", b"x-gone") and head.content_length == 5


def test_cookie_lines_and_forwarded_fields_are_collected() -> None:
    head, _ = parse(request(fields=[
        ("Cookie", "a=1"), ("X-Forwarded-For", "10.0.0.1"), ("Cookie", "b=2"),
        ("X-Forwarded-For", "10.0.0.2"), ("Expect", "100-continue")]))
    assert head.cookie == b"a=1; b=2"
    assert head.forwarded_for == b"10.0.0.1, 10.0.0.2"
    assert head.expect_continue


@pytest.mark.parametrize("raw, status", [
    (b"GET / HTTP/1.1\r\nHost: h\r\nHost: h\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.0\r\n\r\n", 200),
    (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", 200),  # an empty Host is allowed (RFC 9112 3.2)
    (b"\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n", 200),  # one empty line first: ignored
    (b"GET / HTTP/1.1\r\nHost: h\r\n\tfolded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x7fb\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX\t: a\r\n\r\n", 400),
    (b"GET /\t HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"GET / HTTP/1.1 \r\nHost: h\r\n\r\n", 400),
    (b" GET / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"GET / HTTP/0.9\r\nHost: h\r\n\r\n", 505),
    (b"GET / HTTP/2\r\nHost: h\r\n\r\n", 400),
])
def test_request_head_syntax(raw: bytes, status: int) -> None:
    assert status_of(raw) == status


def test_a_head_ending_in_bare_lfs_is_refused_not_waited_for() -> None:
    for raw in (b"GET / HTTP/1.1\nHost: h\n\n", b"GET / HTTP/1.1\r\nHost: h\n\r\n"):
        with pytest.raises(RequestError) as info:
            find_head_end(raw, LIMITS.head_size)
        assert info.value.status == 400


def incremental_search(raw: bytes, piece: int) -> tuple[int, int]:
    """The door's read loop over ``raw`` arriving ``piece`` bytes per read: each search
    starts 3 bytes before what the last one saw. (index found or -1, reads)."""
    buf, seen, reads = bytearray(), 0, 0
    while len(buf) < len(raw):
        buf += raw[len(buf):len(buf) + piece]
        reads += 1
        end = find_head_end(buf, LIMITS.head_size, max(seen - 3, 0))
        if end >= 0:
            return end, reads
        seen = len(buf)
    return -1, reads


@pytest.mark.parametrize("piece", [1, 2, 3, 4, 5, 7])
def test_searching_only_the_new_bytes_finds_what_a_whole_search_finds(piece: int) -> None:
    """A head trickled in is searched from a little before the last read's end, not
    whole after each read (quadratic in its size: a 60 KB head sent a byte at a time
    cost the door seconds of CPU); however the reads split the blank line or a bare LF,
    the outcome is the same as for the head in one piece."""
    raw = request(fields=[("X-Pad", "p" * 40)]) + b"GET /next HTTP/1.1\r\n"
    assert incremental_search(raw, piece)[0] == find_head_end(raw, LIMITS.head_size)
    for bare in (b"GET / HTTP/1.1\nHost: h\n\nrest", b"GET / HTTP/1.1\r\nHost: h\n\r\nrest"):
        with pytest.raises(RequestError) as info:
            incremental_search(bare, piece)
        assert info.value.status == 400
    assert incremental_search(raw[:raw.index(b"\r\n\r\n") + 3], piece)[0] == -1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_parsed_or_refused_with_a_status(data: bytes) -> None:
    """Never another exception: a traceback would be a dead connection without answer."""
    for raw in (data, b"GET / HTTP/1.1\r\nHost: h\r\n" + data):
        try:
            end = find_head_end(raw, LIMITS.head_size)
            if end > 0:
                parse_request_head(raw[:end - 4], LIMITS)
        except RequestError as exc:
            assert exc.status in (400, 414, 431, 501, 505)


# --- responses --------------------------------------------------------------------------


def test_response_head_fields_a_proxy_passes_on() -> None:
    head = parse_response_head(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: X-Named, keep-alive\r\n"
        b"X-Named: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X-T\r\n"
        b"Upgrade: foo\r\nProxy-Authenticate: x\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
        b"Transfer-Encoding: chunked\r\nX-End-To-End: 1")
    assert head.code == 200 and head.chunked and head.keep_alive
    assert head.field_pairs() == [("Content-Type", "text/plain"), ("Set-Cookie", "a=1"),
                                  ("Set-Cookie", "b=2"), ("X-End-To-End", "1")]
    assert head.status_line + head.fields + b"\r\n\r\n" == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nSet-Cookie: a=1\r\n"
        b"Set-Cookie: b=2\r\nX-End-To-End: 1\r\n\r\n")


def test_response_content_length_is_kept_and_checked() -> None:
    head = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\ncontent-length: 5")
    assert head.length == 5 and b"Content-Length: 5" in head.fields
    for bad in (b"+5", b"-1", b"5, 6", b"0x5", b"", b"1 0"):
        with pytest.raises(ValueError):
            parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: " + bad)
    with pytest.raises(ValueError):
        parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6")


@pytest.mark.parametrize("status_line, code, line", [
    (b"HTTP/1.1 200 OK", 200, b"HTTP/1.1 200 OK"),
    (b"HTTP/1.1 404 Not Found", 404, b"HTTP/1.1 404 Not Found"),
    (b"HTTP/1.1 204", 204, b"HTTP/1.1 204 No Content"),
    (b"HTTP/1.0 200 OK", 200, b"HTTP/1.1 200 OK"),
    (b"HTTP/1.1 599 Custom Reason", 599, b"HTTP/1.1 599 Custom Reason"),
])
def test_status_lines(status_line: bytes, code: int, line: bytes) -> None:
    head = parse_response_head(status_line)
    assert (head.code, head.status_line) == (code, line)


@pytest.mark.parametrize("bad", [
    b"HTTP/2 200 OK", b"HTTP/1.1 20 OK", b"HTTP/1.1 2000 OK", b"http/1.1 200 OK",
    b"HTTP/1.1 200 OK\r\nX: a\x00b", b"HTTP/1.1 200 OK\r\nX: a\rb", b"HTTP/1.1 200 OK\r\n folded",
    b"HTTP/1.1 200 OK\r\nNoColon", b"HTTP/1.1 200 OK\r\nX : space", b"ICY 200 OK",
    b"HTTP/1.1 099 Low",
])
def test_bad_response_heads_are_refused(bad: bytes) -> None:
    with pytest.raises(ValueError):
        parse_response_head(bad)


def test_http10_response_keeps_the_connection_only_when_it_says_so() -> None:
    assert not parse_response_head(b"HTTP/1.0 200 OK\r\nContent-Length: 0").keep_alive
    assert parse_response_head(b"HTTP/1.0 200 OK\r\nConnection: keep-alive").keep_alive
    assert not parse_response_head(b"HTTP/1.1 200 OK\r\nConnection: close").keep_alive


_RESPONSE_LINES = [
    b"Content-Length: 5", b"content-length:12", b"Content-Length: 5 ", b"Content-Length: +5",
    b"Content-Length: 1 0", b"Content-Length: 99999999999999999999",
    b"Connection: keep-alive", b"connection:close", b"Connection: Keep-Alive",
    b"Connection: X-Named, keep-alive", b"Connection: ", b"X-Named: 1",
    b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip", b"Keep-Alive: timeout=5",
    b"Upgrade: websocket", b"Proxy-Connection: x", b"TE: trailers", b"Trailer: X-T",
    b"Date: Sun, 29 Nov 2026 10:53:48 GMT", b"Set-Cookie: a=1", b"X-Connection: close",
    b"X-Content-Length: 7", b"Server: nginx/1.22.1", b"Content-Lengths: 3",
]


@settings(max_examples=400)
@given(st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK", b"HTTP/1.1 204",
                        b"HTTP/1.1 101 Switching Protocols", b"HTTP/1.0 404 Nope"]),
       st.lists(st.sampled_from(_RESPONSE_LINES), max_size=6))
def test_the_short_way_through_a_response_head_agrees_with_the_long_one(
        status_line: bytes, lines: list[bytes]) -> None:
    # parse_response_head takes a short way for usual heads; _parse_fields is the
    # general one that looks at every hop-by-hop field. Both must give the same.
    from cluster import http1

    head = status_line + b"".join(b"\r\n" + line for line in lines)
    try:
        short = parse_response_head(head)
    except ValueError:
        short = None
    block = head[len(status_line):]
    try:
        code, line, http11 = http1._status_line(status_line)
        long = http1._parse_fields(code, line, http11, block, block.lower()) if block else \
            http1.ResponseHead(code, line, b"", -1, False, b"", http11, b"")
    except ValueError:
        long = None
    assert short == long


@pytest.mark.parametrize("method, head, framing", [
    (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 10", (NO_BODY, 0)),
    (b"GET", b"HTTP/1.1 204 No Content", (NO_BODY, 0)),
    (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10", (NO_BODY, 0)),
    (b"GET", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket", (NO_BODY, 0)),
    (b"GET", b"HTTP/1.1 100 Continue", (NO_BODY, 0)),
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 10", (FIXED, 10)),
    (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", (CHUNKED, -1)),
    (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked", (CHUNKED, -1)),
    (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip", (UNTIL_CLOSE, -1)),
    (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 10",
     (CHUNKED, -1)),
    (b"GET", b"HTTP/1.1 200 OK", (UNTIL_CLOSE, -1)),
])
def test_response_framing(method: bytes, head: bytes, framing: tuple[int, int]) -> None:
    assert response_framing(method, parse_response_head(head)) == framing


def test_simple_response_is_a_whole_well_framed_response() -> None:
    data = simple_response(503, b"busy\n", close=True)
    end = data.index(b"\r\n\r\n")
    head = parse_response_head(data[:end])
    assert (head.code, head.length, head.keep_alive) == (503, 5, False)
    assert data[end + 4:] == b"busy\n"
    assert parse_response_head(simple_response(200, b"")[:-4]).keep_alive


def test_without_field_removes_every_line_of_that_field() -> None:
    fields = b"\r\nA: 1\r\nSet-Cookie: x\r\nB: 2\r\nset-cookie: y"
    assert without_field(fields, b"Set-Cookie") == b"\r\nA: 1\r\nB: 2"


# --- the chunked scanner -------------------------------------------------------------------


def chunked(body: bytes, size: int, trailer: bytes = b"") -> bytes:
    out = [b"%x;ext=%d\r\n%s\r\n" % (len(body[i:i + size]), i, body[i:i + size])
           for i in range(0, len(body), size)]
    return b"".join(out) + b"0\r\n" + trailer + b"\r\n"


def scan(data: bytes, pieces: list[int]) -> tuple[int, bytes, bool]:
    """Feed ``data`` cut at ``pieces`` sizes; (bytes consumed, decoded body, done)."""
    scanner = ChunkedScanner(decode=True)
    consumed, out, pos = 0, [], 0
    for size in pieces + [len(data)]:
        if scanner.done or pos >= len(data):
            break
        part = data[pos:pos + size]
        used, got = scanner.feed(part)
        out += got
        consumed += used
        pos += len(part)
        assert used == len(part) or scanner.done
    return consumed, b"".join(out), scanner.done


def test_chunked_body_ends_exactly_where_the_next_message_starts() -> None:
    body = os.urandom(10_000)
    wire = chunked(body, 999, trailer=b"X-Sum: 1\r\nX-Other: 2\r\n")
    consumed, decoded, done = scan(wire + b"GET /next HTTP/1.1\r\n\r\n", [])
    assert done and consumed == len(wire)
    assert hashlib.sha256(decoded).digest() == hashlib.sha256(body).digest()


@settings(max_examples=150, deadline=None)
@given(body=st.binary(max_size=3000), size=st.integers(1, 700),
       cuts=st.lists(st.integers(1, 50), max_size=200))
def test_chunked_scan_does_not_depend_on_how_bytes_arrive(body: bytes, size: int,
                                                          cuts: list[int]) -> None:
    wire = chunked(body, size)
    consumed, decoded, done = scan(wire + b"NEXT", cuts)
    assert (consumed, decoded, done) == (len(wire), body, True)


def test_whitespace_before_a_chunk_extension_is_allowed() -> None:
    """RFC 9112 7.1.1: chunk-ext = *( BWS ";" BWS chunk-ext-name ... )."""
    wire = b"5 ; a = b\r\nhello\r\n0\t;x\r\n\r\n"
    assert scan(wire + b"rest", []) == (len(wire), b"hello", True)


def test_chunked_body_byte_by_byte() -> None:
    wire = chunked(b"hello world", 3, trailer=b"T: 1\r\n")
    assert scan(wire + b"rest", [1] * len(wire)) == (len(wire), b"hello world", True)


@pytest.mark.parametrize("wire", [
    b"zz\r\nhello\r\n0\r\n\r\n",
    b"+5\r\nhello\r\n0\r\n\r\n",
    b"-5\r\nhello\r\n0\r\n\r\n",
    b"0x5\r\nhello\r\n0\r\n\r\n",
    b" 5\r\nhello\r\n0\r\n\r\n",
    b"5 \r\nhello\r\n0\r\n\r\n",  # BWS only before an extension (RFC 9112 7.1.1)
    b"5\t\r\nhello\r\n0\r\n\r\n",
    b"\r\nhello\r\n0\r\n\r\n",
    b"5\nhello\r\n0\r\n\r\n",
    b"3\r\nhello\r\n0\r\n\r\n",
    b"5\r\nhelloXY0\r\n\r\n",
    b"1" * 17 + b"\r\n",
    b"5;" + b"e" * 5000 + b"\r\n",
    b"0\r\nX: " + b"t" * 70_000 + b"\r\n\r\n",
])
def test_bad_chunked_bodies(wire: bytes) -> None:
    with pytest.raises(ChunkError):
        scan(wire, [])


@pytest.mark.parametrize("trailer", [b"X: a\x00b\r\n", b"X: a\rb\r\n", b"no colon\r\n",
                                     b" folded\r\n"])
def test_malformed_trailer_fields_are_refused(trailer: bytes) -> None:
    """The relay passes trailers on byte for byte: a line no field parser would accept
    must not reach an endpoint that might read it differently."""
    with pytest.raises(ChunkError):
        scan(b"5\r\nhello\r\n0\r\n" + trailer + b"\r\n", [])


# --- building the head sent to an endpoint (cluster.proxy.relay) ---------------------------


def framing_line(head: RequestHead) -> bytes:
    """The framing field the door adds, as door.py chooses it."""
    if head.chunked:
        return b"Transfer-Encoding: chunked"
    if head.content_length >= 0:
        return b"Content-Length: %d" % head.content_length
    return b""


@pytest.mark.parametrize("case", load_corpus("valid"), ids=lambda c: c.name)
def test_rewritten_head_parses_back_to_the_same_request(case: CorpusCase) -> None:
    """What the relay sends is itself a valid head that the next door frames the same
    way, with the client's end-to-end fields in order and the hop marker added."""
    from cluster.proxy.relay import Forwarding, request_head

    head, _ = parse(case.raw)
    forwarded = Forwarding(frozenset({"127.0.0.1"})).lines(head, "10.9.9.9")
    out = request_head(head, head.target, b"10.0.0.5:8000", forwarded, b"X-Cluster-Hop: 1",
                       framing_line(head))
    again, rest = parse(out, Limits(8192, 8192, 65536, 200))
    assert rest == b""
    assert (again.method, again.target, again.version) == (head.method, head.target,
                                                          b"HTTP/1.1")
    assert again.host == (head.host or b"10.0.0.5:8000")
    assert again.fields == head.fields
    assert again.cookie == head.cookie
    assert (again.chunked, again.content_length) == (head.chunked, head.content_length)
    assert again.hop == b"1"
    assert again.forwarded_for == b"10.9.9.9"  # an untrusted peer's own value is replaced


def test_forwarded_fields_from_untrusted_and_trusted_peers() -> None:
    from cluster.proxy.relay import Forwarding

    head, _ = parse(request(fields=[("X-Forwarded-For", "6.6.6.6"),
                                    ("X-Forwarded-Proto", "https"),
                                    ("X-Forwarded-Host", "evil.example")]))
    forwarding = Forwarding(frozenset({"127.0.0.1"}))
    untrusted = forwarding.lines(head, "10.9.9.9")
    assert b"X-Forwarded-For: 10.9.9.9" in untrusted
    assert b"X-Forwarded-Proto: http" in untrusted
    assert b"X-Forwarded-Host: h" in untrusted
    trusted = forwarding.lines(head, "127.0.0.1")
    assert b"X-Forwarded-For: 6.6.6.6, 127.0.0.1" in trusted
    assert b"X-Forwarded-Proto: https" in trusted
    assert b"X-Forwarded-Host: evil.example" in trusted


def test_fields_named_by_connection_are_not_forwarded() -> None:
    from cluster.proxy.relay import request_head

    head, _ = parse(request(fields=[("Connection", "X-Secret, keep-alive"),
                                    ("X-Secret", "1"), ("X-Kept", "2")]))
    out = request_head(head, head.target, b"e:1", [], b"X-Cluster-Hop: 1", b"")
    again, _ = parse(out)
    assert again.fields == [b"X-Kept: 2"] and again.connection == ()
