"""The ``cluster serve --workers-count`` supervisor: back-off and rolling reload."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest
import requests

from cluster import workers
from helpers import Proc, cluster_argv, start_serve, status_json, wait_until

VERSIONED_APP = '''
import json, os

VERSION = {version}


def app(environ, start_response):
    body = json.dumps({{"pid": os.getpid(), "version": VERSION}}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''

CRASHY_APP = '''
import json, os

if os.path.exists(os.environ["CRASH_FILE"]):
    raise SystemExit("refusing to start: " + os.environ["CRASH_FILE"] + " exists")


def app(environ, start_response):
    body = json.dumps({"pid": os.getpid()}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''


def started_pids(output: str, slot: int) -> list[int]:
    return [int(p) for p in re.findall(rf"worker {slot} started \(pid (\d+)\)", output)]


def test_restart_delay_doubles_up_to_a_ceiling_and_resets_after_a_stable_run():
    assert [workers.restart_delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert workers.restart_delay(50) == workers.MAX_RESTART_DELAY
    slot = workers._Slot(0, failures=4)
    slot.child = subprocess.Popen([sys.executable, "-c", "pass"])
    slot.child.wait(10)
    now = time.monotonic()
    slot.started = now - workers.STABLE_SECONDS  # it had stayed up long enough
    supervisor = workers.Supervisor.__new__(workers.Supervisor)  # no processes needed
    supervisor.metrics_dir = None
    supervisor.check(slot, now)
    assert (slot.failures, slot.restart_at) == (1, now + workers.RESTART_DELAY)


def test_a_crash_looping_worker_backs_off_while_the_other_serves(tmp_path):
    (tmp_path / "crashy.py").write_text(CRASHY_APP)
    crash_file = tmp_path / "broken"
    discovery = f"sqlite://{tmp_path / 'discovery.sqlite3'}"
    parent, port = start_serve("--workers-count", "2", "--service", "web",
                               "--app", "crashy:app", "--pythonpath", str(tmp_path),
                               "--ping-interval", "1", "--expiry-grace", "1",
                               env={"CLUSTER_DISCOVERY_URL": discovery,
                                    "CRASH_FILE": str(crash_file)},
                               name="crashy")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: len(status_json(discovery)["endpoints"]) == 2, timeout=15,
                   what="two workers registered")
        (victim,) = started_pids(parent.output(), 0)
        crash_file.write_text("a bad deploy")
        os.kill(victim, signal.SIGKILL)
        statuses: Counter[int] = Counter()
        began = time.monotonic()

        def delays() -> list[float]:
            return [float(d) for d in re.findall(r"worker 0 \(pid \d+\) exited .*? restarting "
                                                 r"in ([\d.]+)s", parent.output())]

        while len(delays()) < 3 and time.monotonic() - began < 20:
            statuses[requests.get(url + "/", timeout=10).status_code] += 1
            time.sleep(0.05)
        elapsed = time.monotonic() - began
        steps = delays()
        assert steps == [0.5, 1.0, 2.0], parent.output()[-3000:]
        # one line per step and no restart in between: 3 deaths took the first 2 delays
        assert elapsed >= 0.5 + 1.0
        assert len(started_pids(parent.output(), 0)) == 3  # the first and two restarts
        assert statuses == {200: sum(statuses.values())}, statuses  # worker 1 served all

        crash_file.unlink()  # fixed: the restart due in 2 s comes up and serves again
        wait_until(lambda: len({requests.get(url + "/", timeout=5).json()["pid"]
                                for _ in range(20)}) == 2, timeout=20, what="two workers again")
        assert "Traceback" not in parent.output()
    finally:
        parent.stop()


def steady_load(url: str, stop: threading.Event, results: Counter, versions: Counter,
                threads: int = 4) -> list[threading.Thread]:
    """Clients sending requests one after another, each on a new connection."""

    def run() -> None:
        while not stop.is_set():
            try:
                response = requests.get(url + "/", timeout=10,
                                        headers={"Connection": "close"})
                results[response.status_code] += 1
                if response.status_code == 200:
                    versions[response.json()["version"]] += 1
            except requests.RequestException as exc:
                results[f"{type(exc).__name__}: {exc}"] += 1

    started = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
    for thread in started:
        thread.start()
    return started


def reload_under_load(proc: Proc, url: str, app_file: Path, hup_pid: int,
                      old_pids: set[int]) -> tuple[Counter, Counter]:
    """Rewrite the app, SIGHUP, keep loading until only new workers answer."""
    stop = threading.Event()
    results: Counter = Counter()
    versions: Counter = Counter()
    threads = steady_load(url, stop, results, versions)
    try:
        wait_until(lambda: results[200] > 50, timeout=20, what="load running")
        app_file.write_text(VERSIONED_APP.format(version=2))
        os.kill(hup_pid, signal.SIGHUP)

        def only_new() -> bool:
            seen = Counter()
            for _ in range(20):
                response = requests.get(url + "/", timeout=10)
                seen[(response.json()["pid"] in old_pids, response.json()["version"])] += 1
            return set(seen) == {(False, 2)}

        wait_until(only_new, timeout=40, interval=0.2, what="only new workers with new code")
        before = results[200]
        wait_until(lambda: results[200] > before + 50, timeout=20, what="load after reload")
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
    return results, versions


def test_sighup_replaces_workers_one_by_one_with_no_failed_request(tmp_path):
    app_file = tmp_path / "versioned.py"
    app_file.write_text(VERSIONED_APP.format(version=1))
    discovery = f"sqlite://{tmp_path / 'discovery.sqlite3'}"
    parent, port = start_serve("--workers-count", "2", "--service", "web",
                               "--app", "versioned:app", "--pythonpath", str(tmp_path),
                               "--ping-interval", "1", "--expiry-grace", "1",
                               env={"CLUSTER_DISCOVERY_URL": discovery}, name="reload")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: len(status_json(discovery)["endpoints"]) == 2, timeout=15,
                   what="two workers registered")
        old = set(started_pids(parent.output(), 0) + started_pids(parent.output(), 1))
        old_records = {r["endpoint"] for r in status_json(discovery)["endpoints"]}
        results, versions = reload_under_load(parent, url, app_file, parent.pid, old)
        assert set(results) == {200}, results
        assert versions[1] > 0 and versions[2] > 0, versions
        assert "reload done" in parent.output()
        rows = status_json(discovery, "--all")["endpoints"]
        assert len(rows) == 2 and not {r["endpoint"] for r in rows} & old_records, \
            "the old workers deregistered, the new ones registered"
        assert parent.poll() is None and "Traceback" not in parent.output()
    finally:
        parent.stop()


PARENT = """
import os, subprocess, sys, time
sidecar = subprocess.Popen(sys.argv[1:], env=dict(os.environ, _CLUSTER_PARENT_PID=str(os.getpid())))
print("sidecar", sidecar.pid, flush=True)
time.sleep(600)
"""


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


def test_a_sidecar_outlives_neither_its_store_nor_its_parent(tmp_path):
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    discovery = f"sqlite://{store_dir / 'discovery.sqlite3'}"
    parent = Proc([sys.executable, "-c", PARENT, *cluster_argv(
        "register", "--service", "search", "--endpoint-url", "http://127.0.0.1:9",
        "--ping-interval", "0.2", "--discovery-url", discovery)], name="sidecar-parent")
    try:
        sidecar = int(wait_until(lambda: re.search(r"sidecar (\d+)", parent.output()),
                                 timeout=10, what="the sidecar's pid").group(1))
        wait_until(lambda: "registered search" in parent.output(), timeout=15,
                   what="the sidecar registered")
        for path in store_dir.iterdir():  # the store goes away under it, for good:
            path.unlink()
        store_dir.rmdir()
        store_dir.write_text("not a folder")  # (a missing folder would be made again)
        time.sleep(2.0)  # ten heartbeats
        output = parent.output()
        assert "Traceback" not in output, output
        assert output.count("will keep retrying") == 1, output  # one warning per outage

        parent.kill()  # SIGKILL: nothing runs in the parent to stop the sidecar
        wait_until(lambda: gone(sidecar), timeout=5, what="the orphaned sidecar to stop")
    finally:
        parent.stop()
        with contextlib.suppress(ProcessLookupError, NameError):
            os.kill(sidecar, signal.SIGKILL)


def test_a_reload_whose_new_code_does_not_start_keeps_the_old_workers(tmp_path):
    app_file = tmp_path / "versioned.py"
    app_file.write_text(VERSIONED_APP.format(version=1))
    parent, port = start_serve("--workers-count", "2", "--service", "web",
                               "--app", "versioned:app", "--pythonpath", str(tmp_path),
                               "--ping-interval", "1", "--expiry-grace", "1",
                               env={"CLUSTER_DISCOVERY_URL":
                                    f"sqlite://{tmp_path / 'd.sqlite3'}"},
                               name="bad-reload")
    url = f"http://127.0.0.1:{port}"
    try:
        assert requests.get(url + "/", timeout=5).json()["version"] == 1
        original = set(started_pids(parent.output(), 0) + started_pids(parent.output(), 1))
        app_file.write_text("this is not python\n")
        parent.signal(signal.SIGHUP)
        wait_until(lambda: "did not come up" in parent.output(), timeout=20,
                   what="the reload to give up")
        after = Counter(requests.get(url + "/", timeout=5).json()["pid"] for _ in range(20))
        assert set(after) == original, after  # both original workers, still serving
        assert len(started_pids(parent.output(), 0)) == 1  # worker 0 was never replaced
        assert parent.poll() is None
    finally:
        parent.stop()


def test_sighup_to_a_single_process_is_a_warning_not_a_death(tmp_path):
    proc, port = start_serve("--service", "web", "--app", "cluster.demo:app",
                             env={"CLUSTER_DISCOVERY_URL": f"sqlite://{tmp_path / 'd.sqlite3'}"},
                             name="single")
    try:
        proc.signal(signal.SIGHUP)
        wait_until(lambda: "SIGHUP ignored" in proc.output(), timeout=10, what="the warning")
        assert requests.get(f"http://127.0.0.1:{port}/whoami", timeout=5).status_code == 200
        assert proc.poll() is None
    finally:
        proc.stop()


def records_in(discovery: str) -> list[str]:
    """The endpoints whose records the store holds now, read from the store itself."""
    from cluster.discovery import open_store

    store = open_store(discovery)
    try:
        return [doc["endpoint"] for doc in store.snapshot().documents if "endpoint" in doc]
    finally:
        store.close()


def test_a_stop_right_after_the_workers_registered_does_not_wait_for_them_to_settle(tmp_path):
    # A new worker waits one table refresh (ping interval / 2: 5 s here) after its first
    # heartbeat before serving the shared port; a SIGTERM in that pause waited it out
    # with the record in the store, so peers kept sending requests to a leaving worker.
    discovery = f"sqlite://{tmp_path / 'd.sqlite3'}"
    parent, _port = start_serve("--workers-count", "2", "--service", "web",
                                "--app", "cluster.demo:app", "--ping-interval", "10",
                                env={"CLUSTER_DISCOVERY_URL": discovery}, name="settling")
    try:
        wait_until(lambda: parent.output().count("registered web") == 2, timeout=15,
                   what="both workers' first heartbeat")
        asked = time.monotonic()
        parent.signal(signal.SIGTERM)
        assert parent.wait(10) == 0
        took = time.monotonic() - asked
        output = parent.output()
        assert took < 2.5, (took, output)
        assert records_in(discovery) == []
        assert "Traceback" not in output, output
    finally:
        parent.stop()


def test_a_stop_during_a_reload_is_no_failed_reload_and_stops_the_new_worker_too(tmp_path):
    # SIGTERM while a SIGHUP's new worker was starting: the supervisor logged an ERROR
    # that the new worker "did not come up" and stopped it alone first, the old workers
    # (and their records) waiting for that.
    discovery = f"sqlite://{tmp_path / 'd.sqlite3'}"
    app_file = tmp_path / "versioned.py"
    app_file.write_text(VERSIONED_APP.format(version=1))
    parent, _port = start_serve("--workers-count", "2", "--service", "web",
                                "--app", "versioned:app", "--pythonpath", str(tmp_path),
                                "--ping-interval", "1",
                                env={"CLUSTER_DISCOVERY_URL": discovery}, name="reload-stop")
    try:
        wait_until(lambda: parent.output().count("serving web") == 2, timeout=20,
                   what="both workers serving")
        # the new code takes a while to import: the stop comes while it starts
        app_file.write_text("import time\ntime.sleep(3)\n" + VERSIONED_APP.format(version=2))
        parent.signal(signal.SIGHUP)
        wait_until(lambda: "reloading 2 workers" in parent.output(), timeout=10,
                   what="the reload to begin")
        parent.signal(signal.SIGTERM)
        assert parent.wait(15) == 0
        output = parent.output()
        assert "did not come up" not in output, output
        assert "reload cut short by the stop" in output, output
        assert records_in(discovery) == []
        assert "Traceback" not in output, output
        for pid in map(int, re.findall(r"\[(\d+)\]", output)):
            assert gone(pid), (pid, output)
    finally:
        parent.stop()


SLOW_RESTART_APP = '''
import json, os, time

if os.path.exists(os.environ["SLOW_FILE"]):
    time.sleep(2)  # a restarted worker takes a while to import its app


def app(environ, start_response):
    body = json.dumps({"pid": os.getpid()}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''


@contextlib.contextmanager
def a_worker_restarting(tmp_path: Path, name: str, **start: object) -> Iterator[Proc]:
    """``--workers-count 2`` whose worker 0 was just killed and is starting again,
    slowly (SLOW_RESTART_APP: it is still importing its app): the parent, stopped by
    PID at the end. The workers run in ``tmp_path`` (a core file would land there)."""
    (tmp_path / "slowstart.py").write_text(SLOW_RESTART_APP)
    slow_file = tmp_path / "slow"
    parent, _port = start_serve("--workers-count", "2", "--service", "web",
                                "--app", "slowstart:app", "--chdir", str(tmp_path),
                                env={"CLUSTER_DISCOVERY_URL": f"sqlite://{tmp_path / 'd.db'}",
                                     "SLOW_FILE": str(slow_file)}, name=name, **start)
    try:
        wait_until(lambda: parent.output().count("serving web") == 2, timeout=20,
                   what="both workers serving")
        slow_file.write_text("")
        os.kill(started_pids(parent.output(), 0)[-1], signal.SIGKILL)
        wait_until(lambda: len(started_pids(parent.output(), 0)) == 2, timeout=10,
                   what="worker 0 restarted")
        time.sleep(0.3)  # importing its app
        yield parent
    finally:
        parent.stop()


@pytest.mark.soak  # 9 s; test_sigquit_to_a_worker_still_starting_is_no_core_dump stays
def test_sigusr1_passed_on_to_a_worker_still_starting_does_not_kill_it(tmp_path):
    # The supervisor passes USR1 (reopen the logs: logrotate's postrotate) on to its
    # workers. A worker just restarted did not handle it yet, and died of its default
    # action: "exited with -10", counted as a crash (a longer restart delay next time).
    with a_worker_restarting(tmp_path, "early-signal") as parent:
        parent.signal(signal.SIGUSR1)
        wait_until(lambda: parent.output().count("serving web") == 3, timeout=10,
                   what="the new worker serving")
        output = parent.output()
        assert f"exited with -{int(signal.SIGUSR1)}" not in output, output
        assert output.count("SIGUSR1: reopening") == 1, output  # the worker serving
        assert len(started_pids(output, 0)) == 2, output
        assert "Traceback" not in output, output


def test_sigquit_to_a_worker_still_starting_is_no_core_dump(tmp_path):
    # SIGQUIT (the quick stop) passed on to a worker still starting, which has no
    # handler yet: its default action dumped core (a "core" file, or a systemd-coredump
    # entry per worker). It gets SIGTERM instead: it has no record nor requests yet.
    assert shutil.which("prlimit"), "prlimit (util-linux; scripts/run-tests installs it)"
    with a_worker_restarting(tmp_path, "quit-early",
                             wrapper=("prlimit", "--core=unlimited")) as parent:
        parent.signal(signal.SIGQUIT)
        assert parent.wait(15) == 0, parent.output()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("core")], \
        parent.output()
