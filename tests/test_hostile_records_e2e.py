"""Hostile input from the discovery store and from outside clients, against a real
`cluster serve` balancer: poisoned records are skipped with one escaped warning each,
a foreign service's balancer is never handed out, and session paths cannot escape."""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
import time
from collections import Counter

import pymongo
import requests
from bson import DatetimeMS

from cluster.records import COLLECTION, endpoint_hash
from helpers import Proc, start_backend, start_instance, start_serve, wait_until

COMMON = ["--ping-interval", "1", "--expiry-grace", "1"]


@contextlib.contextmanager
def member_and_front(mongo_url: str):
    """One `web` member (m0) and a balancer-only front: (member URL, front process, URL).

    The member's process is ``front.member``: records nobody announced (written straight
    into the store, as here) are read by whichever instance holds the reaper lease.
    """
    member, member_port = start_instance(mongo_url, "m0")
    front: Proc | None = None
    try:
        front, front_port = start_serve("--ui-service", "web", *COMMON,
                                        env={"CLUSTER_DISCOVERY_URL": mongo_url},
                                        name="front")
        base = f"http://127.0.0.1:{front_port}"
        wait_until(lambda: requests.get(base + "/whoami", timeout=5).text == "m0", timeout=10)
        front.member = member  # type: ignore[attr-defined]
        yield f"http://127.0.0.1:{member_port}", front, base
    finally:
        if front is not None:
            front.stop()
        member.stop()


@contextlib.contextmanager
def trap_backend():
    """The test backend as "trap", where no request must arrive: its port, then stopped."""
    proc, port = start_backend("trap")
    try:
        yield port
    finally:
        proc.stop()


def poisoned_records(trap: str) -> list[dict]:
    """The issue's cases; each would have reached the trap (or the logs) before."""
    now = dt.datetime.now(dt.timezone.utc)
    port = trap.rsplit(":", 1)[1]

    def rec(endpoint: str, service: str = "web", **extra) -> dict:
        return {"serviceName": service, "endpoint": endpoint,
                "endpointHash": endpoint_hash(endpoint), "balancer": None,
                "timestamp": now, "pingInterval": 60000, **extra}

    return [
        rec("http://127.0.0.1:70000"),                                   # port out of range
        rec(f"{trap}\r\n2026-01-01 00:00:00,000 WARNING forged line"),  # CR/LF
        rec(f"{trap}/" + "a" * (2 * 1024 * 1024)),                       # a 2 MB URL
        rec(f"{trap}/never-expires", pingInterval=1e15,                  # never expires
            timestamp=now - dt.timedelta(days=1)),
        rec(f"http://127.0.0.2:{port}", service="web app"),              # a space
        rec(f"http://admin:hunter2@127.0.0.1:{port}"),                   # credentials
    ]


def test_poisoned_records_are_skipped_with_one_warning_each(mongo_url):
    with trap_backend() as trap_port, member_and_front(mongo_url) as (member, front, base):
        trap = f"http://127.0.0.1:{trap_port}"
        client = pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=5000)
        try:
            coll = client.get_default_database()[COLLECTION]
            coll.insert_many(poisoned_records(trap))
            # a valid record of an unrelated service whose balancer must not serve `web`
            evil = f"http://127.0.0.2:{trap_port}"
            coll.insert_one({"serviceName": "evil", "endpoint": evil,
                             "endpointHash": endpoint_hash(evil),
                             "balancer": "https://evil.example", "pingInterval": 60000,
                             "timestamp": dt.datetime.now(dt.timezone.utc)})
            def warnings() -> list[int]:  # per instance: only those that read them warn
                return [p.output().count("skipping malformed discovery record")
                        for p in (front, front.member)]

            wait_until(lambda: max(warnings()) >= 6, timeout=15, what="six warnings")
            time.sleep(1.5)  # three more refreshes: still six, not six per refresh
            served = Counter(requests.get(base + "/whoami", timeout=5).text for _ in range(100))
            assert served == {"m0": 100}
            info = requests.get(base + "/sockjs/info", timeout=5).json()
            assert info["base_url"] == f"{base}/cluster-ddp/{endpoint_hash(member)}/web"
            table = requests.get(base + "/_cluster/status", timeout=5).json()
            assert [e["endpoint"] for e in table["endpoints"]] == [evil, member]
        finally:
            client.close()
        # One warning per bad record in each instance that read them (the reaper reads
        # every record; any instance reads all at start), never one per refresh.
        counts = warnings()
        assert max(counts) == 6 and set(counts) <= {0, 6}, counts
        logs = front.output() + front.member.output()
        assert "forged line" in logs  # shown, escaped, on the warning's own line
        assert not any(line.startswith("2026-01-01") for line in logs.splitlines())
        assert max(len(line) for line in logs.splitlines()) < 1000
        assert "hunter2" not in logs and "//***@127.0.0.1" in logs  # credentials redacted
        assert front.poll() is None and "Traceback" not in logs



def test_record_with_a_date_out_of_range_costs_one_warning_not_the_watchers(mongo_url):
    """A BSON date before year 1 or after 9999 (any int64 is one) made every read of the
    records fail with InvalidBSON: each instance's watcher died with its table frozen,
    so an instance started later was never seen."""
    with member_and_front(mongo_url) as (member, front, base):
        client = pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=5000)
        procs: list[Proc] = []
        try:
            bad = "http://127.0.0.1:1/bad-date"
            client.get_default_database()[COLLECTION].insert_one(
                {"serviceName": "web", "endpoint": bad, "endpointHash": endpoint_hash(bad),
                 "balancer": None, "timestamp": DatetimeMS(-(2**62)), "pingInterval": 60000})
            wait_until(lambda: any("skipping malformed discovery record" in p.output()
                                   for p in (front, front.member)),  # the reaper reads it
                       timeout=15, what="the warning")
            later, _ = start_instance(mongo_url, "m1")
            procs.append(later)

            def served() -> set[str]:
                return {requests.get(base + "/whoami", timeout=5).text for _ in range(20)}

            wait_until(lambda: served() == {"m0", "m1"}, timeout=15, what="m0 and m1")
            time.sleep(1.5)  # more refreshes: still one warning
        finally:
            client.close()
            for proc in procs:
                proc.stop()
        for proc in (front, front.member):
            logs = proc.output()
            assert logs.count("skipping malformed discovery record") <= 1
            assert "Traceback" not in logs and "InvalidBSON" not in logs
        assert front.poll() is None


def test_records_whose_host_resolvers_refuse_are_skipped(mongo_url):
    """An empty or over-long DNS label passed the checks: every request routed there
    raised UnicodeError (IDNA) in the front, and its client's connection was closed
    without an answer."""
    hosts = ["a..b", ".x", "a" * 64]
    with member_and_front(mongo_url) as (member, front, base):
        client = pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=5000)
        try:
            now = dt.datetime.now(dt.timezone.utc)
            client.get_default_database()[COLLECTION].insert_many([
                {"serviceName": "web", "endpoint": f"http://{host}:80",
                 "endpointHash": endpoint_hash(f"http://{host}:80"), "balancer": None,
                 "timestamp": now, "pingInterval": 60000} for host in hosts])
        finally:
            client.close()

        def warned() -> int:
            return max(p.output().count("no valid host") for p in (front, front.member))

        wait_until(lambda: warned() >= len(hosts), timeout=15, what="one warning each")
        time.sleep(1.5)  # the front's table is as new as the reaper's
        served = Counter(requests.get(base + "/whoami", timeout=5).text for _ in range(40))
        assert served == {"m0": 40}
        assert warned() == len(hosts)
        logs = front.output() + front.member.output()
        assert "Traceback" not in logs and "UnicodeError" not in logs

def raw_request_from(address: str, port: int, target: str) -> bytes:
    """One request from ``address`` (bound before connecting), the response's first line."""
    with socket.socket() as sock:
        sock.bind((address, 0))
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n", 1)[0]


def test_session_path_escape_from_outside_is_400(mongo_url):
    with member_and_front(mongo_url) as (member, front, base):
        port = int(base.rsplit(":", 1)[1])
        prefix = f"/cluster-ddp/{endpoint_hash(member)}/web"
        for rest in ("/..%2f..%2fadmin", "/%2e%2E/%2e%2e/admin", "/a%5c..%5cadmin",
                     "/../../admin"):
            assert raw_request_from("127.0.0.2", port, prefix + rest).startswith(
                b"HTTP/1.1 400 "), rest
        # an ordinary session path still reaches the endpoint's SockJS prefix
        line = raw_request_from("127.0.0.2", port, prefix + "/info")
        assert line.startswith(b"HTTP/1.1 200 "), line
        assert front.poll() is None and "Traceback" not in front.output()
