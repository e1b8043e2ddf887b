"""Running under gunicorn: ``gunicorn -c python:cluster.gunicorn -w 2 myapp:app``.

This module is a gunicorn config module. It selects :class:`Worker` (gunicorn's
gevent pywsgi worker with cluster's handler) and sets three hooks:

- ``when_ready`` (arbiter, once): starts one ``cluster register`` sidecar process that
  registers the server's endpoint and heartbeats while the server answers. One record
  per server, however many workers, and a worker recycling does not touch it.
- ``on_exit`` (arbiter): stops the sidecar by PID, which removes the record at once.
- ``post_worker_init`` (each worker, after gevent has monkey-patched it): wraps the
  app in :class:`~cluster.app.ClusterApp` with an observing (non-registering) node.

The arbiter is never monkey-patched, so nothing here imports pymongo there: the
sidecar owns the store connection. Settings come from ``CLUSTER_*`` variables; the
endpoint URL defaults to gunicorn's first bound address. To combine with your own
config file: ``from cluster.gunicorn import *`` at its top.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from typing import Any

from gunicorn.workers.ggevent import GeventPyWSGIWorker, PyWSGIHandler

from cluster.handler import ClusterHandler

log = logging.getLogger(__name__)

worker_class = "cluster.gunicorn.Worker"

_SIDECAR: dict[str, subprocess.Popen[bytes]] = {}


class Handler(ClusterHandler, PyWSGIHandler):  # type: ignore[misc]
    """gunicorn's access logging and environ, plus cluster's NODELAY and hijack."""


class Worker(GeventPyWSGIWorker):  # type: ignore[misc]
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
    return f"http://{host}:{port}/_cluster/status"


def when_ready(server: Any) -> None:
    address = server.LISTENERS[0].cfg_addr if server.LISTENERS else None
    endpoint = _endpoint_url(address)
    os.environ["CLUSTER_ENDPOINT_URL"] = endpoint  # the workers inherit the same identity
    argv = [sys.executable, "-m", "cluster", "register", "--endpoint-url", endpoint]
    if isinstance(address, tuple):
        argv += ["--health-url", _health_url(address)]
    _SIDECAR["proc"] = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    server.log.info("cluster: registering %s through sidecar pid %s", endpoint,
                    _SIDECAR["proc"].pid)


def on_exit(server: Any) -> None:
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
    from cluster.app import ClusterApp
    from cluster.config import Settings
    from cluster.node import Cluster

    settings = Settings.load(args=[])
    node = Cluster(settings, register=False).start()
    worker.wsgi = ClusterApp(worker.wsgi, node)
    worker.log.info("cluster: worker %s balancing %s as %s", worker.pid, settings.service,
                    node.self_url)


def worker_exit(server: Any, worker: Any) -> None:
    app = getattr(worker, "wsgi", None)
    close = getattr(app, "close", None)
    if close is not None:
        close()
