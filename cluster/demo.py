"""A tiny WSGI app to see balancing at work: ``cluster serve --app cluster.demo:app``.

Every response says which instance served it, so a few reloads (or ``curl``s without
a cookie jar) show requests spreading over the instances, and a browser (which keeps
the sticky cookie) shows them staying on one.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any, Callable, Iterable


def instance_name(environ: dict[str, Any]) -> str:
    return f"{socket.gethostname()}:{environ.get('SERVER_PORT', '?')}"


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    name = instance_name(environ)
    path = environ.get("PATH_INFO", "/")
    if path == "/whoami":
        body = json.dumps({"instance": name, "pid": os.getpid(),
                           "port": environ.get("SERVER_PORT")}).encode()
        content_type = "application/json"
    else:
        body = (
            "<!doctype html><title>cluster demo</title>"
            f"<h1>Served by {name}</h1><p>pid {os.getpid()}, path {path}</p>"
            "<p>Reload: the sticky cookie keeps you here. "
            "<code>curl</code> without cookies spreads over every instance.</p>"
        ).encode()
        content_type = "text/html; charset=utf-8"
    start_response("200 OK", [("Content-Type", content_type),
                              ("Content-Length", str(len(body)))])
    return [body]
