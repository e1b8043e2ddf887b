"""Client load for the fault runs: WebSocket echo clients and a light Python HTTP load.

Plain threads (no monkey-patching), so the bench and the tests can use them as they are.

A WebSocket client sends a numbered text message, waits for its echo, then reads the
socket for ``interval`` (an event-driven client: a close frame is seen as it arrives).
When the server closes the socket it records the close code (1006 when the connection
ended without a close frame, ``timeout`` when no echo came within the read timeout),
reconnects through the same front, and sends the unanswered message again: a message
whose echo never arrives by the end of the run is *lost*.
"""

from __future__ import annotations

import http.client
import select
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import websocket


@dataclass
class WsStats:
    sent: int = 0  # distinct messages
    echoed: int = 0  # distinct messages whose echo came back
    wrong: int = 0  # echoes that did not match the message
    connects: int = 0
    failed_connects: int = 0  # handshakes that failed (each retried 0.1 s later)
    closes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # why connects failed
    connected_at_end: int = 0
    clients: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def lost(self) -> int:
        return self.sent - self.echoed

    def closes_text(self) -> str:
        return ", ".join(f"{code}: {n}" for code, n in sorted(self.closes.items())) or "none"


def _code(payload: bytes) -> str:
    """The status code of a close frame's payload (1005: none given)."""
    return str(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else "1005"


class _Closed(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class WsClient(threading.Thread):
    """One echo client bound to one front (it reconnects there)."""

    def __init__(self, number: int, url: str, stats: WsStats, stop: threading.Event,
                 interval: float = 0.2, read_timeout: float = 10.0) -> None:
        super().__init__(name=f"ws-{number}", daemon=True)
        self.number = number
        self.url = url
        self.stats = stats
        self.stop = stop
        self.interval = interval
        self.read_timeout = read_timeout
        self.ws: websocket.WebSocket | None = None
        self.ready = threading.Event()
        self.give_up = float("inf")  # set to a time shortly after the stop

    def _connect(self) -> websocket.WebSocket | None:
        """A new connection through this client's front; retried every 0.1 s until the
        run is over (None then: this client did not get back in)."""
        while not self.stop.is_set() or time.monotonic() < self.give_up:
            try:
                ws = websocket.create_connection(self.url, timeout=self.read_timeout)
            except Exception as exc:  # noqa: BLE001 - handshake refused, reset, 5xx...
                with self.stats.lock:
                    self.stats.failed_connects += 1
                    self.stats.errors[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
                time.sleep(0.1)
                continue
            with self.stats.lock:
                self.stats.connects += 1
            return ws
        return None

    def _echo(self, ws: websocket.WebSocket, message: str) -> str:
        try:
            ws.send(message)
            while True:
                opcode, frame = ws.recv_data_frame(True)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    raise _Closed(_code(frame.data))
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    return frame.data.decode()
        except websocket.WebSocketTimeoutException as exc:
            raise _Closed("timeout") from exc
        except (websocket.WebSocketConnectionClosedException, OSError) as exc:
            raise _Closed("1006") from exc

    def _idle(self, ws: websocket.WebSocket) -> None:
        """Wait ``interval`` as an event-driven client does: reading, so a close frame
        is seen when it arrives (not only when the next echo is awaited)."""
        until = time.monotonic() + self.interval
        while (left := until - time.monotonic()) > 0:
            if not select.select([ws.sock], [], [], left)[0]:
                return
            try:
                opcode, frame = ws.recv_data_frame(True)
            except (websocket.WebSocketConnectionClosedException, OSError) as exc:
                raise _Closed("1006") from exc
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                raise _Closed(_code(frame.data))
            if opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
                with self.stats.lock:
                    self.stats.wrong += 1  # nothing was asked

    def run(self) -> None:
        stats = self.stats
        self.ws = self._connect()
        self.ready.set()
        seq = 0
        pending: str | None = None
        while self.ws is not None and (pending is not None or not self.stop.is_set()):
            if self.stop.is_set() and time.monotonic() > self.give_up:
                break  # the last message could not be finished in time
            if pending is None:
                seq += 1
                pending = f"{self.number}:{seq}"
                with stats.lock:
                    stats.sent += 1
            try:
                reply = self._echo(self.ws, pending)
            except _Closed as closed:
                with stats.lock:
                    stats.closes[closed.code] += 1
                self.ws.shutdown()
                self.ws = self._connect()
                continue
            with stats.lock:
                if reply == pending:
                    stats.echoed += 1
                else:
                    stats.wrong += 1
            pending = None
            try:
                self._idle(self.ws)
            except _Closed as closed:  # closed while idle: nothing was in flight
                with stats.lock:
                    stats.closes[closed.code] += 1
                self.ws.shutdown()
                self.ws = self._connect()
        if self.ws is None:
            return
        with stats.lock:
            stats.connected_at_end += 1
        try:
            self.ws.close(timeout=2)  # a clean 1000 from our side
        except Exception:  # noqa: BLE001 - the run is over either way
            self.ws.shutdown()


class WsFleet:
    """``count`` clients, spread over ``urls`` in turn."""

    def __init__(self, urls: list[str], count: int, interval: float = 0.2) -> None:
        self.stats = WsStats(clients=count)
        self.stop = threading.Event()
        self.clients = [WsClient(n, urls[n % len(urls)], self.stats, self.stop, interval)
                        for n in range(count)]

    def start(self, timeout: float = 30.0) -> None:
        for client in self.clients:
            client.start()
        deadline = time.monotonic() + timeout
        for client in self.clients:
            if not client.ready.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError("WebSocket clients did not all connect")

    def finish(self, timeout: float = 30.0) -> WsStats:
        for client in self.clients:
            client.give_up = time.monotonic() + 15
        self.stop.set()
        deadline = time.monotonic() + timeout
        for client in self.clients:
            client.join(max(0.0, deadline - time.monotonic()))
        return self.stats


@dataclass
class HttpStats:
    requests: int = 0
    failed: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class HttpLoad:
    """Keep-alive GETs from ``per_front`` threads per front, ``pause`` s apart."""

    def __init__(self, ports: list[int], path: str = "/whoami", per_front: int = 1,
                 pause: float = 0.01) -> None:
        self.stats = HttpStats()
        self.stop = threading.Event()
        self.path = path
        self.pause = pause
        self.threads = [threading.Thread(target=self._run, args=(port,), daemon=True)
                        for port in ports for _ in range(per_front)]

    def _run(self, port: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while not self.stop.is_set():
            try:
                conn.request("GET", self.path)
                response = conn.getresponse()
                body = response.read()
                ok = response.status == 200
                why = f"{response.status} {body[:80]!r}"
                if response.getheader("Connection", "").lower() == "close":
                    conn.close()
            except (OSError, http.client.HTTPException) as exc:
                ok, why = False, f"{type(exc).__name__}: {exc}"
                conn.close()
            with self.stats.lock:
                self.stats.requests += 1
                if not ok:
                    self.stats.failed += 1
                    self.stats.failures[why] += 1
            time.sleep(self.pause)
        conn.close()

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def finish(self) -> HttpStats:
        self.stop.set()
        for thread in self.threads:
            thread.join(15)
        return self.stats
