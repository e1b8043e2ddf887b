"""The pywsgi request handler `cluster` serves with.

Three things stock pywsgi lacks: TCP_NODELAY on accepted sockets (pywsgi writes headers
and body in two sends, and without it Nagle meets delayed ACKs: ~40 ms per small
keep-alive response, gevent issue #1233), access to the raw client socket, and a way
to take the connection away from pywsgi for an upgraded protocol (WebSocket) so that
a byte pump owns it and pywsgi neither writes a response nor reads another request.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, Callable

from gevent.pywsgi import WSGIHandler

log = logging.getLogger(__name__)

#: environ key holding the accepted client socket (gunicorn uses 'gunicorn.socket').
SOCKET_KEY = "cluster.socket"
#: environ key holding :meth:`ClusterHandler.hijack` (absent under other servers).
HIJACK_KEY = "cluster.hijack"

#: What ``environ[HIJACK_KEY]`` is: ``hijack(status) -> (client socket, early bytes)``.
Hijack = Callable[[str], tuple[Any, bytes]]


def set_nodelay(sock: Any) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # not TCP (a unix socket): nothing to tune


def take_buffered(rfile: Any, sock: Any) -> bytes:
    """Bytes the request reader already pulled off ``sock`` beyond the request head.

    A client may send its first frames right behind the upgrade request; pywsgi's
    buffered reader then holds them. ``read1`` returns the buffer without touching the
    socket when it is not empty; with the socket switched to non-blocking for the call,
    an empty buffer costs one ``recv`` that cannot wait.
    """
    timeout = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        data = rfile.read1(65536)
    except OSError:
        data = b""  # the client is gone already; the pump will find out
    finally:
        sock.settimeout(timeout)
    return bytes(data or b"")


class ClusterHandler(WSGIHandler):  # type: ignore[misc]
    """WSGIHandler with TCP_NODELAY, the raw socket and a hijack hook in the environ.

    After :meth:`hijack` the application owns the connection: whatever it returns is
    discarded, no status line or error page is written, and the connection is closed
    (not reused for keep-alive) once the application returns. gevent-websocket's
    handler and gunicorn's workers solve the same problem by flagging the connection
    as upgraded; here the flag is set by the one who takes the socket.
    """

    hijacked = False

    def handle(self) -> None:
        set_nodelay(self.socket)
        super().handle()

    def get_environ(self) -> dict[str, Any]:
        environ: dict[str, Any] = super().get_environ()
        environ[SOCKET_KEY] = self.socket
        environ[HIJACK_KEY] = self.hijack
        return environ

    def hijack(self, status: str = "101 Switching Protocols") -> tuple[Any, bytes]:
        """Hand the client connection to the caller; return it and its early bytes.

        ``status`` is only what the access log shows. The caller writes the response
        head itself and must close the socket when done. Raises RuntimeError when a
        response was already started on this request (too late to take over).
        """
        if self.headers_sent:
            raise RuntimeError("response already started; cannot hijack")
        if self.hijacked:
            raise RuntimeError("connection already hijacked")
        self.hijacked = True
        self.close_connection = True
        early = take_buffered(self.rfile, self.socket)
        # Closing the reader drops its reference on the socket, so closing the socket
        # from the pump really closes it (and wakes greenlets blocked on it); pywsgi's
        # request loop also stops at a closed reader.
        self.rfile.close()
        # For the access log only: format_request prefers the native status string, and
        # gunicorn's access log reads response_headers (possibly a previous request's).
        self.status = status.encode("latin-1")
        self._orig_status = status
        self.response_headers: list[tuple[bytes, bytes]] = []
        return self.socket, early

    def process_result(self) -> None:
        if self.hijacked:
            return  # the new owner already answered; never append an HTTP response
        super().process_result()

    def _send_error_response_if_possible(self, error_code: int) -> None:
        if self.hijacked:
            # An error after the takeover: a 500 page would be garbage in the middle
            # of a WebSocket stream. Just make sure the connection is not reused.
            self.close_connection = True
            return
        super()._send_error_response_if_possible(error_code)

    def handle_one_request(self) -> Any:
        self.hijacked = False
        return super().handle_one_request()

    def handle_one_response(self) -> None:
        try:
            super().handle_one_response()
        finally:
            # The bound method in the environ is a handler -> environ -> handler cycle:
            # break it so a finished connection is freed by refcounting, not by the gc.
            environ = getattr(self, "environ", None)
            if environ is not None:
                environ.pop(HIJACK_KEY, None)
