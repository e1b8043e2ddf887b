"""The table survives the moment a store comes back, even when the read that sees it
come back blocked for a while (pymongo waits for server selection): the endpoints it
knew stay while their records exist, for a ping interval plus grace from that read."""

from __future__ import annotations

import os
import signal
import time

import pytest

from cluster.discovery import open_store
from cluster.registry import Registrar, Watcher


@pytest.mark.timeout(120)
def test_endpoints_stay_through_a_recovery_that_blocked(mongo_server, mongo_url):
    store = open_store(mongo_url, timeout=4)
    writer = open_store(mongo_url, timeout=4)
    url = "http://127.0.0.1:9"
    registrar = Registrar(writer, "web", url, None, ping_interval=1.0)
    watcher = Watcher(store, grace=0.5, refresh_interval=0.1)
    try:
        registrar.start()
        watcher.start()
        deadline = time.monotonic() + 10
        while [e.url for e in watcher.table.endpoints] != [url]:
            assert time.monotonic() < deadline, "never registered"
            time.sleep(0.05)
        mongo_server.stop()
        try:
            deadline = time.monotonic() + 15
            while not watcher.outage.failing:
                assert time.monotonic() < deadline, "outage not noticed"
                time.sleep(0.05)
            registrar.stop()  # no more heartbeats; its removal fails: the record stays
            time.sleep(2.0)  # the watcher's next read is blocked in server selection
        finally:
            mongo_server.start()
        deadline = time.monotonic() + 15
        while watcher.outage.failing:  # the blocked read returns with a stale record
            assert time.monotonic() < deadline, "no recovery"
            time.sleep(0.01)
        assert [e.url for e in watcher.table.endpoints] == [url], "kept through recovery"
        # nobody heartbeats it: it expires once the shelter (ping + grace) is over
        deadline = time.monotonic() + 5
        while watcher.table.endpoints:
            assert time.monotonic() < deadline, "never expired"
            time.sleep(0.05)
    finally:
        registrar.stop()
        watcher.stop()
        store.close()
        writer.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("reap", [True, False], ids=["reaper", "follower"])
def test_endpoints_stay_through_a_store_that_stalled(mongo_server, mongo_url, reap):
    """A store that stops answering without failing anyone (a stopped process, a GC
    pause, an election) and answers again a few seconds later: every heartbeat it
    then holds is stale, yet the live endpoints must not vanish from the table. The
    watcher saw no error, so only the length of the gap can tell it what happened."""
    store = open_store(mongo_url, timeout=8)
    writer = open_store(mongo_url, timeout=8)
    url = "http://127.0.0.1:9"
    registrar = Registrar(writer, "web", url, None, ping_interval=1.0)
    watcher = Watcher(store, grace=0.5, refresh_interval=0.1, reap=reap)
    pid = mongo_server.pid
    assert pid is not None
    try:
        registrar.start()
        watcher.start()
        deadline = time.monotonic() + 10
        while [e.url for e in watcher.table.endpoints] != [url]:
            assert time.monotonic() < deadline, "never registered"
            time.sleep(0.05)
        time.sleep(1.0)  # steady: the reaper (when reaping) has read well for a while
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(3.0)  # longer than pingInterval + grace; shorter than the timeouts
        finally:
            os.kill(pid, signal.SIGCONT)
        resumed = time.monotonic()
        refreshes = watcher.stats.refreshes
        missing = []
        while time.monotonic() - resumed < 3.0:
            if [e.url for e in watcher.table.endpoints] != [url]:
                missing.append(round(time.monotonic() - resumed, 2))
            time.sleep(0.01)
        assert watcher.stats.refreshes > refreshes + 5, "the watcher did not resume"
        assert not watcher.outage.failing, "a stall, not a failure"
        assert missing == [], f"the live endpoint left the table after the stall: {missing}"
    finally:
        registrar.stop()
        watcher.stop()
        store.close()
        writer.close()
