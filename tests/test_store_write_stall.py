"""A store that answers reads but takes no writes (a full disk, a read-only file system,
a lock held on the file) stops every heartbeat at once. Before, every table then
emptied one ping interval plus grace later, and every request got 503 while every
instance ran. Now the overdue endpoints stay while no heartbeat of anyone lands, and a
crashed instance still expires while the others' heartbeats land (tests/
test_discovery_log.py, tests/test_store_recovery.py).

The stall is real: another connection holds the write lock of the SQLite file the
store keeps its records in (the embedded store's own file, or FerretDB's file for the
test database), so writes wait and fail while reads go on (WAL).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pytest
import requests

from helpers import Proc, start_instance, start_serve, wait_until

STALL_SECONDS = 5.0  # ping 1 s + grace 1 s, more than twice over


@contextlib.contextmanager
def writes_blocked(path: Path) -> Iterator[None]:
    """Hold ``path``'s write lock (as a long transaction of another program would)."""
    conn = sqlite3.connect(str(path), timeout=10, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


@contextlib.contextmanager
def two_members_and_a_front(url: str) -> Iterator[tuple[Proc, str, list[Proc]]]:
    """Two `cluster serve` members of web and a balancer-only front (ping 1 s, grace
    1 s), yielded once the front lists both; all stopped by PID at the end."""
    members = [start_instance(url, f"m{n}")[0] for n in range(2)]
    front, port = start_serve("--ui-service", "web", "--ping-interval", "1",
                              "--expiry-grace", "1", env={"CLUSTER_DISCOVERY_URL": url},
                              name="front")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: len(requests.get(base + "/_cluster/status", timeout=5)
                               .json()["endpoints"]) == 2, timeout=15, what="both listed")
        yield front, base, members
    finally:
        front.stop()
        for member in members:
            member.stop()


def store_file(kind: str, url: str, mongo_server) -> Path:
    if kind == "embedded":
        return Path(urlsplit(url).path)
    name = urlsplit(url).path.strip("/")
    assert mongo_server.data_dir is not None
    return mongo_server.data_dir / "db" / f"{name}.sqlite"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["embedded", pytest.param("ferretdb", marks=pytest.mark.soak)])
def test_a_store_that_takes_no_writes_empties_no_table(kind, request) -> None:
    if kind == "embedded":
        url, server = request.getfixturevalue("sqlite_url"), None
    else:
        server = request.getfixturevalue("mongo_server")
        url = request.getfixturevalue("mongo_url")
    with two_members_and_a_front(url) as (front, base, _members):
        path = store_file(kind, url, server)
        wait_until(path.exists, timeout=5, what=str(path))
        statuses: list[int] = []
        listed: list[int] = []
        with writes_blocked(path):
            ends = time.monotonic() + STALL_SECONDS
            while time.monotonic() < ends:
                statuses.append(requests.get(base + "/whoami", timeout=5).status_code)
                listed.append(len(requests.get(base + "/_cluster/status", timeout=5)
                                  .json()["endpoints"]))
                time.sleep(0.1)
        assert set(statuses) == {200}, f"{statuses.count(503)} of {len(statuses)} were 503"
        assert set(listed) == {2}
        # the heartbeats land again; nobody left on the way
        ends = time.monotonic() + 3.0
        while time.monotonic() < ends:
            assert requests.get(base + "/whoami", timeout=5).status_code == 200
            assert len(requests.get(base + "/_cluster/status", timeout=5)
                       .json()["endpoints"]) == 2, front.output()
            time.sleep(0.1)
        log = front.output()
        assert "endpoint left" not in log
        assert "Traceback" not in log
        if kind == "embedded":  # every refresh reads the records: the stall shows
            assert log.count("no heartbeat has landed in") == 1, log
            assert log.count("heartbeats land in") == 1, log
        else:  # a front that follows the membership log sees no change at all, unless
            # a late record was listed before the stall
            assert log.count("no heartbeat has landed in") <= 1, log


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["embedded", "ferretdb"])
def test_instances_all_killed_at_once_still_expire_on_time(kind, request) -> None:
    """No heartbeat lands either when every instance dies at once; the store still takes
    writes (the reaper's renewals, the embedded file's lock): they expire as ever."""
    url = request.getfixturevalue("sqlite_url" if kind == "embedded" else "mongo_url")
    with two_members_and_a_front(url) as (front, base, members):
        for member in members:
            member.kill()
        killed = time.monotonic()
        wait_until(lambda: requests.get(base + "/_cluster/status", timeout=5)
                   .json()["endpoints"] == [], timeout=10, what="both expired")
        # ping 1 s + grace 1 s, the reaper's scan and the front's refresh
        assert time.monotonic() - killed < 4.5
        assert "no heartbeat has landed" not in front.output()
