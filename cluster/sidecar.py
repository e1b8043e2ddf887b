"""``cluster register``: keep a record alive for an endpoint another program serves.

So a Node, Go or Meteor backend joins the cluster without a line of Python: the
record lives while the program answers its health check, and goes on SIGTERM.

Started by another program with ``_CLUSTER_PARENT_PID`` in its environment, it also
stops (and removes the record) when that parent is gone, however it died, so no
sidecar keeps announcing an endpoint nobody serves. Store failures are one warning
per outage (see :class:`~cluster.registry.Registrar`), never a traceback per beat.
"""

from __future__ import annotations

import logging
import os
import signal

import gevent
import gevent.event
import requests

from cluster.config import Settings
from cluster.discovery import open_store
from cluster.errors import ConfigError
from cluster.registry import Registrar
from cluster.workers import PARENT_PID_ENV, watch_parent

log = logging.getLogger(__name__)


class HealthCheck:
    """True while ``url`` answers with a status below 500; says why it fails, once
    per failing streak, at warning.

    Only at debug, a health URL that never answered (a wrong port, an https one whose
    certificate does not verify against requests' bundle) left the sidecar silent
    for good: never registered, and not a line saying why.
    """

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self.failing = False

    def __call__(self) -> bool:
        try:
            status = requests.get(self.url, timeout=self.timeout,
                                  allow_redirects=False).status_code
        except (requests.RequestException, ValueError) as exc:  # ValueError: a URL
            reason = f"{type(exc).__name__}: {exc}"  # urllib3 cannot parse
        else:
            if status < 500:
                if self.failing:
                    log.info("health check %s answers again", self.url)
                self.failing = False
                return True
            reason = f"status {status}"
        if not self.failing:
            log.warning("health check %s failed (%s); the endpoint is kept out of the "
                        "table until it answers", self.url, reason[:300])
        else:
            log.debug("health check %s failed: %s", self.url, reason)
        self.failing = True
        return False


def register(settings: Settings, health_url: str | None = None) -> int:
    if not settings.service:
        raise ConfigError("--service (CLUSTER_SERVICE)", "required to register an endpoint")
    if not settings.endpoint_url:
        raise ConfigError("--endpoint-url (CLUSTER_ENDPOINT_URL)", "required to register")
    store = open_store(settings.discovery_url, timeout=settings.connect_timeout)
    timeout = min(settings.ping_interval, settings.connect_timeout)
    registrar = Registrar(
        store, settings.service, settings.endpoint_url, settings.balancer_url,
        settings.ping_interval,
        healthy=HealthCheck(health_url, timeout) if health_url else None,
        version=settings.own_app_version, grace=settings.expiry_grace,
    )
    stopping = gevent.event.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stopping.set)
    parent = os.environ.pop(PARENT_PID_ENV, None)
    if parent and parent.isdigit():
        gevent.spawn(watch_parent, int(parent), stopping)
    registrar.start()
    log.info("keeping %s %s registered in %s", settings.service, settings.endpoint_url,
             store.description)
    stopping.wait()
    registrar.stop()
    store.close()
    return 0
