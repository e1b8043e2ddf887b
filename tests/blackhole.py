"""A TCP relay on 127.0.0.1 that can turn into a black hole: a store that stops answering.

Until :meth:`Relay.blackhole` it passes bytes both ways between each client and the
upstream port. After it, connections (old and new) are still accepted and held open, but
nothing goes through: the client's requests wait for answers that never come, as when a
firewall starts dropping a database host's packets or the server hangs.

``python tests/blackhole.py UPSTREAM_PORT`` runs one and prints its port; SIGUSR1 makes
it a black hole (for trying a stop by hand).
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from typing import Iterator


class Relay:
    """A relay on a port the OS picks (:attr:`port`), in threads of this process."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = int(self.listener.getsockname()[1])
        self.holed = threading.Event()
        self.closed = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def blackhole(self) -> None:
        """From now on, accept and hold every connection, pass nothing."""
        self.holed.set()

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()

    def _keep(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self._keep(client)
            if self.holed.is_set():
                continue  # held open, never answered
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            self._keep(server)
            for one, other in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(one, other), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)
                return
            if self.holed.is_set():
                continue  # dropped: the request is never answered
            try:
                sink.sendall(data)
            except OSError:
                return


@contextlib.contextmanager
def relay(upstream_port: int) -> Iterator[Relay]:
    one = Relay(upstream_port)
    try:
        yield one
    finally:
        one.close()


if __name__ == "__main__":
    import signal

    hole = Relay(int(sys.argv[1]))
    signal.signal(signal.SIGUSR1, lambda *_: hole.blackhole())
    print(hole.port, flush=True)
    while True:
        signal.pause()
