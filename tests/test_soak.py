"""Long fault runs: `tox -e soak` (SOAK_SECONDS, default 300). Not part of the CI suite.

Endpoints are SIGKILLed, SIGTERMed and replaced, and the discovery database is
restarted, while a client sends a steady stream of GETs through a balancer. Every GET
must succeed: a refused connection is retried elsewhere, and a GET whose endpoint
died before answering is idempotent and retried too.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter

import pytest
import requests

from helpers import Proc, start_instance, start_serve, wait_until

SECONDS = float(os.environ.get("SOAK_SECONDS", "300"))


@pytest.mark.soak
@pytest.mark.timeout(SECONDS + 180)
def test_churn_and_database_restarts_under_steady_traffic(mongo_server, mongo_url):
    rng = random.Random(7)
    front, front_port = start_serve("--ui-service", "web", "--ping-interval", "1",
                                    "--expiry-grace", "1",
                                    env={"CLUSTER_DISCOVERY_URL": mongo_url}, name="front")
    base = f"http://127.0.0.1:{front_port}"
    members: list[Proc] = []

    def add_member() -> None:
        members.append(start_instance(mongo_url, f"m{len(members)}")[0])

    statuses: Counter[int] = Counter()
    failures: list[str] = []
    failed_at: list[float] = []  # seconds since start, to tell churn from store restarts
    restarts: list[tuple[float, float]] = []  # (stopped, started) seconds since start
    began = time.monotonic()
    stop = threading.Event()

    def traffic() -> None:
        session = requests.Session()
        while not stop.is_set():
            try:
                response = session.get(base + "/whoami", timeout=10)
                statuses[response.status_code] += 1
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text.strip()}")
                    failed_at.append(time.monotonic() - began)
            except requests.RequestException as exc:
                failures.append(repr(exc))
                failed_at.append(time.monotonic() - began)
            session.cookies.clear()  # spread over every endpoint, not one

    try:
        for _ in range(3):
            add_member()
        wait_until(lambda: len(requests.get(base + "/_cluster/status", timeout=5)
                               .json()["endpoints"]) == 3, timeout=10)
        client = threading.Thread(target=traffic, daemon=True)
        client.start()
        deadline = time.monotonic() + SECONDS
        rounds = 0
        while time.monotonic() < deadline:
            rounds += 1
            time.sleep(rng.uniform(1.0, 3.0))
            live = [m for m in members if m.poll() is None]
            if len(live) > 1:
                victim = rng.choice(live)
                victim.signal(rng.choice([signal.SIGKILL, signal.SIGTERM]))
            add_member()
            if rounds % 10 == 0:
                stopped = time.monotonic() - began
                mongo_server.stop()
                time.sleep(rng.uniform(2.0, 8.0))
                mongo_server.start()
                restarts.append((stopped, time.monotonic() - began))
        stop.set()
        client.join(30)
        print(f"soak {SECONDS:.0f}s: {sum(statuses.values())} GETs, {len(failures)} failed, "
              f"{rounds} rounds of churn, {rounds // 10} database restarts")
        assert statuses[200] > 100
        assert failures == [], (
            f"{len(failures)} failed of {sum(statuses.values())}: "
            f"{Counter(failures).most_common(5)}; failures in seconds "
            f"{sorted(Counter(int(t) for t in failed_at).items())}; store down (s) "
            f"{[(round(a, 1), round(b, 1)) for a, b in restarts]}")
        assert front.poll() is None and "Traceback" not in front.output()
    finally:
        stop.set()
        for proc in [front, *members]:
            proc.stop()
