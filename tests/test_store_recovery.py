"""The table survives the moment a store comes back, even when the read that sees it
come back blocked for a while (pymongo waits for server selection): the endpoints it
knew stay while their records exist, for a ping interval plus grace from that read. The
same after a store that stalled without failing anyone; but a store that is slow all
along still expires a crashed endpoint."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from urllib.parse import urlsplit

import pytest
import requests

import toxiproxy
from cluster.discovery import open_store
from cluster.registry import Registrar, Watcher
from helpers import Proc, free_port, wait_until


@pytest.mark.soak  # 14 s; the outage itself is in CI (test_discovery_e2e.py)
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
@pytest.mark.parametrize("reap", [True, pytest.param(False, marks=pytest.mark.soak)],
                         ids=["reaper", "follower"])
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


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", ["renew_reaper", *(pytest.param(c, marks=pytest.mark.soak)
                                                   for c in ("changes", "publish_late",
                                                             "announce"))])
def test_the_reaper_keeps_endpoints_through_a_stall_in_any_call(mongo_server, mongo_url,
                                                                call):
    """The store stalls while the reaper waits on a call other than the reads it
    judged stalls by: the renewal of its lease (a write pymongo retries once the
    server is back), the log lookup before its scan, or, after a scan, the listing
    of a crashed endpoint as late or the announcement of its expiry. The next scan is
    as quick as ever and finds every heartbeat stale, as nobody could write
    meanwhile; the live endpoints must stay until their heartbeats land (the soak's
    restart of the database: 771 answers "no live endpoint", and a leave announced
    for every endpoint). Heartbeats resume a little after the store, as a
    registrar's do after its retry's backoff."""
    store = open_store(mongo_url, timeout=8)
    writer = open_store(mongo_url, timeout=8)
    url = "http://127.0.0.1:9"
    registrar = Registrar(writer, "web", url, None, ping_interval=1.0)
    crashed = Registrar(writer, "web", "http://127.0.0.1:10", None, ping_interval=1.0)
    watcher = Watcher(store, grace=0.5, refresh_interval=0.1, reap=True)
    pid = mongo_server.pid
    assert pid is not None
    done, hold = threading.Event(), threading.Event()
    resumed: list[float] = []

    def beat() -> None:
        while not done.is_set():
            if not hold.is_set():
                registrar.beat()
            done.wait(0.3)

    def stall_then_resume() -> None:
        time.sleep(2.0)  # longer than pingInterval + grace; shorter than the timeouts
        os.kill(pid, signal.SIGCONT)
        resumed.append(time.monotonic())
        time.sleep(0.3)  # the registrar's retry lands a little later
        hold.clear()

    stalled = threading.Event()
    original = getattr(store, call)

    def stalling(*args, **kwargs):
        if armed.is_set() and not stalled.is_set() and \
                threading.current_thread().name == Watcher.name:
            stalled.set()
            hold.set()
            os.kill(pid, signal.SIGSTOP)  # before the call is sent: it waits for the store
            threading.Thread(target=stall_then_resume, daemon=True).start()
        return original(*args, **kwargs)

    armed = threading.Event()
    setattr(store, call, stalling)
    beating = threading.Thread(target=beat, daemon=True)
    try:
        beating.start()
        watcher.start()
        wait_until(lambda: watcher.reaping and [e.url for e in watcher.table.endpoints] == [url],
                   timeout=10, what="the reaper's table")
        time.sleep(1.6)  # steady: the reaper has read well for a ping interval + grace
        if call in ("publish_late", "announce"):
            crashed.beat()  # and never again: listed late, then announced as expired
            wait_until(lambda: len(watcher.table.endpoints) == 2, timeout=5, interval=0.01)
        armed.set()
        wait_until(stalled.is_set, timeout=5, interval=0.01, what=f"a call to {call}")
        missing = []
        while not resumed or time.monotonic() - resumed[0] < 2.0:
            if url not in [e.url for e in watcher.table.endpoints]:
                missing.append(round(time.monotonic() - (resumed or [0.0])[0], 2))
            time.sleep(0.005)
        assert not watcher.outage.failing, "a stall, not a failure"
        assert watcher.reaping
        assert missing == [], (f"the live endpoint left the table after the stall "
                               f"({len(missing)} samples, {missing[0]}-{missing[-1]}s "
                               f"after the store resumed)")
        log = writer.changes(1, 200) or []
        assert [c for c in log if c.kind == "leave" and c.endpoint == url] == [], \
            "the reaper announced a leave for a live endpoint"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        done.set()
        beating.join(5)
        registrar.stop()
        watcher.stop()
        store.close()
        writer.close()


def _toxiproxy_answers(api: int) -> bool:
    try:
        response = requests.get(f"http://127.0.0.1:{api}/version", timeout=1)
    except requests.RequestException:
        return False
    return response.ok and "X-Toxiproxy-Request-Id" in response.headers


def start_toxiproxy() -> tuple[Proc, int]:
    """toxiproxy's server and its API port.

    It binds ``-port 0`` but logs "127.0.0.1:0", not the port it got, so the API port
    is picked with ``free_port()``. If another process takes it first, toxiproxy logs
    "address already in use" and idles: that start is stopped and another port tried.
    Ready means toxiproxy itself answers (its request-id header) and bound the port.
    """
    taken = "address already in use"
    for _attempt in range(3):
        api = free_port()  # toxiproxy cannot report a port it picked: see above
        proc = Proc([str(toxiproxy.build()), "-host", "127.0.0.1", "-port", str(api)],
                    name="toxiproxy")
        try:
            wait_until(lambda p=proc, a=api: p.poll() is not None or taken in p.output()
                       or _toxiproxy_answers(a), timeout=20, what="toxiproxy's API")
            if proc.poll() is not None:
                raise RuntimeError(f"{proc} exited with {proc.returncode}:\n{proc.output()}")
        except BaseException:
            proc.stop()
            raise
        if taken not in proc.output():
            return proc, api
        proc.stop()
    raise RuntimeError("three ports taken in a row: something else is wrong")


@contextlib.contextmanager
def slow_link(mongo_server, mongo_url, latency_ms: int, streams=("downstream",)):
    """A mongodb:// URL to the test store through toxiproxy, every answer (and, with
    "upstream" in ``streams``, every request) ``latency_ms`` late."""
    proxy, api = start_toxiproxy()
    try:
        # the link listens on a port the OS picks; the API answers with it
        created = requests.post(f"http://127.0.0.1:{api}/proxies", timeout=5, json={
            "name": "store", "listen": "127.0.0.1:0",
            "upstream": f"127.0.0.1:{mongo_server.port}", "enabled": True})
        assert created.status_code == 201, (created.status_code, created.text)
        listen = int(created.json()["listen"].rpartition(":")[2])
        toxi = toxiproxy.Toxiproxy(f"http://127.0.0.1:{api}", lambda f, *a, **k: f(*a, **k))
        for stream in streams:
            toxi.toxic("store", "latency", stream, latency=latency_ms)
        name = urlsplit(mongo_url).path
        yield f"mongodb://127.0.0.1:{listen}{name}?directConnection=true"
    finally:
        proxy.stop()


@pytest.mark.soak
@pytest.mark.timeout(120)
def test_a_store_slow_all_along_still_expires_a_crashed_endpoint(mongo_server, mongo_url):
    """A store behind a slow link (every answer 0.4 s late, more than half the grace):
    only the first slow refresh is a recovery; after that, a crashed endpoint expires as
    usual and a live one stays."""
    with slow_link(mongo_server, mongo_url, 400) as slow_url:
        store = open_store(slow_url, timeout=8)
        writer = open_store(mongo_url, timeout=8)
        live, crashed = "http://127.0.0.1:9", "http://127.0.0.1:10"
        doomed = Registrar(writer, "web", crashed, None, ping_interval=1.0)
        crash = threading.Event()

        def beat_until_the_crash() -> None:
            while not crash.wait(0.5):
                doomed.beat()

        beating = threading.Thread(target=beat_until_the_crash, daemon=True)
        registrar = Registrar(writer, "web", live, None, ping_interval=1.0)
        watcher = Watcher(store, grace=0.5, refresh_interval=0.1)
        try:
            beating.start()
            registrar.start()
            watcher.start()
            deadline = time.monotonic() + 20
            while {e.url for e in watcher.table.endpoints} != {live, crashed}:
                assert time.monotonic() < deadline, "never saw both"
                time.sleep(0.05)
            time.sleep(2.0)  # both stay while they heartbeat, however slow the reads
            assert {e.url for e in watcher.table.endpoints} == {live, crashed}
            crash.set()  # its record stays, and grows stale
            beating.join(5)
            refreshes = watcher.stats.refreshes
            deadline = time.monotonic() + 20
            while {e.url for e in watcher.table.endpoints} != {live}:
                assert time.monotonic() < deadline, (
                    f"the crashed endpoint never expired behind a slow store: "
                    f"{[e.url for e in watcher.table.endpoints]}")
                time.sleep(0.05)
            assert watcher.stats.refreshes > refreshes and not watcher.outage.failing
            time.sleep(3.0)  # and the live one stays, its heartbeats landing as ever
            assert {e.url for e in watcher.table.endpoints} == {live}
        finally:
            crash.set()
            registrar.stop()
            watcher.stop()
            store.close()
            writer.close()


@pytest.mark.soak
@pytest.mark.timeout(60)
def test_heartbeats_keep_their_interval_over_a_slow_link(mongo_server, mongo_url):
    """Every answer of the store comes 0.2 s late: heartbeats still go one per ping
    interval, start to start, so the record's age (the store's time at sending) stays
    within about the interval. Waiting a full interval after each write made the gap
    between two beats 1.2 s and more, every beat then counted as a rejoin and announced
    itself (seven round trips), and it settled at one heartbeat every 2.4 s; on a lossy
    link, live endpoints expired with a grace of two intervals (tests/test_hosts_e2e.py).
    Announcing beats still cascade when seven round trips exceed 1.5 intervals."""
    with slow_link(mongo_server, mongo_url, 200) as slow_url:
        writer = open_store(slow_url, timeout=8)
        registrar = Registrar(writer, "web", "http://127.0.0.1:9", None, ping_interval=1.0)
        try:
            registrar.start()
            deadline = time.monotonic() + 20
            while registrar.beats < 3:  # past the first writes, which also announce
                assert time.monotonic() < deadline, f"{registrar.beats} beats"
                time.sleep(0.01)
            ends = []  # when each beat's write came back
            seen = registrar.beats
            while len(ends) < 7:
                assert time.monotonic() < deadline + 15, f"{len(ends)} beats"
                if registrar.beats != seen:
                    seen = registrar.beats
                    ends.append(time.monotonic())
                time.sleep(0.005)
            spacing = (ends[-1] - ends[0]) / (len(ends) - 1)
            assert spacing < 1.1, f"a heartbeat every {spacing:.2f} s, not every 1.0 s"
        finally:
            registrar.stop()
            writer.close()
