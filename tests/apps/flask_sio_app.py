"""A Flask-SocketIO app in ``async_mode='gevent'``.

Served by ``cluster serve --app flask_sio_app:app`` with ``BACKEND_NAME`` naming the
instance. Flask-SocketIO wraps the Flask app's ``wsgi_app``, so ``app`` is the Flask app.

Event ``echo``: acknowledged with ``{"name": <instance>, "data": <data>, "transport": ...}``;
``GET /whoami`` is an ordinary Flask route.
"""

from __future__ import annotations

import os

from flask import Flask, request
from flask_socketio import SocketIO

NAME = os.environ.get("BACKEND_NAME", "flask-sio")

app = Flask(__name__)
socketio = SocketIO(app, async_mode="gevent", cors_allowed_origins="*")


@app.route("/whoami")
def whoami() -> str:
    return NAME


@socketio.on("echo")
def echo(data):
    return {"name": NAME, "data": data,
            "transport": socketio.server.transport(request.sid)}  # type: ignore[attr-defined]
