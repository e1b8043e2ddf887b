"""MongoDB discovery store (pymongo), in the meteorhacks:cluster shape.

pymongo does its I/O on sockets and its monitors on threads, both cooperative once
gevent has monkey-patched them; entry points patch before importing this module.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Mapping
from urllib.parse import urlsplit

import pymongo
from pymongo.errors import ConfigurationError, PyMongoError

from cluster.discovery.base import DiscoveryStore, StoreSnapshot
from cluster.errors import ConfigError, DiscoveryError
from cluster.records import COLLECTION

DEFAULT_DATABASE = "cluster"


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


class MongoStore(DiscoveryStore):
    """Records in ``<db>.clusterEndpoints``; the database comes from the URL path."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        ms = int(timeout * 1000)
        try:
            self._client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
                url,
                appname="cluster",
                connect=False,
                serverSelectionTimeoutMS=ms,
                connectTimeoutMS=ms,
                socketTimeoutMS=ms,
                tz_aware=True,
            )
            database = self._client.get_default_database(default=DEFAULT_DATABASE)
        except (ConfigurationError, ValueError) as exc:
            raise ConfigError("--discovery-url (CLUSTER_DISCOVERY_URL)", str(exc)) from None
        self._collection = database[COLLECTION]
        self.description = f"{_redacted(url)} ({database.name}.{COLLECTION})"

    def heartbeat(self, record: Mapping[str, Any]) -> None:
        selector = {"serviceName": record["serviceName"], "endpoint": record["endpoint"]}
        try:
            self._collection.update_one(
                selector,
                {"$set": dict(record), "$currentDate": {"timestamp": True}},
                upsert=True,
            )
        except PyMongoError as exc:
            raise DiscoveryError(f"heartbeat to {self.description} failed: {exc}") from exc

    def remove(self, service: str, endpoint: str) -> None:
        try:
            self._collection.delete_many({"serviceName": service, "endpoint": endpoint})
        except PyMongoError as exc:
            raise DiscoveryError(f"removal from {self.description} failed: {exc}") from exc

    def snapshot(self) -> StoreSnapshot:
        try:
            hello = self._client.admin.command("hello")
            documents = list(self._collection.find({}))
        except PyMongoError as exc:
            raise DiscoveryError(f"reading {self.description} failed: {exc}") from exc
        now = hello.get("localTime")
        if not isinstance(now, dt.datetime):
            # Every MongoDB since 2.x and FerretDB answer localTime; this is a last resort.
            now = dt.datetime.now(dt.timezone.utc)
        elif now.tzinfo is None:
            now = now.replace(tzinfo=dt.timezone.utc)
        return StoreSnapshot(now=now, documents=documents)

    def close(self) -> None:
        self._client.close()
