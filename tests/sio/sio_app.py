"""A python-socketio app in gevent mode, as a gevent user writes one.

Every ``echo`` is acknowledged with the data and the pid of the process that holds
the session, so a test can tell whether one session stayed in one process. Plain
HTTP ``/whoami`` answers the pid too. engineio prints "Invalid session" on stderr when
a request of a session reaches a process that does not hold it.
"""

from __future__ import annotations

import json
import os

import socketio

sio = socketio.Server(async_mode="gevent")


@sio.event
def echo(sid, data):
    return {"data": data, "pid": os.getpid()}


def plain(environ, start_response):
    body = json.dumps({"pid": os.getpid(), "path": environ.get("PATH_INFO")}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


app = socketio.WSGIApp(sio, plain)
