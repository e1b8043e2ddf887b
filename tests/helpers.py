"""Real processes on loopback for the end-to-end tests.

Every process a test starts goes through :class:`Proc`, which remembers its PID and
is stopped (SIGTERM, then SIGKILL) by the fixture or ``with`` block that made it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

import requests

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc} exited with {proc.returncode}:\n{proc.output()}")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.1, what: str = ""):
    """Poll ``predicate`` until it returns a truthy value; return that value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}: {last!r}")


class Proc:
    """A child process with its output in a temp file, stopped by PID."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None,
                 cwd: Path | None = None, name: str = "") -> None:
        self.name = name or Path(argv[0]).name
        self.log = tempfile.NamedTemporaryFile(prefix=f"{self.name}-", suffix=".log",
                                               delete=False)
        full_env = dict(os.environ)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), str(TESTS / "apps"), full_env.get("PYTHONPATH", "")]
        )
        if env:
            full_env.update(env)
        self.popen = subprocess.Popen(
            list(argv), env=full_env, cwd=str(cwd or ROOT), stdout=self.log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        self.pid = self.popen.pid

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.pid}>"

    def poll(self) -> int | None:
        return self.popen.poll()

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float = 15.0) -> int:
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait, then SIGKILL: never leaves the process behind."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        self.log.close()
        return self.popen.returncode

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait(5)


@contextlib.contextmanager
def running(argv: Sequence[str], port: int | None = None, **kwargs) -> Iterator[Proc]:
    proc = Proc(argv, **kwargs)
    try:
        if port is not None:
            wait_port(port, proc=proc)
        yield proc
    finally:
        proc.stop()


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def backend(port: int, name: str = "backend") -> list[str]:
    """argv of the test backend app (tests/apps/backend.py) on 127.0.0.1:port."""
    return python(str(TESTS / "apps" / "backend.py"), "--port", str(port), "--name", name)


def get(url: str, **kwargs) -> requests.Response:
    kwargs.setdefault("timeout", 10)
    return requests.get(url, **kwargs)


def cluster_argv(*args: str) -> list[str]:
    """argv of the `cluster` command, run as `python -m cluster` from this checkout."""
    return python("-m", "cluster", *args)


def instance(discovery_url: str, port: int, name: str, *extra: str,
             env: dict[str, str] | None = None) -> Proc:
    """Start `cluster serve` with the test backend as its local app (not yet waited for)."""
    argv = cluster_argv(
        "serve", "--service", "web", "--app", "backend:app", "--bind", f"127.0.0.1:{port}",
        "--ping-interval", "1", "--expiry-grace", "1", *extra,
    )
    full_env = {"CLUSTER_DISCOVERY_URL": discovery_url, "BACKEND_NAME": name}
    full_env.update(env or {})
    return Proc(argv, env=full_env, name=name)


def status_json(discovery_url: str, *extra: str) -> dict:
    """`cluster status --json` as data (a real subprocess, as an operator runs it)."""
    import json

    result = subprocess.run(
        cluster_argv("status", "--json", "--expiry-grace", "1", *extra),
        env={**os.environ, "CLUSTER_DISCOVERY_URL": discovery_url, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=30, cwd=str(ROOT),
    )
    if result.returncode != 0:
        raise RuntimeError(f"cluster status failed: {result.stderr}")
    return json.loads(result.stdout)


def live_endpoints(discovery_url: str) -> set[str]:
    return {row["endpoint"] for row in status_json(discovery_url)["endpoints"] if row["healthy"]}
