"""The fields our instances add to meteorhacks' record: draining and appVersion."""

from __future__ import annotations

import datetime as dt
import logging

import pytest

from cluster.records import check_record, endpoint_hash, make_record
from cluster.registry import EndpointTable, Watcher, parse_documents
from test_records import NOW, doc


def test_an_unused_drain_and_version_leave_the_record_exactly_meteorhacks():
    record = make_record("web", "http://10.0.0.1:3000", None, 5.0)
    assert set(record) == {"serviceName", "endpoint", "endpointHash", "balancer",
                           "pingInterval"}


def test_draining_and_version_are_written_and_read_back():
    record = make_record("web", "http://10.0.0.1:3000", None, 5.0, draining=True,
                         version="1.3.0")
    assert record["draining"] is True and record["appVersion"] == "1.3.0"
    endpoint, problem = check_record({**record, "timestamp": NOW}, NOW)
    assert endpoint.draining and endpoint.version == "1.3.0" and problem is None


def test_a_record_without_them_is_a_live_unversioned_endpoint():
    endpoint, problem = check_record(doc(), NOW)
    assert not endpoint.draining and endpoint.version == "" and problem is None


@pytest.mark.parametrize("changes, field", [
    ({"draining": "yes"}, "draining"),
    ({"draining": 1}, "draining"),
    ({"appVersion": 13}, "appVersion"),
    ({"appVersion": "1.3 beta"}, "appVersion"),
    ({"appVersion": "x" * 65}, "appVersion"),
    ({"appVersion": "1.3,2=5"}, "appVersion"),
])
def test_a_malformed_field_is_dropped_and_the_endpoint_kept(changes, field):
    endpoint, problem = check_record(doc(**changes), NOW)
    assert not endpoint.draining and endpoint.version == ""
    assert problem is not None and problem.startswith(field)
    assert problem.endswith("ignored, endpoint kept")


def test_each_malformed_field_is_warned_once_per_record(caplog):
    bad = [doc(_id="r1", draining="yes"), doc(_id="r2", appVersion=["x"],
                                               endpoint="http://10.0.0.2:3000")]
    endpoints, problems = parse_documents(bad, NOW)
    assert len(endpoints) == 2 and len(problems) == 2
    with caplog.at_level(logging.WARNING, logger="cluster.registry"):
        Watcher._report(problems)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all(line.startswith("malformed field") for line in lines)


def test_the_table_keeps_the_fields():
    e, _ = check_record(doc(draining=True, appVersion="2"), NOW)
    table = EndpointTable.build(NOW, [e], grace=1.0)
    assert table.by_hash[endpoint_hash("http://10.0.0.1:3000")].draining
    assert table.endpoints[0].version == "2"
    assert NOW - e.timestamp == dt.timedelta(seconds=1)
