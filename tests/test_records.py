"""Records in the meteorhacks shape and the table built from them."""

from __future__ import annotations

import datetime as dt

import pytest

from cluster.records import MalformedRecord, endpoint_hash, make_record, parse_record
from cluster.registry import EndpointTable, parse_documents

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
    ({"balancer": "nope"}, "balancer"),
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
