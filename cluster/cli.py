"""``cluster serve | status | register``.

Every user-facing failure ends here as one line on stderr and an exit status:
2 for a bad setting, 1 for a store that cannot be reached; never a traceback.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any, Sequence

from cluster.config import Settings, parse_command_line
from cluster.errors import ConfigError, DiscoveryError

log = logging.getLogger("cluster")


def main(argv: Sequence[str]) -> int:
    command, settings, namespace = parse_command_line(argv)
    prog = f"cluster {command}" if command else "cluster"
    if command is None:
        command = "serve"
    try:
        if command == "serve":
            from cluster.server import configure_logging, serve

            configure_logging(settings.log_level)
            return serve(settings)
        if command == "status":
            return status(settings, as_json=namespace.json, show_all=namespace.all)
        if command == "demo":
            from cluster.demo_runner import run_demo

            return run_demo(settings, namespace.instances)
        if command == "register":
            from cluster.server import configure_logging
            from cluster.sidecar import register

            configure_logging(settings.log_level)
            return register(settings, health_url=namespace.health_url)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except DiscoveryError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    raise AssertionError(command)  # pragma: no cover - parse_command_line checked it


def status_rows(settings: Settings, show_all: bool = False) -> dict[str, Any]:
    """What ``cluster status`` shows, as data; raises DiscoveryError."""
    from cluster.discovery import open_store
    from cluster.registry import parse_documents

    store = open_store(settings.discovery_url, timeout=settings.connect_timeout)
    try:
        snapshot = store.snapshot()
    finally:
        store.close()
    endpoints, problems = parse_documents(snapshot.documents, snapshot.now)
    rows = []
    for e in sorted(endpoints, key=lambda e: (e.service, e.url)):
        healthy = e.is_healthy(snapshot.now, settings.expiry_grace)
        if healthy or show_all:
            rows.append({
                "service": e.service, "endpoint": e.url, "hash": e.hash,
                "balancer": e.balancer, "age": round(e.age(snapshot.now), 3),
                "pingInterval": e.ping_interval, "healthy": healthy,
            })
    live = [r for r in rows if r["healthy"]]
    return {
        "store": store.description,
        "now": snapshot.now.isoformat(),
        "services": sorted({r["service"] for r in live}),
        "balancers": sorted({r["balancer"] for r in live if r["balancer"]}),
        "endpoints": rows,
        "malformed": [{"record": ident, "problem": why} for ident, why in problems],
    }


def _age(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 120 else str(dt.timedelta(seconds=int(seconds)))


def status(settings: Settings, as_json: bool = False, show_all: bool = False) -> int:
    data = status_rows(settings, show_all)
    if as_json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"discovery: {data['store']}")
    if not data["endpoints"]:
        print("no live endpoints")
    else:
        headers = ("SERVICE", "ENDPOINT", "HASH", "BALANCER", "HEARTBEAT", "STATE")
        table = [headers] + [
            (r["service"], r["endpoint"], r["hash"][:10], r["balancer"] or "-",
             _age(r["age"]) + " ago", "live" if r["healthy"] else "expired")
            for r in data["endpoints"]
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
        for row in table:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"balancers: {', '.join(data['balancers']) or '-'}")
    for bad in data["malformed"]:
        print(f"warning: malformed record {bad['record']}: {bad['problem']}")
    return 0
