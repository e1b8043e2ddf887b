"""``cluster serve | status | register | drain``.

Every user-facing failure ends here as one line on stderr and an exit status:
2 for a bad setting, 1 for a store that cannot be reached; never a traceback.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from cluster.config import Settings, parse_command_line
from cluster.errors import ConfigError, DiscoveryError
from cluster.records import shown

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
            if namespace.watch:
                return watch(settings, show_all=namespace.all)
            return status(settings, as_json=namespace.json, show_all=namespace.all)
        if command == "demo":
            from cluster.demo_runner import run_demo

            return run_demo(settings, namespace.instances)
        if command == "drain":
            return drain(settings, pid=namespace.pid, url=namespace.url, wait=namespace.wait)
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
    except BrokenPipeError:
        # the reader of the output went away (`cluster status --watch | head`): as
        # for any Unix tool, that ends the command, without a traceback (and without
        # Python's own complaint when it flushes stdout at exit)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    raise AssertionError(command)  # pragma: no cover - parse_command_line checked it


def status_rows(settings: Settings, show_all: bool = False) -> dict[str, Any]:
    """What ``cluster status`` shows, as data; raises DiscoveryError."""
    from cluster.discovery import open_store
    from cluster.registry import parse_documents

    store = open_store(settings.discovery_url, timeout=settings.connect_timeout)
    path = getattr(store, "path", None)
    if path is not None and not path.exists():
        # Reading would create it, directories and all: a mistyped path left a new
        # store behind. Nothing has registered there yet (or ever): an empty view,
        # which says so, as a script polling for the first endpoints expects.
        store.close()
        return {"store": store.description, "exists": False, "now": None, "services": [],
                "balancers": [], "endpoints": [], "malformed": []}
    try:
        snapshot = store.snapshot()
    finally:
        store.close()
    endpoints, problems = parse_documents(snapshot.documents, snapshot.now)
    problems += snapshot.unreadable
    rows = []
    for e in sorted(endpoints, key=lambda e: (e.service, e.url)):
        healthy = e.is_healthy(snapshot.now, settings.expiry_grace)
        if healthy or show_all:
            rows.append({
                "service": e.service, "endpoint": e.url, "hash": e.hash,
                "balancer": e.balancer, "age": round(e.age(snapshot.now), 3),
                "pingInterval": e.ping_interval, "healthy": healthy,
                "draining": e.draining, "version": e.version,
                "load": e.load.to_doc() if e.load is not None else None,
            })
    live = [r for r in rows if r["healthy"]]
    return {
        "store": store.description,
        "now": snapshot.now.isoformat(),
        "services": sorted({r["service"] for r in live}),
        "balancers": sorted({r["balancer"] for r in live if r["balancer"]}),
        "endpoints": rows,
        "malformed": [{"record": ident, "problem": why} for ident, why in problems],
        "exists": True,
    }


def _age(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 120 else str(dt.timedelta(seconds=int(seconds)))


def _load(load: dict[str, Any] | None) -> str:
    """An endpoint's published load, short: WebSockets, requests in progress, service time."""
    if load is None:
        return "-"
    return f"{load['sockets']} ws, {load['inflight']} req, {load['serviceMs']:.1f} ms"


def table_lines(data: dict[str, Any],
                rates: dict[str, tuple[float, float] | None] | None = None) -> list[str]:
    """The ``cluster status`` table; with ``rates`` (endpoint -> (requests/s, error
    rate), None when its status page did not answer) two more columns."""
    lines = [f"discovery: {data['store']}"]
    if not data["endpoints"]:
        lines.append("no live endpoints")
    else:
        headers: tuple[str, ...] = ("SERVICE", "ENDPOINT", "HASH", "VERSION", "BALANCER",
                                    "HEARTBEAT", "STATE", "LOAD")
        if rates is not None:
            headers += ("REQ/S", "ERRORS")
        table: list[tuple[str, ...]] = [headers]
        for r in data["endpoints"]:
            state = "expired" if not r["healthy"] else "draining" if r["draining"] else "live"
            row: tuple[str, ...] = (
                r["service"], r["endpoint"], r["hash"][:10], r["version"] or "-",
                r["balancer"] or "-", _age(r["age"]) + " ago", state, _load(r.get("load")))
            if rates is not None:
                seen = rates.get(r["endpoint"])
                row += ("-", "-") if seen is None else (f"{seen[0]:.1f}", f"{100 * seen[1]:.1f}%")
            table.append(row)
        widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
        for row in table:
            lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    lines.append(f"balancers: {', '.join(data['balancers']) or '-'}")
    for bad in data["malformed"]:
        lines.append(f"warning: malformed record {bad['record']}: {bad['problem']}")
    return lines


def status(settings: Settings, as_json: bool = False, show_all: bool = False) -> int:
    data = status_rows(settings, show_all)
    if not data["exists"]:
        print(f"cluster status: no discovery store at {data['store']} yet: no instance "
              f"has used it (check --discovery-url)", file=sys.stderr)
    if as_json:
        print(json.dumps(data, indent=2))
        return 0
    print("\n".join(table_lines(data)))
    return 0


#: seconds an instance's status page may take before its rate shows as '-'
RATE_TIMEOUT = 0.5
_CLEAR = "\x1b[H\x1b[2J"


def endpoint_rates(settings: Settings,
                   endpoints: list[str]) -> dict[str, tuple[float, float] | None]:
    """Each endpoint's own requests/s and error rate, read from its status page
    (``ENDPOINT/_cluster/status``) in parallel; None for those that did not answer."""
    import requests

    headers = {"Authorization": f"Bearer {settings.admin_token}"} if settings.admin_token else {}
    found: dict[str, tuple[float, float] | None] = {url: None for url in endpoints}

    def fetch(url: str) -> None:
        try:
            response = requests.get(f"{url}{settings.admin_prefix}/status", headers=headers,
                                    timeout=RATE_TIMEOUT)
            served = response.json()["served"]
            found[url] = (float(served["rate"]), float(served["error_rate"]))
        except (requests.RequestException, ValueError, KeyError, TypeError):
            pass

    threads = [threading.Thread(target=fetch, args=(url,), daemon=True) for url in endpoints]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 2 * RATE_TIMEOUT
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return dict(found)


def watch(settings: Settings, show_all: bool = False, interval: float = 1.0) -> int:
    """``cluster status --watch``: the table redrawn in place every second, with each
    endpoint's request rate, until Ctrl-C (taken as a signal of the event loop: raised
    as KeyboardInterrupt inside gevent's hub, it was also printed there)."""
    import gevent
    import gevent.event

    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGINT, stop.set)
    try:
        while not stop.is_set():
            started = time.monotonic()
            try:
                data = status_rows(settings, show_all)
                live = [r["endpoint"] for r in data["endpoints"] if r["healthy"]]
                lines = table_lines(data, endpoint_rates(settings, live))
            except DiscoveryError as exc:
                lines = [f"discovery: {exc}"]
            stamp = dt.datetime.now().strftime("%H:%M:%S")
            lines.append(f"\n{stamp}  refreshing every {interval:g}s; req/s over the last 5 s "
                         "from each endpoint's status page; Ctrl-C to stop")
            sys.stdout.write(_CLEAR + "\n".join(lines) + "\n")
            sys.stdout.flush()
            stop.wait(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:  # a SIGINT before the handler was in place
        pass
    sys.stdout.write("\n")
    return 0


#: how often ``cluster drain --wait`` looks whether the instance is gone
WAIT_INTERVAL = 0.2


def drain(settings: Settings, pid: int | None = None, url: str | None = None,
          wait: bool = False) -> int:
    """``cluster drain``: SIGUSR2 to ``pid`` (default: the one in --pid-file), or
    ``POST url/_cluster/drain``; with ``wait``, return once the instance has stopped."""
    if url is not None:
        return _drain_url(settings, url.rstrip("/"), wait)
    setting = "--pid"
    if pid is None:
        setting = "--pid-file (CLUSTER_PID_FILE)"
        pid = _read_pid(settings.pid_file)
    elif pid <= 0:  # kill(2) would signal a process group, or every process
        raise ConfigError("--pid", f"{pid} is not a process ID")
    refusal = _unsafe_target(pid)
    if refusal:
        raise ConfigError(setting, f"process {pid} {refusal}; nothing sent")
    try:
        os.kill(pid, signal.SIGUSR2)
    except ProcessLookupError:
        raise ConfigError("--pid", f"no process {pid}") from None
    except PermissionError:
        raise ConfigError("--pid", f"not allowed to signal process {pid}") from None
    print(f"draining process {pid} (SIGUSR2)"
          f"{'; waiting for it to stop' if wait else ''}", flush=True)
    while wait and process_alive(pid):
        time.sleep(WAIT_INTERVAL)
    if wait:
        print(f"process {pid} has stopped")
    return 0


#: interpreters a cluster instance may run under when its command line does not name
#: cluster (a script of its own, or a symlink, that calls cluster.entry.main)
_PYTHONS = (b"python", b"pypy")


def _unsafe_target(pid: int) -> str:
    """Why SIGUSR2 must not go to ``pid``, else "". SIGUSR2's default action ends a
    process: sent to a PID that a stale pid file still names (reused since by, say, a
    database) or to a mistyped one, a drain killed it. Linux's /proc tells whether the
    process handles SIGUSR2 (every cluster instance does once it serves: gevent's
    handler) and what it runs. A command line without the word cluster is not enough
    to refuse: a script of one's own or a symlink (``/usr/local/bin/web serve``) runs
    cluster under another name; its interpreter is Python. Where /proc cannot tell
    (none, another user's process), kill() decides as before."""
    try:
        argv = [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
        status = Path(f"/proc/{pid}/status").read_text(errors="replace")
    except OSError:
        return ""
    if not argv:
        return ""  # a zombie, or a kernel thread: kill() decides
    shown_argv = shown(b" ".join(argv).decode("utf-8", "replace"), 80)
    if any(os.path.basename(arg).startswith(b"gunicorn") for arg in argv[:3]):
        # its arbiter takes SIGUSR2 for a binary upgrade (a second arbiter), its
        # workers die of it; cluster.gunicorn has no drain (README)
        return (f"({shown_argv}) is gunicorn, which has no cluster drain (its arbiter "
                "takes SIGUSR2 for an upgrade, its workers die of it): stop it with TERM")
    named = any(b"cluster" in arg for arg in argv)
    if not _handles_usr2(status):
        if named:
            return (f"({shown_argv}) does not handle SIGUSR2 yet, which would end it: "
                    "a cluster instance still starting? Try again once it serves")
        return (f"({shown_argv}) is not a cluster instance: SIGUSR2 would end it (a "
                "stale pid file, or a PID mistyped?)")
    if named:
        return ""
    try:
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe")).encode()
    except OSError:
        exe = os.path.basename(argv[0])
    if exe.startswith(_PYTHONS) or os.path.basename(argv[0]).startswith(_PYTHONS):
        return ""
    return (f"({shown_argv}) is not a cluster instance: it has a SIGUSR2 handler of its "
            "own (a stale pid file, or a PID mistyped?)")


def _handles_usr2(status: str) -> bool:
    """True when the process in /proc/PID/status text catches, ignores or blocks
    SIGUSR2, so that the signal does not end it."""
    bit = 1 << (signal.SIGUSR2 - 1)
    masks: dict[str, int] = {}
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name in ("SigCgt", "SigIgn", "SigBlk"):
            try:
                masks[name] = int(value.strip(), 16)
            except ValueError:
                return True  # an unknown shape: kill() decides, as without /proc
    if len(masks) < 3:
        return True  # as above
    return any(mask & bit for mask in masks.values())


def _read_pid(path: str | None) -> int:
    if not path:
        raise ConfigError("--pid-file (CLUSTER_PID_FILE)",
                          "say which instance to drain: --pid, --pid-file or --url")
    try:
        with open(path, encoding="ascii") as found:
            text = found.read().strip()
    except OSError as exc:
        raise ConfigError("--pid-file (CLUSTER_PID_FILE)",
                          f"cannot read {path}: {exc.strerror or exc}") from None
    if not text.isdigit() or int(text) <= 0:
        raise ConfigError("--pid-file (CLUSTER_PID_FILE)", f"{path} holds no PID")
    return int(text)


def process_alive(pid: int) -> bool:
    """Is ``pid`` a running process (not gone, not a zombie waiting for its parent)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc: the signal test is all we have


def _drain_url(settings: Settings, url: str, wait: bool) -> int:
    import requests

    headers = {"Authorization": f"Bearer {settings.admin_token}"} if settings.admin_token else {}
    target = f"{url}{settings.admin_prefix}/drain"
    try:
        response = requests.post(target, headers=headers, timeout=settings.connect_timeout)
    except requests.RequestException as exc:
        raise DiscoveryError(f"could not reach {target}: {exc}") from None
    except ValueError as exc:  # a URL urllib3 cannot parse (LocationParseError)
        raise ConfigError("--url", f"{target}: {exc}") from None
    if response.status_code not in (200, 202):
        raise ConfigError("--url", f"{target} answered {response.status_code}: "
                                   f"{response.text.strip()[:200]}")
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or answer.get("draining") is not True:
        # the app answered: the admin pages are not open to this address (see
        # --trusted-proxies, --admin-token), or the prefix is another one
        raise ConfigError("--url", f"{target} is not a cluster instance's drain page (the "
                                   f"app answered {response.status_code}): check "
                                   f"--admin-prefix, and --admin-token or --trusted-proxies")
    print(f"{url} is draining" + (" (it already was)" if response.status_code == 200 else "")
          + ("; waiting for its record to leave the table" if wait else ""), flush=True)
    endpoint = answer.get("endpoint") or url
    while wait and any(r["endpoint"] == endpoint for r in status_rows(settings)["endpoints"]):
        time.sleep(WAIT_INTERVAL)
    if wait:
        print(f"{endpoint} has left the table")
    return 0
