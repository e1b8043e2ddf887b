"""A real WebSocket echo server on gevent-websocket, for the proxy tests and benchmarks.

Run alone: ``python tests/apps/ws_echo.py --port 9100`` (``--certfile C --keyfile K``
for https and wss).

It reads frames itself (gevent-websocket's ``read_frame``/``send_frame``) so it can say
what actually arrived: how many frames made the last message, which close code and
reason the client sent, which handshake headers it saw.

WebSocket on any path (``?id=NAME`` names the connection, ``?greet=1`` sends "hello"
right after the upgrade). Every message is echoed with its own type, except text
commands:

- ``cmd:headers``     -> JSON of the upgrade request's headers and path
- ``cmd:frames``      -> number of frames of the previous message
- ``cmd:close C R``   -> the server closes with code C and reason R
- ``cmd:ping P``      -> the server pings with payload P, then answers ``pong P`` once the
  client's pong arrived

The subprotocol ``echo.v2`` is chosen when the client offers it. Plain HTTP:
``GET /closes?id=NAME`` -> JSON ``{"code": C, "reason": R}`` of the close frame received
on that connection (404 until one arrived); ``/forbidden`` refuses the upgrade with 403.
"""

from __future__ import annotations

import json
import os
import struct
from urllib.parse import parse_qs

from geventwebsocket.exceptions import WebSocketError
from geventwebsocket.handler import WebSocketHandler
from geventwebsocket.websocket import WebSocket

from portfile import add_port_arguments, report_port

PROTOCOL = "echo.v2"
CLOSES: dict[str, dict[str, object]] = {}


class EchoHandler(WebSocketHandler):
    """Refuses the upgrade on /forbidden like an app checking auth before upgrading."""

    def upgrade_websocket(self):
        if self.environ.get("PATH_INFO") == "/forbidden":
            body = b"forbidden by backend"
            self.start_response("403 Forbidden", [("Content-Type", "text/plain"),
                                                  ("Content-Length", str(len(body))),
                                                  ("X-Backend", "ws_echo")])
            return [body]
        return super().upgrade_websocket()

    def log_request(self):
        pass


def handshake_info(environ) -> dict[str, object]:
    headers = {k[5:].replace("_", "-").title(): v for k, v in environ.items()
               if k.startswith("HTTP_")}
    return {"headers": headers, "path": environ.get("PATH_INFO"),
            "query": environ.get("QUERY_STRING", ""), "remote": environ.get("REMOTE_ADDR")}


def close_with(ws: WebSocket, code: int, reason: str) -> None:
    """Send a close frame with code and reason; gevent-websocket's own close() drops the
    code, so the frame is built here. The handler closes the TCP connection afterwards."""
    try:
        ws.send_frame(struct.pack("!H", code) + reason.encode("utf-8"), WebSocket.OPCODE_CLOSE)
    finally:
        ws.closed = True


def run_socket(ws: WebSocket, environ) -> None:
    query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    name = query.get("id", "")
    info = handshake_info(environ)
    if query.get("greet"):
        ws.send("hello")
    if query.get("flood"):  # only send, 64 KiB at a time, until a send fails
        try:
            while True:
                ws.send(b"y" * 65536, binary=True)
        except (WebSocketError, OSError):
            return
    opcode, message, frames, last_frames = None, bytearray(), 0, 0
    waiting_pong = None
    while True:
        try:
            header, payload = ws.read_frame()
        except (WebSocketError, OSError):  # the client vanished: nothing to record
            return
        op = header.opcode
        if op == WebSocket.OPCODE_CLOSE:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
            reason = payload[2:].decode("utf-8", "replace")
            CLOSES[name] = {"code": code, "reason": reason}
            close_with(ws, code or 1000, reason)  # echo the close (RFC 6455 5.5.1)
            return
        if op == WebSocket.OPCODE_PING:
            ws.send_frame(payload, WebSocket.OPCODE_PONG)
            continue
        if op == WebSocket.OPCODE_PONG:
            if waiting_pong is not None and payload == waiting_pong:
                ws.send("pong " + payload.decode())
                waiting_pong = None
            continue
        if op in (WebSocket.OPCODE_TEXT, WebSocket.OPCODE_BINARY):
            opcode, message, frames = op, bytearray(payload), 1
        else:  # continuation
            message += payload
            frames += 1
        if not header.fin:
            continue
        if opcode == WebSocket.OPCODE_BINARY:
            ws.send(bytes(message), binary=True)
            last_frames = frames
            continue
        text = message.decode("utf-8")
        if text == "cmd:headers":
            ws.send(json.dumps(info))
        elif text == "cmd:frames":
            ws.send(str(last_frames))
        elif text.startswith("cmd:close "):
            _cmd, code_text, reason = (text.split(" ", 2) + [""])[:3]
            close_with(ws, int(code_text), reason)
            return
        elif text.startswith("cmd:ping "):
            ping = text[len("cmd:ping "):]
            waiting_pong = ping.encode()
            ws.send_frame(ping, WebSocket.OPCODE_PING)  # str: gevent-websocket encodes it
        else:
            ws.send(text)  # str, so it goes out as text (bytes would become "b'...'")
            last_frames = frames


class App:
    def app_protocol(self, path: str) -> str:
        """gevent-websocket picks this subprotocol when the client offers it."""
        return PROTOCOL

    def __call__(self, environ, start_response):
        ws = environ.get("wsgi.websocket")
        if ws is not None:
            run_socket(ws, environ)
            return []
        path = environ.get("PATH_INFO", "/")
        query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        if path == "/closes":
            found = CLOSES.get(query.get("id", ""))
            body = json.dumps(found).encode()
            status = "200 OK" if found is not None else "404 Not Found"
        else:
            body, status = f"ws_echo {os.getpid()}".encode(), "200 OK"
        start_response(status, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(body)))])
        return [body]


app = App()


def raise_nofile() -> None:
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    from gevent import monkey

    monkey.patch_all()
    import argparse
    import signal

    import gevent
    from gevent.pywsgi import WSGIServer

    parser = argparse.ArgumentParser()
    add_port_arguments(parser)
    parser.add_argument("--certfile", help="serve https/wss with this certificate")
    parser.add_argument("--keyfile")
    args = parser.parse_args()
    raise_nofile()
    tls = {"certfile": args.certfile, "keyfile": args.keyfile} if args.certfile else {}
    server = WSGIServer(("127.0.0.1", args.port), app, handler_class=EchoHandler,
                        log=None, backlog=4096, **tls)
    server.init_socket()
    report_port(server.address, args.port_file)
    gevent.signal_handler(signal.SIGTERM, server.stop, 1)
    server.serve_forever()


if __name__ == "__main__":
    main()
