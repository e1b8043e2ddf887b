"""--busy-poll: a balancer whose loop polls instead of sleeping for a while after I/O.

What a user relies on: with the setting, proxied HTTP and WebSocket traffic is the same
as without; the balancer really does keep polling while traffic flows (else the setting
buys nothing); and it goes back to sleep once traffic stops (else an idle balancer
burns a core). Both are read from /proc: a process that sleeps in epoll_wait between
requests makes a voluntary context switch for each, one that polls does not (this
holds on a busy machine too, where how much CPU a poller gets does not); an idle one
uses next to no CPU time.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import gevent
import gevent.event
import gevent.socket
import pytest
import requests
import websocket
from gevent import get_hub

from cluster.busypoll import BusyPoll
from helpers import TESTS, Proc, cluster_argv, python, start_serve, wait_port, wait_until

WINDOW_US = 1000  # the largest window the setting allows


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
    """An echo endpoint (HTTP and WebSocket) and two balancers in front of it: one with
    --busy-poll, one without."""
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
        for name, extra in (("busy", ("--busy-poll", str(WINDOW_US))), ("plain", ())):
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

    # The same answers, HTTP and WebSocket, as without the setting.
    for front in (base, plain_base):
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
    assert sleeps_per_message(busy.pid, base, 1.5) < 0.3

    # Traffic stops: it goes back to sleeping polls (timers still wake it a few times
    # a second, each for one window).
    time.sleep(0.5)
    cpu, start = cpu_seconds(busy.pid), time.monotonic()
    time.sleep(1.5)
    assert (cpu_seconds(busy.pid) - cpu) / (time.monotonic() - start) < 0.05


def test_the_loop_polls_through_the_window_after_io_then_sleeps():
    """In this process: bytes from another process wake the loop, which then keeps
    passing (polling with a zero timeout) until the window has gone by with nothing to
    do, and then sleeps again."""
    loop = get_hub().loop
    window = 0.05
    a, b = gevent.socket.socketpair()
    arrived = gevent.event.Event()

    def read() -> None:
        if b.recv(100):
            arrived.set()

    reader = gevent.spawn(read)
    busy = BusyPoll(window).start()
    writer = None
    try:
        gevent.sleep(0.2)  # the window opened by this wake-up has passed
        assert not busy.idle.active
        cpu = time.thread_time()
        gevent.sleep(0.3)
        assert time.thread_time() - cpu < 0.15  # asleep (one window at a timer's wake)

        # Woken by I/O alone (a writer process, no timer in this process).
        writer = subprocess.Popen(["sh", "-c", "sleep 0.1; printf x"], stdout=a.fileno())
        arrived.wait()
        passes = loop.iteration
        gevent.sleep(window / 2)
        assert loop.iteration - passes > 50  # polled, not slept, since the read
        assert busy.idle.active

        started = time.monotonic()
        gevent.sleep(window * 4)
        assert not busy.idle.active  # the window ran out: sleeping polls again
        cpu = time.thread_time()
        gevent.sleep(0.3)
        assert time.thread_time() - cpu < 0.15
        assert time.monotonic() - started < 5
    finally:
        busy.stop()
        if writer is not None:
            writer.wait(5)
        reader.kill()
        a.close()
        b.close()
