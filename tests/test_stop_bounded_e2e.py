"""A stop is bounded, and says what it left undone.

Mostly a stop while the store accepts connections but no longer answers them. The
MongoDB store sits behind a relay on 127.0.0.1 (tests/blackhole.py) that turns into a
black hole: connections are held open, nothing comes back (a firewall dropping packets,
a hung server). A stop used to wait for a heartbeat in flight and then for the removal,
each up to its socket timeouts: 12-20 s with the default 5 s, before the drain even
began. Now the removal is given up after a bounded wait, with one line saying that the
record stays and expires by itself; the drain of the requests in flight is unchanged.
The same for an embedded store whose file another process keeps locked, and for the
requests still running when the drain ends.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest
import requests

from blackhole import relay
from helpers import (
    ROOT,
    Proc,
    gunicorn_port,
    python,
    read_port_file,
    start_instance,
    wait_until,
)
from test_gunicorn_e2e import children, every_record, gunicorn, live


def _through(relay_port: int, mongo_url: str) -> str:
    """``mongo_url``'s database, reached through the relay (directConnection: the
    replica set's own host list would lead pymongo around it)."""
    return f"mongodb://127.0.0.1:{relay_port}{urlsplit(mongo_url).path}?directConnection=true"


def terminate(proc: Proc, timeout: float) -> tuple[int, float]:
    """SIGTERM ``proc`` and wait for it: (exit code, seconds the stop took)."""
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    code = proc.wait(timeout=timeout)
    return code, time.monotonic() - started


def slow_request(port: int) -> tuple[threading.Thread, list[object]]:
    """A GET of 20 s to the instance at ``port``, under way: its thread, and the list
    that gets its status code or its ConnectionError."""
    outcome: list[object] = []

    def slow() -> None:
        try:
            outcome.append(requests.get(f"http://127.0.0.1:{port}/slow?seconds=20",
                                        timeout=30).status_code)
        except requests.ConnectionError as exc:
            outcome.append(exc)

    client = threading.Thread(target=slow)
    client.start()
    time.sleep(0.5)
    return client, outcome


@pytest.mark.timeout(60)
def test_serve_stops_promptly_when_the_store_stops_answering(mongo_server, mongo_url):
    with relay(mongo_server.port) as hole:
        proc, port = start_instance(_through(hole.port, mongo_url), "s0")
        try:
            wait_until(lambda: "registered web at" in proc.output(), timeout=15)
            # a request in flight when the stop comes is still answered (the drain)
            answers: list[requests.Response] = []
            slow = threading.Thread(target=lambda: answers.append(requests.get(
                f"http://127.0.0.1:{port}/slow?seconds=2", timeout=20)))
            slow.start()
            time.sleep(0.3)
            hole.blackhole()
            time.sleep(1.5)  # a heartbeat is now waiting for an answer that never comes
            code, took = terminate(proc, timeout=30)
            slow.join(10)
        finally:
            proc.stop()
    output = proc.output()
    assert code == 0, output
    assert answers and answers[0].status_code == 200 and answers[0].text == "slow s0"
    # 2 s for the removal, then the rest of the 2 s request's drain and the close
    assert took < 6.0, f"the stop took {took:.1f}s:\n{output}"
    lines = [line for line in output.splitlines() if "could not remove" in line]
    assert len(lines) == 1, output
    assert "web http://127.0.0.1:" in lines[0] and "expires by itself within 2s" in lines[0]
    assert "Traceback" not in output
    # no outage reported for the reads that the stop itself cut short
    stopping_at = output.index("stopping: deregistering")
    assert "failed (reading" not in output[stopping_at:], output


@pytest.mark.soak  # 6 s; the same bound under serve and a booting gunicorn worker: in CI
@pytest.mark.timeout(90)
def test_gunicorn_worker_stops_promptly_when_the_store_stops_answering(
        tmp_path, mongo_server, mongo_url):
    """gunicorn's worker deregisters in its watcher greenlet and again in worker_exit:
    each used to wait out the store's timeouts (past gunicorn's --graceful-timeout 3,
    where the arbiter SIGKILLs the worker)."""
    with relay(mongo_server.port) as hole:
        proc = gunicorn(tmp_path, _through(hole.port, mongo_url))
        try:
            gunicorn_port(proc)
            wait_until(lambda: len(live(mongo_url)) == 2, timeout=20, what="two records")
            workers = children(proc.pid)
            hole.blackhole()
            time.sleep(1.5)
            code, took = terminate(proc, timeout=40)
        finally:
            proc.stop()
    output = proc.output()
    assert code == 0, output
    assert len(workers) == 2
    assert took < 5.0, f"the stop took {took:.1f}s:\n{output}"
    assert "was sent SIGKILL" not in output and "Traceback" not in output, output
    lines = [line for line in output.splitlines() if "could not remove" in line]
    assert len(lines) == 2, output  # one per worker


LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.timeout(60)
def test_serve_stops_promptly_while_another_process_locks_the_embedded_store(tmp_path):
    """The embedded store's file kept locked by another process (a backup, an sqlite3
    shell left in a transaction): each call waits out SQLite's busy timeout (5 s). The
    stop waited for the removal, then once more for the store's close behind a read
    or heartbeat under way: 10 s. Now the removal is given up after 2 s, and the close
    does not queue behind the call under way."""
    store = tmp_path / "discovery.sqlite3"
    proc, _port = start_instance(f"sqlite://{store}", "s0")
    locker = None
    try:
        wait_until(lambda: "registered web at" in proc.output(), timeout=15)
        locker = Proc(python("-c", LOCKER, str(store)), name="locker")
        wait_until(lambda: "locked" in locker.output(), timeout=10, what="the lock")
        time.sleep(1.0)  # calls are now waiting on the lock
        code, took = terminate(proc, timeout=30)
    finally:
        proc.stop()
        if locker is not None:
            locker.stop()
    output = proc.output()
    assert code == 0, output
    assert took < 7.5, f"the stop took {took:.1f}s:\n{output}"
    assert output.count("could not remove web") == 1, output


@pytest.mark.timeout(60)
def test_a_request_still_running_when_the_drain_ends_is_cut_not_answered_500(tmp_path):
    """The drain of a stop lasts --graceful-timeout (10 s by default); a request still
    running then was answered 500 Internal Server Error by pywsgi, as if the app had
    failed (and a peer balancer relaying it passed the 500 on, where it replays an
    unanswered GET elsewhere), and nothing said that requests were cut. Now its
    connection ends unanswered, as under gunicorn's graceful timeout, and one line
    counts them."""
    proc, port = start_instance(f"sqlite://{tmp_path / 'discovery.sqlite3'}", "s0",
                                "--access-log", "combined", "--graceful-timeout", "2")
    try:
        wait_until(lambda: "registered web at" in proc.output(), timeout=15)
        client, outcome = slow_request(port)
        proc.signal(signal.SIGTERM)
        asked = time.monotonic()
        assert proc.wait(timeout=20) == 0
        took = time.monotonic() - asked
        client.join(10)
    finally:
        proc.stop()
    output = proc.output()
    assert len(outcome) == 1 and isinstance(outcome[0], requests.ConnectionError), \
        (outcome, output)
    assert "closed 1 connections whose requests were still running" in output, output
    assert "drained for 2s (--graceful-timeout)" in output, output
    assert 2.0 <= took < 8.0, f"the stop took {took:.1f}s, not the 2 s asked:\n{output}"
    assert '"GET /slow?seconds=20 HTTP/1.1" 500' not in output, output


def test_an_answer_cut_by_the_end_of_the_drain_is_not_blamed_on_the_app(tmp_path):
    """A client that does not read a large answer, still held when the drain ends: the
    stop cut the answer, and the log said the app had broken its own Content-Length
    ("the app sent 4063232 body bytes with Content-Length: 50000000")."""
    proc, port = start_instance(f"sqlite://{tmp_path / 'discovery.sqlite3'}", "s0",
                                "--graceful-timeout", "1", "--write-timeout", "60")
    try:
        wait_until(lambda: "registered web at" in proc.output(), timeout=15)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as reader:
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            reader.sendall(b"GET /download?size=50000000 HTTP/1.1\r\nHost: x\r\n\r\n")
            wait_until(lambda: reader.recv(1, socket.MSG_PEEK), timeout=5,
                       what="the answer under way")
            proc.signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
    finally:
        proc.stop()
    output = proc.output()
    assert "closed 1 connections whose requests were still running" in output, output
    assert "the app sent" not in output, output


@pytest.mark.timeout(60)
def test_workers_starting_while_the_store_does_not_answer_stop_promptly(mongo_server,
                                                                        mongo_url):
    """A worker of --workers-count waits (up to 10 s) for its first heartbeat before it
    serves the shared port, and a SIGTERM meanwhile waited that out before its stop
    began: 12.9 s for a supervisor stopped 2 s after starting with a store that does
    not answer."""
    with relay(mongo_server.port) as hole:
        hole.blackhole()
        proc, _port = start_instance(_through(hole.port, mongo_url), "s0",
                                     "--workers-count", "2")
        try:
            wait_until(lambda: proc.output().count("worker 1 started") == 1, timeout=15)
            time.sleep(2.0)  # the workers wait for a first heartbeat
            code, took = terminate(proc, timeout=30)
        finally:
            proc.stop()
    output = proc.output()
    assert code == 0, output
    assert took < 8.0, f"the stop took {took:.1f}s:\n{output}"
    assert output.count("could not remove web") == 2, output
    assert "Traceback" not in output, output


@pytest.mark.timeout(60)
def test_gunicorn_worker_booting_while_the_store_does_not_answer_stops_promptly(
        tmp_path, mongo_server, mongo_url):
    """A gunicorn worker's boot waits for its first heartbeat and a first table (each
    up to the store's timeouts) before it serves: a TERM meanwhile waited both out
    (13 s) before the worker could stop. (gunicorn's --graceful-timeout, 3 s in the
    other tests, would cut that short with a SIGKILL.)"""
    with relay(mongo_server.port) as hole:
        hole.blackhole()
        proc = gunicorn(tmp_path, _through(hole.port, mongo_url), "--graceful-timeout", "30")
        try:
            wait_until(lambda: proc.output().count("Booting worker") == 2, timeout=20)
            time.sleep(2.0)
            code, took = terminate(proc, timeout=40)
        finally:
            proc.stop()
    output = proc.output()
    assert code == 0, output
    assert took < 8.0, f"the stop took {took:.1f}s:\n{output}"
    assert "Traceback" not in output, output


@pytest.mark.soak  # 12 s; a store that does not answer at all: in CI
@pytest.mark.timeout(90)
def test_serve_stops_with_its_record_removed_when_the_store_is_slow(mongo_server, mongo_url):
    """A store that answers, slowly (every answer 0.4 s late: a remote server, one
    under load): the removal and its leave entry take several round trips, past 2 s.
    The stop gave up after 2 s in all, with a line saying there was no answer, and
    peers went on sending here until the record expired. The bound is on a silence:
    while answers come the stop waits (at most the record's own lifetime)."""
    from test_store_recovery import slow_link

    with slow_link(mongo_server, mongo_url, 400) as slow_url:
        proc, _port = start_instance(slow_url, "s0", "--ping-interval", "2",
                                     "--expiry-grace", "3")
        try:
            wait_until(lambda: "registered web at" in proc.output(), timeout=30)
            time.sleep(1.0)
            code, took = terminate(proc, timeout=30)
        finally:
            proc.stop()
    output = proc.output()
    assert code == 0, output
    assert "could not remove" not in output, output
    assert "deregistered web at http://127.0.0.1:" in output, output
    assert took < 6.0, f"the stop took {took:.1f}s:\n{output}"  # the record's lifetime: 5 s
    assert every_record(mongo_url) == set(), output
    # the leave entry is the last word on this endpoint in the membership log
    import pymongo

    client = pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=5000)
    try:
        entries = sorted(client.get_default_database()["clusterChanges"].find(),
                         key=lambda e: int(e["_id"][1:]))
    finally:
        client.close()
    assert entries and entries[-1]["kind"] == "leave", entries


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("signals", [(signal.SIGQUIT,), (signal.SIGTERM, signal.SIGQUIT),
                                     (signal.SIGINT, signal.SIGINT)],
                         ids=["QUIT", "TERM-then-QUIT", "Ctrl-C-twice"])
def test_the_quick_stop_deregisters_and_does_not_wait_for_requests(tmp_path, workers,
                                                                  signals):
    """SIGQUIT is gunicorn's quick stop, also after a TERM; its default action, a core
    dump, ended the process with its record left in the store (and the requests in
    flight unanswered, unlogged), and after a TERM it was ignored. Ctrl-C pressed again
    during a graceful stop did nothing either (under uvicorn it is the quick stop). A
    graceful stop gives the requests in flight --graceful-timeout (10 s); now each of
    these deletes every record and closes what is open at once."""
    store = f"sqlite://{tmp_path / 'discovery.sqlite3'}"
    proc, port = start_instance(store, "q0", "--workers-count", str(workers))
    try:
        wait_until(lambda: len(every_record(store)) == workers, timeout=15,
                   what="every worker registered")
        wait_until(lambda: proc.output().count("serving web") == workers, timeout=15)
        client, outcome = slow_request(port)
        asked = time.monotonic()
        for number, signum in enumerate(signals):
            if number:  # the second, once the graceful stop is under way
                wait_until(lambda: "draining for up to 10s" in proc.output(), timeout=5)
                time.sleep(0.5)
            proc.signal(signum)
        assert proc.wait(timeout=20) == 0, proc.output()
        took = time.monotonic() - asked
        client.join(10)
    finally:
        proc.stop()
    output = proc.output()
    assert every_record(store) == set(), output
    assert len(outcome) == 1 and isinstance(outcome[0], requests.ConnectionError), \
        (outcome, output)
    assert took < 5.0, f"the stop took {took:.1f}s (--graceful-timeout is 10 s):\n{output}"
    if len(signals) == 1:
        assert output.count("SIGQUIT: stopping at once") == workers, output
    else:
        # (the supervisor's second SIGINT is a SIGQUIT to its workers)
        said = "a second SIGINT" if signals[1] == signal.SIGINT and workers == 1 \
            else "SIGQUIT"
        assert f"{said}: closed 1 connections whose requests were still running" in \
            output, output
    assert "Traceback" not in output, output


def test_library_mode_stop_lets_the_requests_in_flight_finish(tmp_path):
    """cluster.make_server() as the README shows it, with server.stop on SIGTERM: the
    stop "deregisters, drains and closes the store". It drained nothing: the server had
    no pool to wait on, and serve_forever() called stop() a second time (gevent's 1 s)
    as soon as the first closed the listener, and returned: a request of 2 s was cut."""
    store = f"sqlite://{tmp_path / 'discovery.sqlite3'}"
    port_file = tmp_path / "lib.port"
    lib = Proc(python(str(ROOT / "tests" / "apps" / "library_door_app.py"), str(port_file)),
               env={"CLUSTER_DISCOVERY_URL": store}, name="library-door")
    try:
        port = read_port_file(port_file, lib)
        wait_until(lambda: len(every_record(store)) == 1, timeout=15)
        outcome: list[object] = []

        def slow() -> None:
            try:
                response = requests.get(f"http://127.0.0.1:{port}/slow?seconds=2", timeout=10)
                outcome.append((response.status_code, response.text))
            except requests.ConnectionError as exc:
                outcome.append(exc)

        client = threading.Thread(target=slow)
        client.start()
        time.sleep(0.5)
        lib.signal(signal.SIGTERM)
        assert lib.wait(timeout=15) == 0, lib.output()
        client.join(10)
    finally:
        lib.stop()
    output = lib.output()
    assert outcome == [(200, "library door")], (outcome, output)
    assert every_record(store) == set(), output
    assert "Traceback" not in output, output
