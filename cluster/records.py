"""Endpoint records in the meteorhacks:cluster shape, and their validation.

A record is one document per endpoint in the ``clusterEndpoints`` collection::

    {serviceName, endpoint, endpointHash, balancer, timestamp, pingInterval}

``timestamp`` is the store's own clock at the last heartbeat and ``pingInterval`` is
in milliseconds, so Meteor instances and ours can read each other's records.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlsplit

COLLECTION = "clusterEndpoints"


def endpoint_hash(endpoint_url: str) -> str:
    """sha1 hex of the endpoint URL, as meteorhacks:cluster computes it."""
    return hashlib.sha1(endpoint_url.encode("utf-8")).hexdigest()


def is_http_url(url: object) -> bool:
    if not isinstance(url, str):
        return False
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


@dataclass(frozen=True)
class Endpoint:
    """One live instance of a service as last seen in the discovery store."""

    service: str
    url: str
    hash: str
    balancer: str | None
    timestamp: dt.datetime
    ping_interval: float  # seconds

    def age(self, now: dt.datetime) -> float:
        """Seconds since the last heartbeat, by the store's clock."""
        return (now - self.timestamp).total_seconds()

    def is_healthy(self, now: dt.datetime, grace: float) -> bool:
        return self.age(now) < self.ping_interval + grace


class MalformedRecord(ValueError):
    """A discovery document that does not have the meteorhacks shape."""


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def parse_record(doc: Mapping[str, Any]) -> Endpoint:
    """Turn a store document into an :class:`Endpoint`.

    Raises :class:`MalformedRecord` naming the first problem found; extra fields are
    ignored so other writers may add their own.
    """
    service = doc.get("serviceName")
    if not isinstance(service, str) or not service:
        raise MalformedRecord("serviceName missing or not a string")
    url = doc.get("endpoint")
    if not is_http_url(url):
        raise MalformedRecord(f"endpoint {url!r} is not an http(s) URL")
    assert isinstance(url, str)
    balancer = doc.get("balancer")
    if balancer is not None and not is_http_url(balancer):
        raise MalformedRecord(f"balancer {balancer!r} is not an http(s) URL or null")
    timestamp = doc.get("timestamp")
    if not isinstance(timestamp, dt.datetime):
        raise MalformedRecord("timestamp missing or not a date")
    ping = doc.get("pingInterval")
    if isinstance(ping, bool) or not isinstance(ping, (int, float)) or ping <= 0:
        raise MalformedRecord(f"pingInterval {ping!r} is not a positive number of ms")
    # The hash is recomputed rather than trusted: routing by a hash that does not
    # match the URL would send sessions to the wrong place.
    return Endpoint(
        service=service,
        url=url.rstrip("/"),
        hash=endpoint_hash(url),
        balancer=balancer.rstrip("/") if balancer else None,
        timestamp=_aware(timestamp),
        ping_interval=float(ping) / 1000.0,
    )


def make_record(
    service: str, endpoint_url: str, balancer_url: str | None, ping_interval: float
) -> dict[str, Any]:
    """The document an instance writes for itself (timestamp set by the store)."""
    return {
        "serviceName": service,
        "endpoint": endpoint_url,
        "endpointHash": endpoint_hash(endpoint_url),
        "balancer": balancer_url,
        "pingInterval": int(round(ping_interval * 1000)),
    }
