"""Version-aware routing with real instances: during a mixed-version deploy no session
moves between versions, new sessions go to the new version, or follow the canary
weights.

Instances of the gevent-websocket app answer /whoami with their name, which carries
their version (``v1-a``); clients are requests sessions (they keep cookies, as browsers
do) going through a balancer-only front; FerretDB is the store.
"""

from __future__ import annotations

import signal
from collections import Counter

import pytest
import requests

from helpers import Proc, start_serve, wait_until

TIMEOUT = 15


def _instance(url: str, version: str, name: str, *extra: str) -> Proc:
    proc, _ = start_serve("--service", "web", "--app", "gws_echo:app", "--ping-interval", "1",
                          "--expiry-grace", "1", "--app-version", version, *extra,
                          env={"CLUSTER_DISCOVERY_URL": url, "BACKEND_NAME": name}, name=name)
    return proc


def _front(url: str, *extra: str) -> tuple[Proc, int]:
    return start_serve("--ui-service", "web", "--ping-interval", "1", "--expiry-grace", "1",
                       *extra, env={"CLUSTER_DISCOVERY_URL": url}, name="front")


def _sees(port: int, count: int) -> None:
    def enough() -> bool:
        status = requests.get(f"http://127.0.0.1:{port}/_cluster/status", timeout=5).json()
        return len(status["endpoints"]) == count

    wait_until(enough, timeout=TIMEOUT, what=f"the front to see {count} endpoints")


def _ask(session: requests.Session, port: int) -> str:
    response = session.get(f"http://127.0.0.1:{port}/whoami", timeout=10)
    assert response.status_code == 200, response.text
    return response.text


def _version(name: str) -> str:
    return name.split("-")[0]


@pytest.mark.timeout(60)
def test_sessions_keep_their_version_and_new_ones_go_to_the_newest(mongo_url: str) -> None:
    procs = []
    try:
        a1 = _instance(mongo_url, "1.9.0", "v1-a1")
        a2 = _instance(mongo_url, "1.9.0", "v1-a2")
        front, port = _front(mongo_url)
        procs += [a1, a2, front]
        _sees(port, 2)
        old = [requests.Session() for _ in range(16)]
        first = {id(s): _ask(s, port) for s in old}
        assert {_version(n) for n in first.values()} == {"v1"}
        assert set(first.values()) == {"v1-a1", "v1-a2"}  # spread over both

        b1 = _instance(mongo_url, "1.10.0", "v2-b1")  # newer by the version sort
        procs.append(b1)
        _sees(port, 3)
        new = [requests.Session() for _ in range(16)]
        assert {_ask(s, port) for s in new} == {"v2-b1"}
        for s in old:  # sessions stay on their endpoint
            assert _ask(s, port) == first[id(s)]

        # a1 goes away: its sessions move, but only to their own version (a2)
        a1.signal(signal.SIGTERM)
        assert a1.wait(TIMEOUT) == 0
        _sees(port, 2)
        for s in old:
            assert _ask(s, port) == "v1-a2"
        for s in new:
            assert _ask(s, port) == "v2-b1"
        # the version travels in a cookie of its own, next to meteorhacks' endpoint hash
        assert all(s.cookies.get("cluster-version::web") == "1.9.0" for s in old)

        # with no live endpoint of 1.9.0 left, its sessions go to the newest
        a2.signal(signal.SIGTERM)
        assert a2.wait(TIMEOUT) == 0
        _sees(port, 1)
        for s in old:
            assert _ask(s, port) == "v2-b1"
            assert s.cookies.get("cluster-version::web") == "1.10.0"
    finally:
        for proc in procs:
            proc.stop()
    for proc in procs:
        assert "Traceback" not in proc.output(), proc.output()


@pytest.mark.timeout(60)
def test_canary_weights_split_new_sessions_and_sessions_stay(mongo_url: str) -> None:
    procs = []
    try:
        procs += [_instance(mongo_url, "1.2.0", "v1-a1"), _instance(mongo_url, "1.2.0", "v1-a2"),
                  _instance(mongo_url, "1.3.0", "v2-b1")]
        front, port = _front(mongo_url, "--version-weights", "1.2.0=80,1.3.0=20")
        procs.append(front)
        _sees(port, 3)
        sessions = [requests.Session() for _ in range(200)]
        first = [_ask(s, port) for s in sessions]
        counts = Counter(_version(n) for n in first)
        # 200 draws at 20 %: 40 expected, sd 5.7; these bounds fail once in millions
        assert 15 <= counts["v2"] <= 70, counts
        assert counts["v1"] + counts["v2"] == 200
        for s, name in list(zip(sessions, first))[::4]:  # sessions stay where they are
            assert _ask(s, port) == name
            assert _ask(s, port) == name
    finally:
        for proc in procs:
            proc.stop()
    for proc in procs:
        assert "Traceback" not in proc.output(), proc.output()
