"""The embedded single-host store: one SQLite file that every local instance shares.

sqlite3 calls block the thread they run on. Under gevent they run in the hub's thread
pool, so a file locked by another process waits there and never stalls the server.
The store's clock is this host's clock, shared by every process that can open the file.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from cluster.discovery.base import DiscoveryStore, StoreSnapshot
from cluster.errors import DiscoveryError

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cluster_endpoints (
    service   TEXT NOT NULL,
    endpoint  TEXT NOT NULL,
    document  TEXT NOT NULL,
    timestamp REAL NOT NULL,
    PRIMARY KEY (service, endpoint)
)
"""


def default_path() -> Path:
    """``$XDG_STATE_HOME/cluster/discovery.sqlite3`` (``~/.local/state`` by default)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(state) / "cluster" / "discovery.sqlite3"


def _off_the_hub(fn: Callable[[], T]) -> T:
    """Run ``fn`` in gevent's thread pool when gevent is serving, else right here."""
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return fn()
    if monkey.is_module_patched("threading"):
        import gevent

        result: T = gevent.get_hub().threadpool.apply(fn)
        return result
    return fn()


class EmbeddedStore(DiscoveryStore):
    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else default_path()
        self.description = f"sqlite://{self.path}"
        self._ready = False

    def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` on a fresh connection; raises DiscoveryError.

        The error travels back as a value, not an exception: gevent's thread pool
        prints a traceback for every exception raised in a worker thread, which made
        an unreadable store log dozens of them per second.
        """

        def call() -> T | DiscoveryError:
            try:
                if not self._ready:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(str(self.path), timeout=5.0, isolation_level=None)
                try:
                    if not self._ready:
                        conn.execute("PRAGMA journal_mode=WAL")
                        conn.execute(_SCHEMA)
                        self._ready = True
                    return work(conn)
                finally:
                    conn.close()
            except (sqlite3.Error, OSError) as exc:
                # The file may come back empty (deleted, restored, replaced): set the
                # schema up again on the next call.
                self._ready = False
                return DiscoveryError(f"{self.description}: {exc}")

        result = _off_the_hub(call)
        if isinstance(result, DiscoveryError):
            raise result
        return result

    def heartbeat(self, record: Mapping[str, Any]) -> None:
        document = json.dumps(dict(record))

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO cluster_endpoints (service, endpoint, document, timestamp)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (service, endpoint)"
                " DO UPDATE SET document = excluded.document, timestamp = excluded.timestamp",
                (record["serviceName"], record["endpoint"], document, time.time()),
            )

        self._run(work)

    def remove(self, service: str, endpoint: str) -> None:
        self._run(
            lambda conn: conn.execute(
                "DELETE FROM cluster_endpoints WHERE service = ? AND endpoint = ?",
                (service, endpoint),
            )
        )

    def snapshot(self) -> StoreSnapshot:
        def work(conn: sqlite3.Connection) -> StoreSnapshot:
            rows = conn.execute("SELECT document, timestamp FROM cluster_endpoints").fetchall()
            now = dt.datetime.fromtimestamp(time.time(), dt.timezone.utc)
            documents = []
            for text, stamp in rows:
                try:
                    document = json.loads(text)
                except ValueError:
                    document = {"document": text}  # reported as malformed by the reader
                if isinstance(document, dict):
                    document["timestamp"] = dt.datetime.fromtimestamp(stamp, dt.timezone.utc)
                    documents.append(document)
            return StoreSnapshot(now=now, documents=documents)

        return self._run(work)
