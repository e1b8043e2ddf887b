"""Operator pages under ``/_cluster/``, answered to trusted peers only (see routing).

``/_cluster/status`` is this instance's view of the cluster as JSON: its identity, its
table, what it has ejected, whether the store answers.
"""

from __future__ import annotations

import json
from typing import Any

from cluster.observe import NULL_OBSERVER, Observer

JSON = "application/json"


class Admin:
    """Answers the operator pages of one instance."""

    def __init__(self, node: Any, settings: Any, observer: Observer = NULL_OBSERVER) -> None:
        self.node = node
        self.settings = settings
        self.observer = observer

    def respond(self, path: str, query: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for an operator page."""
        if path.rstrip("/") == "/_cluster/status":
            return 200, JSON, json.dumps(self.status()).encode()
        return 404, "text/plain; charset=utf-8", b"no such page\n"

    def status(self) -> dict[str, Any]:
        node = self.node
        table = node.table
        registrar = node.registrar
        return {
            "service": node.settings.service,
            "endpoint": node.self_url,
            "hash": node.self_hash,
            "registered": registrar is not None and not registrar.outage.failing,
            "store_failing": node.watcher.outage.failing,
            "now": table.now.isoformat(),
            "endpoints": [
                {"service": e.service, "endpoint": e.url, "hash": e.hash,
                 "balancer": e.balancer, "age": round(e.age(table.now), 3)}
                for e in table.endpoints
            ],
            "balancers": list(table.balancers),
            "ejected": sorted(node.ejected()),
        }
