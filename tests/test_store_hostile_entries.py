"""Hostile entries in the stores themselves (a real FerretDB, a real SQLite file): a
record, row or log entry no reader can use costs one warning, never the read, and the
good records next to it stay in the table. Each of these used to stop the watcher."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sqlite3
import time
from urllib.parse import urlsplit

import pymongo
import pytest
from bson import DatetimeMS

from cluster.discovery import open_store
from cluster.discovery.base import DiscoveryStore, StoreSnapshot
from cluster.discovery.mongo import CHANGES, MEMBERSHIP, MEMBERSHIP_ID
from cluster.records import COLLECTION, endpoint_hash, make_record
from cluster.registry import Watcher

GOOD = "http://127.0.0.1:3001"
#: BSON dates MongoDB accepts and Python's datetime cannot hold
BEFORE_YEAR_1 = DatetimeMS(-(2**62))
AFTER_YEAR_9999 = DatetimeMS(2**62)


def record(endpoint: str, service: object = "web", **extra: object) -> dict:
    return {"serviceName": service, "endpoint": endpoint,
            "endpointHash": endpoint_hash(endpoint), "balancer": None,
            "timestamp": dt.datetime.now(dt.timezone.utc), "pingInterval": 60000, **extra}


def skipped(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]


def read_twice(store, caplog, **watcher_options) -> tuple[list[str], list[str]]:
    """The table's URLs after two refreshes of a new watcher (the second must not warn
    again), and the warnings logged; the store is closed."""
    try:
        watcher = Watcher(store, grace=1.0, refresh_interval=1.0, **watcher_options)
        with caplog.at_level(logging.WARNING, logger="cluster.registry"):
            watcher.refresh()
            watcher.refresh()
    finally:
        store.close()
    return [e.url for e in watcher.table.endpoints], skipped(caplog)


@pytest.fixture
def mongo_db(mongo_url):
    client = pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=5000)
    yield client.get_default_database()
    client.close()


def test_mongo_records_with_dates_out_of_range_are_skipped_once(mongo_url, mongo_db, caplog):
    mongo_db[COLLECTION].insert_many([
        record(GOOD),
        record("http://127.0.0.1:3002", timestamp=BEFORE_YEAR_1),
        record("http://127.0.0.1:3003", timestamp=AFTER_YEAR_9999),
    ])
    urls, warnings = read_twice(open_store(mongo_url, timeout=3), caplog)
    assert urls == [GOOD]
    assert len(warnings) == 2, warnings
    assert all("timestamp missing or not a date" in w for w in warnings)


def test_mongo_membership_with_dates_out_of_range_still_reads(mongo_url, mongo_db):
    mongo_db[COLLECTION].insert_one(record(GOOD))
    mongo_db[MEMBERSHIP].insert_one({
        "_id": MEMBERSHIP_ID, "epoch": 0, "reaper": "gone", "renewed": BEFORE_YEAR_1,
        "late": [{"serviceName": "web", "endpoint": GOOD, "timestamp": AFTER_YEAR_9999},
                 {"serviceName": "web", "endpoint": GOOD,
                  "timestamp": dt.datetime(9999, 12, 31, tzinfo=dt.timezone.utc)}]})
    store = open_store(mongo_url, timeout=3)
    try:
        membership = store.membership()
        assert (membership.reaper, membership.renewed, membership.late) == ("gone", None, ())
        watcher = Watcher(store, grace=1.0, refresh_interval=1.0, reap=False)
        watcher.refresh()
        watcher.refresh()
    finally:
        store.close()
    assert [e.url for e in watcher.table.endpoints] == [GOOD]


@pytest.mark.parametrize("service", [["web"], {"name": "web"}])
def test_mongo_log_entry_whose_service_is_not_a_name_is_skipped_once(
        mongo_url, mongo_db, caplog, service):
    """A watcher of some services only (as with --secret) follows the log: an entry
    naming no service by a string used to raise TypeError in every such watcher."""
    store = open_store(mongo_url, timeout=3)
    try:
        watcher = Watcher(store, grace=1.0, refresh_interval=1.0,
                          services=frozenset({"web"}), reap=False)
        store.heartbeat(make_record("web", GOOD, None, 60.0))
        watcher.refresh()  # reads the records, then follows the log
        mongo_db[CHANGES].insert_one({"_id": "c2", "kind": "join",
                                      **record("http://127.0.0.1:3002", service=service)})
        mongo_db[MEMBERSHIP].update_one({"_id": MEMBERSHIP_ID}, {"$max": {"epoch": 2}})
        with caplog.at_level(logging.WARNING, logger="cluster.registry"):
            watcher.refresh()
            store.heartbeat(make_record("web", "http://127.0.0.1:3004", None, 60.0))
            watcher.refresh()
    finally:
        store.close()
    assert watcher.stats.log_reads >= 2  # the entries were followed, not re-read
    assert [e.url for e in watcher.table.endpoints] == [GOOD, "http://127.0.0.1:3004"]
    warnings = skipped(caplog)
    assert len(warnings) == 1 and "serviceName" in warnings[0], warnings


HOSTILE_ROWS = {
    "text timestamp": ("http://127.0.0.1:3002", None, "abc", "is not a time"),
    "huge timestamp": ("http://127.0.0.1:3003", None, 1e20, "is not a time"),
    "nested document": ("http://127.0.0.1:3004", "[" * 100_000 + "]" * 100_000, None,
                        "nested too deeply"),
    "array document": ("http://127.0.0.1:3005", "[1, 2]", None, "JSON list"),
    "not JSON": ("http://127.0.0.1:3006", "{nope", None, "is not JSON"),
}


def test_embedded_hostile_rows_are_skipped_with_one_warning_each(sqlite_url, caplog):
    store = open_store(sqlite_url, timeout=3)
    store.heartbeat(make_record("web", GOOD, None, 60.0))
    conn = sqlite3.connect(urlsplit(sqlite_url).path)
    try:
        for endpoint, text, stamp, _ in HOSTILE_ROWS.values():
            document = json.dumps(make_record("web", endpoint, None, 60.0))
            conn.execute("INSERT INTO cluster_endpoints VALUES (?, ?, ?, ?)",
                         ("web", endpoint, text or document, stamp or time.time()))
        listed = dict(make_record("web", "http://127.0.0.1:3007", None, 60.0),
                      serviceName=["web"])
        conn.execute("INSERT INTO cluster_endpoints VALUES (?, ?, ?, ?)",
                     ("web", "http://127.0.0.1:3007", json.dumps(listed), time.time()))
        conn.commit()
    finally:
        conn.close()
    # services: as with --secret, which used to raise TypeError for the list
    urls, warnings = read_twice(store, caplog, services=frozenset({"web"}))
    assert urls == [GOOD]
    assert len(warnings) == len(HOSTILE_ROWS) + 1, warnings
    for endpoint, _, _, problem in HOSTILE_ROWS.values():
        assert any(endpoint in w and problem in w for w in warnings), (problem, warnings)
    assert any("3007" in w and "serviceName" in w for w in warnings)


class _FailsOnce(DiscoveryStore):
    """A store whose first read raises what no store error explains."""

    description = "failing-once"

    def __init__(self) -> None:
        self.reads = 0

    def heartbeat(self, record, announce=False) -> None:  # pragma: no cover - unused
        raise NotImplementedError

    def remove(self, service, endpoint) -> None:  # pragma: no cover - unused
        raise NotImplementedError

    def snapshot(self, services=None) -> StoreSnapshot:
        self.reads += 1
        if self.reads <= 3:
            raise RuntimeError("a bug nobody foresaw")
        now = dt.datetime.now(dt.timezone.utc)
        return StoreSnapshot(now=now, documents=[record(GOOD, timestamp=now)])


def test_watcher_loop_outlives_an_unexpected_error(caplog):
    store = _FailsOnce()
    watcher = Watcher(store, grace=1.0, refresh_interval=0.02)
    with caplog.at_level(logging.WARNING, logger="cluster.registry"):
        watcher.start()
        try:
            deadline = time.monotonic() + 5
            while not watcher.table.endpoints and time.monotonic() < deadline:
                time.sleep(0.01)
            assert watcher._thread is not None and watcher._thread.is_alive()
        finally:
            watcher.stop()
    assert [e.url for e in watcher.table.endpoints] == [GOOD]
    assert watcher.outage.errors == 3  # counted as failed refreshes (the metrics show it)
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1  # once per distinct error, not once per refresh
    # its thread ended (a stop waits only briefly for a read in flight, so the threads
    # of other tests' watchers may still be finishing theirs: only this one counts)
    assert watcher._thread is not None
    watcher._thread.join(2.0)
    assert not watcher._thread.is_alive()
