"""An instance's load: what it publishes in its discovery record, and when.

Each instance adds a ``load`` subdocument to its meteorhacks-shaped record (the
meteorhacks fields stay as they are; Meteor instances ignore it)::

    load: {sockets: 12, inflight: 1, serviceMs: 3.4}

``sockets`` counts the WebSockets its own app serves (long-lived sessions),
``inflight`` its local HTTP requests in progress, ``serviceMs`` an exponentially
weighted moving average of their service time. A balancer places new sessions by these
figures (:mod:`cluster.placement`). Publishing a new figure costs every watcher a
read (cluster.registry: a changed load is announced in the membership log), so the
record's figure changes only when it *moved materially* (:func:`moved`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Mapping

#: a count moved materially when it changed by this many units ...
MATERIAL_UNITS = 2
#: ... and by this share of the published value (whichever is more)
MATERIAL_SHARE = 0.10
#: the service time moved materially past this share, and at least MATERIAL_MS
MATERIAL_MS_SHARE = 0.25
MATERIAL_MS = 1.0
#: the weight of each new service time in the moving average
EWMA_ALPHA = 0.1
#: a figure above this is not believed (another writer's record is input)
MAX_FIGURE = 10_000_000


@dataclass(frozen=True)
class Load:
    """One instance's load at a heartbeat."""

    sockets: int = 0
    inflight: int = 0
    service_ms: float = 0.0

    @property
    def score(self) -> float:
        """What placement compares: open sessions plus requests in progress."""
        return float(self.sockets + self.inflight)

    def to_doc(self) -> dict[str, Any]:
        return {"sockets": self.sockets, "inflight": self.inflight,
                "serviceMs": round(self.service_ms, 3)}


def parse_load(value: object) -> Load:
    """A record's ``load`` field as a :class:`Load`; raises ValueError naming the problem.

    Lenient in what it ignores (extra keys, a missing figure counts as 0), strict in
    what it believes: each figure a finite non-negative number below MAX_FIGURE.
    """
    if not isinstance(value, Mapping):
        raise ValueError("load is not a document")
    figures: dict[str, float] = {}
    for key in ("sockets", "inflight", "serviceMs"):
        raw = value.get(key, 0)
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) \
                or not (0 <= raw <= MAX_FIGURE) or math.isnan(raw):
            raise ValueError(f"load.{key} is not a number in 0..{MAX_FIGURE}")
        figures[key] = raw
    return Load(int(figures["sockets"]), int(figures["inflight"]), float(figures["serviceMs"]))


def _count_moved(old: int, new: int) -> bool:
    return abs(new - old) >= max(MATERIAL_UNITS, MATERIAL_SHARE * old)


def moved(published: Load | None, current: Load) -> bool:
    """Whether ``current`` differs materially from what the record says (None: nothing
    published yet): a count by at least 2 and 10 %, the service time by 25 % and 1 ms."""
    if published is None:
        return True
    if _count_moved(published.sockets, current.sockets) or \
            _count_moved(published.inflight, current.inflight):
        return True
    change = abs(current.service_ms - published.service_ms)
    return change >= max(MATERIAL_MS, MATERIAL_MS_SHARE * published.service_ms)


class LocalLoad:
    """This process's own figures, kept by the front door as requests come and go.

    Plain counters, no lock: the door's greenlets run one at a time.
    """

    __slots__ = ("requests", "websockets", "pinned_opened", "service_ms")

    def __init__(self) -> None:
        #: local requests in progress (a local WebSocket's request lasts as long as it)
        self.requests = 0
        #: local WebSockets, oldest first (insertion order), each with going_away(); the
        #: value: pinned here by its client's sticky cookie (cluster.rebalance)
        self.websockets: dict[Any, bool] = {}
        #: local WebSockets opened pinned, ever: how the rebalancer sees the clients it
        #: closed come straight back
        self.pinned_opened = 0
        self.service_ms = 0.0

    def __repr__(self) -> str:
        return f"<LocalLoad {self.current()}>"

    def started(self) -> float:
        self.requests += 1
        return time.monotonic()

    def finished(self, started: float, websocket: bool) -> None:
        self.requests -= 1
        if not websocket:  # a WebSocket's lifetime is not a service time
            sample = (time.monotonic() - started) * 1000.0
            self.service_ms += EWMA_ALPHA * (sample - self.service_ms)

    def current(self) -> Load:
        sockets = len(self.websockets)
        return Load(sockets, max(0, self.requests - sockets), self.service_ms)
