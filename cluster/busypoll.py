"""Busy polling: after I/O the event loop polls for a while instead of going to sleep.

A proxy that sleeps in ``epoll_wait`` between messages lets its core halt, and every
message then has to wake that core: the sender's kernel sends an interrupt between
cores, which in a virtual machine is an exit to the hypervisor on both ends. With a
WebSocket echo through the balancer (bench/ws_bench.py) that wake-up, paid on the core
of the sending app and client, was most of what the proxy cost them. While the loop
keeps polling, a message only has to be queued, with no wake-up.

Polling costs CPU, so the window adapts, by the rule of the Linux ``haltpoll`` cpuidle
governor (which does the same for a whole virtual CPU): it starts at zero; a wait for
the next event that was longer than the window but within ``longest`` doubles it (from
``longest / 4``), since polling that long would have caught the event; a wait longer
than ``longest`` halves it, down to zero. An idle instance, or one whose events come
further apart than ``longest``, sleeps as before and spends nothing; under steady
traffic it polls through the gaps. Each empty pass also yields the core
(``sched_yield``), so a process sharing it runs first.

How it works, on gevent's libev loop: an *idle* watcher, while active, makes the loop
poll with a zero timeout. A prepare watcher (called before every poll) starts it when
the loop wakes from a sleeping poll; the idle watcher stops itself once the window has
passed with no event: it runs at the lowest priority, so it is only called in passes
with nothing else to do, and a gap in the loop's iteration count since its last call
means some pass had work.
"""

from __future__ import annotations

import logging
import os

from gevent import get_hub

log = logging.getLogger(__name__)


def next_window(window: float, waited: float, longest: float) -> float:
    """The polling window after a wait of ``waited`` seconds for an event that did not
    come within ``window`` (haltpoll's rule)."""
    if waited <= longest:
        return min(longest, max(window * 2, longest / 4)) if waited > window else window
    shrunk = window / 2
    return shrunk if shrunk >= longest / 64 else 0.0


class BusyPoll:
    """Keeps the current thread's gevent loop polling, after each pass that had work,
    for a window that adapts to the gaps between events (at most ``longest`` seconds).
    :meth:`stop` returns it to sleeping polls."""

    __slots__ = ("loop", "longest", "window", "until", "last_empty", "idle_since",
                 "window_ran_out", "idle", "prepare")

    def __init__(self, longest: float) -> None:
        self.loop = loop = get_hub().loop
        self.longest = longest
        self.window = 0.0
        self.until = 0.0
        self.last_empty = -1
        self.idle_since: float | None = None  # set while the loop sleeps
        self.window_ran_out = False
        self.idle = loop.idle()
        self.idle.priority = loop.MINPRI
        self.prepare = loop.prepare()
        self.prepare.ref = False  # it must not keep a finished loop running

    @staticmethod
    def supported() -> bool:
        loop = get_hub().loop
        return all(hasattr(loop, name)
                   for name in ("idle", "prepare", "iteration", "MINPRI", "update_now"))

    def start(self) -> BusyPoll:
        self.prepare.start(self._before_poll)
        return self

    def stop(self) -> None:
        self.prepare.stop()
        self.idle.stop()

    def _before_poll(self) -> None:
        if self.idle.active:
            return
        loop = self.loop
        if self.window_ran_out:
            self.window_ran_out = False  # idle_since is when the last work was seen
            return
        if self.idle_since is not None:
            # The loop woke from a sleeping poll: adapt the window to that wait.
            self.window = next_window(self.window, loop.now() - self.idle_since, self.longest)
            self.idle_since = None
        if self.window > 0:
            self.until = loop.now() + self.window
            self.last_empty = loop.iteration
            self.idle.start(self._nothing_to_do)
        else:
            loop.update_now()
            self.idle_since = loop.now()

    def _nothing_to_do(self) -> None:
        loop = self.loop
        iteration = loop.iteration
        if iteration != self.last_empty + 1:
            self.until = loop.now() + self.window  # a pass since the last call had work
        elif loop.now() >= self.until:
            self.idle.stop()
            self.window_ran_out = True
            self.idle_since = self.until - self.window
        else:
            os.sched_yield()
        self.last_empty = iteration


def start_busy_poll(microseconds: int) -> BusyPoll | None:
    """The ``--busy-poll`` setting: None when it is 0 or the loop cannot do it."""
    if microseconds <= 0:
        return None
    if not BusyPoll.supported():
        log.warning("--busy-poll needs gevent's libev loop; polling as usual")
        return None
    return BusyPoll(microseconds / 1e6).start()
