"""Cross-host behaviour on the namespace bed (tests/hosts.py): what one host cannot show.

Hosts: ``store`` (FerretDB on 198.18.0.2), ``h1``..``h3`` (one ``cluster serve`` each,
``--bind 0.0.0.0:8000`` and no ``--endpoint-url``), ``client`` (a member of nothing) and
``wan`` (toxiproxy, for the latency and reset tests). Ping interval 1 s, grace 1 s.
"""

from __future__ import annotations

import hashlib
import sys
import time
from typing import Iterator

import pytest

from hosts import INSTANCE_PORT, Bed, Host, bed_or_fail, endpoints_seen, wait_for
from toxiproxy import API_PORT, Toxiproxy
from toxiproxy import build as build_toxiproxy

PING, GRACE = 1.0, 1.0
MEMBERS = ("h1", "h2", "h3")


@pytest.fixture(scope="module")
def the_bed() -> Iterator[Bed]:
    with bed_or_fail(["store", "h1", "h2", "h3", "client", "wan"]) as made:
        yield made


@pytest.fixture(scope="module")
def store(the_bed: Bed) -> str:
    return the_bed.start_store()


def url_of(host: Host, port: int = INSTANCE_PORT) -> str:
    return f"http://{host.address}:{port}"


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def trio(the_bed: Bed, store: str) -> dict[str, Host]:
    """One instance on each of h1..h3, each its own balancer, all seeing all three."""
    procs = {}
    for name in MEMBERS:
        host = the_bed[name]
        procs[name] = the_bed.serve(name, f"{store}/trio", "--balancer-url", url_of(host),
                                    wait=False)
    for name in MEMBERS:
        the_bed[name].wait_listening(INSTANCE_PORT, procs[name])
    want = {url_of(the_bed[n]) for n in MEMBERS}
    for name in MEMBERS:
        wait_for(lambda n=name: endpoints_seen(the_bed[n]) == want, 20, f"{name}'s table")
    return {n: the_bed[n] for n in MEMBERS}


def served_by(client: Host, entry: Host, path: str = "/whoami", **kwargs) -> str:
    response = client.get(url_of(entry) + path, **kwargs)
    assert response.status_code == 200, response.text
    return response.headers["X-Served-By"]


def test_instances_register_routable_addresses_and_balance_across_hosts(the_bed, trio):
    # the endpoint is the host's address toward the store, and the log says why
    for host in trio.values():
        assert host.status()["endpoint"] == url_of(host)
        log = host.procs[0].output()
        assert f"endpoint {url_of(host)}: the local address of the route to the store " \
               f"host {the_bed['store'].address}" in log, log
    client = the_bed["client"]
    for entry in trio.values():
        seen = {served_by(client, entry) for _ in range(24)}
        assert seen == set(MEMBERS), f"entering at {entry.name}: {seen}"


def test_sticky_cookie_and_ddp_paths_reach_the_right_host_through_any_balancer(the_bed, trio):
    client = the_bed["client"]
    first = client.get(url_of(trio["h1"]) + "/whoami")
    owner = first.headers["X-Served-By"]
    cookie = first.cookies.get("cluster-endpoint::web")
    assert cookie == sha1(url_of(trio[owner]))
    for entry in trio.values():
        for _ in range(3):
            assert served_by(client, entry, cookies={"cluster-endpoint::web": cookie}) == owner
    for target in trio.values():
        ddp = f"/cluster-ddp/{sha1(url_of(target))}/web/123/abcd/xhr"
        for entry in trio.values():
            response = client.get(url_of(entry) + ddp)
            assert response.status_code == 200
            assert response.text == f"{target.name} /sockjs/123/abcd/xhr"


def test_sockjs_base_url_names_the_right_hosts_balancer(the_bed, trio):
    client = the_bed["client"]
    owners = set()
    for entry in trio.values():
        for _ in range(8):
            info = client.get(url_of(entry) + "/sockjs/info").json()
            owner = trio[info["server"]]
            owners.add(owner.name)
            assert info["base_url"] == \
                f"{url_of(owner)}/cluster-ddp/{sha1(url_of(owner))}/web"
            # the session's next request, sent where base_url says, reaches the same host
            follow = client.get(info["base_url"] + "/1/2/xhr")
            assert follow.text == f"{owner.name} /sockjs/1/2/xhr"
    assert len(owners) > 1


def test_hop_marker_from_a_host_that_is_not_a_member_is_ignored(the_bed, trio):
    """A hop marker makes an instance serve a request itself. From a member's address it
    is honoured; from anyone else it must not be, or any client could pin any instance
    (and bypass sticky routing) by sending the header."""
    pinned = {"cluster-endpoint::web": sha1(url_of(trio["h2"]))}
    hop = {"X-Cluster-Hop": "1"}
    stranger = the_bed["client"]
    for _ in range(3):
        assert served_by(stranger, trio["h1"], cookies=pinned, headers=hop) == "h2"
    # a member's hop is honoured: h1 serves it itself, as it does for proxied requests
    assert served_by(trio["h3"], trio["h1"], cookies=pinned, headers=hop) == "h1"


def test_loopback_endpoint_with_a_remote_store_is_refused_in_one_line(the_bed, store):
    host = the_bed["h1"]
    refused = host.start(
        [sys.executable, "-m", "cluster", "serve",
         "--service", "web", "--app", "backend:app", "--bind", "127.0.0.1:8100",
         "--discovery-url", f"{store}/refused"], name="h1-refused")
    assert refused.wait(60) == 2
    lines = refused.output().strip().splitlines()
    assert len(lines) == 1 and "--endpoint-url" in lines[0] and "loopback" in lines[0], lines
    # set explicitly, it is the operator's choice and runs
    explicit = the_bed.serve("h1", f"{store}/refused", "--bind", "127.0.0.1:8101",
                             "--endpoint-url", "http://127.0.0.1:8101", port=8101)
    assert host.status(8101)["endpoint"] == "http://127.0.0.1:8101"
    explicit.stop()


def reaper_of(trio: dict[str, Host]) -> Host:
    """The member holding the reaper lease (it logs when it takes and loses it)."""
    holders = [h for h in trio.values()
               if h.procs[0].output().count("reaping for")
               > h.procs[0].output().count("no longer the reaper")]
    assert len(holders) == 1, holders
    return holders[0]


@pytest.mark.soak  # 7 s of expiry; the hosts' routing and membership: in CI
def test_partition_expires_the_cut_host_which_keeps_serving_and_all_agree_after(the_bed, trio):
    # Cut the reaper's host, the harder case: the others must take the lease over
    # before anyone can announce that it expired.
    cut = reaper_of(trio)
    others = [h for h in trio.values() if h is not cut]
    everyone = {url_of(h) for h in trio.values()}
    cut.link(False)
    try:
        started = time.monotonic()
        for host in others:
            wait_for(lambda h=host: url_of(cut) not in endpoints_seen(h), 6,
                     f"{host.name} to expire the cut-off h3")
        took = time.monotonic() - started
        # the last heartbeat landed at most one ping before the cut; the lease lapses
        # after three missed renewals (a refresh every half ping); the new reaper's scan
        # and the others' next refresh; a little for the polling here
        assert took <= PING + GRACE + 3 * PING / 2 + PING + 1.0, took
        # the cut-off host keeps its last table (no mass expiry while its store is out
        # of reach) and serves its own endpoint to the clients it can still reach
        assert endpoints_seen(cut) == everyone
        wait_for(lambda: cut.status()["store_failing"], 5, "h3 to notice the store is gone")
        mine = {"cluster-endpoint::web": sha1(url_of(cut))}
        local = f"http://127.0.0.1:{INSTANCE_PORT}/whoami"
        for _ in range(3):
            assert cut.get(local, cookies=mine).headers["X-Served-By"] == cut.name
        time.sleep(PING + GRACE)
        assert endpoints_seen(cut) == everyone
    finally:
        cut.link(True)
    started = time.monotonic()
    for host in trio.values():
        wait_for(lambda h=host: endpoints_seen(h) == everyone, 20,
                 f"{host.name} to see all three again")
    assert time.monotonic() - started < 15


@pytest.mark.soak
def test_latency_loss_and_resets_between_hosts_and_to_the_store(the_bed, store):
    """WAN-like links through toxiproxy on the `wan` host: h1 and h2 reach the store
    through it, and h2's endpoint is reached through it; then packet loss on h2's cable
    (nftables, tests/hosts.py). A grace of three pings absorbs heartbeats slowed by a few
    round trips and, at 10 % loss, by TCP's retransmission timeouts (a lost segment waits
    0.2 s and then twice as long each time, a lost SYN 1 s): with a grace of two, h2 left
    h1's table once in CI. --secret signs the hop marker, since h2's requests arrive from
    the proxy's address."""
    wan = the_bed["wan"]
    server = wan.start([str(build_toxiproxy()), "-host", wan.address, "-port", str(API_PORT)],
                       name="wan-toxiproxy")
    wan.wait_listening(API_PORT, server, address=wan.address)
    toxi = Toxiproxy(f"http://{wan.address}:{API_PORT}", wan.call)
    store_address = store.split("://", 1)[1]
    toxi.proxy("store_h1", f"{wan.address}:27101", store_address)
    toxi.proxy("store_h2", f"{wan.address}:27102", store_address)
    toxi.proxy("web_h2", f"{wan.address}:9002", f"{the_bed['h2'].address}:8200")
    wan_settings = ("--expiry-grace", "3", "--connect-timeout", "2", "--read-timeout", "10",
                    "--eject-seconds", "2")
    secret = {"CLUSTER_SECRET": "wan-test-secret-0123456789"}
    h1_proc = the_bed.serve("h1", f"mongodb://{wan.address}:27101/wan", *wan_settings,
                            port=8200, env=secret)
    the_bed.serve("h2", f"mongodb://{wan.address}:27102/wan", *wan_settings,
                  "--endpoint-url", f"http://{wan.address}:9002", port=8200, env=secret)
    h1 = the_bed["h1"]
    both = {f"http://{h1.address}:8200", f"http://{wan.address}:9002"}
    wait_for(lambda: endpoints_seen_on(h1) == both, 20, "h1 to see both")

    def requests_succeed(n: int) -> set[str]:
        names = set()
        for _ in range(n):
            response = the_bed["client"].get(f"http://{h1.address}:8200/whoami", timeout=20)
            assert response.status_code == 200, response.text
            names.add(response.headers["X-Served-By"])
        return names

    # 1. latency with jitter both ways on every link, the store's included
    for proxy in ("store_h1", "store_h2", "web_h2"):
        for stream in ("upstream", "downstream"):
            toxi.toxic(proxy, "latency", stream, latency=150, jitter=100)
    assert requests_succeed(16) == {"h1", "h2"}
    deadline = time.monotonic() + 4 * PING
    while time.monotonic() < deadline:  # heartbeats keep h2 alive through slow links
        assert endpoints_seen_on(h1) == both
        time.sleep(0.3)
    # 2. resets: every connection to h2 is reset by the peer; GETs are retried on h1
    for proxy in ("store_h1", "store_h2", "web_h2"):
        toxi.clear(proxy)
    toxi.toxic("web_h2", "reset_peer", "upstream", timeout=0)
    assert requests_succeed(12) == {"h1"}
    retried = [line for line in h1_proc.output().splitlines()
               if f"http://{wan.address}:9002" in line and "reset by peer" in line]
    assert retried  # the resets happened and were retried, not passed on
    toxi.clear("web_h2")
    wait_for(lambda: "h2" in requests_succeed(4), 10, "h2 back in h1's picks")
    # 3. the store link of h2 stalls for less than the grace: h2 is not expired
    toxi.clear("web_h2")
    toxi.toxic("store_h2", "latency", "downstream", latency=1500)
    deadline = time.monotonic() + 3 * PING
    while time.monotonic() < deadline:
        assert endpoints_seen_on(h1) == both
        time.sleep(0.3)
    toxi.clear("store_h2")
    # 4. loss: h2 drops 10 % of the packets it sends and receives, on its link to the
    # store and on the one its requests come in by; TCP retransmits, nothing fails
    h2 = the_bed["h2"]
    h2.lose(10)
    try:
        assert requests_succeed(16) == {"h1", "h2"}
        deadline = time.monotonic() + 4 * PING
        while time.monotonic() < deadline:  # its heartbeats still land in time
            assert endpoints_seen_on(h1) == both
            time.sleep(0.3)
        assert requests_succeed(8)
        assert h2.dropped() > 0  # packets were lost
    finally:
        h2.lose(0)


def endpoints_seen_on(host: Host, port: int = 8200) -> set[str]:
    return {row["endpoint"] for row in host.status(port)["endpoints"]}
