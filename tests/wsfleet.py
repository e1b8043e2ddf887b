"""Many WebSocket clients of a cluster of echo instances, and the instances themselves.

Shared by tests/test_placement_e2e.py and bench/placement_bench.py. Instances serve
tests/apps/gws_echo.py (``cmd:name`` answers the instance name) and are reached
through balancer-only instances; each client knows which instance holds it. A client
that sees a close with 1001 (going away) reconnects through a random balancer, as a
browser's reconnecting client does; anything else it sees is kept as an error.
"""

from __future__ import annotations

import contextlib
import random
import selectors
import struct
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import requests
import websocket

from helpers import Proc, start_serve, wait_until

COMMON = ("--ping-interval", "1", "--expiry-grace", "1")


@dataclass
class Bed:
    """The processes of one run: instances by name, balancers' ports."""

    store: str
    service: str = "echo"
    instances: dict[str, tuple[Proc, int]] = field(default_factory=dict)
    balancers: list[tuple[Proc, int]] = field(default_factory=list)

    def instance(self, name: str, *extra: str) -> int:
        proc, port = start_serve("--service", self.service, "--app", "gws_echo:app",
                                 *COMMON, *extra, name=name,
                                 env={"CLUSTER_DISCOVERY_URL": self.store,
                                      "BACKEND_NAME": name})
        self.instances[name] = (proc, port)
        return port

    def balancer(self, *extra: str) -> int:
        proc, port = start_serve("--ui-service", self.service, *COMMON, *extra,
                                 name=f"balancer{len(self.balancers)}",
                                 env={"CLUSTER_DISCOVERY_URL": self.store})
        self.balancers.append((proc, port))
        return port

    def status(self, port: int) -> dict:
        return requests.get(f"http://127.0.0.1:{port}/_cluster/status", timeout=5).json()

    def wait_seen(self, count: int, timeout: float = 20.0) -> None:
        """Until every balancer lists ``count`` live endpoints of the service."""
        for _, port in self.balancers:
            wait_until(lambda port=port: len([
                r for r in self.status(port)["endpoints"]
                if r["service"] == self.service]) == count,
                timeout=timeout, what=f"balancer {port} to see {count} endpoints")

    def close(self) -> None:
        for proc, _ in [*self.balancers, *self.instances.values()]:
            proc.stop()

    def outputs(self) -> str:
        return "\n".join(f"--- {proc.name}\n{proc.output()[-3000:]}"
                         for proc, _ in [*self.instances.values(), *self.balancers])


@contextlib.contextmanager
def bed(store: str, instances: int, balancers: int, *extra: str) -> Iterator[Bed]:
    """``instances`` echo instances (named i0, i1, ...) and ``balancers`` balancers,
    all stopped by PID at the end."""
    made = Bed(store)
    try:
        for n in range(instances):
            made.instance(f"i{n}", *extra)
        for _ in range(balancers):
            made.balancer(*extra)
        made.wait_seen(instances)
        yield made
    finally:
        made.close()


class Client:
    """One WebSocket client: where it is, how often it moved, what went wrong."""

    def __init__(self, number: int, cookie: str = "", keep: bool = False) -> None:
        self.number = number
        #: the Cookie header it sends on every (re)connect, as a browser sends the
        #: sticky cookie its page load got
        self.cookie = cookie
        #: keep the cookie a 101 sets, as a browser does (else it is ignored)
        self.keep = keep
        self.ws: websocket.WebSocket | None = None
        self.sock: object = None  # what the selector knows it by
        self.home = ""
        self.homes: list[str] = []
        self.closes: list[int] = []
        self.headers: dict[str, str] = {}

    def connect(self, port: int, timeout: float = 10.0) -> str:
        ws = websocket.create_connection(f"ws://127.0.0.1:{port}/c{self.number}",
                                         timeout=timeout, cookie=self.cookie or None)
        self.headers = {k.lower(): v for k, v in (ws.getheaders() or {}).items()}
        if self.keep and "set-cookie" in self.headers:
            self.cookie = self.headers["set-cookie"].partition(";")[0]
        ws.send("cmd:name")
        self.home = str(ws.recv())
        self.homes.append(self.home)
        self.ws = ws
        return self.home


class Fleet:
    """Clients spread over the balancers, reconnecting after a 1001 close."""

    def __init__(self, balancer_ports: Sequence[int], seed: int | None = None) -> None:
        self.ports = list(balancer_ports)
        self.random = random.Random(seed)
        self.clients: list[Client] = []
        self.errors: list[str] = []
        self.selector = selectors.DefaultSelector()

    def open(self, count: int, rate: float = 0.0, cookie: str = "", keep: bool = False) -> None:
        """Open ``count`` clients, each through a balancer drawn at random, at most
        ``rate`` a second (0: as fast as they connect), each sending ``cookie`` (and,
        ``keep``: the one a 101 sets)."""
        started = time.monotonic()
        for n in range(count):
            if rate:
                time.sleep(max(0.0, started + n / rate - time.monotonic()))
            client = Client(len(self.clients), cookie, keep)
            self.clients.append(client)
            self._connect(client)

    def _connect(self, client: Client) -> None:
        try:
            client.connect(self.random.choice(self.ports))
        except (OSError, websocket.WebSocketException) as exc:
            self.errors.append(f"client {client.number}: connect failed: {exc!r}")
            client.ws = None
            return
        assert client.ws is not None
        client.sock = client.ws.sock
        self.selector.register(client.sock, selectors.EVENT_READ, client)

    def counts(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for client in self.clients:
            if client.ws is not None:
                found[client.home] = found.get(client.home, 0) + 1
        return found

    def poll(self, seconds: float) -> None:
        """Handle what the servers send for ``seconds``: a 1001 close makes the client
        reconnect; any other frame, close code or error is recorded in ``errors``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            for key, _ in self.selector.select(min(left, 0.2)):
                self._readable(key.data)

    def _readable(self, client: Client) -> None:
        ws = client.ws
        assert ws is not None
        try:
            opcode, frame = ws.recv_data_frame(True)
        except (OSError, websocket.WebSocketException) as exc:
            self.errors.append(f"client {client.number} on {client.home}: {exc!r}")
            self._drop(client)
            return
        if opcode != websocket.ABNF.OPCODE_CLOSE:
            self.errors.append(f"client {client.number}: unexpected frame {opcode}")
            return
        code = struct.unpack("!H", frame.data[:2])[0] if len(frame.data) >= 2 else 1005
        client.closes.append(code)
        self._drop(client)
        if code != 1001:
            self.errors.append(f"client {client.number} on {client.home}: closed with {code}")
            return
        self._connect(client)

    def _drop(self, client: Client) -> None:
        ws = client.ws
        if ws is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(client.sock)
        with contextlib.suppress(OSError, websocket.WebSocketException):
            ws.shutdown()
        client.ws = None

    def close(self) -> None:
        for client in self.clients:
            ws = client.ws
            if ws is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(client.sock)
                with contextlib.suppress(OSError, websocket.WebSocketException):
                    ws.close(timeout=1)
                client.ws = None
        self.selector.close()


def spread(counts: dict[str, int], names: Sequence[str]) -> tuple[float, float]:
    """(max/mean, population standard deviation) of the sockets per instance."""
    values = [counts.get(name, 0) for name in names]
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    return (max(values) / mean if mean else 0.0), std
