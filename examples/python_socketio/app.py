"""A python-socketio app: each ``echo`` is answered with the pid holding the session.

Run several processes and watch a session stay in one:
``cluster serve --service echo --app app:app --workers-count 2 --bind 127.0.0.1:8000``.
"""

from __future__ import annotations

import json
import os

import socketio

sio = socketio.Server(async_mode="gevent")


@sio.event
def connect(sid: str, environ: dict, auth: object = None) -> None:
    sio.save_session(sid, {"pid": os.getpid(), "echoes": 0})


@sio.event
def echo(sid: str, data: object) -> dict:
    session = sio.get_session(sid)  # lives in this process only
    session["echoes"] += 1
    sio.save_session(sid, session)
    return {"data": data, "pid": os.getpid(), "echoes": session["echoes"]}


def index(environ: dict, start_response) -> list[bytes]:
    body = json.dumps({"pid": os.getpid()}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


app = socketio.WSGIApp(sio, index)
