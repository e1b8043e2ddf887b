"""A tiny standalone proxy: WebSocket upgrades go to one fixed backend, nothing else.

Stands in for the cluster app in the WebSocket tests and benchmark until the real app
exists; it is the real WebSocketBridge served by gevent's WSGIServer with ClusterHandler.

Run: ``python tests/apps/ws_forward_only.py --port 9200 --backend http://127.0.0.1:9100``.

Plain HTTP: ``/bridges`` -> JSON ``{"open", "served", "refused", "repr"}``, plus
``greenlets`` (live greenlets, to spot handlers that never finished) with
``?greenlets=1``; anything else -> ``forward-only <pid>``.
"""

from __future__ import annotations

import gc
import json
import logging
import os

from cluster.errors import UpstreamError
from cluster.proxy.websocket import WebSocketBridge, is_websocket_upgrade
from portfile import add_port_arguments, report_port

HOP_HEADER = ("X-Cluster-Hop", "forward-only")
log = logging.getLogger("ws_forward_only")


def live_greenlets() -> int:
    from greenlet import greenlet

    return sum(1 for obj in gc.get_objects() if isinstance(obj, greenlet) and not obj.dead)


def make_app(backend: str, bridge: WebSocketBridge):
    def app(environ, start_response):
        if is_websocket_upgrade(environ):
            path_qs = environ.get("PATH_INFO", "/")
            if environ.get("QUERY_STRING"):
                path_qs += "?" + environ["QUERY_STRING"]
            try:
                return bridge.bridge(environ, start_response, backend, path_qs,
                                     add_headers=[HOP_HEADER])
            except UpstreamError as exc:
                log.warning("upgrade not proxied: %s", exc)
                body = f"{exc.status} {exc.reason}\n".encode()
                start_response(f"{exc.status} Upstream Error",
                               [("Content-Type", "text/plain"),
                                ("Content-Length", str(len(body)))])
                return [body]
        if environ.get("PATH_INFO") == "/bridges":
            info = {"open": bridge.open, "served": bridge.served,
                    "refused": bridge.refused, "repr": repr(bridge)}
            if "greenlets=1" in environ.get("QUERY_STRING", ""):
                info["greenlets"] = live_greenlets()  # walks the heap: not for benchmarks
            body = json.dumps(info).encode()
        else:
            body = f"forward-only {os.getpid()}".encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))])
        return [body]

    return app


def main() -> None:
    from gevent import monkey

    monkey.patch_all()
    import argparse
    import resource
    import signal

    import gevent
    from gevent.pywsgi import WSGIServer

    from cluster.handler import ClusterHandler

    parser = argparse.ArgumentParser()
    add_port_arguments(parser)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--connect-timeout", type=float, default=5.0)
    parser.add_argument("--handshake-timeout", type=float, default=10.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    bridge = WebSocketBridge(connect_timeout=args.connect_timeout,
                             handshake_timeout=args.handshake_timeout)
    server = WSGIServer(("127.0.0.1", args.port), make_app(args.backend, bridge),
                        handler_class=ClusterHandler, log=None, backlog=4096)
    server.init_socket()
    report_port(server.address, args.port_file)
    gevent.signal_handler(signal.SIGTERM, server.stop, 1)
    server.serve_forever()


if __name__ == "__main__":
    main()
