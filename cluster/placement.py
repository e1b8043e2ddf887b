"""The load view a balancer places new sessions by (routing.place's ``load``).

An endpoint's score is the last figure this balancer knows for it plus the long-lived
sessions (WebSockets, SockJS sessions) it placed there since that figure; a plain
request counts only while it runs, in the figures' ``inflight``. A balancer that opened
ten WebSockets to an endpoint a moment ago must not wait for the endpoint's next
heartbeat to know it.
The figure comes from one of two places, whichever is newer:

- the load the endpoint advertised in its record (cluster.load). A record read at
  time ``t`` was written after ``t - lag`` (``lag``: the watcher's refresh interval
  plus a little), so the sessions placed before that are in it and the later ones
  are added (counted twice for a moment at worst, which only sends the next sessions
  elsewhere);
- the endpoint's own live count, which it sends back on the 101 of every WebSocket a
  balancer opens there (``X-Cluster-Load``, to verified cluster members only): exact,
  and as fresh as this balancer's last session there. Records lag by up to a
  heartbeat and a refresh, far too long for a burst of new sessions; this does not.

This instance's own score is its live figure. An endpoint whose load is unknown (a
Meteor instance, a malformed figure) counts as the mean of its service's known ones,
so it is neither flooded nor starved.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import deque
from typing import Callable

from cluster.load import Load
from cluster.registry import EndpointTable

#: seconds, on top of the refresh interval, between a heartbeat and its being read
READ_SLACK = 0.1
#: the response field an instance reports its live load in, on a WebSocket's 101
LOAD_HEADER = "X-Cluster-Load"
_NEVER = float("-inf")
_LOAD_FIELD = b"\r\n" + LOAD_HEADER.lower().encode("ascii") + b":"


class Placement:
    """Each endpoint's last known figure and the sessions placed since, as scores.

    Plain dicts, no lock: the door's greenlets run one at a time.
    """

    def __init__(self, self_hash: str | None, local: Callable[[], Load] | None,
                 read_at: Callable[[], float] = time.monotonic, lag: float = 0.5,
                 max_age: float = 10.0) -> None:
        self.self_hash = self_hash
        self.local = local
        #: when the current table was read (time.monotonic(); the watcher's read_at)
        self.read_at = read_at
        self.lag = lag + READ_SLACK
        #: a placement older than this is forgotten even without a newer figure: the
        #: endpoint's load has not moved materially since (cluster.load), so it is in
        self.max_age = max_age
        #: hash -> monotonic times of the sessions placed there after its figure
        self.opened: dict[str, deque[float]] = {}
        #: hash -> (figure, monotonic time it is as of, from a record or not)
        self.figures: dict[str, tuple[float, float, bool]] = {}
        self._table: EndpointTable | None = None
        self._score: Callable[[str], float] | None = None
        self._stamps: dict[str, dt.datetime] = {}

    def __repr__(self) -> str:
        counts = {h[:8]: len(q) for h, q in self.opened.items() if q}
        return f"<Placement placed since the last figure: {counts}>"

    def placed(self, endpoint_hash: str, now: float | None = None) -> None:
        """A new session went to ``endpoint_hash`` (called by the door)."""
        if endpoint_hash == self.self_hash:
            return  # counted live (self.local)
        now = time.monotonic() if now is None else now
        times = self.opened.get(endpoint_hash)
        if times is None:
            times = self.opened[endpoint_hash] = deque()
        while times and times[0] < now - self.max_age:
            times.popleft()
        times.append(now)

    def heard(self, endpoint_hash: str, figure: float, now: float | None = None) -> None:
        """The endpoint said its live load is ``figure`` (its 101's X-Cluster-Load)."""
        now = time.monotonic() if now is None else now
        known = self.figures.get(endpoint_hash)
        if known is None or known[1] <= now:
            self._set(endpoint_hash, figure, now, False)

    def _set(self, endpoint_hash: str, figure: float, since: float, record: bool) -> None:
        self.figures[endpoint_hash] = (figure, since, record)
        times = self.opened.get(endpoint_hash)
        while times and times[0] <= since:  # in the figure already
            times.popleft()

    def scores(self, table: EndpointTable) -> Callable[[str], float]:
        """The score of each endpoint of ``table`` by hash (routing.Scores).

        Made once per table, not per request: it reads the live dicts, which only
        :meth:`_rebase` replaces."""
        if table is not self._table or self._score is None:
            self._rebase(table)
            self._score = self._scorer()
        return self._score

    def _scorer(self) -> Callable[[str], float]:
        figures = self.figures
        opened = self.opened
        own = self.self_hash
        local = self.local

        def score(endpoint_hash: str) -> float:
            if endpoint_hash == own and local is not None:
                return local().score
            known = figures.get(endpoint_hash)
            times = opened.get(endpoint_hash)
            return (known[0] if known else 0.0) + (len(times) if times else 0)

        return score

    def _rebase(self, table: EndpointTable) -> None:
        """Take the figures of a new table's records, once per table (not per request)."""
        since = self.read_at() - self.lag
        stamps = {e.hash: e.timestamp for e in table.endpoints}
        for endpoints in table.by_service.values():
            known = [e.load.score for e in endpoints if e.load is not None]
            mean = sum(known) / len(known) if known else 0.0
            for e in endpoints:
                figure = e.load.score if e.load is not None else mean
                current = self.figures.get(e.hash)
                if stamps[e.hash] != self._stamps.get(e.hash):  # a newer record
                    if current is None or current[1] < since:
                        self._set(e.hash, figure, since, True)
                elif current is not None and current[2] and e.load is None:
                    # the mean of the others moved: an unknown load follows it
                    self.figures[e.hash] = (figure, current[1], True)
        self.opened = {h: q for h, q in self.opened.items() if h in stamps and q}
        self.figures = {h: f for h, f in self.figures.items() if h in stamps}
        self._stamps = stamps
        self._table = table


def load_field(raw_head: bytes) -> tuple[float | None, bytes]:
    """The X-Cluster-Load figure of a 101's head (None: absent or not a sane count), and
    the head without that field, in any case and however many times: it is for this
    balancer, not for the client (a proxy between may have changed the name's case)."""
    figure = None
    at = raw_head.lower().find(_LOAD_FIELD)
    while at >= 0:
        start = at + len(_LOAD_FIELD)
        end = raw_head.find(b"\r\n", start)
        end = len(raw_head) if end < 0 else end
        value = raw_head[start:end].strip()
        raw_head = raw_head[:at] + raw_head[end:]
        if figure is None and value.isdigit() and len(value) <= 8:
            figure = float(value)
        at = raw_head.lower().find(_LOAD_FIELD, at)
    return figure, raw_head
