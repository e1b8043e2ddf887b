"""A stopping instance closes its WebSockets with 1001 (going away), so clients
reconnect to a live instance: both tunnels it carries and sockets its own app serves."""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import time
from pathlib import Path
from typing import Iterator

import requests
import websocket

from helpers import Proc, cluster_argv, server_frames, start_app, start_serve, wait_until

TIMEOUT = 15


def serve(stops: contextlib.ExitStack, name: str, discovery: str, *args: str) -> tuple[
        Proc, int]:
    """`cluster serve` on a port the OS picks, stopped by PID when ``stops`` ends."""
    proc, port = start_serve("--ping-interval", "1", *args,
                             env={"CLUSTER_DISCOVERY_URL": discovery}, name=name)
    stops.callback(proc.stop)
    return proc, port


def registered(stops: contextlib.ExitStack, script: str, service: str,
               discovery: str) -> tuple[Proc, int, Proc]:
    """A test app of tests/apps on a port the OS picks and a `cluster register` sidecar
    that lists it as ``service``: (app, its port, sidecar), stopped when ``stops`` ends."""
    app, port = start_app(script, name=script.removesuffix(".py"))
    stops.callback(app.stop)
    sidecar = Proc(cluster_argv("register", "--service", service, "--endpoint-url",
                                f"http://127.0.0.1:{port}", "--ping-interval", "1"),
                   env={"CLUSTER_DISCOVERY_URL": discovery}, name="sidecar")
    stops.callback(sidecar.stop)
    return app, port, sidecar


def close_code(ws: websocket.WebSocket) -> int:
    """Read until the server's close frame; its status code."""
    while True:
        opcode, frame = ws.recv_data_frame(True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return int(struct.unpack("!H", frame.data[:2])[0])


def test_stopping_balancer_and_endpoint_close_websockets_with_1001(tmp_path: Path) -> None:
    discovery = f"sqlite://{tmp_path / 'discovery.sqlite3'}"
    with contextlib.ExitStack() as stops:  # sockets released, then local, front, ...
        registered(stops, "ws_echo.py", "ws", discovery)
        front, front_port = serve(stops, "front", discovery, "--ui-service", "ws")
        local, local_port = serve(stops, "local", discovery, "--service", "lib",
                                  "--app", "library_door_app:hello")
        wait_until(lambda: requests.get(f"http://127.0.0.1:{front_port}/_cluster/status",
                                        timeout=5).json()["endpoints"],
                   timeout=TIMEOUT, what="the balancer to see the echo server")
        # the server closes them: shutdown() just releases the socket
        tunnelled = websocket.create_connection(f"ws://127.0.0.1:{front_port}/x",
                                                timeout=TIMEOUT)
        stops.callback(tunnelled.shutdown)
        served = websocket.create_connection(f"ws://127.0.0.1:{local_port}/",
                                             timeout=TIMEOUT)
        stops.callback(served.shutdown)
        for ws in (tunnelled, served):
            ws.send("before")
            assert ws.recv() == "before"
        front.signal(signal.SIGTERM)
        local.signal(signal.SIGTERM)
        assert close_code(tunnelled) == 1001
        assert close_code(served) == 1001
        assert front.wait(TIMEOUT) == 0 and local.wait(TIMEOUT) == 0
        assert "closed 1 WebSockets with 1001" in front.output()
    for proc in (front, local):
        assert "Traceback" not in proc.output(), proc.output()


def _raw_upgrade(path: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode()


def _read_until(sock: socket.socket, marker: bytes, limit: float = TIMEOUT) -> bytes:
    sock.settimeout(limit)
    data = b""
    while marker not in data:
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    return data


def test_upgrade_through_a_front_never_rides_a_pooled_connection(tmp_path: Path) -> None:
    """A pooled connection may lead to an endpoint that is stopping (it finishes what
    comes in on open connections but accepts no new ones): it would take the WebSocket
    and cut it when its drain ends. An upgrade gets a new connection, which a stopping
    endpoint refuses, so it goes to a live one."""
    discovery = f"sqlite://{tmp_path / 'discovery.sqlite3'}"
    with contextlib.ExitStack() as stops:  # front stopped first, the endpoint last
        endpoint, _, _ = registered(stops, "bad_endpoint.py", "bad", discovery)
        front, front_port = serve(stops, "front", discovery, "--ui-service", "bad")
        wait_until(lambda: requests.get(f"http://127.0.0.1:{front_port}/ok",
                                        timeout=5).status_code == 200,
                   timeout=TIMEOUT, what="the balancer to see the endpoint")
        assert endpoint.output().count("accepted") == 1  # that connection is pooled now
        with socket.create_connection(("127.0.0.1", front_port), timeout=TIMEOUT) as client:
            client.sendall(_raw_upgrade("/ws"))
            assert _read_until(client, b"\r\n\r\n").startswith(b"HTTP/1.1 101")
            lines = endpoint.output().splitlines()
        assert "upgrade on 2" in lines and "accepted 2" in lines, lines
    assert "Traceback" not in front.output(), front.output()


def test_websocket_opened_during_the_drain_is_closed_with_1001(tmp_path: Path) -> None:
    """An upgrade on a connection opened before the stop (the stop closes idle
    connections, not ones in the middle of a request head) is served, then closed with
    1001 at once instead of being cut without a close frame when the drain ends."""
    discovery = f"sqlite://{tmp_path / 'discovery.sqlite3'}"
    local, port = start_serve("--ping-interval", "1", "--service", "web",
                              "--app", "gws_echo:app",
                              env={"CLUSTER_DISCOVERY_URL": discovery}, name="local")
    held: websocket.WebSocket | None = None
    late = socket.socket()
    try:
        held = websocket.create_connection(f"ws://127.0.0.1:{port}/", timeout=TIMEOUT)
        late.connect(("127.0.0.1", port))
        upgrade = _raw_upgrade("/")
        late.sendall(upgrade[:20])  # the head has begun: not an idle connection
        local.signal(signal.SIGTERM)
        assert close_code(held) == 1001
        wait_until(lambda: "closed 1 WebSockets with 1001" in local.output(),
                   timeout=TIMEOUT, what="the stop to close the open WebSocket")
        late.sendall(upgrade[20:])
        started = time.monotonic()
        answer = _read_until(late, b"going away", limit=5)
        head, _, frame = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), answer
        assert frame[:1] == b"\x88" and frame[2:4] == b"\x03\xe9", answer  # close, 1001
        assert time.monotonic() - started < 2
        late.close()
        assert local.wait(TIMEOUT) == 0
    finally:
        if held is not None:
            held.shutdown()
        late.close()
        local.stop()
    assert "Traceback" not in local.output(), local.output()


def test_a_local_sockets_1001_ends_in_a_clean_closing_handshake(tmp_path: Path) -> None:
    """The 1001 of a socket the instance's own app serves (a stop, a drain, rebalancing)
    is its only close frame, and once the client answers it the connection ends with a
    FIN. It was followed by a second close frame (1000, from gevent-websocket once the
    app returned), which a browser takes for a failed connection: Chromium reported
    1006 and did not see the 1001 that asks it to reconnect."""
    discovery = f"sqlite://{tmp_path / 'discovery.sqlite3'}"
    local, port = start_serve("--ping-interval", "1", "--service", "web",
                              "--app", "gws_echo:app",
                              env={"CLUSTER_DISCOVERY_URL": discovery}, name="local")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            sock.sendall(_raw_upgrade("/"))
            head, _, early = _read_until(sock, b"\r\n\r\n").partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101"), head
            local.signal(signal.SIGTERM)
            frame = early + _read_until(sock, b"going away")
            assert frame[:4] == b"\x88\x13\x03\xe9", frame  # close, 1001
            sock.sendall(b"\x88\x82\x00\x00\x00\x00\x03\xe9")  # the answer, as a browser's
            answered = time.monotonic()
            rest = frame[2 + frame[1]:] + _read_until(sock, b"\x88", limit=5)
            assert rest == b"", rest  # then EOF: no other frame, no reset
            # The closing handshake is complete: the server closes the TCP connection
            # (RFC 6455 7.1.1), and the stop need not wait for this client, which keeps
            # its side open, as websocket-client does, until the server's close.
            assert local.wait(TIMEOUT) == 0
            took = time.monotonic() - answered
        assert took < 2.0, f"the stop waited {took:.1f} s for the client's FIN"
    finally:
        local.stop()
    assert "Traceback" not in local.output(), local.output()


def test_a_local_sockets_1001_never_lands_in_the_middle_of_a_frame(tmp_path: Path) -> None:
    """A stop (a drain, rebalancing) closes a socket whose app is in the middle of
    sending a message to a client that reads slowly: the close frame comes after that
    message, whole. It was written at once, into the middle of the message's payload:
    the client read the close frame's bytes as data, then the end of the connection in
    the middle of a frame (1006, not the 1001 that asks it to reconnect)."""
    discovery = f"sqlite://{tmp_path / 'discovery.sqlite3'}"
    local, port = start_serve("--ping-interval", "1", "--service", "web",
                              "--app", "ws_sender:app",
                              env={"CLUSTER_DISCOVERY_URL": discovery}, name="sender")
    try:
        with _stopped_while_reading_nothing(port, local) as (_, data):
            pass
        *messages, last = server_frames(data)
        assert messages
        for opcode, payload in messages:
            assert (opcode, payload) == (0x2, b"y" * 65536), (opcode, payload[:40])
        assert last == (0x8, b"\x03\xe9server going away"), (last[0], last[1][:40])
        assert local.wait(TIMEOUT) == 0
    finally:
        local.stop()
    assert "Traceback" not in local.output(), local.output()


@contextlib.contextmanager
def _stopped_while_reading_nothing(port: int,
                                   stopping: Proc) -> Iterator[tuple[socket.socket, bytes]]:
    """A WebSocket through ``port`` to ws_sender:app whose client reads nothing for a
    while (the app's 64 KiB messages wait in a send, or in the tunnel), then SIGTERM to
    ``stopping``: the socket, and every byte that came after the 101, to the end."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.connect(("127.0.0.1", port))
        sock.sendall(_raw_upgrade("/"))
        head, _, data = _read_until(sock, b"\r\n\r\n").partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        time.sleep(0.5)
        stopping.signal(signal.SIGTERM)
        wait_until(lambda: "closed 1 WebSockets with 1001" in stopping.output(),
                   timeout=TIMEOUT, what="the stop to close the WebSocket")
        yield sock, data + _read_until(sock, b"no marker: until the end")


def test_a_tunnels_1001_never_lands_in_the_middle_of_a_frame(tmp_path: Path) -> None:
    """A stopping balancer closes a WebSocket it tunnels while the endpoint's message
    is on its way to a client that reads slowly: the close frame follows that message,
    whole, and the stop waits for it. It was written at once (what the tunnel still held
    for the client dropped), into the middle of the message: the client read a broken
    frame (1006 or 1002, not the 1001 that asks it to reconnect)."""
    discovery = f"sqlite://{tmp_path / 'discovery.sqlite3'}"
    with contextlib.ExitStack() as stops:
        serve(stops, "sender", discovery, "--service", "web", "--app", "ws_sender:app")
        front, port = serve(stops, "front", discovery, "--ui-service", "web")
        wait_until(lambda: requests.get(f"http://127.0.0.1:{port}/_cluster/status",
                                        timeout=5).json()["endpoints"],
                   timeout=TIMEOUT, what="the balancer to see the sender")
        with _stopped_while_reading_nothing(port, front) as (sock, data):
            sock.sendall(b"\x88\x82\x00\x00\x00\x00\x03\xe9")  # the answer, as a browser's
        *messages, last = server_frames(data)
        assert messages
        for opcode, payload in messages:
            assert (opcode, payload) == (0x2, b"y" * 65536), (opcode, payload[:40])
        assert last == (0x8, b"\x03\xe9"), (last[0], last[1][:40])
        assert front.wait(TIMEOUT) == 0
    assert "Traceback" not in front.output(), front.output()
