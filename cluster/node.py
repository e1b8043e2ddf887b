"""A cluster member: its discovery store, its own registration, its view of the rest.

This is the library API's heart: ``with Cluster(service="web") as node: node.table``.
The WSGI app, the standalone server, the gunicorn hooks and ``discover()`` all use it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from cluster.config import Settings
from cluster.discovery import DiscoveryStore, open_store
from cluster.records import Endpoint, endpoint_hash
from cluster.registry import EndpointTable, Registrar, Watcher

log = logging.getLogger(__name__)

_NONE_EJECTED: frozenset[str] = frozenset()


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
        self.self_url = s.own_endpoint_url
        self.self_hash = endpoint_hash(self.self_url)
        self.watcher = Watcher(
            self.store,
            grace=s.expiry_grace,
            refresh_interval=max(0.1, min(s.ping_interval / 2, 5.0)),
        )
        self.registrar: Registrar | None = None
        if register and s.service:
            self.registrar = Registrar(
                self.store, s.service, self.self_url, s.balancer_url, s.ping_interval
            )
        self._ejected: dict[str, float] = {}
        #: called as f(endpoint URL, reason) once per ejection (the observers' hook)
        self.eject_listeners: list[Callable[[str, str], None]] = []
        self._lock = threading.Lock()
        self._started = False

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
        if wait:
            self.watcher.refreshed.wait(wait)
        return self

    def close(self) -> None:
        """Deregister at once, stop the loops, close the store."""
        if self.registrar is not None:
            self.registrar.stop()
        self.watcher.stop()
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
        return self.table.by_service.get(service, ())

    # --- passive health -----------------------------------------------------------

    def eject(self, endpoint: Endpoint, seconds: float | None = None, reason: str = "") -> None:
        """Leave ``endpoint`` out of this instance's picks for a while."""
        seconds = self.settings.eject_seconds if seconds is None else seconds
        now = time.monotonic()
        with self._lock:
            already = self._ejected.get(endpoint.hash, 0.0) > now
            self._ejected[endpoint.hash] = now + seconds
        if not already:  # concurrent requests to a dead endpoint: one line, not one each
            log.warning("ejecting %s %s for %.0fs%s", endpoint.service, endpoint.url, seconds,
                        f": {reason}" if reason else "")
            for listener in self.eject_listeners:
                listener(endpoint.url, reason)

    def ejected(self) -> frozenset[str]:
        """Hashes of the endpoints currently ejected (cheap when there are none)."""
        if not self._ejected:
            return _NONE_EJECTED
        now = time.monotonic()
        with self._lock:
            for key in [k for k, until in self._ejected.items() if until <= now]:
                del self._ejected[key]
            return frozenset(self._ejected)
