"""Discovery stores, chosen by the scheme of the discovery URL.

``mongodb://`` and ``mongodb+srv://`` use MongoDB through pymongo (production, ideally
a replica set); ``sqlite:///path`` and an unset URL use the embedded store, which lets
processes on one host find each other with no server to run.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from cluster.discovery.base import DiscoveryStore, StoreSnapshot
from cluster.errors import ConfigError

__all__ = ["DiscoveryStore", "StoreSnapshot", "open_store"]


def open_store(url: str | None, timeout: float = 5.0) -> DiscoveryStore:
    """The store for ``url``; raises :class:`ConfigError` for an unknown scheme."""
    if not url:
        from cluster.discovery.embedded import EmbeddedStore

        return EmbeddedStore(None, timeout=timeout)
    scheme = urlsplit(url).scheme
    if scheme in ("mongodb", "mongodb+srv"):
        from cluster.discovery.mongo import MongoStore

        return MongoStore(url, timeout=timeout)
    if scheme == "sqlite":
        from cluster.discovery.embedded import EmbeddedStore

        return EmbeddedStore(urlsplit(url).path or None, timeout=timeout)
    raise ConfigError("--discovery-url (CLUSTER_DISCOVERY_URL)", f"unknown scheme {scheme!r}")
