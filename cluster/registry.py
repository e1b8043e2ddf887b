"""Endpoint table snapshots, and the two loops that keep discovery current.

The :class:`Registrar` heartbeats this instance's record; the :class:`Watcher` reads
the store, drops stale and malformed records and swaps in a new immutable
:class:`EndpointTable`. Request handlers read ``watcher.table`` without locks.

Both loops use ``threading``: under gevent's monkey-patching they are greenlets; in
gunicorn's (unpatched) arbiter they are real threads. Either way they never die on a
store error: they log one warning per outage and retry.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
import time
import weakref
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

from cluster.discovery.base import DiscoveryStore
from cluster.errors import DiscoveryError
from cluster.records import (
    BALANCER_IGNORED,
    Endpoint,
    MalformedRecord,
    check_record,
    make_record,
    record_identity,
)

log = logging.getLogger(__name__)

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


@dataclass(frozen=True)
class EndpointTable:
    """Healthy endpoints at one moment of the store's clock, indexed three ways."""

    now: dt.datetime = _EPOCH
    endpoints: tuple[Endpoint, ...] = ()
    by_service: Mapping[str, tuple[Endpoint, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    by_hash: Mapping[str, Endpoint] = field(default_factory=lambda: MappingProxyType({}))
    #: balancer URL -> the endpoints that announced it
    by_balancer: Mapping[str, tuple[Endpoint, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    #: service -> the balancer URLs its own endpoints announced. A record's balancer
    #: serves only its own service: a record of an unrelated service must not become
    #: the SockJS ``base_url`` of this one.
    balancers_by_service: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    @property
    def balancers(self) -> tuple[str, ...]:
        """Every announced balancer (for status pages; routing uses balancers_by_service)."""
        return tuple(self.by_balancer)

    def services(self) -> tuple[str, ...]:
        return tuple(sorted(self.by_service))

    def __repr__(self) -> str:
        return (
            f"<EndpointTable [{len(self.endpoints)} endpoints | "
            f"{len(self.by_service)} services | {len(self.by_balancer)} balancers]>"
        )

    @classmethod
    def build(
        cls,
        now: dt.datetime,
        endpoints: Iterable[Endpoint],
        grace: float,
        keep: frozenset[str] = frozenset(),
    ) -> EndpointTable:
        """Keep the endpoints whose heartbeat is younger than pingInterval + grace.

        Hashes in ``keep`` stay even when stale (see ``Watcher.refresh``).
        """
        live = sorted(
            (e for e in endpoints if e.hash in keep or e.is_healthy(now, grace)),
            key=lambda e: (e.service, e.url),
        )
        by_service: dict[str, list[Endpoint]] = {}
        by_balancer: dict[str, list[Endpoint]] = {}
        service_balancers: dict[str, dict[str, None]] = {}  # ordered sets
        for endpoint in live:
            by_service.setdefault(endpoint.service, []).append(endpoint)
            if endpoint.balancer:
                by_balancer.setdefault(endpoint.balancer, []).append(endpoint)
                service_balancers.setdefault(endpoint.service, {})[endpoint.balancer] = None
        return cls(
            now=now,
            endpoints=tuple(live),
            by_service=MappingProxyType({k: tuple(v) for k, v in by_service.items()}),
            by_hash=MappingProxyType({e.hash: e for e in live}),
            by_balancer=MappingProxyType({k: tuple(v) for k, v in by_balancer.items()}),
            balancers_by_service=MappingProxyType(
                {k: tuple(v) for k, v in service_balancers.items()}
            ),
        )


def parse_documents(
    documents: Iterable[Mapping[str, Any]], now: dt.datetime | None = None
) -> tuple[list[Endpoint], list[tuple[str, str]]]:
    """Split store documents into endpoints and (identity, problem) pairs.

    Both texts of a problem are escaped and truncated (records.shown): a record is
    someone else's input and must not forge or flood log lines. A record whose only
    problem is its ``balancer`` is kept without it, and its problem is listed too.
    """
    endpoints: list[Endpoint] = []
    problems: list[tuple[str, str]] = []
    for doc in documents:
        try:
            endpoint, problem = check_record(doc, now)
        except MalformedRecord as exc:
            problems.append((record_identity(doc), str(exc)))
            continue
        endpoints.append(endpoint)
        if problem is not None:
            problems.append((record_identity(doc), problem))
    return endpoints, problems


class _StoreOutage:
    """What every loop of one store shares: an outage is logged once, not once per loop.

    The first loop to fail logs one warning; the outage ends, with one info line,
    when every loop that failed has succeeded again. Details go to debug.
    """

    def __init__(self, description: str) -> None:
        self.description = description
        self.failing: set[str] = set()
        self.since: float | None = None
        self.lock = threading.Lock()

    def failed(self, what: str, exc: Exception) -> None:
        with self.lock:
            first = not self.failing
            self.failing.add(what)
            if first:
                self.since = time.monotonic()
        if first:
            log.warning("discovery store %s failed (%s), will keep retrying: %s",
                        self.description, what, exc)
        else:
            log.debug("%s still failing: %s", what, exc)

    def succeeded(self, what: str) -> None:
        with self.lock:
            if what not in self.failing:
                return
            self.failing.discard(what)
            over = not self.failing
            seconds = time.monotonic() - (self.since or 0.0)
        if over:
            log.info("discovery store %s works again after %.1fs", self.description, seconds)


_OUTAGES: weakref.WeakKeyDictionary[DiscoveryStore, _StoreOutage] = weakref.WeakKeyDictionary()
_OUTAGES_LOCK = threading.Lock()


def _store_outage(store: DiscoveryStore) -> _StoreOutage:
    with _OUTAGES_LOCK:
        outage = _OUTAGES.get(store)
        if outage is None:
            outage = _OUTAGES[store] = _StoreOutage(store.description)
        return outage


class _OutageLog:
    """One loop's view of a store outage; the log lines are the store's (_StoreOutage)."""

    def __init__(self, what: str, store: DiscoveryStore) -> None:
        self.what = what
        self.store = _store_outage(store)
        self.failing_since: dt.datetime | None = None
        #: failed attempts since start (the metrics' discovery errors)
        self.errors = 0

    def failed(self, exc: Exception) -> None:
        self.errors += 1
        if self.failing_since is None:
            self.failing_since = dt.datetime.now(dt.timezone.utc)
        self.store.failed(self.what, exc)

    def succeeded(self) -> None:
        if self.failing_since is not None:
            self.failing_since = None
            self.store.succeeded(self.what)

    @property
    def failing(self) -> bool:
        return self.failing_since is not None


class _Loop:
    """A named daemon thread (a greenlet once gevent has patched threading)."""

    name = "loop"

    def __init__(self) -> None:
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def _run(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)


class Registrar(_Loop):
    """Keeps one endpoint record alive in the store until stopped."""

    name = "cluster-registrar"

    def __init__(
        self,
        store: DiscoveryStore,
        service: str,
        endpoint_url: str,
        balancer_url: str | None,
        ping_interval: float,
        healthy: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__()
        self.store = store
        self.record = make_record(service, endpoint_url, balancer_url, ping_interval)
        self.ping_interval = ping_interval
        #: a sidecar's check of the program it registers; the record lives only while True
        self.healthy = healthy
        self.outage = _OutageLog(f"heartbeat of {service} {endpoint_url}", store)
        self.beats = 0
        self._registered = False
        self._stopped = False

    def __repr__(self) -> str:
        state = "failing" if self.outage.failing else "ok"
        return f"<Registrar {self.record['serviceName']} {self.record['endpoint']} [{state}]>"

    def beat(self) -> None:
        """One heartbeat (or removal, when the health check fails); raises DiscoveryError."""
        if self.healthy is not None and not self.healthy():
            if self._registered:
                log.warning("%s failed its health check; record removed",
                            self.record["endpoint"])
                self.store.remove(self.record["serviceName"], self.record["endpoint"])
                self._registered = False
            return
        self.store.heartbeat(self.record)
        if not self._registered:
            log.info("registered %s at %s in %s", self.record["serviceName"],
                     self.record["endpoint"], self.store.description)
        self._registered = True
        self.beats += 1

    def _run(self) -> None:
        backoff = 0.0
        while not self._stopping.is_set():
            try:
                self.beat()
            except DiscoveryError as exc:
                self.outage.failed(exc)
                # Retry soon, then less often, but never slower than the ping interval:
                # when the store returns, the record must be back before it expires.
                backoff = min(self.ping_interval, max(0.25, backoff * 2))
                self._stopping.wait(backoff * random.uniform(0.8, 1.0))
                continue
            backoff = 0.0
            self.outage.succeeded()
            self._stopping.wait(self.ping_interval)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop heartbeating and delete the record at once (best effort; idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        super().stop(timeout)
        try:
            self.store.remove(self.record["serviceName"], self.record["endpoint"])
            log.info("deregistered %s at %s", self.record["serviceName"], self.record["endpoint"])
        except DiscoveryError as exc:
            log.warning("could not remove %s (it expires by itself): %s",
                        self.record["endpoint"], exc)


class Watcher(_Loop):
    """Keeps :attr:`table` current; on a store outage keeps the last known table."""

    name = "cluster-watcher"

    def __init__(self, store: DiscoveryStore, grace: float, refresh_interval: float) -> None:
        super().__init__()
        self.store = store
        self.grace = grace
        self.refresh_interval = refresh_interval
        self.table = EndpointTable()
        self.outage = _OutageLog("reading the records", store)
        self.refreshed = threading.Event()
        #: time.time() of the last successful read (0.0: none yet); metrics show its age
        self.refreshed_at = 0.0
        self._warned: set[tuple[str, str]] = set()
        self._shelter_until = 0.0

    def __repr__(self) -> str:
        return f"<Watcher {self.table!r}{' [store failing]' if self.outage.failing else ''}>"

    def refresh(self) -> EndpointTable:
        """Read the store once and swap the table; raises DiscoveryError.

        Right after a store outage every heartbeat is stale, because nobody could
        write; expiring them all would empty the table just as the store returns. So
        for one ping interval plus grace after recovery, the endpoints of the last
        good table stay while their record exists, giving their heartbeats time to
        land. A record that was deleted (a graceful stop) still goes at once.
        """
        snapshot = self.store.snapshot()
        if self.outage.failing:
            # The first good read after an outage. The shelter starts now, not before
            # the read: a read can block for the store's whole timeout while it comes
            # back, and a window opened before it would be over when it returns.
            longest = max((e.ping_interval for e in self.table.endpoints), default=0.0)
            self._shelter_until = time.monotonic() + longest + self.grace
        endpoints, problems = parse_documents(snapshot.documents, snapshot.now)
        self._warn_once(problems)
        keep: frozenset[str] = frozenset()
        if time.monotonic() < self._shelter_until:
            keep = frozenset(self.table.by_hash)
        table = EndpointTable.build(snapshot.now, endpoints, self.grace, keep)
        self._log_changes(self.table, table)
        self.table = table
        self.refreshed_at = time.time()
        self.refreshed.set()
        return table

    def _warn_once(self, problems: list[tuple[str, str]]) -> None:
        """One warning per bad record, not one per refresh.

        Only the problems of records still in the store are remembered, so the set
        cannot grow without bound under a writer that keeps adding new bad records.
        """
        current = set(problems)
        for identity, problem in sorted(current - self._warned):
            if problem.endswith(BALANCER_IGNORED):
                log.warning("malformed balancer in discovery record %s: %s", identity, problem)
            else:
                log.warning("skipping malformed discovery record %s: %s", identity, problem)
        self._warned = current

    @staticmethod
    def _log_changes(old: EndpointTable, new: EndpointTable) -> None:
        for gone in old.by_hash.keys() - new.by_hash.keys():
            e = old.by_hash[gone]
            log.info("endpoint left: %s %s", e.service, e.url)
        for came in new.by_hash.keys() - old.by_hash.keys():
            e = new.by_hash[came]
            log.info("endpoint joined: %s %s", e.service, e.url)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.refresh()
            except DiscoveryError as exc:
                self._shelter_until = 0.0
                self.outage.failed(exc)
            else:
                self.outage.succeeded()
            self._stopping.wait(self.refresh_interval)
