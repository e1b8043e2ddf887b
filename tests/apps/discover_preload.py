"""A WSGI app that makes its cluster.discover() client at import, as a Flask app's
module would: under gunicorn --preload that is in the arbiter, before the fork.
GET / answers with the worker's PID and what the `search` service answered."""

from __future__ import annotations

import os

import cluster

client = cluster.discover("search")


def app(environ, start_response):
    try:
        body = client.get("/whoami", timeout=5).text
    except cluster.ClusterError as exc:
        body = f"error: {exc}"
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"{os.getpid()} {body}".encode()]
