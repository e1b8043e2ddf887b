"""The embedded single-host store: one SQLite file that every local instance shares.

sqlite3 calls block the thread they run on. Under gevent they run in the hub's thread
pool, so a file locked by another process waits there and never stalls the server.
The store's clock is this host's clock, shared by every process that can open the file.

Many processes start together on one file (``cluster demo``, ``--workers-count 8``), so
start-up is made safe for concurrent openers rather than retried past as an outage:
each process keeps one connection; WAL mode is switched on only by the first opener
that finds the file in another mode (it is a property of the file, so the others just
see it); ``CREATE TABLE IF NOT EXISTS`` tolerates a concurrent creator; and the few
SQLITE_BUSY answers that SQLite gives without waiting on its busy timeout (a journal
mode switch or WAL recovery under way in another process) are retried inside the
store, with a short backoff, until the store's timeout.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from cluster.discovery.base import DiscoveryStore, StoreSnapshot, wanted
from cluster.errors import DiscoveryError
from cluster.rand import RANDOM
from cluster.records import shown

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

#: seconds close() waits for a call under way
CLOSE_WAIT = 0.2
#: how long takes_writes() waits for the file's write lock (a heartbeat holds it well
#: under a millisecond)
WRITE_PROBE_MS = 100
#: a row whose heartbeat is this old (seconds) is deleted: its instance was killed (a
#: stop removes its own), and every refresh of every reader would decode it for ever;
#: far past any record's expiry (ping interval at most an hour, plus the grace, plus
#: the 300 s a reader may keep an overdue record while writes do not land)
DEAD_AFTER = 24 * 3600.0
#: seconds between two such clean-ups by one process (done with a heartbeat)
SWEEP_EVERY = 60.0
#: SQLite's primary result codes for "another connection holds the lock"
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6


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


def is_busy(exc: sqlite3.Error) -> bool:
    """Is ``exc`` SQLite saying "locked by another connection, try again"?"""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if isinstance(code, int):
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


class EmbeddedStore(DiscoveryStore):
    def __init__(self, path: str | None, timeout: float = 5.0) -> None:
        self.path = Path(path) if path else default_path()
        self.description = f"sqlite://{self.path}"
        self.timeout = timeout
        #: this process's one connection, opened on first use and kept
        self._conn: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file in use
        # Serialises this process's callers (greenlets or threads) on that connection;
        # taken by the caller, so a waiting greenlet yields instead of holding a thread.
        self._lock = threading.Lock()
        #: close() was called: the call under way, if any, drops the connection
        self._closed = False
        #: when (time.monotonic()) this process last deleted the dead rows; 0.0: never
        self._swept_at = 0.0

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), timeout=self.timeout, isolation_level=None,
                               check_same_thread=False)
        try:
            # Switching to WAL takes an exclusive lock without waiting on the busy
            # timeout, so only the process that finds the file in another mode asks.
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            # No fsync per commit (SQLite's advice for WAL): at FULL each heartbeat
            # synced the log while holding the file's one write lock, so a disk slowed
            # by other work held every instance's heartbeats back at once, and a whole
            # service could expire. Records are refreshed every ping interval, so the
            # last few lost to a power cut cost nothing (bench/sqlite_heartbeats.py).
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return None
        return info.st_dev, info.st_ino

    def _attempt(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is not None and self._file_identity() != self._identity:
            # The file was removed or replaced (someone reset the store): a connection
            # kept open would go on using the old one, unseen by newer instances.
            self._conn.close()
            self._conn = None
        if self._conn is None:
            self._conn = self._connect()
            self._identity = self._file_identity()
        return work(self._conn)

    def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        deadline = time.monotonic() + self.timeout
        delay = 0.005
        def call() -> T | sqlite3.Error | OSError:
            # The error travels back as a value, not an exception: gevent's thread pool
            # prints a traceback for every exception raised in a worker thread, which
            # made an unreadable store log dozens of them per second.
            try:
                return self._attempt(work)
            except (sqlite3.Error, OSError) as exc:
                if not (isinstance(exc, sqlite3.Error) and is_busy(exc)):
                    # the file may come back empty (deleted, restored, replaced):
                    # connect and set the schema up again on the next call
                    self._drop_connection()
                return exc

        with self._lock:
            while True:
                result = _off_the_hub(call)
                if self._closed:  # closed meanwhile (see close): nothing keeps it
                    self._drop_connection()
                if isinstance(result, sqlite3.Error):
                    if not is_busy(result) or time.monotonic() + delay > deadline:
                        raise DiscoveryError(f"{self.description}: {result}")
                elif isinstance(result, OSError):
                    raise DiscoveryError(f"{self.description}: {result}")
                else:
                    return result
                # Sleeps in the caller (a greenlet under gevent), not in a pool thread.
                time.sleep(delay * RANDOM.uniform(0.5, 1.0))
                delay = min(delay * 2, 0.25)

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def close(self) -> None:
        """Close the connection; not waiting for a call under way more than a moment:
        one waiting on a file another process keeps locked would hold a stop for the
        busy timeout (5 s), after the removal of the record was already given up.
        That call drops the connection when it returns."""
        self._closed = True
        if self._lock.acquire(timeout=CLOSE_WAIT):
            try:
                self._drop_connection()
            finally:
                self._lock.release()

    def takes_writes(self) -> bool | None:
        """Whether the file's write lock can be had within WRITE_PROBE_MS: a lock held
        by another program stops every heartbeat at once, while reads go on (WAL)."""
        timeout_ms = int(self.timeout * 1000)

        def work(conn: sqlite3.Connection) -> bool:
            conn.execute(f"PRAGMA busy_timeout = {WRITE_PROBE_MS}")
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
                return True
            finally:
                conn.execute(f"PRAGMA busy_timeout = {timeout_ms}")

        def call() -> bool | sqlite3.Error | OSError:
            try:
                return self._attempt(work)
            except (sqlite3.Error, OSError) as exc:
                return exc

        with self._lock:
            result = _off_the_hub(call)
        if isinstance(result, sqlite3.Error) and is_busy(result):
            return False
        return result if isinstance(result, bool) else None

    def heartbeat(self, record: Mapping[str, Any], announce: bool = False) -> None:
        document = json.dumps(dict(record))
        sweep = time.monotonic() - self._swept_at >= SWEEP_EVERY or not self._swept_at

        def work(conn: sqlite3.Connection) -> None:
            now = time.time()
            conn.execute(
                "INSERT INTO cluster_endpoints (service, endpoint, document, timestamp)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (service, endpoint)"
                " DO UPDATE SET document = excluded.document, timestamp = excluded.timestamp",
                (record["serviceName"], record["endpoint"], document, now),
            )
            if sweep:  # (a row whose timestamp is not a number is not touched)
                conn.execute("DELETE FROM cluster_endpoints WHERE typeof(timestamp)"
                             " IN ('real', 'integer') AND timestamp < ?", (now - DEAD_AFTER,))

        self._run(work)
        if sweep:
            self._swept_at = time.monotonic()

    def remove(self, service: str, endpoint: str) -> None:
        self._run(
            lambda conn: conn.execute(
                "DELETE FROM cluster_endpoints WHERE service = ? AND endpoint = ?",
                (service, endpoint),
            )
        )

    def snapshot(self, services: frozenset[str] | None = None) -> StoreSnapshot:
        # One host's handful of instances: every refresh reads the whole (small) table;
        # there is no membership log (changelog = False).
        def work(conn: sqlite3.Connection) -> StoreSnapshot:
            rows = conn.execute(
                "SELECT service, endpoint, document, timestamp FROM cluster_endpoints"
            ).fetchall()
            now = dt.datetime.fromtimestamp(time.time(), dt.timezone.utc)
            documents, unreadable = [], []
            for service, endpoint, text, stamp in rows:
                document = _row_document(text, stamp)
                if isinstance(document, str):
                    unreadable.append((shown(f"{service}@{endpoint}"), document))
                elif wanted(document, services):
                    documents.append(document)
            return StoreSnapshot(now=now, documents=documents, unreadable=unreadable)

        return self._run(work)


def _row_document(text: object, stamp: object) -> dict[str, Any] | str:
    """The record of one row, with its timestamp; or, for a row no reader could use,
    what is wrong with it. Any local process can write the file (and SQLite's columns
    take any type), so a row is input: it must cost one warning, never the read."""
    try:
        document = json.loads(text)  # type: ignore[arg-type]
    except RecursionError:
        return "document is nested too deeply"
    except (ValueError, TypeError):
        return f"document {shown(text, 60)} is not JSON"
    if not isinstance(document, dict):
        return f"document is a JSON {type(document).__name__}, not an object"
    try:
        if isinstance(stamp, bool) or not isinstance(stamp, (int, float)):
            raise TypeError
        document["timestamp"] = dt.datetime.fromtimestamp(stamp, dt.timezone.utc)
    except (TypeError, ValueError, OverflowError, OSError):
        return f"timestamp {shown(stamp, 60)} is not a time"
    return document
