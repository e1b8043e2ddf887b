"""Clock skew between hosts neither expires live endpoints nor keeps dead ones.

Instances run under libfaketime (Debian's `faketime` package) an hour behind and an hour ahead
of the database. Heartbeats are stamped by the database ($currentDate) and ages are
judged against the database's clock (hello.localTime), so both see the truth; judged by
their own clocks, the one ahead would expire everyone and the one behind would never
expire anyone.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pymongo
import pytest
import requests

from cluster.records import COLLECTION
from helpers import Proc, start_instance, wait_until

# Preloaded directly rather than through the `faketime` wrapper, which forks: the PID we
# hold must be the instance's own, so stopping it by PID really stops it.
FAKETIME_LIB = next(iter(sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))), None)


def skewed_instance(mongo_url: str, name: str, skew: str | None) -> tuple[Proc, str]:
    env: dict[str, str] = {}
    if skew:
        # gevent's timers run on the monotonic clock; only wall-clock time is skewed.
        env.update(LD_PRELOAD=str(FAKETIME_LIB), FAKETIME=skew,
                   FAKETIME_DONT_FAKE_MONOTONIC="1")
    proc, port = start_instance(mongo_url, name, env=env)
    return proc, f"http://127.0.0.1:{port}"


def _logged_hour_offset(proc: Proc) -> int:
    """Hours between the process's logged wall-clock time and ours."""
    first = proc.output().splitlines()[0]
    logged = dt.datetime.strptime(first[:19], "%Y-%m-%d %H:%M:%S")
    delta = (logged - dt.datetime.now()).total_seconds()  # asctime is local time
    return round(delta / 3600)


def view(url: str) -> set[str]:
    return {e["endpoint"] for e in requests.get(url + "/_cluster/status", timeout=5)
            .json()["endpoints"]}


def test_skewed_clocks_see_the_truth(mongo_url):
    if FAKETIME_LIB is None:
        pytest.fail("needs Debian's faketime: apt-get install faketime (scripts/run-tests "
                    "installs it)")
    procs: list[Proc] = []
    urls: list[str] = []
    try:  # a failed start stops those already started
        for name, skew in (("behind", "-1h"), ("ahead", "+1h"), ("normal", None)):
            proc, url = skewed_instance(mongo_url, name, skew)
            procs.append(proc)
            urls.append(url)
        behind, ahead, normal = procs
        url_behind, url_ahead, url_normal = urls
        everyone = {url_behind, url_ahead, url_normal}
        for url in everyone:
            wait_until(lambda u=url: view(u) == everyone, timeout=10,
                       what=f"{url} sees all three live")
        client = pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=5000)
        try:
            server_now = client.admin.command("hello")["localTime"]
            for doc in client.get_default_database()[COLLECTION].find():
                assert abs((server_now - doc["timestamp"]).total_seconds()) < 5, doc
        finally:
            client.close()

        # the skew is real: each process logs its own (faked) wall-clock time
        assert _logged_hour_offset(ahead) == 1 and _logged_hour_offset(behind) == -1

        normal.kill()
        for url in (url_behind, url_ahead):
            wait_until(lambda u=url: view(u) == {url_behind, url_ahead}, timeout=6,
                       what=f"{url} expires the killed instance on time")
    finally:
        for proc in procs:
            proc.stop()
