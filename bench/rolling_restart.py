"""Rolling restart under load, through a balancer-only front: how many requests fail?

    python bench/rolling_restart.py [--steps 4] [--pause 4] [--code DIR]

Two instances of the test backend (``cluster serve --service web``) behind a
``cluster serve --ui-service web`` front, discovery in a temp SQLite file, ping 1 s,
grace 1 s, default --eject-seconds. wrk -t1 -c20 sends GET /whoami to the front the whole
time while, at each step, one instance gets SIGTERM, is started again on the same port
one second later, and the next step follows ``--pause`` seconds after that (the setup
of issue 8). Prints wrk's request count and its non-2xx/3xx and socket error counts.
``--code`` runs another checkout's ``cluster`` (to compare with an older commit).
Every process is started here and stopped by PID; the temp dir is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--pause", type=float, default=4.0)
    parser.add_argument("--code", type=Path, default=ROOT)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rolling-"))
    env = dict(os.environ, PYTHONPATH=f"{args.code}:{ROOT / 'tests' / 'apps'}",
               CLUSTER_DISCOVERY_URL=f"sqlite://{tmp / 'd.sqlite3'}")
    common = ["--ping-interval", "1", "--expiry-grace", "1", "--log-level", "warning"]
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], name: str) -> subprocess.Popen[bytes]:
        log = open(tmp / f"{name}-{len(procs)}.log", "wb")  # noqa: SIM115 - closed at exit
        proc = subprocess.Popen([sys.executable, "-m", "cluster", *argv], env=env,
                                stdout=log, stderr=subprocess.STDOUT, cwd=str(tmp))
        procs.append(proc)
        return proc

    def member(port: int, name: str) -> subprocess.Popen[bytes]:
        while True:  # the old process may hold the port for a moment after SIGTERM
            proc = start(["serve", "--service", "web", "--app", "backend:app", "--bind",
                          f"127.0.0.1:{port}", *common], name)
            if wait_port(port, proc) and (time.sleep(0.2) or proc.poll() is None):
                return proc
            time.sleep(0.1)

    try:
        ports = [free_port(), free_port()]
        members = [member(p, f"m{n}") for n, p in enumerate(ports)]
        front_port = free_port()
        front = start(["serve", "--ui-service", "web", "--bind", f"127.0.0.1:{front_port}",
                       *common], "front")
        wait_port(front_port, front)
        time.sleep(2)  # every table complete
        duration = int(args.steps * (1 + args.pause) + 4)
        wrk = subprocess.Popen(["wrk", "-t1", "-c20", f"-d{duration}s",
                                f"http://127.0.0.1:{front_port}/whoami"],
                               stdout=subprocess.PIPE, text=True)
        time.sleep(2)
        for step in range(args.steps):
            n = step % len(members)
            members[n].send_signal(signal.SIGTERM)
            time.sleep(1.0)
            members[n] = member(ports[n], f"m{n}")
            time.sleep(args.pause)
        out, _ = wrk.communicate(timeout=duration + 30)
        total = re.search(r"(\d+) requests in", out)
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        errors = re.search(r"Socket errors: (.*)", out)
        print(f"code={args.code} steps={args.steps} pause={args.pause}s "
              f"requests={total.group(1) if total else '?'} "
              f"non-2xx={non2xx.group(1) if non2xx else 0} "
              f"socket-errors={errors.group(1) if errors else 'none'}")
        return 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


if __name__ == "__main__":
    sys.exit(main())
