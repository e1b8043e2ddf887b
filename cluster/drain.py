"""Draining one serving process: no new sessions, then its WebSockets closed, then a stop.

``cluster drain`` (SIGUSR2, or ``POST /_cluster/drain``) starts it. In order:

1. the record says ``draining: true`` (written and announced at once), and this
   process's own routing leaves itself out too, so no balancer places a new session or
   a request without a session here; requests of sessions already here (the sticky
   cookie, a ``/cluster-ddp/`` path) are still served;
2. after ``--drain-seconds`` its WebSockets are closed with 1001 (going away), one by
   one over ``--drain-close-seconds``, so their clients reconnect elsewhere without all
   arriving at once;
3. then the graceful stop of SIGTERM: the record is deleted, the listener closed, the
   requests in flight finished.

A SIGTERM during the drain stops at once, as it always does.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import gevent
import gevent.event

from cluster.errors import DiscoveryError

log = logging.getLogger(__name__)


class Drain:
    """The drain of one process's door (cluster.door.Door) and node (cluster.node.Cluster)."""

    def __init__(self, door: Any, node: Any, stopping: gevent.event.Event,
                 seconds: float, close_seconds: float) -> None:
        self.door = door
        self.node = node
        self.stopping = stopping
        self.seconds = seconds
        self.close_seconds = close_seconds
        #: time.time() when the drain started; None before
        self.since: float | None = None
        self._runner: gevent.Greenlet | None = None

    def __repr__(self) -> str:
        state = "idle" if self.since is None else f"draining for {time.time() - self.since:.1f}s"
        return f"<Drain {state}>"

    def start(self, why: str) -> bool:
        """Begin draining (False: it had begun already). Never raises: a store that
        fails now gets the record at the next heartbeat."""
        if self.since is not None or self.stopping.is_set():
            log.info("drain asked again (%s): %s", why,
                     "stopping already" if self.stopping.is_set() else repr(self))
            return False
        self.since = time.time()
        door = self.door
        door.policy = dataclasses.replace(door.policy, draining=True)
        door.admin.draining_since = self.since
        if self.node.registrar is not None:
            # in a greenlet of its own: a store that is down must not hold up the
            # answer to `cluster drain --url` (its write waits for the store's timeout)
            gevent.spawn(self._mark_record)
        log.info("draining (%s): no new sessions here; closing %d WebSockets with 1001 in "
                 "%.3gs over %.3gs, then stopping", why, len(door.open_websockets),
                 self.seconds, self.close_seconds)
        self._runner = gevent.spawn(self._run)
        return True

    def _mark_record(self) -> None:
        try:
            self.node.registrar.drain()
        except DiscoveryError as exc:
            log.warning("draining: could not mark the record now (the next heartbeat "
                        "will): %s", exc)

    def _run(self) -> None:
        if self.stopping.wait(self.seconds):
            return  # stopped meanwhile (SIGTERM): the stop closes what is open
        closed = close_gradually(self.door, self.close_seconds, self.stopping)
        log.info("drained: closed %d WebSockets with 1001; stopping", closed)
        self.stopping.set()

    def cancel(self) -> None:
        if self._runner is not None:
            self._runner.kill(block=False)


def close_gradually(door: Any, seconds: float, stopping: gevent.event.Event) -> int:
    """Close the door's open WebSockets with 1001 evenly over ``seconds`` (the same
    close as a stop's ``Door.going_away``); returns how many. Stops early when
    ``stopping`` is set: the stop then closes the rest at once."""
    sockets = list(door.open_websockets)
    if not sockets:
        return 0
    pause = seconds / len(sockets)
    closed = 0
    for index, socket in enumerate(sockets):
        if index and stopping.wait(pause):
            break
        if socket not in door.open_websockets:
            continue  # its client left by itself meanwhile
        try:
            socket.going_away()
        except Exception:  # noqa: BLE001 - one bad socket must not stop the others
            log.debug("closing a WebSocket failed", exc_info=True)
        closed += 1
    return closed
