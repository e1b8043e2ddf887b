"""Per-request CPU of the routing layer: ``route()`` and ``ClusterApp.__call__``.

Pure CPU, no sockets: the table is built in memory (three live endpoints of service
``web``, a balancer with no local app, as ``cluster serve --ui-service web``), and the
forwarder is replaced by one that hands back a ready upstream response, so
``ClusterApp.__call__`` is timed up to (and excluding) the network exchange. What is
left is exactly what ``cluster serve`` adds to the bare forwarder: RequestView, the
ejection set, route(), the decision objects and the Set-Cookie header.

Before/after in one run: by default the ``cluster`` package of a git revision (HEAD)
is exported with ``git archive`` into a temp dir (read-only for the repository) and
measured in child processes interleaved with the working tree's::

    python bench/route_bench.py                 # HEAD vs working tree, 5 rounds
    python bench/route_bench.py --baseline ''   # the working tree only

Each figure is the best of ``--repeat`` timeit runs of ``--number`` calls, then the
best over rounds; µs per call.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

CASES = (
    "from_environ",
    "route (no cookie)",
    "route (sticky cookie)",
    "ClusterApp (no cookie)",
    "ClusterApp (sticky cookie)",
)


def _environ(cookie: str | None) -> dict[str, Any]:
    """What pywsgi + ClusterHandler put in the environ for wrk's GET /."""
    env: dict[str, Any] = {
        "REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": "/", "QUERY_STRING": "",
        "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "40000",
        "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080", "HTTP_HOST": "127.0.0.1:8080",
        "GATEWAY_INTERFACE": "CGI/1.1", "wsgi.url_scheme": "http", "wsgi.input": None,
        "wsgi.multithread": False, "wsgi.multiprocess": False, "wsgi.run_once": False,
        "RAW_URI": "/", "wsgi.version": (1, 0),
    }
    if cookie is not None:
        env["HTTP_COOKIE"] = cookie
    return env


def child(root: str, number: int, repeat: int) -> dict[str, float]:
    sys.path.insert(0, root)
    from cluster.app import ClusterApp
    from cluster.node import Cluster
    from cluster.proxy.http import UpstreamResponse
    from cluster.records import Endpoint, endpoint_hash
    from cluster.registry import EndpointTable
    from cluster.routing import Policy, RequestView, cookie_name, route

    assert Path(sys.modules["cluster"].__file__ or "").resolve().is_relative_to(Path(root))
    now = dt.datetime.now(dt.timezone.utc)
    urls = [f"http://127.0.0.1:{port}" for port in (9001, 9002, 9003)]
    endpoints = [Endpoint("web", u, endpoint_hash(u), None, now, 5.0) for u in urls]
    table = EndpointTable.build(now, endpoints, grace=3600.0)
    sticky = f"{cookie_name('web')}={endpoints[1].hash}"

    with tempfile.TemporaryDirectory() as tmp:
        node = Cluster(register=False, discovery_url=f"sqlite:///{tmp}/d.sqlite3",
                       ui_service="web", bind="127.0.0.1:8080")
        try:
            node.watcher.table = table
            app = ClusterApp(None, node)

            headers = [("Content-Type", "text/plain"), ("Content-Length", "100")]

            class Canned:
                """Stands in for the network exchange only: returns a ready response."""

                def forward(self, environ: Any, url: str, path_qs: str,
                            add: Any = ()) -> Any:
                    return UpstreamResponse("200 OK", list(headers), [b"x" * 100], url)

                def close(self) -> None:
                    pass

            app.forwarder = Canned()  # type: ignore[assignment]

            def start_response(status: str, hdrs: Any, *exc: Any) -> None:
                return None

            policy: Policy = app.policy
            plain, cookied = _environ(None), _environ(sticky)
            req_plain = RequestView.from_environ(plain)
            req_cookie = RequestView.from_environ(cookied)
            empty: frozenset[str] = frozenset()
            calls = {
                "from_environ": lambda: RequestView.from_environ(plain),
                "route (no cookie)": lambda: route(req_plain, table, policy, empty),
                "route (sticky cookie)": lambda: route(req_cookie, table, policy, empty),
                "ClusterApp (no cookie)": lambda: app(plain, start_response),
                "ClusterApp (sticky cookie)": lambda: app(cookied, start_response),
            }
            # Same decisions as the product would make: a proxy to a live endpoint,
            # the cookie case to the pinned one.
            d = route(req_cookie, table, policy, empty)
            assert getattr(d, "endpoint", None) == endpoints[1], d
            result: dict[str, float] = {}
            for name in CASES:
                times = timeit.repeat(calls[name], number=number, repeat=repeat)
                result[name] = min(times) / number * 1e6
            return result
        finally:
            node.close()


def export(rev: str, dest: str) -> str:
    """The ``cluster`` package at ``rev`` in ``dest`` (git archive: no repo change)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "cluster"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return dest


def run_child(root: str, number: int, repeat: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", root, "--number", str(number),
         "--repeat", str(repeat)],
        check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""},
    ).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD",
                        help="git revision to compare with ('' for none)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--number", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.number, args.repeat)))
        return

    tmp = tempfile.mkdtemp(prefix="route_bench_")
    try:
        targets = {"now": str(ROOT)}
        if args.baseline:
            targets = {"before": export(args.baseline, tmp), **targets}
        best: dict[str, dict[str, float]] = {t: {} for t in targets}
        for _ in range(args.rounds):  # interleaved, so load changes hit both alike
            for label, root in targets.items():
                for case, us in run_child(root, args.number, args.repeat).items():
                    best[label][case] = min(us, best[label].get(case, us))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    labels = list(targets)
    head = "| case | " + " | ".join(f"{t} µs" for t in labels)
    head += " | now/before |" if "before" in best else " |"
    print(head)
    print("| --- |" + " ---: |" * (len(labels) + ("before" in best)))
    for case in CASES:
        row = f"| {case} | " + " | ".join(f"{best[t][case]:.2f}" for t in labels)
        if "before" in best:
            row += f" | {best['now'][case] / best['before'][case]:.2f}"
        print(row + " |")
    print(json.dumps(best))


if __name__ == "__main__":
    main()
