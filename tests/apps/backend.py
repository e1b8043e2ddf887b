"""A real WSGI app for the end-to-end tests; also runnable on its own.

Run alone: ``python tests/apps/backend.py --port 9000 --name b1``.
As a cluster member's local app: ``cluster serve --app backend:app`` with
``BACKEND_NAME`` in the environment (tests/apps is on PYTHONPATH).

Routes: /whoami, /headers, /echo (request body back), /read-or-400 (the same, and a 400
when the body cannot be read, as frameworks answer), /upload[?then=SECONDS] (sha256 of
the body, after sleeping that long), /download?size=N (deterministic bytes),
/chunked?n=&delay=, /sse?n=&delay=, /slow?seconds=, /status/CODE, /cookies (several
Set-Cookie), /hop (hop-by-hop response headers), /gate?key=&n=[&sse=1] (streams piece i
only after /release?key= was called i times: proves pieces travel one by one without
timing anything), /crash (with BACKEND_CRASHES set: the process ends unanswered, as a
worker killed by the OOM killer or a crash in C).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from urllib.parse import parse_qs

NAME = os.environ.get("BACKEND_NAME", "backend")
BLOCK = bytes(range(256)) * 256  # 64 KiB pattern for downloads
_GATES: dict[str, threading.Semaphore] = {}  # /gate streams wait on these (gevent-patched)


def _gate(key: str) -> threading.Semaphore:
    return _GATES.setdefault(key, threading.Semaphore(0))


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

    if path == "/sockjs/info":  # the shape (and CORS fields) a SockJS server answers
        origin = environ.get("HTTP_ORIGIN")
        cors = [("Access-Control-Allow-Origin", origin),
                ("Access-Control-Allow-Credentials", "true"), ("Vary", "Origin")] \
            if origin else []
        if environ["REQUEST_METHOD"] == "OPTIONS":
            start_response("204 No Content",
                           [*cors, ("Access-Control-Allow-Methods", "OPTIONS, GET"),
                            ("X-Served-By", NAME)])
            return [b""]
        if environ["REQUEST_METHOD"] != "GET":
            return reply("", "405 Method Not Allowed", extra=[("Allow", "OPTIONS, GET")])
        if environ.get("HTTP_IF_NONE_MATCH") == '"info"':  # not sockjs's: a bodiless answer
            start_response("304 Not Modified", [*cors, ("ETag", '"info"'),
                                                ("X-Served-By", NAME)])
            return [b""]
        return reply(json.dumps({"websocket": True, "cookie_needed": False,
                                 "origins": ["*:*"], "entropy": 42, "server": NAME}),
                     ctype="application/json; charset=UTF-8", extra=cors)
    if path.startswith("/sockjs/"):
        return reply(f"{NAME} {path}")
    if path == "/die-once":  # the first process to get this dies before answering
        marker = query["marker"]
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return reply(f"survived {NAME}")
        os._exit(3)
    if path in ("/", "/whoami"):
        return reply(NAME)
    if path == "/headers":
        headers = {k[5:].replace("_", "-").title(): v for k, v in environ.items()
                   if k.startswith("HTTP_")}
        info = {"headers": headers, "path": path, "query": environ.get("QUERY_STRING", ""),
                "method": environ["REQUEST_METHOD"], "name": NAME,
                "remote": environ.get("REMOTE_ADDR"),
                "remote_port": environ.get("REMOTE_PORT")}
        return reply(json.dumps(info), ctype="application/json")
    if path == "/crash" and os.environ.get("BACKEND_CRASHES"):  # a worker dying unanswered
        environ["wsgi.input"].read()
        os._exit(1)
    if path == "/echo":
        body = environ["wsgi.input"].read()
        return reply(body, ctype=environ.get("CONTENT_TYPE") or "application/octet-stream")
    if path == "/read-or-400":  # as frameworks do: a body that cannot be read is a 400
        try:
            body = environ["wsgi.input"].read()
        except OSError as exc:
            return reply(f"unreadable body: {exc}", status="400 Bad Request")
        return reply(body)
    if path == "/upload":
        digest, total = hashlib.sha256(), 0
        stream = environ["wsgi.input"]
        while True:
            chunk = stream.read(65536)
            if not chunk:
                break
            digest.update(chunk)
            total += len(chunk)
        time.sleep(float(query.get("then", "0")))  # work on after reading the body
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
    if path == "/busy":  # the app holds the CPU: the whole process waits, as a busy one
        until = time.monotonic() + float(query.get("seconds", "1"))
        while time.monotonic() < until:
            pass
        return reply("busy " + NAME)
    if path.startswith("/status/"):
        code = int(path.rsplit("/", 1)[1])
        if code in (204, 304):
            start_response(f"{code} X", [("X-Served-By", NAME), ("ETag", '"v1"')])
            return [b""]
        return reply(f"status {code}", status=f"{code} X")
    if path == "/wrong-length":  # an app bug: a Content-Length that is not what it sends
        said, sent = int(query["said"]), int(query["sent"])
        start_response("200 OK", [("Content-Length", str(said)), ("X-Served-By", NAME)])
        return [b"x" * sent]
    if path == "/bad-field":  # an app bug: a header field HTTP cannot carry
        name, value = {"space": ("X Bad", "v"), "colon": ("X:Bad", "v"),
                       "nul": ("X-Bad", "a\x00b"), "esc": ("X-Bad", "a\x1bb")}[query["kind"]]
        start_response("200 OK", [(name, value), ("Content-Length", "2")])
        return [b"ok"]
    if path == "/lengths":  # an app bug: Content-Length values given as they are
        start_response("200 OK", [("Content-Length", value)
                                  for value in query["values"].split("|")])
        return [b"ok"]
    if path == "/says-keep-alive":  # an app bug: a hop-by-hop field (PEP 3333)
        start_response("200 OK", [("Connection", "keep-alive"), ("Keep-Alive", "timeout=5"),
                                  ("Content-Length", "2")])
        return [b"ok"]
    if path == "/no-start-response":  # an app bug: a body, and never start_response
        return [b"never started"]
    if path == "/nothing-started":  # an app bug: no body, and never start_response
        return []
    if path == "/str-body":  # an app bug: a str where PEP 3333 wants bytes
        start_response("200 OK", [("Content-Length", "15"), ("X-Served-By", NAME)])
        return ["a str not bytes"]
    if path == "/self-chunked":  # an app bug: it frames its body itself (hop-by-hop)
        start_response("200 OK", [("Transfer-Encoding", "chunked"), ("X-Served-By", NAME)])
        return [b"5\r\nhello\r\n0\r\n\r\n"]
    if path == "/cookies":
        return reply("cookies", extra=[("Set-Cookie", "a=1; Path=/"),
                                       ("Set-Cookie", "b=2; Path=/")])
    if path == "/hop":
        # Hop-by-hop response headers a proxy must drop; X-End-To-End must survive.
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3"),
                                  ("Connection", "X-Named-Hop"), ("X-Named-Hop", "1"),
                                  ("Keep-Alive", "timeout=5"), ("Proxy-Authenticate", "x"),
                                  ("Trailer", "X-Trail"), ("Upgrade", "foo"),
                                  ("X-End-To-End", "1"), ("X-Served-By", NAME)])
        return [b"hop"]
    if path == "/gate":
        key, count = query.get("key", "default"), int(query.get("n", "3"))
        sse = query.get("sse") == "1"
        start_response("200 OK", [("Content-Type", "text/event-stream" if sse
                                   else "text/plain"), ("X-Served-By", NAME)])

        def pieces():
            gate = _gate(key)
            for i in range(count):
                if i and not gate.acquire(timeout=60):
                    yield b"gate timeout\n"
                    return
                yield (f"data: {i}\n\n" if sse else f"piece {i}\n").encode()
            _GATES.pop(key, None)
        return pieces()
    if path == "/release":
        _gate(query.get("key", "default")).release()
        return reply("released")
    return reply("not found", status="404 Not Found")


def main() -> None:
    global NAME
    from gevent import monkey

    monkey.patch_all()
    import argparse

    from gevent.pywsgi import WSGIServer

    from portfile import add_port_arguments, report_port

    parser = argparse.ArgumentParser()
    add_port_arguments(parser)
    parser.add_argument("--name", default=NAME)
    args = parser.parse_args()
    NAME = args.name
    server = WSGIServer(("127.0.0.1", args.port), app, log=None)
    server.init_socket()
    report_port(server.address, args.port_file)
    import signal

    import gevent

    gevent.signal_handler(signal.SIGTERM, server.stop)
    server.serve_forever()


if __name__ == "__main__":
    main()
