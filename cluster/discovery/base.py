"""What every discovery store does.

Stores keep meteorhacks-shaped documents keyed by (serviceName, endpoint) and stamp
them with their *own* clock; readers judge age against that same clock, so clock skew
between hosts can neither expire a live endpoint nor keep a dead one.

Reading every record on every refresh makes the store's work grow with the square of the
cluster (N instances each reading N records). Stores that keep a *membership log*
(``changelog = True``, see :mod:`cluster.discovery.mongo`) let watchers read one small
document per refresh instead, and the records themselves only when membership changed:

- ``membership()``: the number of the latest log entry (the epoch, a hint that may trail
  the log by an entry or two) and the lease
  of the *reaper*, the one instance that reads every record once per refresh to turn
  expiries and foreign writers' joins (Meteor instances know no log) into log entries;
- ``changes(first, limit)``: the log entries from ``first`` on, each a join (with the
  record) or a leave;
- ``announce()``: append an entry; registrars announce their own joins and leaves;
- ``publish_late()``: the reaper lists in the membership document the records whose
  heartbeat is overdue (:class:`Late`), so that every watcher drops a crashed endpoint
  at the moment its record expires (checked with ``record()``), not one refresh after
  the reaper announced it.
"""

from __future__ import annotations

import abc
import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class StoreSnapshot:
    """The documents read from the store, and the store's clock when they were read."""

    now: dt.datetime
    documents: list[dict[str, Any]]
    #: (identity, problem) of the entries the store could not turn into a document
    #: (escaped: records.shown); the reader warns about them as about malformed records
    unreadable: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Membership:
    """The membership document: its epoch and who reaps (``renewed`` changes with
    every renewal of the lease; a value that stops changing means the reaper is gone)."""

    epoch: int = 0
    reaper: str | None = None
    renewed: dt.datetime | None = None
    #: records the reaper saw with an overdue heartbeat, as of its last scan
    late: tuple[Late, ...] = ()


@dataclass(frozen=True)
class Late:
    """A record whose heartbeat the reaper saw overdue: it expires at ``timestamp`` plus
    its ping interval plus grace unless it beats again."""

    service: str
    endpoint: str
    #: its last heartbeat, by the store's clock
    timestamp: dt.datetime


@dataclass(frozen=True)
class Change:
    """One entry of the membership log."""

    seq: int
    kind: str  # "join" or "leave"
    service: str
    endpoint: str
    #: the record as of the join (meteorhacks shape, with the store's timestamp)
    document: dict[str, Any] | None = None


class DiscoveryStore(abc.ABC):
    """A place where endpoint records live. Methods raise ``DiscoveryError``."""

    #: shown by ``cluster status`` and in logs; never includes credentials
    description: str = ""
    #: True when membership(), changes(), announce() and the reaper lease work
    changelog: bool = False
    #: when (time.monotonic()) the store last answered a call, 0.0 when this store does
    #: not tell: a stop keeps waiting for a removal while answers keep coming (a slow
    #: store), not for one that gets none (cluster.registry.Registrar.deregister)
    answered_at: float = 0.0

    @abc.abstractmethod
    def heartbeat(self, record: Mapping[str, Any], announce: bool = False) -> None:
        """Upsert ``record`` by (serviceName, endpoint), timestamped by the store.

        With a membership log, a new record (or ``announce``: the record may have
        expired meanwhile) is announced as a join.
        """

    @abc.abstractmethod
    def remove(self, service: str, endpoint: str) -> None:
        """Delete the record of (service, endpoint), if any (announced as a leave)."""

    @abc.abstractmethod
    def snapshot(self, services: frozenset[str] | None = None) -> StoreSnapshot:
        """The records of ``services`` plus every balancer's (all when None), with the
        store's current time."""

    # --- the membership log (stores with ``changelog = True``) ---------------------

    def membership(self) -> Membership:
        raise NotImplementedError

    def changes(self, first: int, limit: int) -> list[Change] | None:
        """Up to ``limit`` entries from ``first`` on, in order, ending before the first
        one not (yet) written; None when one cannot be read (read the records instead)."""
        raise NotImplementedError

    def announce(self, kind: str, service: str, endpoint: str,
                 document: Mapping[str, Any] | None = None) -> int:
        """Append a join or leave; returns its sequence number."""
        raise NotImplementedError

    def advance_epoch(self, seq: int) -> None:
        """Raise the epoch to ``seq`` (never lower it): the reaper repairs a lost bump."""
        raise NotImplementedError

    def claim_reaper(self, me: str, seen: Membership) -> bool:
        """Take the reaper lease if it is still as ``seen`` (a lapsed or absent holder)."""
        raise NotImplementedError

    def renew_reaper(self, me: str) -> bool:
        """Renew the lease; False when someone else holds it now."""
        raise NotImplementedError

    def publish_late(self, me: str, late: tuple[Late, ...]) -> bool:
        """Replace the overdue records listed in the membership document (the reaper
        ``me`` only); False when someone else holds the lease now."""
        raise NotImplementedError

    def record(self, service: str, endpoint: str) -> dict[str, Any] | None:
        """The record of (service, endpoint), or None: one lookup, to check a record
        listed as late before dropping its endpoint."""
        raise NotImplementedError

    def delete_dead(self, before: dt.datetime) -> int:
        """Delete the records whose heartbeat is older than ``before`` (by the store's
        clock), if still so when deleted; returns how many. Their instances were
        killed (a stop removes its own record) long ago: kept, every full read decodes
        them for ever. Stores that clean up by themselves return 0."""
        return 0

    def takes_writes(self) -> bool | None:
        """Whether a write could land now (None: this store cannot tell cheaply). Asked
        only when every overdue record looks unconfirmed (registry.unconfirmed): it
        tells a store that refuses writes from instances all gone at once."""
        return None

    def clock(self) -> dt.datetime:
        """The store's current time (what its timestamps are judged against)."""
        return dt.datetime.now(dt.timezone.utc)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the store is not used afterwards."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"


def wanted(doc: Mapping[str, Any], services: frozenset[str] | None) -> bool:
    """Whether a watcher interested in ``services`` keeps ``doc`` (balancers always).

    A document whose ``serviceName`` is not a string is kept: it may be meant for one
    of ``services``, and the reader's checks skip it with a warning (a list here used
    to raise TypeError, unhashable, and stop the watcher)."""
    if services is None or doc.get("balancer"):
        return True
    service = doc.get("serviceName")
    return not isinstance(service, str) or service in services
