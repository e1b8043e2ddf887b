"""``cluster serve --workers-count N``: N worker processes behind one public port.

The parent binds the public socket, starts N ``cluster serve`` children and restarts
any that dies. Each child accepts on the shared public socket *and* on a private port
of its own, which it registers as its own endpoint. A request accepted on the public
port is routed like any other (sticky cookie, ``/cluster-ddp/<hash>/``), so a session
stays in the one process that holds its state - a shared socket alone would scatter
a SockJS session over the workers. This mirrors meteorhacks:cluster's workers.

The parent registers nothing; if it is killed, the children notice and stop.

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
import tempfile
import time
from typing import Any

import gevent
import gevent.event

from cluster.config import Settings, to_environment

log = logging.getLogger(__name__)

#: environment handed to a worker: the inherited public socket and its parent
SHARED_FD_ENV = "_CLUSTER_SHARED_FD"
PARENT_PID_ENV = "_CLUSTER_PARENT_PID"

RESTART_DELAY = 1.0

#: prometheus_client's multi-process directory (read when a worker imports it)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def worker_environment(settings: Settings, shared_fd: int) -> dict[str, str]:
    """The environment of one worker: the parent's settings, one process, a private port."""
    host, _ = settings.bind_address
    # The parent writes --port-file (the public port); a worker must not overwrite it.
    worker = settings.replace(workers_count=1, bind=f"{host}:0", endpoint_url=None,
                              port_file=None)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTER_")}
    env.update(to_environment(worker))
    if settings.endpoint_url:
        # The worker's endpoint keeps the configured host, with its own port.
        env["_CLUSTER_ENDPOINT_BASE"] = settings.endpoint_url
    env[SHARED_FD_ENV] = str(shared_fd)
    env[PARENT_PID_ENV] = str(os.getpid())
    return env


def run_workers(settings: Settings, listener: Any) -> int:
    """Supervise the workers until SIGTERM/SIGINT; returns the exit status."""
    fd = listener.fileno()
    os.set_inheritable(fd, True)
    env = worker_environment(settings, fd)
    metrics_dir = env.get(MULTIPROC_ENV)
    own_metrics_dir = not metrics_dir
    if own_metrics_dir:
        metrics_dir = env[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="cluster-metrics-")
    try:
        return _supervise(settings, listener, env, fd, str(metrics_dir))
    finally:
        if own_metrics_dir:
            shutil.rmtree(str(metrics_dir), ignore_errors=True)


def _forget_worker(pid: int, metrics_dir: str) -> None:
    """Drop a dead worker's live gauges (open connections, WebSockets) from the sums."""
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
    except OSError as exc:
        log.debug("could not drop the metrics of worker pid %d: %s", pid, exc)


def _supervise(settings: Settings, listener: Any, env: dict[str, str], fd: int,
               metrics_dir: str) -> int:
    argv = [sys.executable, "-m", "cluster", "serve"]
    stopping = gevent.event.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stopping.set)
    children: list[subprocess.Popen[bytes] | None] = [None] * settings.workers_count

    def spawn(slot: int) -> None:
        children[slot] = subprocess.Popen(argv, env=env, pass_fds=(fd,),
                                          stdin=subprocess.DEVNULL)
        log.info("worker %d started (pid %d)", slot, children[slot].pid)  # type: ignore[union-attr]

    for slot in range(settings.workers_count):
        spawn(slot)
    log.info("%d workers share http://%s", settings.workers_count, settings.bind)
    while not stopping.wait(0.5):
        for slot, child in enumerate(children):
            if child is not None and child.poll() is not None:
                log.warning("worker %d (pid %d) exited with %s; restarting", slot, child.pid,
                            child.returncode)
                _forget_worker(child.pid, metrics_dir)
                stopping.wait(RESTART_DELAY)
                if not stopping.is_set():
                    spawn(slot)
    log.info("stopping %d workers", len(children))
    for child in children:
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for child in children:
        if child is None:
            continue
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(5)
    listener.close()
    return 0


def watch_parent(parent_pid: int, stopping: gevent.event.Event) -> None:
    """Stop this worker when its parent is gone (so no orphan keeps a record alive)."""
    while not stopping.wait(1.0):
        if os.getppid() != parent_pid:
            log.warning("parent %d is gone; stopping", parent_pid)
            stopping.set()
