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

Polling pays only on a core the loop has to itself. Where another process keeps the
core busy, a polling loop is always runnable and yields at every empty pass, so each
event waits out that process's time slice, where a sleeping loop would be woken ahead
of it: with a CPU-bound process pinned beside it, a polling balancer served about a
fifth of the requests one that sleeps did (bench/busy_poll_shared_core.py). So when
yields take longer than ``SHARED_GAP`` (the core went to someone else meanwhile)
``SHARED_YIELDS`` times within ``SHARED_SPAN``, polling stops for ``SHARED_PAUSE``;
then it is tried again. One long yield alone is no sign: a timer of another process or
the hypervisor taking the virtual CPU for a moment does that on a core that is free.

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
from time import perf_counter

from gevent import get_hub

log = logging.getLogger(__name__)

#: a yield with the core to itself takes a microsecond; this long, and another task
#: ran meanwhile (a time slice is 0.75-3 ms)
SHARED_GAP = 0.0005
#: that many long yields within SHARED_SPAN seconds: the core is shared
SHARED_YIELDS = 3
SHARED_SPAN = 0.1
#: how long polling stops once the core was found shared
SHARED_PAUSE = 1.0


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
                 "window_ran_out", "long_yields", "long_since", "paused_until", "idle",
                 "prepare")

    def __init__(self, longest: float) -> None:
        self.loop = loop = get_hub().loop
        self.longest = longest
        self.window = 0.0
        self.until = 0.0
        self.last_empty = -1
        self.idle_since: float | None = None  # set while the loop sleeps
        self.window_ran_out = False
        self.long_yields = 0  # yields that took long, since long_since
        self.long_since = 0.0
        self.paused_until = 0.0  # polling stopped until then: the core is shared
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
        if loop.now() < self.paused_until:
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
            started = perf_counter()
            os.sched_yield()
            if perf_counter() - started > SHARED_GAP:
                self._yield_took_long(loop.now())
        self.last_empty = iteration


    def _yield_took_long(self, now: float) -> None:
        """Another task had the core during a yield; a few times in a short while, and
        the core is not ours to poll on."""
        if now - self.long_since > SHARED_SPAN:
            self.long_yields, self.long_since = 0, now
        self.long_yields += 1
        if self.long_yields >= SHARED_YIELDS:
            self.idle.stop()
            self.window, self.idle_since = 0.0, None
            self.paused_until = now + SHARED_PAUSE
            self.long_yields = 0


def start_busy_poll(microseconds: int) -> BusyPoll | None:
    """The ``--busy-poll`` setting: None when it is 0 or the loop cannot do it."""
    if microseconds <= 0:
        return None
    if not BusyPoll.supported():
        log.warning("--busy-poll needs gevent's libev loop; polling as usual")
        return None
    return BusyPoll(microseconds / 1e6).start()
