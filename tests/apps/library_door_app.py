"""Library mode with the front door, as the README shows: cluster.make_server().

``python tests/apps/library_door_app.py PORT_FILE`` with CLUSTER_* settings in the
environment; binds 127.0.0.1:0 and writes the bound address to PORT_FILE.
"""

from gevent import monkey

monkey.patch_all()

import signal  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402

import cluster  # noqa: E402


def hello(environ, start_response):
    ws = environ.get("wsgi.websocket")
    if ws is not None:  # a local WebSocket: the door hands it to gevent-websocket
        while (message := ws.receive()) is not None:
            ws.send(message)
        return []
    if environ.get("PATH_INFO") == "/slow":  # a request still running at a stop
        gevent.sleep(float(environ.get("QUERY_STRING", "").partition("=")[2] or 1))
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "12")])
    return [b"library door"]


def main() -> None:
    server = cluster.make_server(hello, service="web", bind="127.0.0.1:0",
                                 port_file=sys.argv[1])
    gevent.signal_handler(signal.SIGTERM, server.stop)
    server.serve_forever()


if __name__ == "__main__":
    main()
