"""Load for the drain, rolling deploy and version tests: HTTP clients that record who
served each request, and WebSocket clients that record how their socket was closed.

Plain threads (no monkey-patching). The apps answer ``/whoami`` with their instance
name (tests/apps/gws_echo.py, or version_app.py with its version).
"""

from __future__ import annotations

import http.client
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import websocket


@dataclass
class Served:
    requests: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    #: (time.monotonic(), body) of every answer
    answers: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def by(self, since: float = 0.0) -> Counter[str]:
        with self.lock:
            return Counter(body for at, body in self.answers if at >= since)


class HttpLoad:
    """``clients`` threads sending keep-alive GETs to ``port``, ``pause`` s apart; each
    sends ``cookie`` when given (a session), else none (a new session every time)."""

    def __init__(self, port: int, clients: int = 2, path: str = "/whoami",
                 cookie: str = "", pause: float = 0.01) -> None:
        self.port, self.path, self.cookie, self.pause = port, path, cookie, pause
        self.stats = Served()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> HttpLoad:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def finish(self) -> Served:
        self.stop.set()
        for thread in self.threads:
            thread.join(15)
        return self.stats

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        headers = {"Cookie": self.cookie} if self.cookie else {}
        while not self.stop.is_set():
            body = ""
            try:
                conn.request("GET", self.path, headers=headers)
                response = conn.getresponse()
                body = response.read().decode(errors="replace")
                why = "" if response.status == 200 else f"{response.status} {body[:80]!r}"
                if response.getheader("Connection", "").lower() == "close":
                    conn.close()
            except (OSError, http.client.HTTPException) as exc:
                why = f"{type(exc).__name__}: {exc}"
                conn.close()
            with self.stats.lock:
                self.stats.requests += 1
                if why:
                    self.stats.failures[why] += 1
                else:
                    self.stats.answers.append((time.monotonic(), body))
            time.sleep(self.pause)
        conn.close()


class Socket(threading.Thread):
    """One open WebSocket: asks whom it reached, then reads until the server closes it
    (``code``: the close frame's status, ``1006`` without one) or ``done`` is set."""

    def __init__(self, url: str, cookie: str = "", timeout: float = 15.0) -> None:
        super().__init__(daemon=True)
        self.ws = websocket.create_connection(url, cookie=cookie or None, timeout=timeout)
        self.ws.send("cmd:name")
        self.name = self.ws.recv()
        self.code: int | None = None
        self.closed_at: float | None = None
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        self.ws.settimeout(0.2)
        while not self.done.is_set():
            try:
                opcode, frame = self.ws.recv_data_frame(True)
            except websocket.WebSocketTimeoutException:
                continue
            except (OSError, websocket.WebSocketException):
                self.code, self.closed_at = 1006, time.monotonic()
                return
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                data = frame.data
                self.code = int(struct.unpack("!H", data[:2])[0]) if len(data) >= 2 else 1005
                self.closed_at = time.monotonic()
                return

    def echo(self, text: str) -> str:
        """Send ``text`` and return the echo (on a socket still open)."""
        self.done.set()
        self.join(2)
        self.ws.settimeout(10)
        self.ws.send(text)
        return str(self.ws.recv())

    def close(self) -> None:
        self.done.set()
        self.join(2)
        try:
            self.ws.close(timeout=1)
        except (OSError, websocket.WebSocketException):
            pass
        self.ws.shutdown()  # close() does nothing once the server has closed
