"""--busy-poll: a balancer whose loop polls instead of sleeping after I/O, for a window
that adapts to the gaps between events (at most the setting; 50 µs by default).

What a user relies on: proxied HTTP and WebSocket traffic is the same with polling as
without; the balancer really does keep polling while events come closer together than
the setting (else it buys nothing); and it goes back to sleep once they stop, or come
further apart (else an idle or lightly loaded balancer burns a core). Both are read
from /proc: a process that sleeps in epoll_wait between requests makes a voluntary
context switch for each, one that polls does not (this holds on a busy machine too,
where how much CPU a poller gets does not); an idle one uses next to no CPU time.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import gevent
import pytest
import requests
import websocket
from gevent import get_hub
from gunicorn.config import Config

from cluster import busypoll
from cluster.busypoll import BusyPoll, next_window
from cluster.config import AUTO_BUSY_POLL_US, Settings
from cluster.gunicorn import _worker_settings
from cluster.workers import worker_environment
from helpers import TESTS, Proc, cluster_argv, python, start_serve, wait_port, wait_until

WINDOW_US = 1000  # the largest window the setting allows: a Python client's messages
# come well within it of each other, not within the default 50 µs


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sleeps(pid: int) -> int:
    """Voluntary context switches of ``pid``'s main thread so far (times it slept)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc/PID/status")


def sleeps_per_message(pid: int, base: str, seconds: float) -> float:
    """Ping-pong on one proxied WebSocket for ``seconds``, every echo checked; how many
    times the balancer slept per message."""
    ws = websocket.create_connection(base.replace("http", "ws", 1) + "/ws", timeout=10)
    try:
        before, n = sleeps(pid), 0
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            ws.send(f"m{n}")
            assert ws.recv() == f"m{n}"
            n += 1
        return (sleeps(pid) - before) / n
    finally:
        ws.close()


@pytest.fixture
def balancers(sqlite_url):
    """An echo endpoint (HTTP and WebSocket) and balancers in front of it: one with the
    longest --busy-poll, one with polling off, one with the default settings."""
    env = {"CLUSTER_DISCOVERY_URL": sqlite_url}
    echo_port = socket.create_server(("127.0.0.1", 0))
    port = echo_port.getsockname()[1]
    echo_port.close()
    echo = Proc(python(str(TESTS / "apps" / "ws_echo.py"), "--port", str(port)), name="echo")
    started: list[Proc] = [echo]
    try:
        wait_port(port, proc=echo)
        started.append(Proc(cluster_argv("register", "--service", "web", "--endpoint-url",
                                         f"http://127.0.0.1:{port}", "--ping-interval", "1"),
                            env=env, name="sidecar"))
        fronts = {}
        for name, extra in (("busy", ("--busy-poll", str(WINDOW_US))),
                            ("plain", ("--busy-poll", "0")), ("default", ())):
            proc, front_port = start_serve("--ui-service", "web", "--ping-interval", "1",
                                           *extra, env=env, name=name)
            started.append(proc)
            base = f"http://127.0.0.1:{front_port}"
            wait_until(lambda base=base: requests.get(base + "/_cluster/status", timeout=5)
                       .json()["endpoints"], timeout=15, what=f"{name} lists the echo server")
            fronts[name] = (proc, base)
        yield fronts
    finally:
        for proc in reversed(started):
            proc.stop()
    for proc in started:
        assert "Traceback" not in proc.output()


def test_a_busy_polling_balancer_relays_the_same_and_polls_only_while_traffic_flows(
        balancers):
    busy, base = balancers["busy"]
    plain, plain_base = balancers["plain"]

    # The same answers, HTTP and WebSocket, with polling and without.
    for front in (base, plain_base, balancers["default"][1]):
        assert requests.get(front + "/hello?x=1", timeout=5).status_code == 200
        ws = websocket.create_connection(front.replace("http", "ws", 1) + "/ws", timeout=10)
        try:
            for i in range(50):
                ws.send(f"message {i}")
                assert ws.recv() == f"message {i}"
        finally:
            ws.close()

    # While messages flow (well within the window of each other), the busy-polling
    # balancer keeps its loop polling between them; the plain one sleeps for each.
    assert sleeps_per_message(plain.pid, plain_base, 1.5) >= 0.8
    # (a moment when another process has the balancer's core stops its polling for
    # busypoll.SHARED_PAUSE, as it should: the measure is taken again, at most 3 times;
    # the suite's own processes did that once in a CI run)
    rates = []
    for _ in range(3):
        rates.append(sleeps_per_message(busy.pid, base, 1.5))
        if rates[-1] < 0.3:
            break
    assert rates[-1] < 0.3, rates

    # Traffic stops: they go back to sleeping polls (timers still wake them a few
    # times a second), the default one too.
    time.sleep(0.5)
    for name in ("busy", "default"):
        proc = balancers[name][0]
        cpu, start = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(1.5)
        assert (cpu_seconds(proc.pid) - cpu) / (time.monotonic() - start) < 0.05, name


def test_the_window_follows_haltpolls_rule():
    longest = 50e-6
    # A wait longer than the window but within the longest: polling that long would
    # have caught the event, so the window grows, from a quarter of the longest.
    assert next_window(0.0, 30e-6, longest) == longest / 4
    assert next_window(longest / 4, 30e-6, longest) == longest / 2
    assert next_window(longest / 2, 40e-6, longest) == longest  # never past the longest
    assert next_window(longest, longest, longest) == longest
    # A wait longer than the longest: polling would not have caught it; halve, and
    # once it is small, stop polling at all.
    assert next_window(longest, 1e-3, longest) == longest / 2
    window = longest
    for _ in range(10):
        window = next_window(window, 1.0, longest)
    assert window == 0.0
    assert next_window(0.0, 1.0, longest) == 0.0  # idle: stays off


def test_the_loop_polls_while_events_come_within_the_longest_window_then_sleeps(
        monkeypatch):
    """In this process: wake-ups 40 ms apart, within a longest window of 100 ms, open
    the window until it spans them, and the loop polls (passes with a zero timeout)
    through the gaps; once they stop it sleeps; wake-ups 300 ms apart close the window
    again. The pause on a shared core is the next test's: here it is kept from tripping,
    so that other processes on a busy machine do not reset the window under test."""
    monkeypatch.setattr(busypoll, "SHARED_YIELDS", 10**9)
    loop = get_hub().loop
    longest = 0.1
    busy = BusyPoll(longest).start()
    try:
        assert busy.window == 0  # nothing seen yet: sleeping polls
        for _ in range(10):
            gevent.sleep(0.04)
        assert busy.window >= 0.04  # grew from a quarter of the longest to span a gap
        passes, cpu, started = loop.iteration, time.thread_time(), time.monotonic()
        for _ in range(10):
            gevent.sleep(0.04)
        assert loop.iteration - passes > 200  # polled between the wake-ups, not slept
        assert time.thread_time() - cpu > 0.1 * (time.monotonic() - started)

        gevent.sleep(0.3)  # nothing for longer than the window: asleep after it
        cpu = time.thread_time()
        gevent.sleep(0.3)
        assert time.thread_time() - cpu < 0.15

        for _ in range(10):  # wake-ups further apart than the longest window
            gevent.sleep(0.3)
        assert busy.window == 0
        passes, cpu = loop.iteration, time.thread_time()
        for _ in range(3):
            gevent.sleep(0.3)
        assert time.thread_time() - cpu < 0.05
        assert loop.iteration - passes < 20
    finally:
        busy.stop()


def test_polling_stops_while_another_process_keeps_the_core_busy():
    """In this process, pinned to one core with a CPU-bound process pinned beside it:
    wake-ups 40 ms apart would open the window (as above), but the yields of a polling
    loop keep handing the core to that process, so polling stops and the loop sleeps
    between the wake-ups, to be woken ahead of it."""
    loop = get_hub().loop
    saved = os.sched_getaffinity(0)
    cpu = min(saved)
    os.sched_setaffinity(0, {cpu})
    hog = subprocess.Popen(["taskset", "-c", str(cpu), sys.executable, "-c",
                            "while True: pass"])
    busy = BusyPoll(0.1).start()
    try:
        time.sleep(0.3)  # the hog is running
        for _ in range(10):
            gevent.sleep(0.04)
        passes = loop.iteration
        for _ in range(10):
            gevent.sleep(0.04)
        assert loop.iteration - passes < 60  # a few passes per wake-up: no polling
        assert busy.paused_until > loop.now()
    finally:
        busy.stop()
        hog.kill()
        hog.wait(10)
        os.sched_setaffinity(0, saved)


@pytest.mark.parametrize("cores, processes, window", [
    (2, 1, AUTO_BUSY_POLL_US),  # a core left for the rest: poll in the gaps
    (2, 2, 0),  # every core has a worker: polling would take CPU from a sibling
    (8, 4, AUTO_BUSY_POLL_US),
    (1, 1, 0),
])
def test_auto_polls_only_when_the_instances_processes_leave_a_core_free(
        monkeypatch, cores, processes, window):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    auto = Settings.load(env={"CLUSTER_WORKERS_COUNT": str(processes)})
    assert auto.busy_poll == "auto"
    assert auto.busy_poll_microseconds() == window
    # What a worker of `cluster serve --workers-count N` is told, decided in the parent
    # (the worker itself is one process).
    env = worker_environment(auto, shared_fd=3)
    assert Settings.load(env=env).busy_poll_microseconds() == window
    # gunicorn's workers (-w) count, not --workers-count.
    cfg = Config()
    cfg.set("workers", processes)
    monkeypatch.delenv("CLUSTER_WORKERS_COUNT", raising=False)
    monkeypatch.delenv("CLUSTER_BUSY_POLL", raising=False)
    assert _worker_settings(8000, "127.0.0.1", cfg).busy_poll_microseconds() == window
    # A number is kept as given, whatever the count.
    fixed = Settings.load(env={"CLUSTER_BUSY_POLL": "20",
                               "CLUSTER_WORKERS_COUNT": str(processes)})
    assert fixed.busy_poll_microseconds() == 20
    assert Settings.load(env=worker_environment(fixed, 3)).busy_poll_microseconds() == 20
