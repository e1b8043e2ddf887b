"""Large answers moved with os.splice by a balancer-only `cluster serve`, end to end.

The endpoint is a real TCP server in this process that answers each path with a script
(bodies in pieces with pauses, a body cut short, a body that stalls), registered by a
`cluster register` sidecar; clients are raw sockets. What a client relies on: every
byte of every answer, in order, on one keep-alive connection; a cut or stalled body
ends the connection with the same log line as the copying path (cluster/proxy/relay.py
``_relay_fixed``); the next answer is not touched by the last one's leftovers.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import socket
import tempfile
import threading
import time
from typing import Callable, Iterator

import pytest

from helpers import (
    Proc,
    accept_forever,
    cluster_argv,
    exchange,
    get,
    read_response,
    read_until_close,
    request_bytes,
    running,
    start_serve,
    wait_until,
)

READ_TIMEOUT = 1.0
CUT_LENGTH, CUT_SENT = 1_000_000, 100_000


@functools.lru_cache(maxsize=16)
def pattern(size: int) -> bytes:
    """Bytes that differ per size and per position: a piece out of place shows."""
    return b"".join(hashlib.sha256(f"{size}:{i}".encode()).digest()
                    for i in range(size // 32 + 1))[:size]


def _head(length: int) -> bytes:
    return (f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def _in_pieces(conn: socket.socket, size: int) -> None:
    """The head with a few bytes, then the body in three pieces with pauses between:
    the balancer waits for the endpoint in the middle of the body."""
    body = pattern(size)
    conn.sendall(_head(size) + body[:100])
    third = (size - 100) // 3
    for start in (100, 100 + third, 100 + 2 * third):
        time.sleep(0.02)
        conn.sendall(body[start:start + third] if start < 100 + 2 * third else body[start:])


def _cut(conn: socket.socket) -> None:
    conn.sendall(_head(CUT_LENGTH) + pattern(CUT_LENGTH)[:CUT_SENT])
    time.sleep(0.2)  # then close: the rest never comes


def _stall(conn: socket.socket) -> None:
    conn.sendall(_head(CUT_LENGTH) + pattern(CUT_LENGTH)[:CUT_SENT])
    time.sleep(READ_TIMEOUT + 3)


class Endpoint:
    """A real TCP server answering every request on a connection, by path."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.scripts: dict[str, Callable[[socket.socket], None]] = {
            "/cut": _cut, "/stall": _stall}
        threading.Thread(target=accept_forever, args=(self.listener, self._serve),
                         daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(20)
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                if path.startswith("/size/"):
                    _in_pieces(conn, int(path[6:]))
                    continue
                self.scripts[path](conn)
                return

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def balancer() -> Iterator[tuple[Proc, int, Endpoint]]:
    endpoint = Endpoint()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            env = {"CLUSTER_DISCOVERY_URL": f"sqlite:///{tmp}/discovery.sqlite3"}
            with running(cluster_argv("register", "--service", "web", "--endpoint-url",
                                      endpoint.url, "--ping-interval", "1"), env=env):
                proc, port = start_serve("--ui-service", "web", "--ping-interval", "1",
                                         "--read-timeout", str(READ_TIMEOUT),
                                         name="balancer", env=env)
                try:
                    wait_until(lambda: get(f"http://127.0.0.1:{port}/_cluster/status")
                               .json()["endpoints"], timeout=20, what="endpoint registered")
                    yield proc, port, endpoint
                finally:
                    proc.stop()
                    assert "Traceback" not in proc.output(), proc.output()[-3000:]
    finally:
        endpoint.close()


def pipes_of(pid: int) -> int:
    fds = f"/proc/{pid}/fd"
    return sum(os.readlink(f"{fds}/{fd}").startswith("pipe:")
               for fd in os.listdir(fds) if os.path.exists(f"{fds}/{fd}"))


# Around the thresholds of relay.py (first read 8 KiB, splice from 16 KiB left).
SIZES = [1000, 8_000, 20_000, 24_576 + 300, 40_000, 65_536, 1_000_003, 65_536]


def test_spliced_bodies_arrive_whole_and_in_order(balancer) -> None:
    proc, port, _ = balancer
    pipes_before = pipes_of(proc.pid)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for size in SIZES:  # one keep-alive connection: no answer leaks into the next
            sock.sendall(request_bytes(target=f"/size/{size}"))
            response = read_response(sock, timeout=10)
            assert response.status == 200
            assert int(response.header("content-length") or -1) == size
            assert response.body == pattern(size), size
    if hasattr(os, "splice"):  # the bodies took the splice path: its pipe is kept
        assert pipes_of(proc.pid) > pipes_before


def test_a_cut_body_closes_the_client_connection_with_the_same_error(balancer) -> None:
    proc, port, endpoint = balancer
    line = (f"{endpoint.url}: closed {CUT_LENGTH - CUT_SENT} bytes before the end of the "
            "response body")
    before = proc.output().count(line)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request_bytes(target="/cut"))
        data, closed = read_until_close(sock, 10)
    assert closed
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and f"Content-Length: {CUT_LENGTH}".encode() in head
    assert body == pattern(CUT_LENGTH)[:CUT_SENT]  # all that came, nothing else
    wait_until(lambda: proc.output().count(line) == before + 1, timeout=5, what="the warning")
    # The pipe it went through is not reused with bytes in it: the next answer is whole.
    responses, _ = exchange(port, request_bytes(target="/size/65536",
                                                headers=[("Connection", "close")]))
    assert [(r.status, r.body == pattern(65536)) for r in responses] == [(200, True)]


def test_a_body_that_stalls_is_cut_after_the_read_timeout(balancer) -> None:
    proc, port, endpoint = balancer
    line = (f"{endpoint.url}: no answer within the read timeout (response body cut "
            f"{CUT_LENGTH - CUT_SENT} bytes before its end)")
    before = proc.output().count(line)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request_bytes(target="/stall"))
        started = time.monotonic()
        data, closed = read_until_close(sock, READ_TIMEOUT + 2.5)
        took = time.monotonic() - started
    assert closed and READ_TIMEOUT * 0.9 < took < READ_TIMEOUT + 2, took
    assert data.partition(b"\r\n\r\n")[2] == pattern(CUT_LENGTH)[:CUT_SENT]
    wait_until(lambda: proc.output().count(line) == before + 1, timeout=5, what="the warning")


def test_more_large_answers_at_once_than_pipes_all_arrive_whole(balancer) -> None:
    """Clients that do not read at first keep their answers' pipes busy; past
    cluster.proxy.pipes.LIMIT the others are copied. Every body still arrives whole."""
    _, port, _ = balancer
    size, count = 1_000_003, 12
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()  # a small window from the start, not shrunk later
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            sock.settimeout(10)
            sock.connect(("127.0.0.1", port))
            sock.sendall(request_bytes(target=f"/size/{size}"))
            socks.append(sock)
        time.sleep(0.5)  # every answer waits for its client in the middle of the body
        for sock in socks:
            response = read_response(sock, timeout=10)
            assert (response.status, response.body == pattern(size)) == (200, True)
    finally:
        for sock in socks:
            sock.close()
