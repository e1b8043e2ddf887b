"""Per-request CPU of the observers the front door calls: ``request_done`` of the
metrics (single-process and multi-process mode) and of the access log.

Pure CPU, no sockets: one :class:`RequestRecord` for a request served by the local app
and one for a proxied request, each passed ``--number`` times; the figure is the best
of ``--repeat`` runs, in µs per call. Multi-process mode needs
``PROMETHEUS_MULTIPROC_DIR`` before prometheus_client is imported, so each mode runs
in a child process (the multi-process one with a temp dir it removes)::

    python bench/observer_cost.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(number: int, repeat: int) -> None:
    from cluster.accesslog import AccessLogObserver
    from cluster.metrics import MetricsObserver
    from cluster.observe import RequestRecord

    local = RequestRecord("127.0.0.1", "GET", "/", "HTTP/1.1", 200, 100, "local", "web",
                          0.0, 0.001, 0, "", "curl/7.88.1")
    proxied = RequestRecord("127.0.0.1", "GET", "/", "HTTP/1.1", 200, 100,
                            "http://127.0.0.1:8001", "web", 0.004, 0.005, 0, "",
                            "curl/7.88.1")
    mode = "multi-process" if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else "single process"
    observers = [(f"metrics ({mode})", MetricsObserver())]
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        observers += [(f"access log {style} (to /dev/null)",
                       AccessLogObserver(style, os.devnull)) for style in ("combined", "json")]
    for name, observer in observers:
        for kind, record in (("local", local), ("proxied", proxied)):
            best = min(timeit.repeat(lambda: observer.request_done(record),  # noqa: B023
                                     number=number, repeat=repeat))
            print(f"{name:40} {kind:8} {best / number * 1e6:6.2f} µs")
    door_record(observers[0][1], number, repeat, mode)


def door_record(metrics: object, number: int, repeat: int, mode: str) -> None:
    """What the door spends per request to report it: the RequestRecord made from a
    browser-like head of 9 fields (as the door makes it: the request line, Referer and
    User-Agent decoded only if read), then the metrics' ``request_done``."""
    import time

    from cluster.http1 import parse_request_head
    from cluster.observe import RequestRecord

    head = parse_request_head(
        b"GET /whoami?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/120\r\n"
        b"Accept: text/html,application/xhtml+xml\r\nAccept-Language: en-US,en;q=0.9\r\n"
        b"Accept-Encoding: gzip, deflate\r\nCookie: cluster-endpoint::web=abc\r\n"
        b"Connection: keep-alive\r\nReferer: http://127.0.0.1:8000/")
    done = metrics.request_done  # type: ignore[attr-defined]

    def report() -> None:
        done(RequestRecord.of_head(head, "127.0.0.1", 200, 100, "local", "web", 0.0,
                                   time.monotonic() - 1.0, 0))

    best = min(timeit.repeat(report, number=number, repeat=repeat))
    print(f"{'door record + metrics (' + mode + ')':40} {'local':8} "
          f"{best / number * 1e6:6.2f} µs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args.number, args.repeat)
        return
    argv = [sys.executable, __file__, "--child", "--number", str(args.number),
            "--repeat", str(args.repeat)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    subprocess.run(argv, env=env, check=True)
    directory = tempfile.mkdtemp(prefix="cluster-bench-metrics-")
    try:
        subprocess.run(argv, env={**env, "PROMETHEUS_MULTIPROC_DIR": directory}, check=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
