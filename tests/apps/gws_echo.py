"""A gevent-websocket app as its users write it: it reads ``environ['wsgi.websocket']``.

Served by ``cluster serve --app gws_echo:app`` with ``BACKEND_NAME`` naming the instance.
The front door must hand it a socket when the instance serves an upgrade itself (no
gevent-websocket handler of its own is configured anywhere).

On any path, a WebSocket echoes every message with its own type; the text ``cmd:name``
is answered with the instance name, ``cmd:environ`` with JSON of the environ's path,
peer and forwarding fields, ``cmd:close C R`` closes with code C and reason R
(gevent-websocket's ``close(code, message)``), ``cmd:close-later C R`` does so from
another greenlet while this one waits in ``receive()``, ``cmd:return`` returns
without closing, ``cmd:raise`` raises (an app's bug), ``cmd:broadcast T`` sends T to
every socket of the server as gevent-websocket's chat example does (over
``ws.handler.server.clients``; T is followed by whether ``ws.handler.active_client`` is
this socket's entry), ``cmd:log T`` logs T with ``ws.logger`` and answers ``logged``.
``generator_app`` is ``app`` under a middleware written as a generator.
Plain HTTP: ``/whoami`` -> the name; ``/environ`` (and ``/sockjs/info``) -> what
``cmd:environ`` says;
anything else -> 426, which is what the app says when no socket was handed to it.
"""

from __future__ import annotations

import json
import os

import gevent
from geventwebsocket.exceptions import WebSocketError

NAME = os.environ.get("BACKEND_NAME", "gws")
#: the environ keys ``cmd:environ`` shows, besides every ``HTTP_X_...``
SHOWN = ("PATH_INFO", "QUERY_STRING", "REMOTE_ADDR", "HTTP_FORWARDED", "HTTP_PROXY")


def shown(environ):
    return {key: value for key, value in environ.items()
            if key in SHOWN or key.startswith("HTTP_X_")}


def app(environ, start_response):
    ws = environ.get("wsgi.websocket")
    if ws is None:
        if environ.get("PATH_INFO") == "/whoami":
            body, status = NAME.encode(), "200 OK"
        elif environ.get("PATH_INFO") in ("/environ", "/sockjs/info"):
            body, status = json.dumps(shown(environ)).encode(), "200 OK"
        else:
            body, status = b"expected a WebSocket (wsgi.websocket missing)", "426 Upgrade Required"
        start_response(status, [("Content-Type", "text/plain"),
                                ("Content-Length", str(len(body)))])
        return [body]
    while True:
        try:
            message = ws.receive()
        except WebSocketError:
            break
        if message is None:  # closed by the client
            break
        if message == "cmd:name":
            ws.send(NAME)
        elif message == "cmd:environ":  # what the app was told of the request
            ws.send(json.dumps(shown(environ)))
        elif isinstance(message, str) and message.startswith("cmd:close-later "):
            _, code, reason = message.split(" ", 2)
            gevent.spawn_later(0.05, ws.close, int(code), reason)
        elif isinstance(message, str) and message.startswith("cmd:close "):
            _, code, reason = message.split(" ", 2)
            ws.close(int(code), reason)
            break
        elif message == "cmd:return":
            break
        elif message == "cmd:raise":
            raise RuntimeError("the app's bug")
        elif isinstance(message, str) and message.startswith("cmd:log "):
            ws.logger.info("the app says %s", message[8:])
            ws.send("logged")
        elif isinstance(message, str) and message.startswith("cmd:broadcast "):
            mine = ws.handler.active_client.ws is ws
            for client in list(ws.handler.server.clients.values()):
                try:
                    client.ws.send(f"{message[14:]} active={mine}")
                except WebSocketError:
                    pass  # a socket of an earlier test, on its way out
        else:  # str goes out as text, bytes/bytearray as binary
            ws.send(message, binary=not isinstance(message, str))
    return []


def generator_app(environ, start_response):
    """``app`` under a middleware written as a generator (timing, logging...): the app
    runs only once its result is iterated."""
    yield from app(environ, start_response)
