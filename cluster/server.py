"""The standalone runner: one front-door server (cluster.door) that is a full member.

Call :func:`serve` only from an entry point that has monkey-patched first
(:mod:`cluster.entry`, ``python -m cluster``, ``scripts/cluster-instance``).

Shutdown order on SIGTERM/SIGINT: deregister (so no new request is sent here), stop
accepting, let open requests finish for a while, then close what is left; SIGQUIT the
same without the wait. SIGUSR2 (or ``POST /_cluster/drain``) drains first
(cluster.drain), then stops the same way.
"""

from __future__ import annotations

import gc
import importlib
import ipaddress
import logging
import os
import signal
import socket
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import gevent
import gevent.event
import gevent.socket
from gevent.pool import Pool
from gevent.server import _tcp_listener

from cluster import observe
from cluster.admin import Admin
from cluster.app import WSGIApp, policy_for
from cluster.config import Settings, host_port
from cluster.door import Door, DoorServer
from cluster.drain import Drain
from cluster.errors import ConfigError
from cluster.metrics import MetricsObserver
from cluster.node import Cluster
from cluster.observe import NULL_OBSERVER, Observer
from cluster.workers import (
    PARENT_PID_ENV,
    SHARED_FD_ENV,
    close_idle_connections,
    handle_sighup,
    notify_ready,
    run_workers,
    settle,
    watch_parent,
)

log = logging.getLogger(__name__)

def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
        stream=sys.stderr,
    )


def import_path(chdir: str | None = None, pythonpath: tuple[str, ...] = ()) -> None:
    """Make ``--app`` importable as under gunicorn: ``--chdir`` first, then the current
    folder and ``--pythonpath`` in front of ``sys.path``.

    The ``cluster`` console script's ``sys.path[0]`` is its own bin folder, not the
    folder it was started from, so without this ``--app mod:app`` next to ``mod.py``
    would not import.
    """
    if chdir:
        os.chdir(chdir)
    for folder in [*reversed(pythonpath), os.getcwd()]:
        if folder in sys.path:
            sys.path.remove(folder)
        sys.path.insert(0, folder)


def load_app(spec: str, settings: Settings | None = None) -> WSGIApp:
    """Import ``module:callable``; raises ConfigError naming --app."""
    if settings is not None:
        import_path(settings.chdir, settings.pythonpath)
    else:
        import_path()
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError("--app (CLUSTER_APP)", f"cannot import {module_name!r}: {exc}") from None
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ConfigError("--app (CLUSTER_APP)", f"{module_name!r} has no {attr!r}")
    if not callable(target):
        raise ConfigError("--app (CLUSTER_APP)", f"{spec!r} is not callable")
    return target  # type: ignore[no-any-return]


def listen(settings: Settings) -> tuple[Any, Settings]:
    """Bind the listening socket; with port 0, put the real port into the settings
    (and into ``--port-file``, so whoever started us learns it without a race)."""
    host, port = settings.bind_address
    try:
        sock = _tcp_listener((host, port), backlog=2048, reuse_addr=True,
                             family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        raise ConfigError("--bind (CLUSTER_BIND)", f"cannot listen on {settings.bind}: "
                          f"{exc.strerror or exc}") from None
    if port == 0:
        settings = settings.replace(bind=host_port(host, sock.getsockname()[1]))
    return sock, settings


def write_port_file(settings: Settings) -> None:
    """Write the bound host:port to --port-file, atomically (a reader never sees half)."""
    if not settings.port_file:
        return
    tmp = f"{settings.port_file}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="ascii") as out:
            out.write(settings.bind + "\n")
        os.replace(tmp, settings.port_file)
    except OSError as exc:
        raise ConfigError("--port-file (CLUSTER_PORT_FILE)",
                          f"cannot write {settings.port_file}: {exc.strerror or exc}") from None


def write_pid_file(settings: Settings) -> None:
    """Write this process's PID to --pid-file, atomically."""
    if not settings.pid_file:
        return
    tmp = f"{settings.pid_file}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="ascii") as out:
            out.write(f"{os.getpid()}\n")
        os.replace(tmp, settings.pid_file)
    except OSError as exc:
        raise ConfigError("--pid-file (CLUSTER_PID_FILE)",
                          f"cannot write {settings.pid_file}: {exc.strerror or exc}") from None


def remove_pid_file(settings: Settings) -> None:
    """Remove --pid-file if it still names this process (a successor started by a
    rolling deploy may have written its own PID there meanwhile)."""
    if not settings.pid_file:
        return
    try:
        with open(settings.pid_file, encoding="ascii") as found:
            mine = found.read().strip() == str(os.getpid())
        if mine:
            os.unlink(settings.pid_file)
    except OSError:
        pass


def raise_descriptor_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard one: each proxied connection holds two."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, OSError, ValueError):
        pass


def lone_balancer_warning(settings: Settings, has_local_app: bool) -> str:
    """What to warn a balancer-only instance, reachable from other hosts, that runs
    without --secret ("" if nothing): it registers nothing, so no endpoint elsewhere
    takes it for a member by its address, and its hop marker is ignored there."""
    if has_local_app or settings.secret or _loopback(settings.bind_address[0]):
        return ""
    return ("a balancer-only instance without --secret: it registers nothing, so "
            "endpoints on other hosts do not take its hop marker (they route its "
            "requests again, and sessions do not stick); set --secret on every instance, "
            "or add this host to their --trusted-proxies")


def unreachable_endpoint(url: str, timeout: float) -> str:
    """Why this host cannot open a TCP connection to the endpoint ``url`` ("" if it can).

    Checked once the instance listens (before it accepts: the kernel completes the
    handshake, and the door later takes the closed connection off the backlog before
    any client's): an --endpoint-url with a mistyped port or host registered an address
    where nothing answers, silently (every other instance then tried it, was refused
    and ejected it, again and again).
    """
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        conn = gevent.socket.create_connection((parts.hostname or "", port), timeout=timeout)
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
    conn.close()
    return ""


def unreachable_warning(url: str, why: str, setting: str) -> str:
    """The warning for an endpoint :func:`unreachable_endpoint` could not connect to."""
    return (f"endpoint {url} does not accept connections from this host ({why}): other "
            "instances are unlikely to reach it either (unless it is a public address this "
            f"host cannot reach itself by, as behind some NATs); check {setting}")


#: the longest the start-up check of the endpoint waits for a connection (``cluster
#: serve`` gives the whole check, name resolution and every address, half a second more)
ENDPOINT_CHECK_SECONDS = 2.0


def endpoint_of_another_process(url: str, bound: tuple[str, int]) -> bool:
    """Is ``url`` a port of this host other than the one this instance listens on?

    Then the connection to it (which succeeded) reached another process: typically a
    second instance started with the first one's --endpoint-url (an exported
    CLUSTER_ENDPOINT_URL). Both heartbeat one record, and the first to stop deletes it
    under the other. An address is this host's when a socket can be bound to it.

    Never for https: cluster serves no TLS, so an https endpoint is always a TLS
    terminator (nginx, a sidecar) in front of this instance, another process by design
    (every instance behind one was told it shared a record).

    The bound port at another address of this host is another process's too when this
    instance is bound to one address: a second instance bound to 127.0.0.2:8000 given
    the first's http://127.0.0.1:8000 (only a wildcard bind answers at every address).
    """
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    wildcard = bound[0] in ("", "0.0.0.0", "::")
    if (port == bound[1] and wildcard) or not parts.hostname or parts.scheme == "https":
        return False
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, _type, _proto, _name, address in infos:
        if port == bound[1] and _same_address(str(address[0]), bound[0]):
            continue  # this instance's own listener
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((address[0], 0))
            except OSError:
                continue
            return True
    return False


def _same_address(one: str, other: str) -> bool:
    try:
        first, second = ipaddress.ip_address(one), ipaddress.ip_address(other.strip("[]"))
    except ValueError:
        return one == other
    return first == second or getattr(first, "ipv4_mapped", None) == second \
        or getattr(second, "ipv4_mapped", None) == first


def check_endpoint(url: str, settings: Settings, listener: Any) -> tuple[str, bool]:
    """:func:`unreachable_endpoint` and, when it is reachable, whether it is
    :func:`endpoint_of_another_process`: what ``cluster serve`` warns of at start.
    The listener's own address, not --bind's host, which may be a name (localhost)."""
    unreachable = unreachable_endpoint(url, min(settings.connect_timeout,
                                                ENDPOINT_CHECK_SECONDS))
    bound = listener.getsockname()
    return unreachable, (not unreachable
                         and endpoint_of_another_process(url, (bound[0], bound[1])))


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def reopen_logs(observer: Any) -> None:
    """SIGUSR1, as nginx and gunicorn take it: open --access-log-file again (its
    default action was to kill the process, record and all)."""
    from cluster.accesslog import AccessLogObserver

    access = observe.find(observer, AccessLogObserver)
    log.info("SIGUSR1: reopening %s", access.path if access is not None and access.path
             else "nothing (no --access-log-file)")
    if access is not None:
        access.reopen()


def drain_every_worker(supervisor: int, drain: Drain, stopping: gevent.event.Event) -> bool:
    """``POST /_cluster/drain`` to one worker of ``--workers-count``: the supervisor is
    asked (SIGUSR2), and drains them all. Draining only the worker that took the
    request would have the supervisor restart it, and the server carry on."""
    if drain.since is not None or stopping.is_set():
        return False
    log.info("drain asked by POST: passing it to the supervisor (pid %d)", supervisor)
    os.kill(supervisor, signal.SIGUSR2)
    return True


def make_door(node: Cluster, settings: Settings, local_app: WSGIApp | None,
              observer: Observer = NULL_OBSERVER) -> Door:
    policy = policy_for(settings, node.self_hash, local_app is not None)
    node.eject_listeners.append(observer.ejected)
    metrics = observe.find(observer, MetricsObserver)
    if metrics is not None:
        metrics.watch(node)  # discovery gauges and request rates, once a second
    door = Door(node, policy, settings, local_app, Admin(node, settings, observer), observer)
    door.start()
    return door


def make_server(listener: Any, door: Door, **kwargs: Any) -> DoorServer:
    # A pool, unbounded, only so that stop() can wait for the requests in flight (the
    # drain of a SIGTERM or of a SIGHUP reload): without one gevent does not track the
    # handlers and the process exits under them.
    kwargs.setdefault("spawn", Pool(None))
    return DoorServer(listener, door.local_app, door=door, log=None,
                      error_log=logging.getLogger("cluster.server"), **kwargs)


class ClusterServer(DoorServer):
    """Library mode with the front door: a gevent server that registers ``app``,
    balances and serves it. ``start()``/``serve_forever()`` as any gevent server;
    ``stop()`` also deregisters, lets the requests in flight finish (up to ``timeout``,
    by default --graceful-timeout) and closes the store."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop_timeout = self.door.settings.graceful_timeout
        self._stop_under_way: gevent.event.Event | None = None

    def stop(self, timeout: float | None = None) -> None:
        # Once: serve_forever() calls stop() again (with gevent's 1 s) as soon as the
        # first stop, from a signal handler, closes the listener; that second call cut
        # the first one's drain and let the program end under the requests in flight.
        if self._stop_under_way is not None:
            self._stop_under_way.wait()
            return
        done = self._stop_under_way = gevent.event.Event()
        try:
            self._stop(self.stop_timeout if timeout is None else timeout)
        finally:
            done.set()

    def _stop(self, timeout: float) -> None:
        node = self.door.node
        if node.registrar is not None:
            node.registrar.stop()  # deregister first: no new request is sent here
        self.close()
        self.door.going_away()
        drained = gevent.event.Event()
        idle_closer = gevent.spawn(close_idle_connections, self.door, drained)
        deadline = time.monotonic() + timeout
        super().stop(timeout)
        wait_for_tunnels([self.door], deadline)
        drained.set()
        idle_closer.join(1)
        self.door.close()
        metrics = observe.find(self.door.observer, MetricsObserver)
        if metrics is not None:
            metrics.stop()
        node.close()


def make_cluster_server(app: WSGIApp | None, listener: Any = None,
                        **settings: Any) -> ClusterServer:
    """A front-door server for ``app`` (None: a balancer), in library mode.

    ``settings`` are :class:`~cluster.config.Settings` fields (they override the
    ``CLUSTER_*`` environment); ``listener`` defaults to ``settings.bind``. Call from a
    monkey-patched process. Raises :class:`~cluster.errors.ConfigError`.
    """
    resolved = Settings.load(**settings)
    if listener is None:
        listener, resolved = listen(resolved)
    elif not settings.get("endpoint_url") and not resolved.endpoint_url:
        address = listener.getsockname() if hasattr(listener, "getsockname") else listener
        resolved = resolved.replace(bind=host_port(address[0], address[1]))
    if app is not None and not resolved.service:
        raise ConfigError("--service (CLUSTER_SERVICE)", "required to serve an app")
    # listening already (connections wait in the backlog until start()): as cluster
    # serve, --port-file names the address --bind HOST:0 got
    write_port_file(resolved)
    node = Cluster(resolved, register=app is not None).start()
    door = make_door(node, resolved, app, observe.from_settings(resolved))
    # a pool, as make_server's: without one stop() waited for no request in flight
    return ClusterServer(listener, app, door=door, log=None, spawn=Pool(None),
                         error_log=logging.getLogger("cluster.server"))


def serve(settings: Settings, local_app: WSGIApp | None = None,
          observer: Observer | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status.

    ``observer`` gets the door's reports; by default (None) what the settings ask for:
    the metrics, plus the access log with ``--access-log`` (or the debug one with
    ``--log-level debug``), see :func:`cluster.observe.from_settings`.
    """
    if local_app is None and settings.app:
        local_app = load_app(settings.app, settings)
    if local_app is not None and not settings.service:
        raise ConfigError("--service (CLUSTER_SERVICE)", "required to serve an app")
    raise_descriptor_limit()
    listener, settings = listen(settings)
    if settings.workers_count > 1:
        # Refuse a loopback endpoint with a remote store here, once, rather than in
        # every worker (which the supervisor would restart forever).
        settings.endpoint_choice(strict=local_app is not None)

        def announce() -> None:
            # Called once the supervisor handles signals: whoever reads the port file
            # may send SIGTERM at once, and it must be a clean stop, not the default
            # action (killed, the metrics directory left behind).
            write_port_file(settings)  # the shared public port (queues until workers accept)
            write_pid_file(settings)  # the supervisor's: it passes SIGUSR2 on to them

        try:
            return run_workers(settings, listener, announce)
        finally:
            remove_pid_file(settings)
    shared = _inherited_listener()
    base = os.environ.pop("_CLUSTER_ENDPOINT_BASE", None)
    if shared is not None and base:
        port = settings.bind_address[1]
        settings = settings.replace(endpoint_url=urlsplit(base)._replace(
            netloc=host_port(urlsplit(base).hostname or "127.0.0.1", port)).geturl())
    if observer is None:
        observer = observe.from_settings(settings)
    node = Cluster(settings, register=local_app is not None)
    warning = lone_balancer_warning(settings, local_app is not None)
    if warning:
        log.warning("%s", warning)
    door = make_door(node, settings, local_app, observer)
    servers = [make_server(listener, door)]
    if shared is not None:
        servers.append(make_server(shared, door, shared=True))
    stopping = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stopping.set)
    at_once: list[str] = []  # what asked for the quick stop
    hurry = gevent.event.Event()

    def quick_stop(why: str = "SIGQUIT") -> None:
        # SIGQUIT, as gunicorn takes it: deregister and stop without waiting for the
        # requests in flight (its default action, a core dump, left the record behind).
        # Also during a graceful stop (an operator's TERM, then QUIT when it takes too
        # long, as gunicorn's workers take it): the wait for the requests ends there.
        if stopping.is_set() and not at_once:
            log.info("%s: stopping at once: closing every connection", why)
        at_once.append(why)
        hurry.set()
        stopping.set()

    def interrupted() -> None:
        # Ctrl-C: the graceful stop; a second one during it, the quick stop (someone at
        # a terminal who presses it again wants the process gone now, not in 10 s)
        if stopping.is_set():
            quick_stop("a second SIGINT")
        else:
            stopping.set()

    gevent.signal_handler(signal.SIGINT, interrupted)
    gevent.signal_handler(signal.SIGQUIT, quick_stop)
    drain = Drain(door, node, stopping, settings.drain_seconds, settings.drain_close_seconds)
    door.admin.drain = lambda: drain.start("POST " + settings.admin_prefix + "/drain")
    gevent.signal_handler(signal.SIGUSR2, lambda: drain.start("SIGUSR2"))
    gevent.signal_handler(signal.SIGUSR1, lambda: reopen_logs(observer))
    parent = os.environ.pop(PARENT_PID_ENV, None)
    handle_sighup(worker=parent is not None)
    if parent:
        gevent.spawn(watch_parent, int(parent), stopping)
        door.admin.drain = lambda: drain_every_worker(int(parent), drain, stopping)
    unreachable, elsewhere = "", False
    if node.registrar is not None:
        check = gevent.spawn(check_endpoint, node.self_url, settings, listener)
        gevent.wait([check, stopping], timeout=ENDPOINT_CHECK_SECONDS + 0.5, count=1)
        if stopping.is_set():
            # SIGINT or SIGTERM during the check (up to its timeout): stop now, before
            # registering; the instance was registered, announced and removed again.
            check.kill(block=False)
            log.info("stopped while starting, before registering")
            door.close()
            node.store.close()
            return 0
        if check.ready():
            unreachable, elsewhere = check.value or ("", False)
        else:  # name resolution and several addresses, each given the whole timeout
            check.kill(block=False)
            unreachable = f"no connection within {ENDPOINT_CHECK_SECONDS:.0f} s"
    node.start()
    # Everything alive now (modules, the app, settings) lives as long as the process:
    # move it out of the collector's generations so collections triggered by
    # per-request garbage stop rescanning it (fewer and shorter pauses, lower p99).
    gc.collect()
    gc.freeze()
    servers[0].start()
    if shared is not None:
        settle(node, stopping=stopping)  # peers must know this worker before it hands
        # out cookies naming it
        servers[1].start()
    write_port_file(settings)
    if shared is None:  # a worker: the supervisor wrote its own
        write_pid_file(settings)
    log.info("serving %s on http://%s%s (endpoint %s: %s; discovery %s)",
             settings.service or "(balancer only)", settings.bind,
             " and the shared public socket" if shared is not None else "", node.self_url,
             node.endpoint_choice.reason, node.store.description)
    if unreachable:
        log.warning("%s", unreachable_warning(
            f"{node.self_url} ({node.endpoint_choice.reason})", unreachable,
            "--endpoint-url (CLUSTER_ENDPOINT_URL)"))
    if elsewhere:
        log.warning("endpoint %s (%s) is another process's port on this host (this one "
                    "listens on %s): if it is another instance, the two share one record "
                    "and the first to stop removes it: give each its own --endpoint-url "
                    "(CLUSTER_ENDPOINT_URL); if it is a proxy or port forward to this one, "
                    "all is well",
                    node.self_url, node.endpoint_choice.reason, settings.bind)
    notify_ready(node, stopping=stopping)  # a worker started by a reload: the old one
    # may go now
    stopping.wait()
    grace = 0.0 if at_once else settings.graceful_timeout
    if at_once:
        log.info("%s: stopping at once: deregistering, then closing every connection",
                 at_once[0])
    else:
        log.info("stopping: deregistering, then draining for up to %.3gs", grace)
    if node.registrar is not None:
        node.registrar.stop()
    for server in servers:
        server.close()
    closed = door.going_away()
    if closed:
        log.info("closed %d WebSockets with 1001 (going away)", closed)
    drained = gevent.event.Event()
    idle_closer = gevent.spawn(close_idle_connections, door, drained)
    cut = stop_servers(servers, grace, hurry)
    if cut and hurry.is_set():
        log.warning("%s: closed %d connections whose requests were still running, "
                    "unanswered", at_once[0], cut)
    elif cut:
        log.warning("drained for %.3gs (--graceful-timeout): closed %d connections whose "
                    "requests were still running, unanswered", grace, cut)
    drained.set()
    idle_closer.join(1)
    drain.cancel()
    door.close()
    # the process ends next: a watcher's read hung on a store that stopped answering is
    # not waited out (its socket timeout, up to 5 s more on every such stop)
    node.close(wait=0.2)
    if shared is None:
        remove_pid_file(settings)
    return 0


def wait_for_tunnels(doors: list[Door], deadline: float,
                     hurry: gevent.event.Event | None = None) -> None:
    """Tunnels closing with 1001 finish the endpoint's frame being relayed first, and
    wait for the client's answer (at most tunnel.HALF_CLOSED_SECONDS): they run in the
    event loop, not in a server's pool, and an exit before they are done cuts them
    before their close frame went out. Waits for them until ``deadline``
    (time.monotonic()) or ``hurry``."""
    while any(door.tunnels_going() for door in doors) \
            and not (hurry is not None and hurry.is_set()):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        gevent.sleep(min(remaining, 0.05))


def stop_servers(servers: list[DoorServer], timeout: float,
                 hurry: gevent.event.Event | None = None) -> int:
    """Stop accepting, wait up to ``timeout`` seconds in all for the connections being
    served (less if ``hurry`` is set meanwhile: SIGQUIT), then close those left (their
    requests end unanswered, see LocalHandler.handle_error); returns how many were left."""
    deadline = time.monotonic() + timeout
    for server in servers:
        server.close()
    for server in servers:
        while server.pool is not None and len(server.pool) \
                and not (hurry is not None and hurry.is_set()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            server.pool.join(timeout=min(remaining, 0.1))
    wait_for_tunnels([server.door for server in servers], deadline, hurry)
    left = sum(len(server.pool) for server in servers if server.pool is not None)
    for server in servers:
        server.stop(timeout=0)
    return left


def _inherited_listener() -> Any:
    """The public socket a ``--workers-count`` parent shares with this worker, if any."""
    fd = os.environ.pop(SHARED_FD_ENV, None)
    if fd is None:
        return None
    import gevent.socket

    return gevent.socket.socket(fileno=int(fd))
