"""How long one big WebSocket message holds a gevent process: the door vs gevent-websocket.

    python bench/ws_big_message.py [--sizes 1,16] [--repeat 3]

Both servers run the same gevent-websocket echo app (tests/apps/gws_echo.py), pinned to
CPU 0 with ``taskset``:

- ``cluster``: ``cluster serve --app gws_echo:app`` (the door hands the app its socket,
  cluster/app_websocket.py: unmasking and UTF-8 checks in C);
- ``gevent-websocket``: gevent's WSGIServer with gevent-websocket's own handler, as its
  users serve it (unmasking byte by byte, the UTF-8 automaton in Python; wsaccel is not
  installed).

The client (this script, on CPU 1) sends one message of each size, binary and then
text (valid UTF-8, two bytes per character), pre-masked before the clock starts, and
times until the whole echo is back. Meanwhile a thread asks the same server for
``/whoami`` over keep-alive every 5 ms and keeps the longest wait: how long every other
client of that process waited. Figures are medians of ``--repeat`` runs. Every process is
started here and stopped by PID.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from cluster.app_websocket import unmask  # noqa: E402
from helpers import Proc, cluster_argv, python, start_reporting  # noqa: E402

PLAIN = """\
import sys
from gevent import monkey
monkey.patch_all()
from gevent.pywsgi import WSGIServer
from geventwebsocket.handler import WebSocketHandler
from gws_echo import app
from portfile import report_port
server = WSGIServer(("127.0.0.1", 0), app, handler_class=WebSocketHandler, log=None)
server.init_socket()
report_port(server.address, sys.argv[1])
server.serve_forever()
"""


def start(name: str, argv_for: Callable[[Path], list[str]], tmp: Path) -> tuple[Proc, int]:
    """``argv_for(port_file)`` pinned to CPU 0; the process and the port it reported."""
    return start_reporting(lambda port_file: ["taskset", "-c", "0", *argv_for(port_file)],
                           env={"CLUSTER_DISCOVERY_URL": f"sqlite://{tmp / 'd.sqlite3'}",
                                "BACKEND_NAME": name}, name=name)


def frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    return struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, len(payload)) + mask + \
        unmask(payload, mask)


def handshake(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def read_echo(sock: socket.socket, size: int) -> None:
    """Read one unmasked server frame of ``size`` payload bytes (its header: 10 bytes)."""
    left = size + 10
    buffer = bytearray(1 << 20)
    while left:
        got = sock.recv_into(buffer, min(left, len(buffer)))
        if not got:
            raise EOFError(f"closed with {left} bytes to go")
        left -= got


class Poller(threading.Thread):
    """GET /whoami every 5 ms on one keep-alive connection; the longest wait."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.longest = 0.0
        self.running = True

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        while self.running:
            began = time.perf_counter()
            conn.request("GET", "/whoami")
            conn.getresponse().read()
            self.longest = max(self.longest, time.perf_counter() - began)
            time.sleep(0.005)
        conn.close()


def measure(port: int, opcode: int, payload: bytes) -> tuple[float, float]:
    data = frame(opcode, payload)
    sock = handshake(port)
    poller = Poller(port)
    poller.start()
    time.sleep(0.05)
    try:
        began = time.perf_counter()
        sock.sendall(data)
        read_echo(sock, len(payload))
        took = time.perf_counter() - began
    finally:
        poller.running = False
        poller.join(130)
        sock.close()
    return took, poller.longest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,16", help="message sizes in MiB")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    os.sched_setaffinity(0, {1})
    tmp = Path(tempfile.mkdtemp(prefix="ws-big-"))
    servers: dict[str, tuple[Proc, int]] = {}
    try:
        servers["cluster"] = start("cluster", lambda f: cluster_argv(
            "serve", "--service", "gws", "--app", "gws_echo:app", "--bind", "127.0.0.1:0",
            "--port-file", str(f), "--max-websocket-message", str(max(sizes) << 20),
            "--log-level", "warning"), tmp)
        servers["gevent-websocket"] = start("gevent-websocket",
                                            lambda f: python("-c", PLAIN, str(f)), tmp)
        print("| message | server | echo ms | longest /whoami wait ms |")
        print("| --- | --- | ---: | ---: |")
        for size in sizes:
            for kind, opcode, payload in (
                    ("binary", 0x2, os.urandom(size << 20)),
                    ("text", 0x1, ("é" * (size << 19)).encode())):
                for name, (_proc, port) in servers.items():
                    runs = [measure(port, opcode, payload) for _ in range(args.repeat)]
                    echo = statistics.median(r[0] for r in runs) * 1000
                    wait = statistics.median(r[1] for r in runs) * 1000
                    print(f"| {size} MiB {kind} | {name} | {echo:,.0f} | {wait:,.0f} |",
                          flush=True)
    finally:
        for proc, _port in servers.values():
            proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
