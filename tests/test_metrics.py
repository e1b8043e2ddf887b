"""MetricsObserver: the counters, histogram and gauges move with what the door reports,
the status page's per-endpoint rates, and summing over processes in multi-process mode."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.config import Settings
from cluster.metrics import MetricsObserver, status_class
from cluster.node import Cluster
from cluster.observe import RequestRecord
from helpers import ROOT, refused_port


def record(status: int = 200, endpoint: str = "local", service: str = "web",
           upstream: float = 0.0, retries: int = 0) -> RequestRecord:
    return RequestRecord("127.0.0.1", "GET", "/", "HTTP/1.1", status, 100, endpoint, service,
                         upstream, upstream + 0.001, retries, "", "curl")


def samples(observer: MetricsObserver) -> dict[tuple[str, tuple], float]:
    _, body = observer.exposition()
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def test_status_classes():
    assert [status_class(s) for s in (101, 200, 302, 404, 503, 0)] == [
        "1xx", "2xx", "3xx", "4xx", "5xx", "none"]


def test_requests_latency_retries_ejections_connections_are_counted():
    m = MetricsObserver()
    b = "http://127.0.0.1:8001"
    for _ in range(3):
        m.request_done(record(200, "local"))
    for _ in range(2):
        m.request_done(record(200, b, upstream=0.004))
    m.request_done(record(502, b, upstream=0.2))
    m.request_done(record(503, "-"))
    m.retried(b, "refused")
    m.retried(b, "replay")
    m.ejected(b, "connection refused")
    m.connection_opened()
    m.connection_opened()
    m.connection_closed()
    m.connection_refused()
    m.websocket_opened(b)
    found = samples(m)
    assert value(found, "cluster_requests_total", service="web", endpoint="local", code="2xx") == 3
    assert value(found, "cluster_requests_total", service="web", endpoint=b, code="2xx") == 2
    assert value(found, "cluster_requests_total", service="web", endpoint=b, code="5xx") == 1
    assert value(found, "cluster_requests_total", service="web", endpoint="-", code="5xx") == 1
    # only proxied requests have an upstream time
    assert value(found, "cluster_upstream_latency_seconds_count", service="web") == 3
    assert value(found, "cluster_upstream_latency_seconds_bucket", service="web", le="0.005") == 2
    latency_sum = value(found, "cluster_upstream_latency_seconds_sum", service="web")
    assert latency_sum == pytest.approx(0.208)
    assert value(found, "cluster_retries_total", endpoint=b, reason="refused") == 1
    assert value(found, "cluster_replays_total", endpoint=b) == 1
    assert value(found, "cluster_ejections_total", endpoint=b, reason="connection refused") == 1
    assert value(found, "cluster_open_connections") == 1
    assert value(found, "cluster_refused_connections_total") == 1
    assert value(found, "cluster_open_websockets", endpoint=b) == 1
    m.websocket_closed(b)
    assert value(samples(m), "cluster_open_websockets", endpoint=b) == 0
    assert m.ejection_reasons[b][0] == "connection refused"


def test_rates_cover_the_last_seconds():
    m = MetricsObserver()
    b = "http://127.0.0.1:8001"
    m.sample(now=100.0)
    for _ in range(10):
        m.request_done(record(200, b))
    m.sample(now=101.0)
    for _ in range(10):
        m.request_done(record(200, b))
    for _ in range(10):
        m.request_done(record(500, b))
    m.sample(now=102.0)
    t = m.traffic()[b]
    assert (t["requests"], t["errors"]) == (30, 10)
    assert t["rate"] == pytest.approx(15.0)  # 30 requests over 2 s
    assert t["error_rate"] == pytest.approx(1 / 3, abs=1e-3)
    for second in range(103, 110):  # no traffic: the window slides past it
        m.sample(now=float(second))
    assert m.traffic()[b]["rate"] == 0.0
    assert m.traffic()[b]["requests"] == 30


def test_discovery_refresh_age_and_errors_come_from_the_node(sqlite_url):
    # The node registers this URL and serves nothing there: the port is held, refusing,
    # for the whole test, so no other process can be there either.
    with refused_port() as port:
        settings = Settings.load(args=[], env={}, discovery_url=sqlite_url, service="web",
                                 bind=f"127.0.0.1:{port}", ping_interval=1.0)
        node = Cluster(settings).start(wait=5)
        try:
            m = MetricsObserver()
            m.watch(node)
            assert node.watcher.refreshed_at > 0
            node.watcher.outage.failed(RuntimeError("store gone"))  # what a failed read records
            m.sample()
            found = samples(m)
            assert 0 <= value(found, "cluster_discovery_refresh_age_seconds") < 5
            assert value(found, "cluster_discovery_errors_total", operation="read") == 1
            assert value(found, "cluster_discovery_errors_total", operation="heartbeat") == 0
            m.stop()
        finally:
            node.close()


_WORKER = """
import sys
from cluster.metrics import MetricsObserver
from cluster.observe import RequestRecord
m = MetricsObserver()
assert m.multiprocess
for _ in range(int(sys.argv[1])):
    m.request_done(RequestRecord("127.0.0.1", "GET", "/", "HTTP/1.1", 200, 1, "local", "web",
                                 0.0, 0.001, 0, "", ""))
m.connection_opened()
if len(sys.argv) > 2:
    sys.stdout.write(m.exposition()[1].decode())
"""


def test_multiprocess_mode_sums_the_processes(tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", _WORKER, "5"], env=env, check=True, timeout=60)
    out = subprocess.run([sys.executable, "-c", _WORKER, "7", "show"], env=env, check=True,
                         timeout=60, capture_output=True, text=True).stdout
    found = {}
    for family in text_string_to_metric_families(out):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert value(found, "cluster_requests_total", service="web", endpoint="local",
                 code="2xx") == 12


def test_counted_latencies_land_in_the_buckets_observe_would_pick():
    # request_done counts in plain integers and a scrape flushes them: the histogram
    # must read exactly as if every time had gone through Histogram.observe.
    from prometheus_client import CollectorRegistry, Histogram

    from cluster.metrics import LATENCY_BUCKETS

    times = [0.0005, 0.0004999, 0.00051, 0.005, 1.0, 30.0, 61.0, 0.25, 0.25, 1e-9]
    m = MetricsObserver()
    for t in times:
        m.request_done(record(200, "http://127.0.0.1:8001", upstream=t))
    found = samples(m)
    reference = Histogram("ref", "", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())
    for t in times:
        reference.observe(t)
    for s in reference.collect()[0].samples:
        if s.name == "ref_bucket":
            assert value(found, "cluster_upstream_latency_seconds_bucket", service="web",
                         le=s.labels["le"]) == s.value, s
    assert value(found, "cluster_upstream_latency_seconds_sum", service="web") == \
        pytest.approx(sum(times))
    m.request_done(record(200, "http://127.0.0.1:8001", upstream=0.002))  # after a flush
    assert value(samples(m), "cluster_upstream_latency_seconds_count", service="web") == \
        len(times) + 1


def test_endpoints_gone_from_the_table_are_forgotten_after_a_while():
    """With ports picked at each start, departed endpoints would pile up as series and
    status rows for the life of the process."""
    from cluster.metrics import FORGET_SECONDS

    observer = MetricsObserver()
    gone, kept, busy = "http://127.0.0.1:1001", "http://127.0.0.1:1002", "http://127.0.0.1:1003"
    for endpoint in (gone, kept, "local", "-"):
        observer.request_done(record(200, endpoint, upstream=0.01))
    observer.retried(gone, "connect")
    observer.ejected(gone, "refused")
    observer.websocket_opened(busy)  # a tunnel still open to it
    listed = {kept}
    observer.forget_departed(listed, now=100.0)
    observer.forget_departed(listed, now=100.0 + FORGET_SECONDS - 1)
    assert gone in observer.traffic() and gone in observer.ejection_reasons
    observer.forget_departed(listed, now=100.0 + FORGET_SECONDS)
    traffic = observer.traffic()
    assert gone not in traffic and gone not in observer.ejection_reasons
    assert {kept, "local", "-", busy} <= set(traffic)
    found = samples(observer)
    assert not [key for key in found if ("endpoint", gone) in key[1]], found
    assert value(found, "cluster_requests_total", service="web", endpoint=kept, code="2xx") == 1
    assert value(found, "cluster_open_websockets", endpoint=busy) == 1
    # back in the table before the time is up: nothing is forgotten
    observer.request_done(record(200, gone))
    observer.forget_departed(listed, now=1000.0)
    observer.forget_departed(listed | {gone}, now=1000.0 + FORGET_SECONDS / 2)
    observer.forget_departed(listed, now=1000.0 + FORGET_SECONDS)
    assert gone in observer.traffic()
    # its WebSocket closed: the busy one goes the next time round
    observer.websocket_closed(busy)
    observer.forget_departed(listed, now=1000.0 + 2 * FORGET_SECONDS)
    assert busy not in observer.traffic()
