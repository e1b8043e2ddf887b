"""Sessions placed by load across balancers, and rebalanced after a scale-up (issue 11).

Real processes: echo instances (tests/apps/gws_echo.py) under `cluster serve`, reached
through balancer-only instances, with FerretDB as the discovery store. Clients are
tests/wsfleet.py's: each knows which instance holds it and reconnects through a
random balancer after a 1001 close.
"""

from __future__ import annotations

import time

import pytest
import websocket

from helpers import status_json, wait_until
from wsfleet import Client, Fleet, bed

SOCKETS = 300
#: sockets opened per second: a burst, far faster than heartbeats (1 s) publish loads
RATE = 150


def test_300_websockets_through_three_balancers_spread_within_10_percent(mongo_url):
    with bed(mongo_url, instances=3, balancers=3) as made:
        fleet = Fleet([port for _, port in made.balancers])
        try:
            fleet.open(SOCKETS, RATE)
            assert fleet.errors == []
            counts = fleet.counts()
            mean = SOCKETS / 3
            assert sorted(counts) == ["i0", "i1", "i2"], counts
            for count in counts.values():
                assert abs(count - mean) <= 0.10 * mean, (counts, made.outputs())
            # the live figure an instance sends its balancer on the 101 goes no further,
            # and a client that is not a cluster member never gets it
            assert not any("x-cluster-load" in c.headers for c in fleet.clients)
            # Each instance counts the same sockets itself, and publishes them
            # (its record changes once they moved by 2 and 10 %).
            for name, (_, port) in made.instances.items():
                assert made.status(port)["load"]["sockets"] == counts[name]
            wait_until(lambda: all(
                abs(row["load"]["sockets"] - counts[name]) <= max(2, 0.1 * counts[name])
                for name, (_, port) in made.instances.items()
                for row in made.status(made.balancers[0][1])["endpoints"]
                if row["endpoint"].endswith(f":{port}") and row["load"]),
                timeout=10, what="the balancers to read the published loads")
            # `cluster status` shows the published loads too
            rows = status_json(mongo_url)["endpoints"]
            published = sorted(r["load"]["sockets"] for r in rows if r["service"] == "echo")
            assert sum(published) >= SOCKETS - 3 * max(2, 0.1 * mean), rows
            direct = Client(-1)
            direct.connect(made.instances["i0"][1])  # i0 may place it elsewhere: no matter
            assert direct.ws is not None and "x-cluster-load" not in direct.headers
            direct.ws.close()
            # a member (here: a trusted address with the hop marker) learns the live count
            member = websocket.create_connection(f"ws://127.0.0.1:{made.instances['i1'][1]}/",
                                                 header=["X-Cluster-Hop: 1"], timeout=10)
            assert member.getheaders()["x-cluster-load"] == str(counts["i1"] + 1)
            member.close()
        finally:
            fleet.close()


@pytest.mark.soak  # 15 s; --rebalance is off by default, its rule unit-tested in CI
def test_a_newcomer_gets_a_share_of_websockets_by_rebalancing(mongo_url):
    rebalance = ("--rebalance", "on", "--rebalance-rate", "20")
    with bed(mongo_url, 3, 3, *rebalance) as made:
        fleet = Fleet([port for _, port in made.balancers])
        try:
            fleet.open(SOCKETS, RATE)
            fleet.poll(3.5)  # nothing moves while the spread is within the margin
            assert fleet.errors == []
            assert all(client.closes == [] for client in fleet.clients)
            made.instance("i3", *rebalance)
            deadline = time.monotonic() + 20  # the configured time, with margin
            while fleet.counts().get("i3", 0) < 0.20 * SOCKETS:
                assert time.monotonic() < deadline, (fleet.counts(), made.outputs())
                fleet.poll(0.5)
            fleet.poll(1.0)  # let the last reconnections land
            counts = fleet.counts()
            assert sum(counts.values()) == SOCKETS, counts
            assert counts["i3"] >= 0.20 * SOCKETS, counts
            assert fleet.errors == [], fleet.errors
            moved = [c for c in fleet.clients if len(c.homes) > 1]
            assert moved
            for client in fleet.clients:
                # a client moved only after a 1001, once per move, and came back
                assert client.closes == [1001] * (len(client.homes) - 1)
                assert client.ws is not None
            # the newcomer was never shed from; the old ones shed
            assert not any("i3" in c.homes[:-1] for c in moved)
        finally:
            fleet.close()


def test_rebalancing_closes_no_socket_pinned_by_the_sticky_cookie(mongo_url):
    """Clients that send the sticky cookie of their instance (browsers whose page came
    from it) would reconnect to it: closing their sockets moves no one. They were
    closed anyway, at the rate, for as long as the imbalance lasted; now only the
    others are, and the instance says once what it could not move."""
    with bed(mongo_url, 1, 1, "--rebalance", "on", "--rebalance-rate", "50") as made:
        fleet = Fleet([port for _, port in made.balancers])
        try:
            pinned = f"cluster-endpoint::echo={made.status(made.instances['i0'][1])['hash']}"
            fleet.open(15, cookie=pinned)
            fleet.open(5)
            assert fleet.counts() == {"i0": 20} and fleet.errors == []
            made.instance("i1", "--rebalance", "on")
            made.wait_seen(2)
            wait_until(lambda: (fleet.poll(0.2), fleet.counts())[1] == {"i0": 15, "i1": 5},
                       timeout=15, what="the five sockets not pinned to move")
            fleet.poll(1.0)  # nothing more moves
            assert fleet.counts() == {"i0": 15, "i1": 5} and fleet.errors == []
            assert all(c.closes == [] for c in fleet.clients[:15])
            assert all(c.closes == [1001] and c.home == "i1" for c in fleet.clients[15:])
            log = made.instances["i0"][0].output()
            assert log.count("the 15 left here are pinned here") == 1, log
        finally:
            fleet.close()


@pytest.mark.soak  # 8 s; the rule is unit-tested in CI (tests/test_placement.py)
def test_rebalancing_stops_when_the_clients_it_closes_keep_their_101s_cookie(sqlite_url):
    """A client whose first request is the upgrade gets the sticky cookie on the 101;
    one that keeps it (a browser) reconnects straight back after a 1001. Rebalancing
    closed every such socket once, moving none (20 closes here); it stops after the
    first few come back."""
    with bed(sqlite_url, 1, 1, "--rebalance", "on") as made:
        fleet = Fleet([port for _, port in made.balancers])
        try:
            fleet.open(20, keep=True)
            assert fleet.counts() == {"i0": 20} and fleet.errors == []
            assert all(c.cookie for c in fleet.clients)
            made.instance("i1", "--rebalance", "on")
            made.wait_seen(2)
            wait_until(lambda: (fleet.poll(0.2), sum(len(c.closes) for c in fleet.clients))[1]
                       >= 2, timeout=15, what="the rebalancer to close sockets")
            fleet.poll(4.0)  # it closed 20 within 2 s at its rate of 10/s
            closes = sum(len(c.closes) for c in fleet.clients)
            log = made.instances["i0"][0].output
            assert fleet.counts() == {"i0": 20} and fleet.errors == []
            assert 2 <= closes <= 5, closes
            assert log().count("rebalancing: ") == 1 and log().count("came straight back") == 1
        finally:
            fleet.close()

