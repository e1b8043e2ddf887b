"""A cluster member: its discovery store, its own registration, its view of the rest.

This is the library API's heart: ``with Cluster(service="web") as node: node.table``.
The WSGI app, the standalone server, the gunicorn hooks and ``discover()`` all use it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

from cluster.config import Settings
from cluster.discovery import DiscoveryStore, open_store
from cluster.errors import DiscoveryError
from cluster.records import Endpoint, endpoint_hash
from cluster.registry import EndpointTable, Registrar, Watcher

log = logging.getLogger(__name__)

_NONE_EJECTED: frozenset[str] = frozenset()
#: seconds of a first ejection; each one that follows soon after doubles it
EJECT_FIRST = 1.0
#: seconds between probe connections to ejected endpoints
PROBE_INTERVAL = 0.5
#: seconds a probe connection must stay open to readmit an endpoint that closed new
#: connections unanswered (an HTTP server keeps one open for seconds, awaiting a request)
LINGER = 0.25


@dataclass(frozen=True)
class _Ejection:
    endpoint: Endpoint
    until: float  # time.monotonic()
    #: the store's clock when ejected: a heartbeat newer than this readmits it (when
    #: by_heartbeat)
    seen: dt.datetime
    #: it accepted connections but closed them unanswered: neither a heartbeat nor a
    #: bare connect proves it serves again, only a connection it keeps open
    accepts: bool = False
    #: a newer heartbeat ends it (it refused: a restarted process heartbeats anew)
    by_heartbeat: bool = True


class Cluster:
    """Registers this instance (when it has a service) and watches the store.

    ``register=False`` makes a pure observer (``cluster status``, ``discover()``, the
    workers of a gunicorn server whose arbiter registers once for all of them).
    """

    def __init__(
        self, settings: Settings | None = None, *, register: bool = True, **overrides: Any
    ) -> None:
        self.settings = Settings.load(**overrides) if settings is None else settings.replace(
            **overrides
        )
        s = self.settings
        self.store: DiscoveryStore = open_store(s.discovery_url, timeout=s.connect_timeout)
        registering = register and bool(s.service)
        #: how self_url was chosen, for the start-up log; raises ConfigError for a
        #: loopback endpoint with a remote store when this instance registers
        self.endpoint_choice = s.endpoint_choice(strict=registering)
        self.self_url = self.endpoint_choice.url
        self.self_hash = endpoint_hash(self.self_url)
        # With a cluster secret, read only the records of the services this instance
        # routes to (plus every balancer's; endpoints() of another service adds it).
        # Without one, hop markers are checked by peer address, which needs every
        # member's record.
        services = None
        if s.secret:
            services = frozenset(x for x in (s.service, s.own_ui_service, *s.public_services)
                                 if x) or None
        self.watcher = Watcher(
            self.store,
            grace=s.expiry_grace,
            refresh_interval=max(0.1, min(s.ping_interval / 2, 5.0)),
            services=services,
        )
        self.registrar: Registrar | None = None
        if register and s.service:
            self.registrar = Registrar(
                self.store, s.service, self.self_url, s.balancer_url, s.ping_interval,
                version=s.own_app_version, grace=s.expiry_grace,
            )
        self._ejections: dict[str, _Ejection] = {}
        #: hash -> (strikes, when the last ejection ended), for the backoff
        self._strikes: dict[str, tuple[int, float]] = {}
        self._view: frozenset[str] = _NONE_EJECTED
        self._view_table: EndpointTable | None = None
        self._view_until = 0.0
        #: called as f(endpoint URL, reason) once per ejection (the observers' hook)
        self.eject_listeners: list[Callable[[str, str], None]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._probe_wake = threading.Event()
        self._prober: threading.Thread | None = None
        self._started = False
        #: the process it was made in: its threads do not run in a forked child
        self.pid = os.getpid()
        #: by https endpoint URL, the TLS context its requests verify with when that is
        #: not the system's trust store (discover()'s requests: verify=, cert=): its
        #: probe must verify as they do, or it is held out while they would succeed
        self.probe_tls: dict[str, ssl.SSLContext] = {}

    def __repr__(self) -> str:
        role = f"{self.settings.service} at {self.self_url}" if self.registrar else "observer"
        return f"<Cluster {role} {self.watcher.table!r}>"

    # --- life cycle -----------------------------------------------------------

    def start(self, wait: float = 0.0) -> Cluster:
        """Start heartbeating and watching; ``wait`` seconds for a first table."""
        if not self._started:
            self._started = True
            if self.registrar is not None:
                self.registrar.start()
            self.watcher.start()
            self._prober = threading.Thread(target=self._probe_loop, name="cluster-prober",
                                            daemon=True)
            self._prober.start()
        if wait:
            self.watcher.refreshed.wait(wait)
        return self

    def close(self, wait: float = 5.0) -> None:
        """Deregister at once, stop the loops, close the store. ``wait``: how long to
        wait for the watcher's read in flight to end (one to a store that stopped
        answering lasts its socket timeout; a process about to exit need not wait)."""
        if self.registrar is not None:
            self.registrar.stop()
        self.watcher.stop(wait)
        self._stopping.set()
        self._probe_wake.set()
        self.store.close()

    def __enter__(self) -> Cluster:
        return self.start(wait=self.settings.connect_timeout)

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the view ---------------------------------------------------------------

    @property
    def table(self) -> EndpointTable:
        return self.watcher.table

    def endpoints(self, service: str) -> tuple[Endpoint, ...]:
        """Live endpoints of ``service`` (its records are read from now on)."""
        found = self.table.by_service.get(service)
        if found is None and self._started:
            services = self.watcher.services
            if services is not None and service not in services:
                try:
                    self.watcher.want(service)
                except DiscoveryError as exc:
                    log.warning("could not read the endpoints of %s: %s", service, exc)
                found = self.table.by_service.get(service)
        return found or ()

    # --- passive health -----------------------------------------------------------

    def eject(self, endpoint: Endpoint, seconds: float | None = None, reason: str = "",
              accepts: bool = False, reachable: bool = True) -> None:
        """Leave ``endpoint`` out of this instance's picks for a while.

        The first ejection lasts EJECT_FIRST seconds; each one that follows soon after
        the last doubles it, up to ``--eject-seconds``. It ends earlier when the
        endpoint shows a newer heartbeat or a new registration (see :meth:`ejected`)
        or a probe connection succeeds. Ejecting an endpoint already out changes
        nothing: concurrent requests that find it dead are one strike, not many.

        ``accepts``: the endpoint took the connection and closed it unanswered (its
        listener lives on, its app does not; a port forwarder whose target is gone).
        Its registration may well go on heartbeating, and a connect succeeds, so only
        a probe connection that it keeps open, as a server awaiting a request does,
        ends such an ejection early. ``reachable=False``: it could not be reached at
        all (a connect timeout, no route: a wrong or unroutable endpoint URL, a host
        cut off from this one). Its heartbeats reach the store, not this instance, and
        do not end the ejection either: they let it back every ping, each time one
        request waiting out ``--connect-timeout``.
        """
        cap = self.settings.eject_seconds
        now = time.monotonic()
        table = self.table
        listed = table.by_hash.get(endpoint.hash)
        # The store's clock now, estimated from its last read: a heartbeat stamped later
        # than this was written after the failure, by an instance that is back.
        read_at = self.watcher.read_at
        store_now = table.now + dt.timedelta(seconds=max(0.0, now - read_at) if read_at else 0.0)
        seen = max(endpoint.timestamp, listed.timestamp if listed else endpoint.timestamp,
                   store_now)
        with self._lock:
            current = self._ejections.get(endpoint.hash)
            if current is not None and current.until > now:
                return
            if len(self._strikes) > 1024:  # endpoints long gone: forget their strikes
                self._strikes = {k: v for k, v in self._strikes.items() if now - v[1] < cap}
            strikes, last_end = self._strikes.get(endpoint.hash, (0, 0.0))
            strikes = strikes + 1 if now - last_end < cap else 1
            if seconds is None:
                seconds = min(cap, EJECT_FIRST * 2 ** min(strikes - 1, 30))
            self._ejections[endpoint.hash] = _Ejection(endpoint, now + seconds, seen, accepts,
                                                       reachable and not accepts)
            self._strikes[endpoint.hash] = (strikes, now + seconds)
            self._view_table = None
        log.warning("ejecting %s %s for %.3gs (strike %d)%s", endpoint.service, endpoint.url,
                    seconds, strikes, f": {reason}" if reason else "")
        for listener in self.eject_listeners:
            listener(endpoint.url, reason)
        self._probe_wake.set()

    def readmit(self, endpoint_hash: str, reason: str) -> bool:
        """End the ejection of ``endpoint_hash``, if any; True when there was one."""
        with self._lock:
            ejection = self._ejections.pop(endpoint_hash, None)
            self._view_table = None
        if ejection is not None:
            e = ejection.endpoint
            log.info("%s %s back in rotation: %s", e.service, e.url, reason)
        return ejection is not None

    def ejected(self) -> frozenset[str]:
        """Hashes of the endpoints currently ejected (cheap when there are none).

        An ejection ends when it times out, when the endpoint's record shows a
        heartbeat newer than the ejection (a restarted instance registers at once; only
        for one that refused, see :meth:`eject`),
        or when the endpoint leaves the table (should it come back, that is a new
        registration). ``seen`` estimates the store's clock at the ejection from its
        last read plus the time since; a slow read makes it an underestimate, so a
        heartbeat that landed during that read can still readmit an endpoint early,
        once: that costs one refused connect, retried elsewhere, and the next
        ejection lasts twice as long.
        """
        if not self._ejections:
            return _NONE_EJECTED
        table = self.table
        now = time.monotonic()
        if table is self._view_table and now < self._view_until:
            return self._view
        healed = []
        with self._lock:
            for key, ejection in list(self._ejections.items()):
                listed = table.by_hash.get(key)
                if ejection.until <= now or listed is None:
                    del self._ejections[key]
                elif listed.timestamp > ejection.seen and ejection.by_heartbeat:
                    del self._ejections[key]
                    healed.append(ejection.endpoint)
            view = frozenset(self._ejections) if self._ejections else _NONE_EJECTED
            self._view = view
            self._view_until = min((e.until for e in self._ejections.values()), default=now)
            self._view_table = table
        for e in healed:
            log.info("%s %s back in rotation: a newer heartbeat", e.service, e.url)
        return view

    def _hold(self, endpoint_hash: str, seconds: float) -> None:
        """Keep an ejection ``seconds`` more at least: a probe found the endpoint still
        closing connections unanswered. Were it let out when its time ran out, the
        next request sent to it would fail (a POST: a 502) every ``--eject-seconds``."""
        now = time.monotonic()
        with self._lock:
            ejection = self._ejections.get(endpoint_hash)
            if ejection is not None and ejection.until < now + seconds:
                self._ejections[endpoint_hash] = dataclasses.replace(
                    ejection, until=now + seconds)
                self._view_table = None

    def _probe_loop(self) -> None:
        """Try a TCP connect to each ejected endpoint every PROBE_INTERVAL seconds (one
        it must keep open for LINGER seconds when it closed connections unanswered)."""
        while not self._stopping.is_set():
            if not self._ejections:
                self._probe_wake.wait(5.0)
                self._probe_wake.clear()
                continue
            self._stopping.wait(PROBE_INTERVAL)
            with self._lock:
                targets = [(h, e.endpoint, e.accepts) for h, e in self._ejections.items()]
            timeout = min(PROBE_INTERVAL, self.settings.connect_timeout)
            for key, endpoint, accepts in targets:
                if self._stopping.is_set():
                    break
                if accepts:
                    if keeps_open(endpoint.url, timeout, self.probe_tls.get(endpoint.url)):
                        self.readmit(key, "a probe connection stayed open")
                    else:
                        self._hold(key, PROBE_INTERVAL * 2 + timeout + LINGER)
                elif _connects(endpoint.url, timeout):
                    self.readmit(key, "a probe connection succeeded")


def keeps_open(url: str, timeout: float, tls: ssl.SSLContext | None = None) -> bool:
    """Does ``url`` accept a TCP connection (and, for https, complete a TLS handshake
    whose certificate verifies, as a request's must: with ``tls``, else the system's
    trust store) and keep it open, silent, for LINGER seconds, as an HTTP server
    waiting for a request does? A dead app behind a live listener closes or resets it
    at once; a server that speaks first is no HTTP one."""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        sock = socket.create_connection((parts.hostname or "", port), timeout=timeout)
        try:
            if parts.scheme == "https":
                if tls is None:
                    if not _TLS:
                        _TLS.append(ssl.create_default_context())
                    tls = _TLS[0]
                sock = tls.wrap_socket(sock, server_hostname=parts.hostname)
            sock.settimeout(LINGER)
            try:
                sock.recv(1)
            except socket.timeout:
                return True
            return False
        finally:
            sock.close()
    except (OSError, ValueError):
        return False


#: the probe's TLS context: the system's trust store, as cluster.proxy.upstream's
_TLS: list[ssl.SSLContext] = []


def _connects(url: str, timeout: float) -> bool:
    """Does a TCP connection to ``url``'s host and port succeed within ``timeout``?"""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False
