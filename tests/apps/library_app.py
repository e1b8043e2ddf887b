"""An app that uses cluster as a library, as the README shows: wrap, serve, close.

``python tests/apps/library_app.py PORT_FILE [MODULE:APP]`` with CLUSTER_* settings in the
environment (service ``web`` unless CLUSTER_SERVICE names another): it listens on a port
the OS chooses and writes ``127.0.0.1:PORT`` to PORT_FILE. It serves ``hello`` below, or
MODULE:APP from tests/apps (e.g. ``gws_echo:app``).
"""

from gevent import monkey

monkey.patch_all()

import importlib  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

import cluster  # noqa: E402
from cluster.handler import ClusterHandler  # noqa: E402
from portfile import report_port  # noqa: E402


def hello(environ, start_response):
    body = b"library"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "7")])
    return [body]


def main() -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # gevent's socket (patched)
    port = listener.getsockname()[1]
    app = hello
    if len(sys.argv) > 2:
        module, _, name = sys.argv[2].partition(":")
        app = getattr(importlib.import_module(module), name)
    service = os.environ.get("CLUSTER_SERVICE", "web")
    application = cluster.wrap(app, service=service, endpoint_url=f"http://127.0.0.1:{port}")
    server = WSGIServer(listener, application, handler_class=ClusterHandler, log=None)
    report_port(listener.getsockname(), sys.argv[1])
    gevent.signal_handler(signal.SIGTERM, server.stop)
    try:
        server.serve_forever()
    finally:
        application.close()  # deregisters at once


if __name__ == "__main__":
    main()
