"""A bed of real ``cluster serve`` processes on 127.0.0.1 for the bench scripts.

Shared by bench/rolling_restart.py and bench/fault_runs.py (and the CI variant of the
fault runs, tests/test_fault_runs_e2e.py): every process is started here, remembered by
PID and stopped by PID in :meth:`Bed.close`, which also removes the temp dir. wrk is run
and its summary parsed here too.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APPS = ROOT / "tests" / "apps"
#: a line of cluster's log format: time, level, logger, [pid], message
_LOG_LINE = re.compile(r"\S+ \S+ (?P<level>[A-Z]+) \S+ \[\d+\] (?P<message>.*)")


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, never one this process was given before: two
    calls in a row can get the same port from the OS (bound and closed each time),
    and two members of one bed then fought over it."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> bool:
    """True once ``port`` accepts; False if ``proc`` exited first (port still taken)."""
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


class Bed:
    """Temp dir, discovery URL and the ``cluster`` processes of one run."""

    def __init__(self, discovery_url: str | None = None, code: Path = ROOT,
                 ping_interval: float = 1.0, expiry_grace: float = 1.0,
                 log_level: str = "warning", prefix: str = "bed-") -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix))
        self.discovery_url = discovery_url or f"sqlite://{self.tmp / 'd.sqlite3'}"
        self.env = dict(os.environ, PYTHONPATH=f"{code}:{APPS}", PYTHONUNBUFFERED="1",
                        CLUSTER_DISCOVERY_URL=self.discovery_url)
        self.common = ["--ping-interval", f"{ping_interval:g}",
                       "--expiry-grace", f"{expiry_grace:g}", "--log-level", log_level]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def start(self, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        """``python -m cluster ARGV`` with its output in a log file of the temp dir."""
        path = self.tmp / f"{name}-{len(self.procs)}.log"
        with open(path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "cluster", *argv], env=self.env,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=str(self.tmp))
        self.procs.append(proc)
        self.logs.append(path)
        return proc

    def member(self, port: int, name: str, app: str = "backend:app",
               service: str = "web") -> subprocess.Popen[bytes]:
        """An instance of ``service`` serving ``app`` on ``port``, once it listens."""
        while True:  # the old process may hold the port for a moment after SIGTERM
            proc = self.start(["serve", "--service", service, "--app", app, "--bind",
                               f"127.0.0.1:{port}", *self.common], name)
            if wait_port(port, proc) and (time.sleep(0.2) or proc.poll() is None):
                return proc
            time.sleep(0.1)

    def front(self, port: int, name: str = "front",
              service: str = "web") -> subprocess.Popen[bytes]:
        """A balancer-only instance (``--ui-service``, no app) on ``port``."""
        proc = self.start(["serve", "--ui-service", service, "--bind", f"127.0.0.1:{port}",
                           *self.common], name)
        if not wait_port(port, proc):
            raise RuntimeError(f"{name} exited with {proc.returncode}")
        return proc

    def tracebacks(self) -> list[str]:
        """The logs (name and the first traceback's text) that contain a Traceback."""
        found = []
        for path in self.logs:
            text = path.read_text(errors="replace") if path.exists() else ""
            at = text.find("Traceback")
            if at >= 0:
                found.append(f"{path.name}:\n{text[max(0, at - 300):at + 2000]}")
        return found

    def warnings(self, most: int = 8) -> list[str]:
        """The most frequent warning and error lines of the logs by process name ("m0",
        "front"), each with its count, numbers left out so that lines of one shape
        count together: what went wrong when a run failed."""
        shapes: Counter[tuple[str, str]] = Counter()
        for path in self.logs:
            text = path.read_text(errors="replace") if path.exists() else ""
            name = path.stem.rpartition("-")[0]
            for line in text.splitlines():
                found = _LOG_LINE.match(line)
                if found and found["level"] in ("WARNING", "ERROR", "CRITICAL"):
                    shapes[(name, re.sub(r"\d+", "N", found["message"])[:200])] += 1
        return [f"{n}x {name}: {message}" for (name, message), n in shapes.most_common(most)]

    def close(self) -> None:
        """SIGTERM every live process by PID, SIGKILL what is left, remove the temp dir."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class WrkResult:
    requests: int
    non2xx: int
    socket_errors: dict[str, int]

    @property
    def failed(self) -> int:
        return self.non2xx + sum(self.socket_errors.values())

    def errors_text(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.socket_errors.items() if v) or "none"


def wrk(url: str, connections: int, seconds: float = 3600) -> subprocess.Popen[str]:
    """``wrk -t1 -cN -dS URL`` started now; read it with :func:`wrk_result`."""
    return subprocess.Popen(["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
                             url], stdout=subprocess.PIPE, text=True)


def wrk_result(proc: subprocess.Popen[str], timeout: float = 60.0,
               interrupt: bool = False) -> WrkResult:
    """wrk's summary once it ends (``interrupt``: SIGINT it now; it prints it then)."""
    if interrupt and proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=timeout)
    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       out)
    if total is None:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    socket_errors = dict(zip(("connect", "read", "write", "timeout"),
                             (int(g) for g in errors.groups()))) if errors else {}
    return WrkResult(int(total.group(1)), int(non2xx.group(1)) if non2xx else 0,
                     socket_errors)
