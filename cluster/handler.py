"""The pywsgi request handler `cluster` serves with.

Two things stock pywsgi lacks: TCP_NODELAY on accepted sockets (pywsgi writes headers
and body in two sends, and without it Nagle meets delayed ACKs: ~40 ms per small
keep-alive response, gevent issue #1233), and access to the raw client socket so an
upgraded connection (WebSocket) can be handed to a byte pump.
"""

from __future__ import annotations

import socket
from typing import Any

from gevent.pywsgi import WSGIHandler

#: environ key holding the accepted client socket (gunicorn uses 'gunicorn.socket').
SOCKET_KEY = "cluster.socket"


def set_nodelay(sock: Any) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # not TCP (a unix socket): nothing to tune


class ClusterHandler(WSGIHandler):  # type: ignore[misc]
    """WSGIHandler with TCP_NODELAY and the raw socket in the environ."""

    def handle(self) -> None:
        set_nodelay(self.socket)
        super().handle()

    def get_environ(self) -> dict[str, Any]:
        environ: dict[str, Any] = super().get_environ()
        environ[SOCKET_KEY] = self.socket
        return environ
