"""Streaming HTTP forwarding, end to end and in its pure parts.

Real processes on 127.0.0.1: requests and raw sockets talk to tests/apps/forward_only.py
(HttpForwarder served by pywsgi's WSGIServer with ClusterHandler), in front of the test
backend (tests/apps/backend.py). Upstream misbehaviour the backend cannot produce
(no framing, interim 1xx, garbage, a body cut short) comes from :class:`ScriptedUpstream`,
a real TCP server in this process that answers each request path with a fixed script.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import requests

from backend import BLOCK, pattern_sha256
from cluster.errors import UpstreamConnectError
from cluster.http1 import (
    CHUNKED,
    FIXED,
    MAX_RESPONSE_FIELDS,
    NO_BODY,
    UNTIL_CLOSE,
    crlf_head,
    parse_response_head,
    response_framing,
)
from cluster.proxy.http import HttpForwarder, request_target
from helpers import (
    TESTS,
    Proc,
    accept_forever,
    app_running,
    cluster_argv,
    get,
    python,
    refused_port,
    running,
    start_app,
    start_reporting,
    start_serve,
    wait_until,
)

FORWARD = TESTS / "apps" / "forward_only.py"
TIMEOUT = 20  # generous: a hang fails, a slow machine does not
MIB = 1024 * 1024
GIB = 1024 * MIB
RSS_BUDGET_KIB = 32 * 1024


@contextlib.contextmanager
def forward_only(upstream: str, *extra: str) -> Iterator[tuple[Proc, int]]:
    """tests/apps/forward_only.py in front of ``upstream``."""
    with app_running(FORWARD.name, "--upstream", upstream, *extra, name="proxy") as proxy:
        yield proxy


def backend_again(port: int, name: str) -> Proc:
    """tests/apps/backend.py restarted on the port an earlier one had, so a proxy that
    knows that address reaches the new one (returned once it listens). The port is
    free only while no backend runs: another process could take it in that restart
    window, a race the test accepts because a known address is what it is about."""
    proc, _ = start_reporting(
        lambda port_file: python(str(TESTS / "apps" / "backend.py"), "--name", name,
                                 "--port", str(port), "--port-file", str(port_file)),
        name=name)
    return proc


class Stack:
    """A backend and a forward-only proxy in front of it."""

    def __init__(self, backend_port: int, proxy_port: int, proxy: Proc) -> None:
        self.backend_port = backend_port
        self.backend = f"http://127.0.0.1:{backend_port}"
        self.port = proxy_port
        self.url = f"http://127.0.0.1:{proxy_port}"
        self.proc = proxy


@contextlib.contextmanager
def stack(*extra: str, via: str = "forwarder") -> Iterator[Stack]:
    """The backend behind the stand-in proxy, or behind the product itself.

    ``via="cluster"``: a balancer-only ``cluster serve`` routing to the backend, which a
    ``cluster register`` sidecar put in a fresh embedded store, so the bytes take the
    product's whole path (routing, app, forwarder, handler).
    """
    with app_running("backend.py", name="backend") as (_, bport):
        upstream = f"http://127.0.0.1:{bport}"
        if via == "forwarder":
            with forward_only(upstream, *extra) as (proxy, pport):
                yield Stack(bport, pport, proxy)
            return
        with tempfile.TemporaryDirectory() as tmp:
            env = {"CLUSTER_DISCOVERY_URL": f"sqlite:///{tmp}/discovery.sqlite3"}
            with running(cluster_argv("register", "--service", "web", "--endpoint-url",
                                      upstream, "--ping-interval", "1"), env=env):
                proxy, pport = start_serve("--ui-service", "web", "--ping-interval", "1",
                                           *extra, env=env, name="balancer")
                try:
                    wait_until(lambda: get(f"http://127.0.0.1:{pport}/_cluster/status")
                               .json()["endpoints"], timeout=TIMEOUT,
                               what="endpoint registered")
                    yield Stack(bport, pport, proxy)
                finally:
                    proxy.stop()


@pytest.fixture(scope="module", params=["forwarder", "cluster"])
def st(request: pytest.FixtureRequest) -> Iterator[Stack]:
    with stack(via=request.param) as s:
        yield s


# --- a raw HTTP/1.1 client: sees exactly what the proxy sends ----------------------


class Raw:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError(f"connection closed; unread: {self.buf[:80]!r}")
        self.buf += data

    def head(self) -> tuple[str, list[tuple[str, str]]]:
        """Status line and headers of the next response."""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        raw, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = raw.decode("latin-1").split("\r\n")
        return lines[0], [tuple(x.strip() for x in line.split(":", 1))  # type: ignore[misc]
                          for line in lines[1:]]

    def exactly(self, size: int) -> bytes:
        while len(self.buf) < size:
            self._fill()
        data, self.buf = self.buf[:size], self.buf[size:]
        return data

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def chunk(self) -> bytes:
        """One chunk of a chunked body (b"" for the last one, trailers consumed)."""
        size = int(self.line().split(b";")[0], 16)
        if size == 0:
            while self.line():
                pass
            return b""
        data = self.exactly(size)
        assert self.exactly(2) == b"\r\n"
        return data

    def until_close(self) -> bytes:
        with contextlib.suppress(EOFError):
            while True:
                self._fill()
        data, self.buf = self.buf, b""
        return data


def header(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name.lower()]


@contextlib.contextmanager
def raw(port: int) -> Iterator[Raw]:
    client = Raw(port)
    try:
        yield client
    finally:
        client.close()


def request(method: str, path: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test.example", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def seen_headers(resp: requests.Response) -> dict[str, str]:
    return resp.json()["headers"]


# --- forwarding ------------------------------------------------------------------


def test_get_passes_status_headers_and_body(st: Stack) -> None:
    resp = get(f"{st.url}/whoami")
    assert resp.status_code == 200
    assert resp.text == "backend"
    assert resp.headers["X-Served-By"] == "backend"
    assert resp.headers["Content-Length"] == "7"


def test_status_line_and_repeated_headers_intact(st: Stack) -> None:
    resp = get(f"{st.url}/status/418")
    assert (resp.status_code, resp.reason, resp.text) == (418, "X", "status 418")
    with raw(st.port) as client:
        client.send(request("GET", "/cookies"))
        status, headers = client.head()
        assert status == "HTTP/1.1 200 OK"
        cookies = [c for c in header(headers, "Set-Cookie")
                   if not c.startswith("cluster-endpoint::")]  # the balancer's own
        assert cookies == ["a=1; Path=/", "b=2; Path=/"]


def test_forwarded_headers_added_and_host_preserved(st: Stack) -> None:
    seen = seen_headers(get(f"{st.url}/headers", headers={"Host": "app.example:8080"}))
    assert seen["Host"] == "app.example:8080"
    assert seen["X-Forwarded-For"] == "127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Forwarded-Host"] == "app.example:8080"
    assert seen["Via"] == "1.1 cluster"


def test_forwarded_headers_from_a_previous_hop_are_extended(st: Stack) -> None:
    seen = seen_headers(get(f"{st.url}/headers", headers={
        "Host": "inner:1", "X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "www.example", "Via": "1.1 edge"}))
    assert seen["X-Forwarded-For"] == "203.0.113.7, 127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "https"
    assert seen["X-Forwarded-Host"] == "www.example"
    assert seen["Via"] == "1.1 edge, 1.1 cluster"
    assert seen["Host"] == "inner:1"


def test_hop_by_hop_request_headers_removed(st: Stack) -> None:
    with raw(st.port) as client:
        client.send(request(
            "GET", "/headers", "Connection: keep-alive, X-Named", "X-Named: 1",
            "Keep-Alive: timeout=5", "TE: trailers", "Trailer: X-T", "Upgrade: h2c",
            "Proxy-Authorization: Basic eDp5", "Proxy-Connection: keep-alive",
            "X-Kept: yes"))
        _, headers = client.head()
        body = client.exactly(int(header(headers, "Content-Length")[0]))
    seen = json.loads(body)["headers"]
    for name in ("Connection", "X-Named", "Keep-Alive", "Te", "Trailer", "Upgrade",
                 "Proxy-Authorization", "Proxy-Connection", "Transfer-Encoding"):
        assert name not in seen, name
    assert seen["X-Kept"] == "yes"


def test_hop_by_hop_response_headers_removed(st: Stack) -> None:
    with raw(st.port) as client:
        client.send(request("GET", "/hop"))
        status, headers = client.head()
        assert status == "HTTP/1.1 200 OK"
        names = {k.lower() for k, _ in headers}
        assert client.exactly(3) == b"hop"
    assert names.isdisjoint({"connection", "x-named-hop", "keep-alive", "proxy-authenticate",
                             "trailer", "upgrade", "transfer-encoding"}), names
    assert "x-end-to-end" in names


def test_head_204_304_have_no_body_on_a_kept_alive_connection(st: Stack) -> None:
    # If any of these carried body bytes, the next status line read would be garbage.
    with raw(st.port) as client:
        client.send(request("HEAD", "/download?size=100"))
        status, headers = client.head()
        assert status == "HTTP/1.1 200 OK"
        assert header(headers, "Content-Length") == ["100"]
        client.send(request("GET", "/status/204"))
        assert client.head()[0] == "HTTP/1.1 204 X"
        client.send(request("GET", "/status/304"))
        status, headers = client.head()
        assert status == "HTTP/1.1 304 X"
        assert header(headers, "ETag") == ['"v1"']
        for _ in range(3):  # the pywsgi backend sent a body after HEAD: not reused
            client.send(request("GET", "/whoami"))
            assert client.head()[0] == "HTTP/1.1 200 OK"
            assert client.exactly(7) == b"backend"


@pytest.fixture(scope="module")
def product() -> Iterator[Stack]:
    with stack(via="cluster") as s:
        yield s


@pytest.mark.parametrize("path", ["/whoami", "/download?size=100000"])
def test_one_answer_gets_each_client_its_own_connection_field(product: Stack,
                                                              path: str) -> None:
    # The proxy reuses the head it made for an endpoint head it saw before: clients that
    # keep their connection, close it or speak HTTP/1.0 get the same answer in turn, each
    # with the Connection field (and the end of connection) its request asked for.
    asks = [("HTTP/1.1", "", None), ("HTTP/1.1", "close", "close"),
            ("HTTP/1.0", "keep-alive", "keep-alive"), ("HTTP/1.1", "", None),
            ("HTTP/1.0", "", "close")]
    for version, connection, expected in asks:
        with raw(product.port) as client:
            lines = [f"GET {path} {version}", "Host: test.example"]
            lines += [f"Connection: {connection}"] if connection else []
            for _ in range(2):
                client.send(("\r\n".join(lines) + "\r\n\r\n").encode())
                status, headers = client.head()
                assert status.endswith("200 OK"), (version, connection, status)
                fields = [v.lower() for v in header(headers, "Connection")]
                assert fields == ([expected] if expected else []), (version, connection)
                size = int(header(headers, "Content-Length")[0])
                client.exactly(size)
                if expected == "close":
                    assert client.until_close() == b""
                    break


def test_request_body_with_content_length(st: Stack) -> None:
    small = b"hello \x00\xff" * 100
    resp = requests.post(f"{st.url}/echo", data=small, timeout=TIMEOUT)
    assert resp.content == small
    big = os.urandom(3 * MIB + 5)  # above the buffering limit: streamed
    resp = requests.post(f"{st.url}/upload", data=big, timeout=TIMEOUT)
    assert resp.json() == {"sha256": hashlib.sha256(big).hexdigest(), "bytes": len(big)}


def test_chunked_request_body_is_sent_chunked(st: Stack) -> None:
    pieces = [os.urandom(n) for n in (1, 70000, 5, 300000)]
    resp = requests.post(f"{st.url}/upload", data=iter(pieces), timeout=TIMEOUT)
    whole = b"".join(pieces)
    assert resp.json() == {"sha256": hashlib.sha256(whole).hexdigest(), "bytes": len(whole)}
    seen = seen_headers(requests.post(f"{st.url}/headers", data=iter([b"x"]),
                                      timeout=TIMEOUT))
    assert seen["Transfer-Encoding"] == "chunked"


@pytest.mark.parametrize("size", [1000, 2 * MIB])
def test_expect_100_continue(st: Stack, size: int) -> None:
    body = os.urandom(size)
    with raw(st.port) as client:
        client.send(request("POST", "/upload", f"Content-Length: {size}",
                            "Expect: 100-continue"))
        assert client.head()[0] == "HTTP/1.1 100 Continue"
        client.send(body)
        status, headers = client.head()
        assert status == "HTTP/1.1 200 OK"
        result = json.loads(client.exactly(int(header(headers, "Content-Length")[0])))
        assert result == {"sha256": hashlib.sha256(body).hexdigest(), "bytes": size}
        # not forwarded: the upstream gets the body without being asked
        client.send(request("POST", "/headers", "Content-Length: 2", "Expect: 100-continue"))
        assert client.head()[0] == "HTTP/1.1 100 Continue"
        client.send(b"ab")
        _, headers = client.head()
        seen = json.loads(client.exactly(int(header(headers, "Content-Length")[0])))
        assert "Expect" not in seen["headers"]


def test_the_same_head_again_asks_for_100_continue_again(st: Stack) -> None:
    # The door keeps a keep-alive client's last parsed head for when the same bytes come
    # again; sending the 100 marks a head as answered, so such heads are never kept.
    with raw(st.port) as client:
        for _ in range(3):
            client.send(request("POST", "/headers", "Content-Length: 2",
                                "Expect: 100-continue"))
            assert client.head()[0] == "HTTP/1.1 100 Continue"
            client.send(b"ab")
            status, headers = client.head()
            assert status == "HTTP/1.1 200 OK"
            client.exactly(int(header(headers, "Content-Length")[0]))


@pytest.mark.parametrize("sse", [False, True])
def test_streamed_response_arrives_piece_by_piece(st: Stack, sse: bool) -> None:
    # The backend produces piece i only after /release was called i times, so reading
    # piece i before releasing the next proves it was not held back anywhere.
    key = f"gate-{sse}"
    with raw(st.port) as client:
        client.send(request("GET", f"/gate?key={key}&n=3&sse={int(sse)}"))
        status, headers = client.head()
        assert status == "HTTP/1.1 200 OK"
        assert header(headers, "Transfer-Encoding") == ["chunked"]
        if sse:
            assert header(headers, "Content-Type") == ["text/event-stream"]
        for i in range(3):
            if i:
                assert get(f"{st.backend}/release?key={key}").text == "released"
            expected = f"data: {i}\n\n" if sse else f"piece {i}\n"
            assert client.chunk() == expected.encode()
        assert client.chunk() == b""


def test_connection_is_pooled_and_reused(st: Stack) -> None:
    ports = {get(f"{st.url}/headers").json()["remote_port"] for _ in range(5)}
    assert len(ports) == 1
    if st.proc.name == "balancer":
        return  # the stand-in alone can show its pool's state
    # earlier tests may have left more idle connections, all to the one backend
    assert re.fullmatch(r"<HttpForwarder \[idle: [1-9]\d* over 1 endpoints\]>",
                        get(f"{st.url}/__forwarder__").text)


def test_client_abandoning_a_download_leaks_no_socket(st: Stack) -> None:
    get(f"{st.url}/whoami")
    fds = len(os.listdir(f"/proc/{st.proc.pid}/fd"))
    for _ in range(20):
        with raw(st.port) as client:
            client.send(request("GET", f"/download?size={64 * MIB}"))
            client.head()
            client.exactly(100000)
    # each abandoned download closed its upstream connection (it could not be reused)
    wait_until(lambda: len(os.listdir(f"/proc/{st.proc.pid}/fd")) <= fds,
               what="proxy fds back to their count before the downloads")
    assert get(f"{st.url}/whoami").text == "backend"


# --- failures ----------------------------------------------------------------------


def test_refused_endpoint_is_502() -> None:
    with refused_port() as dead, forward_only(f"http://127.0.0.1:{dead}") as (_, port):
        resp = get(f"http://127.0.0.1:{port}/whoami")
    assert resp.status_code == 502
    assert "connect failed" in resp.text


def test_silent_endpoint_is_504() -> None:
    with stack("--read-timeout", "0.5") as s:
        resp = get(f"{s.url}/slow?seconds=5")
        assert resp.status_code == 504
        assert "no response within 0.5s" in resp.text
        assert get(f"{s.url}/whoami").text == "backend"


def test_stale_pooled_connection_is_retried_on_a_new_one() -> None:
    current, bport = start_app("backend.py", "--name", "backend", name="backend")
    try:
        with forward_only(f"http://127.0.0.1:{bport}") as (proxy, pport):
            url = f"http://127.0.0.1:{pport}"
            for method in ("GET", "POST"):
                if current.poll() is not None:  # stopped by the round before
                    current = backend_again(bport, "backend")
                try:
                    first = requests.request(method, f"{url}/headers", data=b"x",
                                             timeout=TIMEOUT).json()["remote_port"]
                finally:
                    current.stop()
                # the backend is gone: the pooled connection to it is closed
                current = backend_again(bport, "second")
                try:
                    resp = requests.request(method, f"{url}/headers", data=b"x",
                                            timeout=TIMEOUT)
                    assert resp.status_code == 200, resp.text
                    assert resp.json()["name"] == "second"
                    assert resp.json()["remote_port"] != first
                finally:
                    current.stop()
            assert "Traceback" not in proxy.output()
    finally:
        current.stop()


# --- upstream misbehaviour, from a scripted server ------------------------------------


class ScriptedUpstream:
    """A real TCP server answering each request with the script for its path.

    A script that returns True keeps the connection: the next request on it is read
    and answered by its own script (a keep-alive endpoint, so the proxy may pool the
    connection). :attr:`seen` lists (connection number, path) of every request read,
    which shows whether two requests shared a connection. Request bodies are not read.
    """

    def __init__(self, scripts: dict[str, Callable[[socket.socket], bool | None]]) -> None:
        self.scripts = scripts
        self.seen: list[tuple[int, str]] = []
        self._numbers = itertools.count(1)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=accept_forever,
                                       args=(self.listener, self._serve), daemon=True)
        self.thread.start()

    def _serve(self, conn: socket.socket) -> None:
        number = next(self._numbers)
        with conn:
            conn.settimeout(TIMEOUT)
            buf = b""
            with contextlib.suppress(OSError):
                while True:
                    while b"\r\n\r\n" not in buf:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buf += data
                    head, buf = buf.split(b"\r\n\r\n", 1)
                    path = head.split(b" ", 2)[1].decode()
                    self.seen.append((number, path))
                    if not self.scripts[path](conn):
                        return

    def connection_of(self, path: str) -> int:
        """The connection that carried the last request for ``path``."""
        return [number for number, seen in self.seen if seen == path][-1]

    def close(self) -> None:
        self.listener.close()


RELEASE = threading.Event()


def _until_close(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst;")
    RELEASE.wait(TIMEOUT)
    conn.sendall(b"second")


SCRIPTS: dict[str, Callable[[socket.socket], bool | None]] = {
    "/until-close": _until_close,
    "/interim": lambda c: c.sendall(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    "/garbage": lambda c: c.sendall(b"SPDY/9 what\r\n\r\n"),
    # an app's "103 X" sent as its final answer (pywsgi did), the connection kept
    "/interim-then-body": lambda c: c.sendall(
        b"HTTP/1.1 103 X\r\nContent-Length: 10\r\n\r\nstatus 103") or True,
    "/closed": lambda c: None,
    "/http09": lambda c: c.sendall(b"<p>nine</p>"),
    "/cut-length": lambda c: c.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10),
    "/cut-chunked": lambda c: c.sendall(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n100\r\nabc"),
    "/chunked-extras": lambda c: c.sendall(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Sum: 1\r\n\r\n"),
    "/switch": lambda c: c.sendall(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"),
    "/bare-lf": lambda c: c.sendall(
        b"HTTP/1.1 200 OK\nContent-Length: 6\nX-A: 1\n\nab\r\n\r\n"),
    "/length-same-twice": lambda c: c.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\ncontent-length: 02\r\n\r\nok"),
    "/gzip-chunked": lambda c: c.sendall(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nGZZ\r\n0\r\n\r\n"),
    "/until-close-reset": lambda c: _then_reset(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"x" * 5000)(c),
    "/lf-then-crlf-end": lambda c: c.sendall(
        b"HTTP/1.1 200 OK\nContent-Length: 6\nX-A: 1\n\r\nab\r\n\r\n"),
    "/crlf-then-lf-end": lambda c: c.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-A: 1\r\n\nab\r\n\r\n"),
    "/one-bare-lf": lambda c: c.sendall(
        b"HTTP/1.1 200 OK\r\nX-A: 1\nContent-Length: 6\r\n\r\nab\r\n\r\n"),
    # to a HEAD: the length a GET would have had (RFC 9110 8.6 allows it on a 304)
    "/no-content-with-length": lambda c: c.sendall(
        b"HTTP/1.1 204 No Content\r\nContent-Length: 11\r\n\r\n"),
    "/not-modified-with-length": lambda c: c.sendall(
        b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 11\r\n\r\n"),
    # a whole head of 70 KB, past the 64 KiB limit, its end in the second read
    "/head-70k": lambda c: c.sendall(
        b"HTTP/1.1 200 OK\r\n" + (b"X-Big: " + b"a" * 1400 + b"\r\n") * 50
        + b"Content-Length: 2\r\n\r\nok"),
}


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[ScriptedUpstream, Proc, str]]:
    upstream = ScriptedUpstream(SCRIPTS)
    try:
        with forward_only(upstream.url) as (proxy, port):
            yield upstream, proxy, f"http://127.0.0.1:{port}"
    finally:
        upstream.close()


def test_a_response_head_past_64_kib_is_502(scripted) -> None:
    """The head limit held only while the head had not ended: a 70 KB head whose end
    came in the second read was passed on whole (the door refuses it, as the forwarder
    says it does)."""
    _, proxy, url = scripted
    resp = get(f"{url}/head-70k")
    assert resp.status_code == 502, (resp.status_code, len(resp.headers.get("X-Big", "")))
    assert "larger than" in resp.text
    assert "Traceback" not in proxy.output()


def test_until_close_response_streams_and_ends(scripted) -> None:
    _, _, url = scripted
    RELEASE.clear()
    with raw(int(url.rsplit(":", 1)[1])) as client:
        client.send(request("GET", "/until-close"))
        status, headers = client.head()
        assert status == "HTTP/1.1 200 OK"
        assert header(headers, "Transfer-Encoding") == ["chunked"]  # pywsgi frames it
        assert client.chunk() == b"first;"  # arrives before the rest exists
        RELEASE.set()
        assert client.chunk() == b"second"
        assert client.chunk() == b""


def test_interim_responses_are_skipped(scripted) -> None:
    resp = get(f"{scripted[2]}/interim")
    assert (resp.status_code, resp.text) == (200, "ok")


@pytest.mark.parametrize("path", ["/bare-lf", "/lf-then-crlf-end", "/crlf-then-lf-end",
                                  "/one-bare-lf"])
def test_bare_lf_response_head_is_tolerated(scripted, path: str) -> None:
    """Bare LF line ends, all of them or some (RFC 9112 2.2), as behind the door."""
    resp = get(f"{scripted[2]}{path}")
    assert (resp.status_code, resp.content, resp.headers["X-A"]) == (200, b"ab\r\n\r\n", "1")


def test_chunk_extensions_and_trailers_are_handled(scripted) -> None:
    resp = get(f"{scripted[2]}/chunked-extras")
    assert (resp.status_code, resp.text) == (200, "hello world")
    assert "Trailer" not in resp.headers


@pytest.mark.parametrize("path, status", [("/no-content-with-length", "204 No Content"),
                                          ("/not-modified-with-length", "304 Not Modified")])
def test_a_head_answered_204_or_304_with_a_length_is_passed_on(scripted, path: str,
                                                               status: str) -> None:
    """pywsgi refuses a non-zero Content-Length on a 204 or 304 from the app: the length
    a HEAD's 204 or 304 came with was passed to it, and the client got a 500 (and the
    log a traceback) for an answer the front door passes on."""
    upstream, proxy, url = scripted
    with raw(int(url.rsplit(":", 1)[1])) as client:
        client.send(request("HEAD", path))
        first, headers = client.head()
        assert first == f"HTTP/1.1 {status}", (first, headers)
        assert header(headers, "Content-Length") == []
        client.send(request("GET", "/interim"))  # the connection still frames answers
        assert client.head()[0] == "HTTP/1.1 200 OK"
        assert client.exactly(2) == b"ok"
    assert "Traceback" not in proxy.output()


@pytest.mark.parametrize("path", ["/garbage", "/closed", "/switch", "/gzip-chunked"])
def test_garbled_or_closed_exchange_is_502(scripted, path: str) -> None:
    """As at the front door: 'gzip, chunked' was de-chunked and the gzip bytes passed on
    as the content itself (the client's TE is not passed on: no coding was asked for)."""
    resp = get(f"{scripted[2]}{path}")
    assert resp.status_code == 502


def test_bytes_that_begin_no_status_line_are_a_prompt_502_through_the_forwarder(
        scripted) -> None:
    """A body after an interim answer, on a kept connection: the forwarder waited for
    a head until its read timeout (300 s here), the client with it."""
    started = time.monotonic()
    resp = get(f"{scripted[2]}/interim-then-body", timeout=10)
    assert resp.status_code == 502 and "b'status 103'" in resp.text, resp.text
    assert time.monotonic() - started < 2


def test_an_answer_with_no_head_says_what_came_through_the_forwarder(scripted) -> None:
    """As at the front door (test_an_answer_with_no_head_says_what_came)."""
    resp = get(f"{scripted[2]}/http09")
    assert resp.status_code == 502
    assert "after 11 bytes and no response head: b'<p>nine</p>'" in resp.text, resp.text


@pytest.mark.parametrize("path", ["/cut-length", "/cut-chunked"])
def test_body_cut_midway_aborts_the_client_connection(scripted, path: str) -> None:
    upstream, proxy, url = scripted
    line = f"{upstream.url}: response body"
    before = proxy.output().count(line)
    with raw(int(url.rsplit(":", 1)[1])) as client:
        client.send(request("GET", path))
        status, _ = client.head()
        assert status == "HTTP/1.1 200 OK"
        with pytest.raises(ConnectionResetError):  # reset by the proxy, not left hanging
            client.until_close()
        rest = client.buf
    assert b"0\r\n\r\n" not in rest  # no terminating chunk: the client knows it is cut
    assert len(rest) < 1000
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        get(f"{url}{path}").content  # noqa: B018
    # one warning line per cut body, naming the endpoint, and no traceback
    wait_until(lambda: proxy.output().count(line) >= before + 2, what="the warnings")
    assert proxy.output().count(line) == before + 2
    assert "Traceback" not in proxy.output()


# --- the same misbehaviour behind the front door (cluster serve, balancer only) ----------


def _switch_and_wait(conn: socket.socket) -> None:
    """A 101 to a request that asked for no upgrade, on a connection left open."""
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
    with contextlib.suppress(OSError):
        conn.recv(1)  # until the proxy closes (or TIMEOUT)


def _answer(data: bytes, keep: bool = True) -> Callable[[socket.socket], bool]:
    """A script that sends ``data`` and keeps the connection (``keep``) for the next one."""
    def script(conn: socket.socket) -> bool:
        conn.sendall(data)
        return keep
    return script


#: Set once _then_late has sent its late bytes.
LATE = threading.Event()
SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"


def _then_late(data: bytes) -> Callable[[socket.socket], bool]:
    """``data``, then, once the proxy has had time to take the answer as complete, a
    response nobody asked for, on a connection kept open."""
    def script(conn: socket.socket) -> bool:
        conn.sendall(data)
        time.sleep(0.05)
        conn.sendall(SMUGGLED)
        LATE.set()
        return True
    return script


def _early_refusal(conn: socket.socket) -> None:
    """Answer at once, without reading the request body, and reset the connection."""
    conn.sendall(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\n\r\ntoo big\n")
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _trickle(conn: socket.socket) -> None:
    """A response head one byte at a time, each well within the read timeout (2 s)."""
    with contextlib.suppress(OSError):
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"x" * 60:
            conn.sendall(bytes([byte]))
            time.sleep(0.2)


def _endless_interim(conn: socket.socket) -> None:
    """103 Early Hints, again and again, and never a final answer."""
    with contextlib.suppress(OSError):
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" * 50)


_REASONS = itertools.count()


def _long_reason(conn: socket.socket) -> bool:
    """A status line of 60 kB, with a reason never sent before (a request id in it)."""
    reason = b"%08d" % next(_REASONS) + b"r" * 60_000
    conn.sendall(b"HTTP/1.1 200 " + reason + b"\r\nContent-Length: 2\r\n\r\nok")
    return True


def _huge_head(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 500_000)  # 4 MB


def _then_reset(data: bytes) -> Callable[[socket.socket], None]:
    """``data`` (an answer begun), then, once it has been relayed, a reset."""
    def script(conn: socket.socket) -> None:
        conn.sendall(data)
        time.sleep(0.2)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return script


def _info_cut(conn: socket.socket) -> None:
    """A SockJS info answer reset in the middle of its body."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"websocket\": true")
    time.sleep(0.1)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


DOOR_SCRIPTS: dict[str, Callable[[socket.socket], bool | None]] = {
    "/switch-kept": _switch_and_wait,
    "/closed": lambda c: None,  # the request read, the connection closed unanswered
    "/http09": lambda c: c.sendall(b"<p>nine</p>"),  # an HTTP/0.9 answer: no head, closed
    "/garbled-chunk": lambda c: c.sendall(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
    "/gzip-chunked": lambda c: c.sendall(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nGZZ\r\n0\r\n\r\n"),
    "/gzip-only": lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nGZZ"),
    "/chunked-twice": lambda c: c.sendall(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n"),
    "/chunked": lambda c: c.sendall(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
    # malformed heads and framing: 502 (RFC 9112 6.3, 5.2; RFC 9110 15)
    "/length-twice": _answer(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\n"
                             b"hello"),
    "/length-list": _answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello"),
    "/length-plus": _answer(b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello"),
    "/length-hex": _answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0x5\r\n\r\nhello"),
    "/length-empty": _answer(b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\nhello"),
    "/nul": _answer(b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok"),
    "/bare-cr": _answer(b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 2\r\n\r\nok"),
    "/obs-fold": _answer(b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok"),
    "/status-99": _answer(b"HTTP/1.1 99 X\r\nContent-Length: 2\r\n\r\nok"),
    # an app's "103 X" sent as its final answer (pywsgi did), the connection kept
    "/interim-then-body": _answer(b"HTTP/1.1 103 X\r\nContent-Type: text/plain\r\n"
                                  b"Content-Length: 10\r\n\r\nstatus 103"),
    "/not-http-kept": _answer(b"<html>no status line</html>"),
    "/status-1000": _answer(b"HTTP/1.1 1000 X\r\nContent-Length: 2\r\n\r\nok"),
    "/status-abc": _answer(b"HTTP/1.1 abc X\r\nContent-Length: 2\r\n\r\nok"),
    "/chunk-overflow": _answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"ffffffffffffffff1\r\nabc\r\n0\r\n\r\n"),
    "/huge-head": _huge_head,
    "/sockjs/info": _info_cut,
    "/until-close-reset": _then_reset(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"
                                      + b"x" * 5000),
    "/chunked-reset": _then_reset(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"1388\r\n" + b"x" * 5000 + b"\r\n"),
    "/many-fields": _answer(b"HTTP/1.1 200 OK\r\n" + b"".join(
        b"X-F%d: v\r\n" % i for i in range(3000)) + b"Content-Length: 2\r\n\r\nok"),
    "/endless-interim": _endless_interim,
    "/trickle": _trickle,
    "/early": _early_refusal,
    # answers passed on
    "/next": _answer(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"),
    "/long-reason": _long_reason,
    "/passed-on": _answer(
        b"HTTP/1.1 200\r\nX-Obs: caf\xe9 \xff\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2, c=3\r\n"
        b"Connection: X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\n"
        b"Content-Length: 2\r\n\r\nok"),
    "/interim": _answer(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n"
                        b"Link: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    "/length-same-twice": _answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\n"
                                  b"content-length: 02\r\n\r\nok"),
    "/named-length": _answer(b"HTTP/1.1 200 OK\r\nConnection: Content-Length, X-Named\r\n"
                             b"X-Named: 1\r\nContent-Length: 5\r\n\r\nhello"),
    "/bare-lf": _answer(b"HTTP/1.1 200 OK\nContent-Length: 2\nX-A: 1\n\nok"),
    "/bare-lf-crlf-body": _answer(b"HTTP/1.1 200 OK\nContent-Length: 6\nX-A: 1\n\nab\r\n\r\n"),
    "/lf-then-crlf-end": _answer(b"HTTP/1.1 200 OK\nContent-Length: 2\nX-A: 1\n\r\nok"),
    "/crlf-then-lf-end": _answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\n\nok"),
    "/one-bare-lf": _answer(b"HTTP/1.1 200 OK\r\nX-A: 1\nContent-Length: 2\r\n\r\nok"),
    "/bare-lf-interim": _answer(b"HTTP/1.1 100 Continue\n\nHTTP/1.1 200 OK\nContent-Length: 2"
                                b"\nX-A: 1\n\nok"),
    "/interim-then-bare-lf": _answer(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
                                     b"HTTP/1.1 200 OK\nContent-Length: 2\nX-A: 1\n\nok"),
    "/h2c-switch": _answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n"
                           b"Connection: Upgrade\r\n\r\n"),
    "/ws-frames": _answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\n\r\n\x81\x05hello", keep=False),
    # bytes past a complete answer, or a connection that must not carry another one
    "/excess-length": _answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" + SMUGGLED),
    "/excess-late": _then_late(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
    "/excess-chunked": _answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"5\r\nhello\r\n0\r\n\r\n" + SMUGGLED),
    "/excess-204": _answer(b"HTTP/1.1 204 No Content\r\nContent-Length: 8\r\n\r\nsmuggled"),
    "/excess-head": _answer(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"),
    "/length-and-chunked": _answer(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    "/upstream-close": _answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
                               b"Content-Length: 5\r\n\r\nhello"),  # yet kept open
}


@contextlib.contextmanager
def scripted_balancer(scripts: dict[str, Callable[[socket.socket], bool | None]],
                      folder: Path, *extra: str
                      ) -> Iterator[tuple[Proc, int, ScriptedUpstream]]:
    """A balancer-only `cluster serve` (with ``extra`` settings) whose one endpoint is a
    ScriptedUpstream of ``scripts`` (put in its store in ``folder`` by a `cluster
    register` sidecar); no traceback in its log when it stops."""
    upstream = ScriptedUpstream(scripts)
    env = {"CLUSTER_DISCOVERY_URL": f"sqlite://{folder / 'discovery.sqlite3'}"}
    try:
        with running(cluster_argv("register", "--service", "web", "--endpoint-url",
                                  upstream.url, "--ping-interval", "1"), env=env):
            proc, port = start_serve("--ui-service", "web", "--ping-interval", "1",
                                     *extra, env=env, name="balancer")
            try:
                wait_until(lambda: get(f"http://127.0.0.1:{port}/_cluster/status")
                           .json()["endpoints"], timeout=TIMEOUT, what="endpoint registered")
                yield proc, port, upstream
            finally:
                proc.stop()
            assert "Traceback" not in proc.output()
    finally:
        upstream.close()


@pytest.fixture(scope="module")
def scripted_door(tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[tuple[Proc, int, ScriptedUpstream]]:
    """:func:`scripted_balancer` with DOOR_SCRIPTS and a read timeout of 2 s."""
    with scripted_balancer(DOOR_SCRIPTS, tmp_path_factory.mktemp("scripted"),
                           "--read-timeout", "2") as door:
        yield door


@pytest.mark.parametrize("path", [
    "/switch-kept", "/garbled-chunk", "/gzip-chunked", "/gzip-only", "/chunked-twice",
    "/length-twice", "/length-list", "/length-plus", "/length-hex", "/length-empty", "/nul",
    "/bare-cr", "/obs-fold", "/status-99", "/status-1000", "/status-abc", "/chunk-overflow",
    "/huge-head", "/many-fields", "/endless-interim", "/closed", "/interim-then-body",
    "/not-http-kept"])
def test_an_endpoints_wrong_answer_is_a_prompt_502(scripted_door, path: str) -> None:
    """A 101 nobody asked for is not an interim answer to wait past (RFC 9110 15.2.2),
    and a chunked body garbled from its first byte is the endpoint's fault: 502 at
    once, not a wait for the read timeout or a misleading 503 "no live endpoint". So is
    a transfer coding other than one chunked: the client's TE is not passed on, so none
    was asked for (RFC 9110 10.1.4); 'gzip, chunked' went out as plain chunked, the
    gzip bytes as content. So are a Content-Length that is not one number, a head a
    field parser could read two ways (NUL, bare CR, obs-fold), a status outside three
    digits, a head past 64 KiB or with thousands of fields, and interim answers that
    never end: each with the balancer's memory unchanged, and the next request served.
    So are bytes that cannot begin a status line, after an interim answer or instead of
    any, on a kept connection (the balancer waited for a head until its read timeout).
    So is a connection closed unanswered when no other endpoint is left to replay on
    (it was a 503 "no live endpoint", although the endpoint was up)."""
    proc, port, _ = scripted_door
    before = rss_kib(proc.pid)
    started = time.monotonic()
    resp = requests.get(f"http://127.0.0.1:{port}{path}", timeout=10)
    assert resp.status_code == 502, (resp.status_code, resp.text)
    assert time.monotonic() - started < 1.5
    assert rss_kib(proc.pid) - before < 4096
    assert requests.get(f"http://127.0.0.1:{port}/next", timeout=10).text == "next"


def test_an_answer_with_no_head_says_what_came(scripted_door) -> None:
    """An HTTP/0.9 answer (or another protocol's) then a close: a 502 that says how
    many bytes came and what they began with, as for a malformed head. It said "closed
    the connection before answering", which sent the operator looking for a crash."""
    proc, port, upstream = scripted_door
    resp = requests.get(f"http://127.0.0.1:{port}/http09", timeout=10)
    assert resp.status_code == 502
    assert "after 11 bytes and no response head: b'<p>nine</p>'" in resp.text, resp.text


def test_a_wrong_answer_with_no_other_endpoint_is_one_line_and_no_retry(scripted_door
                                                                        ) -> None:
    """A GET whose only endpoint answered wrongly may go to another endpoint, but there
    is none: the log says what went wrong once, and no retry is counted. It also said
    "...; trying another endpoint" (untrue) and counted a retry in
    cluster_retries_total that never happened."""
    proc, port, upstream = scripted_door
    start = len(proc.output())
    resp = requests.get(f"http://127.0.0.1:{port}/status-abc", timeout=10)
    assert resp.status_code == 502
    assert requests.get(f"http://127.0.0.1:{port}/next", timeout=10).text == "next"
    lines = wait_until(lambda: [line for line in proc.output()[start:].splitlines()
                                if upstream.url in line], what="the warning")
    time.sleep(0.2)  # a second line would be there by now
    lines = [line for line in proc.output()[start:].splitlines() if upstream.url in line]
    assert len(lines) == 1 and "GET /status-abc: " in lines[0], lines
    assert "trying another endpoint" not in lines[0]
    metrics = requests.get(f"http://127.0.0.1:{port}/_cluster/metrics", timeout=10).text
    assert not [line for line in metrics.splitlines()
                if line.startswith("cluster_retries_total{") and upstream.url in line]
    # the 502 is the endpoint's (as for a POST, which may not be replayed)
    assert f'cluster_requests_total{{code="5xx",endpoint="{upstream.url}",service="web"}}' \
        in metrics


def test_a_503_after_the_only_endpoint_refused_is_the_balancers_own(tmp_path: Path) -> None:
    """No endpoint could be reached: the 503 is the balancer's own answer ("-" in the
    access log and the metrics, as the README says), with the ejection as its one line."""
    env = {"CLUSTER_DISCOVERY_URL": f"sqlite://{tmp_path / 'discovery.sqlite3'}"}
    with refused_port() as dead, running(cluster_argv(
            "register", "--service", "web", "--endpoint-url", f"http://127.0.0.1:{dead}",
            "--ping-interval", "1"), env=env):
        proc, port = start_serve("--ui-service", "web", "--ping-interval", "1", env=env,
                                 name="balancer")
        try:
            wait_until(lambda: get(f"http://127.0.0.1:{port}/_cluster/status")
                       .json()["endpoints"], timeout=TIMEOUT, what="endpoint registered")
            assert requests.get(f"http://127.0.0.1:{port}/x", timeout=TIMEOUT).status_code == 503
            line = 'cluster_requests_total{code="5xx",endpoint="-",service=""} 1.0'
            wait_until(lambda: line in get(f"http://127.0.0.1:{port}/_cluster/metrics").text,
                       timeout=5, what="the 503 counted as the balancer's")
            lines = [line for line in proc.output().splitlines()
                     if str(dead) in line and "WARNING" in line]
            assert len(lines) == 1 and "ejecting" in lines[0], lines
        finally:
            proc.stop()


@pytest.mark.parametrize("path, via", [("/until-close-reset", "door"),
                                       ("/chunked-reset", "door"),
                                       ("/until-close-reset", "cluster.wrap()")])
def test_an_answer_cut_short_never_looks_complete(scripted_door, scripted, path: str,
                                                  via: str) -> None:
    """An endpoint that resets in the middle of a body whose end is the end of the
    connection (its own until-close answer; a chunked one relayed to an HTTP/1.0 client,
    which gets it unchunked) has the client connection reset too, not closed: ended by
    a FIN, the cut body was whole as far as the client could tell, and requests and
    curl took a broken download for a good one (talking to the endpoint itself, they
    report the reset). Behind the door, and behind the WSGI adapter under
    ClusterHandler (for its HTTP/1.0 clients: HTTP/1.1 ones get chunks from pywsgi)."""
    port = scripted_door[1] if via == "door" else int(scripted[2].rsplit(":", 1)[1])
    url = f"http://127.0.0.1:{port}{path}"
    if path == "/until-close-reset":
        with pytest.raises(requests.exceptions.ChunkedEncodingError, match="reset"):
            requests.get(url, timeout=TIMEOUT).content  # noqa: B018
    for version in ("HTTP/1.1", "HTTP/1.0"):
        with raw(port) as client:
            client.send(f"GET {path} {version}\r\nHost: x\r\n\r\n".encode())
            status, _ = client.head()
            assert status == "HTTP/1.1 200 OK"
            with pytest.raises(ConnectionResetError):
                client.until_close()
    if via == "door":
        assert requests.get(f"http://127.0.0.1:{port}/next", timeout=TIMEOUT).text == "next"


def test_a_sockjs_info_answer_cut_short_is_a_502(scripted_door) -> None:
    """The balancer reads an endpoint's SockJS info whole before it answers (it rewrites
    ``base_url``): an endpoint that resets in the middle of that body has sent the
    client nothing yet, so the client gets a 502, as from cluster.wrap(). It got its
    connection closed without a byte, which sockjs-client and curl report as a network
    failure, not as the endpoint's."""
    proc, port, upstream = scripted_door
    line = f"GET /sockjs/info: {upstream.url}: response body cut"
    before = proc.output().count(line)
    with raw(port) as client:
        client.send(request("GET", "/sockjs/info"))
        status, headers = client.head()
        assert status == "HTTP/1.1 502 Bad Gateway"
        assert read_body(client, headers).startswith(b"upstream response body cut")
    assert requests.get(f"http://127.0.0.1:{port}/next", timeout=10).text == "next"
    wait_until(lambda: proc.output().count(line) > before, what="the warning")
    assert proc.output().count(line) == before + 1


@pytest.mark.parametrize("method, upgrade", [("GET", "h2c"), ("POST", "websocket")])
def test_a_101_to_an_upgrade_not_passed_on_is_a_502(scripted_door, method: str,
                                                    upgrade: str) -> None:
    """Only a WebSocket upgrade (a GET without a body) reaches the endpoint with its
    Upgrade field: a 101 to any other request answers a question nobody put to it.
    Passed on, the client would switch protocols on a connection the balancer still
    reads as HTTP/1.1, and the switched endpoint connection would be pooled."""
    _, port, _ = scripted_door
    with raw(port) as client:
        client.send(request(method, "/h2c-switch", f"Upgrade: {upgrade}",
                            "Connection: Upgrade", "Content-Length: 0"))
        assert client.head()[0] == "HTTP/1.1 502 Bad Gateway"


def test_plain_chunked_answers_pass_on_one_connection(scripted_door) -> None:
    _, port, _ = scripted_door
    with raw(port) as client:
        for _ in range(2):
            client.send(request("GET", "/chunked"))
            status, headers = client.head()
            assert status == "HTTP/1.1 200 OK"
            assert header(headers, "Transfer-Encoding") == ["chunked"]
            assert client.chunk() == b"abc" and client.chunk() == b""


def read_body(client: Raw, headers: list[tuple[str, str]], method: str = "GET") -> bytes:
    """The body of a response whose head ``client`` just read."""
    if method == "HEAD":
        return b""
    if header(headers, "Transfer-Encoding") == ["chunked"]:
        return b"".join(iter(client.chunk, b""))
    length = header(headers, "Content-Length")
    return client.exactly(int(length[0])) if length else b""  # b"": a 204


@pytest.mark.parametrize("path, method, reused", [
    ("/next", "GET", True),  # the control: a clean answer's connection is pooled
    ("/excess-length", "GET", False), ("/excess-late", "GET", False),
    ("/excess-chunked", "GET", False), ("/excess-204", "GET", False),
    ("/excess-head", "HEAD", False), ("/length-and-chunked", "GET", False),
    ("/upstream-close", "GET", False)])
def test_bytes_past_an_answer_never_reach_the_next_client(scripted_door, path: str,
                                                          method: str, reused: bool) -> None:
    """Bytes an endpoint sends past the end of its answer (more than its Content-Length,
    a second response nobody asked for, a body after a 204 or a HEAD), now or a moment
    later, would be read as the answer to whatever request next uses that pooled
    connection: another client's. Such a connection is never pooled, nor one whose
    framing was in doubt (Content-Length with Transfer-Encoding, RFC 9112 6.3) or that
    the endpoint said it would close."""
    _, port, upstream = scripted_door
    LATE.clear()
    with raw(port) as first:
        first.send(request(method, path))
        status, headers = first.head()
        assert status.startswith("HTTP/1.1 2"), status
        assert read_body(first, headers, method) in (b"hello", b"next", b"")
        assert not header(headers, "Content-Length") or not header(headers,
                                                                   "Transfer-Encoding")
        first_connection = upstream.connection_of(path)
    if path == "/excess-late":
        assert LATE.wait(TIMEOUT)
        time.sleep(0.1)  # on its way over loopback
    with raw(port) as second:  # another client, to the same endpoint
        second.send(request("GET", "/next"))
        status, headers = second.head()
        assert (status, read_body(second, headers)) == ("HTTP/1.1 200 OK", b"next")
    assert (upstream.connection_of("/next") == first_connection) is reused


@pytest.mark.parametrize("chunked", [False, True])
def test_an_early_answer_ends_the_client_connection(scripted_door, chunked: bool) -> None:
    """An endpoint that answers before reading the whole request body (a 413) and
    resets: the answer reaches the client, and the client connection ends there. The
    rest of that body must never be read as requests of their own: a front proxy that
    sent it as one body would see them answered (request smuggling)."""
    _, port, upstream = scripted_door
    smuggled = request("GET", "/next") * 3
    if chunked:
        head = request("POST", "/early", "Transfer-Encoding: chunked")
        first = b"%x\r\n" % (10 + len(smuggled)) + b"b" * 10
        tail = smuggled + b"\r\n0\r\n\r\n"
    else:
        head = request("POST", "/early", f"Content-Length: {10 + len(smuggled)}")
        first, tail = b"b" * 10, smuggled
    before = len(upstream.seen)
    with raw(port) as client:
        client.send(head)  # the body is streamed: none of it came with the head
        wait_until(lambda: len(upstream.seen) > before, what="the endpoint answered")
        time.sleep(0.2)  # the answer and the reset reach the balancer
        client.send(first)  # its relay to the endpoint fails: the early answer is read
        status, headers = client.head()
        assert status == "HTTP/1.1 413 Content Too Large"
        assert header(headers, "Connection") == ["close"]
        assert client.exactly(8) == b"too big\n"
        rest = b""
        with contextlib.suppress(OSError):
            client.send(tail)
            rest = client.until_close()
    assert rest == b""
    assert [path for _, path in upstream.seen[before:]] == ["/early"]


def test_a_client_that_gives_up_frees_the_endpoint_at_once(tmp_path: Path) -> None:
    """A client that closes its connection while the balancer waits for the endpoint
    (it gave up: a timeout of its own, a user leaving the page) has the endpoint
    connection closed too, within a second or so, as nginx does (its 499): the request
    is neither answered, nor replayed on another endpoint, nor blamed on the endpoint in
    the log. Both connections used to be held until the read timeout (5 minutes by
    default), so a client that gave up and retried stacked request after request on an
    endpoint that was stuck. The metrics count it as a 499, as nginx's access log does:
    it was a status 0, an error of the endpoint's on the dashboard."""
    closed: list[float] = []

    def hold(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass
        closed.append(time.monotonic())

    scripts = {"/hold": hold, "/next": _answer(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n"
                                               b"\r\nnext")}
    with scripted_balancer(scripts, tmp_path, "--read-timeout", "60") as (proc, port,
                                                                          upstream):
        url = f"http://127.0.0.1:{port}"
        for round_, method in enumerate(("GET", "POST"), 1):
            with pytest.raises(requests.exceptions.ReadTimeout):
                requests.request(method, f"{url}/hold", data=b"x" if method == "POST"
                                 else None, timeout=0.5)
            gave_up = time.monotonic()
            wait_until(lambda n=round_: len(closed) == n, timeout=TIMEOUT,
                       what="the endpoint connection closed")
            assert closed[-1] - gave_up < 3
        assert [path for _, path in upstream.seen] == ["/hold", "/hold"]
        assert requests.get(f"{url}/next", timeout=TIMEOUT).text == "next"
        assert upstream.url not in "".join(line for line in proc.output().splitlines()
                                           if "WARNING" in line)
        # counted as nginx counts them (499), not as failures of a healthy endpoint
        metrics = get(f"{url}/_cluster/metrics").text
        assert f'cluster_requests_total{{code="4xx",endpoint="{upstream.url}",' \
               f'service="web"}} 2.0' in metrics, metrics
        assert 'code="none"' not in metrics
        traffic = get(f"{url}/_cluster/status").json()["endpoints"][0]["traffic"]
        assert traffic["errors"] == 0, traffic


def test_a_response_head_trickled_in_is_bounded_by_the_read_timeout(scripted_door) -> None:
    """The read timeout bounds the wait for a whole response head, not each read of
    it: an endpoint sending its head a byte every 0.2 s never stays silent for 2 s, yet
    the client gets its 504 after 2 s, not when (if ever) the head is complete."""
    _, port, _ = scripted_door
    started = time.monotonic()
    resp = requests.get(f"http://127.0.0.1:{port}/trickle", timeout=10)
    assert resp.status_code == 504, (resp.status_code, resp.text)
    assert 1.5 < time.monotonic() - started < 5


@pytest.mark.parametrize("path, body", [("/bare-lf", b"ok"),
                                        ("/bare-lf-crlf-body", b"ab\r\n\r\n"),
                                        ("/lf-then-crlf-end", b"ok"),
                                        ("/crlf-then-lf-end", b"ok"), ("/one-bare-lf", b"ok"),
                                        ("/bare-lf-interim", b"ok"),
                                        ("/interim-then-bare-lf", b"ok")])
def test_bare_lf_response_heads_are_tolerated_behind_the_door(scripted_door, path: str,
                                                             body: bytes) -> None:
    """RFC 9112 2.2 lets a recipient take a bare LF for a line end; the README promises
    it for endpoints' answers. On a kept connection nothing but the head's end says
    where the head stops: looking for CRLF CRLF alone waited for the read timeout. So
    did a head of LF lines ended by an empty CRLF line (a 504 after the read timeout,
    5 minutes by default); a CRLF head ended by an empty LF line, or with one LF line
    among the others, was a 502. curl and requests read each of them. So did a bare-LF
    final head that came in the same read as an interim answer before it (100, 103):
    it was looked for only after another read, and none came."""
    _, port, _ = scripted_door
    with raw(port) as client:
        for _ in range(2):
            client.send(request("GET", path))
            status, headers = client.head()
            assert status == "HTTP/1.1 200 OK"
            assert header(headers, "X-A") == ["1"]
            assert read_body(client, headers) == body


def test_new_long_status_lines_are_not_kept(scripted_door) -> None:
    """The balancer remembers status lines it parsed (endpoints send few distinct ones);
    an endpoint that sends a new 60 kB reason phrase each time must not make it keep
    them: 300 such answers once grew it by 14 MB for good."""
    proc, port, _ = scripted_door
    with raw(port) as client:
        client.send(request("GET", "/long-reason"))  # the first: buffers of that size
        assert client.head()[0].startswith("HTTP/1.1 200 ") and client.exactly(2) == b"ok"
        before = rss_kib(proc.pid)
        for _ in range(300):
            client.send(request("GET", "/long-reason"))
            status, headers = client.head()
            assert len(status) > 60_000 and client.exactly(2) == b"ok"
    assert rss_kib(proc.pid) - before < 4096


def test_what_an_endpoint_sends_is_passed_on_as_it_should(scripted_door) -> None:
    """Interim answers stay here, for HTTP/1.1 and HTTP/1.0 clients alike. A status
    line without a reason gets the standard one; obs-text in a value and
    each Set-Cookie line pass as they came; fields the endpoint named in Connection,
    Keep-Alive and Connection itself do not, but for a Content-Length named there
    (passed on with it, the client would read the next answer as this one's body); a
    101 to an upgrade passes with the frames that came with it."""
    _, port, _ = scripted_door
    with raw(port) as client:
        client.send(request("GET", "/passed-on"))
        status, headers = client.head()
        assert status == "HTTP/1.1 200 OK"
        assert read_body(client, headers) == b"ok"
    assert header(headers, "X-Obs") == ["caf\xe9 \xff"]
    assert [c for c in header(headers, "Set-Cookie")
            if not c.startswith("cluster-endpoint::")] == ["a=1", "b=2, c=3"]
    assert not {"x-secret", "keep-alive", "connection"} & {k.lower() for k, _ in headers}
    for version in ("HTTP/1.1", "HTTP/1.0"):  # interim answers are not passed on
        with raw(port) as client:
            client.send(f"GET /interim {version}\r\nHost: x\r\n\r\n".encode())
            status, headers = client.head()
            assert (status, read_body(client, headers)) == ("HTTP/1.1 200 OK", b"ok")
            if version == "HTTP/1.0":
                assert client.until_close() == b""  # nothing else, then closed
    with raw(port) as client:  # Content-Length is never hop-by-hop, even when named so
        client.send(request("GET", "/named-length"))
        status, headers = client.head()
        assert (header(headers, "Content-Length"), header(headers, "X-Named")) == (["5"], [])
        assert client.exactly(5) == b"hello"
        client.send(request("GET", "/next"))  # the same connection carries another answer
        status, headers = client.head()
        assert (status, read_body(client, headers)) == ("HTTP/1.1 200 OK", b"next")
    with raw(port) as client:
        client.send(request("GET", "/ws-frames", "Upgrade: websocket", "Connection: Upgrade",
                            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                            "Sec-WebSocket-Version: 13"))
        assert client.head()[0] == "HTTP/1.1 101 Switching Protocols"
        assert client.until_close() == b"\x81\x05hello"


NODE_GET = """
require('http').get(process.argv[1], res => {
  let body = '';
  res.on('data', d => { body += d; });
  res.on('end', () => console.log(JSON.stringify({status: res.statusCode, body})));
}).on('error', e => console.log(JSON.stringify({error: e.message})));
"""


def test_a_content_length_sent_twice_alike_is_passed_on_once(scripted_door,
                                                             scripted) -> None:
    """Two Content-Length lines with the same value are one length (RFC 9110 8.6), and
    passed on as one: with both, Node's http client (llhttp) refused the whole answer
    ("Duplicate Content-Length"), so a Node service behind the balancer failed on an
    answer curl and requests read. Behind the door and the WSGI adapter alike; the
    door's client connection then carries another request."""
    _, port, _ = scripted_door
    with raw(port) as client:
        client.send(request("GET", "/length-same-twice"))
        status, headers = client.head()
        assert (status, header(headers, "Content-Length")) == ("HTTP/1.1 200 OK", ["2"])
        assert (client.exactly(2), header(headers, "X-A")) == (b"ok", ["1"])
        client.send(request("GET", "/next"))
        status, headers = client.head()
        assert (status, read_body(client, headers)) == ("HTTP/1.1 200 OK", b"next")
    with raw(int(scripted[2].rsplit(":", 1)[1])) as client:
        client.send(request("GET", "/length-same-twice"))
        status, headers = client.head()
        assert (status, header(headers, "Content-Length")) == ("HTTP/1.1 200 OK", ["2"])
        assert client.exactly(2) == b"ok"
    if not shutil.which("node"):
        pytest.fail("node is missing: scripts/run-tests installs it")
    done = subprocess.run(["node", "-e", NODE_GET, f"http://127.0.0.1:{port}/length-same-twice"],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert json.loads(done.stdout) == {"status": 200, "body": "ok"}, done.stdout + done.stderr


# --- large transfers and memory ------------------------------------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@contextlib.contextmanager
def peak_rss(pid: int) -> Iterator[list[int]]:
    """Samples the RSS of ``pid`` while the block runs; yields [baseline, peak]."""
    result = [rss_kib(pid), 0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            result[1] = max(result[1], rss_kib(pid))
            done.wait(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()
        result[1] = max(result[1], rss_kib(pid))


class Pattern:
    """``size`` bytes of the backend's download pattern, as an upload body with a length."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.piece = BLOCK * 16  # 1 MiB

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[bytes]:
        left = self.size
        while left > 0:
            piece = self.piece[:left]
            left -= len(piece)
            yield piece


@pytest.fixture(params=["forwarder", "cluster"])
def big(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A fresh proxy per test: an earlier test's peak would hide this one's growth."""
    with stack(via=request.param) as s:
        get(f"{s.url}/download?size={4 * MIB}").content  # noqa: B018  (warm up)
        yield s


def test_one_gib_upload_and_download_in_constant_memory(big: Stack) -> None:
    expected = pattern_sha256(GIB)
    with peak_rss(big.proc.pid) as rss:
        resp = requests.post(f"{big.url}/upload", data=Pattern(GIB), timeout=120)
        assert resp.json() == {"sha256": expected, "bytes": GIB}
        digest, total = hashlib.sha256(), 0
        with requests.get(f"{big.url}/download?size={GIB}", stream=True, timeout=120) as r:
            assert r.headers["Content-Length"] == str(GIB)
            for piece in r.iter_content(MIB):
                digest.update(piece)
                total += len(piece)
        assert (total, digest.hexdigest()) == (GIB, expected)
    baseline, peak = rss
    assert peak - baseline < RSS_BUDGET_KIB, f"proxy RSS {baseline} -> {peak} KiB"


def test_slow_reader_does_not_make_the_proxy_buffer(big: Stack) -> None:
    size = 512 * MIB
    digest, read = hashlib.sha256(), 0
    with raw(big.port) as client, peak_rss(big.proc.pid) as rss:
        client.send(request("GET", f"/download?size={size}"))
        client.head()
        # Stall, then trickle: a proxy that buffered would pull hundreds of MiB meanwhile.
        time.sleep(1)
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            digest.update(client.exactly(4096))
            read += 4096
            time.sleep(0.02)
        while read < size:  # then the rest at full speed
            data, client.buf = client.buf or client.sock.recv(MIB), b""
            if not data:
                break
            digest.update(data)
            read += len(data)
    baseline, peak = rss
    assert peak - baseline < RSS_BUDGET_KIB, f"proxy RSS {baseline} -> {peak} KiB"
    assert (read, digest.hexdigest()) == (size, pattern_sha256(size))


# --- in-process: the forwarder's own API against the real backend ----------------------


def environ(path: str = "/whoami", body: bytes = b"", **extra: str) -> dict:
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "",
           "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1",
           "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
           "HTTP_HOST": "app.example"}
    env.update(extra)
    return env


def test_forwarder_pools_and_closes(st: Stack) -> None:
    forwarder = HttpForwarder()
    try:
        check_pooling(forwarder, st)
    finally:
        forwarder.close()
    assert repr(forwarder) == "<HttpForwarder [idle: 0 over 0 endpoints]>"


def check_pooling(forwarder: HttpForwarder, st: Stack) -> None:
    assert repr(forwarder) == "<HttpForwarder [idle: 0 over 0 endpoints]>"
    for _ in range(2):
        resp = forwarder.forward(environ(), st.backend, "/whoami")
        assert resp.status == "200 OK"
        assert b"".join(resp.body) == b"backend"
        resp.body.close()
        assert repr(forwarder) == "<HttpForwarder [idle: 1 over 1 endpoints]>"
    # a body abandoned half way closes its connection instead of pooling it
    resp = forwarder.forward(environ(), st.backend, f"/download?size={8 * MIB}")
    next(iter(resp.body))
    resp.body.close()
    assert repr(forwarder) == "<HttpForwarder [idle: 0 over 0 endpoints]>"


def test_forwarder_add_headers_replace_incoming_ones(st: Stack) -> None:
    forwarder = HttpForwarder()
    try:
        env = environ("/headers", HTTP_X_CLUSTER_HOP="spoofed", HTTP_VIA="1.1 edge")
        resp = forwarder.forward(env, st.backend, "/headers?a=1", add_headers=[
            ("X-Cluster-Hop", "1"), ("Host", "other.example")])
        info = json.loads(b"".join(resp.body))
        assert info["query"] == "a=1"
        assert info["headers"]["X-Cluster-Hop"] == "1"
        assert info["headers"]["Host"] == "other.example"
        assert info["headers"]["X-Forwarded-Host"] == "app.example"
        assert info["headers"]["Via"] == "1.1 edge, 1.1 cluster"
        for bad in ([("Content-Length", "1")], [("Connection", "close")],
                    [("X-A", "b\r\nc")], [("X A", "b")]):
            with pytest.raises(ValueError):
                forwarder.forward(environ(), st.backend, "/", add_headers=bad)
        with pytest.raises(ValueError):
            forwarder.forward(environ(), st.backend, "/a b")
    finally:
        forwarder.close()


def test_forwarder_errors_say_whether_a_retry_is_safe(st: Stack) -> None:
    forwarder = HttpForwarder(connect_timeout=2)
    with refused_port() as dead_port, pytest.raises(UpstreamConnectError) as info:
        dead = f"http://127.0.0.1:{dead_port}"
        forwarder.forward(environ(), dead, "/")
    assert info.value.retryable and info.value.status == 502
    assert info.value.endpoint == dead
    assert repr(forwarder) == "<HttpForwarder [idle: 0 over 0 endpoints]>"


# --- pure parts ------------------------------------------------------------------------


def _parse_head(raw: bytes, crlf: bool = True):
    return parse_response_head(raw if crlf else crlf_head(raw))


def test_parse_head() -> None:
    head = _parse_head(
        b"HTTP/1.1 200 OK\r\nA: 1\r\nConnection: x-b, keep-alive\r\nX-B: 2\r\n"
        b"Keep-Alive: 5\r\nProxy-Foo: 1\r\nSet-Cookie: a\r\nSet-Cookie: b\r\n"
        b"Content-Length:  12 \r\nTE: x\r\nTrailer: y\r\nUpgrade: z")
    assert (head.status_line, head.code, head.keep_alive, head.length, head.transfer) == \
        (b"HTTP/1.1 200 OK", 200, True, 12, b"")
    assert head.field_pairs() == [("A", "1"), ("Set-Cookie", "a"), ("Set-Cookie", "b"),
                                  ("Content-Length", "12")]
    head = _parse_head(b"HTTP/1.1 404\r\nConnection: close")
    assert (head.status_line, head.keep_alive) == (b"HTTP/1.1 404 Not Found", False)
    head = _parse_head(b"HTTP/1.0 200 OK\nA: 1\nTransfer-Encoding: chunked", False)
    assert (head.field_pairs(), head.keep_alive, head.transfer) == \
        ([("A", "1")], False, b"chunked")
    assert _parse_head(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive").keep_alive
    assert _parse_head(b"HTTP/1.1 599 \r\nA: 1").status_line == b"HTTP/1.1 599 Unknown"
    for bad in (b"HTTP/2 200 OK", b"HTTP/1.1 2000 OK", b"ICY 200 OK", b"HTTP/1.1 200 OK\r\n"
                b"A : 1", b"HTTP/1.1 200 OK\r\nA: 1\r\n  folded", b"HTTP/1.1 200 OK\r\nnocolon",
                b"HTTP/1.1 200 OK\r\n: empty", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n"
                b"Content-Length: 2", b"HTTP/1.1 200 OK\r\nContent-Length: -1",
                b"HTTP/1.1 200 OK\r\nContent-Length: +1", b"HTTP/1.1 200 OK\r\n"
                b"Content-Length: \xb2", b"HTTP/1.1 200 OK\r\nA: 1\rB: 2",
                b"HTTP/1.1 200 OK\r\nA: 1\nB: 2"):
        with pytest.raises(ValueError):
            _parse_head(bad)


def test_body_mode() -> None:
    def mode(method: bytes, raw: bytes) -> tuple[int, int]:
        return response_framing(method, _parse_head(raw))

    assert mode(b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 12") == (FIXED, 12)
    assert mode(b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3") \
        == (FIXED, 3)
    assert mode(b"GET", b"HTTP/1.1 200 OK\r\nX: 1") == (UNTIL_CLOSE, -1)
    chunked = _parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                          b"Content-Length: 9\r\nX: 1")
    assert response_framing(b"GET", chunked) == (CHUNKED, -1) and chunked.chunked
    assert mode(b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 9") == (NO_BODY, 0)
    assert mode(b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\nETag: x") == \
        (NO_BODY, 0)
    # a final coding other than chunked: the body runs until the endpoint closes
    assert mode(b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip") == \
        (UNTIL_CLOSE, -1)
    # chunked wins over a Content-Length, but such a connection is not reused (RFC 9112
    # 6.3), nor one with Transfer-Encoding in HTTP/1.0 (6.1)
    assert not chunked.keep_alive
    assert not _parse_head(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n"
                           b"Transfer-Encoding: chunked").keep_alive
    assert _parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked").keep_alive


def test_response_field_count_is_bounded() -> None:
    fields = b"".join(b"\r\nX-F%d: v" % i for i in range(MAX_RESPONSE_FIELDS))
    assert len(_parse_head(b"HTTP/1.1 200 OK" + fields).field_pairs()) == MAX_RESPONSE_FIELDS
    with pytest.raises(ValueError, match="fields"):
        _parse_head(b"HTTP/1.1 200 OK" + fields + b"\r\nA:")


def test_request_target() -> None:
    assert request_target({"RAW_URI": "/a%2Fb?x=1", "PATH_INFO": "/a/b"}) == "/a%2Fb?x=1"
    assert request_target({"PATH_INFO": "/a b/é".encode().decode("latin-1"),
                           "QUERY_STRING": "q=1&r"}) == "/a%20b/%C3%A9?q=1&r"
    assert request_target({"SCRIPT_NAME": "/app", "PATH_INFO": ""}) == "/app"
    assert request_target({"PATH_INFO": ""}) == "/"


def close_wait_sockets(pid: int) -> int:
    """TCP sockets of process ``pid`` whose peer has closed (CLOSE-WAIT), from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                count += fields[3] == "08" and fields[9] in inodes
    return count


def test_pooled_connections_an_endpoint_closes_do_not_linger(tmp_path) -> None:
    """An endpoint that closes idle keep-alive connections soon (many servers do, after
    a few seconds): the balancer's pooled ends must not sit in CLOSE-WAIT holding
    descriptors until some request happens to pop them; the door reaps them."""
    listener = socket.create_server(("127.0.0.1", 0))

    def answer_then_close(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                piece = conn.recv(4096)
                if not piece:
                    return
                data += piece
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            time.sleep(0.3)  # the endpoint's own keep-alive timeout

    threading.Thread(target=accept_forever, args=(listener, answer_then_close),
                     daemon=True).start()
    endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
    env = {"CLUSTER_DISCOVERY_URL": f"sqlite://{tmp_path / 'discovery.sqlite3'}"}
    try:
        with running(cluster_argv("register", "--service", "web", "--endpoint-url", endpoint,
                                  "--ping-interval", "1"), env=env):
            proc, port = start_serve("--ui-service", "web", "--ping-interval", "1", env=env,
                                     name="balancer")
            try:
                base = f"http://127.0.0.1:{port}"
                wait_until(lambda: get(base + "/_cluster/status").json()["endpoints"],
                           timeout=TIMEOUT, what="endpoint registered")

                def one(_: int) -> int:
                    return requests.get(base + "/x", timeout=10).status_code

                with concurrent.futures.ThreadPoolExecutor(10) as pool:
                    assert list(pool.map(one, range(20))) == [200] * 20
                wait_until(lambda: close_wait_sockets(proc.pid) > 0, timeout=5,
                           what="the endpoint closed pooled connections")
                wait_until(lambda: close_wait_sockets(proc.pid) == 0, timeout=6,
                           what="the balancer closed its ends")
                assert requests.get(base + "/x", timeout=10).status_code == 200
            finally:
                proc.stop()
            assert "Traceback" not in proc.output()
    finally:
        listener.close()
