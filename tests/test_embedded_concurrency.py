"""Many processes opening one new embedded store at the same moment (``cluster demo``,
``--workers-count 8``): every first read and heartbeat must succeed, none may surface
SQLite's "database is locked" as a discovery outage."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time

import pytest

from cluster.discovery.embedded import EmbeddedStore, is_busy
from cluster.records import make_record

PROCESSES = 8


def _member(index: int, path: str, barrier, results) -> None:
    store = EmbeddedStore(path, timeout=5.0)
    errors: list[str] = []
    barrier.wait()  # every process opens the fresh file at the same moment

    def reader() -> None:
        for _ in range(5):
            try:
                store.snapshot()
            except Exception as exc:  # noqa: BLE001 - reported to the test
                errors.append(f"read: {exc}")

    def writer() -> None:
        for _ in range(5):
            try:
                store.heartbeat(make_record("web", f"http://127.0.0.1:{9000 + index}", None, 1.0))
            except Exception as exc:  # noqa: BLE001 - reported to the test
                errors.append(f"heartbeat: {exc}")

    threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.close()
    results.put((index, errors))


@pytest.mark.parametrize("trial", range(2))
def test_processes_starting_together_on_a_new_file_all_succeed(tmp_path, trial):
    path = str(tmp_path / "state" / "discovery.sqlite3")  # directory and file both new
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    procs = [ctx.Process(target=_member, args=(n, path, barrier, results))
             for n in range(PROCESSES)]
    for proc in procs:
        proc.start()
    try:
        outcomes = [results.get(timeout=30) for _ in procs]
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    failures = {index: errors for index, errors in outcomes if errors}
    assert failures == {}
    store = EmbeddedStore(path)
    try:
        assert len(store.snapshot().documents) == PROCESSES
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
    finally:
        store.close()


def test_busy_is_told_apart_from_other_errors(tmp_path):
    path = tmp_path / "locked.sqlite3"
    holder = sqlite3.connect(str(path), isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    other = sqlite3.connect(str(path), timeout=0)
    try:
        with pytest.raises(sqlite3.OperationalError) as locked:
            other.execute("SELECT * FROM t")
        assert is_busy(locked.value)
        with pytest.raises(sqlite3.OperationalError) as missing:
            holder.execute("SELECT * FROM nowhere")
        assert not is_busy(missing.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        other.close()


def test_a_removed_store_file_is_reopened_not_written_in_limbo(tmp_path):
    path = tmp_path / "discovery.sqlite3"
    old = EmbeddedStore(str(path))
    try:
        old.heartbeat(make_record("web", "http://127.0.0.1:9001", None, 1.0))
        for suffix in ("", "-wal", "-shm"):  # an operator resets the store
            (tmp_path / f"discovery.sqlite3{suffix}").unlink(missing_ok=True)
        new = EmbeddedStore(str(path))
        try:
            new.heartbeat(make_record("web", "http://127.0.0.1:9002", None, 1.0))
            old.heartbeat(make_record("web", "http://127.0.0.1:9001", None, 1.0))
            seen = {d["endpoint"] for d in new.snapshot().documents}
            assert seen == {"http://127.0.0.1:9001", "http://127.0.0.1:9002"}
        finally:
            new.close()
    finally:
        old.close()


def test_heartbeats_do_not_sync_the_disk_under_the_write_lock(tmp_path):
    """synchronous=NORMAL on the store's connection (a per-connection setting): at FULL
    every heartbeat fsynced the log while holding the file's one write lock; with the
    disk busy, four writers waited up to 0.84 s for each other's syncs, against 0.07 s
    at NORMAL (bench/sqlite_heartbeats.py), and a longer stall expired a whole service."""
    store = EmbeddedStore(str(tmp_path / "d.sqlite3"))
    try:
        store.heartbeat({"serviceName": "web", "endpoint": "http://127.0.0.1:9",
                         "pingInterval": 1000})
        synchronous = store._run(lambda conn: conn.execute("PRAGMA synchronous").fetchone())
        assert synchronous == (1,)  # NORMAL
        assert [d["endpoint"] for d in store.snapshot().documents] == ["http://127.0.0.1:9"]
    finally:
        store.close()


def test_takes_writes_says_no_while_another_program_holds_the_write_lock(tmp_path) -> None:
    """The watchers' probe (registry.Watcher._probe_writes): yes normally, no at once
    (not after the 5 s busy timeout) while another connection holds the write lock,
    and the store's own calls wait as long as before afterwards."""
    path = tmp_path / "d.sqlite3"
    store = EmbeddedStore(str(path))
    try:
        store.heartbeat({"serviceName": "web", "endpoint": "http://127.0.0.1:9",
                         "pingInterval": 5000})
        assert store.takes_writes() is True
        holder = sqlite3.connect(str(path), isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            started = time.monotonic()
            assert store.takes_writes() is False
            assert time.monotonic() - started < 1.0
            assert len(store.snapshot().documents) == 1  # reads go on (WAL)
            holder.execute("ROLLBACK")
        finally:
            holder.close()
        assert store.takes_writes() is True
        busy = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        try:
            busy.execute("BEGIN IMMEDIATE")
            threading.Timer(0.5, busy.execute, ("ROLLBACK",)).start()
            store.heartbeat({"serviceName": "web", "endpoint": "http://127.0.0.1:9",
                             "pingInterval": 5000})  # waited for the lock, as ever
        finally:
            time.sleep(0.6)
            busy.close()
    finally:
        store.close()
