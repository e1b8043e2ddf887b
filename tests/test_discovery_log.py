"""The membership log on a real MongoDB-protocol server: refreshes cost O(changes).

Watchers and registrars are driven by hand (``refresh()``, ``beat()``), so each step is
one refresh and the store work it caused is counted exactly (``Watcher.stats``).
"""

from __future__ import annotations

import datetime as dt
import time

import pymongo
import pytest

from cluster.discovery import open_store
from cluster.records import COLLECTION, endpoint_hash
from cluster.registry import Registrar, Watcher

PING, GRACE = 0.5, 0.5


@pytest.fixture
def stores(mongo_url):
    opened = []

    def make():
        store = open_store(mongo_url, timeout=3)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def registrar(store, port: int, service: str = "web", balancer: str | None = None):
    return Registrar(store, service, f"http://127.0.0.1:{port}", balancer, PING)


def urls(watcher: Watcher) -> set[str]:
    return {e.url for e in watcher.table.endpoints}


def write_meteor_record(mongo_url: str, url: str, ping_ms: int) -> None:
    """Insert a record as a Meteor app writes it: its own _id, announced in no log."""
    client = pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=3000)
    try:
        now = client.admin.command("hello")["localTime"]
        client.get_default_database()[COLLECTION].insert_one({
            "serviceName": "web", "endpoint": url, "endpointHash": endpoint_hash(url),
            "balancer": None, "pingInterval": ping_ms, "timestamp": now})
    finally:
        client.close()


def test_steady_refreshes_read_no_records_and_joins_and_leaves_come_from_the_log(stores):
    regs = [registrar(stores(), 4000 + i) for i in range(3)]
    for r in regs:
        r.beat()
    reaper, watcher = Watcher(stores(), GRACE, PING / 2), Watcher(stores(), GRACE, PING / 2)
    reaper.refresh()
    watcher.refresh()
    assert reaper.reaping and not watcher.reaping
    assert len(urls(watcher)) == 3
    reads = watcher.stats.full_reads
    for _ in range(5):
        for r in regs:
            r.beat()
        watcher.refresh()
        reaper.refresh()
    assert watcher.stats.full_reads == reads  # five refreshes, no record read
    assert watcher.stats.log_reads == 0
    # a join: announced by its registrar, read from the log at the next refresh
    newcomer = registrar(stores(), 4010)
    newcomer.beat()
    watcher.refresh()
    assert "http://127.0.0.1:4010" in urls(watcher)
    assert (watcher.stats.full_reads, watcher.stats.log_reads) == (reads, 1)
    # a leave (graceful stop): the same
    regs[0].stop()
    watcher.refresh()
    assert "http://127.0.0.1:4000" not in urls(watcher)
    assert (watcher.stats.full_reads, watcher.stats.log_reads) == (reads, 2)


def test_a_crash_is_announced_by_the_reaper_within_ping_plus_grace(stores):
    live, crashing = registrar(stores(), 4100), registrar(stores(), 4101)
    reaper, watcher = Watcher(stores(), GRACE, PING / 2), Watcher(stores(), GRACE, PING / 2)
    live.beat()
    crashing.beat()
    last_beat = time.monotonic()
    reaper.refresh()
    watcher.refresh()
    assert urls(watcher) == {"http://127.0.0.1:4100", "http://127.0.0.1:4101"}
    # the reaper announces expiries only once it has read well for a ping plus grace
    seen_gone = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and seen_gone is None:
        live.beat()
        reaper.refresh()
        watcher.refresh()
        if "http://127.0.0.1:4101" not in urls(watcher):
            seen_gone = time.monotonic() - last_beat
        time.sleep(PING / 4)
    assert seen_gone is not None
    assert urls(watcher) == {"http://127.0.0.1:4100"}
    # expiry at ping + grace after the last beat, plus the reaper's and the watcher's
    # refresh (here a quarter ping each) and the reaper's settling time after its start
    assert seen_gone < PING + GRACE + PING + 0.5, seen_gone
    # and it comes back when it heartbeats again (announced as a rejoin after a gap)
    crashing.beat()
    watcher.refresh()
    assert "http://127.0.0.1:4101" in urls(watcher)


def test_foreign_writers_joins_are_announced_by_the_reaper(stores, mongo_url):
    reaper, watcher = Watcher(stores(), GRACE, PING / 2), Watcher(stores(), GRACE, PING / 2)
    reaper.refresh()
    watcher.refresh()
    reads = watcher.stats.full_reads
    write_meteor_record(mongo_url, "http://127.0.0.1:4200", 5000)
    watcher.refresh()
    assert urls(watcher) == set()  # nobody announced it yet
    reaper.refresh()
    watcher.refresh()
    assert urls(watcher) == {"http://127.0.0.1:4200"}
    assert watcher.stats.full_reads == reads


def test_the_lease_moves_when_the_reaper_stops_and_the_new_one_expires_records(stores):
    crashed = registrar(stores(), 4250)
    crashed.beat()  # and never again
    first = Watcher(stores(), GRACE, 0.2)
    second = Watcher(stores(), GRACE, 0.2, services=frozenset({"web"}))
    first.refresh()
    second.refresh()
    assert first.reaping and not second.reaping
    assert urls(second) == {"http://127.0.0.1:4250"}
    deadline = time.monotonic() + 6
    while urls(second) and time.monotonic() < deadline:  # `first` renews no more
        second.refresh()
        time.sleep(0.1)
    assert second.reaping and urls(second) == set()
    first.refresh()  # it notices the lease is gone at its next renewal
    assert not first.reaping
    assert urls(first) == set()  # and follows the log: the expiry reached it too


def test_a_watcher_reads_only_its_services_and_every_balancer(stores):
    registrar(stores(), 4300, "web").beat()
    registrar(stores(), 4301, "api").beat()
    registrar(stores(), 4302, "admin", balancer="http://127.0.0.1:4302").beat()
    reaper = Watcher(stores(), GRACE, PING / 2)
    reaper.refresh()
    watcher = Watcher(stores(), GRACE, PING / 2, services=frozenset({"web"}))
    watcher.refresh()
    assert watcher.table.services() == ("admin", "web")
    registrar(stores(), 4303, "api").beat()  # a join of another service is not kept
    registrar(stores(), 4304, "web").beat()
    watcher.refresh()
    assert urls(watcher) == {"http://127.0.0.1:4300", "http://127.0.0.1:4302",
                             "http://127.0.0.1:4304"}
    watcher.want("api")  # library code asked for another service: read it now
    assert len(watcher.table.by_service["api"]) == 2


def test_concurrent_announcements_fill_the_log_without_gaps_or_losses(stores):
    """FerretDB's $inc loses concurrent increments; entries are numbered by inserting
    them, so none is lost or overwritten and the log has no holes."""
    import threading

    writers = [stores() for _ in range(4)]

    def announce(n: int) -> None:
        for i in range(10):
            writers[n % 4].announce("join", "web", f"http://127.0.0.1:{5000 + n * 10 + i}",
                                    {"serviceName": "web", "pingInterval": 500})

    threads = [threading.Thread(target=announce, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    entries = writers[0].changes(1, 500)
    assert entries is not None and [e.seq for e in entries] == list(range(1, 81))
    assert len({e.endpoint for e in entries}) == 80
    assert [e.seq for e in writers[0].changes(75, 10)] == [75, 76, 77, 78, 79, 80]
    assert [e.seq for e in writers[0].changes(1, 10)] == list(range(1, 11))  # a batch
    assert writers[0].membership().epoch >= 70  # the epoch is a hint that may trail


def test_a_steady_refresh_is_one_lookup_and_a_lost_epoch_bump_is_repaired_by_the_reaper(
        stores, mongo_url):
    """Watchers read the log only when the epoch moved; an entry whose writer died before
    moving the epoch is picked up after the reaper's next scan moves it."""
    member = registrar(stores(), 4400)
    member.beat()
    reaper, watcher = Watcher(stores(), GRACE, PING / 2), Watcher(stores(), GRACE, PING / 2)
    reaper.refresh()
    watcher.refresh()
    lookups, reads = watcher.stats.lookups, watcher.stats.full_reads
    for _ in range(4):
        member.beat()
        watcher.refresh()
    assert watcher.stats.lookups - lookups == 4  # the membership document, nothing else
    assert watcher.stats.full_reads == reads
    # a record and its join entry, written by an announcer that died before moving
    # the epoch
    epoch = watcher.store.membership().epoch
    end = len(watcher.store.changes(1, 500) or [])
    assert end >= epoch
    client = pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=3000)
    try:
        now = client.admin.command("hello")["localTime"]
        record = {"serviceName": "web", "endpoint": "http://127.0.0.1:4401",
                  "endpointHash": endpoint_hash("http://127.0.0.1:4401"), "balancer": None,
                  "pingInterval": 60000, "timestamp": now}
        database = client.get_default_database()
        database[COLLECTION].insert_one(dict(record))
        database["clusterChanges"].insert_one({"_id": f"c{end + 1}", "kind": "join",
                                               **record})
    finally:
        client.close()
    watcher.refresh()
    assert "http://127.0.0.1:4401" not in urls(watcher)  # the epoch did not move
    reaper.refresh()  # reads the log to its end and moves the epoch there
    assert reaper.store.membership().epoch >= end + 1
    watcher.refresh()
    assert "http://127.0.0.1:4401" in urls(watcher)
    assert watcher.stats.full_reads == reads


def test_the_reaper_wakes_at_the_first_expiry_not_at_its_next_refresh(stores):
    """With a long refresh interval the reaper still announces a crash right after the
    record expires: crashes reach watchers within ping + grace plus one refresh."""
    crashing, live = registrar(stores(), 4500), registrar(stores(), 4501)
    live.start()
    watcher = Watcher(stores(), GRACE, 0.2)
    reaper = Watcher(stores(), GRACE, 2.0)  # would wake 2 s after its first read
    try:
        crashing.beat()  # the last heartbeat: it expires ping + grace (1 s) from now
        last_beat = time.monotonic()
        reaper.start()
        assert reaper.refreshed.wait(5)
        assert reaper.reaping and reaper.pause() < 1.1  # not its 2 s refresh interval
        watcher.start()
        seen_gone = None
        while time.monotonic() - last_beat < 5 and seen_gone is None:
            if watcher.refreshed.is_set() and "http://127.0.0.1:4500" not in urls(watcher):
                seen_gone = time.monotonic() - last_beat
            time.sleep(0.02)
        assert seen_gone is not None
        # expiry (1 s), the reaper's wake-up (+0.05 s), one watcher refresh (0.2 s)
        assert seen_gone < PING + GRACE + 0.6, seen_gone
        assert urls(watcher) == {"http://127.0.0.1:4501"}
        # one early scan per refresh interval at most: the next waits the full interval
        assert reaper.pause() == 2.0
    finally:
        for loop in (watcher, reaper, live):
            loop.stop()


def test_a_record_deleted_by_someone_else_comes_back_at_the_next_heartbeat(
        stores, mongo_url):
    member = registrar(stores(), 4600)
    member.beat()
    reaper, watcher = Watcher(stores(), GRACE, PING / 2), Watcher(stores(), GRACE, PING / 2)
    reaper.refresh()
    watcher.refresh()
    assert urls(watcher) == {"http://127.0.0.1:4600"}
    client = pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=3000)
    try:
        client.get_default_database()[COLLECTION].delete_many({})  # an operator's cleanup
    finally:
        client.close()
    reaper.refresh()  # the record is gone: announced as a leave
    watcher.refresh()
    assert urls(watcher) == set()
    member.beat()  # the replacement by _id creates it again and announces the join
    watcher.refresh()
    assert urls(watcher) == {"http://127.0.0.1:4600"}
    reaper.refresh()
    assert urls(reaper) == {"http://127.0.0.1:4600"}


def test_without_a_reaper_a_meteor_record_is_picked_up_by_the_slow_resync(
        stores, mongo_url, monkeypatch):
    import cluster.registry

    monkeypatch.setattr(cluster.registry, "RESYNC_SECONDS", 0.5)
    monkeypatch.setattr(cluster.registry, "RESYNC_PER_RECORD", 0.0)
    watcher = Watcher(stores(), GRACE, PING / 2, reap=False)
    watcher.refresh()
    reads = watcher.stats.full_reads
    write_meteor_record(mongo_url, "http://127.0.0.1:4700", 60000)
    watcher.refresh()
    assert urls(watcher) == set() and watcher.stats.full_reads == reads
    time.sleep(0.65)  # the resync is due 0.4-0.6 s after the last full read
    watcher.refresh()
    assert urls(watcher) == {"http://127.0.0.1:4700"}
    assert watcher.stats.full_reads == reads + 1


def _seen_gone(watchers, url: str, since: float, limit: float) -> list[float | None]:
    """Seconds after ``since`` at which each watcher's table lost ``url`` (None: never)."""
    seen: list[float | None] = [None] * len(watchers)
    while time.monotonic() - since < limit and None in seen:
        for i, watcher in enumerate(watchers):
            if seen[i] is None and url not in urls(watcher):
                seen[i] = time.monotonic() - since
        time.sleep(0.01)
    return seen


def test_every_watcher_drops_a_crashed_endpoint_when_its_record_expires(stores, mongo_url):
    """The reaper lists overdue records in the membership document; each watcher checks
    such a record when it expires and drops it then, not at its first refresh after the
    reaper's announcement. Two crashes half a refresh interval apart, one of them a
    Meteor-shaped record with its own _id: with the announcement alone, one of the two
    would reach the watchers at least a quarter of a second late."""
    ping, grace, refresh = 1.0, 3.0, 1.0  # records expire 4 s after their last beat
    live = Registrar(stores(), "web", "http://127.0.0.1:4800", None, ping)
    crashing = Registrar(stores(), "web", "http://127.0.0.1:4801", None, ping)
    reaper = Watcher(stores(), grace, 0.25)
    followers = [Watcher(stores(), grace, refresh) for _ in range(2)]
    try:
        live.start()
        crashing.beat()
        reaper.start()
        assert reaper.refreshed.wait(5) and reaper.reaping
        for follower in followers:
            follower.start()
            assert follower.refreshed.wait(5)
        meteor_url = "http://127.0.0.1:4802"
        for _ in range(8):  # stay steady for ping + grace
            crashing.beat()
            time.sleep(0.5)
        crashing.beat()  # its last heartbeat
        crashed_at = time.monotonic()
        time.sleep(refresh / 2)
        write_meteor_record(mongo_url, meteor_url, int(ping * 1000))  # and never again
        meteor_at = time.monotonic()
        reaper_seen = time.monotonic()
        while meteor_url not in urls(followers[0]) and time.monotonic() - reaper_seen < 3:
            time.sleep(0.01)  # announced by the reaper as a foreign join
        assert meteor_url in urls(followers[1]) or meteor_url in urls(followers[0])
        ours = _seen_gone(followers, "http://127.0.0.1:4801", crashed_at, 8)
        theirs = _seen_gone(followers, meteor_url, meteor_at, 8)
        expiry = ping + grace
        for seen in ours + theirs:
            assert seen is not None
            assert expiry - 0.05 < seen < expiry + 0.3, (ours, theirs)
        for follower in followers:
            assert urls(follower) == {"http://127.0.0.1:4800"}
    finally:
        for loop in (*followers, reaper, live):
            loop.stop()


@pytest.mark.soak
def test_a_late_record_that_beats_again_before_it_expires_stays_everywhere(stores):
    ping, grace = 1.0, 3.0
    slow = Registrar(stores(), "web", "http://127.0.0.1:4850", None, ping)
    reaper = Watcher(stores(), grace, 0.25)
    follower = Watcher(stores(), grace, 1.0)
    try:
        slow.beat()
        reaper.start()
        assert reaper.refreshed.wait(5)
        follower.start()
        assert follower.refreshed.wait(5)
        for _ in range(8):
            slow.beat()
            time.sleep(0.5)
        slow.beat()
        paused_at = time.monotonic()
        listed = False
        # silent for 3.9 s (late after 1.5 s), then it beats just before expiring
        while time.monotonic() - paused_at < 3.9:
            listed = listed or bool(reaper.store.membership().late)
            assert "http://127.0.0.1:4850" in urls(follower)
            time.sleep(0.01)
        slow.beat()
        while time.monotonic() - paused_at < 6:
            assert "http://127.0.0.1:4850" in urls(follower)
            time.sleep(0.01)
        assert listed  # the reaper did list it as late
    finally:
        for loop in (follower, reaper):
            loop.stop()
        slow.stop()


def test_a_forged_or_malformed_late_list_drops_no_live_endpoint(stores, mongo_url):
    """Anyone who can write the store can write the membership document: a late list
    naming a live endpoint with an old heartbeat makes watchers look, not drop it."""
    member = registrar(stores(), 4900)
    member.beat()
    reaper, watcher = Watcher(stores(), GRACE, PING / 2), Watcher(stores(), GRACE, PING / 2)
    reaper.refresh()
    watcher.refresh()
    client = pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=3000, tz_aware=True)
    try:
        membership = client.get_default_database()["clusterMembership"]
        old = client.admin.command("hello")["localTime"].replace(year=2020)
        began = time.monotonic()
        while time.monotonic() - began < PING + GRACE:  # steady for a ping plus grace
            member.beat()
            reaper.refresh()
            watcher.refresh()
            time.sleep(PING / 4)
        looked = []
        known = watcher.table.endpoints[0].timestamp  # expired by now, were it not beating
        for late in ([{"serviceName": "web", "endpoint": "http://127.0.0.1:4900",
                       "timestamp": known}],
                     [{"serviceName": "web", "endpoint": "http://127.0.0.1:4900",
                       "timestamp": old}],
                     "junk", [1, {"serviceName": 5}, {"endpoint": None}]):
            member.beat()
            reaper.refresh()  # keeps the lease
            membership.update_one({"_id": "membership"}, {"$set": {"late": late}})
            lookups = watcher.stats.lookups
            watcher.refresh()
            looked.append(watcher.stats.lookups - lookups)
            assert urls(watcher) == {"http://127.0.0.1:4900"}
        # the first forged entry was checked (the membership document, then the record);
        # one older than what the watcher knows and the malformed ones were skipped
        assert looked == [2, 1, 1, 1]
    finally:
        client.close()


def test_the_reaper_deletes_records_dead_for_a_day(stores, mongo_url):
    """A killed instance's record (no stop removed it) is deleted by the reaper a day
    after its last heartbeat: kept, every scan read it for ever. One dead for an hour
    stays, and so does a live one."""
    live = registrar(stores(), 4600)
    live.beat()
    client = pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=3000)
    try:
        records = client.get_default_database()[COLLECTION]
        now = client.admin.command("hello")["localTime"]
        for i, hours in enumerate([25] * 50 + [1]):
            url = f"http://127.0.0.1:{4700 + i}"
            records.insert_one({
                "serviceName": "web", "endpoint": url, "endpointHash": endpoint_hash(url),
                "balancer": None, "pingInterval": 5000,
                "timestamp": now - dt.timedelta(hours=hours)})
        reaper = Watcher(stores(), GRACE, PING / 2)
        reaper.refresh()
        assert reaper.reaping
        left = sorted(d["endpoint"] for d in records.find({}, {"endpoint": 1}))
    finally:
        client.close()
    assert left == ["http://127.0.0.1:4600", "http://127.0.0.1:4750"]
