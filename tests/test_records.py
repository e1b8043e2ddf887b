"""Records in the meteorhacks shape and the table built from them."""

from __future__ import annotations

import datetime as dt

import pytest

from cluster.records import (
    MalformedRecord,
    check_record,
    endpoint_hash,
    make_record,
    parse_record,
    shown,
)
from cluster.registry import HOLD_SECONDS, EndpointTable, Writes, parse_documents

NOW = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


def doc(**changes):
    base = {"serviceName": "web", "endpoint": "http://10.0.0.1:3000",
            "endpointHash": endpoint_hash("http://10.0.0.1:3000"), "balancer": None,
            "timestamp": NOW - dt.timedelta(seconds=1), "pingInterval": 5000}
    base.update(changes)
    return base


def test_hash_is_sha1_hex_of_the_endpoint_url():
    import hashlib

    assert endpoint_hash("http://a:1") == hashlib.sha1(b"http://a:1").hexdigest()


def test_make_record_has_the_meteorhacks_fields():
    record = make_record("web", "http://10.0.0.1:3000", "https://b.example.com", 5.0)
    assert record == {"serviceName": "web", "endpoint": "http://10.0.0.1:3000",
                      "endpointHash": endpoint_hash("http://10.0.0.1:3000"),
                      "balancer": "https://b.example.com", "pingInterval": 5000}


def test_parse_record_accepts_extra_fields_and_naive_dates():
    e = parse_record(doc(_id="x", extra=1, timestamp=dt.datetime(2026, 1, 1, 11, 59, 59)))
    assert e.service == "web" and e.ping_interval == 5.0 and e.timestamp.tzinfo is not None


@pytest.mark.parametrize("changes, problem", [
    ({"serviceName": None}, "serviceName"),
    ({"endpoint": "ftp://x"}, "endpoint"),
    ({"endpoint": "not a url"}, "endpoint"),
    ({"timestamp": "yesterday"}, "timestamp"),
    ({"pingInterval": -1}, "pingInterval"),
    ({"pingInterval": True}, "pingInterval"),
])
def test_malformed_records_name_their_problem(changes, problem):
    with pytest.raises(MalformedRecord, match=problem):
        parse_record(doc(**changes))


def test_table_expires_records_older_than_ping_interval_plus_grace():
    fresh = doc(endpoint="http://a:1", timestamp=NOW - dt.timedelta(seconds=5.9))
    stale = doc(endpoint="http://b:1", timestamp=NOW - dt.timedelta(seconds=6.1))
    bad = doc(endpoint="gopher://c")
    endpoints, problems = parse_documents([fresh, stale, bad])
    assert [p[1] for p in problems] == ["endpoint 'gopher://c' is not an http(s) URL"]
    table = EndpointTable.build(NOW, endpoints, grace=1.0)
    assert [e.url for e in table.endpoints] == ["http://a:1"]


def _ago(seconds: float) -> dt.datetime:
    return NOW - dt.timedelta(seconds=seconds)


def test_overdue_records_stay_while_no_write_landed_since_they_were_due():
    """What a watcher sees of a store that takes no writes (ping 5 s, grace 1 s): every
    record overdue, the latest write it saw the last heartbeat before the stall."""
    a = doc(endpoint="http://a:1", timestamp=_ago(6.5))
    b = doc(endpoint="http://b:1", timestamp=_ago(6.2))
    endpoints = parse_documents([a, b])[0]
    stalled = Writes(last=_ago(6.2), since=_ago(3600))
    table = EndpointTable.build(NOW, endpoints, 1.0, writes=stalled)
    assert [e.url for e in table.endpoints] == ["http://a:1", "http://b:1"]
    assert table.held == frozenset(e.hash for e in endpoints)
    # without a watcher's evidence (writes=None) they expire by age, as before
    assert EndpointTable.build(NOW, endpoints, 1.0).endpoints == ()


def test_an_overdue_record_goes_once_writes_landed_after_it_was_due():
    crashed = doc(endpoint="http://a:1", timestamp=_ago(6.5))  # due 6.25 s after it
    live = doc(endpoint="http://b:1", timestamp=_ago(0.1))
    endpoints = parse_documents([crashed, live])[0]
    landing = Writes(last=_ago(0.1), since=_ago(3600))
    table = EndpointTable.build(NOW, endpoints, 1.0, writes=landing)
    assert [e.url for e in table.endpoints] == ["http://b:1"] and not table.held


def test_after_a_stall_an_overdue_record_gets_a_ping_interval_to_land():
    """Writes land again since 2 s (a heartbeat of b): a's retry lands within its own
    ping interval of that, so it stays until 1.25 intervals after, then goes."""
    a = doc(endpoint="http://a:1", timestamp=_ago(20))
    b = doc(endpoint="http://b:1", timestamp=_ago(2))
    endpoints = parse_documents([a, b])[0]
    resumed = Writes(last=_ago(2), since=_ago(2))
    table = EndpointTable.build(NOW, endpoints, 1.0, writes=resumed)
    assert [e.url for e in table.endpoints] == ["http://a:1", "http://b:1"]
    later = NOW + dt.timedelta(seconds=4.3)  # 2 + 4.3 > 1.25 * 5
    table = EndpointTable.build(later, endpoints, 1.0, writes=resumed)
    assert [e.url for e in table.endpoints] == ["http://b:1"]


def test_a_record_is_held_at_most_hold_seconds_past_its_expiry():
    a = doc(endpoint="http://a:1", timestamp=_ago(6 + HOLD_SECONDS - 0.1))
    b = doc(endpoint="http://b:1", timestamp=_ago(6 + HOLD_SECONDS + 0.1))
    endpoints = parse_documents([a, b])[0]
    stalled = Writes(last=_ago(6 + HOLD_SECONDS - 0.1), since=_ago(7200))
    table = EndpointTable.build(NOW, endpoints, 1.0, writes=stalled)
    assert [e.url for e in table.endpoints] == ["http://a:1"]


def test_table_indexes_by_service_hash_and_balancer():
    docs = [doc(endpoint="http://a:1", balancer="https://lb1"),
            doc(endpoint="http://b:1", balancer="https://lb1"),
            doc(endpoint="http://c:1", serviceName="chat")]
    table = EndpointTable.build(NOW, parse_documents(docs)[0], grace=1.0)
    assert table.services() == ("chat", "web")
    assert [e.url for e in table.by_service["web"]] == ["http://a:1", "http://b:1"]
    assert table.balancers == ("https://lb1",)
    assert table.by_hash[endpoint_hash("http://c:1")].service == "chat"
    assert repr(table) == "<EndpointTable [3 endpoints | 2 services | 1 balancers]>"


# --- strict records: what another writer may put in the shared store ---------------

LONG = "http://10.0.0.1:3000/" + "a" * (2 * 1024 * 1024)


@pytest.mark.parametrize("endpoint, problem", [
    ("http://10.0.0.1:70000", "port out of range|not a valid URL"),
    ("http://10.0.0.1:0", "port out of range"),
    ("http://10.0.0.1:", "port out of range"),
    ("http://10.0.0.1:3000\r\nX-Injected: 1", "whitespace, control"),
    ("http://10.0.0.1:3000/\x00", "whitespace, control"),
    ("http://10.0.0.1:3000/\u2028", "non-ASCII"),
    ("http://web 1:3000", "whitespace"),
    (LONG, "longer than 2048"),
    ("http://user:secret@10.0.0.1:3000", "credentials"),
    ("http://@10.0.0.1:3000", "credentials"),
    ("http://10.0.0.1:3000/?x=1", "query or a fragment"),
    ("http://10.0.0.1:3000#top", "query or a fragment"),
    ("http://:3000", "no valid host"),
    ("http://a%0d.example:3000", "no valid host"),
    ("http://[zz::1]:3000", "not a valid URL|no valid host"),
    # DNS labels resolvers refuse (the IDNA codec raised UnicodeError at connect time)
    ("http://a..b:80", "no valid host"),
    ("http://.x:80", "no valid host"),
    ("http://x..:80", "no valid host"),
    (f"http://{'a' * 64}.example:80", "no valid host"),
    (f"http://{'.'.join(['a' * 63] * 4)}:80", "no valid host"),  # 255 chars
    ("javascript://10.0.0.1:3000", "not an http"),
    ("//10.0.0.1:3000", "not an http"),
    (12345, "not a string"),
    (None, "not a string"),
])
def test_endpoint_urls_are_checked_strictly(endpoint, problem):
    with pytest.raises(MalformedRecord, match=problem):
        parse_record(doc(endpoint=endpoint))


@pytest.mark.parametrize("endpoint", [
    "http://10.0.0.1:3000", "https://app.example.com", "http://[::1]:8080/",
    "http://web_1.internal:1", "https://b.example.com:65535/prefix",
    f"http://{'a' * 63}.example:80", "http://app.example.com.:80",
    f"http://{'.'.join(['a' * 63] * 3 + ['a' * 61])}:80",  # 253 chars
])
def test_ordinary_endpoint_urls_are_accepted(endpoint):
    assert parse_record(doc(endpoint=endpoint)).url == endpoint.rstrip("/")


@pytest.mark.parametrize("ping", [99, 3_600_001, 1e15, float("nan"), float("inf"), 0, "5000"])
def test_ping_interval_must_be_between_100ms_and_an_hour(ping):
    with pytest.raises(MalformedRecord, match="pingInterval"):
        parse_record(doc(pingInterval=ping))


@pytest.mark.parametrize("ping", [100, 3_600_000, 2500.5])
def test_ping_interval_bounds_are_inclusive(ping):
    assert parse_record(doc(pingInterval=ping)).ping_interval == ping / 1000


@pytest.mark.parametrize("service", ["web app", "", "a" * 129, "web\n", "wéb", "a/b", 7, None])
def test_service_names_use_a_restricted_set(service):
    with pytest.raises(MalformedRecord, match="serviceName"):
        parse_record(doc(serviceName=service))


@pytest.mark.parametrize("service", ["web", "a" * 128, "api.v2:blue-green_1"])
def test_ordinary_service_names_are_accepted(service):
    assert parse_record(doc(serviceName=service)).service == service


def test_a_heartbeat_far_ahead_of_the_store_clock_is_not_believed():
    with pytest.raises(MalformedRecord, match="ahead of the store"):
        parse_record(doc(timestamp=NOW + dt.timedelta(hours=2)), now=NOW)
    assert parse_record(doc(timestamp=NOW + dt.timedelta(minutes=5)), now=NOW)


@pytest.mark.parametrize("balancer", ["nope", "http://lb:99999", "http://u:p@lb", "http://l b"])
def test_a_bad_balancer_is_dropped_and_the_endpoint_kept(balancer):
    endpoint, problem = check_record(doc(balancer=balancer))
    assert endpoint.url == "http://10.0.0.1:3000" and endpoint.balancer is None
    assert problem is not None and problem.startswith("balancer ")
    assert problem.endswith("balancer ignored, endpoint kept")


def test_empty_balancer_means_none_without_a_problem():
    assert check_record(doc(balancer="")) == (parse_record(doc()), None)


def test_problem_texts_are_escaped_and_truncated():
    _, problems = parse_documents([doc(endpoint=LONG + "\r\n"),
                                   doc(endpoint="http://x:1\r\nForged: line", _id="id\n1")])
    assert len(problems) == 2
    for identity, problem in problems:
        for text in (identity, problem):
            assert "\r" not in text and "\n" not in text and len(text) < 400, text
    assert "\\r\\n" in problems[1][1] and problems[1][0] == "'id\\n1'"


def test_shown_keeps_long_values_apart():
    a, b = shown("x" * 500 + "a"), shown("x" * 500 + "b")
    assert a != b and len(a) < 260 and "(503 chars, sha1 " in a
    assert shown("ok") == "'ok'"


def test_balancers_serve_only_their_own_service():
    docs = [doc(endpoint="http://a:1", balancer="https://lb-web"),
            doc(endpoint="http://c:1", serviceName="evil", balancer="https://evil.example")]
    table = EndpointTable.build(NOW, parse_documents(docs)[0], grace=1.0)
    assert table.balancers_by_service == {"web": ("https://lb-web",),
                                          "evil": ("https://evil.example",)}
    assert set(table.balancers) == {"https://lb-web", "https://evil.example"}


def test_credentials_never_reach_a_problem_text():
    endpoint = "http://admin:hunter2@10.0.0.1:3000"
    _, problems = parse_documents([doc(endpoint=endpoint), doc(endpoint=endpoint, _id="x",
                                                               balancer="https://u:pw@lb")])
    assert len(problems) == 2
    for identity, problem in problems:
        assert "hunter2" not in identity + problem and "pw@" not in identity + problem
    assert "//***@10.0.0.1:3000" in problems[0][0]
