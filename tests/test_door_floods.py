"""The front door against clients that try to exhaust descriptors or time.

Real `cluster serve` processes and raw sockets, as tests/test_door_limits.py: each test
asserts what a client relies on while another client misbehaves (its own connection is
answered, in time, and the instance keeps its descriptors and never prints a traceback).
Longer floods with figures are in bench/door_floods.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import socket
import threading
import time
from typing import Iterator

import pytest

from helpers import (
    Proc,
    exchange,
    raw_websocket,
    read_response,
    read_until_close,
    request_bytes,
    start_serve,
    wait_until,
)
from test_door_limits import status_view, stop_clean, wait_front_sees

FOLLOW_UP = b"GET /whoami HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
QUICK = ("--ping-interval", "1", "--expiry-grace", "1")
WRITE_TIMEOUT = 1.0


def descriptors(proc: Proc) -> int:
    return len(os.listdir(f"/proc/{proc.pid}/fd"))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite://{tmp_path_factory.mktemp('floods') / 'discovery.sqlite3'}"


@pytest.fixture(scope="module")
def ws_member(store: str) -> Iterator[tuple[Proc, int]]:
    """An instance of service ``wsflood`` whose app echoes WebSocket messages."""
    proc, port = start_serve("--service", "wsflood", "--app", "gws_echo:app", *QUICK,
                             name="wsmember",
                             env={"CLUSTER_DISCOVERY_URL": store, "BACKEND_NAME": "wsm"})
    try:
        yield proc, port
    finally:
        stop_clean(proc)


def start_front(store: str, *args: str, wrapper: tuple[str, ...] = ()) -> tuple[Proc, int]:
    """A balancer-only instance in front of ``wsflood``, once it sees the member."""
    proc, port = start_serve("--ui-service", "wsflood", *QUICK, *args, name="front",
                             env={"CLUSTER_DISCOVERY_URL": store}, wrapper=wrapper)
    try:
        wait_front_sees(port, "wsflood")
    except BaseException:
        proc.stop()
        raise
    return proc, port


def echoes(sock: socket.socket) -> bool:
    sock.sendall(b"\x81\x82\x00\x00\x00\x00hi")  # masked (zero key) text "hi"
    return sock.recv(100) == b"\x81\x02hi"


def test_websockets_through_a_balancer_count_against_its_connection_cap(
        store: str, ws_member: tuple[Proc, int]) -> None:
    """A tunnelled WebSocket holds its client's descriptor (and one to the endpoint):
    it is one of --max-connections until it closes. Past the cap a 503; the open ones
    carry on; one that closes makes room."""
    cap = 10
    proc, port = start_front(store, "--max-connections", str(cap))
    socks: list[socket.socket] = []
    ask_status = request_bytes(target="/_cluster/status")
    try:
        # an operator's keep-alive connection, opened first: one of the cap as well
        watcher = socket.create_connection(("127.0.0.1", port), timeout=5)
        socks.append(watcher)
        watcher.sendall(ask_status)
        assert read_response(watcher).status == 200
        for _ in range(cap - 1):
            sock, status = raw_websocket(port)
            socks.append(sock)
            assert status == b"HTTP/1.1 101 Switching Protocols", status
        extra, status = raw_websocket(port)
        with extra:
            assert status.startswith(b"HTTP/1.1 503"), status
        assert all(echoes(sock) for sock in socks[1:])
        watcher.sendall(ask_status)  # the instance still answers on an open connection
        seen = json.loads(read_response(watcher).body)
        assert (seen["connections"], seen["websockets"]) == (cap, cap - 1), seen
        socks.pop().close()

        def a_newcomer_is_let_in() -> bool:
            sock, status = raw_websocket(port)
            if status.startswith(b"HTTP/1.1 101"):
                socks.append(sock)
                return True
            sock.close()
            return False
        wait_until(a_newcomer_is_let_in, timeout=5, what="a freed place")
        assert echoes(socks[-1])
    finally:
        for sock in socks:
            sock.close()
        stop_clean(proc)


def test_out_of_descriptors_is_a_503_not_a_traceback_nor_an_ejection(
        store: str, ws_member: tuple[Proc, int]) -> None:
    """--max-connections set above what the descriptor limit holds: new clients get a
    short 503 (accept and connect both fail with EMFILE), the healthy endpoint is not
    ejected for this instance's own shortage, and the open WebSockets carry on."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1024 and hard >= 1024:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    proc, port = start_front(store, "--max-connections", "1000",
                             wrapper=("prlimit", "--nofile=96:96"))
    socks: list[socket.socket] = []
    try:
        statuses: dict[bytes, int] = {}
        for _ in range(60):  # 2 descriptors each: past 96 well before the end
            sock, status = raw_websocket(port)
            statuses[status[:12]] = statuses.get(status[:12], 0) + 1
            if status.startswith(b"HTTP/1.1 101"):
                socks.append(sock)
            else:
                sock.close()
        assert set(statuses) <= {b"HTTP/1.1 101", b"HTTP/1.1 503", b""}, statuses
        assert statuses.get(b"HTTP/1.1 503"), statuses
        assert socks and all(echoes(sock) for sock in socks)
        for sock in socks:
            sock.close()
        socks = []
        wait_until(lambda: status_view(port)["websockets"] == 0, timeout=5,
                   what="the tunnels are gone")
        sock, status = raw_websocket(port)  # room again: the endpoint is still in use
        with sock:
            assert status.startswith(b"HTTP/1.1 101"), status
            assert echoes(sock)
    finally:
        for sock in socks:
            sock.close()
        output = stop_clean(proc)
    assert "ejecting" not in output, output[-3000:]


@pytest.fixture(scope="module")
def local(store: str) -> Iterator[tuple[Proc, int]]:
    """An instance serving the test backend itself."""
    proc, port = start_serve("--service", "floodlocal", "--app", "backend:app", *QUICK,
                             "--write-timeout", str(WRITE_TIMEOUT), name="local",
                             env={"CLUSTER_DISCOVERY_URL": store, "BACKEND_NAME": "local"})
    try:
        yield proc, port
    finally:
        stop_clean(proc)


def whoami_seconds(port: int) -> float:
    started = time.monotonic()
    responses, _ = exchange(port, FOLLOW_UP, timeout=30)
    assert [(r.status, r.body) for r in responses] == [(200, b"local")], responses
    return time.monotonic() - started


def test_a_body_of_tiny_chunks_sent_at_full_speed_does_not_hold_other_clients(
        local: tuple[Proc, int]) -> None:
    """400,000 one-byte chunks (2.4 MB), sent as fast as the app reads them: about two
    seconds of the app's reading, during which every other client of the process used
    to wait (the reads never had to wait for the socket, so nothing else ran)."""
    _, port = local
    count = 400_000
    body = b"1\r\nx\r\n" * count + b"0\r\n\r\n"
    answer: list[bytes] = []

    def upload() -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + body)
            answer.append(read_until_close(sock, 60)[0])

    uploader = threading.Thread(target=upload)
    uploader.start()
    waits = []
    time.sleep(0.2)
    while uploader.is_alive():
        waits.append(whoami_seconds(port))
        time.sleep(0.05)
    uploader.join()
    assert answer and answer[0].startswith(b"HTTP/1.1 200"), answer
    assert b'"bytes": %d' % count in answer[0], answer[0][-200:]
    assert max(waits) < 0.5, f"other clients waited {max(waits):.2f} s: {sorted(waits)[-5:]}"
    assert len(waits) >= 3, f"the upload took too little time to measure anything: {waits}"


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_an_app_that_works_on_after_reading_its_body_keeps_its_client(
        local: tuple[Proc, int], framing: str) -> None:
    """--write-timeout bounds a wait for the client's body, not the app's work after
    it: the client of an upload the app reads whole and then handles for longer than
    that gets its answer (it used to be cut off by the sweeper, with no answer)."""
    _, port = local
    body = os.urandom(300_000)  # more than one read: the app's reads wait for the rest
    if framing == "length":
        raw = request_bytes("POST", f"/upload?then={WRITE_TIMEOUT + 1}",
                            headers=[("Connection", "close"),
                                     ("Content-Length", str(len(body)))], body=body)
    else:
        raw = (f"POST /upload?then={WRITE_TIMEOUT + 1} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode() + \
            b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    responses, _ = exchange(port, raw, timeout=WRITE_TIMEOUT + 5)
    assert [r.status for r in responses] == [200], responses
    assert json.loads(responses[0].body) == {"sha256": hashlib.sha256(body).hexdigest(),
                                             "bytes": len(body)}


def test_a_body_that_stops_coming_is_cut_after_the_write_timeout(
        local: tuple[Proc, int]) -> None:
    """The other side of it: a client silent in the middle of its body is let go."""
    _, port = local
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Length: 10000000\r\n\r\n" + bytes(100_000))
        started = time.monotonic()
        data, closed = read_until_close(sock, WRITE_TIMEOUT + 3)
    assert closed and data == b"", data
    assert time.monotonic() - started < WRITE_TIMEOUT + 1.0


@pytest.mark.parametrize("abuse", ["endless-trailers", "long-extension"])
def test_a_chunked_body_the_app_reads_is_held_to_the_relays_bounds(
        local: tuple[Proc, int], abuse: str) -> None:
    """The local app's chunked bodies get the limits a relayed one gets (64 KiB of
    trailers, 4 KiB per chunk line): a 400 and the connection closed, at once. pywsgi
    bounds only each line, so trailer lines used to be taken for as long as a client
    sent them, each parsed byte by byte (8.5 MB of them: 37 s of CPU, then a 200)."""
    _, port = local
    if abuse == "endless-trailers":
        body = b"1\r\nx\r\n0\r\n" + (b"X-Trailer: " + b"t" * 80 + b"\r\n") * 20_000
    else:
        body = b"1;" + b"e" * 6000 + b"\r\nx\r\n0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port)) as sock:
        started = time.monotonic()
        try:
            sock.sendall(b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n" + body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before it was all sent: what is asserted is the answer
        data, closed = read_until_close(sock, 10)
    assert data.startswith(b"HTTP/1.1 400"), data[:200]
    assert closed
    assert time.monotonic() - started < 3
    responses, _ = exchange(port, FOLLOW_UP)  # and the instance serves on
    assert [r.status for r in responses] == [200]


def rss_kib(proc: Proc) -> int:
    with open(f"/proc/{proc.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_websocket_message_that_stops_halfway_is_dropped_and_its_memory_freed(
        store: str) -> None:
    """Between messages an upgraded connection has no timeout (by design), but in the
    middle of a frame a client silent for --write-timeout is let go: ten clients that
    announce 8 MiB messages and stop after 4 MiB used to hold 40 MiB for ever. Once
    they are closed the process gives the memory back (the connection's objects refer
    to each other: without freeing the buffer it waited for a full collection)."""
    proc, port = start_serve("--service", "floodws", "--app", "gws_echo:app", *QUICK,
                             "--write-timeout", str(WRITE_TIMEOUT), name="localws",
                             env={"CLUSTER_DISCOVERY_URL": store, "BACKEND_NAME": "lws"})
    socks: list[socket.socket] = []
    try:
        idle, status = raw_websocket(port)
        socks.append(idle)
        assert status.startswith(b"HTTP/1.1 101") and echoes(idle)
        before = rss_kib(proc)
        header = b"\x82\xff" + (8 << 20).to_bytes(8, "big") + b"\0\0\0\0"
        for _ in range(10):
            sock, status = raw_websocket(port)
            socks.append(sock)
            assert status.startswith(b"HTTP/1.1 101"), status
            sock.sendall(header + bytes(4 << 20))
        sent = time.monotonic()
        wait_until(lambda: rss_kib(proc) > before + 30_000, timeout=5,
                   what="the instance reads the halves")
        for sock in socks[1:]:
            data, closed = read_until_close(sock, WRITE_TIMEOUT + 5)
            assert closed, data
        assert time.monotonic() - sent < WRITE_TIMEOUT + 2.5
        wait_until(lambda: rss_kib(proc) < before + 10_000, timeout=3,
                   what=f"the memory back (from {before} KiB)")
        assert echoes(idle)  # idle far longer than the write timeout, and served
    finally:
        for sock in socks:
            sock.close()
        stop_clean(proc)


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_client_reset_in_the_middle_of_a_relayed_body_frees_both_connections(
        store: str, framing: str) -> None:
    """A client that resets its connection halfway through a body the balancer relays:
    the balancer drops the endpoint connection at once. It used to take the reset for
    the endpoint's failure and wait for an early answer, which the endpoint, waiting
    for the rest of the body, gave only after its own --write-timeout: both
    descriptors (and the endpoint's request) held for that long, for every reset."""
    member, _ = start_serve("--service", "floodbody", "--app", "backend:app", *QUICK,
                            "--write-timeout", "30", name="bodymember",
                            env={"CLUSTER_DISCOVERY_URL": store, "BACKEND_NAME": "bm"})
    front = None
    try:
        front, port = start_serve("--ui-service", "floodbody", *QUICK, name="bodyfront",
                                  env={"CLUSTER_DISCOVERY_URL": store})
        wait_front_sees(port, "floodbody")
        baseline = descriptors(front)
        framing_line = (b"Transfer-Encoding: chunked\r\n\r\n4000\r\n" if framing == "chunked"
                        else b"Content-Length: 1000000\r\n\r\n")
        for _ in range(10):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\n" + framing_line +
                         bytes(10_000))
            time.sleep(0.05)  # relayed, and the endpoint is reading it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            sock.close()  # a reset
        wait_until(lambda: descriptors(front) <= baseline + 1 and
                   status_view(port)["connections"] == 1,
                   timeout=3, what=f"the balancer's descriptors back to {baseline}")
    finally:
        if front is not None:
            stop_clean(front)
        stop_clean(member)


def pinned_burst(port: int, service: str, endpoint_hash: str, count: int, pause: float = 0.0
                 ) -> tuple[list[socket.socket], list[tuple[int, bytes]]]:
    """``count`` keep-alive clients at once, each with one GET pinned (sticky cookie)
    to the endpoint ``endpoint_hash`` (sent ``pause`` seconds after all connected):
    their sockets (left open) and what each got."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]
    time.sleep(pause)
    ask = request_bytes(headers=[("Cookie", f"cluster-endpoint::{service}={endpoint_hash}")])
    for sock in socks:
        sock.sendall(ask)
    answers = []
    for sock in socks:
        response = read_response(sock, timeout=10)
        answers.append((response.status, response.body[:16]))
    return socks, answers


def test_idle_endpoint_connections_give_way_when_descriptors_run_out(store: str) -> None:
    """The automatic --max-connections budgets two descriptors per client (its own and
    its endpoint's), not the idle endpoint connections kept for reuse. Bursts of
    clients pinned to one endpoint, then another, left that many idle behind; a burst
    about as large, under the cap, to a third endpoint then ran out of descriptors (at
    accept, then at connect): part of it got 503 "no socket for it" and the operator
    a warning, for up to 30 s. Idle ones are a cache: they are closed to make room
    (the oldest first), and every client is served."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1024 and hard >= 1024:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    names = ("pa", "pb", "pc")
    members = [start_serve("--service", "floodpool", "--app", "backend:app", *QUICK,
                           name=f"pool{name}",
                           env={"CLUSTER_DISCOVERY_URL": store, "BACKEND_NAME": name})[0]
               for name in names]
    front = None
    socks: list[socket.socket] = []
    try:
        # 256 descriptors: the automatic cap is (256 - 64) // 2 = 96 connections
        front, port = start_serve("--ui-service", "floodpool", *QUICK, name="poolfront",
                                  env={"CLUSTER_DISCOVERY_URL": store},
                                  wrapper=("prlimit", "--nofile=256:256"))

        def hashes() -> list[str]:
            return sorted(e["hash"] for e in status_view(port)["endpoints"]
                          if e["service"] == "floodpool")
        wait_until(lambda: len(hashes()) == 3, timeout=15, what="the front sees 3 members")
        *earlier, last = hashes()
        for endpoint_hash in earlier:
            # 2 x 80 + 160 idle after the second: just within the descriptors
            socks, answers = pinned_burst(port, "floodpool", endpoint_hash, 80)
            assert {status for status, _ in answers} == {200}, answers
            for sock in socks:
                sock.close()
            socks = []
            wait_until(lambda: status_view(port)["connections"] == 1, timeout=5,
                       what="the burst's clients gone")
        # all accepted before any request comes: accept() meets the shortage first
        socks, answers = pinned_burst(port, "floodpool", last, 95, pause=0.5)
        assert sorted(set(answers)) == [(200, answers[0][1])], sorted(set(answers))
        assert answers[0][1].decode() in names
    finally:
        for sock in socks:
            sock.close()
        output = stop_clean(front) if front is not None else ""
        for member in members:
            stop_clean(member)
    # nor was any client told so, nor the operator warned of a shortage there was not
    assert "out of file descriptors" not in output, output[-3000:]
