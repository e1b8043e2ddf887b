"""Busy polling: after I/O the event loop polls for a while instead of going to sleep.

A proxy that sleeps in ``epoll_wait`` between messages lets its core halt, and every
message then has to wake that core: the sender's kernel sends an interrupt between
cores, which in a virtual machine is an exit to the hypervisor on both ends. With a
WebSocket echo through the balancer (bench/ws_bench.py) that wake-up, paid on the core
of the sending app and client, was most of what the proxy cost them. While the loop
keeps polling, a message only has to be queued, with no wake-up.

It costs CPU: up to ``window`` of polling after every burst of activity, i.e. a full
core under steady traffic. So it is off by default (HAProxy's ``busy-polling`` makes
the same trade, also off by default), for a balancer that has a core to itself.

How it works, on gevent's libev loop: an *idle* watcher, while active, makes the loop
poll with a zero timeout. It is started whenever the loop wakes from a sleeping poll
(a prepare watcher sees that before the next poll), and stopped once ``window`` has
passed with no event: it runs at the lowest priority, so it is only called in passes
with nothing else to do, and a gap in the loop's iteration count since its last call
means some pass had work.
"""

from __future__ import annotations

import logging

from gevent import get_hub

log = logging.getLogger(__name__)


class BusyPoll:
    """Keeps the current thread's gevent loop polling for ``window`` seconds after each
    pass that had work. :meth:`stop` returns it to sleeping polls."""

    __slots__ = ("loop", "window", "until", "last_empty", "stopped_idle", "idle", "prepare")

    def __init__(self, window: float) -> None:
        self.loop = loop = get_hub().loop
        self.window = window
        self.until = 0.0
        self.last_empty = -1
        self.stopped_idle = False
        self.idle = loop.idle()
        self.idle.priority = loop.MINPRI
        self.prepare = loop.prepare()
        self.prepare.ref = False  # it must not keep a finished loop running

    @staticmethod
    def supported() -> bool:
        loop = get_hub().loop
        return all(hasattr(loop, name) for name in ("idle", "prepare", "iteration", "MINPRI"))

    def start(self) -> BusyPoll:
        self.prepare.start(self._before_poll)
        return self

    def stop(self) -> None:
        self.prepare.stop()
        self.idle.stop()

    def _before_poll(self) -> None:
        if self.idle.active:
            return
        if self.stopped_idle:
            self.stopped_idle = False  # the window just ended: let this poll sleep
            return
        # The loop woke from a sleeping poll and had work: poll, not sleep, for a while.
        self.until = self.loop.now() + self.window
        self.last_empty = self.loop.iteration
        self.idle.start(self._nothing_to_do)

    def _nothing_to_do(self) -> None:
        loop = self.loop
        iteration = loop.iteration
        if iteration != self.last_empty + 1:
            self.until = loop.now() + self.window  # a pass since the last call had work
        elif loop.now() >= self.until:
            self.idle.stop()
            self.stopped_idle = True
        self.last_empty = iteration


def start_busy_poll(microseconds: int) -> BusyPoll | None:
    """The ``--busy-poll`` setting: None when it is 0 or the loop cannot do it."""
    if microseconds <= 0:
        return None
    if not BusyPoll.supported():
        log.warning("--busy-poll needs gevent's libev loop; polling as usual")
        return None
    return BusyPoll(microseconds / 1e6).start()
