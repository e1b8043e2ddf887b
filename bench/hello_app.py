"""The hello app of bench/http_bench.py's second table: 100 bytes on every path.

As a module it is what ``cluster serve --service hello --app hello_app:app`` runs. As a
script it is the baseline: the same app under plain gevent pywsgi, as a gevent user
would serve it without cluster (no access log, ``gc.freeze()`` after start-up, as
``cluster serve`` does)::

    python bench/hello_app.py --bind 127.0.0.1:0 --port-file PATH [--stock]

One change from stock pywsgi, unless ``--stock``: TCP_NODELAY on each accepted socket.
Stock pywsgi sends the response head and the body in two writes; with Nagle's algorithm
the second waits for the client's delayed ACK (40 ms on Linux), which caps a keep-alive
connection at about 25 small responses a second: a baseline that measures the stall,
not pywsgi.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

BODY = b"x" * 100
HEADERS = [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(BODY)))]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", HEADERS)
    return [BODY]


def main() -> None:
    from gevent import monkey

    monkey.patch_all()
    import argparse
    import gc
    import os
    import signal
    import socket

    import gevent
    from gevent.pywsgi import WSGIServer

    class NoDelayServer(WSGIServer):  # type: ignore[misc]
        """pywsgi with TCP_NODELAY on accepted sockets (one syscall per connection)."""

        def handle(self, sock: Any, address: Any) -> None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            super().handle(sock, address)

    parser = argparse.ArgumentParser(description="the hello app under plain pywsgi")
    parser.add_argument("--bind", default="127.0.0.1:0", help="host:port (port 0: any)")
    parser.add_argument("--port-file", help="write the bound host:port here once listening")
    parser.add_argument("--stock", action="store_true", help="leave Nagle's algorithm on")
    args = parser.parse_args()
    host, _, port = args.bind.rpartition(":")
    server_class = WSGIServer if args.stock else NoDelayServer
    server = server_class((host, int(port)), app, log=None)
    server.init_socket()
    gc.collect()
    gc.freeze()
    server.start()
    if args.port_file:
        tmp = f"{args.port_file}.tmp"
        with open(tmp, "w") as out:
            out.write(f"{host}:{server.server_port}\n")
        os.replace(tmp, args.port_file)
    gevent.signal_handler(signal.SIGTERM, server.stop)
    server.serve_forever()


if __name__ == "__main__":
    main()
