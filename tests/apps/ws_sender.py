"""A WebSocket app that only sends: 64 KiB binary messages, for as long as it may.

``cluster serve --app ws_sender:app``. It never calls ``receive()``; when a ``send()``
fails it prints ``SENDER stopped after N messages: <exception class>`` and returns.
With ``?close-after=S`` another greenlet closes the socket (4000, ``later``) after S
seconds, while this one sends. Plain HTTP: ``/whoami`` -> ``BACKEND_NAME``.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qs

import gevent

MESSAGE = b"y" * 65536


def app(environ, start_response):
    ws = environ.get("wsgi.websocket")
    if ws is None:
        body = os.environ.get("BACKEND_NAME", "sender").encode()
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    after = parse_qs(environ.get("QUERY_STRING", "")).get("close-after")
    if after:
        gevent.spawn_later(float(after[0]), ws.close, 4000, "later")
    sent = 0
    try:
        while True:
            ws.send(MESSAGE)
            sent += 1
    except Exception as exc:  # noqa: BLE001 - what stopped it is the point
        print(f"SENDER stopped after {sent} messages: {type(exc).__name__}", flush=True)
    return []
