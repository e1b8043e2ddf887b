"""What a second worker buys for a CPU-bound app: 1 and 2 worker processes.

    python bench/workers_bench.py [--duration 5] [--connections 16] [--work 20000]

The app (``--serve-app``, loaded as ``workers_bench:app``) spends about a millisecond
of pure-Python CPU per request (a sum over ``--work`` squares), so one process is
bound by one core. Each target gets the same wrk run (``wrk -t2 -cN -dS --latency``;
without wrk a small threaded Python client does the same, slower, job):

- ``serve-1``      ``cluster serve`` (one process)
- ``serve-2``      ``cluster serve --workers-count 2`` (two workers behind one port;
  without a cookie about half the requests a worker accepts are relayed to the other)
- ``gunicorn-1``   gunicorn ``-w 1`` with ``cluster.gunicorn``
- ``gunicorn-2``   gunicorn ``-w 2`` with ``cluster.gunicorn``

It prints requests/s, p50/p99 latency and the server's CPU time per request (all its
processes, user + system, from /proc) per target as a table. The CPU time per request
depends little on how busy the machine is, so it says what N free cores would give:
about N / (CPU time per request) requests per second. Discovery is a temp
SQLite file; every process is started here and stopped by PID. Keep runs short: the
figures are for comparing 1 with 2 workers on the same machine, not absolute.
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
import threading
import time
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
WORK = int(os.environ.get("WORKERS_BENCH_WORK", "20000"))


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """The CPU-bound app: about 1 ms of pure Python per request."""
    total = sum(i * i for i in range(WORK))
    body = f"{total} {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def target_argv(name: str, port: int, tmp: Path) -> list[str]:
    bind = f"127.0.0.1:{port}"
    if name.startswith("serve"):
        return [sys.executable, "-m", "cluster", "serve", "--service", "bench",
                "--app", "workers_bench:app", "--bind", bind,
                "--workers-count", name.split("-")[1], "--log-level", "warning"]
    return [sys.executable, "-m", "gunicorn", "-c", "python:cluster.gunicorn",
            "-w", name.split("-")[1], "-b", bind, "--log-level", "warning",
            "--control-socket", str(tmp / f"{name}.ctl"), "workers_bench:app"]


def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(p) for p in (task / "children").read_text().split()]
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its descendants (live ones), in seconds."""
    ticks = 0
    for each in process_tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def running(name: str, tmp: Path) -> Iterator[tuple[str, int]]:
    port = free_port()
    env = dict(os.environ, CLUSTER_DISCOVERY_URL=f"sqlite://{tmp / 'discovery.sqlite3'}",
               CLUSTER_SERVICE="bench", WORKERS_BENCH_WORK=str(WORK),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "bench")]))
    log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(target_argv(name, port, tmp), env=env, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(tmp))
    try:
        wait_port(port, proc)
        time.sleep(2.0)  # every worker up and registered
        yield f"http://127.0.0.1:{port}/", proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        log.close()


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(url: str, duration: float, connections: int) -> dict[str, float]:
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{int(duration)}s",
                          "--latency", url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\n\s+50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\n\s+99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50": p50, "p99": p99, "errors": float(errors.group(1)) if errors else 0}


def run_python(url: str, duration: float, connections: int) -> dict[str, float]:
    """wrk's job in threads with keep-alive connections (slower; only when wrk is absent)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    latencies: list[float] = []
    errors = [0]
    stop = time.monotonic() + duration

    def client() -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        while time.monotonic() < stop:
            began = time.perf_counter()
            try:
                conn.request("GET", parts.path)
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    errors[0] += 1
            except OSError:
                errors[0] += 1
                conn.close()
                continue
            latencies.append((time.perf_counter() - began) * 1000)

    threads = [threading.Thread(target=client) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    return {"rps": len(latencies) / duration, "p50": pick(0.5), "p99": pick(0.99),
            "errors": float(errors[0])}


def main() -> None:
    global WORK
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--work", type=int, default=WORK)
    parser.add_argument("--targets", default="serve-1,serve-2,gunicorn-1,gunicorn-2")
    args = parser.parse_args()
    WORK = args.work
    measure = run_wrk if shutil.which("wrk") else run_python
    print(f"load: {'wrk -t2' if measure is run_wrk else 'python threads'} "
          f"-c{args.connections} {args.duration:.0f}s; work {WORK}; "
          f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")
    print(f"{'target':12} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/req':>11} "
          f"{'errors':>7}")
    with tempfile.TemporaryDirectory(prefix="workers-bench-") as tmp:
        for name in args.targets.split(","):
            with running(name, Path(tmp)) as (url, pid):
                measure(url, 1.0, args.connections)  # warm up
                before = cpu_seconds(pid)
                r = measure(url, args.duration, args.connections)
                cpu = cpu_seconds(pid) - before
            per_request = cpu * 1000 / max(1.0, r["rps"] * args.duration)
            print(f"{name:12} {r['rps']:8.0f} {r['p50']:8.2f} {r['p99']:8.2f} "
                  f"{per_request:11.2f} {r['errors']:7.0f}", flush=True)


if __name__ == "__main__":
    main()
