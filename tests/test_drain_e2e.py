"""`cluster drain`: under HTTP load and with open WebSockets, a drained instance takes no
new sessions, keeps serving the ones it has, closes its sockets with 1001 (spread over
--drain-close-seconds), stops, and leaves the table; no request fails.

Real processes: three instances of a gevent-websocket app and a balancer-only front,
FerretDB as the store; the drain is the `cluster drain` command an operator runs.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import requests

from cluster.records import endpoint_hash
from drainload import HttpLoad, Socket
from helpers import ROOT, cluster_argv, live_endpoints, start_serve, status_json, wait_until

TIMEOUT = 15
COOKIE = "cluster-endpoint::web"


def _status(port: int) -> dict:
    return requests.get(f"http://127.0.0.1:{port}/_cluster/status", timeout=5).json()


@pytest.mark.timeout(60)
def test_drain_under_load_loses_nothing_and_closes_sockets_with_1001(
        mongo_url: str, tmp_path: Path) -> None:
    env = {"CLUSTER_DISCOVERY_URL": mongo_url}
    common = ("--service", "web", "--app", "gws_echo:app", "--ping-interval", "1",
              "--expiry-grace", "1", "--drain-seconds", "2", "--drain-close-seconds", "1.5")
    procs = []
    sockets: list[Socket] = []
    try:
        ports = {}
        for name in "abc":
            proc, ports[name] = start_serve(*common, "--pid-file", str(tmp_path / f"{name}.pid"),
                                            env={**env, "BACKEND_NAME": name}, name=name)
            procs.append(proc)
        # Uniform placement: before the drain, a must take new sessions while it holds
        # more sockets than b and c, which placement by load (rightly) would not do.
        front, front_port = start_serve("--ui-service", "web", "--ping-interval", "1",
                                        "--expiry-grace", "1", "--placement", "random",
                                        env=env, name="front")
        procs.append(front)
        wait_until(lambda: len(_status(front_port)["endpoints"]) == 3, timeout=TIMEOUT,
                   what="the front to see the three instances")
        a_hash = endpoint_hash(f"http://127.0.0.1:{ports['a']}")
        b_hash = endpoint_hash(f"http://127.0.0.1:{ports['b']}")
        # sockets held by a: two tunnelled by the front, one served straight from a
        on_a = [Socket(f"ws://127.0.0.1:{front_port}/", cookie=f"{COOKIE}={a_hash}")
                for _ in range(2)]
        on_a.append(Socket(f"ws://127.0.0.1:{ports['a']}/", cookie=f"{COOKIE}={a_hash}"))
        on_b = Socket(f"ws://127.0.0.1:{front_port}/", cookie=f"{COOKIE}={b_hash}")
        sockets += [*on_a, on_b]
        assert [s.name for s in on_a] == ["a", "a", "a"] and on_b.name == "b"

        with HttpLoad(front_port, clients=2) as fresh, \
                HttpLoad(front_port, clients=1, cookie=f"{COOKIE}={a_hash}") as sticky:
            time.sleep(0.5)
            assert fresh.stats.by()["a"] > 0  # a took new sessions before the drain
            drain = subprocess.Popen(
                cluster_argv("drain", "--pid-file", str(tmp_path / "a.pid"), "--wait"),
                env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True)
            try:
                # the record says so (cluster status), and the front's table too
                wait_until(lambda: any(r["draining"] for r in status_json(mongo_url)
                                       ["endpoints"] if r["endpoint"].endswith(
                                           f":{ports['a']}")),
                           timeout=TIMEOUT, what="cluster status to show a draining")
                wait_until(lambda: [r for r in _status(front_port)["endpoints"]
                                    if r["hash"] == a_hash and r["draining"]],
                           timeout=TIMEOUT, what="the front to see a draining")
                marked = time.monotonic()
                later = [Socket(f"ws://127.0.0.1:{front_port}/") for _ in range(6)]
                sockets += later
                assert {s.name for s in later} <= {"b", "c"}
                time.sleep(1.0)
                assert fresh.stats.by(marked)["a"] == 0, fresh.stats.by(marked)
                assert sticky.stats.by(marked)["a"] > 0  # its sessions are still served
                out, _ = drain.communicate(timeout=TIMEOUT)
            finally:
                if drain.poll() is None:
                    drain.kill()
                    drain.wait()
            assert drain.returncode == 0, out
            assert "has stopped" in out
            time.sleep(0.5)  # load after a is gone
        for load in (fresh, sticky):
            assert load.stats.failed == 0, load.stats.failures
            assert load.stats.requests > 50
        assert sticky.stats.by(time.monotonic() - 0.4)["a"] == 0  # moved on once a stopped

        a = procs[0]
        assert a.wait(TIMEOUT) == 0
        for s in on_a:
            s.join(TIMEOUT)
        assert [s.code for s in on_a] == [1001, 1001, 1001]
        closes = sorted(s.closed_at or 0.0 for s in on_a)
        assert closes[-1] - closes[0] >= 0.6, closes  # spread, not all at once
        for s in [on_b, *later]:
            assert s.code is None and s.echo("still here") == "still here"
        assert f"http://127.0.0.1:{ports['a']}" not in live_endpoints(mongo_url)
        output = a.output()
        assert "draining (SIGUSR2)" in output and "drained: closed 3 WebSockets" in output
    finally:
        for s in sockets:
            s.close()
        for proc in procs:
            proc.stop()
    for proc in procs:
        assert "Traceback" not in proc.output(), proc.output()


@pytest.mark.timeout(40)
def test_a_stop_answers_a_busy_keep_alive_client_and_then_closes(sqlite_url: str) -> None:
    """A stop closed every idle keep-alive connection at once: a client sending its next
    request as the close crossed it lost it (a reset, or 'closed without response'),
    which SIGHUP reloads and gunicorn's max-requests did to busy clients. Now a
    connection idle for under a second is left to send: its request is answered with
    Connection: close; one idle for longer is closed, and so is one never used (it held
    the stop for --header-timeout)."""
    import signal
    import socket

    from helpers import parse_responses, read_until_close

    proc, port = start_serve("--service", "web", "--app", "backend:app",
                             env={"CLUSTER_DISCOVERY_URL": sqlite_url}, name="stopping")
    ask = b"GET /whoami HTTP/1.1\r\nHost: a\r\n\r\n"
    try:
        wait_until(lambda: status_json(sqlite_url)["endpoints"], timeout=TIMEOUT,
                   what="the instance to register")
        quiet = socket.create_connection(("127.0.0.1", port), timeout=10)
        busy = socket.create_connection(("127.0.0.1", port), timeout=10)
        unused = socket.create_connection(("127.0.0.1", port), timeout=10)  # a preconnect
        for sock in (quiet, busy):
            sock.sendall(ask)
            (answer,), _ = parse_responses(sock.recv(65536))
            assert answer.status == 200 and answer.header("connection") is None
        time.sleep(1.5)  # the quiet one has been idle for longer than a stop waits
        busy.sendall(ask)
        (answer,), _ = parse_responses(busy.recv(65536))
        assert answer.status == 200
        proc.signal(signal.SIGTERM)  # deregister, stop accepting, drain
        wait_until(lambda: "stopping: deregistering" in proc.output(), timeout=TIMEOUT,
                   what="the stop to begin")
        time.sleep(0.3)
        busy.sendall(ask)  # the busy client's next request, during the stop
        data, closed = read_until_close(busy, 5)
        (answer,), rest = parse_responses(data)
        assert (answer.status, answer.header("connection"), rest) == (200, "close", b"")
        assert closed
        data, closed = read_until_close(quiet, 5)
        assert (data, closed) == (b"", True)
        # never used: closed as an idle one, not held to --header-timeout (10 s)
        data, closed = read_until_close(unused, 5)
        assert (data, closed) == (b"", True)
        assert proc.wait(5) == 0
        for sock in (quiet, busy, unused):
            sock.close()
    finally:
        proc.stop()
    assert "Traceback" not in proc.output()
