"""A minimal reverse proxy: every request goes to one upstream through HttpForwarder.

Used by tests/test_proxy_http.py and bench/http_bench.py until `cluster serve` exists;
served the way the product serves (pywsgi WSGIServer + ClusterHandler)::

    python tests/apps/forward_only.py --port 8080 --upstream http://127.0.0.1:9000

Upstream errors become their status (502/504) with a one-line text body. The proxy
answers ``/__forwarder__`` itself with ``repr(forwarder)`` (pool state, for tests).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
from typing import Any, Callable, Iterable  # noqa: E402

import gevent  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

from cluster.errors import UpstreamError  # noqa: E402
from cluster.handler import ClusterHandler  # noqa: E402
from cluster.proxy.http import HttpForwarder, request_target  # noqa: E402
from portfile import add_port_arguments, report_port  # noqa: E402

REASONS = {502: "Bad Gateway", 504: "Gateway Timeout"}


def make_app(forwarder: HttpForwarder, upstream: str) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/__forwarder__":
            state = repr(forwarder).encode()
            start_response("200 OK", [("Content-Type", "text/plain"),
                                      ("Content-Length", str(len(state)))])
            return [state]
        try:
            response = forwarder.forward(environ, upstream, request_target(environ))
        except UpstreamError as exc:
            body = f"{exc.status} {REASONS.get(exc.status, 'Error')}: {exc.reason}\n".encode()
            start_response(f"{exc.status} {REASONS.get(exc.status, 'Error')}",
                           [("Content-Type", "text/plain"),
                            ("Content-Length", str(len(body)))])
            return [body]
        start_response(response.status, response.headers)
        return response.body

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_port_arguments(parser)
    parser.add_argument("--upstream", required=True, help="http://host:port")
    parser.add_argument("--connect-timeout", type=float, default=5.0)
    parser.add_argument("--read-timeout", type=float, default=300.0)
    parser.add_argument("--access-log", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    forwarder = HttpForwarder(connect_timeout=args.connect_timeout,
                              read_timeout=args.read_timeout)
    server = WSGIServer(("127.0.0.1", args.port), make_app(forwarder, args.upstream),
                        handler_class=ClusterHandler,
                        log="default" if args.access_log else None)
    server.init_socket()
    report_port(server.address, args.port_file)
    gevent.signal_handler(signal.SIGTERM, server.stop)
    try:
        server.serve_forever()
    finally:
        forwarder.close()


if __name__ == "__main__":
    main()
