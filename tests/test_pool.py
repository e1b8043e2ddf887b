"""The endpoint connection pool (cluster/proxy/upstream.py) over real loopback sockets:
what it hands out again, and what it throws away."""

from __future__ import annotations

import socket
import time
from typing import Iterator

import pytest

from cluster.proxy import upstream
from cluster.proxy.upstream import Pool


@pytest.fixture()
def endpoint() -> Iterator[tuple[socket.socket, str]]:
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        yield listener, f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def pooled(listener: socket.socket, url: str) -> tuple[Pool, upstream.Connection,
                                                       socket.socket]:
    pool = Pool(1.0, 5.0, 4, timers=False)
    conn = pool.open(url)
    server_side, _ = listener.accept()
    pool.release(conn)
    return pool, conn, server_side


def test_a_connection_released_a_moment_ago_is_handed_out_again(endpoint) -> None:
    pool, conn, server_side = pooled(*endpoint)
    try:
        again = pool.acquire(endpoint[1])
        assert again is conn and again.reused
        assert pool.acquire(endpoint[1]) is None  # checked out: nobody else gets it
    finally:
        conn.close()
        server_side.close()


def test_a_connection_closed_right_after_its_release_is_thrown_away(endpoint) -> None:
    # However recent the release: a request that may not be moved elsewhere once sent
    # must not get a connection the endpoint already closed.
    pool, conn, server_side = pooled(*endpoint)
    server_side.close()
    time.sleep(0.002)  # the FIN is in
    assert pool.acquire(endpoint[1]) is None
    assert conn.sock.fileno() < 0


def test_bytes_sent_right_after_a_release_never_reach_the_next_request(endpoint) -> None:
    # An endpoint that writes past its response (a 204 with a body, an injected
    # response) a moment later: the next client, however soon, must not get them.
    pool, conn, server_side = pooled(*endpoint)
    try:
        server_side.sendall(b"HTTP/1.1 200 OK\r\nSet-Cookie: stolen=1\r\n\r\n")
        time.sleep(0.002)
        assert pool.acquire(endpoint[1]) is None
        assert conn.sock.fileno() < 0
    finally:
        server_side.close()


def test_an_idle_connection_the_endpoint_closed_is_thrown_away(endpoint) -> None:
    pool, conn, server_side = pooled(*endpoint)
    server_side.close()
    time.sleep(0.05)
    assert pool.acquire(endpoint[1]) is None
    assert conn.sock.fileno() < 0  # closed, not left open


def test_an_idle_connection_with_bytes_past_its_response_is_thrown_away(endpoint) -> None:
    pool, conn, server_side = pooled(*endpoint)
    try:
        server_side.sendall(b"HTTP/1.1 200 OK\r\n")  # out of step: not anyone's answer
        time.sleep(0.05)
        assert pool.acquire(endpoint[1]) is None
    finally:
        server_side.close()


def test_a_connection_idle_past_the_idle_timeout_is_not_reused(endpoint, monkeypatch) -> None:
    pool, conn, server_side = pooled(*endpoint)
    try:
        monkeypatch.setattr(upstream, "IDLE_TIMEOUT", 0.01)
        time.sleep(0.05)
        assert pool.acquire(endpoint[1]) is None
    finally:
        server_side.close()


def test_reaping_closes_the_idle_connections_their_endpoint_closed(endpoint) -> None:
    """The door reaps its pool every few seconds (Door.tidy): an idle connection the
    endpoint closed would otherwise keep a descriptor in CLOSE-WAIT until reused."""
    listener, url = endpoint
    pool = Pool(1.0, 5.0, 4, timers=False)
    conns = [pool.open(url) for _ in range(3)]
    sides = {}
    for _ in conns:
        side, peer = listener.accept()
        sides[peer] = side
    by_conn = [sides[c.sock.getsockname()] for c in conns]
    for conn in conns:
        pool.release(conn)
    try:
        by_conn[0].close()
        by_conn[1].close()
        time.sleep(0.05)
        assert pool.reap() == 2
        assert [c.sock.fileno() < 0 for c in conns] == [True, True, False]
        assert pool.reap() == 0  # the live one stays
        assert pool.acquire(url) is conns[2]
    finally:
        for side in by_conn:
            side.close()
        for conn in conns:
            conn.close()
        pool.close()


@pytest.mark.parametrize("host", ["a..b", ".x", "a" * 64])
def test_a_host_name_resolvers_refuse_is_a_connect_error_tried_elsewhere(endpoint, host):
    """getaddrinfo's IDNA codec raises UnicodeError, not OSError, for an empty or
    over-long label: it escaped the attempt loop and closed the client's connection."""
    from types import SimpleNamespace

    from cluster.errors import UpstreamConnectError
    from cluster.proxy.attempts import attempt

    listener, good = endpoint
    pool = Pool(1.0, 5.0, 4, timers=False)
    bad = f"http://{host}:80"
    with pytest.raises(UpstreamConnectError, match="connect failed"):
        pool.open(bad)
    ejected: list[str] = []
    node = SimpleNamespace(eject=lambda e, reason, **kind: ejected.append(e.hash))
    picks = iter([bad, good])
    conn = attempt(lambda tried: next(picks), pool.open,
                   endpoint_of=lambda url: SimpleNamespace(hash=url), node=node,
                   retries=2, may_replay=False)
    try:
        assert conn.target.url == good and ejected == [bad]
    finally:
        conn.close()
        listener.accept()[0].close()
