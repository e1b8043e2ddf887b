"""The candidate filter before the pick: draining endpoints and app versions, no sockets."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
from collections import Counter

import pytest

from cluster import versions
from cluster.records import Endpoint, endpoint_hash
from cluster.registry import EndpointTable
from cluster.routing import (
    VERSION_COOKIE_PREFIX,
    Member,
    Policy,
    Proxy,
    Reply,
    RequestView,
    Serve,
    SockJSInfo,
    candidates,
    cookie_name,
    route,
)

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
SELF = "http://10.0.0.1:3000"
VCOOKIE = VERSION_COOKIE_PREFIX + "web"


def ep(url: str, version: str = "", draining: bool = False) -> Endpoint:
    return Endpoint("web", url, endpoint_hash(url), None, NOW, 5.0, draining=draining,
                    version=version)


def table(*endpoints: Endpoint) -> EndpointTable:
    return EndpointTable.build(NOW, endpoints, grace=1.0)


def grid(n: int):
    points = itertools.cycle([i / n for i in range(n)])
    return lambda: next(points)


def cookies(endpoint: str | None = None, version: str | None = None) -> str:
    parts = []
    if endpoint is not None:
        parts.append(f"{cookie_name('web')}={endpoint}")
    if version is not None:
        parts.append(f"{VCOOKIE}={version}")
    return "; ".join(parts)


def where(decision: object) -> str:
    if isinstance(decision, Serve):
        return "self"
    assert isinstance(decision, Proxy), decision
    return decision.endpoint.url


OLD1, OLD2 = ep("http://10.0.0.2:3000", "1.2.0"), ep("http://10.0.0.3:3000", "1.2.0")
NEW = ep("http://10.0.0.4:3000", "1.3.0")
BALANCER = Policy(ui_service="web", has_local_app=False)


def spread(tbl: EndpointTable, policy: Policy = BALANCER, n: int = 300,
           cookie: str = "") -> Counter[str]:
    rand = grid(n)
    return Counter(where(route(RequestView(cookie_header=cookie), tbl, policy, rand=rand))
                   for _ in range(n))


# --- draining ------------------------------------------------------------------------


def test_new_sessions_never_go_to_a_draining_endpoint():
    drained = dataclasses.replace(OLD2, draining=True)
    assert spread(table(OLD1, drained)) == {OLD1.url: 300}


def test_a_session_on_a_draining_endpoint_stays_there():
    drained = dataclasses.replace(OLD2, draining=True)
    request = RequestView(cookie_header=cookies(drained.hash))
    for point in (0.0, 0.5, 0.99):
        d = route(request, table(OLD1, drained), BALANCER, rand=lambda p=point: p)
        assert isinstance(d, Proxy) and d.endpoint == drained and d.set_cookie is None


def test_when_every_endpoint_drains_they_still_serve():
    a, b = (dataclasses.replace(e, draining=True) for e in (OLD1, OLD2))
    assert set(spread(table(a, b))) == {a.url, b.url}


def test_a_draining_instance_leaves_itself_out_before_its_record_says_so():
    me = ep(SELF, "1.2.0")
    policy = Policy(service="web", ui_service="web", self_hash=me.hash, draining=True)
    assert spread(table(me, OLD1), policy) == {OLD1.url: 300}
    # ...but its own sessions are still its own
    d = route(RequestView(cookie_header=cookies(me.hash)), table(me, OLD1), policy)
    assert isinstance(d, Serve)


def test_a_draining_endpoint_is_ejected_last():
    """Draining but alive beats ejected: the filter runs over what is not ejected."""
    drained = dataclasses.replace(OLD2, draining=True)
    d = route(RequestView(), table(OLD1, drained), BALANCER, ejected=frozenset({OLD1.hash}))
    assert isinstance(d, Proxy) and d.endpoint == drained


# --- versions: sessions keep theirs ----------------------------------------------------


def test_new_sessions_go_to_the_newest_version():
    counts = spread(table(OLD1, OLD2, NEW))
    assert counts == {NEW.url: 300}


def test_a_session_keeps_its_endpoint_while_it_lives():
    request = RequestView(cookie_header=cookies(OLD1.hash, "1.2.0"))
    d = route(request, table(OLD1, OLD2, NEW), BALANCER)
    assert isinstance(d, Proxy) and d.endpoint == OLD1
    assert d.set_cookie is None and d.set_version is None


def test_a_session_whose_endpoint_is_gone_keeps_its_version():
    request = RequestView(cookie_header=cookies(endpoint_hash("http://gone:1"), "1.2.0"))
    for point in (0.0, 0.5, 0.99):
        d = route(request, table(OLD1, NEW), BALANCER, rand=lambda p=point: p)
        assert isinstance(d, Proxy) and d.endpoint == OLD1
        assert d.set_cookie == (cookie_name("web"), OLD1.hash)
        assert d.set_version is None  # unchanged


def test_a_session_moves_to_the_newest_once_its_version_has_no_live_endpoint():
    request = RequestView(cookie_header=cookies(OLD1.hash, "1.2.0"))
    d = route(request, table(NEW, dataclasses.replace(OLD2, draining=True)), BALANCER)
    assert isinstance(d, Proxy) and d.endpoint == NEW
    assert d.set_version == (VCOOKIE, "1.3.0")


def test_an_endpoint_restarted_with_another_version_is_not_the_session_s_endpoint():
    """Same URL (same hash), new version: that is a new process; the session keeps its
    version on another endpoint rather than moving to new code."""
    restarted = dataclasses.replace(OLD1, version="1.3.0")
    request = RequestView(cookie_header=cookies(OLD1.hash, "1.2.0"))
    d = route(request, table(restarted, OLD2), BALANCER, rand=lambda: 0.0)
    assert isinstance(d, Proxy) and d.endpoint == OLD2


def test_a_meteorhacks_cookie_without_a_version_follows_its_endpoint_and_learns_it():
    request = RequestView(cookie_header=cookies(OLD2.hash))
    d = route(request, table(OLD1, OLD2, NEW), BALANCER)
    assert isinstance(d, Proxy) and d.endpoint == OLD2
    assert d.set_cookie is None and d.set_version == (VCOOKIE, "1.2.0")


def test_the_first_response_sets_both_cookies_and_the_endpoint_cookie_stays_a_hash():
    d = route(RequestView(), table(OLD1, NEW), BALANCER)
    assert isinstance(d, Proxy)
    assert d.set_cookie == (cookie_name("web"), NEW.hash)
    assert d.set_version == (VCOOKIE, "1.3.0")


def test_unversioned_clusters_set_no_version_cookie():
    a, b = ep("http://10.0.0.2:3000"), ep("http://10.0.0.3:3000")
    d = route(RequestView(), table(a, b), BALANCER)
    assert isinstance(d, Proxy) and d.set_version is None


def test_unversioned_endpoints_are_older_than_any_version():
    plain = ep("http://10.0.0.9:3000")
    assert spread(table(plain, OLD1)) == {OLD1.url: 300}


def test_this_instance_as_a_candidate_uses_its_own_version_before_its_record_lands():
    policy = Policy(service="web", ui_service="web", self_hash=endpoint_hash(SELF),
                    app_version="1.3.0")
    counts = spread(table(OLD1, OLD2), policy)
    assert counts == {"self": 300}
    d = route(RequestView(), table(OLD1), policy)
    assert isinstance(d, Serve) and d.set_version == (VCOOKIE, "1.3.0")


def test_sockjs_info_keeps_the_session_version():
    policy = dataclasses.replace(BALANCER, public_services=frozenset({"web"}))
    request = RequestView(path="/sockjs/info", cookie_header=cookies(version="1.2.0"))
    d = route(request, table(OLD1, NEW), policy)
    assert isinstance(d, SockJSInfo) and d.endpoint == OLD1


def test_no_endpoint_at_all_is_still_a_503():
    assert isinstance(route(RequestView(cookie_header=cookies(version="1.2.0")), table(),
                            BALANCER), Reply)


# --- versions: canary weights and order -------------------------------------------------


def test_canary_weights_split_new_sessions():
    policy = dataclasses.replace(BALANCER, version_weights=(("1.2.0", 90.0), ("1.3.0", 10.0)))
    counts = spread(table(OLD1, OLD2, NEW), policy, n=1000)
    assert counts[NEW.url] == 100
    assert counts[OLD1.url] + counts[OLD2.url] == 900


def test_canary_weights_of_versions_without_endpoints_do_not_count():
    policy = dataclasses.replace(BALANCER, version_weights=(("1.2.0", 90.0), ("9.9", 10.0)))
    assert set(spread(table(OLD1, NEW), policy)) == {OLD1.url}
    only_missing = dataclasses.replace(BALANCER, version_weights=(("9.9", 1.0),))
    assert set(spread(table(OLD1, NEW), only_missing)) == {NEW.url}  # the newest then


def test_canary_weights_leave_existing_sessions_alone():
    policy = dataclasses.replace(BALANCER, version_weights=(("1.2.0", 0.0), ("1.3.0", 1.0)))
    request = RequestView(cookie_header=cookies(endpoint_hash("http://gone:1"), "1.2.0"))
    assert where(route(request, table(OLD1, NEW), policy)) == OLD1.url


def test_version_order_setting_overrides_the_version_sort():
    policy = dataclasses.replace(BALANCER, version_order=("1.3.0", "1.2.0"))
    assert spread(table(OLD1, NEW), policy) == {OLD1.url: 300}


@pytest.mark.parametrize("older, newer", [
    ("1.9.2", "1.10.0"), ("1.3.0-rc1", "1.3.0"), ("1.3.0", "1.3.0+build7"),
    ("v1.2", "v1.3"), ("abc123", "0.1"), ("", "0.0.1"), ("1.3.0-rc2", "1.3.0-rc10"),
])
def test_version_sort(older, newer):
    assert versions.newest([older, newer]) == newer
    assert versions.newest([newer, older]) == newer


def test_candidates_directly():
    found = {h: Member(h, v, d) for h, v, d in
             [("a", "1", False), ("b", "1", True), ("c", "2", False), ("d", "2", True)]}
    policy = Policy()
    assert candidates(found, frozenset(), "", policy, lambda: 0.0) == {"c"}
    assert candidates(found, frozenset(), "1", policy, lambda: 0.0) == {"a"}
    assert candidates(found, frozenset({"a"}), "1", policy, lambda: 0.0) == {"c"}
    assert candidates(found, frozenset({"a", "c"}), "1", policy, lambda: 0.0) == {"d"}
    assert candidates(found, frozenset("abcd"), "", policy, lambda: 0.0) == frozenset()


def test_a_new_table_is_read_afresh_by_the_same_policy():
    """The per-table memo never answers for another table or another policy."""
    assert spread(table(OLD1, OLD2)) == {OLD1.url: 150, OLD2.url: 150}
    assert spread(table(OLD1, dataclasses.replace(OLD2, draining=True))) == {OLD1.url: 300}
    drained_self = Policy(service="web", ui_service="web", self_hash=OLD1.hash, draining=True)
    live_self = dataclasses.replace(drained_self, draining=False)
    same = table(OLD1, OLD2)
    assert spread(same, drained_self) == {OLD2.url: 300}
    assert spread(same, live_self) == {"self": 150, OLD2.url: 150}


from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_VERSIONS = st.sampled_from(["", "1.2.0", "1.3.0", "2.0"])


@given(st.lists(st.tuples(_VERSIONS, st.booleans()), min_size=1, max_size=6),
       st.sampled_from(["", "1.2.0", "1.3.0", "9"]), st.integers(0, 7),
       st.floats(0, 0.999))
def test_properties_of_the_pick(shape, session_version, cookie_index, point):
    """Whatever the table: never a draining endpoint for a new pick while another is
    usable; a session keeps its live endpoint; a session whose endpoint is gone stays
    on its version while that version has a live, non-draining endpoint."""
    endpoints = [ep(f"http://10.0.1.{i}:3000", v, d) for i, (v, d) in enumerate(shape)]
    tbl = table(*endpoints)
    sticky = endpoints[cookie_index] if cookie_index < len(endpoints) else None
    cookie = cookies(sticky.hash if sticky else endpoint_hash("http://gone:1"),
                     session_version or None)
    d = route(RequestView(cookie_header=cookie), tbl, BALANCER, rand=lambda: point)
    assert isinstance(d, Proxy)
    if sticky is not None and (not session_version or sticky.version == session_version):
        assert d.endpoint == sticky
        return
    if any(not e.draining for e in endpoints):
        assert not d.endpoint.draining
    if session_version and any(e.version == session_version and not e.draining
                               for e in endpoints):
        assert d.endpoint.version == session_version
    else:  # a new session, or one whose version has no live endpoint left
        newest = versions.newest({e.version for e in endpoints if not e.draining}
                                 or {e.version for e in endpoints})
        assert d.endpoint.version == newest
