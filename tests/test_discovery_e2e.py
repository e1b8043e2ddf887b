"""Registration, removal, expiry and outages with real `cluster serve` processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import pymongo
import pytest
import requests

from cluster.records import COLLECTION, endpoint_hash
from helpers import (
    ROOT,
    Proc,
    cluster_argv,
    live_endpoints,
    refused_port,
    start_backend,
    start_instance,
    start_serve,
    status_json,
    wait_until,
)

PING = 1.0
GRACE = 1.0


@contextlib.contextmanager
def instances(discovery_url: str, count: int, **kwargs):
    started: list[tuple[Proc, str]] = []
    try:
        for n in range(count):  # each listens before the next starts
            proc, port = start_instance(discovery_url, f"i{n}", **kwargs)
            started.append((proc, f"http://127.0.0.1:{port}"))
        yield started
    finally:
        for proc, _url in started:
            proc.stop()


def view(url: str) -> dict:
    """An instance's own table, from its loopback-only status path."""
    return requests.get(url + "/_cluster/status", timeout=5).json()


def test_two_instances_register_list_each_other_and_leave(mongo_url):
    with instances(mongo_url, 2) as ((first, url1), (second, url2)):
        # Registration happens at start: both are listed within one ping interval of
        # the second one listening, plus the status subprocesses' own start-up (each
        # `cluster status` takes a second or more on a loaded machine).
        wait_until(lambda: live_endpoints(mongo_url) == {url1, url2}, timeout=PING + 6,
                   what="both instances in cluster status")
        wait_until(lambda: {e["endpoint"] for e in view(url1)["endpoints"]} == {url1, url2},
                   timeout=5, what="instance 1 sees both")

        second.signal(signal.SIGTERM)
        assert second.wait(15) == 0
        rows = status_json(mongo_url, "--all")["endpoints"]
        assert [r["endpoint"] for r in rows] == [url1], "SIGTERM'd record must be gone at once"

        first.signal(signal.SIGKILL)
        first.wait(5)
        assert live_endpoints(mongo_url) == {url1}  # still there: nobody removed it
        # it expires after pingInterval + grace; the rest is the status subprocesses'
        wait_until(lambda: live_endpoints(mongo_url) == set(), timeout=PING + GRACE + 4,
                   interval=0.2, what="SIGKILL'd instance to expire")


def test_killed_instance_leaves_the_tables_of_the_others(mongo_url):
    with instances(mongo_url, 2) as ((first, url1), (second, url2)):
        wait_until(lambda: len(view(url1)["endpoints"]) == 2, timeout=5)
        second.kill()
        wait_until(lambda: [e["endpoint"] for e in view(url1)["endpoints"]] == [url1],
                   timeout=PING + GRACE + 3, what="expiry in instance 1's table")


@pytest.mark.timeout(180)
def test_database_outage_keeps_tables_and_everything_recovers(mongo_server, mongo_url):
    with instances(mongo_url, 2) as ((first, url1), (second, url2)):
        wait_until(lambda: all(len(view(u)["endpoints"]) == 2 for u in (url1, url2)), timeout=5)
        mongo_server.stop()
        try:
            wait_until(lambda: view(url1)["store_failing"], timeout=10, what="outage noticed")
            # five heartbeats lost, two and a half times a record's life (PING +
            # GRACE): the kept tables are a decision, not an expiry still to come
            time.sleep(5)
            for url in (url1, url2):
                table = view(url)
                assert {e["endpoint"] for e in table["endpoints"]} == {url1, url2}
            # the kept table still balances: requests through instance 1 reach both
            served = {requests.get(url1 + "/whoami", timeout=5).text for _ in range(40)}
            assert served == {"i0", "i1"}
            assert first.poll() is None and second.poll() is None
        finally:
            mongo_server.start()
        # Both heal by themselves: heartbeats land again and the watchers read again.
        wait_until(lambda: live_endpoints(mongo_url) == {url1, url2}, timeout=15,
                   what="both records live again")
        for url in (url1, url2):
            wait_until(lambda u=url: not view(u)["store_failing"], timeout=10)
            assert {e["endpoint"] for e in view(url)["endpoints"]} == {url1, url2}
        # and what happens after the outage is seen: a third instance joins
        with instances(mongo_url, 1) as ((third, url3),):
            wait_until(lambda: {e["endpoint"] for e in view(url1)["endpoints"]}
                       == {url1, url2, url3}, timeout=10, what="newcomer seen after outage")
    logs = first.output()
    warned = [line for line in logs.splitlines() if "WARNING" in line or "again" in line]
    assert logs.count("will keep retrying") == 1, warned
    assert logs.count("works again") == 1, "one line when it ends"
    assert "Traceback" not in logs


def test_foreign_record_is_used_and_malformed_one_is_skipped(mongo_url):
    meteor, backend_port = start_backend("meteor")
    foreign = f"http://127.0.0.1:{backend_port}"
    try:
        client = pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=5000)
        try:
            coll = client.get_default_database()[COLLECTION]
            # exactly what meteorhacks:cluster writes (its own _id, a JS Date, ms interval)
            coll.update_one(
                {"serviceName": "web", "endpoint": foreign},
                {"$set": {"endpointHash": endpoint_hash(foreign), "balancer": None,
                          "pingInterval": 60000},
                 "$currentDate": {"timestamp": True}},
                upsert=True,
            )
            coll.insert_one({"serviceName": "web", "endpoint": "not-a-url",
                             "pingInterval": 60000, "note": "written by hand"})
            with instances(mongo_url, 1) as ((proc, url),):
                wait_until(lambda: foreign in {e["endpoint"] for e in view(url)["endpoints"]},
                           timeout=5, what="foreign record in the table")
                served = {requests.get(url + "/whoami", timeout=5).text for _ in range(40)}
                assert served == {"i0", "meteor"}
                status = subprocess.run(cluster_argv("status"), capture_output=True, text=True,
                                        env={"CLUSTER_DISCOVERY_URL": mongo_url,
                                             "PATH": "/usr/bin:/bin",
                                             "PYTHONPATH": str(ROOT)}, timeout=30)
                assert foreign in status.stdout and url in status.stdout
                assert "warning: malformed record" in status.stdout
                wait_until(lambda: "skipping malformed discovery record" in proc.output(),
                           timeout=5)
                assert proc.output().count("skipping malformed discovery record") == 1
                assert proc.poll() is None
        finally:
            client.close()
    finally:
        meteor.stop()


def test_embedded_default_needs_no_server(tmp_path):
    """With no discovery URL, instances on one host find each other through a file."""
    env = {"XDG_STATE_HOME": str(tmp_path / "state")}
    procs: list[Proc] = []
    ports: list[int] = []
    try:
        for n in range(2):
            proc, port = start_serve("--service", "web", "--app", "backend:app",
                                     "--ping-interval", "1",
                                     env={**env, "BACKEND_NAME": f"e{n}"}, name=f"e{n}")
            procs.append(proc)
            ports.append(port)
        wait_until((tmp_path / "state" / "cluster" / "discovery.sqlite3").exists, timeout=5,
                   what="the embedded store in the per-user state directory")
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        wait_until(lambda: len(view(urls[0])["endpoints"]) == 2, timeout=5)
        served = {requests.get(urls[0] + "/whoami", timeout=5).text for _ in range(40)}
        assert served == {"e0", "e1"}
    finally:
        for proc in procs:
            proc.stop()


def test_a_replica_set_url_listing_several_hosts_works(mongo_url):
    """The README's production URL names every member with its port
    (mongodb://db1:27017,db2:27017,db3:27017/cluster?replicaSet=rs0): the store's log
    description read the port of "27017,db2:27017,..." and every command stopped with a
    ValueError traceback. Here the real server is the first seed and a refused port the
    second, as a member that is down."""
    head, sep, tail = mongo_url.partition("://")
    hosts, slash, rest = tail.partition("/")
    with refused_port() as dead:
        url = f"{head}{sep}{hosts},127.0.0.1:{dead}{slash}{rest}"
        proc, port = start_serve("--service", "web", "--app", "backend:app",
                                 "--ping-interval", str(PING), "--expiry-grace", str(GRACE),
                                 env={"CLUSTER_DISCOVERY_URL": url}, name="rs-url")
        try:
            wait_until(lambda: f"http://127.0.0.1:{port}" in live_endpoints(url), timeout=20,
                       what="the instance in the table, read with the same URL")
            assert f"{hosts},127.0.0.1:{dead}" in proc.output()  # the log names both hosts
        finally:
            proc.stop()
        assert "Traceback" not in proc.output(), proc.output()


def test_a_mongodb_url_with_no_server_is_one_short_line():
    """No server at the URL: one line naming the store and the refusal, not pymongo's
    dump of its topology (hundreds of characters of server descriptions)."""
    with refused_port() as dead:
        result = subprocess.run(
            cluster_argv("status", "--connect-timeout", "1",
                         "--discovery-url", f"mongodb://127.0.0.1:{dead}/cluster"),
            capture_output=True, text=True, timeout=30, cwd=str(ROOT),
            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1, result
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"127.0.0.1:{dead}" in result.stderr and "refused" in result.stderr, result.stderr
    assert "Topology Description" not in result.stderr, result.stderr


def test_a_password_with_a_hash_sign_is_not_in_the_message():
    """pymongo takes a ``#`` in the password unescaped; the store's description for logs
    and errors was cut at it as at a URL fragment: ``mongodb://user:pa`` named the
    user and the start of the password as the store, on every log line."""
    from helpers import refused_port

    with refused_port() as dead:
        result = subprocess.run(
            cluster_argv("status", "--connect-timeout", "0.5", "--discovery-url",
                         f"mongodb://alice:pw#topsecret@127.0.0.1:{dead}/cluster"),
            capture_output=True, text=True, timeout=30, cwd=str(ROOT),
            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1, result
    assert f"mongodb://127.0.0.1:{dead}/cluster " in result.stderr, result.stderr
    assert "alice" not in result.stderr and "pw" not in result.stderr, result.stderr
