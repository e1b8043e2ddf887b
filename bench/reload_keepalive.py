"""Keep-alive clients while the workers are replaced: what a reload costs them.

    python bench/reload_keepalive.py serve      [--clients 6] [--reloads 3] [--every 6]
    python bench/reload_keepalive.py gunicorn   (cluster.gunicorn's worker, -w 2)
    python bench/reload_keepalive.py maxreq     (the same, --max-requests 300, no HUP)

``--clients`` threads, each a ``requests.Session`` (keep-alive, and the sticky cookie
kept), POST 2,000 random bytes to ``/echo`` of tests/apps/backend.py on the shared
port and check the echo, as fast as they are answered. Meanwhile the supervisor (or
gunicorn's arbiter) gets ``--reloads`` SIGHUPs ``--every`` seconds apart: each worker is
replaced by a new one, the old one stopping (README "Several processes per host": "no
failed request"). ``maxreq`` lets gunicorn's --max-requests replace the workers.

Prints the requests answered and echoed right, every other outcome with its count, and
the requests slower than 1 s. Every process is started here, stopped by PID, and its
temp dir removed (bench/bed.py). Found by the independent probe of the stop of
2026-11-30: before, six such clients lost 16-30 requests in 15,000-19,000.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import requests
from bed import Bed, free_port, wait_port


def start(bed: Bed, mode: str, port: int) -> subprocess.Popen[bytes]:
    if mode == "serve":
        return bed.start(["serve", "--service", "web", "--app", "backend:app",
                          "--workers-count", "2", "--bind", f"127.0.0.1:{port}",
                          *bed.common], "serve")
    extra = ["--max-requests", "300"] if mode == "maxreq" else []
    path = bed.tmp / "gunicorn.log"
    bed.logs.append(path)
    with open(path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "python:cluster.gunicorn", "-w", "2",
             "-b", f"127.0.0.1:{port}", *extra, "backend:app"],
            env=dict(bed.env, CLUSTER_SERVICE="web", CLUSTER_PING_INTERVAL="1",
                     CLUSTER_EXPIRY_GRACE="1"),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(bed.tmp))
    bed.procs.append(proc)
    return proc


def client(url: str, stop: threading.Event, outcomes: Counter[str],
           slow: list[float]) -> None:
    session = requests.Session()
    while not stop.is_set():
        body = os.urandom(2000)
        started = time.monotonic()
        try:
            answer = session.post(url, data=body, timeout=30)
            outcome = "ok" if answer.status_code == 200 and answer.content == body \
                else f"status {answer.status_code}"
        except requests.RequestException as exc:
            outcome = re.sub(r"0x[0-9a-f]+|port=\d+", "", repr(exc))[:160]
        took = time.monotonic() - started
        outcomes[outcome] += 1
        if took > 1.0:
            slow.append(round(took, 2))
    session.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["serve", "gunicorn", "maxreq"])
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--reloads", type=int, default=3)
    parser.add_argument("--every", type=float, default=6.0)
    args = parser.parse_args()
    bed = Bed(prefix="reload-")
    outcomes: Counter[str] = Counter()
    slow: list[float] = []
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        port = free_port()
        proc = start(bed, args.mode, port)
        if not wait_port(port, proc):
            raise SystemExit(f"{args.mode} did not start:\n{bed.warnings()}")
        time.sleep(3)  # both workers registered and known to each other
        url = f"http://127.0.0.1:{port}/echo"
        threads = [threading.Thread(target=client, args=(url, stop, outcomes, slow))
                   for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        time.sleep(2)
        if args.mode == "maxreq":
            time.sleep(args.reloads * args.every)
        else:
            for _ in range(args.reloads):
                proc.send_signal(signal.SIGHUP)
                time.sleep(args.every)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        tracebacks = bed.tracebacks()
        bed.close()
    failed = sum(n for outcome, n in outcomes.items() if outcome != "ok")
    print(f"{args.mode}: {outcomes['ok']} echoed, {failed} failed, "
          f"{len(slow)} slower than 1 s {sorted(slow, reverse=True)[:10]}")
    for outcome, count in outcomes.most_common():
        if outcome != "ok":
            print(f"  {count} x {outcome}")
    print(f"  tracebacks in the logs: {len(tracebacks)}")
    print("command: python " + shlex.join([str(Path(sys.argv[0])), *sys.argv[1:]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
