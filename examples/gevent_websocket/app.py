"""A plain WSGI WebSocket echo on gevent-websocket: ``environ['wsgi.websocket']``.

Run: ``cluster serve --service ws --app app:app --bind 127.0.0.1:8000`` and connect a
WebSocket client to ws://127.0.0.1:8000/echo.
"""

from __future__ import annotations

import os


def app(environ: dict, start_response) -> list[bytes]:
    ws = environ.get("wsgi.websocket")
    if ws is None:
        body = f"connect a WebSocket to /echo (pid {os.getpid()})".encode()
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    ws.send(f"hello from pid {os.getpid()}")
    while True:
        message = ws.receive()
        if message is None:  # the client closed
            break
        ws.send(message)
    return []
