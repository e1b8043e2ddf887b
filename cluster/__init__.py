"""Service discovery and load balancing for Python web apps on gevent.

Importing :mod:`cluster` imports neither gevent's hub nor pymongo: entry points must
be able to monkey-patch first (see :mod:`cluster.entry`), so the public names below
are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "Settings": "cluster.config",
    "Cluster": "cluster.node",
    "wrap": "cluster.app",
    "make_server": "cluster.server",
    "ClusterApp": "cluster.app",
    "discover": "cluster.client",
    "ClusterError": "cluster.errors",
    "ConfigError": "cluster.errors",
    "DiscoveryError": "cluster.errors",
    "UpstreamError": "cluster.errors",
}

__all__ = sorted(_PUBLIC)


_RENAMED = {"make_server": "make_cluster_server"}


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'cluster' has no attribute {name!r}")
    return getattr(importlib.import_module(module), _RENAMED.get(name, name))
