"""Prometheus metrics, and the per-endpoint request rates the dashboard shows.

:class:`MetricsObserver` is the :class:`~cluster.observe.Observer` the front door
reports to. Its hot hook, :meth:`~MetricsObserver.request_done`, is one dict lookup and
a few plain integer increments: in a single process the Prometheus values (each
``inc`` takes a lock, a Python-level one under gevent) are brought up to date only when
someone reads them (a scrape flushes first) and once a second by the sampler. Everything
else that can wait (request rates, the age of the last discovery refresh, the discovery
error count) is also done by that sampler thread (a greenlet under gevent).

Several processes: prometheus_client's multi-process mode is on when
``PROMETHEUS_MULTIPROC_DIR`` is set before ``prometheus_client`` is imported: each
process writes its values to files there and :func:`exposition` sums them, so any
worker's ``/_cluster/metrics`` shows the whole server. ``cluster serve
--workers-count N`` sets it for its workers (a temporary directory it removes); under
gunicorn ``cluster.gunicorn`` does the same. In that mode every request is written
through at once (another process's scrape cannot flush this one's counts). The request
*rates* of the status page stay per process (each worker shows its own).
"""

from __future__ import annotations

import os
import threading
import time
from bisect import bisect_left
from collections import deque
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from cluster.observe import Observer, RequestRecord

if TYPE_CHECKING:
    from cluster.node import Cluster

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: upstream latency buckets, seconds: sub-millisecond loopback hops up to long polls
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0)

#: seconds of history behind the request rates of the status page
RATE_WINDOW = 5.0
SAMPLE_INTERVAL = 1.0
#: an endpoint gone from the table this long (and with no WebSocket open to it here)
#: loses its series and its status-page row: with ports chosen at each start (--bind
#: :0, workers, rolling deploys) they would otherwise pile up for the process's life
FORGET_SECONDS = 300.0
#: the door's own names, never in the table
_NOT_ENDPOINTS = ("local", "-")


def multiprocess_dir() -> str | None:
    """The multi-process directory prometheus_client uses in this process, if any."""
    return os.environ.get(MULTIPROC_ENV) or os.environ.get("prometheus_multiproc_dir")


def status_class(status: int) -> str:
    """``200`` -> ``"2xx"``; ``0`` (no response: the client went away) -> ``"none"``."""
    return f"{status // 100}xx" if status >= 100 else "none"


def is_replay(reason: str) -> bool:
    """A retry after the endpoint broke mid-request (not one refused before sending)."""
    return "replay" in reason


class _Traffic:
    """Plain per-endpoint counts for the status page (this process only)."""

    __slots__ = ("requests", "errors", "websockets")

    def __init__(self) -> None:
        self.requests = 0
        # 5xx answers, and requests that ended with no status at all (status 0); a
        # client that left while its endpoint worked is a 499, not counted here
        self.errors = 0
        self.websockets = 0


class _Tally:
    """One (service, endpoint, status): its Prometheus children, and the requests and
    upstream times counted since they were last brought up to date (:meth:`flush`)."""

    __slots__ = ("counter", "traffic", "error", "latency", "bounds", "count", "buckets",
                 "seconds")

    def __init__(self, counter: Any, traffic: _Traffic, error: bool, latency: Any) -> None:
        self.counter = counter
        self.traffic = traffic
        self.error = error
        self.latency = latency
        # The histogram child's bucket bounds and values (prometheus_client keeps them
        # in _upper_bounds, _buckets and _sum, as every version since 0.0.x has); when
        # they are not there, observations go through observe() one by one.
        self.bounds: tuple[float, ...] = ()
        if latency is not None and all(hasattr(latency, name) for name in (
                "_upper_bounds", "_buckets", "_sum")):
            self.bounds = tuple(latency._upper_bounds)
        self.count = 0
        self.buckets = [0] * len(self.bounds)
        self.seconds = 0.0

    def flush(self) -> None:
        count, self.count = self.count, 0
        if count:
            self.counter.inc(count)
        if self.seconds:
            seconds, self.seconds = self.seconds, 0.0
            latency = self.latency
            latency._sum.inc(seconds)
            buckets = self.buckets
            for i, n in enumerate(buckets):
                if n:
                    buckets[i] = 0
                    latency._buckets[i].inc(n)


class MetricsObserver(Observer):
    """Counts what the door reports, as Prometheus metrics and per-endpoint rates."""

    def __init__(self) -> None:
        self.multiprocess = multiprocess_dir() is not None
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "cluster_requests", "Requests answered, by service, endpoint and status class "
            "(endpoint 'local': this instance's app; '-': answered by cluster itself)",
            ["service", "endpoint", "code"], registry=r)
        self.upstream_latency = Histogram(
            "cluster_upstream_latency_seconds",
            "Seconds from sending a request to an endpoint to its response head",
            ["service"], buckets=LATENCY_BUCKETS, registry=r)
        self.retries = Counter(
            "cluster_retries", "Requests that left an endpoint for another one",
            ["endpoint", "reason"], registry=r)
        self.replays = Counter(
            "cluster_replays", "Requests sent again to another endpoint after theirs broke "
            "before answering (bodiless GET, HEAD, OPTIONS)", ["endpoint"], registry=r)
        self.ejections = Counter(
            "cluster_ejections", "Times an endpoint was left out of this instance's picks",
            ["endpoint", "reason"], registry=r)
        self.connections = Gauge(
            "cluster_open_connections", "Client connections being served",
            registry=r, multiprocess_mode="livesum")
        self.refused = Counter(
            "cluster_refused_connections", "Client connections answered 503 at the "
            "connection cap", registry=r)
        self.websockets = Gauge(
            "cluster_open_websockets", "WebSockets open, by endpoint ('local': this "
            "instance's app)", ["endpoint"], registry=r, multiprocess_mode="livesum")
        self.refresh_age = Gauge(
            "cluster_discovery_refresh_age_seconds", "Seconds since the last successful "
            "read of the discovery store (the oldest among live processes)",
            registry=r, multiprocess_mode="livemax")
        self.discovery_errors = Counter(
            "cluster_discovery_errors", "Failed reads of, and heartbeats to, the "
            "discovery store", ["operation"], registry=r)
        self._children: dict[tuple[str, str, int], _Tally] = {}
        self._traffic: dict[str, _Traffic] = {}
        #: endpoint -> the (metric, label values) made for it, to remove when it is gone
        self._series: dict[str, set[tuple[Any, tuple[str, ...]]]] = {}
        #: endpoint -> when (monotonic) the sampler first found it missing from the table
        self._missing_since: dict[str, float] = {}
        self.open_connections = 0
        self.refused_connections = 0
        #: endpoint -> (reason, time.time()) of its latest ejection, for the status page
        self.ejection_reasons: dict[str, tuple[str, float]] = {}
        self._samples: deque[tuple[float, dict[str, tuple[int, int]]]] = deque()
        self._rates: dict[str, tuple[float, float]] = {}
        self._node: Cluster | None = None
        self._errors_seen = {"read": 0, "heartbeat": 0}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        mode = "multiprocess" if self.multiprocess else "single process"
        return (f"<MetricsObserver [{mode} | {sum(t.requests for t in self._traffic.values())} "
                f"requests | {self.open_connections} connections]>")

    # --- the door's hooks (hot: keep them short) ---------------------------------

    def request_done(self, record: RequestRecord) -> None:
        key = (record.service, record.endpoint, record.status)
        tally = self._children.get(key)
        if tally is None:
            tally = self._child(key)
        traffic = tally.traffic
        traffic.requests += 1
        if tally.error:
            traffic.errors += 1
        seconds = record.upstream_seconds
        if self.multiprocess:
            tally.counter.inc()
            if tally.latency is not None and seconds:
                tally.latency.observe(seconds)
            return
        # Plain counts, brought into the Prometheus values by flush(). Only greenlets
        # of one hub call this (the door), so the increments need no lock.
        tally.count += 1
        if tally.latency is not None and seconds:
            if tally.bounds:
                tally.buckets[bisect_left(tally.bounds, seconds)] += 1
                tally.seconds += seconds
            else:
                tally.latency.observe(seconds)

    def flush(self) -> None:
        """Bring the Prometheus values up to date with the requests counted since."""
        for tally in list(self._children.values()):
            if tally.count or tally.seconds:
                tally.flush()

    def _child(self, key: tuple[str, str, int]) -> _Tally:
        service, endpoint, status = key
        traffic = self._traffic.get(endpoint)
        if traffic is None:
            traffic = self._traffic[endpoint] = _Traffic()
        proxied = endpoint not in ("local", "-")
        labels = (service, endpoint, status_class(status))
        self._series.setdefault(endpoint, set()).add((self.requests, labels))
        tally = _Tally(
            self.requests.labels(*labels),
            traffic,
            status >= 500 or status == 0,
            self.upstream_latency.labels(service) if proxied else None,
        )
        self._children[key] = tally
        return tally

    def connection_opened(self) -> None:
        self.open_connections += 1
        self.connections.inc()

    def connection_closed(self) -> None:
        self.open_connections -= 1
        self.connections.dec()

    def connection_refused(self) -> None:
        self.refused_connections += 1
        self.refused.inc()

    def websocket_opened(self, endpoint: str) -> None:
        traffic = self._traffic.get(endpoint)
        if traffic is None:
            traffic = self._traffic[endpoint] = _Traffic()
        traffic.websockets += 1
        self.websockets.labels(endpoint).inc()
        self._series.setdefault(endpoint, set()).add((self.websockets, (endpoint,)))

    def websocket_closed(self, endpoint: str) -> None:
        traffic = self._traffic.get(endpoint)
        if traffic is not None:
            traffic.websockets -= 1
        self.websockets.labels(endpoint).dec()

    def retried(self, endpoint: str, reason: str) -> None:
        self.retries.labels(endpoint, reason).inc()
        series = self._series.setdefault(endpoint, set())
        series.add((self.retries, (endpoint, reason)))
        if is_replay(reason):
            self.replays.labels(endpoint).inc()
            series.add((self.replays, (endpoint,)))

    def ejected(self, endpoint: str, reason: str) -> None:
        self.ejections.labels(endpoint, reason).inc()
        self._series.setdefault(endpoint, set()).add((self.ejections, (endpoint, reason)))
        self.ejection_reasons[endpoint] = (reason, time.time())

    # --- the once-a-second sampler ---------------------------------------------------

    def watch(self, node: Cluster) -> MetricsObserver:
        """Follow ``node``'s discovery loops, and start the sampler (idempotent)."""
        self._node = node
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cluster-metrics",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self.flush()

    def _run(self) -> None:
        while not self._stopping.wait(SAMPLE_INTERVAL):
            self.sample()

    def sample(self, now: float | None = None) -> None:
        """Update the discovery gauges and the request rates (called once a second)."""
        now = time.monotonic() if now is None else now
        self.flush()
        node = self._node
        if node is not None:
            self._sample_discovery(node)
            self.forget_departed({e.url for e in node.table.endpoints}, now)
        counts = {ep: (t.requests, t.errors) for ep, t in list(self._traffic.items())}
        self._samples.append((now, counts))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW:
            self._samples.popleft()
        then, old = self._samples[0]
        elapsed = now - then
        rates: dict[str, tuple[float, float]] = {}
        for endpoint, (requests, errors) in counts.items():
            before = old.get(endpoint, (0, 0))
            done = requests - before[0]
            rate = done / elapsed if elapsed > 0 else 0.0
            rates[endpoint] = (rate, (errors - before[1]) / done if done else 0.0)
        self._rates = rates

    def forget_departed(self, listed: set[str], now: float) -> None:
        """Drop what is kept for endpoints missing from ``listed`` (the table's URLs)
        for :data:`FORGET_SECONDS`. In multi-process mode the shared files keep their
        values (prometheus_client cannot remove them); the status page forgets."""
        known = set(self._traffic) | set(self._series) | set(self.ejection_reasons)
        for endpoint in known:
            if endpoint in listed or endpoint in _NOT_ENDPOINTS:
                self._missing_since.pop(endpoint, None)
                continue
            since = self._missing_since.setdefault(endpoint, now)
            traffic = self._traffic.get(endpoint)
            if now - since < FORGET_SECONDS or (traffic is not None and traffic.websockets):
                continue
            for key in [k for k in self._children if k[1] == endpoint]:
                del self._children[key]
            for metric, labels in self._series.pop(endpoint, ()):
                if not self.multiprocess:  # there remove() only warns
                    try:
                        metric.remove(*labels)
                    except KeyError:
                        pass
            self._traffic.pop(endpoint, None)
            self.ejection_reasons.pop(endpoint, None)
            self._missing_since.pop(endpoint, None)

    def _sample_discovery(self, node: Cluster) -> None:
        watcher = node.watcher
        if watcher.refreshed_at:
            self.refresh_age.set(max(0.0, time.time() - watcher.refreshed_at))
        for operation, loop in (("read", watcher), ("heartbeat", node.registrar)):
            if loop is None:
                continue
            errors = loop.outage.errors
            if errors > self._errors_seen[operation]:
                self.discovery_errors.labels(operation).inc(errors - self._errors_seen[operation])
                self._errors_seen[operation] = errors

    # --- what the admin pages read ------------------------------------------------------

    def traffic(self) -> dict[str, dict[str, float]]:
        """Per endpoint (as the door names it): totals, requests/s and error rate over
        the last few seconds, and open WebSockets. This process only."""
        rates = self._rates
        result: dict[str, dict[str, float]] = {}
        for endpoint, t in list(self._traffic.items()):
            rate, error_rate = rates.get(endpoint, (0.0, 0.0))
            result[endpoint] = {
                "requests": t.requests, "errors": t.errors, "websockets": t.websockets,
                "rate": round(rate, 2), "error_rate": round(error_rate, 4),
            }
        return result

    def exposition(self) -> tuple[str, bytes]:
        """(content type, body) of the Prometheus text format; in multi-process mode
        the sum over every process that wrote to the directory."""
        self.flush()
        if self._node is not None:
            self._sample_discovery(self._node)
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return CONTENT_TYPE_LATEST, generate_latest(registry)
        return CONTENT_TYPE_LATEST, generate_latest(self.registry)
