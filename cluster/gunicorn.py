"""Running under gunicorn: ``gunicorn -c python:cluster.gunicorn -w 2 myapp:app``.

This module is a gunicorn config module. It selects :class:`Worker` (gunicorn's
gevent worker whose server is cluster's front door, :mod:`cluster.door`) and sets
the hooks that make every worker process a cluster member of its own, as ``cluster
serve --workers-count`` does and as meteorhacks:cluster's workers do:

- ``when_ready`` (the arbiter, before forking): checks once what every worker would
  refuse (a bad setting, gunicorn's TLS), one line and exit status 3, and writes
  ``CLUSTER_PORT_FILE`` (gunicorn's shared address).
- ``post_worker_init`` (each worker, after gevent has monkey-patched it): opens a
  private listening socket on the bound host (port chosen by the OS), registers it as
  this worker's endpoint and makes the worker's front door around the app, serving
  both sockets. A request reaching the shared port is routed like any other (sticky
  cookie, ``/cluster-ddp/<hash>/``), so a Socket.IO or SockJS session stays in the one
  worker that holds its state instead of being scattered by the kernel over the workers.
- The shared port is only a way in: it is not registered (a record for it would send
  sessions to whichever worker the kernel picks). Announce it with
  ``CLUSTER_BALANCER_URL`` when browsers reach it directly. ``CLUSTER_ENDPOINT_URL``,
  when set, gives the scheme and host of the workers' endpoints; each keeps its port.
- A worker that stops (SIGTERM, ``max_requests`` recycling, gunicorn's HUP, its
  arbiter dying however it dies) deregisters at once, then drains; its replacement
  registers before it serves. ``max_requests`` is honoured (gunicorn's pywsgi worker
  ignores it on its own); it counts the requests the worker's app serves.
- gunicorn's request limits apply to the door: ``--limit-request-line``,
  ``--limit-request-field_size``, ``--limit-request-fields``, ``--keep-alive`` and
  ``--worker-connections``, when set (flag or config file) and their ``CLUSTER_*``
  counterpart is not (see :data:`GUNICORN_LIMITS`).
- metrics: unless ``PROMETHEUS_MULTIPROC_DIR`` is set, ``when_ready`` makes a temp
  directory for prometheus_client's multi-process mode (removed by ``on_exit``), so
  every worker's ``/_cluster/metrics`` sums all workers; ``child_exit`` drops a dead
  worker's live gauges.

The arbiter is never monkey-patched and registers nothing, so nothing here imports
pymongo there, and no process of ours can outlive it. To combine with your own
config file: ``from cluster.gunicorn import *`` at its top.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
from typing import Any

from gunicorn.workers.ggevent import GeventPyWSGIWorker, PyWSGIHandler

from cluster.door import LocalHandler
from cluster.metricsdir import make_metrics_dir

log = logging.getLogger(__name__)

worker_class = "cluster.gunicorn.Worker"

#: seconds between a worker's checks of its own ``alive`` flag and of its arbiter
WATCH_INTERVAL = 0.1
_METRICS_DIR: dict[str, str] = {}
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Handler(LocalHandler, PyWSGIHandler):  # type: ignore[misc]
    """Runs the local app: gunicorn's access logging and environ, cluster's door."""


#: what a worker started without this module's hooks says before it stops
WITHOUT_HOOKS = ("cluster: cluster.gunicorn.Worker needs this module's hooks: start gunicorn "
                 "with -c python:cluster.gunicorn (or put `from cluster.gunicorn import *` "
                 "in your config file)")


#: why another worker class (-k) stops a worker of this config
OTHER_WORKER = ("cluster's hooks need their own worker class, cluster.gunicorn.Worker "
                "(gunicorn's gevent worker serving through cluster's front door, with "
                "gevent-websocket's upgrade for the app's own WebSockets), not {name}: "
                "drop -k/--worker-class")


#: why gunicorn's --certfile stops a cluster worker
TLS_UNSUPPORTED = ("cluster's worker serves plain HTTP only (its front door reads the socket "
                   "itself); terminate TLS in front of it (nginx, a load balancer) and bind "
                   "gunicorn to plain HTTP")


class Worker(GeventPyWSGIWorker):  # type: ignore[misc]
    """gunicorn's gevent worker; ``post_worker_init`` sets its ``server_class`` to the
    front door bound to this worker's node."""

    wsgi_handler = Handler

    def run(self) -> None:
        # Selected with -k alone, no hook made a door: it served as gevent's plain
        # worker, unregistered and without the door's bounds (a silent connection, an
        # idle keep-alive one or a slowloris head held for good). A stop with one line.
        if getattr(self, "cluster_door", None) is None:
            self.log.error(WITHOUT_HOOKS)
            sys.exit(3)  # gunicorn's "worker failed to boot": the arbiter stops too
        super().run()

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        """In the arbiter, before any worker is forked: without this module's hooks no
        worker can make its door. Each worker used to say so and exit 3 on its own; with
        ``-w 2`` or more gunicorn's arbiter then met the second exit while it halted for
        the first and ended with a HaltServer traceback and exit status 1."""
        parent = getattr(super(), "check_config", None)  # gunicorn's gevent worker has none
        if parent is not None:
            parent(cfg, log)
        hook = cfg.settings.get("post_worker_init")
        if hook is not None and hook.value is hook.default:
            log.error(WITHOUT_HOOKS)
            _remove_gunicorn_pidfile(cfg)
            sys.exit(3)


def _remove_gunicorn_pidfile(cfg: Any) -> None:
    """The arbiter's ``--pid`` file, written before :meth:`Worker.check_config` ran,
    when it names this process (as gunicorn's own halt removes it)."""
    if not cfg.pidfile:
        return
    try:
        with open(cfg.pidfile, encoding="ascii") as pidfile:
            if int(pidfile.read().strip() or 0) == os.getpid():
                os.unlink(cfg.pidfile)
    except (OSError, ValueError):
        pass


def check_before_workers(cfg: Any, listeners: Any) -> Any:
    """What every worker would refuse, checked once in the arbiter before forking
    them (raises :class:`~cluster.errors.ConfigError`): gunicorn's TLS, a bad
    ``CLUSTER_*`` value or gunicorn limit, an endpoint the workers could not register.
    Refused in each worker instead, ``-w 2`` or more ended with gunicorn's HaltServer
    traceback and exit status 1 (its arbiter met the second worker's exit while it
    halted for the first), and with one line per worker. Returns the settings, with
    gunicorn's shared address as ``bind`` when it listens on one."""
    from cluster.errors import ConfigError

    if getattr(cfg, "is_ssl", False):
        raise ConfigError("gunicorn's --certfile/--keyfile", TLS_UNSUPPORTED)
    first = listeners[0] if listeners else None
    bound = getattr(first, "sock", first)
    host, port = "127.0.0.1", 0
    if bound is not None and bound.family in (socket.AF_INET, socket.AF_INET6):
        host, port = bound.getsockname()[:2]
    # the shared port stands for the private one each worker binds on the same host;
    # what is not applied, each worker says (in gunicorn's log format)
    settings = _worker_settings(port, host, cfg, warn=lambda *args: None)
    shared = _tcp_address(listeners)
    if shared is None:
        return settings
    from cluster.config import host_port

    return settings.replace(bind=host_port(*shared))


def _tcp_address(listeners: Any) -> tuple[str, int] | None:
    """(host, port) of gunicorn's first TCP listener (``-b 127.0.0.1:0`` among them)."""
    for listener in listeners or ():
        sock = getattr(listener, "sock", listener)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host, port = sock.getsockname()[:2]
            return host, port
    return None


def announce_shared_port(settings: Any, listeners: Any, warn: Any) -> None:
    """``CLUSTER_PORT_FILE`` receives gunicorn's shared address, as the public port
    of ``cluster serve --workers-count`` (connections wait in the backlog until a
    worker accepts). It was not written at all: whoever started gunicorn with ``-b
    HOST:0`` and waited for the file waited for good. ``CLUSTER_PID_FILE`` has no
    use here (no drain: the arbiter takes SIGUSR2 itself), and says so."""
    from cluster.errors import ConfigError
    from cluster.server import write_port_file

    if settings.port_file:
        if _tcp_address(listeners) is None:
            raise ConfigError("--port-file (CLUSTER_PORT_FILE)",
                              "gunicorn listens on no TCP address to write")
        write_port_file(settings)
    if settings.pid_file:
        warn("cluster: CLUSTER_PID_FILE is not written under gunicorn: there is no drain "
             "here (its arbiter takes SIGUSR2 itself); gunicorn's --pid names the arbiter")


def when_ready(server: Any) -> None:
    from cluster.errors import ConfigError

    # Before any worker is forked, so each imports prometheus_client in multi-process
    # mode; and before the checks below, which import it here (once imported without
    # the directory, every worker kept a registry of its own and /metrics summed none).
    if not os.environ.get(MULTIPROC_ENV):
        os.environ[MULTIPROC_ENV] = _METRICS_DIR["own"] = make_metrics_dir()
    try:
        settings = check_before_workers(server.cfg, server.LISTENERS)
        announce_shared_port(settings, server.LISTENERS, server.log.warning)
    except ConfigError as exc:
        server.log.error("cluster: %s", exc)
        server.halt(exit_status=3)  # as when a worker fails to boot, without the race
    server.log.info("cluster: each worker registers an endpoint of its own; "
                    "the shared port is not registered")


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


def _private_listener(worker: Any) -> socket.socket:
    """A listening socket of this worker alone, on the host gunicorn is bound to."""
    host = "127.0.0.1"
    family = socket.AF_INET
    if worker.sockets:
        bound = worker.sockets[0]
        if bound.family in (socket.AF_INET, socket.AF_INET6):
            host, family = bound.getsockname()[0], bound.family
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(worker.cfg.backlog)
    return sock


#: gunicorn settings the front door takes over, each as the cluster setting it is:
#: (gunicorn's name, cluster's). Applied when set to other than gunicorn's default and
#: the cluster setting's CLUSTER_* variable is not set (that one is cluster's own, so it
#: wins). gunicorn's 0 ("no limit") for a line leaves the whole head's bound
#: (--max-head-size); --keep-alive 0 (no keep-alive) has no door equivalent and is not
#: applied (a warning says so).
GUNICORN_LIMITS = (
    ("limit_request_line", "max_request_line"),
    ("limit_request_field_size", "max_header_line"),
    ("limit_request_fields", "max_header_count"),
    ("keepalive", "keepalive_timeout"),
    ("worker_connections", "max_connections"),
)


def apply_gunicorn_limits(settings: Any, cfg: Any, env: Any = os.environ,
                          warn: Any = log.warning) -> Any:
    """``settings`` with the gunicorn limits of :data:`GUNICORN_LIMITS` that ``cfg``
    sets; a value cluster refuses is a ConfigError naming gunicorn's setting."""
    from cluster.config import _field, env_of
    from cluster.errors import ConfigError

    changes: dict[str, Any] = {}
    for name, field in GUNICORN_LIMITS:
        item = getattr(cfg, "settings", {}).get(name)
        if item is None or item.value == item.default or env_of(field) in env:
            continue
        value = item.value
        if value == 0 and name == "keepalive":
            warn("cluster: gunicorn's keepalive 0 (no keep-alive) is not applied: idle "
                 "connections close after %s s (CLUSTER_KEEPALIVE_TIMEOUT)",
                 settings.keepalive_timeout)
            continue
        if value == 0 and name.startswith("limit_request_"):
            value = settings.max_head_size
        try:
            changes[field] = _field(field).metadata["parse"](str(value))
        except ValueError as exc:
            raise ConfigError(f"gunicorn's {name} ({value})", str(exc)) from None
    return settings.replace(**changes)


def _worker_settings(port: int, host: str, cfg: Any = None, warn: Any = log.warning) -> Any:
    """The worker's settings: CLUSTER_* variables and gunicorn's limits, its private
    port as its endpoint. ``warn`` says what of gunicorn's is not applied."""
    from urllib.parse import urlsplit

    from cluster.config import Settings, host_port

    settings = apply_gunicorn_limits(Settings.load(args=[]), cfg, warn=warn)
    # --busy-poll auto counts gunicorn's workers (-w), not --workers-count.
    settings = settings.replace(
        busy_poll=settings.busy_poll_microseconds(int(getattr(cfg, "workers", 1) or 1)))
    if settings.endpoint_url:
        base = urlsplit(settings.endpoint_url)
        endpoint = base._replace(netloc=host_port(base.hostname or "127.0.0.1", port),
                                 path="").geturl()
        return settings.replace(endpoint_url=endpoint, bind=host_port(host, port))
    settings = settings.replace(bind=host_port(host, port))
    return settings.replace(endpoint_url=settings.own_endpoint_url)


def post_worker_init(worker: Any) -> None:
    """Make this worker's door; a bad setting is one line and a stop, not a traceback
    (exit status 3 is gunicorn's "worker failed to boot": the arbiter stops too)."""
    from cluster.errors import ConfigError

    try:
        if not isinstance(worker, Worker):
            # -k geventwebsocket's worker (gevent-websocket's and Flask-SocketIO's
            # documented command), gevent, sync...: the door was handed a handler it
            # cannot run (an AttributeError and a dropped connection for every request),
            # or was never used at all (a registered endpoint that does not route).
            kind = type(worker)
            raise ConfigError("gunicorn's --worker-class", OTHER_WORKER.format(
                name=f"{kind.__module__}.{kind.__qualname__}"))
        if getattr(worker.cfg, "is_ssl", False):
            # The door reads and writes the OS socket under gunicorn's TLS layer: every
            # handshake was read as a request (400 "not an HTTP/1 request") and each
            # connection logged a traceback, while gunicorn said it listened on https.
            raise ConfigError("gunicorn's --certfile/--keyfile", TLS_UNSUPPORTED)
        _init_worker(worker)
    except ConfigError as exc:
        worker.log.error("cluster: %s", exc)
        sys.exit(3)


def _route_logging(worker: Any) -> None:
    """cluster's own lines (registered, store failing and back, endpoints joining,
    leaving and ejected) through gunicorn's error log: its format, file, syslog and
    ``--log-level``. Without this they had no handler in a worker: the info lines were
    lost and the warnings came out bare (no time, pid or level) through logging's last
    resort. A logging setup of the user's own (``--log-config``, ``logconfig_dict``:
    handlers on ``cluster`` or on the root logger) is left alone, and so is a level
    it gives ``cluster`` (``"cluster": {"level": "WARNING"}`` to quiet it)."""
    ours = logging.getLogger("cluster")
    error_log = getattr(worker.log, "error_log", None)
    if ours.handlers or logging.getLogger().handlers or error_log is None:
        return
    for handler in error_log.handlers:
        ours.addHandler(handler)
    if ours.level == logging.NOTSET:  # a level of the user's own for cluster stays
        ours.setLevel(error_log.level)
    ours.propagate = False


def _init_worker(worker: Any) -> None:
    import time

    import gevent

    from cluster import observe
    from cluster.door import DoorServer
    from cluster.errors import DiscoveryError
    from cluster.node import Cluster
    from cluster.server import (
        ENDPOINT_CHECK_SECONDS,
        make_door,
        unreachable_endpoint,
        unreachable_warning,
    )

    _route_logging(worker)
    listener = _private_listener(worker)
    worker.sockets.append(listener)  # run() makes a server for each of worker.sockets
    host, port = listener.getsockname()[:2]
    settings = _worker_settings(port, host, worker.cfg)
    node = Cluster(settings, register=bool(settings.service))
    worker.cluster_node = node  # registered from the first heartbeat on: see worker_exit
    if node.registrar is not None:  # as cluster serve: a mistyped CLUSTER_ENDPOINT_URL host
        why = unreachable_endpoint(node.self_url, min(settings.connect_timeout,
                                                      ENDPOINT_CHECK_SECONDS))
        if why:
            worker.log.warning("cluster: %s", unreachable_warning(node.self_url, why,
                                                                   "CLUSTER_ENDPOINT_URL"))
    if node.registrar is not None:
        # registered before serving, so a HUP's new worker is known when it serves; in a
        # greenlet, so that a stop asked meanwhile (worker.alive) need not wait for a
        # store that does not answer: the boot took 13 s to end then
        first = gevent.spawn(_first_beat, node.registrar)
        while not first.ready() and worker.alive:
            first.join(0.1)
        if not first.ready():
            first.kill(block=False)
        elif isinstance(first.value, DiscoveryError):
            worker.log.warning("cluster: first heartbeat failed, will keep retrying: %s",
                               first.value)
        elif first.exception is not None:
            raise first.exception
    node.start()
    deadline = time.monotonic() + settings.connect_timeout
    while worker.alive and time.monotonic() < deadline and not node.watcher.refreshed.wait(0.1):
        pass  # a first table, unless the worker is stopping
    if worker.alive and node.registrar is not None and node.registrar.beats:
        # Let every peer read this record before handing out cookies that name it
        # (see cluster.workers.settle); connections wait in the listen backlogs. Not
        # past a stop (TERM: worker.alive): the record would stay until the pause ends.
        settled = time.monotonic() + node.watcher.refresh_interval + 0.1
        while worker.alive and time.monotonic() < settled:
            gevent.sleep(min(WATCH_INTERVAL, max(0.0, settled - time.monotonic())))
    worker.wsgi = _Recycling(worker.wsgi, worker)
    door = make_door(node, settings, worker.wsgi, observe.from_settings(settings))
    worker.cluster_door = door
    # gunicorn gives each listener a pool of worker_connections greenlets and stops
    # accepting when it is full: connections past it would wait in the backlog, not
    # get the door's 503 (silent ones would hold the worker until their header
    # timeout). The door's cap (per process, from --worker-connections when set) rules.
    worker.worker_connections = door.cap + 1
    private = listener.fileno()

    def server_class(sock: Any, *args: Any, **kwargs: Any) -> DoorServer:
        # gunicorn's own listeners are shared by its workers (-w N): see SHARED_CAP_PAUSE
        return DoorServer(sock, *args, door=door, shared=worker.cfg.workers > 1 and
                          sock.fileno() != private, **kwargs)

    worker.server_class = server_class
    gevent.spawn(_watch, worker, node)
    worker.log.info("cluster: worker %s serves %s as %s", worker.pid, settings.service,
                    node.self_url)


def _first_beat(registrar: Any) -> Exception | None:
    """The first heartbeat; a store that fails it is returned, not raised: raised in
    its greenlet, gevent's hub printed its whole traceback (pymongo's and ours) into
    gunicorn's log, beside the one warning the worker logs for it."""
    from cluster.errors import DiscoveryError

    try:
        registrar.beat()
    except DiscoveryError as exc:
        return exc
    return None


class _Recycling:
    """The wrapped app, counting requests to honour gunicorn's ``max_requests``."""

    def __init__(self, app: Any, worker: Any) -> None:
        self.app = app
        self.worker = worker

    def __call__(self, environ: Any, start_response: Any) -> Any:
        worker = self.worker
        worker.nr += 1
        if worker.nr >= worker.max_requests and worker.alive:
            worker.log.info("Autorestarting worker after current request.")
            worker.alive = False
        return self.app(environ, start_response)


def _watch(worker: Any, node: Any) -> None:
    """Deregister as soon as the worker starts stopping, or its arbiter is gone.

    gunicorn's run loop notices either within a second and then drains; the record
    must go first, so that no new request is sent to a worker that is leaving.
    """
    import time

    import gevent
    import gevent.event

    while worker.alive and os.getppid() == worker.ppid:
        gevent.sleep(WATCH_INTERVAL)
    if os.getppid() != worker.ppid:
        worker.log.warning("cluster: arbiter %s is gone; worker %s stops", worker.ppid,
                           worker.pid)
        worker.alive = False
    if node.registrar is not None:
        node.registrar.stop()
    # as cluster serve's stop: answers say Connection: close from now on, WebSockets
    # close with 1001 (else cut at --graceful-timeout); gunicorn's drain waits for every
    # connection of its pools, and idle keep-alive ones would hold it to that timeout
    from cluster.workers import close_idle_connections

    worker.cluster_going_at = time.monotonic()  # for worker_exit's wait
    closed = worker.cluster_door.going_away()
    if closed:
        worker.log.info("cluster: closed %d WebSockets with 1001 (going away)", closed)
    close_idle_connections(worker.cluster_door, gevent.event.Event())


def worker_exit(server: Any, worker: Any) -> None:
    """In the worker process (and in the arbiter for a worker that vanished, where
    there is nothing to close): close the door and the member, which deregisters if
    ``_watch`` has not yet. A worker stopped while it booted (SIGQUIT or SIGINT, which
    gunicorn's workers end with sys.exit at once) has a member and no door yet: its
    record, written by the first heartbeat, stayed until it expired.

    The closing runs in a greenlet of its own, waited for through any SystemExit: on
    SIGQUIT or SIGINT gunicorn's gevent worker calls sys.exit 0.1 s after the signal, in
    a greenlet of its own (handle_quit), and gevent raises it in the main greenlet,
    wherever that is. A worker stopped while it booted reaches this hook sooner than
    that: the exit landed in the wait for the removal and cut it off, the record left
    until it expired."""
    door = getattr(worker, "cluster_door", None)
    node = getattr(worker, "cluster_node", None)
    if door is None and node is None:
        return
    import gevent

    closing = gevent.spawn(_close_worker, worker, door, node)
    while not closing.ready():
        try:
            closing.join()
        except (SystemExit, KeyboardInterrupt):
            pass  # the process exits when the closing is done, as it was about to
    if closing.value is not None:
        raise closing.value  # gunicorn logs it ("Exception during worker exit")


def _close_worker(worker: Any, door: Any, node: Any) -> Exception | None:
    """worker_exit's work; an error is returned, not raised in the greenlet (gevent's
    hub would print its traceback a second time)."""
    try:
        _close_door_and_node(worker, door, node)
    except Exception as exc:  # noqa: BLE001 - handed to worker_exit, which raises it
        return exc
    return None


def _close_door_and_node(worker: Any, door: Any, node: Any) -> None:
    if door is not None:
        began = getattr(worker, "cluster_going_at", None)
        if door.stopping and began is not None:
            # gunicorn's drain waited for its pools only: the tunnels _watch closed with
            # 1001 finish the endpoint's frame under way, then their close frame goes
            # out (an exit now cut them in the middle of the frame: no 1001). Before
            # the arbiter's SIGKILL at --graceful-timeout, with a second to spare.
            import time

            from cluster.proxy.tunnel import HALF_CLOSED_SECONDS
            from cluster.server import wait_for_tunnels

            wait_for_tunnels([door], min(time.monotonic() + HALF_CLOSED_SECONDS,
                                         began + float(worker.cfg.graceful_timeout) - 1.0))
        door.close()
    if node is not None:
        registrar = node.registrar
        if registrar is not None:
            # _watch may have begun deregistering and been cut short by gunicorn's own
            # exit on a dead arbiter (sys.exit in notify): finish the removal here (once,
            # and bounded: a store that does not answer is not waited for again). stop(),
            # not deregister() alone: the heartbeats end first (a worker stopped while it
            # settled has them running), else one landing after the removal brought the
            # record back, for good
            registrar.stop()
        # The worker exits next, within gunicorn's --graceful-timeout: a watcher's read
        # hung on a store that stopped answering is not waited out (it took the worker
        # past that timeout, to the arbiter's SIGKILL).
        node.close(wait=0.2)
