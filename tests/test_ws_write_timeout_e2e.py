"""--write-timeout lets go of a WebSocket client that stops reading.

An app that only sends (tests/apps/ws_sender.py, 64 KiB messages) to a client that
upgraded and never reads: its ``send()`` used to block for as long as the client kept
the connection, served locally or tunnelled by a balancer. Now a send that makes no
progress for --write-timeout ends the WebSocket: locally the app's send raises
gevent-websocket's WebSocketError and the socket closes; a balancer's tunnel closes
both of its sides (so the endpoint's app sees its socket end too).
"""

from __future__ import annotations

import socket
import time

import pytest
import requests

from helpers import server_frames, start_library_app, start_serve, wait_until

COMMON = ("--ping-interval", "1", "--expiry-grace", "1")
HANDSHAKE = ("GET /feed HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
             "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")


def table(base: str) -> set[str]:
    status = requests.get(base + "/_cluster/status", timeout=5).json()
    return {e["endpoint"] for e in status["endpoints"] if e["service"] == "ws"}


def stalled_client(port: int, path: str = "/feed") -> socket.socket:
    """A client that upgrades, reads the 101's head and then nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(HANDSHAKE.replace("/feed", path, 1).encode())
    head = b""
    sock.settimeout(10)
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return sock


def drained_to_the_end(sock: socket.socket, limit: int = 64 << 20,
                       patience: float = 15.0) -> bool:
    """Read what is there: True once the connection ends (EOF or reset) within
    ``limit`` bytes, False when the server is still sending (it never let go)."""
    got = 0
    deadline = time.monotonic() + patience
    sock.settimeout(2)
    try:
        while got < limit and time.monotonic() < deadline:
            data = sock.recv(1 << 16)
            if not data:
                return True
            got += len(data)
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
    finally:
        sock.close()
    return False


def test_a_local_app_sending_to_a_client_that_stops_reading_is_let_go(sqlite_url):
    proc, port = start_serve("--service", "ws", "--app", "ws_sender:app",
                             "--write-timeout", "1", *COMMON,
                             env={"CLUSTER_DISCOVERY_URL": sqlite_url}, name="sender")
    try:
        client = stalled_client(port)
        wait_until(lambda: "SENDER stopped" in proc.output(), timeout=15,
                   what="the app's send() to fail")
        assert "SENDER stopped after" in proc.output()
        assert ": WebSocketError" in proc.output(), proc.output()[-2000:]
        assert drained_to_the_end(client)
        assert proc.poll() is None
        assert "Traceback" not in proc.output()
    finally:
        proc.stop()


def test_a_tunnel_to_a_client_that_stops_reading_is_closed(sqlite_url):
    env = {"CLUSTER_DISCOVERY_URL": sqlite_url}
    app, app_port = start_serve("--service", "ws", "--app", "ws_sender:app", *COMMON,
                                env=env, name="sender")  # the default --write-timeout, 60
    try:
        front, front_port = start_serve("--ui-service", "ws", "--write-timeout", "1",
                                        *COMMON, env=env, name="front")
    except BaseException:
        app.stop()
        raise
    try:
        base = f"http://127.0.0.1:{front_port}"
        wait_until(lambda: table(base), timeout=20, what="the front sees the app")
        client = stalled_client(front_port)
        # The front closes both sides of its tunnel: the app's socket ends as well, long
        # before its own 60 s write timeout.
        wait_until(lambda: "SENDER stopped" in app.output(), timeout=15,
                   what="the app's send() to fail once the front let go")
        assert drained_to_the_end(client)
        assert "closing a WebSocket tunnel" in front.output(), front.output()[-2000:]
        for proc in (front, app):
            assert proc.poll() is None
            assert "Traceback" not in proc.output()
    finally:
        front.stop()
        app.stop()


def test_a_wrapped_app_sending_to_a_client_that_stops_reading_is_let_go(sqlite_url):
    """cluster.wrap() under a server of one's own: the local WebSocket writes to that
    server's socket, not the door's, and had no write timeout at all."""
    proc, port = start_library_app({"CLUSTER_DISCOVERY_URL": sqlite_url,
                                    "CLUSTER_SERVICE": "ws", "CLUSTER_WRITE_TIMEOUT": "1"},
                                   "ws_sender:app", name="wrapped-sender")
    try:
        client = stalled_client(port)
        wait_until(lambda: "SENDER stopped" in proc.output(), timeout=15,
                   what="the app's send() to fail")
        assert ": WebSocketError" in proc.output(), proc.output()[-2000:]
        assert drained_to_the_end(client)
        assert proc.poll() is None
    finally:
        proc.stop()


@pytest.mark.parametrize("wrapped", [False, True], ids=["cluster-serve", "cluster.wrap"])
def test_a_close_from_another_greenlet_waits_for_the_frame_being_sent(sqlite_url,
                                                                       wrapped):
    """The app closes from another greenlet while its sending greenlet waits for a slow
    client in the middle of a message: the close frame follows that message, whole. It
    was written into the message's payload (the client read it as data, then a frame
    cut short: 1006, not 4000)."""
    if wrapped:
        proc, port = start_library_app({"CLUSTER_DISCOVERY_URL": sqlite_url,
                                        "CLUSTER_SERVICE": "ws"}, "ws_sender:app",
                                       name="wrapped-sender")
    else:
        proc, port = start_serve("--service", "ws", "--app", "ws_sender:app", *COMMON,
                                 env={"CLUSTER_DISCOVERY_URL": sqlite_url}, name="sender")
    try:
        client = stalled_client(port, "/feed?close-after=0.3")
        time.sleep(0.8)  # the close comes while a send waits for this client
        data = b""
        client.settimeout(10)
        with client:
            while chunk := client.recv(1 << 16):
                data += chunk
        *messages, last = server_frames(data)
        assert messages
        for opcode, payload in messages:
            assert (opcode, payload) == (0x2, b"y" * 65536), (opcode, payload[:40])
        assert last == (0x8, b"\x0f\xa0later"), (last[0], last[1][:40])
        wait_until(lambda: "SENDER stopped" in proc.output(), timeout=10,
                   what="the app's next send() to fail")
        assert proc.poll() is None
        assert "Traceback" not in proc.output(), proc.output()[-3000:]
    finally:
        proc.stop()
