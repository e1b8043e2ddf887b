"""An app that uses cluster as a library, as the README shows: wrap, serve, close.

``python tests/apps/library_app.py PORT`` with CLUSTER_* settings in the environment.
"""

from gevent import monkey

monkey.patch_all()

import signal  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

import cluster  # noqa: E402
from cluster.handler import ClusterHandler  # noqa: E402


def hello(environ, start_response):
    body = b"library"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "7")])
    return [body]


def main() -> None:
    port = int(sys.argv[1])
    application = cluster.wrap(hello, service="web", endpoint_url=f"http://127.0.0.1:{port}")
    server = WSGIServer(("127.0.0.1", port), application, handler_class=ClusterHandler,
                        log=None)
    gevent.signal_handler(signal.SIGTERM, server.stop)
    try:
        server.serve_forever()
    finally:
        application.close()  # deregisters at once


if __name__ == "__main__":
    main()
