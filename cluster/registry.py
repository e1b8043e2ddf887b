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
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

from cluster.discovery.base import Change, DiscoveryStore, Late, Membership, wanted
from cluster.errors import DiscoveryError
from cluster.load import Load, moved
from cluster.rand import RANDOM
from cluster.records import (
    BALANCER_IGNORED,
    FIELD_IGNORED,
    Endpoint,
    MalformedRecord,
    check_record,
    make_record,
    record_identity,
    shown,
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
    #: hashes of the endpoints kept although overdue: no heartbeat of anyone landed
    #: since theirs was due (see :func:`unconfirmed`)
    held: frozenset[str] = frozenset()

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
        writes: Writes | None = None,
    ) -> EndpointTable:
        """Keep the endpoints whose heartbeat is younger than pingInterval + grace, and
        with ``writes`` (what a watcher saw of the store taking writes) the overdue ones
        whose death nothing confirms (:func:`unconfirmed`).

        Hashes in ``keep`` stay even when stale (see ``Watcher.refresh``).
        """
        endpoints = list(endpoints)
        held = frozenset() if writes is None else frozenset(
            e.hash for e in endpoints if e.hash not in keep
            and not e.is_healthy(now, grace) and unconfirmed(e, writes, now, grace))
        live = sorted(
            (e for e in endpoints if e.hash in keep or e.hash in held
             or e.is_healthy(now, grace)),
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
            held=held,
        )


@dataclass(frozen=True)
class Writes:
    """What a reader saw of the store taking writes, by the store's clock."""

    #: the latest write seen: a heartbeat, or the reaper's renewal of its lease
    last: dt.datetime
    #: writes were seen landing without a gap since then
    since: dt.datetime


def unconfirmed(endpoint: Endpoint, writes: Writes | None, now: dt.datetime,
                grace: float) -> bool:
    """Whether an overdue endpoint's death is unconfirmed, so that it stays: no write
    reached the store since its heartbeat was due, or writes land again only since
    less than a ping interval (its own lands within one); at most :data:`HOLD_SECONDS`
    past its expiry.

    A store that answers reads but takes no writes (a full disk, a read-only file
    system, a lock held on the embedded file) stops every heartbeat at once: every
    record goes overdue within one ping interval, and expiring them emptied every
    table, a 503 for every request while every instance ran. When others' heartbeats
    land, an overdue record is a dead instance, expired as ever. A crashed endpoint
    that was the only one anybody reads stays (and is ejected by routing when it
    refuses) until the hold is over."""
    if endpoint.age(now) >= endpoint.ping_interval + grace + HOLD_SECONDS:
        return False
    window = dt.timedelta(seconds=endpoint.ping_interval * CONFIRM_SLACK)
    if writes is None or writes.last <= endpoint.timestamp + window:  # none seen since due
        return True
    return now < max(writes.since, endpoint.timestamp) + window


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
        except Exception as exc:  # noqa: BLE001 - one record must not fail every read
            problems.append((record_identity(doc), f"unreadable ({type(exc).__name__}: "
                                                   f"{shown(str(exc), 100)})"))
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


#: seconds without an answer a stop waits for the store to take the record away (then
#: it expires)
STOP_SECONDS = 2.0
#: seconds a stop waits at most for a store that answers slowly (and never longer than
#: the record's lifetime, ping interval plus grace: it has expired by then)
SLOW_STOP_SECONDS = 10.0


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
        version: str = "",
        grace: float | None = None,
    ) -> None:
        super().__init__()
        self.store = store
        #: the readers' expiry grace (this instance's setting), for the stop's log line
        self.grace = grace
        self.record = make_record(service, endpoint_url, balancer_url, ping_interval,
                                  version=version)
        self.ping_interval = ping_interval
        #: a sidecar's check of the program it registers; the record lives only while True
        self.healthy = healthy
        self.outage = _OutageLog(f"heartbeat of {service} {endpoint_url}", store)
        self.beats = 0
        self._registered = False
        self._stopped = False
        #: the one removal of the record (stop, or gunicorn's worker_exit after it)
        self._removal: threading.Thread | None = None
        self._removal_lock = threading.Lock()
        self._gave_up = False
        #: when stop() began (monotonic), 0.0 before: the removal's log line counts from it
        self._stop_asked = 0.0
        #: the record was removed (by stop or deregister)
        self.removed = False
        self._beat_failed = False
        self._last_beat = 0.0
        #: this instance's load now (cluster.load), set by its front door; None: none
        self.load: Callable[[], Load] | None = None
        #: the load the record carries in the store
        self.published: Load | None = None
        #: the record changed (drain): the next beat announces it as a join
        self._changed = False

    @property
    def draining(self) -> bool:
        return bool(self.record.get("draining"))

    def drain(self) -> None:
        """Mark the record as draining and write it at once, announced as a join so
        that watchers following the membership log read the new record. When the
        store fails the next heartbeat tries again; raises DiscoveryError.

        Not written before the heartbeats start (a drain asked while the instance
        starts: its first heartbeat carries it; written now, the record stayed behind a
        stop that came before registering) nor once they stopped (it would come back
        after the removal)."""
        self.record = {**self.record, "draining": True}
        self._changed = True
        if self._thread is None or self._stopped:
            return
        self.beat()

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
        # Announce a join (membership log) when the record may have been missing or
        # expired for the others: the first beat, and the first after a failure or a gap.
        now = time.monotonic()
        rejoin = (not self._registered or self._beat_failed or self._changed
                  or now - self._last_beat > 1.5 * self.ping_interval)
        # The load is rewritten only when it moved materially, and then announced like a
        # join, so watchers that follow the membership log see it (cluster.load).
        current = self.load() if self.load is not None else None
        changed = current is not None and moved(self.published, current)
        if changed:
            assert current is not None
            self.record = {**self.record, "load": current.to_doc()}
        self._beat_failed = True
        record = self.record
        self.store.heartbeat(record, announce=rejoin or changed)
        self._beat_failed = False
        if record is self.record:
            self._changed = False
        if changed:
            self.published = current
        self._last_beat = now
        if not self._registered:
            log.info("registered %s at %s in %s", self.record["serviceName"],
                     self.record["endpoint"], self.store.description)
        self._registered = True
        self.beats += 1

    def _run(self) -> None:
        backoff = 0.0
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                self.beat()
            except DiscoveryError as exc:
                if self._stopping.is_set():
                    return  # cut short by the stop (the store closed): no outage
                self.outage.failed(exc)
                # Retry soon, then less often, but never slower than the ping interval:
                # when the store returns, the record must be back before it expires.
                backoff = min(self.ping_interval, max(0.25, backoff * 2))
                self._stopping.wait(backoff * RANDOM.uniform(0.8, 1.0))
                continue
            backoff = 0.0
            self.outage.succeeded()
            # One beat per ping interval, start to start: a beat slowed by a lossy link
            # does not also push back the next one, so a record's age stays within one
            # interval plus one write's delay (measured by the store's time at sending).
            self._stopping.wait(max(0.0, self.ping_interval - (time.monotonic() - started)))

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """Stop heartbeating and delete the record at once (best effort; idempotent).

        Bounded by ``timeout`` seconds without an answer from the store: one that
        accepts connections but no longer answers (a blackholed host, a hung server)
        would otherwise hold every stop for its socket timeouts, one heartbeat in
        flight and then the removal (12-20 s with the default 5 s). The record then
        expires by itself. A slow store that answers is waited for (see deregister).
        """
        if not self._stopped:
            self._stopped = True
            self._stop_asked = time.monotonic()
        # a heartbeat in flight should land before the removal, not after it (it would
        # bring the record back until it expires); half the time at most, counted from
        # the first stop: a second one (gunicorn's worker_exit while _watch's waits
        # here) waits for the same heartbeat, not past it
        super().stop(max(0.0, self._stop_asked + timeout / 2 - time.monotonic()))
        self.deregister(timeout)  # (the silence it bounds counts from the stop)

    def deregister(self, timeout: float = STOP_SECONDS) -> bool:
        """Remove the record, waiting while the store answers (it may be slow) but at
        most ``timeout`` seconds without an answer, and at most the record's lifetime
        (ping interval plus grace, up to SLOW_STOP_SECONDS) in all; True once removed.

        Once only: a second call (gunicorn's worker_exit after the worker's stop, or
        a stop cut short) waits for the first removal, if it is still under way and
        was not given up, within its own ``timeout``; it does not try again.
        """
        with self._removal_lock:
            if self._gave_up:
                return False
            removal = self._removal
            if removal is None:
                removal = self._removal = threading.Thread(
                    target=self._remove, name="cluster-deregister", daemon=True)
                removal.start()
        started = self._stop_asked or time.monotonic()
        # ``timeout`` bounds a silence, not the removal: a store that answers slowly
        # (a remote server 0.3 s away, one under load) takes several round trips for
        # the removal and its leave entry, and giving up after 2 s in all left the
        # record (or its leave entry) out, peers sending here for ping interval plus
        # grace. Past that time the record has expired anyway: the wait ends there.
        last = started + max(timeout, min(SLOW_STOP_SECONDS,
                                          self.ping_interval + (self.grace or 0.0)))
        while True:
            now = time.monotonic()
            quiet = now - max(started, self.store.answered_at)
            if quiet >= timeout or now >= last:
                break
            removal.join(min(timeout - quiet, last - now))
            if not removal.is_alive():
                break
        if removal.is_alive():
            with self._removal_lock:
                gave_up, self._gave_up = self._gave_up, True
            if not gave_up:
                took = time.monotonic() - started
                why = (f"no answer in {took:.1f}s" if quiet >= timeout else
                       f"still under way after {took:.1f}s of slow answers")
                log.warning("could not remove %s %s from %s: %s; %s",
                            self.record["serviceName"], self.record["endpoint"],
                            self.store.description, why, self._expires())
            return False
        return self.removed

    def _remove(self) -> None:
        try:
            self.store.remove(self.record["serviceName"], self.record["endpoint"])
        except DiscoveryError as exc:
            with self._removal_lock:
                gave_up, self._gave_up = self._gave_up, True
            if not gave_up:
                log.warning("could not remove %s %s (%s); %s", self.record["serviceName"],
                            self.record["endpoint"], exc, self._expires())
            return
        except Exception as exc:  # noqa: BLE001 - e.g. a store closed under it
            log.debug("removal of %s given up: %r", self.record["endpoint"], exc)
            return
        self.removed = True
        log.info("deregistered %s at %s", self.record["serviceName"], self.record["endpoint"])

    def _expires(self) -> str:
        """When the record left behind expires, as the log line tells the operator."""
        if self.grace is None:
            return "the record expires by itself (ping interval plus expiry grace)"
        return (f"the record expires by itself within {self.ping_interval + self.grace:.3g}s "
                f"(ping interval plus expiry grace)")


#: log entries a watcher reads per lookup batch; further behind than MAX_LOG_LAG
#: (entries may have been pruned) it reads the records instead
MAX_LOG_STEP = 32
MAX_LOG_LAG = 500
#: a store call this many times slower than the usual refresh (and over half the
#: grace) is a stall the store came back from (Watcher._stalled)
STALL_FACTOR = 4.0
#: the slow full read that catches anything the log missed (the reaper already turns
#: expiries and other writers' joins into entries, so this is only a backstop): every
#: this many seconds and 0.5 s more per known record, so that N watchers' resyncs cost
#: O(N) store work, not O(N²) (1,000 records: every 9 minutes or so)
RESYNC_SECONDS = 60.0
RESYNC_PER_RECORD = 0.5
#: an overdue record stays while no heartbeat of anyone landed after its own was due
#: (this many ping intervals after it: heartbeats go start to start, each landing a
#: store round trip late), for at most HOLD_SECONDS past its expiry (registry.unconfirmed)
CONFIRM_SLACK = 1.25
HOLD_SECONDS = 300.0
#: a record whose heartbeat is this old is deleted by the reaper: a killed instance's
#: (a stop removes its own), long past any expiry (ping interval at most an hour, plus
#: the grace, plus HOLD_SECONDS); kept, every scan of the reaper read it for ever
DEAD_AFTER = dt.timedelta(hours=24)
#: the reaper lists a record as late when its heartbeat is this many seconds overdue
#: (a quarter of the grace when that is less); late records listed at most
LATE_AFTER = 0.5
MAX_LATE = 64


@dataclass
class WatchStats:
    """What a watcher asked of the store (for benchmarks and tests)."""

    refreshes: int = 0
    #: single-document lookups by _id: the membership document and log entries
    lookups: int = 0
    full_reads: int = 0
    log_reads: int = 0
    scans: int = 0
    announced: int = 0


class Watcher(_Loop):
    """Keeps :attr:`table` current; on a store outage keeps the last known table.

    With a store that keeps a membership log (``store.changelog``) a refresh reads one
    small document (the epoch), plus the log entries since the last refresh when the
    epoch moved: O(changes), not O(records). The records themselves are read on the
    first refresh, when the log cannot be followed, after a store outage, and every
    :data:`RESYNC_SECONDS` (more with many records). One watcher in the cluster holds the
    *reaper* lease: it also reads every record on each refresh and announces in the log
    what no registrar announces: expiries, and the joins of other writers (Meteor).
    It also lists the records whose heartbeat is overdue in the membership document,
    and every watcher checks such a record when it would expire and drops its endpoint
    then: a crash leaves every table at its expiry, as when each watcher read every
    record, not up to a refresh after the reaper's announcement.
    Other stores are read whole on every refresh.
    """

    name = "cluster-watcher"

    def __init__(self, store: DiscoveryStore, grace: float, refresh_interval: float,
                 services: frozenset[str] | None = None, reap: bool = True,
                 member_id: str | None = None) -> None:
        super().__init__()
        self.store = store
        self.grace = grace
        self.refresh_interval = refresh_interval
        #: services whose records this watcher reads (plus every balancer); None: all
        self.services = services
        self.reap = reap
        self.member_id = member_id or f"{uuid.uuid4().hex[:12]}"
        self.table = EndpointTable()
        self.outage = _OutageLog("reading the records", store)
        self.refreshed = threading.Event()
        #: time.time() of the last successful read (0.0: none yet); metrics show its age
        self.refreshed_at = 0.0
        self.read_at = 0.0
        self.stats = WatchStats()
        self.reaping = False
        self._warned: set[tuple[str, str]] = set()
        self._shelter_until = 0.0
        #: time.monotonic() when the refresh under way began (Watcher._stalled)
        self._began = time.monotonic()
        #: what this watcher saw of the store taking writes (registry.unconfirmed)
        self._writes: Writes | None = None
        self._sampled = self._advanced = 0.0  # time.monotonic() of the last read, advance
        #: time.monotonic() since overdue endpoints are held because no write landed
        #: since they were due (None: none held so); warned: the warning was logged
        self._held_since: float | None = None
        self._warned_held = False
        self._refused = False  # the store said it could not take a write (takes_writes)
        self._lock = threading.RLock()
        self._known: dict[str, Endpoint] = {}
        self._epoch: int | None = None  # None: the records must be read
        self._next_resync = 0.0
        self._lease_seen: tuple[Membership, float] = (Membership(), time.monotonic())
        self._steady_since = time.monotonic()
        self._early_scan = float("-inf")  # time.monotonic() of the last early scan
        self._usual = 0.0  # seconds: a moving average of good refreshes (0.0: none yet)
        #: endpoint hash -> (time.monotonic() when its record expires, the reaper's note)
        self._late: dict[str, tuple[float, Late]] = {}
        self._listed_late: tuple[Late, ...] | None = None  # None: list them at the next scan
        #: (type, text) of the last unexpected error logged with its traceback
        self._last_unexpected: tuple[str, str] | None = None

    def __repr__(self) -> str:
        role = " [reaper]" if self.reaping else ""
        return (f"<Watcher {self.table!r}{role}"
                f"{' [store failing]' if self.outage.failing else ''}>")

    def want(self, service: str) -> None:
        """Also read ``service``'s records from now on (read them at once)."""
        with self._lock:
            if self.services is None or service in self.services:
                return
            self.services = self.services | {service}
            self._epoch = None
        self.refresh()

    def refresh(self) -> EndpointTable:
        """Bring the table up to date once; raises DiscoveryError.

        Right after a store outage every heartbeat is stale, because nobody could
        write; expiring them all would empty the table just as the store returns. So
        for one ping interval plus grace after recovery, the endpoints of the last
        good table stay while their record exists, giving their heartbeats time to
        land. A record that was deleted (a graceful stop) still goes at once.
        """
        with self._lock:
            self.stats.refreshes += 1
            began = self._began = time.monotonic()
            if not self.store.changelog or self.outage.failing:
                # the first read after an outage is a full one (see _read_records)
                self._read_records()
            else:
                self._follow_log()
            if self._stalled():
                # a call after the last check stalled (the reaper's announcements or
                # its list of late records): the next refreshes shelter, as after any
                self._recovering()
            took = time.monotonic() - began
            self._usual = took if not self._usual else 0.8 * self._usual + 0.2 * took
            self.refreshed_at = time.time()
            self.refreshed.set()
            return self.table

    # --- reading -------------------------------------------------------------------

    def _read_records(self, epoch: int | None = None, every: bool = False) -> list[Endpoint]:
        """Read the records (of our services, or ``every`` one) and rebuild the table."""
        snapshot = self.store.snapshot(None if every else self.services)
        self.read_at = time.monotonic()
        self.stats.full_reads += 1
        if self.outage.failing or self._stalled():
            self._recovering()
        endpoints, problems = parse_documents(snapshot.documents, snapshot.now)
        self._warn_once(problems + snapshot.unreadable)
        keep: frozenset[str] = frozenset()
        if time.monotonic() < self._shelter_until:
            keep = frozenset(self.table.by_hash)
        self._saw_write(max((e.timestamp for e in endpoints), default=None),
                        resumed=False if self.store.changelog else None)
        if any(not e.is_healthy(snapshot.now, self.grace)
               and unconfirmed(e, self._writes, snapshot.now, self.grace) for e in endpoints):
            self._probe_writes(snapshot.now)
        table = EndpointTable.build(snapshot.now, endpoints, self.grace, keep, self._writes)
        self._note_held(len(table.held), snapshot.now, table.endpoints)
        self._known = dict(table.by_hash)
        self._swap(table)
        if epoch is None or self._epoch is None or epoch > self._epoch:
            self._epoch = epoch  # never back: the hint may trail what we already applied
        spread = RESYNC_SECONDS + RESYNC_PER_RECORD * len(self._known)
        self._next_resync = time.monotonic() + spread * RANDOM.uniform(0.8, 1.2)
        return endpoints

    def _probe_writes(self, now: dt.datetime) -> None:
        """Ask the store whether a write could land now (a store that can tell: the
        embedded file's write lock): yes is a write seen at ``now``, after a no the
        start of a new run of writes."""
        answer = self.store.takes_writes()
        if answer is False:
            self._refused = True
        elif answer:
            self._saw_write(now, resumed=self._refused)
            self._refused = False

    def _saw_write(self, latest: dt.datetime | None, resumed: bool | None = False) -> None:
        """Record the latest write seen in the store (the newest heartbeat read, the
        reaper's lease renewal). ``resumed``: whether writes land again after a time
        they did not (a new run starts: Writes.since, and overdue endpoints get a ping
        interval to land theirs); None: judge by the records read at every refresh (a
        store without a membership log), where a newest heartbeat that did not move
        for longer than a ping interval (and slack) means the store took no writes
        meanwhile. Reads far apart (this watcher held up) cannot tell. With a log,
        followers see only the reaper's renewals, at its pace, and a stall of writes
        is a stall or a failure of the reaper's own (Watcher._stalled, the outage)."""
        now = time.monotonic()
        sampled, self._sampled = self._sampled, now  # looked, whatever was seen
        if latest is None:
            return
        seen = self._writes
        if seen is None:
            self._writes, self._advanced = Writes(latest, _EPOCH), now
            return
        if latest <= seen.last:
            return
        if resumed is None:
            longest = max((e.ping_interval for e in self.table.endpoints), default=0.0)
            gap = longest * CONFIRM_SLACK + self.refresh_interval
            resumed = now - self._advanced > gap and now - sampled <= gap
        self._writes = Writes(latest, latest if resumed else seen.since)
        self._advanced = now
        self._held_since = None
        if self._warned_held:
            self._warned_held = False
            log.info("heartbeats land in %s again", self.store.description)

    def _note_held(self, count: int, now: dt.datetime, endpoints: Iterable[Endpoint]) -> None:
        """One warning once overdue endpoints have been held for a ping interval plus
        grace because no write landed since they were due (a reaper's takeover after it
        died with everyone else takes about a second, and ends it quietly)."""
        if not count or self._writes is None or self._warned_held:
            return
        last = self._writes.last
        overdue = [e for e in endpoints if not e.is_healthy(now, self.grace)
                   and last <= e.timestamp + dt.timedelta(
                       seconds=e.ping_interval * CONFIRM_SLACK)]
        if not overdue:
            return
        since = self._held_since = self._held_since or time.monotonic()
        if time.monotonic() - since >= max(e.ping_interval for e in overdue) + self.grace:
            self._warned_held = True
            log.warning("no heartbeat has landed in %s since %d overdue endpoint "
                        "record(s) were due: keeping them for up to %.0fs (a store that "
                        "takes no writes looks like this, as do all instances gone at "
                        "once)", self.store.description, count, HOLD_SECONDS)

    def _stalled(self) -> bool:
        """Whether the store took long enough to answer the calls of this refresh for
        heartbeats to go stale meanwhile, without failing anyone (a stopped process, a
        GC pause, an election, a read that waited out server selection): then it is a
        recovery all the same.

        Counted from the refresh's start, not from the read being judged: any call
        may be the one that waits (the reaper renews its lease before it reads, and a
        write is retried once the server is back), and the read after it is as quick
        as ever while every record it returns is stale.

        Slow means slow for this store too: several times its usual refresh. A store
        that is slow all along (a distant link) lets heartbeats land as late as it
        answers reads, and a shelter opened again at every refresh would keep dead
        endpoints for ever."""
        took = time.monotonic() - self._began
        return took > self.grace / 2 and took > STALL_FACTOR * self._usual

    def _recovering(self) -> None:
        """The first good read after an outage or a stall: shelter the known endpoints.

        The shelter starts now, not before the read: a read can block for the store's
        whole timeout while it comes back, and a window opened before it would be over
        when it returns."""
        longest = max((e.ping_interval for e in self.table.endpoints), default=0.0)
        self._shelter_until = time.monotonic() + longest + self.grace
        self._steady_since = time.monotonic()

    def _follow_log(self) -> None:
        membership = self.store.membership()
        self.stats.lookups += 1
        self._saw_write(membership.renewed)
        if self._stalled():
            self._recovering()
        if self.reap:
            self._reaper_duty(membership)
        epoch = membership.epoch
        sheltering = time.monotonic() < self._shelter_until
        if self.reaping:
            self._reap(membership)
            return
        if (self._epoch is None or sheltering or epoch - self._epoch > MAX_LOG_LAG
                or time.monotonic() >= self._next_resync):
            self._read_records(epoch)
        elif epoch > self._epoch:
            # Membership changed. An entry whose epoch bump has not landed yet waits for
            # the next refresh; one whose bump was lost (its writer died in between) for
            # the reaper, which moves the epoch to the end of the log at every scan.
            self._follow(self._epoch, membership)
        self._note_late(membership.late)
        self._expire_due()

    def _follow(self, epoch: int, membership: Membership) -> None:
        """Apply the entries after ``epoch`` (one lookup when there are none).

        The epoch is only a hint (it may trail the log), so the log is read forward
        to its first missing entry."""
        for _ in range(MAX_LOG_LAG // MAX_LOG_STEP + 1):
            changes = self.store.changes(epoch + 1, MAX_LOG_STEP)
            # one lookup per entry, and one for the first missing entry
            self.stats.lookups += 1 if changes is None else len(changes) + (
                len(changes) < MAX_LOG_STEP)
            if changes is None:  # an entry we cannot read: read the records
                self._read_records(membership.epoch)
                return
            if not changes:
                return
            self.stats.log_reads += 1
            self._apply(changes, membership.renewed)
            epoch = self._epoch = changes[-1].seq
            if len(changes) < MAX_LOG_STEP:
                return

    def _apply(self, changes: Iterable[Change], now: dt.datetime | None) -> None:
        known = dict(self._known)
        for change in changes:
            doc = change.document
            if change.kind == "leave":
                for key in [k for k, e in known.items()
                            if (e.service, e.url) == (change.service, change.endpoint.rstrip("/"))]:
                    del known[key]
            elif doc is not None and wanted(doc, self.services):
                # the same strict check as a full read (records.check_record)
                parsed, problems = parse_documents([doc], now)
                fresh = [p for p in problems if p not in self._warned]
                self._warned.update(fresh)
                self._report(fresh)
                for endpoint in parsed:
                    known[endpoint.hash] = endpoint
        self._known = known
        self._publish(now or self.table.now)

    def _publish(self, now: dt.datetime) -> None:
        """Make a table of the known endpoints: the log (and the reaper) said they live."""
        self.read_at = time.monotonic()  # ``now`` is the store's clock as of the log read
        self._swap(EndpointTable.build(now, self._known.values(), self.grace,
                                       frozenset(self._known)))

    def _swap(self, table: EndpointTable) -> None:
        self._log_changes(self.table, table)
        self.table = table

    def _steady(self, endpoints: Iterable[Endpoint]) -> bool:
        """Whether the store has been read well for a ping interval plus grace: after an
        outage nobody could heartbeat, and records need that long to come back."""
        longest = max((e.ping_interval for e in endpoints), default=0.0)
        return time.monotonic() - self._steady_since >= longest + self.grace

    # --- late records ----------------------------------------------------------------

    def _note_late(self, late: tuple[Late, ...]) -> None:
        """Remember when each known endpoint the reaper listed as late expires."""
        if not late:
            self._late = {}
            return
        by_identity = {(e.service, e.url): key for key, e in self._known.items()}
        store_now, now = self.store.clock(), time.monotonic()
        noted: dict[str, tuple[float, Late]] = {}
        for record in late:
            key = by_identity.get((record.service, record.endpoint.rstrip("/")))
            if key is None or record.timestamp < self._known[key].timestamp:
                continue  # not ours, or we know of a later heartbeat
            endpoint = self._known[key]
            expires = record.timestamp + dt.timedelta(
                seconds=endpoint.ping_interval + self.grace)
            # just after it, so that the store's clock agrees it has expired
            noted[key] = (now + (expires - store_now).total_seconds() + 0.02, record)
        self._late = noted

    def _expire_due(self) -> None:
        """Drop the late endpoints whose record has expired by now, each checked with
        one lookup (it may have beaten since the reaper's scan), once writes seen
        landing confirm it (:func:`unconfirmed`)."""
        now = time.monotonic()
        due = {key: note for key, note in self._late.items() if note[0] <= now}
        if not due:
            return
        for key in due:
            del self._late[key]
        if now < self._shelter_until or not self._steady(self._known.values()):
            return  # heartbeats may still be landing: the reaper decides when steady
        store_now = self.store.clock()
        known = dict(self._known)
        held: list[Endpoint] = []
        for key, (_, record) in due.items():
            if key not in known:
                continue
            document = self.store.record(record.service, record.endpoint)
            self.stats.lookups += 1
            found = [e for e in parse_documents([document], store_now)[0] if e.hash == key] \
                if document is not None else []
            if found:
                self._saw_write(found[0].timestamp)
            endpoint = found[0] if found else None
            if endpoint is not None and endpoint.is_healthy(store_now, self.grace):
                if endpoint.timestamp > record.timestamp:
                    known[key] = endpoint  # it beat again meanwhile
                else:  # not quite expired by the store's clock: look again when it is
                    left = endpoint.ping_interval + self.grace - endpoint.age(store_now)
                    self._late[key] = (time.monotonic() + left + 0.02, record)
            elif endpoint is not None and unconfirmed(endpoint, self._writes, store_now,
                                                      self.grace):
                # no write seen since it was due, or only lately: looked at again later
                self._late[key] = (time.monotonic() + endpoint.ping_interval / 2, record)
                held.append(endpoint)
            else:
                del known[key]
        self._note_held(len(held), store_now, held)
        dropped = len(known) != len(self._known)
        self._known = known
        if dropped:
            self._publish(store_now)

    # --- the reaper ------------------------------------------------------------------

    def _reaper_duty(self, seen: Membership) -> None:
        """Hold, renew or take over the reaper lease (taken when its holder stops renewing)."""
        if self.reaping:
            if not self.store.renew_reaper(self.member_id):
                log.info("no longer the reaper of %s", self.store.description)
                self.reaping = False
                self._epoch = None
                self._listed_late = None
            else:
                self._saw_write(self.store.clock())  # the renewal is a write that landed
            return
        now = time.monotonic()
        previous, since = self._lease_seen
        if (seen.reaper, seen.renewed) != (previous.reaper, previous.renewed):
            self._lease_seen = (seen, now)
            if seen.reaper is not None:
                return
        # renewed at every refresh of its holder: three refreshes without one, it is gone
        lapsed = now - since > max(3 * self.refresh_interval, 1.0)
        if (seen.reaper is None or lapsed) and self.store.claim_reaper(self.member_id, seen):
            log.info("reaping for %s: this instance reads every record once per refresh "
                     "and announces expiries and other writers' joins",
                     self.store.description)
            self.reaping = True

    def _reap(self, membership: Membership) -> None:
        """Read every record; announce the joins and leaves nobody announced."""
        self.stats.scans += 1
        scope = self.services  # what self._known covers (a new reaper's own services)
        epoch = self._epoch
        fresh = epoch is None  # nothing known to compare with: announce no joins
        if epoch is not None:
            self._follow(epoch, membership)  # to the end of the log, past the epoch
            if self._epoch is not None and self._epoch > membership.epoch:
                self.store.advance_epoch(self._epoch)  # a lost bump: see _follow_log
        self.services = None
        before = self._known
        endpoints = self._read_records(membership.epoch, every=True)
        now = self.table.now
        if any(e.timestamp < now - DEAD_AFTER for e in endpoints):
            try:
                deleted = self.store.delete_dead(now - DEAD_AFTER)
            except DiscoveryError as exc:
                log.warning("could not delete the records dead for a day: %s", exc)
            else:
                log.info("deleted %d record(s) whose heartbeat is over a day old", deleted)
        present = {e.hash for e in endpoints}
        # Expire only after reading well for a ping interval plus grace: after an outage
        # nobody could heartbeat, and their records need time to come back.
        steady = self._steady(endpoints)
        for key, endpoint in self.table.by_hash.items():
            in_scope = scope is None or endpoint.service in scope or bool(endpoint.balancer)
            if key not in before and not fresh and in_scope:
                self._announce("join", endpoint.service, endpoint.url,
                               _record_of(endpoint))
        for key, endpoint in before.items():
            if key in self.table.by_hash:
                continue
            if key not in present or steady:
                self._announce("leave", endpoint.service, endpoint.url)
            else:  # stale but not yet announced: keep it until we are steady
                self._known[key] = endpoint
        if len(self._known) != len(self.table.by_hash):
            self._publish(now)
        self._list_late(now if steady else None)

    def _list_late(self, now: dt.datetime | None) -> None:
        """List the records whose heartbeat is overdue at ``now`` (none when None) in the
        membership document, when the list changed; watchers drop them at expiry."""
        overdue = () if now is None else sorted(
            (e for e in self.table.endpoints
             if e.age(now) > e.ping_interval + min(LATE_AFTER, self.grace / 4)),
            key=lambda e: e.timestamp)
        late = tuple(Late(e.service, e.url, e.timestamp) for e in overdue[:MAX_LATE])
        if late != self._listed_late and self.store.publish_late(self.member_id, late):
            self._listed_late = late

    def _announce(self, kind: str, service: str, url: str,
                  document: Mapping[str, Any] | None = None) -> None:
        self.store.announce(kind, service, url, document)
        self.stats.announced += 1

    def _warn_once(self, problems: list[tuple[str, str]]) -> None:
        """One warning per bad record, not one per refresh.

        Only the problems of records still in the store are remembered, so the set
        cannot grow without bound under a writer that keeps adding new bad records.
        """
        current = set(problems)
        self._report(sorted(current - self._warned))
        self._warned = current

    @staticmethod
    def _report(problems: Iterable[tuple[str, str]]) -> None:
        for identity, problem in problems:
            if problem.endswith(BALANCER_IGNORED):
                log.warning("malformed balancer in discovery record %s: %s", identity, problem)
            elif problem.endswith(FIELD_IGNORED):
                log.warning("malformed field in discovery record %s: %s", identity, problem)
            else:
                log.warning("skipping malformed discovery record %s: %s", identity, problem)

    @staticmethod
    def _log_changes(old: EndpointTable, new: EndpointTable) -> None:
        for gone in old.by_hash.keys() - new.by_hash.keys():
            e = old.by_hash[gone]
            log.info("endpoint left: %s %s", e.service, e.url)
        for came in new.by_hash.keys() - old.by_hash.keys():
            e = new.by_hash[came]
            log.info("endpoint joined: %s %s", e.service, e.url)

    def _unexpected(self, exc: Exception) -> DiscoveryError:
        """A refresh failed in a way no store error explains (a bug, or input nobody
        foresaw): a failed refresh all the same, retried with a full read, and the
        table kept. Its traceback is logged once per distinct error, not per refresh."""
        seen = (type(exc).__name__, str(exc))
        if seen != self._last_unexpected:
            self._last_unexpected = seen
            log.error("refreshing the endpoint table from %s failed unexpectedly; "
                      "keeping the last table and retrying", self.store.description,
                      exc_info=exc)
        return DiscoveryError(f"unexpected {type(exc).__name__}: {shown(str(exc))}")

    def pause(self) -> float:
        """Seconds until the next refresh: the refresh interval, except that a watcher
        wakes when the first record listed as late expires, and the reaper just after
        the first record it saw alive expires. A crash then enters the
        log at its expiry, and reaches every watcher within one refresh of it, as when
        every watcher judged the records itself. At most one such early scan per refresh
        interval, so that many expiries close together (a host lost) cost at most twice
        the usual scans."""
        table = self.table
        late = list(self._late.values())  # one copy: want() may refresh meanwhile
        if not self.reaping and late:  # wake when the first late record expires
            until = min(at for at, _ in late) - time.monotonic()
            return max(0.01, min(self.refresh_interval, until))
        if (not self.reaping or not table.endpoints
                or time.monotonic() - self._early_scan < self.refresh_interval):
            return self.refresh_interval
        deadlines = [e.ping_interval + self.grace - e.age(table.now)
                     for e in table.endpoints]
        alive = [d for d in deadlines if d > 0]  # the expired ones are being settled
        if not alive:
            return self.refresh_interval
        until = min(alive) - (time.monotonic() - self.read_at) + 0.05
        return max(0.05, min(self.refresh_interval, until))

    def stop(self, timeout: float = 0.5) -> None:
        """Stop refreshing. A read in flight is not waited for long: it writes nothing
        that must land, and a store that stopped answering would hold it (and the
        stop) for its whole socket timeout."""
        super().stop(timeout)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any input
                if self._stopping.is_set():
                    return  # cut short by the stop (the store closed): no outage
                self._shelter_until = 0.0
                self.outage.failed(exc if isinstance(exc, DiscoveryError)
                                   else self._unexpected(exc))
            else:
                self.outage.succeeded()
            pause = self.pause()
            self._stopping.wait(pause)
            if pause < self.refresh_interval:
                self._early_scan = time.monotonic()


def _record_of(endpoint: Endpoint) -> dict[str, Any]:
    """The meteorhacks-shaped record of an endpoint, for a join announced by the reaper."""
    record = make_record(endpoint.service, endpoint.url, endpoint.balancer,
                         endpoint.ping_interval, draining=endpoint.draining,
                         version=endpoint.version, load=endpoint.load)
    record["timestamp"] = endpoint.timestamp
    return record
