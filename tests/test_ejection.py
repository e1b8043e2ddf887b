"""Passive ejection that heals: backoff, readmission by heartbeat and by probe."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import socket
import threading
import time

import pytest

import cluster.node
from cluster.config import Settings
from cluster.node import Cluster
from cluster.records import Endpoint, endpoint_hash
from cluster.registry import EndpointTable

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def ep(url: str, stamp: dt.datetime = NOW) -> Endpoint:
    return Endpoint("web", url, endpoint_hash(url), None, stamp, 5.0)


class Clock:
    """A settable stand-in for time.monotonic (the ejection deadlines read it)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def node(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(cluster.node.time, "monotonic", clock)
    settings = Settings(discovery_url=f"sqlite://{tmp_path / 'd.sqlite3'}", eject_seconds=8.0)
    n = Cluster(settings, register=False)  # not started: the table is set by hand
    n.clock = clock  # type: ignore[attr-defined]
    yield n
    n.close()


A = ep("http://127.0.0.1:1")
B = ep("http://127.0.0.1:2")


def show(node: Cluster, *endpoints: Endpoint, now: dt.datetime = NOW) -> None:
    node.watcher.table = EndpointTable.build(now, endpoints, grace=3600.0)


def test_backoff_doubles_from_one_second_up_to_eject_seconds(node):
    show(node, A, B)
    lengths = []
    for _ in range(6):
        node.eject(A)
        start = node.clock.now
        assert node.ejected() == {A.hash}
        while A.hash in node.ejected():
            node.clock.now += 0.25
        lengths.append(node.clock.now - start)
    assert lengths == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_a_quiet_spell_resets_the_backoff(node):
    show(node, A)
    for _ in range(3):
        node.eject(A)
        node.clock.now += 10
    node.clock.now += 9  # longer than --eject-seconds since the last ejection ended
    node.eject(A)
    node.clock.now += 1.0
    assert node.ejected() == frozenset()


def test_concurrent_ejections_are_one_strike(node):
    show(node, A)
    for _ in range(5):
        node.eject(A)
    node.clock.now += 1.0
    assert node.ejected() == frozenset()


def test_a_newer_heartbeat_readmits_at_once(node):
    show(node, A, B)
    node.eject(A)
    node.eject(B)
    assert node.ejected() == {A.hash, B.hash}
    show(node, A, B)  # same heartbeats, newer table: still out
    assert node.ejected() == {A.hash, B.hash}
    later = NOW + dt.timedelta(seconds=1)
    show(node, dataclasses.replace(A, timestamp=later), B, now=later)
    assert node.ejected() == {B.hash}


def test_leaving_the_table_ends_the_ejection(node):
    show(node, A, B)
    node.eject(A)
    show(node, B)
    assert node.ejected() == frozenset()
    show(node, A, B)  # back with its old heartbeat: a new registration, not ejected
    assert node.ejected() == frozenset()


def test_explicit_seconds_win(node):
    show(node, A)
    node.eject(A, seconds=0.5)
    node.clock.now += 0.5
    assert node.ejected() == frozenset()


def test_connect_probe_sees_a_listener_and_a_closed_port():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert cluster.node._connects(f"http://127.0.0.1:{port}", 0.5)
    assert not cluster.node._connects(f"http://127.0.0.1:{port}", 0.5)
    assert not cluster.node._connects("http://127.0.0.1:99999", 0.5)


def test_the_probe_readmits_an_endpoint_that_accepts_again(tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        back = ep(f"http://127.0.0.1:{port}")
        settings = Settings(discovery_url=f"sqlite://{tmp_path / 'd.sqlite3'}",
                            eject_seconds=60.0)
        node = Cluster(settings, register=False).start()
        try:
            show(node, back)
            node.watcher.stop()  # keep the hand-made table
            show(node, back)
            node.eject(back, seconds=60)
            time.sleep(1.2)
            assert node.ejected() == {back.hash}, "refused: still out"
            listener.listen()
            deadline = time.monotonic() + 3
            while node.ejected() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert node.ejected() == frozenset()
        finally:
            node.close()


def test_service_client_tries_ejected_endpoints_when_nothing_else_is_left(node):
    from cluster.client import NoEndpoint, ServiceClient

    show(node, A, B)
    node.eject(A)
    client = ServiceClient("web", node)
    assert client._endpoint(frozenset()) == B
    node.eject(B)
    client._current = None
    assert client._endpoint(frozenset()) in (A, B)
    with pytest.raises(NoEndpoint):
        client._endpoint(frozenset({A.hash, B.hash}))


def test_a_heartbeat_from_before_the_failure_does_not_readmit(node):
    # the table was read at NOW; the failure comes 0.4 s later by the same clock
    show(node, dataclasses.replace(A, timestamp=NOW - dt.timedelta(seconds=0.5)), B)
    node.watcher.read_at = node.clock.now
    node.clock.now += 0.4
    node.eject(A)
    before = NOW + dt.timedelta(seconds=0.2)  # landed after the read, before the failure
    show(node, dataclasses.replace(A, timestamp=before), B, now=before)
    assert node.ejected() == {A.hash}
    after = NOW + dt.timedelta(seconds=0.6)  # written after the failure: it is back
    show(node, dataclasses.replace(A, timestamp=after), B, now=after)
    assert node.ejected() == frozenset()


def test_a_heartbeat_does_not_readmit_an_endpoint_that_closed_connections_unanswered(node):
    """Its sidecar (or its own registrar) heartbeats on while its app is dead: a newer
    heartbeat says nothing about whether it serves."""
    show(node, A, B)
    node.eject(A, accepts=True)
    node.eject(B)
    later = NOW + dt.timedelta(seconds=1)
    show(node, dataclasses.replace(A, timestamp=later),
         dataclasses.replace(B, timestamp=later), now=later)
    assert node.ejected() == {A.hash}


def test_the_linger_probe_tells_a_server_from_a_listener_that_closes_at_once():
    """A connect succeeds to both; only the server keeps the connection open."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        assert cluster.node._connects(url, 0.5) and cluster.node.keeps_open(url, 0.5)
        closer = socket.create_server(("127.0.0.1", 0))
        closer.settimeout(0.05)
        closing = f"http://127.0.0.1:{closer.getsockname()[1]}"
        stop = threading.Event()

        def close_each() -> None:
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    closer.accept()[0].close()

        thread = threading.Thread(target=close_each, daemon=True)
        thread.start()
        try:
            assert cluster.node._connects(closing, 0.5)
            assert not cluster.node.keeps_open(closing, 0.5)
        finally:
            stop.set()
            closer.close()
            thread.join(5)
    assert not cluster.node.keeps_open(url, 0.5)  # closed: refused


def test_the_linger_probe_of_an_https_endpoint_completes_a_verified_handshake(
        tmp_path, monkeypatch):
    """A bare connect to a TLS endpoint whose certificate does not verify succeeds; a
    request's handshake does not, nor does the probe's, until the certificate is
    trusted (here: SSL_CERT_FILE, read when the probe's context is made)."""
    import ssl

    from helpers import self_signed

    cert, key = self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    url = f"https://localhost:{listener.getsockname()[1]}"
    stop = threading.Event()
    held: list[socket.socket] = []

    def handshake_and_wait() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn = listener.accept()[0]
                conn.settimeout(2)
                held.append(conn)
                with contextlib.suppress(OSError):
                    held.append(context.wrap_socket(conn, server_side=True))

    thread = threading.Thread(target=handshake_and_wait, daemon=True)
    thread.start()
    try:
        for trusted, expected in ((tmp_path / "none.pem", False), (cert, True)):
            monkeypatch.setenv("SSL_CERT_FILE", str(trusted))
            monkeypatch.setattr(cluster.node, "_TLS", [])
            assert cluster.node._connects(url, 2)
            assert cluster.node.keeps_open(url, 2) is expected
    finally:
        stop.set()
        thread.join(5)
        listener.close()
        for sock in held:
            sock.close()


def test_a_heartbeat_does_not_readmit_an_endpoint_that_could_not_be_reached(node):
    """A connect timeout or no route (a wrong endpoint URL, a host cut off from this
    one): its registration heartbeats on, which says nothing of the way from here."""
    show(node, A, B)
    node.eject(A, reachable=False)
    node.eject(B)  # refused: its process may have restarted
    later = NOW + dt.timedelta(seconds=1)
    show(node, dataclasses.replace(A, timestamp=later),
         dataclasses.replace(B, timestamp=later), now=later)
    assert node.ejected() == {A.hash}
    node.clock.now += 1.0  # its time is up: tried again
    assert node.ejected() == frozenset()
