"""A python-socketio server in ``async_mode='gevent'`` (the mode a gevent user picks).

Served by ``cluster serve --app sio_app:app`` with ``BACKEND_NAME`` naming the instance.
Its WebSocket transport needs ``environ['wsgi.websocket']`` from the server; without it
the upgrade fails and the client silently stays on long-polling.

Event ``echo``: acknowledged with ``{"name": <instance>, "data": <data>, "transport":
<the engine.io transport the server sees>}``.
"""

from __future__ import annotations

import os

import socketio

NAME = os.environ.get("BACKEND_NAME", "sio")

sio = socketio.Server(async_mode="gevent", cors_allowed_origins="*")


@sio.event
def echo(sid, data):
    return {"name": NAME, "data": data, "transport": sio.transport(sid)}


app = socketio.WSGIApp(sio)
