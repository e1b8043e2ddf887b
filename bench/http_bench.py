"""HTTP proxy benchmark: the backend hit directly, through `cluster serve`, through nginx.

    python bench/http_bench.py [--duration 10] [--rounds 2] [--handler-stages]

One run measures, with wrk -t1 on 127.0.0.1 and one server process each:

- ``direct``     the backend itself (nginx, one worker, two static files: fast enough
  not to be what limits the others);
- ``proxy``      the real product: ``python -m cluster serve --ui-service web`` (a
  balancer with no local app), discovery in a temp SQLite file, the backend registered
  as service ``web`` by the ``cluster register`` sidecar (see :func:`cluster_setup`);
- ``forwarder``  HttpForwarder alone behind the same server and handler
  (tests/apps/forward_only.py's app): the proxy minus routing, cookies and discovery;
- ``nginx``      nginx as an equivalent reverse proxy (keep-alive upstream, streaming);
- ``hello``      a pywsgi hello-world app with the same handler: the ceiling pywsgi
  itself puts on any WSGI app, proxy or not (100-byte size only).

``--handler-stages`` adds the forwarder under ClusterHandler with its fast paths undone
(``stock``), then put back one at a time (``+onesend``, ``+lean``, ``+nolog``); the
``forwarder`` row is the last step (``+gcfreeze``): what each change in
cluster/handler.py and cluster/server.py buys (first size only).

It prints req/s, p50/p99 latency and the server's CPU use (all its processes, % of one
core, and CPU microseconds per request) per target and size, then the ratios. Every
process is started here, stopped by PID, and lives in a temp dir removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


SERVICE = "web"


def cluster_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "cluster", *args]


def hello_argv(port: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--serve-hello", str(port)]


def forwarder_argv(port: int, upstream: str, stage: str = "all") -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--serve-forwarder", stage,
            str(port), upstream]


def serve_hello(port: int) -> None:
    """pywsgi + ClusterHandler answering 100 bytes: the cost of pywsgi alone."""
    from gevent import monkey

    monkey.patch_all()
    import gc

    import gevent
    from gevent.pywsgi import WSGIServer

    from cluster.handler import ClusterHandler

    body = b"x" * 100

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", "100")])
        return [body]

    server = WSGIServer(("127.0.0.1", port), app, handler_class=ClusterHandler, log=None)
    gc.collect()
    gc.freeze()  # as cluster serve does
    gevent.signal_handler(signal.SIGTERM, server.stop)
    server.serve_forever()


#: --handler-stages, cumulative: each adds one fast path to the one before.
STAGES = ("stock", "+onesend", "+lean", "+nolog")


def staged_handler(stage: str) -> type:
    """ClusterHandler with the fast paths after ``stage`` undone (pywsgi's methods back).
    ``all``: ClusterHandler as it is."""
    from gevent.pywsgi import WSGIHandler

    from cluster.handler import ClusterHandler

    if stage == "all":
        return ClusterHandler
    keep = STAGES.index(stage)
    undo: dict[str, Any] = {}
    if keep < 1:
        undo["_write_with_headers"] = WSGIHandler._write_with_headers
    if keep < 2:
        undo["MessageClass"] = WSGIHandler.MessageClass
        undo["_headers"] = WSGIHandler._headers
    if keep < 3:
        undo["log_request"] = WSGIHandler.log_request
    return type(f"Staged{keep}", (ClusterHandler,), undo)


def serve_forwarder(stage: str, port: int, upstream: str) -> None:
    """forward_only's app (HttpForwarder alone) under ClusterHandler at ``stage``."""
    from gevent import monkey

    monkey.patch_all()
    import gc

    import gevent
    from gevent.pywsgi import WSGIServer

    from cluster.proxy.http import HttpForwarder
    from forward_only import make_app

    server = WSGIServer(("127.0.0.1", port), make_app(HttpForwarder(), upstream),
                        handler_class=staged_handler(stage), log=None)
    if stage == "all":  # the last step, as cluster serve does
        gc.collect()
        gc.freeze()
    gevent.signal_handler(signal.SIGTERM, server.stop)
    server.serve_forever()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@contextlib.contextmanager
def started(argv: list[str], port: int | None, workdir: Path, name: str) -> Iterator[int]:
    """Run argv until the block ends (once ``port`` accepts connections, if given);
    yields its PID. Stopped by PID (TERM, then KILL)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), str(ROOT / "tests" / "apps"), os.environ.get("PYTHONPATH", "")]))
    with open(workdir / f"{name}.log", "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=str(workdir))
    try:
        if port is not None:
            wait_port(port, proc)
        yield proc.pid
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)


def status_lists(port: int, endpoint: str) -> bool:
    """Does the balancer's GET /_cluster/status list ``endpoint``?"""
    import json
    import urllib.request

    with contextlib.suppress(OSError, ValueError):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_cluster/status",
                                    timeout=2) as response:
            view = json.load(response)
        return any(e["endpoint"] == endpoint for e in view.get("endpoints", []))
    return False


@contextlib.contextmanager
def cluster_setup(port: int, backend: str, workdir: Path) -> Iterator[int]:
    """`cluster serve --ui-service web` on ``port`` plus a `cluster register` sidecar
    putting ``backend`` in a temp SQLite store as service web; yields the balancer's PID
    once its status lists the backend."""
    discovery = f"sqlite:///{workdir / 'd.sqlite3'}"
    with contextlib.ExitStack() as stack:
        os.environ["CLUSTER_DISCOVERY_URL"] = discovery  # inherited by both processes
        try:
            pid = stack.enter_context(started(
                cluster_argv("serve", "--ui-service", SERVICE, "--bind", f"127.0.0.1:{port}"),
                port, workdir, "proxy"))
            stack.enter_context(started(
                cluster_argv("register", "--service", SERVICE, "--endpoint-url", backend,
                             "--ping-interval", "1"),
                None, workdir, "sidecar"))
        finally:
            del os.environ["CLUSTER_DISCOVERY_URL"]
        deadline = time.monotonic() + 20
        while not status_lists(port, backend):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the balancer never listed {backend}; see {workdir}")
            time.sleep(0.2)
        yield pid


def nginx_argv(template: str, workdir: Path, **values: object) -> list[str]:
    text = (BENCH / template).read_text()
    values.setdefault("DIR", workdir)
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    conf = workdir / template
    conf.write_text(text)
    return ["nginx", "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "stderr.log")]


def cpu_seconds(pid: int) -> float:
    """utime + stime of pid and its direct children (nginx: master + worker)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def wrk(url: str, duration: float, connections: int, threads: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--latency", url],
        capture_output=True, text=True, check=True, timeout=duration + 60).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        match = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        result[f"p{pct}"] = _ms(match.group(1)) if match else float("nan")  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    result["bad"] = float(bad.group(1)) if bad else 0.0
    if errors:
        print(f"    wrk socket errors on {url}: {errors.group(1)}", file=sys.stderr)
    return result


def measure(name: str, pid: int, url: str, args: argparse.Namespace) -> dict[str, float]:
    if args.warmup:
        wrk(url, args.warmup, args.connections, args.threads)
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    result = wrk(url, args.duration, args.connections, args.threads)
    result["cpu"] = 100.0 * (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
    result["us"] = result["cpu"] * 1e4 / result["rps"] if result["rps"] else float("nan")
    bad = f"  NON-2xx {result['bad']:.0f}" if result["bad"] else ""
    print(f"  {name:<18} {url.rsplit('/', 1)[1]:>8}: {result['rps']:9.0f} req/s  "
          f"p50 {result['p50']:7.2f} ms  p99 {result['p99']:7.2f} ms  "
          f"cpu {result['cpu']:4.0f}% = {result['us']:5.1f} us/req{bad}", flush=True)
    return result


def size_label(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 and size % 1024 == 0 else f"{size} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before each run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", default="100,65536", help="response sizes in bytes")
    parser.add_argument("--targets", default="hello,direct,proxy,forwarder,nginx")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every target this many times, interleaved; keep "
                             "each one's best (for a machine shared with other work)")
    parser.add_argument("--handler-stages", action="store_true",
                        help="also measure the forwarder with ClusterHandler's fast paths "
                             "undone, then added one by one (first size only)")
    parser.add_argument("--serve-hello", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--serve-forwarder", nargs=3, metavar=("STAGE", "PORT", "UPSTREAM"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_hello:
        serve_hello(args.serve_hello)
        return
    if args.serve_forwarder:
        stage, port, upstream = args.serve_forwarder
        serve_forwarder(stage, int(port), upstream)
        return
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (Debian: apt-get install wrk nginx-light)")
    sizes = [int(s) for s in args.sizes.split(",")]
    targets = args.targets.split(",")
    if args.handler_stages:
        targets += [f"forwarder:{stage}" for stage in STAGES]

    workdir = Path(tempfile.mkdtemp(prefix="http-bench-"))
    try:
        workdir.chmod(0o755)  # nginx workers run as nobody when started by root
        www = workdir / "www"
        www.mkdir()
        for size in sizes:
            (www / str(size)).write_bytes(os.urandom(size))
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (workdir / f"tmp-{sub}").mkdir()
        print(f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s, "
              f"{args.rounds} round(s), {os.cpu_count()} cores, load average "
              f"{os.getloadavg()[0]:.2f}, temp dir {workdir}", flush=True)
        results = run(args, workdir, sizes, targets)
        report(results, sizes, targets)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace, workdir: Path, sizes: list[int],
        targets: list[str]) -> dict[tuple[str, int], dict[str, float]]:
    """Start every server at once (idle ones cost nothing), then measure them in turn,
    ``--rounds`` times; keep each target's best round (the least disturbed one)."""
    results: dict[tuple[str, int], dict[str, float]] = {}
    with contextlib.ExitStack() as stack:
        backend_port = free_port()
        backend = f"http://127.0.0.1:{backend_port}"
        servers = {"direct": (backend_port, stack.enter_context(started(
            nginx_argv("nginx_backend.conf", workdir, PORT=backend_port),
            backend_port, workdir, "backend")))}
        for target in targets:
            port = free_port()
            if target == "proxy":
                servers[target] = (port, stack.enter_context(cluster_setup(
                    port, backend, workdir)))
                continue
            if target == "forwarder":
                argv = forwarder_argv(port, backend)
            elif target.startswith("forwarder:"):
                argv = forwarder_argv(port, backend, target.split(":", 1)[1])
            elif target == "nginx":
                argv = nginx_argv("nginx_proxy.conf", workdir, PORT=port,
                                  UPSTREAM_PORT=backend_port, BUFFERING="off")
            elif target == "hello":
                argv = hello_argv(port)
            elif target == "direct":
                continue
            else:
                sys.exit(f"unknown target {target}")
            servers[target] = (port, stack.enter_context(started(
                argv, port, workdir, target.replace(":", "-"))))
        for round_no in range(1, args.rounds + 1):
            if args.rounds > 1:
                print(f"round {round_no}", flush=True)
            for size in sizes:
                for target in targets:
                    if (target == "hello" or ":" in target) and size != sizes[0]:
                        continue  # hello: one fixed 100-byte body; stages: one size
                    port, pid = servers[target]
                    path = "hello" if target == "hello" else str(size)
                    result = measure(target, pid, f"http://127.0.0.1:{port}/{path}", args)
                    best = results.get((target, size))
                    if best is None or result["rps"] > best["rps"]:
                        results[target, size] = result
    return results


def report(results: dict[tuple[str, int], dict[str, float]], sizes: list[int],
           targets: list[str]) -> None:
    print()
    print("| response | target | req/s | p50 ms | p99 ms | server CPU | CPU µs/req |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for size in sizes:
        for target in targets:
            r = results.get((target, size))
            if r is None:
                continue
            label = {"hello": "hello (pywsgi)"}.get(target, target)
            print(f"| {size_label(size)} | {label} | {r['rps']:.0f} | {r['p50']:.2f} | "
                  f"{r['p99']:.2f} | {r['cpu']:.0f}% | {r['us']:.1f} |")
    print()
    others = ("direct", "nginx", "hello", "forwarder")
    print("| response | " + " | ".join(f"proxy/{o}" for o in others) + " |")
    print("| --- |" + " ---: |" * len(others))
    for size in sizes:
        proxy = results.get(("proxy", size))
        if proxy is None:
            continue
        ratios = []
        for other in others:
            base = results.get((other, size))
            ratios.append(f"{proxy['rps'] / base['rps']:.2f}" if base else "-")
        print(f"| {size_label(size)} | {' | '.join(ratios)} |")
    stages = [t for t in targets if t.startswith("forwarder:") and (t, sizes[0]) in results]
    if stages:
        steps = [*stages, "forwarder"]
        base = results[stages[0], sizes[0]]["rps"]
        print()
        print(f"| handler stage ({size_label(sizes[0])}, forwarder) | req/s | p50 ms | "
              "p99 ms | CPU µs/req | vs stock |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for target in steps:
            r = results.get((target, sizes[0]))
            if r is None:
                continue
            label = target.split(":", 1)[1] if ":" in target else "+gcfreeze (= forwarder)"
            print(f"| {label} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | "
                  f"{r['us']:.1f} | {r['rps'] / base:.2f} |")


if __name__ == "__main__":
    main()
