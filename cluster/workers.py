"""``cluster serve --workers-count N``: N worker processes behind one public port.

The parent binds the public socket, starts N ``cluster serve`` children and restarts
any that dies. Each child accepts on the shared public socket *and* on a private port
of its own, which it registers as its own endpoint. A request accepted on the public
port is routed like any other (sticky cookie, ``/cluster-ddp/<hash>/``), so a session
stays in the one process that holds its state - a shared socket alone would scatter
a SockJS session over the workers. This mirrors meteorhacks:cluster's workers.

Supervision policy:

- A worker that dies is restarted after a delay that doubles with each death in a row
  (0.5 s, 1 s, 2 s ... up to 30 s), one log line per step, so a crash-looping worker
  (a bad deploy, a missing file) neither burns a core nor floods the log. A worker
  that stayed up for :data:`STABLE_SECONDS` starts again from the shortest delay.
- SIGHUP replaces the workers one by one: a new worker is started (loading the code
  anew), and only once it listens and is registered is the old one sent SIGTERM, on
  which it deregisters and drains. If the new one does not come up, the old one stays.
- The parent registers nothing; if it is killed, the children notice and stop.

Metrics: the parent points every worker at one ``PROMETHEUS_MULTIPROC_DIR`` (a temp
directory it creates and removes, unless one is set already), so any worker's
``/_cluster/metrics`` sums them all; when a worker dies its live gauges are dropped.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import gevent
import gevent.event
import gevent.select

from cluster.config import Settings, host_port, to_environment
from cluster.conn import HEAD, IDLE, LINGER
from cluster.metricsdir import make_metrics_dir

if TYPE_CHECKING:
    from cluster.door import Door
    from cluster.node import Cluster

log = logging.getLogger(__name__)

#: environment handed to a worker: the inherited public socket and its parent
SHARED_FD_ENV = "_CLUSTER_SHARED_FD"
PARENT_PID_ENV = "_CLUSTER_PARENT_PID"
#: write end of a pipe on which a worker started by a reload says it is ready
READY_FD_ENV = "_CLUSTER_READY_FD"

#: first restart delay; it doubles with each death in a row, up to MAX_RESTART_DELAY
RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
#: a worker up this long is healthy again: its next restart delay is the first one
STABLE_SECONDS = 10.0
#: how long a reload waits for a new worker to listen and register
READY_TIMEOUT = 60.0
#: seconds past --graceful-timeout that stopping waits for the workers before SIGKILL
#: (their deregistration and store close: 2 s at most each, cluster.registry)
STOP_MARGIN = 10.0


def restart_delay(failures: int) -> float:
    """The delay before restarting a worker that died ``failures`` times in a row."""
    return min(MAX_RESTART_DELAY, RESTART_DELAY * 2.0 ** max(0, failures - 1))


#: prometheus_client's multi-process directory (read when a worker imports it)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def worker_environment(settings: Settings, shared_fd: int) -> dict[str, str]:
    """The environment of one worker: the parent's settings, one process, a private port."""
    host, _ = settings.bind_address
    # The parent writes --port-file (the public port); a worker must not overwrite it.
    # --busy-poll auto is decided here, where the number of workers is known.
    worker = settings.replace(workers_count=1, bind=host_port(host, 0), endpoint_url=None,
                              port_file=None, busy_poll=settings.busy_poll_microseconds())
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTER_")}
    env.update(to_environment(worker))
    if settings.endpoint_url:
        # The worker's endpoint keeps the configured host, with its own port.
        env["_CLUSTER_ENDPOINT_BASE"] = settings.endpoint_url
    env[SHARED_FD_ENV] = str(shared_fd)
    env[PARENT_PID_ENV] = str(os.getpid())
    return env


@dataclass
class _Slot:
    """One worker position: its process, when it started, its deaths in a row."""

    index: int
    child: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float | None = None


class Supervisor:
    """Starts, restarts (with back-off) and reloads the workers of one public socket."""

    def __init__(self, settings: Settings, listener: Any, metrics_dir: str | None = None
                 ) -> None:
        self.settings = settings
        self.listener = listener
        self.fd = listener.fileno()
        os.set_inheritable(self.fd, True)
        self.env = worker_environment(settings, self.fd)
        self.metrics_dir = metrics_dir or self.env.get(MULTIPROC_ENV)
        if self.metrics_dir:
            self.env[MULTIPROC_ENV] = self.metrics_dir
        self.argv = [sys.executable, "-m", "cluster", "serve"]
        self.slots = [_Slot(i) for i in range(settings.workers_count)]
        #: old workers told to stop by a reload, draining; reaped, never restarted
        self.retiring: list[subprocess.Popen[bytes]] = []
        self.stopping = gevent.event.Event()
        self.reload_wanted = gevent.event.Event()
        #: SIGUSR2: every worker drains (cluster.drain); none is restarted, and the
        #: supervisor exits once they all have
        self.drain_wanted = gevent.event.Event()
        self.draining = False
        #: SIGQUIT: the workers stop without waiting for their requests
        self.at_once = False

    def __repr__(self) -> str:
        alive = sum(1 for s in self.slots if s.child is not None and s.child.poll() is None)
        return (f"<Supervisor [{alive}/{len(self.slots)} workers | "
                f"{len(self.retiring)} retiring]>")

    def _start(self, ready_fd: int | None = None) -> subprocess.Popen[bytes]:
        env = self.env
        fds: tuple[int, ...] = (self.fd,)
        if ready_fd is not None:
            env = dict(env, **{READY_FD_ENV: str(ready_fd)})
            fds = (self.fd, ready_fd)
        return subprocess.Popen(self.argv, env=env, pass_fds=fds, stdin=subprocess.DEVNULL)

    def spawn(self, slot: _Slot) -> None:
        slot.child = self._start()
        slot.started = time.monotonic()
        slot.restart_at = None
        log.info("worker %d started (pid %d)", slot.index, slot.child.pid)

    def check(self, slot: _Slot, now: float) -> None:
        """Notice a dead worker and schedule its restart; restart it when due."""
        child = slot.child
        if child is not None and child.poll() is not None:
            uptime = now - slot.started
            if uptime >= STABLE_SECONDS:
                slot.failures = 0
            slot.failures += 1
            delay = restart_delay(slot.failures)
            slot.child, slot.restart_at = None, now + delay
            self.forget(child.pid)
            log.warning("worker %d (pid %d) exited with %s after %.1fs; restarting in %.1fs%s",
                        slot.index, child.pid, child.returncode, uptime, delay,
                        f" (died {slot.failures} times in a row)" if slot.failures > 1 else "")
        if slot.child is None and slot.restart_at is not None and now >= slot.restart_at:
            self.spawn(slot)

    def forget(self, pid: int) -> None:
        """Drop a dead worker's live gauges (open connections, WebSockets) from the sums."""
        if not self.metrics_dir:
            return
        from prometheus_client import multiprocess

        try:
            multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]
        except OSError as exc:
            log.debug("could not drop the metrics of worker pid %d: %s", pid, exc)

    def reload(self) -> None:
        """Replace each worker by a new one, one at a time, with no request lost."""
        log.info("reloading %d workers one by one", len(self.slots))
        for slot in self.slots:
            if self.stopping.is_set():
                return
            read_fd, write_fd = os.pipe()
            try:
                new = self._start(write_fd)
            finally:
                os.close(write_fd)
            try:
                ready = self._wait_ready(new, read_fd)
            finally:
                os.close(read_fd)
            if ready is None and self.stopping.is_set():
                # a stop asked meanwhile, not a failure: the new worker stops with the
                # others (and as they do: SIGQUIT's quick stop too), not before them
                log.info("reload cut short by the stop: the new worker (pid %d) stops "
                         "with the others", new.pid)
                self.retiring.append(new)
                return
            if ready is None:
                log.error("reload: the new worker (pid %d) did not come up; keeping worker %d "
                          "and stopping the reload", new.pid, slot.index)
                _terminate([new], timeout=5.0)
                return
            old, slot.child, slot.started, slot.failures = slot.child, new, time.monotonic(), 0
            slot.restart_at = None
            log.info("reload: worker %d is now pid %d (%s)", slot.index, new.pid, ready)
            if old is not None and old.poll() is None:
                old.send_signal(signal.SIGTERM)  # it deregisters, then drains
                self.retiring.append(old)
        log.info("reload done")

    def drain(self) -> None:
        """Pass SIGUSR2 on to every worker: each drains, then stops; none is restarted."""
        self.draining = True
        live = [s.child for s in self.slots if s.child is not None and s.child.poll() is None]
        log.info("draining %d workers (SIGUSR2 to each); they stop when drained", len(live))
        for child in live + [c for c in self.retiring if c.poll() is None]:
            child.send_signal(signal.SIGUSR2)

    def _wait_ready(self, child: subprocess.Popen[bytes], read_fd: int) -> str | None:
        """The new worker's ready line, or None if it died or took too long."""
        deadline = time.monotonic() + READY_TIMEOUT
        data = b""
        while time.monotonic() < deadline and not self.stopping.is_set():
            if child.poll() is not None:
                return None
            readable, _, _ = gevent.select.select([read_fd], [], [], 0.2)
            if readable:
                chunk = os.read(read_fd, 512)
                if not chunk:
                    return None
                data += chunk
                if b"\n" in data:
                    return data.decode(errors="replace").strip()
        return None

    def quick_stop(self, why: str = "SIGQUIT") -> None:
        """SIGQUIT: stop every worker at once (each deregisters, then closes what is
        open without waiting for its requests)."""
        if self.stopping.is_set() and not self.at_once:
            # during a graceful stop (TERM, then QUIT when it takes too long): the
            # workers, draining, are told to stop at once too
            log.info("%s: the workers stop at once", why)
            for child in [s.child for s in self.slots if s.child is not None] + self.retiring:
                if child.poll() is None:
                    child.send_signal(quick_stop_signal(child.pid))
        self.at_once = True
        self.stopping.set()

    def interrupted(self) -> None:
        """SIGINT (Ctrl-C): the graceful stop; a second one during it, the quick stop."""
        if self.stopping.is_set():
            self.quick_stop("a second SIGINT")
        else:
            self.stopping.set()

    def reopen_logs(self) -> None:
        """SIGUSR1: each worker reopens its access log file. Not to a worker still
        starting, which does not handle it yet: its default action ended the worker
        (a log rotation's USR1 just after a restart killed the new worker, counted as a
        crash); that worker opens its log file after the rotation anyway."""
        for child in [s.child for s in self.slots if s.child is not None] + self.retiring:
            if child.poll() is None and catches(child.pid, signal.SIGUSR1):
                child.send_signal(signal.SIGUSR1)

    def run(self, ready: Callable[[], None] | None = None) -> int:
        """Supervise until SIGTERM/SIGINT; returns the exit status. ``ready`` is called
        once the signals are handled (it announces the instance: port and pid files)."""
        gevent.signal_handler(signal.SIGTERM, self.stopping.set)
        gevent.signal_handler(signal.SIGINT, self.interrupted)
        gevent.signal_handler(signal.SIGQUIT, self.quick_stop)
        gevent.signal_handler(signal.SIGHUP, self.reload_wanted.set)
        gevent.signal_handler(signal.SIGUSR2, self.drain_wanted.set)
        gevent.signal_handler(signal.SIGUSR1, self.reopen_logs)
        if ready is not None:
            ready()
        for slot in self.slots:
            self.spawn(slot)
        log.info("%d workers share http://%s (SIGHUP reloads them one by one)",
                 len(self.slots), self.settings.bind)
        while not self.stopping.wait(0.2):
            if self.drain_wanted.is_set() and not self.draining:
                self.drain()
            if self.draining:
                if all(s.child is None or s.child.poll() is not None for s in self.slots):
                    log.info("every worker has drained and stopped")
                    break
                continue
            if self.reload_wanted.is_set():
                self.reload_wanted.clear()
                self.reload()
            now = time.monotonic()
            for slot in self.slots:
                self.check(slot, now)
            for gone in [c for c in self.retiring if c.poll() is not None]:
                self.forget(gone.pid)
                self.retiring.remove(gone)
        log.info("stopping %d workers%s", len(self.slots), " at once" if self.at_once else "")
        # No worker is started from here on: our copy of the shared listener goes now,
        # so that once each worker has closed its own (at the start of its stop) a new
        # connection is refused at once, as by a single process. Kept until the workers
        # had drained, it was accepted into the backlog and reset only then, after
        # --graceful-timeout when a request or a WebSocket held a worker that long.
        self.listener.close()
        children = [s.child for s in self.slots if s.child is not None] + self.retiring
        # each drains for --graceful-timeout (SIGQUIT: not at all), then deregisters and
        # closes its store
        _terminate(children, timeout=(0.0 if self.at_once else self.settings.graceful_timeout)
                   + STOP_MARGIN, signum=signal.SIGQUIT if self.at_once else signal.SIGTERM)
        return 0


def catches(pid: int, signum: int) -> bool:
    """Does process ``pid`` catch (or ignore, or block) ``signum``, so that it does not
    die of it? From /proc/PID/status; True where /proc cannot tell."""
    try:
        status = Path(f"/proc/{pid}/status").read_text(errors="replace")
    except OSError:
        return True
    bit = 1 << (signum - 1)
    masks = []
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name in ("SigCgt", "SigIgn", "SigBlk"):
            try:
                masks.append(int(value.strip(), 16))
            except ValueError:
                return True
    return len(masks) < 3 or any(mask & bit for mask in masks)


def quick_stop_signal(pid: int) -> int:
    """SIGQUIT for a worker that handles it, SIGTERM for one still starting: SIGQUIT's
    default action is a core dump (it has no record to remove yet, nor requests)."""
    return signal.SIGQUIT if catches(pid, signal.SIGQUIT) else signal.SIGTERM


def _terminate(children: list[subprocess.Popen[bytes]], timeout: float,
               signum: int = signal.SIGTERM) -> None:
    """``signum`` to each, wait up to ``timeout`` in all, then SIGKILL what is left."""
    for child in children:
        if child.poll() is None:
            child.send_signal(quick_stop_signal(child.pid) if signum == signal.SIGQUIT
                              else signum)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(5)


def run_workers(settings: Settings, listener: Any,
                ready: Callable[[], None] | None = None) -> int:
    """Supervise the workers until SIGTERM/SIGINT; returns the exit status. ``ready``:
    see :meth:`Supervisor.run`."""
    metrics_dir = os.environ.get(MULTIPROC_ENV)
    own_metrics_dir = None if metrics_dir else make_metrics_dir()
    try:
        return Supervisor(settings, listener, metrics_dir or own_metrics_dir).run(ready)
    finally:
        if own_metrics_dir:
            shutil.rmtree(own_metrics_dir, ignore_errors=True)


def settle(node: Cluster, timeout: float = 10.0, stopping: Any = None) -> None:
    """Wait until this worker is registered and every peer has refreshed its table once.

    A worker that served the shared port at once would hand out sticky cookies naming
    itself before the other workers' tables had its record; a peer would then treat
    such a cookie as unknown and serve the request itself ("Invalid session" for a
    Socket.IO poll). One refresh interval after the first heartbeat, every live peer
    has read the record. Without a store it gives up after ``timeout``, and at once
    when ``stopping`` (an Event) is set: a SIGTERM to a worker starting while the
    store does not answer waited out those 10 s before its stop began, and one that
    came after the first heartbeat waited out the refresh interval (up to 5 s) with
    its record in the store before deregistering.
    """
    registrar = node.registrar
    deadline = time.monotonic() + timeout
    while registrar is not None and registrar.beats == 0 and time.monotonic() < deadline:
        if stopping is not None and stopping.is_set():
            return
        gevent.sleep(0.02)
    if registrar is not None and registrar.beats:
        pause = node.watcher.refresh_interval + 0.1
        if stopping is not None:
            stopping.wait(pause)
        else:
            gevent.sleep(pause)


def notify_ready(node: Cluster, timeout: float = 10.0, stopping: Any = None) -> None:
    """In a worker started by a reload: tell the parent it listens and is registered.

    Waits (up to ``timeout``) for the first heartbeat to land, so that the old worker
    is only stopped once this one can be found; without a store it says ready anyway:
    it serves the shared port all the same.
    """
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is None or not fd.isdigit():
        return
    registrar = node.registrar
    deadline = time.monotonic() + timeout
    while registrar is not None and registrar.beats == 0 and time.monotonic() < deadline:
        if stopping is not None and stopping.is_set():
            os.close(int(fd))  # stopping before it was ready (as settle): not ready
            return
        gevent.sleep(0.02)
    try:
        os.write(int(fd), f"ready {node.self_url}\n".encode())
    except OSError as exc:  # the parent gave up waiting: it stops this worker itself
        log.debug("could not report readiness: %s", exc)
    finally:
        os.close(int(fd))


#: how long a keep-alive connection must have been idle before a stop closes it
QUIET_SECONDS = 1.0


def close_idle_connections(door: Door, done: gevent.event.Event,
                           interval: float = 0.1, quiet: float = QUIET_SECONDS) -> None:
    """While draining, close keep-alive connections waiting for their next request
    once they have been idle for ``quiet`` seconds, and at once those only draining
    what a client still sends after its last answer.

    The drain then lasts as long as the requests in flight, not as long as idle
    clients (a peer's pooled connections, a browser's keep-alive) keep their sockets
    open; a client whose idle connection is closed opens a new one, which reaches a
    process that still accepts. Closing a connection idle for a moment only would race
    a busy client's next request (sent as the close crosses it, it is lost: a reset,
    or a 502 for a peer that relayed a POST): such a client sends it within ``quiet``,
    and it is answered with Connection: close (Connection.one_request).
    """
    while True:
        now = time.monotonic()
        for conn in list(door.sweeper.conns):
            if conn.phase == LINGER or (not conn.buf and now - conn.idle_since >= quiet and (
                    conn.phase == IDLE or (conn.phase == HEAD and not conn.requests))):
                # (HEAD with nothing read: a connection opened and never used, as a
                # browser's preconnect; it held a stop for --header-timeout)
                conn.close()
        if done.wait(interval):
            return


def handle_sighup(worker: bool) -> None:
    """SIGHUP in a process that is not a supervisor: never die of it.

    A worker leaves reloading to its parent (a HUP sent to the whole process group, as
    a closing terminal does, must not kill the workers under the reload). A single
    process cannot start its own replacement: it says so and keeps serving.
    """
    if worker:
        gevent.signal_handler(signal.SIGHUP, lambda: None)
        return
    gevent.signal_handler(signal.SIGHUP, lambda: log.warning(
        "SIGHUP ignored: reloading without a failed request needs --workers-count 2 or "
        "more (a supervisor starts the new code before stopping the old)"))


def watch_parent(parent_pid: int, stopping: gevent.event.Event) -> None:
    """Stop this worker when its parent is gone (so no orphan keeps a record alive)."""
    while not stopping.wait(1.0):
        if os.getppid() != parent_pid:
            log.warning("parent %d is gone; stopping", parent_pid)
            stopping.set()
