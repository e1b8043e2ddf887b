"""MongoDB discovery store (pymongo), in the meteorhacks:cluster shape, with a membership log.

pymongo does its I/O on sockets and its monitors on threads, both cooperative once
gevent has monkey-patched them; entry points patch before importing this module.

Besides ``clusterEndpoints`` (one record per endpoint, the meteorhacks shape) two small
collections make a refresh cost O(changes) (see :mod:`cluster.discovery.base`):
``clusterMembership`` holds one document (``_id: "membership"``: the epoch and the reaper
lease) and ``clusterChanges`` the log, one document per entry (``_id: "c<seq>"``, the last
:data:`LOG_LENGTH` kept). Every steady-state operation addresses one document by ``_id``:
the one lookup every MongoDB-protocol server serves from an index (FerretDB's SQLite
backend pushes down nothing else), so a heartbeat or a refresh costs the same with 10 or
5,000 records. Our own records get ``_id: "<serviceName>@<endpoint>"`` for that reason;
records of other writers keep theirs.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
import warnings
from typing import Any, Mapping

import pymongo
from bson.errors import BSONError
from pymongo import monitoring
from pymongo.errors import (
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
)
from pymongo.uri_parser import split_options

from cluster.discovery.base import Change, DiscoveryStore, Late, Membership, StoreSnapshot
from cluster.errors import ConfigError, DiscoveryError
from cluster.records import COLLECTION, shown

log = logging.getLogger(__name__)

DEFAULT_DATABASE = "cluster"
MEMBERSHIP = "clusterMembership"
CHANGES = "clusterChanges"
MEMBERSHIP_ID = "membership"
#: log entries kept; a watcher further behind reads the records instead
LOG_LENGTH = 1000
#: seconds a heartbeat stamps records from the store's clock as last read (hello)
CLOCK_REFRESH = 30.0
#: How documents are decoded. Another writer's record is input: a BSON date outside
#: Python's datetime range (any int64 of milliseconds is a valid BSON date) comes back
#: as a ``bson.DatetimeMS``, and a string that is not UTF-8 with replacement characters,
#: so that the record checks reject that one record (cluster.records) where decoding
#: it would fail the whole read with InvalidBSON, in every instance.
DECODING: dict[str, Any] = {
    "tz_aware": True,
    "datetime_conversion": "DATETIME_AUTO",
    "unicode_decode_error_handler": "replace",
}
#: what a call to the store may raise: the server's errors and the decoder's
STORE_ERRORS = (PyMongoError, BSONError)


def _why(exc: BaseException) -> str:
    """The error's text, one line, without pymongo's topology dump: a server selection
    timeout (no server answers the URL) appends ", Timeout: 5.0s, Topology Description:
    <...>" with every server's state, several hundred characters on every log line.
    A server's error (OperationFailure) is its ``errmsg`` without pymongo's ", full
    error: {...}", which repeats it; the server's text may span lines (FerretDB's
    authentication errors do), and a log line must stay one line."""
    text = str(exc)
    cut = text.find(", Timeout: ")
    if isinstance(exc, ServerSelectionTimeoutError) and cut > 0:
        text = text[:cut]
    elif isinstance(exc, OperationFailure):
        cut = text.find(", full error: ")
        if cut > 0:
            text = text[:cut]
    return " ".join(text.split())


URL_SETTING = "--discovery-url (CLUSTER_DISCOVERY_URL)"


def _check_options(url: str, caught: list[str]) -> None:
    """pymongo's complaints about the URL's ``?options``, which it only warns about
    (a Python warning of two lines, with a line of its own source) and then ignores:
    ``tls=yes`` connected without TLS, ``authMechanism=SCRAM-SHA1`` used the default.
    A value it refuses is a ConfigError, as the same option given to MongoClient, or
    to the Node driver of a Meteor instance sharing the URL, is; an option it does
    not know is one warning naming it (another driver's option, or a typo).

    Each option is checked alone, so that only the validator's verdicts count: the
    other warnings pymongo gives while making the client are advice, one log line
    each, not errors (a DocumentDB or Cosmos DB host, a compressor this Python lacks,
    ``snappy`` in a URL shared with Node, which pymongo leaves out)."""
    refused: list[str] = []
    unknown: list[str] = []
    query = url.partition("?")[2]
    for option in re.split("[&;]", query) if query else ():
        if not option:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                split_options(option, validate=True, warn=False)
        except Exception as exc:  # noqa: BLE001 - InvalidURI, ConfigurationError, ValueError
            text = " ".join(str(exc).split())
            if text.startswith("Unknown option"):
                unknown.append(shown(option.partition("=")[0], 60))
            else:
                refused.append(text)
    if refused:
        raise ConfigError(URL_SETTING, f"{refused[0]} (in its ?options)")
    if unknown:
        log.warning("%s: pymongo knows no option %s; ignored", URL_SETTING,
                    ", ".join(sorted(set(unknown))))
    for text in dict.fromkeys(" ".join(t.split()) for t in caught):
        if not text.startswith("Unknown option"):
            log.warning("%s: %s", URL_SETTING, text)


def record_id(service: str, endpoint: str) -> str:
    """The ``_id`` of our own record of (service, endpoint)."""
    return f"{service}@{endpoint}"


def _redacted(url: str) -> str:
    """The URL for logs: its hosts, ports and database, without credentials or options.

    A replica set's URL lists several hosts (``mongodb://db1:27017,db2:27017/cluster``),
    whose ports urlsplit cannot read (it raised, a traceback in every way of running).
    The URL is split as pymongo splits it, not as urlsplit does: a password with a
    ``#`` (which pymongo takes unescaped) was a fragment to urlsplit, and every log
    line named ``mongodb://user:<the password up to the #>`` as the store.
    """
    scheme, _, rest = url.partition("://")
    authority, slash, path = rest.partition("?")[0].partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"


class _Answers(monitoring.CommandListener):
    """Notes when the server last answered a command (``MongoStore.answered_at``)."""

    def __init__(self, store: MongoStore) -> None:
        self.store = store

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        pass

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        self.store.answered_at = time.monotonic()

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        # an error the server sent is an answer too; a socket error or a timeout (which
        # pymongo reports as {"errmsg": ..., "errtype": ...}) is not
        if "errtype" not in event.failure:
            self.store.answered_at = time.monotonic()


class MongoStore(DiscoveryStore):
    """Records in ``<db>.clusterEndpoints``; the database comes from the URL path."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        ms = int(timeout * 1000)
        self.answered_at = 0.0
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self._client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
                    url,
                    appname="cluster",
                    connect=False,
                    serverSelectionTimeoutMS=ms,
                    connectTimeoutMS=ms,
                    socketTimeoutMS=ms,
                    event_listeners=[_Answers(self)],
                    **DECODING,
                )
            database = self._client.get_default_database(default=DEFAULT_DATABASE)
        except (PyMongoError, ValueError, OSError) as exc:
            # Nothing is connected yet (connect=False): these are the URL's own problems,
            # a bad option or database name, or a TLS file (tlsCAFile...) it cannot read.
            raise ConfigError(URL_SETTING, str(exc)) from None
        _check_options(url, [str(w.message) for w in caught
                             if issubclass(w.category, UserWarning)])
        self._collection = database[COLLECTION]
        self._membership = database[MEMBERSHIP]
        self._clock: tuple[float, dt.datetime] | None = None  # (monotonic, store time)
        self._changes = database[CHANGES]
        self.description = f"{_redacted(url)} ({database.name}.{COLLECTION})"

    changelog = True

    def heartbeat(self, record: Mapping[str, Any], announce: bool = False) -> None:
        service, endpoint = record["serviceName"], record["endpoint"]
        key = record_id(service, endpoint)
        try:
            # The store's clock (see _store_time), then the record replaced by _id: on
            # FerretDB an update (even by _id) scans the collection, a replacement
            # does not, so a heartbeat costs the same with 10 or 5,000 records.
            now = self._store_time()
            result = self._collection.replace_one(
                {"_id": key}, {"_id": key, **record, "timestamp": now}, upsert=True)
            if result.upserted_id is not None:
                # A record of this endpoint written before it had an _id of ours (by an
                # older version) would be a duplicate: drop it once, here.
                self._collection.delete_many(
                    {"serviceName": service, "endpoint": endpoint, "_id": {"$ne": key}})
            if result.upserted_id is not None or announce:
                written = self._collection.find_one({"_id": key})  # with the store's time
                self.announce("join", service, endpoint, written or record)
        except STORE_ERRORS as exc:
            raise DiscoveryError(f"heartbeat to {self.description} failed: {_why(exc)}") from exc

    def remove(self, service: str, endpoint: str) -> None:
        try:
            deleted = self._collection.delete_many(
                {"serviceName": service, "endpoint": endpoint}).deleted_count
            if deleted:
                self.announce("leave", service, endpoint)
        except STORE_ERRORS as exc:
            raise DiscoveryError(f"removal from {self.description} failed: {_why(exc)}") from exc

    def delete_dead(self, before: dt.datetime) -> int:
        try:
            # one filter, so a record that heartbeats again meanwhile is not deleted;
            # no leave is announced: the record expired long ago for every reader
            return int(self._collection.delete_many({"timestamp": {"$lt": before}}).deleted_count)
        except STORE_ERRORS as exc:
            raise DiscoveryError(f"cleaning {self.description} failed: {_why(exc)}") from exc

    def _store_time(self) -> dt.datetime:
        """The store's clock, without a round trip most of the time: hello's localTime,
        taken at the middle of its round trip, carried forward on this host's monotonic
        clock for :data:`CLOCK_REFRESH` seconds (a wall-clock step here changes nothing;
        the error is at most half a round trip)."""
        now = time.monotonic()
        if self._clock is None or now - self._clock[0] > CLOCK_REFRESH:
            reply = self._client.admin.command("hello").get("localTime")
            after = time.monotonic()
            if not isinstance(reply, dt.datetime):
                # Every MongoDB since 2.x and FerretDB answer localTime; a last resort.
                return dt.datetime.now(dt.timezone.utc)
            stamp = reply if reply.tzinfo else reply.replace(tzinfo=dt.timezone.utc)
            self._clock = ((now + after) / 2, stamp)
            now = after
        base, stamp = self._clock
        return stamp + dt.timedelta(seconds=now - base)

    def snapshot(self, services: frozenset[str] | None = None) -> StoreSnapshot:
        query: dict[str, Any] = {}
        if services is not None:
            query = {"$or": [{"serviceName": {"$in": sorted(services)}},
                             {"balancer": {"$type": "string"}}]}
        try:
            hello = self._client.admin.command("hello")
            documents = list(self._collection.find(query))
        except STORE_ERRORS as exc:
            raise DiscoveryError(f"reading {self.description} failed: {_why(exc)}") from exc
        now = hello.get("localTime")
        if not isinstance(now, dt.datetime):
            # Every MongoDB since 2.x and FerretDB answer localTime; this is a last resort.
            now = dt.datetime.now(dt.timezone.utc)
        elif now.tzinfo is None:
            now = now.replace(tzinfo=dt.timezone.utc)
        return StoreSnapshot(now=now, documents=documents)

    # --- the membership log -----------------------------------------------------------

    def membership(self) -> Membership:
        try:
            doc = self._membership.find_one({"_id": MEMBERSHIP_ID})
        except STORE_ERRORS as exc:
            raise DiscoveryError(f"reading {self.description} failed: {_why(exc)}") from exc
        if not doc:
            return Membership()
        epoch, reaper, renewed = doc.get("epoch"), doc.get("reaper"), doc.get("renewed")
        return Membership(
            epoch=epoch if isinstance(epoch, int) else 0,
            reaper=reaper if isinstance(reaper, str) else None,
            renewed=renewed if isinstance(renewed, dt.datetime) else None,
            late=_late_of(doc.get("late")),
        )

    def changes(self, first: int, limit: int) -> list[Change] | None:
        found: list[Change] = []  # None only for an entry that is not ours: read records
        try:
            while True:
                if len(found) == limit:
                    return found
                doc = self._changes.find_one({"_id": f"c{first + len(found)}"})
                if doc is None:
                    return found
                kind = doc.get("kind")
                if kind not in ("join", "leave"):
                    return None
                record = {k: v for k, v in doc.items() if k not in ("_id", "kind")}
                found.append(Change(first + len(found), kind, str(doc.get("serviceName")),
                                    str(doc.get("endpoint")),
                                    record if kind == "join" else None))
        except STORE_ERRORS as exc:
            raise DiscoveryError(f"reading {self.description} failed: {_why(exc)}") from exc

    def announce(self, kind: str, service: str, endpoint: str,
                 document: Mapping[str, Any] | None = None) -> int:
        # A join entry is the record itself (meteorhacks shape, with the store's
        # timestamp) plus its kind, so watchers need not read the record.
        entry: dict[str, Any] = {k: v for k, v in (document or {}).items() if k != "_id"}
        entry.update(kind=kind, serviceName=service, endpoint=endpoint)
        try:
            # The entry's number is taken by inserting it: a unique _id is the one
            # atomic step every MongoDB-protocol server offers (FerretDB's $inc loses
            # concurrent increments). Start after the epoch, which trails the log.
            seq = self.membership().epoch
            for _ in range(100):
                seq = self._log_end(seq)
                try:
                    self._changes.insert_one({"_id": f"c{seq}", **entry})
                    break
                except DuplicateKeyError:  # taken meanwhile: look again from there
                    continue
            else:
                raise DiscoveryError(f"announcing to {self.description} failed: "
                                     "no free log entry")
            self.advance_epoch(seq)
            self._changes.delete_one({"_id": f"c{seq - LOG_LENGTH}"})
        except STORE_ERRORS as exc:
            raise DiscoveryError(f"announcing to {self.description} failed: {_why(exc)}") from exc
        return seq

    def advance_epoch(self, seq: int) -> None:
        # Watchers read the log only when the epoch moved, so every entry is followed
        # by this bump ($max: concurrent writers never move it back).
        try:
            try:
                self._membership.update_one({"_id": MEMBERSHIP_ID},
                                            {"$max": {"epoch": seq}}, upsert=True)
            except DuplicateKeyError:  # created concurrently: now it exists
                self._membership.update_one({"_id": MEMBERSHIP_ID}, {"$max": {"epoch": seq}})
        except STORE_ERRORS as exc:
            raise DiscoveryError(f"advancing the epoch of {self.description} failed: "
                                 f"{_why(exc)}") from exc

    def _log_end(self, known: int) -> int:
        """The first free entry number after ``known`` (a written one, or 0): gallop,
        then bisect, with lookups by _id, so a trailing epoch costs O(log lag)."""

        def taken(seq: int) -> bool:
            return self._changes.find_one({"_id": f"c{seq}"}, projection={"_id": 1}) \
                is not None

        low, step = known, 1  # low: taken (or 0)
        while taken(low + step):
            low, step = low + step, step * 2
        high = low + step  # free
        while high - low > 1:
            middle = (low + high) // 2
            if taken(middle):
                low = middle
            else:
                high = middle
        return high

    def claim_reaper(self, me: str, seen: Membership) -> bool:
        query: dict[str, Any] = {"_id": MEMBERSHIP_ID, "reaper": seen.reaper}
        query["renewed"] = seen.renewed if seen.renewed is not None else {"$exists": False}
        try:
            if seen.epoch == 0 and seen.reaper is None and seen.renewed is None:
                try:
                    self._membership.update_one({"_id": MEMBERSHIP_ID},
                                                {"$setOnInsert": {"epoch": 0}}, upsert=True)
                except DuplicateKeyError:
                    pass  # created concurrently
            result = self._membership.update_one(
                query, {"$set": {"reaper": me}, "$currentDate": {"renewed": True}})
        except STORE_ERRORS as exc:
            raise DiscoveryError(f"claiming the reaper lease failed: {_why(exc)}") from exc
        return result.matched_count == 1

    def renew_reaper(self, me: str) -> bool:
        try:
            result = self._membership.update_one(
                {"_id": MEMBERSHIP_ID, "reaper": me}, {"$currentDate": {"renewed": True}})
        except STORE_ERRORS as exc:
            raise DiscoveryError(f"renewing the reaper lease failed: {_why(exc)}") from exc
        return result.matched_count == 1

    def publish_late(self, me: str, late: tuple[Late, ...]) -> bool:
        listed = [{"serviceName": r.service, "endpoint": r.endpoint, "timestamp": r.timestamp}
                  for r in late]
        try:
            result = self._membership.update_one(
                {"_id": MEMBERSHIP_ID, "reaper": me}, {"$set": {"late": listed}})
        except STORE_ERRORS as exc:
            raise DiscoveryError(f"listing late records in {self.description} failed: "
                                 f"{_why(exc)}") from exc
        return result.matched_count == 1

    def record(self, service: str, endpoint: str) -> dict[str, Any] | None:
        try:
            found = self._collection.find_one({"_id": record_id(service, endpoint)})
            if found is None:  # another writer's (Meteor's) record has its own _id
                found = self._collection.find_one(
                    {"serviceName": service, "endpoint": {"$in": [endpoint, endpoint + "/"]}})
        except STORE_ERRORS as exc:
            raise DiscoveryError(f"reading {self.description} failed: {_why(exc)}") from exc
        return found

    def clock(self) -> dt.datetime:
        try:
            return self._store_time()
        except STORE_ERRORS as exc:
            raise DiscoveryError(f"reading the clock of {self.description} failed: "
                                 f"{_why(exc)}") from exc

    def close(self) -> None:
        self._client.close()


#: a late record's heartbeat outside these years is not believed (its expiry, a few
#: seconds later, must not overflow Python's datetime)
_PLAUSIBLE_YEARS = range(1970, 9999)


def _late_of(listed: Any) -> tuple[Late, ...]:
    """The late records of the membership document; entries of another shape are
    skipped (a watcher then waits for the reaper's announcement, as without them)."""
    if not isinstance(listed, list):
        return ()
    late = []
    for entry in listed:
        if not isinstance(entry, dict):
            continue
        service, endpoint, stamp = (entry.get("serviceName"), entry.get("endpoint"),
                                    entry.get("timestamp"))
        if isinstance(service, str) and isinstance(endpoint, str) and \
                isinstance(stamp, dt.datetime) and stamp.year in _PLAUSIBLE_YEARS:
            stamp = stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.timezone.utc)
            late.append(Late(service, endpoint, stamp))
    return tuple(late)
