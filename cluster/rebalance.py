"""Rebalancing of long-lived connections (``--rebalance on``): shed WebSockets to newcomers.

WebSockets stay where they first landed, so after a scale-up the new instance gets only
new sessions while the old ones stay loaded for hours. With rebalancing on, an
instance whose own WebSockets exceed ``--rebalance-margin`` times the mean of its
service (its live count against the others' advertised loads, cluster.load) closes
its oldest ones with 1001 (going away), at most ``--rebalance-rate`` per second, until
it is down to the mean as it stood when it began (a thermostat: starting above the
margin and stopping at the mean keeps small differences from causing churn, and the
mean is held because the others' figures lag the sockets in flight). Their clients
reconnect through a balancer, which places them by load (cluster.placement), mostly
on the newcomer. A socket whose client's sticky cookie names this instance (a browser
that loaded its page here; any client that kept the cookie) is *pinned*: its
reconnect would come straight back here, as the cookie promises, so it is never
closed; closing such sockets at the rate was a stream of disconnects that moved no
one. An episode that runs out of other sockets ends there, with one line. A socket
that is not pinned is a new session's first one, and its 101 set the cookie too
(cluster.door): a client that keeps cookies (a browser, Socket.IO's client with
credentials) comes straight back as well, pinned. When half the sockets an episode
closed have come back so (pinned arrivals beyond the pace of new sessions before the
episode), its clients keep the cookie: the episode stops, with one line, and none
starts again until the service is in balance (closing on would disconnect each of
them once and move none). An imbalance must last ``settle`` seconds (two heartbeats
and a refresh) before anything is closed: while sessions pour in, an instance's live
count runs ahead of the others' published figures, and that is no reason to move
anyone.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from typing import Any, Sequence

from cluster.load import LocalLoad
from cluster.records import Endpoint

log = logging.getLogger(__name__)

#: seconds between two looks at the balance
TICK = 0.25


def shed_target(own: int, others: Sequence[int], margin: float) -> int | None:
    """The count to shed down to, or None when ``own`` is within ``margin`` of the mean.

    ``others``: the WebSockets of the service's other instances whose load is known.
    """
    if not others:
        return None
    mean = (own + sum(others)) / (len(others) + 1)
    if own > margin * mean and own - mean >= 1:
        return math.ceil(mean)
    return None


class Rebalancer:
    """The loop that sheds this instance's WebSockets (see the module docstring)."""

    def __init__(self, node: Any, service: str, self_hash: str, load: LocalLoad,
                 margin: float, rate: float, settle: float = 2.5) -> None:
        self.node = node
        self.service = service
        self.self_hash = self_hash
        self.load = load
        self.margin = margin
        self.rate = rate
        self.settle = settle
        #: since when (time.monotonic()) this instance has been above the margin
        self.over_since: float | None = None
        #: the count an episode sheds down to (None: balanced)
        self.target: int | None = None
        self.closed = 0
        self._budget = 0.0
        self._last = time.monotonic()
        self._episode_closed = 0
        #: the pinned sockets have been reported for this imbalance (said once)
        self._told_pinned = False
        #: load.pinned_opened when the imbalance was first seen, and when the episode
        #: began; the rate they arrived at in between (new sessions whose page came
        #: from here, not clients coming back), and when the episode began
        self._opened_seen = 0
        self._opened_before = 0
        self._arriving = 0.0
        self._began = 0.0
        #: the clients closed in this imbalance came straight back: close no more
        self._futile = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        state = f"shedding to {self.target}" if self.target is not None else "balanced"
        return f"<Rebalancer {self.service} [{state} | closed {self.closed}]>"

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cluster-rebalancer",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def _run(self) -> None:
        while not self._stopping.wait(TICK):
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad step
                log.exception("rebalancing step failed")

    def _figures(self, endpoints: Sequence[Endpoint]) -> tuple[int, list[int]] | None:
        """(this instance's published WebSockets, the others' published ones whose load
        is known); None while this instance is not listed with a load, or drains.
        Draining instances are not counted: their sessions are leaving anyway."""
        own = [e for e in endpoints if e.hash == self.self_hash]
        if not own or own[0].load is None or own[0].draining:
            return None
        return own[0].load.sockets, [e.load.sockets for e in endpoints
                                     if e.hash != self.self_hash and e.load is not None
                                     and not e.draining]

    def step(self) -> int:
        """One look: close what the rate allows; returns how many were closed."""
        now = time.monotonic()
        elapsed, self._last = now - self._last, now
        figures = self._figures(self.node.table.by_service.get(self.service, ()))
        own = len(self.load.websockets)
        if self.target is None:
            self._budget = 0.0
            # Published figures on both sides: they lag the sockets alike, where this
            # instance's live count would run ahead of the others' while sessions pour in.
            target = shed_target(figures[0], figures[1], self.margin) if figures else None
            if target is None or figures is None:
                self.over_since = None
                self._told_pinned = self._futile = False
                return 0
            if self.over_since is None:
                self.over_since = now
                self._opened_seen = self.load.pinned_opened
            if now - self.over_since < self.settle or self._futile:
                return 0
            if not self._movable(1):
                if not self._told_pinned:
                    self._told_pinned = True
                    log.info("rebalancing: %d WebSockets here, more than %s's mean, but "
                             "every one is pinned here by its client's sticky cookie (it "
                             "would reconnect here): none closed", own, self.service)
                return 0
            self._arriving = (self.load.pinned_opened - self._opened_seen) / max(
                now - self.over_since, TICK)
            self.over_since = None
            self.target, self._episode_closed = target, 0
            self._opened_before, self._began = self.load.pinned_opened, now
            others = figures[1]
            log.info("rebalancing: %d WebSockets here, %.1f on average over %d instances "
                     "of %s; closing up to %g/s with 1001 until %d", own,
                     (figures[0] + sum(others)) / (len(others) + 1), len(others) + 1,
                     self.service, self.rate, target)
            return 0  # the rate's budget counts from now
        if own <= self.target or figures is None:
            log.info("rebalanced: closed %d WebSockets, %d left here",
                     self._episode_closed, own)
            self.target = None
            return 0
        # pinned arrivals beyond the pace they had before the episode: clients it closed
        returned = (self.load.pinned_opened - self._opened_before
                    - self._arriving * (now - self._began))
        if self._episode_closed >= 2 and 2 * returned >= self._episode_closed:
            log.info("rebalancing stopped: %d of the %d WebSockets closed came straight "
                     "back, pinned here by the sticky cookie their 101 set (their clients "
                     "keep it); %d left here", min(round(returned), self._episode_closed),
                     self._episode_closed, own)
            self.target = None
            self._futile = True
            return 0
        self._budget = min(self._budget + self.rate * elapsed, max(1.0, self.rate))
        count = min(int(self._budget), own - self.target)
        if count <= 0:
            return 0
        oldest = self._movable(count)
        if not oldest:
            log.info("rebalanced: closed %d WebSockets; the %d left here are pinned here "
                     "by their clients' sticky cookie", self._episode_closed, own)
            self.target = None
            self._told_pinned = True
            return 0
        self._budget -= len(oldest)
        for socket in oldest:
            self.load.websockets.pop(socket, None)  # counted as gone from now on
            try:
                socket.going_away()
            except Exception:  # noqa: BLE001 - one bad socket must not stop the others
                log.debug("closing a WebSocket failed", exc_info=True)
        self.closed += len(oldest)
        self._episode_closed += len(oldest)
        return len(oldest)

    def _movable(self, count: int) -> list[Any]:
        """The ``count`` oldest sockets that are not pinned here."""
        return list(itertools.islice(
            (socket for socket, pinned in self.load.websockets.items() if not pinned), count))
