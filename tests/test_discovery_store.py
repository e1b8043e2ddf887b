"""One behavioural suite for every discovery backend (real FerretDB/MongoDB, real SQLite)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sqlite3
import time
from urllib.parse import urlsplit

import pymongo
import pytest

from cluster.discovery import open_store
from cluster.errors import DiscoveryError
from cluster.records import COLLECTION, endpoint_hash, make_record
from cluster.registry import Registrar, Watcher


@pytest.fixture(params=["mongo_url", "sqlite_url"])
def store_url(request) -> str:
    return request.getfixturevalue(request.param)


@pytest.fixture
def store(store_url):
    s = open_store(store_url, timeout=3)
    s.snapshot()  # creates the embedded schema, so foreign writers can insert
    yield s
    s.close()


def write_foreign(url: str, doc: dict, age: float = 0.0) -> None:
    """Insert a record the way another program (a Meteor app) would."""
    if url.startswith("mongodb"):
        client = pymongo.MongoClient(url, serverSelectionTimeoutMS=3000)
        try:
            now = client.admin.command("hello")["localTime"]
            doc = dict(doc, timestamp=now - dt.timedelta(seconds=age))
            client.get_default_database()[COLLECTION].insert_one(doc)
        finally:
            client.close()
    else:
        conn = sqlite3.connect(urlsplit(url).path)
        try:
            conn.execute(
                "INSERT INTO cluster_endpoints VALUES (?, ?, ?, ?)",
                (str(doc.get("serviceName")), str(doc.get("endpoint")),
                 json.dumps({k: v for k, v in doc.items() if k != "timestamp"}),
                 time.time() - age),
            )
            conn.commit()
        finally:
            conn.close()


def meteor_doc(endpoint: str, service: str = "web", **extra) -> dict:
    return {"serviceName": service, "endpoint": endpoint, "endpointHash": endpoint_hash(endpoint),
            "balancer": None, "pingInterval": 5000, **extra}


def test_heartbeat_upserts_one_record_stamped_by_the_store(store):
    record = make_record("web", "http://127.0.0.1:3001", None, 5.0)
    store.heartbeat(record)
    first = store.snapshot()
    time.sleep(0.05)
    store.heartbeat(record)
    second = store.snapshot()
    assert len(second.documents) == 1
    doc = second.documents[0]
    for key in ("serviceName", "endpoint", "endpointHash", "balancer", "pingInterval"):
        assert doc[key] == record[key]
    assert isinstance(doc["timestamp"], dt.datetime)
    assert doc["timestamp"] > first.documents[0]["timestamp"]
    # the store's clock stamps the record, and the snapshot reads that same clock
    assert abs((second.now - doc["timestamp"]).total_seconds()) < 2


def test_remove_deletes_only_that_record(store):
    store.heartbeat(make_record("web", "http://127.0.0.1:3001", None, 5.0))
    store.heartbeat(make_record("web", "http://127.0.0.1:3002", None, 5.0))
    store.remove("web", "http://127.0.0.1:3001")
    assert [d["endpoint"] for d in store.snapshot().documents] == ["http://127.0.0.1:3002"]
    store.remove("web", "http://127.0.0.1:9999")  # absent: no error


def test_foreign_meteorhacks_record_appears_and_malformed_is_skipped_once(
        store, store_url, caplog):
    write_foreign(store_url, meteor_doc("http://10.1.1.1:3000", extra="fine"))
    write_foreign(store_url, meteor_doc("ftp://10.1.1.2:3000"))
    write_foreign(store_url, {"serviceName": "web", "endpoint": "http://10.1.1.3:3000"})
    watcher = Watcher(store, grace=1.0, refresh_interval=1.0)
    with caplog.at_level(logging.WARNING, logger="cluster.registry"):
        watcher.refresh()
        watcher.refresh()
    assert [e.url for e in watcher.table.by_service["web"]] == ["http://10.1.1.1:3000"]
    warnings = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(warnings) == 2, warnings  # one per bad record, not one per refresh
    assert any("ftp://" in w for w in warnings) and any("pingInterval" in w for w in warnings)


def test_expiry_is_judged_by_the_store_clock(store, store_url):
    write_foreign(store_url, meteor_doc("http://10.1.1.1:3000", pingInterval=1000), age=0.2)
    write_foreign(store_url, meteor_doc("http://10.1.1.2:3000", pingInterval=1000), age=30)
    watcher = Watcher(store, grace=1.0, refresh_interval=1.0)
    table = watcher.refresh()
    assert [e.url for e in table.endpoints] == ["http://10.1.1.1:3000"]


def test_registrar_heartbeats_and_removes_on_stop(store):
    registrar = Registrar(store, "web", "http://127.0.0.1:3005", "http://lb:80", 0.2)
    registrar.start()
    try:
        deadline = time.monotonic() + 10
        while registrar.beats < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert registrar.beats >= 3
        docs = store.snapshot().documents
        assert [(d["endpoint"], d["balancer"], d["pingInterval"]) for d in docs] == [
            ("http://127.0.0.1:3005", "http://lb:80", 200)]
    finally:
        registrar.stop()
    assert store.snapshot().documents == []


def test_sidecar_health_check_keeps_the_record_only_while_healthy(store):
    healthy = [True]
    registrar = Registrar(store, "web", "http://127.0.0.1:3006", None, 1.0,
                          healthy=lambda: healthy[0])
    registrar.beat()
    assert len(store.snapshot().documents) == 1
    healthy[0] = False
    registrar.beat()
    assert store.snapshot().documents == []
    healthy[0] = True
    registrar.beat()
    assert len(store.snapshot().documents) == 1


def test_unreachable_store_raises_discovery_error():
    store = open_store("mongodb://127.0.0.1:1/x", timeout=0.3)
    try:
        with pytest.raises(DiscoveryError):
            store.snapshot()
    finally:
        store.close()


def test_embedded_store_deletes_rows_of_killed_instances(sqlite_url):
    """A killed instance's row (no stop removed it) is deleted a day after its last
    heartbeat: kept, every refresh of every reader decoded it for ever (20,000 such rows
    cost an idle balancer 30 % of a core and 20 MB). One expired an hour ago stays (a
    reader may still be keeping it), and so does a row whose timestamp is not a time."""
    path = urlsplit(sqlite_url).path
    writer = open_store(sqlite_url, timeout=3)
    writer.snapshot()
    conn = sqlite3.connect(path)
    old = time.time() - 25 * 3600
    rows = [("web", f"http://10.0.{i // 250}.{i % 250 + 1}:80",
             json.dumps(make_record("web", f"http://10.0.{i // 250}.{i % 250 + 1}:80",
                                    None, 5.0)), old - i) for i in range(500)]
    rows.append(("web", "http://10.9.9.9:80",
                 json.dumps(make_record("web", "http://10.9.9.9:80", None, 5.0)),
                 time.time() - 3600))
    rows.append(("web", "http://10.9.9.8:80", "{}", "not a time"))
    with conn:
        conn.executemany("INSERT INTO cluster_endpoints VALUES (?, ?, ?, ?)", rows)
    try:
        writer.heartbeat(make_record("web", "http://127.0.0.1:1", None, 5.0))
        left = sorted(r[0] for r in conn.execute("SELECT endpoint FROM cluster_endpoints"))
    finally:
        conn.close()
        writer.close()
    assert left == ["http://10.9.9.8:80", "http://10.9.9.9:80", "http://127.0.0.1:1"]


def test_unwritable_embedded_store_raises_discovery_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = open_store(f"sqlite:///{blocker}/sub/discovery.sqlite3")
    with pytest.raises(DiscoveryError):
        store.heartbeat(make_record("web", "http://127.0.0.1:1", None, 1.0))
