"""Placement by load, without sockets: routing.place(), the balancer's load view
(cluster.placement), the published load (cluster.load) and the rebalancer's rule."""

from __future__ import annotations

import datetime as dt
import random
import statistics
from collections import Counter

import pytest

from cluster.load import Load, LocalLoad, moved, parse_load
from cluster.placement import Placement, load_field
from cluster.rebalance import Rebalancer, shed_target
from cluster.records import LOAD_IGNORED, Endpoint, check_record, endpoint_hash, make_record
from cluster.registry import EndpointTable, parse_documents
from cluster.routing import Policy, Proxy, RequestView, Serve, cookie_name, place, route

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
SELF = "http://10.0.0.1:3000"


def ep(url: str, load: Load | None = None, stamp: dt.datetime = NOW,
       service: str = "web") -> Endpoint:
    return Endpoint(service, url, endpoint_hash(url), None, stamp, 5.0, load=load)


def table(*endpoints: Endpoint) -> EndpointTable:
    return EndpointTable.build(NOW, endpoints, grace=1.0)


A, B, C = (ep(f"http://10.0.0.{n}:3000") for n in (2, 3, 4))
ME = ep(SELF)
POLICY = Policy(service="web", ui_service="web", self_hash=ME.hash)


def seq(*values: float):
    """random() returning ``values`` in order."""
    it = iter(values)
    return lambda: next(it)


# --- place(): the power of two choices ------------------------------------------------


def test_the_less_loaded_of_the_two_drawn_wins():
    loads = {A.hash: 5.0, B.hash: 1.0, C.hash: 9.0}
    # draws A (0.0 -> index 0), then among B, C: 0.0 -> B
    assert place([A, B, C], None, 0.0, seq(0.0, 0.0), loads.__getitem__) == 1
    # draws C, then A: A is less loaded
    assert place([A, B, C], None, 0.0, seq(0.99, 0.0), loads.__getitem__) == 0


def test_a_tie_goes_to_the_first_drawn():
    loads = dict.fromkeys((A.hash, B.hash), 3.0)
    assert place([A, B], None, 0.0, seq(0.6, 0.0), loads.__getitem__) == 1
    assert place([A, B], None, 0.0, seq(0.0, 0.0), loads.__getitem__) == 0


def test_the_most_loaded_of_three_is_never_chosen():
    loads = {A.hash: 1.0, B.hash: 2.0, C.hash: 3.0}
    rand = random.Random(1).random
    chosen = Counter(place([A, B, C], None, 0.0, rand, loads.__getitem__) for _ in range(3000))
    assert chosen[2] == 0 and chosen[0] > chosen[1] > 0


def test_two_draws_are_always_different_candidates():
    seen = []

    def load(h: str) -> float:
        seen.append(h)
        return 0.0

    rand = random.Random(2).random
    for _ in range(500):
        seen.clear()
        place([A, B], ME.hash, 1.0, rand, load)
        assert len(set(seen)) == 2


def test_this_instance_is_a_candidate_by_its_weight():
    # self weight 0: never drawn, whatever its load
    zero = Counter(place([A, B], ME.hash, 0.0, random.Random(3).random,
                         {ME.hash: 0.0, A.hash: 9.0, B.hash: 9.0}.__getitem__)
                   for _ in range(500))
    assert zero[-1] == 0
    # only this instance live: it is chosen with or without load
    assert place([], ME.hash, 1.0, seq(0.5), lambda h: 100.0) == -1
    assert place([], ME.hash, 1.0, seq(0.5)) == -1


def test_load_is_compared_per_unit_of_weight():
    # this instance weighs 0.5: at 4 sessions it is as loaded as another at 8
    loads = {ME.hash: 4.0, A.hash: 7.0}
    assert place([A], ME.hash, 0.5, seq(0.0, 0.0), loads.__getitem__) == 0
    loads[A.hash] = 9.0
    assert place([A], ME.hash, 0.5, seq(0.0, 0.0), loads.__getitem__) == -1


def test_without_load_the_draw_is_uniform_by_weight():
    grid = iter([i / 300 for i in range(300)])
    counts = Counter(place([A, B], ME.hash, 1.0, lambda: next(grid)) for _ in range(300))
    assert counts == {-1: 100, 0: 100, 1: 100}


def simulate(n: int, instances: int, by_load: bool, seed: int) -> list[int]:
    """Place ``n`` sessions one after the other, each seeing the current counts."""
    endpoints = [ep(f"http://10.0.1.{i}:3000") for i in range(instances)]
    counts = {e.hash: 0 for e in endpoints}
    rand = random.Random(seed).random
    for _ in range(n):
        index = place(endpoints, None, 0.0, rand, counts.__getitem__ if by_load else None)
        counts[endpoints[index].hash] += 1
    return list(counts.values())


def test_placement_by_load_spreads_far_evener_than_random():
    for seed in range(20):
        by_load = simulate(300, 3, True, seed)
        assert max(by_load) - min(by_load) <= 4, by_load
    spreads = [statistics.pstdev(simulate(300, 3, False, seed)) for seed in range(20)]
    assert statistics.mean(spreads) > 4  # binomial: about 6.7


# --- route() -----------------------------------------------------------------------------


def test_route_places_a_new_session_by_load_and_sets_the_cookie():
    tbl = table(ME, A, B)
    loads = {ME.hash: 50.0, A.hash: 40.0, B.hash: 2.0}
    decision = route(RequestView(), tbl, POLICY, rand=seq(0.0, 0.99), load=loads.__getitem__)
    # drew this instance, then B: B is less loaded
    assert isinstance(decision, Proxy) and decision.endpoint == B
    assert decision.set_cookie == (cookie_name("web"), B.hash)


def test_a_sticky_cookie_wins_over_load():
    tbl = table(ME, A, B)
    loads = {ME.hash: 0.0, A.hash: 1000.0, B.hash: 0.0}
    request = RequestView(cookie_header=f"{cookie_name('web')}={A.hash}")
    decision = route(request, tbl, POLICY, load=loads.__getitem__)
    assert isinstance(decision, Proxy) and decision.endpoint == A and decision.set_cookie is None


def test_excluded_and_ejected_endpoints_are_not_placed_on():
    tbl = table(ME, A, B)
    loads = {ME.hash: 9.0, A.hash: 0.0, B.hash: 5.0}
    for _ in range(50):
        decision = route(RequestView(), tbl, POLICY, frozenset({A.hash}),
                         load=loads.__getitem__)
        assert not (isinstance(decision, Proxy) and decision.endpoint == A)
        decision = route(RequestView(), tbl, POLICY, ejected=frozenset({A.hash}),
                         load=loads.__getitem__)
        assert not (isinstance(decision, Proxy) and decision.endpoint == A)


def test_local_serving_by_load():
    tbl = table(ME, A)
    loads = {ME.hash: 0.0, A.hash: 10.0}
    decision = route(RequestView(), tbl, POLICY, rand=seq(0.9, 0.0), load=loads.__getitem__)
    assert isinstance(decision, Serve) and decision.set_cookie == (cookie_name("web"), ME.hash)


# --- the balancer's load view ---------------------------------------------------------


def test_scores_are_the_record_plus_what_was_placed_since():
    tbl = table(ep(A.url, Load(10, 1)), ep(B.url, Load(4, 0)))
    view = Placement(None, None, read_at=lambda: 100.0, lag=0.5)
    scores = view.scores(tbl)
    assert scores(A.hash) == 11.0 and scores(B.hash) == 4.0
    for _ in range(3):
        view.placed(B.hash, now=101.0)
    assert view.scores(tbl)(B.hash) == 7.0


def test_a_newer_record_takes_over_the_sessions_placed_before_it():
    read = [90.0]
    view = Placement(None, None, read_at=lambda: read[0], lag=0.5)
    assert view.scores(table(ep(A.url, Load(4))))(A.hash) == 4.0
    view.placed(A.hash, now=98.0)  # before the next record was written: in it
    view.placed(A.hash, now=99.8)  # maybe not: still counted
    read[0] = 100.0  # the next record is read at 100 (written after 99.4)
    newer = table(ep(A.url, Load(6), stamp=NOW + dt.timedelta(seconds=1)))
    assert view.scores(newer)(A.hash) == 7.0


def test_a_live_figure_from_a_101_replaces_an_older_record():
    view = Placement(None, None, read_at=lambda: 100.0, lag=0.5)
    tbl = table(ep(A.url, Load(4)))
    view.scores(tbl)
    view.placed(A.hash, now=101.0)
    view.heard(A.hash, 30.0, now=101.1)  # the endpoint counts this session too
    view.placed(A.hash, now=101.2)
    assert view.scores(tbl)(A.hash) == 31.0


def test_an_unknown_load_counts_as_the_mean_of_the_known():
    tbl = table(ep(A.url, Load(10)), ep(B.url, Load(20)), C)
    assert Placement(None, None).scores(tbl)(C.hash) == 15.0


def test_this_instance_is_scored_by_its_live_figure():
    tbl = table(ep(SELF, Load(100)), ep(A.url, Load(5)))
    view = Placement(ME.hash, lambda: Load(3, 1))
    view.placed(ME.hash)  # not counted twice: the live figure has it
    assert view.scores(tbl)(ME.hash) == 4.0


def test_endpoints_that_left_are_forgotten():
    view = Placement(None, None)
    view.scores(table(ep(A.url, Load(1))))
    view.placed(A.hash)
    view.scores(table(ep(B.url, Load(1))))
    assert A.hash not in view.opened and A.hash not in view.figures


# --- the published load -------------------------------------------------------------


def test_load_round_trips_through_the_record():
    record = make_record("web", A.url, None, 5.0, load=Load(12, 3, 4.5))
    assert record["load"] == {"sockets": 12, "inflight": 3, "serviceMs": 4.5}
    endpoint, problem = check_record({**record, "timestamp": NOW})
    assert problem is None and endpoint.load == Load(12, 3, 4.5)
    assert "load" not in make_record("web", A.url, None, 5.0)


@pytest.mark.parametrize("bad", ["12", [1], {"sockets": -1}, {"sockets": "3"},
                                 {"inflight": True}, {"serviceMs": float("nan")},
                                 {"sockets": 1e12}])
def test_a_bad_load_is_a_warning_and_the_endpoint_is_kept(bad):
    doc = {**make_record("web", A.url, None, 5.0), "timestamp": NOW, "load": bad}
    endpoints, problems = parse_documents([doc])
    assert [e.url for e in endpoints] == [A.url] and endpoints[0].load is None
    assert len(problems) == 1 and problems[0][1].endswith(LOAD_IGNORED)


def test_extra_and_missing_load_figures_are_lenient():
    assert parse_load({"sockets": 3, "other": "x"}) == Load(3, 0, 0.0)


def test_a_load_is_republished_only_when_it_moved_materially():
    assert moved(None, Load())
    assert not moved(Load(10), Load(11))  # 1 socket
    assert moved(Load(10), Load(12))  # 2 sockets, 20 %
    assert not moved(Load(100), Load(109))  # 9 %
    assert moved(Load(100), Load(90))
    assert not moved(Load(0, 0, 10.0), Load(0, 0, 12.0))
    assert moved(Load(0, 0, 10.0), Load(0, 0, 13.0))


def test_local_load_counts_requests_sockets_and_service_time():
    local = LocalLoad()
    began = local.started()
    assert local.current() == Load(0, 1, 0.0)
    local.websockets[object()] = False
    local.started()
    assert local.current().sockets == 1 and local.current().inflight == 1
    local.finished(began, websocket=False)
    assert local.current().service_ms >= 0.0 and local.requests == 1


# --- the rebalancer's rule ----------------------------------------------------------------


def test_shedding_starts_above_the_margin_and_aims_at_the_mean():
    assert shed_target(100, [100, 100, 0], 1.25) == 75
    assert shed_target(90, [100, 100, 0], 1.25) is None  # 90 < 1.25 * 72.5
    assert shed_target(100, [90, 95], 1.25) is None
    assert shed_target(5, [], 1.25) is None
    assert shed_target(2, [0, 0], 1.25) == 1


class _Socket:
    def __init__(self, log: list[int], number: int) -> None:
        self.log, self.number = log, number

    def going_away(self) -> None:
        self.log.append(self.number)


class _Node:
    def __init__(self, tbl: EndpointTable) -> None:
        self.table = tbl


def over_the_mean(local: LocalLoad, rate: float) -> Rebalancer:
    """A rebalancer of this instance, published at 100 WebSockets, with two peers at 100
    and a newcomer at 0 (the mean: 75), its live sockets in ``local``."""
    peers = [ep(f"http://10.0.2.{i}:3000", Load(100)) for i in range(2)]
    tbl = table(ep(SELF, Load(100)), *peers, ep("http://10.0.2.9:3000", Load(0)))
    return Rebalancer(_Node(tbl), "web", ME.hash, local, margin=1.25, rate=rate, settle=2.0)


def test_the_rebalancer_closes_the_oldest_at_its_rate_after_settling(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("cluster.rebalance.time.monotonic", lambda: clock[0])
    closed: list[int] = []
    local = LocalLoad()
    for n in range(100):
        local.websockets[_Socket(closed, n)] = False  # none pinned here by a cookie
    rebalancer = over_the_mean(local, rate=10.0)
    assert rebalancer.step() == 0  # the imbalance must last
    clock[0] += 1.0
    assert rebalancer.step() == 0
    clock[0] += 1.5
    assert rebalancer.step() == 0 and rebalancer.target == 75  # starts now
    clock[0] += 1.0
    assert rebalancer.step() == 10  # one second at 10/s
    assert closed == list(range(10))  # oldest first
    for _ in range(5):
        clock[0] += 1.0
        rebalancer.step()
    assert len(local.websockets) == 75 and closed == list(range(25))
    assert rebalancer.target is None
    for _ in range(10):  # down to the mean: nothing more closes
        clock[0] += 1.0
        assert rebalancer.step() == 0
    assert closed == list(range(25))


def test_the_rebalancer_never_closes_sockets_pinned_here_and_says_so_once(monkeypatch, caplog):
    """A socket whose client's sticky cookie names this instance would reconnect here:
    closing it moves no one. Those were closed at the rate for as long as the imbalance
    lasted (for ever: they all came back), a disconnect every few seconds per client."""
    clock = [1000.0]
    monkeypatch.setattr("cluster.rebalance.time.monotonic", lambda: clock[0])
    closed: list[int] = []
    local = LocalLoad()
    for n in range(100):
        local.websockets[_Socket(closed, n)] = n % 10 != 0  # 10 of them not pinned
    rebalancer = over_the_mean(local, rate=10.0)
    caplog.set_level("INFO", logger="cluster.rebalance")
    for _ in range(30):
        rebalancer.step()
        clock[0] += 1.0
    assert sorted(closed) == list(range(0, 100, 10)), "only the ten not pinned"
    assert len(local.websockets) == 90 and all(local.websockets.values())
    said = [r.getMessage() for r in caplog.records]
    assert sum("pinned" in line for line in said) == 1, said
    assert "the 90 left here are pinned" in said[-1], said

    # an imbalance of pinned sockets only: nothing closes, one line
    caplog.clear()
    fresh = over_the_mean(local, rate=10.0)
    for _ in range(30):
        assert fresh.step() == 0
        clock[0] += 1.0
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "every one is pinned here" in said[0], said
    assert len(closed) == 10


class _Returning(_Socket):
    """A client that keeps cookies: closed, it reconnects here with the cookie its first
    101 set, pinned (as the door counts it)."""

    def __init__(self, log: list[int], number: int, local: LocalLoad) -> None:
        super().__init__(log, number)
        self.local = local

    def going_away(self) -> None:
        super().going_away()
        self.local.websockets[_Socket(self.log, -1)] = True
        self.local.pinned_opened += 1


def test_the_rebalancer_stops_when_the_clients_it_closes_come_straight_back(
        monkeypatch, caplog):
    """A new session's first socket is not pinned, but its 101 set the sticky cookie:
    clients that keep cookies came back here pinned, and the episode went on until
    every socket here had been closed once (a disconnect per client, none moved). It
    stops once half the closed ones have come back, and starts no more while the
    imbalance lasts; clients that ignore the cookie are still moved."""
    clock = [1000.0]
    monkeypatch.setattr("cluster.rebalance.time.monotonic", lambda: clock[0])
    closed: list[int] = []
    local = LocalLoad()
    for n in range(100):
        local.websockets[_Returning(closed, n, local)] = False
    rebalancer = over_the_mean(local, rate=4.0)
    caplog.set_level("INFO", logger="cluster.rebalance")
    for _ in range(60):
        rebalancer.step()
        clock[0] += 0.25
    assert len([n for n in closed if n >= 0]) == 2, closed  # one tick's worth, no more
    assert len(local.websockets) == 100
    said = [r.getMessage() for r in caplog.records]
    assert sum("came straight back" in line for line in said) == 1, said

    # in balance again, then a new imbalance: a new episode (and sockets whose
    # clients ignore the cookie are moved as ever)
    unbalanced = rebalancer.node
    peers = [ep(f"http://10.0.2.{i}:3000", Load(100)) for i in range(3)]
    rebalancer.node = _Node(table(ep(SELF, Load(100)), *peers))
    rebalancer.step()
    rebalancer.node = unbalanced
    ignoring = [_Socket(closed, 1000 + n) for n in range(100)]
    local.websockets = {s: False for s in ignoring}
    for _ in range(60):
        rebalancer.step()
        clock[0] += 0.25
    assert [n for n in closed if n >= 1000] == list(range(1000, 1025)), closed


def test_new_pinned_sessions_at_a_steady_pace_do_not_stop_an_episode(monkeypatch):
    """Browsers whose page came from here open their sockets pinned all the time: at
    the pace they came before the episode they are no sign that the clients it closes
    come back, and the ones that ignore the cookie are moved."""
    clock = [1000.0]
    monkeypatch.setattr("cluster.rebalance.time.monotonic", lambda: clock[0])
    closed: list[int] = []
    local = LocalLoad()
    for n in range(100):
        local.websockets[_Socket(closed, n)] = False  # their clients ignore the cookie
    rebalancer = over_the_mean(local, rate=4.0)
    for _ in range(60):
        local.pinned_opened += 1  # a new pinned session every tick: 4/s, as fast as it closes
        rebalancer.step()
        clock[0] += 0.25
    assert closed == list(range(25))


# --- the settings -----------------------------------------------------------------------


def test_placement_settings_from_flags_environment_and_file(tmp_path):
    from cluster.config import Settings, parse_command_line

    assert (Settings().placement, Settings().rebalance) == ("load", False)
    assert (Settings().rebalance_margin, Settings().rebalance_rate) == (1.25, 10.0)
    s = Settings.load(env={"CLUSTER_PLACEMENT": "random", "CLUSTER_REBALANCE": "on",
                           "CLUSTER_REBALANCE_MARGIN": "1.5", "CLUSTER_REBALANCE_RATE": "3"})
    assert (s.placement, s.rebalance, s.rebalance_margin, s.rebalance_rate) == \
        ("random", True, 1.5, 3.0)
    conf = tmp_path / "c.conf"
    conf.write_text("placement = random\nrebalance = yes\n")
    _, s, _ = parse_command_line(["serve", "-c", str(conf), "--rebalance", "off"])
    assert (s.placement, s.rebalance) == ("random", False)


@pytest.mark.parametrize("flag, value", [
    ("--placement", "leastconn"), ("--rebalance", "maybe"), ("--rebalance-margin", "1"),
    ("--rebalance-margin", "nan"), ("--rebalance-rate", "0"), ("--rebalance-rate", "-2"),
])
def test_bad_placement_settings_are_one_line_errors(flag, value):
    import subprocess
    import sys

    from helpers import ROOT

    result = subprocess.run([sys.executable, "-m", "cluster", "serve", flag, value],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and flag in lines[0], result.stderr


def test_cluster_status_table_shows_the_load():
    from cluster.cli import table_lines

    row = {"service": "web", "endpoint": A.url, "hash": A.hash, "balancer": None,
           "age": 0.5, "healthy": True, "draining": False, "version": ""}
    data = {"store": "s", "endpoints": [dict(row, load={"sockets": 12, "inflight": 1,
                                                       "serviceMs": 3.25}),
                                        dict(row, load=None)],
            "balancers": [], "malformed": []}
    lines = table_lines(data)
    assert lines[1].split()[-1] == "LOAD"
    assert lines[2].endswith("live   12 ws, 1 req, 3.2 ms") and lines[3].endswith("live   -")


@pytest.mark.parametrize("head, figure, left", [
    (b"HTTP/1.1 101 Switching\r\nX-Cluster-Load: 12\r\nUpgrade: websocket",
     12.0, b"HTTP/1.1 101 Switching\r\nUpgrade: websocket"),
    (b"HTTP/1.1 101 Switching\r\nx-cluster-load: 7", 7.0, b"HTTP/1.1 101 Switching"),
    (b"HTTP/1.1 101 Switching\r\nX-CLUSTER-LOAD: many\r\nX-Cluster-Load: 3\r\nA: b",
     3.0, b"HTTP/1.1 101 Switching\r\nA: b"),
    (b"HTTP/1.1 101 Switching\r\nUpgrade: websocket", None,
     b"HTTP/1.1 101 Switching\r\nUpgrade: websocket"),
])
def test_the_load_field_of_a_101_is_read_and_never_passed_on(head, figure, left):
    """In any case and however often it comes: a proxy between may change a name's
    case, and what is left would reach the client."""
    assert load_field(head) == (figure, left)
