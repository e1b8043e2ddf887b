"""A Flask-Sockets app, as its README writes one, for ``cluster serve --app
flask_sockets_app:app`` with ``BACKEND_NAME`` naming the instance.

Flask-Sockets reads ``environ['wsgi.websocket']`` (gevent-websocket's API). Its last
release (0.2.1) adds its routes without ``websocket=True``, which Werkzeug 2 and later
require of a rule that matches a WebSocket handshake (WebsocketMismatch, a 400, under
any server): the route is added that way here, as its users do.

``/echo`` echoes every message with its own type; the text ``cmd:name`` is answered with
the instance name. ``GET /whoami`` is an ordinary Flask route.
"""

from __future__ import annotations

import os

from flask import Flask
from flask_sockets import Sockets
from werkzeug.routing import Rule

NAME = os.environ.get("BACKEND_NAME", "flask-sockets")

app = Flask(__name__)
sockets = Sockets(app)


def echo(ws) -> None:
    while not ws.closed:
        message = ws.receive()
        if message is None:  # closed by the client
            break
        if message == "cmd:name":
            ws.send(NAME)
        else:
            ws.send(message, binary=not isinstance(message, str))


sockets.url_map.add(Rule("/echo", endpoint=echo, websocket=True))


@app.route("/whoami")
def whoami() -> str:
    return NAME
