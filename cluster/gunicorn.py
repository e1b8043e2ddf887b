"""Running under gunicorn: ``gunicorn -c python:cluster.gunicorn -w 2 myapp:app``.

This module is a gunicorn config module. It selects :class:`Worker` (gunicorn's
gevent worker whose server is cluster's front door, :mod:`cluster.door`) and sets
these hooks:

- ``when_ready`` (arbiter, once): starts one ``cluster register`` sidecar process that
  registers the server's endpoint and heartbeats while the server answers. One record
  per server, however many workers, and a worker recycling does not touch it.
- ``on_exit`` (arbiter): stops the sidecar by PID, which removes the record at once.
- metrics: unless ``PROMETHEUS_MULTIPROC_DIR`` is set, ``when_ready`` makes a temp
  directory for prometheus_client's multi-process mode (removed by ``on_exit``), so
  every worker's ``/_cluster/metrics`` sums all workers; ``child_exit`` drops a dead
  worker's live gauges.
- ``post_worker_init`` (each worker, after gevent has monkey-patched it): makes the
  worker's front door around the app, with an observing (non-registering) node.

The arbiter is never monkey-patched, so nothing here imports pymongo there: the
sidecar owns the store connection. Settings come from ``CLUSTER_*`` variables; the
endpoint URL defaults to gunicorn's first bound address. To combine with your own
config file: ``from cluster.gunicorn import *`` at its top.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any

from gunicorn.workers.ggevent import GeventPyWSGIWorker, PyWSGIHandler

from cluster.door import LocalHandler

log = logging.getLogger(__name__)

worker_class = "cluster.gunicorn.Worker"

_SIDECAR: dict[str, subprocess.Popen[bytes]] = {}
_METRICS_DIR: dict[str, str] = {}
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Handler(LocalHandler, PyWSGIHandler):  # type: ignore[misc]
    """Runs the local app: gunicorn's access logging and environ, cluster's door."""


class Worker(GeventPyWSGIWorker):  # type: ignore[misc]
    """gunicorn's gevent worker; ``post_worker_init`` sets its ``server_class`` to the
    front door bound to this worker's node."""

    wsgi_handler = Handler


def _endpoint_url(address: Any) -> str:
    """CLUSTER_ENDPOINT_URL, else the URL of gunicorn's first bound address."""
    from cluster.config import Settings

    settings = Settings.load(args=[])
    if settings.endpoint_url:
        return settings.endpoint_url
    if isinstance(address, tuple):
        return settings.replace(bind=f"{address[0]}:{address[1]}").own_endpoint_url
    raise RuntimeError("set CLUSTER_ENDPOINT_URL: gunicorn is bound to a unix socket")


def _health_url(address: Any) -> str:
    host, port = address[0], address[1]
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    from cluster.config import Settings

    return f"http://{host}:{port}{Settings.load(args=[]).admin_prefix}/status"


def when_ready(server: Any) -> None:
    # Before any worker is forked, so each imports prometheus_client in multi-process mode.
    if not os.environ.get(MULTIPROC_ENV):
        os.environ[MULTIPROC_ENV] = _METRICS_DIR["own"] = tempfile.mkdtemp(
            prefix="cluster-metrics-")
    address = server.LISTENERS[0].cfg_addr if server.LISTENERS else None
    endpoint = _endpoint_url(address)
    os.environ["CLUSTER_ENDPOINT_URL"] = endpoint  # the workers inherit the same identity
    argv = [sys.executable, "-m", "cluster", "register", "--endpoint-url", endpoint]
    if isinstance(address, tuple):
        argv += ["--health-url", _health_url(address)]
    _SIDECAR["proc"] = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    server.log.info("cluster: registering %s through sidecar pid %s", endpoint,
                    _SIDECAR["proc"].pid)


def child_exit(server: Any, worker: Any) -> None:
    """A worker is gone: its open connections and WebSockets no longer count."""
    from prometheus_client import multiprocess

    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        multiprocess.mark_process_dead(worker.pid, directory)  # type: ignore[no-untyped-call]


def on_exit(server: Any) -> None:
    own = _METRICS_DIR.pop("own", None)
    if own is not None:
        shutil.rmtree(own, ignore_errors=True)
    proc = _SIDECAR.pop("proc", None)
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    server.log.info("cluster: deregistered (sidecar pid %s exited %s)", proc.pid,
                    proc.returncode)


def post_worker_init(worker: Any) -> None:
    import functools

    from cluster import observe
    from cluster.config import Settings
    from cluster.door import DoorServer
    from cluster.node import Cluster
    from cluster.server import make_door

    settings = Settings.load(args=[])
    node = Cluster(settings, register=False).start()
    door = make_door(node, settings, worker.wsgi, observe.from_settings(settings))
    worker.cluster_door = door
    worker.server_class = functools.partial(DoorServer, door=door)
    worker.log.info("cluster: worker %s balancing %s as %s", worker.pid, settings.service,
                    node.self_url)


def worker_exit(server: Any, worker: Any) -> None:
    door = getattr(worker, "cluster_door", None)
    if door is not None:
        door.close()
        door.node.close()
