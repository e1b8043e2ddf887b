"""An app that uses cluster as a library, as the README shows: wrap, serve, close.

``python tests/apps/library_app.py PORT_FILE`` with CLUSTER_* settings in the environment:
it listens on a port the OS chooses and writes ``127.0.0.1:PORT`` to PORT_FILE.
"""

from gevent import monkey

monkey.patch_all()

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
    application = cluster.wrap(hello, service="web", endpoint_url=f"http://127.0.0.1:{port}")
    server = WSGIServer(listener, application, handler_class=ClusterHandler, log=None)
    report_port(listener.getsockname(), sys.argv[1])
    gevent.signal_handler(signal.SIGTERM, server.stop)
    try:
        server.serve_forever()
    finally:
        application.close()  # deregisters at once


if __name__ == "__main__":
    main()
