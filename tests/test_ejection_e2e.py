"""Ejection that heals, through a real balancer-only `cluster serve`: an endpoint that
comes back serves again within a second or two, not --eject-seconds later, and when
every endpoint is ejected the balancer tries them anyway (panic mode)."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import threading
import time

import pytest
import requests

from cluster.records import endpoint_hash
from helpers import (
    TESTS,
    Proc,
    accept_forever,
    blackholed_port,
    cluster_argv,
    gunicorn_port,
    instance,
    python,
    start_instance,
    start_library_app,
    start_serve,
    wait_port,
    wait_until,
)

EJECT_SECONDS = 30  # far longer than any wait below: healing must not wait for it


def front_status(base: str) -> dict:
    return requests.get(base + "/_cluster/status", timeout=5).json()


def whoami(base: str) -> str:
    response = requests.get(base + "/whoami", timeout=10)  # no cookie: a fresh pick
    return response.text if response.status_code == 200 else str(response.status_code)


def seconds_until_served_by(base: str, name: str, limit: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if whoami(base) == name:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"{name} not served within {limit}s")


@contextlib.contextmanager
def two_members_and_front(mongo_url: str):
    members: dict[str, Proc] = {}
    ports: list[int] = []
    retired: list[Proc] = []
    front: Proc | None = None

    def restart(name: str) -> None:
        """A new process on the same port; the old one may still be draining.

        The port was the OS's pick at the first start (its port file) and is bound
        again by number: the test is that the balancer heals on a known address. Only
        in the restart window could another process take it (the loop below then fails
        with what the instance said).
        """
        retired.append(members[name])
        n = int(name[1:])
        deadline = time.monotonic() + 5
        while True:  # the old listener closes right after deregistering
            proc = members[name] = instance(mongo_url, ports[n], name)
            with contextlib.suppress(RuntimeError):  # exited: the port was not free yet
                wait_port(ports[n], timeout=5, proc=proc)
                time.sleep(0.2)
                if proc.poll() is None:
                    return
            retired.append(proc)
            assert time.monotonic() < deadline, f"{name} could not restart: {proc.output()}"
            time.sleep(0.1)

    try:
        for n in range(2):
            members[f"m{n}"], port = start_instance(mongo_url, f"m{n}")
            ports.append(port)
        front, front_port = start_serve(
            "--ui-service", "web", "--ping-interval", "1", "--expiry-grace", "1",
            "--eject-seconds", str(EJECT_SECONDS),
            env={"CLUSTER_DISCOVERY_URL": mongo_url}, name="front")
        base = f"http://127.0.0.1:{front_port}"
        wait_until(lambda: len(front_status(base)["endpoints"]) == 2, timeout=10)
        hashes = {f"m{n}": endpoint_hash(f"http://127.0.0.1:{p}") for n, p in enumerate(ports)}
        yield base, members, hashes, restart, front
    finally:
        if front is not None:
            front.stop()
        for proc in [*members.values(), *retired]:
            proc.stop()


def test_a_restarted_endpoint_serves_again_at_once(mongo_url):
    with two_members_and_front(mongo_url) as (base, members, hashes, restart, front):
        # SIGKILL: the record lingers for ping + grace, so requests find m1 dead and
        # the balancer ejects it (each such request is retried on m0).
        members["m1"].kill()
        wait_until(lambda: (whoami(base), hashes["m1"] in front_status(base)["ejected"])[1],
                   timeout=5, what="m1 ejected")
        restart("m1")
        healed = seconds_until_served_by(base, "m1", 3.0)
        print(f"after SIGKILL: m1 served again {healed:.2f}s after it listened")
        assert healed < 2.0

        # SIGTERM (deregister, drain) and a restart on the same port within a second
        # (pooled connections may still reach the draining m1: that is its drain)
        members["m1"].signal(signal.SIGTERM)
        time.sleep(0.5)
        restart("m1")
        healed = seconds_until_served_by(base, "m1", 3.0)
        print(f"after SIGTERM: m1 served again {healed:.2f}s after it listened")
        assert healed < 2.0
        assert front.poll() is None and "Traceback" not in front.output()


def test_with_every_endpoint_ejected_requests_succeed_once_one_is_back(mongo_url):
    with two_members_and_front(mongo_url) as (base, members, hashes, restart, front):
        members["m0"].kill()
        members["m1"].kill()
        # Both get ejected (the log says so; a status snapshot may miss it: a request
        # that finds every endpoint dead waits for a newer table, and once their records
        # expire they leave the table, ejections and all).
        wait_until(lambda: (whoami(base), len(set(re.findall(r"ejecting web (\S+)",
                                                              front.output()))) == 2)[1],
                   timeout=10, what="both ejected")
        restart("m0")
        healed = seconds_until_served_by(base, "m0", 3.0)
        print(f"both ejected: m0 served {healed:.2f}s after it listened")
        assert healed < 1.5
        for _ in range(20):
            assert whoami(base) == "m0"
        assert front.poll() is None and "Traceback" not in front.output()


@pytest.mark.parametrize("way", ["door", "library"])
def test_a_body_taken_for_a_refused_endpoint_reaches_the_local_app(sqlite_url, dead_port,
                                                                    way):
    """A sticky POST to an endpoint that refuses (a worker that has just stopped) is
    served by the local app: its body had been taken from the client's buffer for the
    relay, and the app waited for it until the client gave up (a reload's 12-17 s
    stalls, bench/reload_keepalive.py)."""
    dead = f"http://127.0.0.1:{dead_port}"
    sidecar = Proc(cluster_argv("register", "--service", "web", "--endpoint-url", dead,
                                "--ping-interval", "1"),
                   env={"CLUSTER_DISCOVERY_URL": sqlite_url}, name="sc-dead")
    proc = None
    try:
        if way == "door":
            proc, port = start_instance(sqlite_url, "alive")
        else:  # cluster.wrap() under a server of one's own
            proc, port = start_library_app({"CLUSTER_DISCOVERY_URL": sqlite_url,
                                             "BACKEND_NAME": "alive",
                                             "CLUSTER_PING_INTERVAL": "1"}, "backend:app")
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: len(requests.get(base + "/_cluster/status", timeout=5)
                               .json()["endpoints"]) == 2, timeout=15, what="both records")
        body = bytes(range(256)) * 8
        answer = requests.post(base + "/echo", data=body, timeout=10,
                               cookies={"cluster-endpoint::web": endpoint_hash(dead)})
        assert answer.status_code == 200 and answer.content == body
        assert answer.headers.get("X-Served-By") == "alive"
    finally:
        if proc is not None:
            proc.stop()
        sidecar.stop()


class AcceptsThenCloses:
    """A real listener on 127.0.0.1 whose app is dead: it accepts every connection and
    closes it at once, unanswered (a port forwarder whose target is gone, a process
    whose listener outlived its app). Set :attr:`healthy` and it answers each request
    with a 200 "back" instead. Closed at the end of the block."""

    def __init__(self) -> None:
        self.healthy = False
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=accept_forever, args=(self.listener, self._serve),
                         daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            if not self.healthy:
                return
            conn.settimeout(10)
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", buf)
            left = int(length.group(1)) if length else 0
            left -= len(buf.split(b"\r\n\r\n", 1)[1])
            while left > 0:
                data = conn.recv(65536)
                if not data:
                    return
                left -= len(data)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Served-By: back\r\n"
                         b"Connection: close\r\n\r\nback")

    def __enter__(self) -> AcceptsThenCloses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.close()


@pytest.mark.parametrize("way", ["door", "library"])
def test_an_endpoint_that_closes_connections_unanswered_is_ejected(sqlite_url, way):
    """An endpoint that accepts connections and closes them unanswered is ejected as
    one that refuses, and comes back once it keeps a connection open again. It was
    never ejected: every request kept trying it first, each POST that did got a 502
    (25 of 40 POSTs here), each GET was replayed elsewhere; its sidecar heartbeating
    readmitted it anyway, and so did a probe connection, which it accepts."""
    procs: list[Proc] = []
    with AcceptsThenCloses() as dead:
        try:
            procs.append(Proc(cluster_argv("register", "--service", "web", "--endpoint-url",
                                           dead.url, "--ping-interval", "1"),
                              env={"CLUSTER_DISCOVERY_URL": sqlite_url}, name="sc-dead"))
            env = {"CLUSTER_DISCOVERY_URL": sqlite_url, "BACKEND_NAME": "alive",
                   "CLUSTER_PING_INTERVAL": "1"}
            if way == "door":
                proc, port = start_instance(sqlite_url, "alive")
            else:
                proc, port = start_library_app(env, "backend:app")
            procs.append(proc)
            base = f"http://127.0.0.1:{port}"
            wait_until(lambda: len(front_status(base)["endpoints"]) == 2, timeout=15,
                       what="both records")
            statuses = []
            for n in range(30):  # 3 s: three heartbeats of the dead endpoint's sidecar
                answer = requests.post(base + "/echo", data=b"%d" % n, timeout=10)
                statuses.append(answer.status_code)
                time.sleep(0.1)
            print("POST statuses:", statuses)
            assert statuses.count(502) <= 1 and statuses.count(200) == len(statuses) - \
                statuses.count(502)
            assert endpoint_hash(dead.url) in front_status(base)["ejected"]
            assert re.search(r"ejecting web \S+ for .*closed the connection|"
                             r"ejecting web \S+ for .*reset", proc.output())

            dead.healthy = True
            started = time.monotonic()
            while whoami(base) != "back":
                assert time.monotonic() - started < 3, "not back in rotation"
                time.sleep(0.05)
            print(f"back in rotation {time.monotonic() - started:.2f}s after it served")
            if way == "door":  # the library app's log shows warnings only
                assert "back in rotation: a probe connection stayed open" in proc.output()
            assert proc.poll() is None and "Traceback" not in proc.output()
        finally:
            for p in procs:
                p.stop()


def test_an_endpoint_that_cannot_be_reached_is_not_let_back_by_its_heartbeat(sqlite_url):
    """An endpoint whose connects time out (its URL wrong or unroutable from here,
    its registration alive and heartbeating) stays out until its ejection ends. Each
    heartbeat let it back: one request per ping waited out --connect-timeout (5 s by
    default) before moving on."""
    procs: list[Proc] = []
    with blackholed_port() as silent:
        try:
            unreachable = f"http://127.0.0.1:{silent}"
            procs.append(Proc(cluster_argv("register", "--service", "web", "--endpoint-url",
                                           unreachable, "--ping-interval", "0.5"),
                              env={"CLUSTER_DISCOVERY_URL": sqlite_url}, name="sc-silent"))
            alive, _ = start_instance(sqlite_url, "alive")
            procs.append(alive)
            front, port = start_serve("--ui-service", "web", "--connect-timeout", "0.5",
                                      "--eject-seconds", "30",
                                      env={"CLUSTER_DISCOVERY_URL": sqlite_url}, name="front")
            procs.append(front)
            base = f"http://127.0.0.1:{port}"
            wait_until(lambda: len(front_status(base)["endpoints"]) == 2, timeout=15,
                       what="both records")
            slow = 0
            started = time.monotonic()
            while time.monotonic() - started < 2.5:  # five heartbeats of the unreachable one
                began = time.monotonic()
                assert whoami(base) == "alive"
                slow += time.monotonic() - began > 0.4
            ejections = front.output().count(f"ejecting web {unreachable}")
            print(f"requests that waited for a connect: {slow}; ejections: {ejections}")
            assert "back in rotation: a newer heartbeat" not in front.output()
            assert slow <= 2 and ejections <= 2  # 1 s, then 2 s
            assert front.poll() is None and "Traceback" not in front.output()
        finally:
            for p in procs:
                p.stop()


@pytest.mark.parametrize("way", ["door", "library"])
def test_a_request_that_kills_its_worker_does_not_eject_the_endpoint(sqlite_url, way):
    """A request whose worker dies unanswered (the OOM killer, a crash in C; here
    os._exit) gets its 502, and the endpoint, whose gunicorn arbiter still accepts and
    serves, stays in rotation: a probe connection it keeps open shows the close was
    over that request. It was ejected as one that closes connections unanswered: any
    client sending such a request took healthy endpoints out at will."""
    procs: list[Proc] = []
    try:
        workers = Proc(python("-m", "gunicorn", "-w", "2", "-b", "127.0.0.1:0", "--chdir",
                              str(TESTS / "apps"), "backend:app"),
                       env={"BACKEND_NAME": "g", "BACKEND_CRASHES": "1"}, name="gunicorn")
        procs.append(workers)
        url = f"http://127.0.0.1:{gunicorn_port(workers)}"
        procs.append(Proc(cluster_argv("register", "--service", "web", "--endpoint-url",
                                       url, "--ping-interval", "1"),
                          env={"CLUSTER_DISCOVERY_URL": sqlite_url}, name="sidecar"))
        if way == "door":
            front, port = start_serve("--ui-service", "web",
                                      env={"CLUSTER_DISCOVERY_URL": sqlite_url}, name="front")
        else:
            front, port = start_library_app({"CLUSTER_DISCOVERY_URL": sqlite_url,
                                             "CLUSTER_UI_SERVICE": "web",
                                             "CLUSTER_SELF_WEIGHT": "0"})
        procs.append(front)
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: whoami(base) == "g", timeout=15, what="the gunicorn endpoint")
        for n in range(3):
            answer = requests.post(base + "/crash", data=b"x" * (n * 100000), timeout=15)
            assert answer.status_code == 502
            assert whoami(base) == "g"
        if way == "door":
            assert not front_status(base)["ejected"]
        assert f"ejecting web {url}" not in front.output(), front.output()
        assert front.poll() is None and "Traceback" not in front.output()
    finally:
        for p in procs:
            p.stop()
