"""A stopping instance closes its WebSockets with 1001 (going away), so clients
reconnect to a live instance: both tunnels it carries and sockets its own app serves."""

from __future__ import annotations

import signal
import socket
import struct
from pathlib import Path

import requests
import websocket

from helpers import TESTS, Proc, cluster_argv, python, wait_port, wait_until

TIMEOUT = 15


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(tmp: Path, name: str, discovery: str, *args: str) -> tuple[Proc, int]:
    port_file = tmp / f"{name}.port"
    proc = Proc(cluster_argv("serve", "--bind", "127.0.0.1:0", "--port-file", str(port_file),
                             "--ping-interval", "1", *args),
                env={"CLUSTER_DISCOVERY_URL": discovery}, name=name)
    text = wait_until(lambda: port_file.exists() and port_file.read_text(), timeout=20,
                      what=f"{name}'s port file")
    return proc, int(text.strip().rsplit(":", 1)[1])


def close_code(ws: websocket.WebSocket) -> int:
    """Read until the server's close frame; its status code."""
    while True:
        opcode, frame = ws.recv_data_frame(True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return int(struct.unpack("!H", frame.data[:2])[0])


def test_stopping_balancer_and_endpoint_close_websockets_with_1001(tmp_path: Path) -> None:
    discovery = f"sqlite://{tmp_path / 'discovery.sqlite3'}"
    echo_port = _free_port()
    echo = Proc(python(str(TESTS / "apps" / "ws_echo.py"), "--port", str(echo_port)),
                name="echo")
    sidecar = Proc(cluster_argv("register", "--service", "ws", "--endpoint-url",
                                f"http://127.0.0.1:{echo_port}", "--ping-interval", "1"),
                   env={"CLUSTER_DISCOVERY_URL": discovery}, name="sidecar")
    front, front_port = serve(tmp_path, "front", discovery, "--ui-service", "ws")
    local, local_port = serve(tmp_path, "local", discovery, "--service", "lib",
                              "--app", "library_door_app:hello")
    sockets: list[websocket.WebSocket] = []
    try:
        wait_port(echo_port, proc=echo)
        wait_until(lambda: requests.get(f"http://127.0.0.1:{front_port}/_cluster/status",
                                        timeout=5).json()["endpoints"],
                   timeout=TIMEOUT, what="the balancer to see the echo server")
        tunnelled = websocket.create_connection(f"ws://127.0.0.1:{front_port}/x",
                                                timeout=TIMEOUT)
        served = websocket.create_connection(f"ws://127.0.0.1:{local_port}/",
                                             timeout=TIMEOUT)
        sockets += [tunnelled, served]
        for ws in (tunnelled, served):
            ws.send("before")
            assert ws.recv() == "before"
        front.signal(signal.SIGTERM)
        local.signal(signal.SIGTERM)
        assert close_code(tunnelled) == 1001
        assert close_code(served) == 1001
        assert front.wait(TIMEOUT) == 0 and local.wait(TIMEOUT) == 0
        assert "closed 1 WebSockets with 1001" in front.output()
    finally:
        for ws in sockets:
            ws.shutdown()  # the server closed already: just release the socket
        for proc in (front, local, sidecar, echo):
            proc.stop()
    for proc in (front, local):
        assert "Traceback" not in proc.output(), proc.output()

