"""A real WSGI app for the end-to-end tests; also runnable on its own.

Run alone: ``python tests/apps/backend.py --port 9000 --name b1``.
As a cluster member's local app: ``cluster serve --app backend:app`` with
``BACKEND_NAME`` in the environment (tests/apps is on PYTHONPATH).

Routes: /whoami, /headers, /echo (request body back), /upload (sha256 of the body),
/download?size=N (deterministic bytes), /chunked?n=&delay=, /sse?n=&delay=,
/slow?seconds=, /status/CODE, /cookies (several Set-Cookie).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from urllib.parse import parse_qs

NAME = os.environ.get("BACKEND_NAME", "backend")
BLOCK = bytes(range(256)) * 256  # 64 KiB pattern for downloads


def pattern(size: int):
    """Yield ``size`` deterministic bytes in 64 KiB blocks."""
    left = size
    while left > 0:
        piece = BLOCK if left >= len(BLOCK) else BLOCK[:left]
        left -= len(piece)
        yield piece


def pattern_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for piece in pattern(size):
        digest.update(piece)
    return digest.hexdigest()


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}

    def reply(body, status="200 OK", ctype="text/plain", extra=()):
        data = body if isinstance(body, bytes) else body.encode()
        headers = [("Content-Type", ctype), ("Content-Length", str(len(data))),
                   ("X-Served-By", NAME), *extra]
        start_response(status, headers)
        return [data]

    if path in ("/", "/whoami"):
        return reply(NAME)
    if path == "/headers":
        headers = {k[5:].replace("_", "-").title(): v for k, v in environ.items()
                   if k.startswith("HTTP_")}
        info = {"headers": headers, "path": path, "query": environ.get("QUERY_STRING", ""),
                "method": environ["REQUEST_METHOD"], "name": NAME,
                "remote": environ.get("REMOTE_ADDR")}
        return reply(json.dumps(info), ctype="application/json")
    if path == "/echo":
        body = environ["wsgi.input"].read()
        return reply(body, ctype=environ.get("CONTENT_TYPE") or "application/octet-stream")
    if path == "/upload":
        digest, total = hashlib.sha256(), 0
        stream = environ["wsgi.input"]
        while True:
            chunk = stream.read(65536)
            if not chunk:
                break
            digest.update(chunk)
            total += len(chunk)
        return reply(json.dumps({"sha256": digest.hexdigest(), "bytes": total}),
                     ctype="application/json")
    if path == "/download":
        size = int(query.get("size", "1024"))
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(size)), ("X-Served-By", NAME)])
        return pattern(size)
    if path in ("/chunked", "/sse"):
        count, delay = int(query.get("n", "5")), float(query.get("delay", "0.2"))
        sse = path == "/sse"
        ctype = "text/event-stream" if sse else "text/plain"
        start_response("200 OK", [("Content-Type", ctype), ("Cache-Control", "no-cache"),
                                  ("X-Served-By", NAME)])

        def events():
            for i in range(count):
                yield (f"data: {i} {time.time():.6f}\n\n" if sse
                       else f"{i} {time.time():.6f}\n").encode()
                time.sleep(delay)
        return events()
    if path == "/slow":
        time.sleep(float(query.get("seconds", "1")))
        return reply("slow " + NAME)
    if path.startswith("/status/"):
        code = int(path.rsplit("/", 1)[1])
        if code in (204, 304):
            start_response(f"{code} X", [("X-Served-By", NAME), ("ETag", '"v1"')])
            return [b""]
        return reply(f"status {code}", status=f"{code} X")
    if path == "/cookies":
        return reply("cookies", extra=[("Set-Cookie", "a=1; Path=/"),
                                       ("Set-Cookie", "b=2; Path=/")])
    return reply("not found", status="404 Not Found")


def main() -> None:
    from gevent import monkey

    monkey.patch_all()
    import argparse

    from gevent.pywsgi import WSGIServer

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default=NAME)
    args = parser.parse_args()
    global NAME
    NAME = args.name
    server = WSGIServer(("127.0.0.1", args.port), app, log=None)
    import signal

    import gevent

    gevent.signal_handler(signal.SIGTERM, server.stop)
    server.serve_forever()


if __name__ == "__main__":
    main()
