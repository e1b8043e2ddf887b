"""A throwaway PostgreSQL server, for FerretDB's PostgreSQL backend (benchmarks).

FerretDB v1's SQLite backend (the test suite's) filters by ``_id`` with an expression
its own ``_id`` index does not match (``->'$._id'`` against an index on ``->"_id"``),
so every update, delete, and every read that finds nothing early, scans the whole
collection. Its PostgreSQL backend (FerretDB's production backend) uses the index. The
discovery scale benchmark runs on both, to tell the store's cost from the design's.

The server listens on a Unix socket only (no TCP port), in a temporary directory, with
``fsync=off``; it runs as the ``postgres`` user when we are root (PostgreSQL refuses
root). It is stopped by PID. Needs Debian's ``postgresql`` package (initdb, postgres).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

DATABASE = "ferretdb"


class NoPostgres(RuntimeError):
    """PostgreSQL is not installed or did not start; the message says why."""


def find_bin(name: str) -> str:
    """``name`` from Debian's newest PostgreSQL, else from PATH."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if found:
        return found[-1]
    on_path = shutil.which(name)
    if on_path:
        return on_path
    raise NoPostgres(f"{name} not found: apt-get install postgresql")


class PostgresServer:
    """One PostgreSQL server in a temporary directory, reached by its Unix socket."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cluster-postgres-"))
        self.dir.chmod(0o755)
        self.popen: subprocess.Popen[bytes] | None = None
        self._user: dict[str, Any] = {}
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                raise NoPostgres("running as root needs the postgres user "
                                 "(apt-get install postgresql)") from None
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
            self._user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def url(self) -> str:
        """The URL FerretDB's ``--postgresql-url`` takes (pgx: host= a socket folder)."""
        return f"postgres://postgres@/{DATABASE}?host={self.dir}"

    def _run(self, argv: list[str]) -> None:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                              cwd=self.dir, **self._user)
        if done.returncode != 0:
            raise NoPostgres(f"{argv[0]} failed: {done.stderr.strip()[-2000:]}")

    def start(self, timeout: float = 60.0) -> None:
        data = self.dir / "data"
        self._run([find_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                   "-E", "UTF8", "--no-sync"])
        with open(self.dir / "server.log", "ab") as out:
            self.popen = subprocess.Popen(
                [find_bin("postgres"), "-D", str(data), "-k", str(self.dir),
                 "-c", "listen_addresses=", "-c", "fsync=off",
                 "-c", "synchronous_commit=off", "-c", "max_connections=200"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.dir, **self._user)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise NoPostgres(f"postgres exited: {self.output()}")
            try:
                self._run([find_bin("createdb"), "-h", str(self.dir), "-U", "postgres",
                           DATABASE])
                return
            except NoPostgres as exc:
                if "already exists" in str(exc):
                    return
                time.sleep(0.2)
        self.stop()
        raise NoPostgres(f"postgres did not start within {timeout:.0f}s: {self.output()}")

    def output(self) -> str:
        log = self.dir / "server.log"
        return log.read_text(errors="replace")[-3000:] if log.exists() else ""

    def pids(self) -> list[int]:
        """The postmaster and its children (one backend per connection), for CPU sums."""
        if self.pid is None:
            return []
        children = []
        for stat in glob.glob("/proc/[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = Path(stat).read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == self.pid:
                    children.append(int(stat.split("/")[2]))
        return [self.pid, *children]

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT) by PID, then SIGKILL."""
        popen = self.popen
        if popen is None or popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(popen.pid, signal.SIGINT)
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(popen.pid, signal.SIGKILL)
            popen.wait(10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
