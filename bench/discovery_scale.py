"""Discovery at scale: store work and detection times for N simulated instances.

Each simulated instance is a real :class:`~cluster.registry.Registrar` and a real
:class:`~cluster.registry.Watcher` (their own loops, greenlets under gevent) against one
real FerretDB (``--backend``: its SQLite backend, the test suite's, or its PostgreSQL
backend, FerretDB's production one); many instances share a process and a few pymongo
clients. Two designs run in the same invocation, on the same store:

- ``today``: the design before the membership log (every watcher reads every record,
  ``find({})``, every half ping interval; a heartbeat updates by
  ``{serviceName, endpoint}``): the same Watcher code driven through a store without a
  log (:class:`TodayStore`);
- ``log``: the membership log (cluster/discovery/mongo.py): a refresh reads one small
  document, a heartbeat addresses its record by ``_id``, one reaper scans.

For each N the collection holds N records. The instances the store can serve here
without saturating are simulated (``samples()``: all up to 100 instances for the log,
50 for today's design; beyond, 50 registrars, and 40 watchers for the log (10 at 5,000),
5,000/N for today's design, as each of its refreshes reads every record); the other
records are written once with a timestamp 50 minutes ahead, so they cost what any
record costs to read and never expire. Three windows of
``--window`` seconds measure the store's CPU (utime + stime of the FerretDB process, and
with PostgreSQL of the postmaster and its backends, from ``/proc/PID/stat``) with the
registrars alone, plus the first watcher (with the log: the
reaper), plus the others; with the work each did, that gives the store CPU per heartbeat,
per reaper scan (or first watcher's refresh) and per refresh, and so the store CPU that
all N instances need at the design's rates (heartbeat every ping interval, refresh every
half; for the log also each watcher's slow resync). Commands and documents per second are
those the simulated instances exchanged (pymongo command monitoring). Then a join, a
graceful leave and a crash (a registrar that stops beating and keeps its record) are
timed until every simulated watcher's table shows them; for today's design at large N
those watchers are few, on a store that is *not* saturated, so they flatter it. A
crash is also timed from the crashed registrar's last heartbeat (``crash_beat_s``): the
record expires ping + grace after it, then the reaper and every watcher refresh.

    python bench/discovery_scale.py                     # 10, 100, 1000, 5000; ~6 minutes
    python bench/discovery_scale.py --backend postgresql  # needs Debian's postgresql
    python bench/discovery_scale.py --sizes 10,100 --window 5

The machine is shared: keep runs short, and compare rows of the same run.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Mapping  # noqa: E402

import gevent  # noqa: E402
from pymongo import monitoring  # noqa: E402
from pymongo.errors import PyMongoError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from cluster.discovery.base import StoreSnapshot  # noqa: E402
from cluster.discovery.mongo import MongoStore, record_id  # noqa: E402
from cluster.errors import DiscoveryError  # noqa: E402
from cluster.records import make_record  # noqa: E402
from cluster.registry import RESYNC_PER_RECORD, RESYNC_SECONDS, Registrar, Watcher  # noqa: E402
from mongo_server import MongoServer  # noqa: E402

PING, GRACE = 5.0, 5.0
REFRESH = PING / 2
CLIENTS = 8  # pymongo clients shared by the simulated instances
TICK = os.sysconf("SC_CLK_TCK")


class Counting(monitoring.CommandListener):
    """Commands and documents the clients exchanged with the store."""

    def __init__(self) -> None:
        self.commands: Counter[str] = Counter()
        self.documents = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.commands[event.command_name] += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        cursor = event.reply.get("cursor") if isinstance(event.reply, dict) else None
        if isinstance(cursor, dict):
            self.documents += len(cursor.get("firstBatch") or cursor.get("nextBatch") or ())

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def total(self) -> tuple[int, int]:
        return sum(self.commands.values()), self.documents


COUNTER = Counting()
monitoring.register(COUNTER)


class TodayStore(MongoStore):
    """The store as it was: no log, heartbeats by (serviceName, endpoint), full reads."""

    changelog = False

    def heartbeat(self, record: Mapping[str, Any], announce: bool = False) -> None:
        selector = {"serviceName": record["serviceName"], "endpoint": record["endpoint"]}
        try:
            self._collection.update_one(
                selector, {"$set": dict(record), "$currentDate": {"timestamp": True}},
                upsert=True)
        except PyMongoError as exc:
            raise DiscoveryError(str(exc)) from exc

    def remove(self, service: str, endpoint: str) -> None:
        try:
            self._collection.delete_many({"serviceName": service, "endpoint": endpoint})
        except PyMongoError as exc:
            raise DiscoveryError(str(exc)) from exc

    def snapshot(self, services: frozenset[str] | None = None) -> StoreSnapshot:
        return super().snapshot(None)  # find({}), as before


def store_cpu(server: MongoServer) -> float:
    """CPU seconds of the store's processes (children reaped meanwhile included)."""
    total = 0
    for pid in server.store_pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # a PostgreSQL backend that just exited: its parent counts it
            continue
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / TICK


class Phase:
    """Store CPU, commands and documents, and the work done, over one window."""

    def __init__(self, server: MongoServer, registrars: list[Registrar],
                 watchers: list[Watcher]):
        self.server, self.registrars, self.watchers = server, registrars, watchers

    def _work(self) -> tuple[int, int, int, int]:
        beats = sum(r.beats for r in self.registrars)
        scans = sum(w.stats.scans for w in self.watchers)
        refreshes = sum(w.stats.refreshes for w in self.watchers) - scans
        full_reads = sum(w.stats.full_reads for w in self.watchers) - scans
        return beats, refreshes, scans, full_reads

    def run(self, seconds: float) -> dict[str, float]:
        cpu0, (ops0, docs0), work0 = store_cpu(self.server), COUNTER.total(), self._work()
        t0 = time.monotonic()
        gevent.sleep(seconds)
        cpu1, (ops1, docs1), work1 = store_cpu(self.server), COUNTER.total(), self._work()
        span = time.monotonic() - t0
        return {"cpu": cpu1 - cpu0, "seconds": span, "ops": (ops1 - ops0) / span,
                "docs": (docs1 - docs0) / span, "beats": work1[0] - work0[0],
                "refreshes": work1[1] - work0[1], "scans": work1[2] - work0[2],
                "full_reads": work1[3] - work0[3]}


def seen_everywhere(watchers: list[Watcher], url: str, present: bool,
                    timeout: float) -> float | None:
    """Seconds until every watcher's table has (or lacks) ``url``; None after timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if all((url in {e.url for e in w.table.endpoints}) == present for w in watchers):
            return time.monotonic() - start
        gevent.sleep(0.05)
    return None


def note(text: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def quiet_until(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        gevent.sleep(0.2)


def endpoint(i: int) -> str:
    return f"http://10.{i // 65536}.{i // 256 % 256}.{i % 256}:8000"


def preload(store: MongoStore, first: int, last: int) -> None:
    """Records of instances not simulated, 50 minutes ahead (records more than an hour
    ahead are refused): they cost what any record costs to read or scan, and never
    expire during a size's run."""
    future = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=50)
    docs = []
    for i in range(first, last):
        url = endpoint(i)
        record = make_record("web", url, None, PING)
        docs.append({"_id": record_id("web", url), **record, "timestamp": future})
    for start in range(0, len(docs), 1000):
        store._collection.insert_many(docs[start:start + 1000])


def samples(design: str, n: int) -> tuple[int, int]:
    """(registrars, watchers) run for n instances: everything the store can serve
    here without saturating; the rest is projected from the cost of each operation."""
    # Beyond 100 instances 50 registrars in either design: on FerretDB's SQLite backend
    # every write scans the collection, and more writers saturate the store here.
    registrars = n if n <= 100 else 50
    if design == "log":  # a log refresh costs the same at any N: a sample shows it
        # (fewer watchers at 5,000: each one's first read, and the reaper's scans, of
        # 5,000 records cost this one process seconds of Python)
        return registrars, min(n, 100) if n <= 100 else 40 if n <= 1000 else 10
    return min(registrars, 50), max(2, min(n, 5000 // n))


def run_one(server: MongoServer, design: str, n: int, window: float,
            event_timeout: float) -> dict[str, Any]:
    # A few connections per client: FerretDB's SQLite backend answers "database is
    # locked" to concurrent writers, so many parallel connections only add lock waits.
    url = server.database_url(f"scale_{design}_{n}_{uuid.uuid4().hex[:6]}") + "&maxPoolSize=2"
    kind = TodayStore if design == "today" else MongoStore
    stores = [kind(url, timeout=10) for _ in range(CLIENTS)]
    run_r, run_w = samples(design, n)
    preload(stores[0], run_r, n)
    registrars = [Registrar(stores[i % CLIENTS], "web", endpoint(i), None, PING)
                  for i in range(run_r)]
    watchers = [Watcher(stores[i % CLIENTS], GRACE, REFRESH, services=frozenset({"web"}))
                for i in range(run_w)]
    extra: list[Registrar] = []
    try:
        # start spread over one ping interval, as instances of a real cluster are
        for loop in registrars:
            gevent.spawn_later(random.uniform(0, PING), loop.start)
        quiet_until(lambda: all(r.beats for r in registrars), 120)
        gevent.sleep(PING)
        note(f"{design} {n}: {len(registrars)} registrars beating")
        a = Phase(server, registrars, []).run(window)  # heartbeats only
        watchers[0].start()  # the first watcher (with a log: the reaper)
        watchers[0].refreshed.wait(60)
        gevent.sleep(REFRESH)
        note(f"{design} {n}: first watcher read")
        b = Phase(server, registrars, watchers[:1]).run(window)
        for loop in watchers[1:]:
            gevent.spawn_later(random.uniform(0, REFRESH), loop.start)
        quiet_until(lambda: all(w.refreshed.is_set() for w in watchers), 120)
        gevent.sleep(REFRESH)
        note(f"{design} {n}: {len(watchers)} watchers read")
        c = Phase(server, registrars, watchers).run(window)
        note(f"{design} {n}: measured; join, leave, crash")
        # CPU per operation, from the three windows
        per_beat = a["cpu"] / max(1, a["beats"])
        first = max(0.0, b["cpu"] - per_beat * b["beats"])
        per_first = first / max(1, b["scans"] if design == "log" else b["refreshes"])
        rest = max(0.0, c["cpu"] - per_beat * c["beats"] - per_first * (
            c["scans"] if design == "log" else 0))
        per_refresh = rest / max(1, c["refreshes"])
        # what N instances need (store CPU-seconds per second): measured when all of
        # them ran, else projected from the cost of each operation at the design's rates
        if run_r == n and run_w == n:
            demand = c["cpu"] / c["seconds"]
        else:
            demand = (per_beat * n / PING + per_first / REFRESH
                      + per_refresh * (n - 1) / REFRESH)
        resync_share = 0.0
        if design == "log":  # every watcher's slow resync (a full read, like the scan),
            # which falls outside the windows
            resync_share = per_first * (n - 1) / (RESYNC_SECONDS + RESYNC_PER_RECORD * n)
            demand += resync_share
        result: dict[str, Any] = {
            "backend": server.backend, "design": design, "instances": n,
            "registrars_run": run_r, "watchers_run": run_w,
            "store_cpu_measured": c["cpu"] / c["seconds"], "store_cpu_needed": demand,
            "commands_per_s": c["ops"], "documents_per_s": c["docs"],
            "ms_per_heartbeat": per_beat * 1000, "ms_per_refresh": per_refresh * 1000,
            "ms_per_full_read": per_first * 1000, "resync_share": resync_share,
            # refreshes and full reads (other than the reaper's scans) in the last window
            "window_refreshes": c["refreshes"], "window_full_reads": c["full_reads"],
        }
        # a join, a graceful leave, a crash: until every watcher's table shows it
        joiner = Registrar(stores[0], "web", "http://192.0.2.1:8000", None, PING)
        extra.append(joiner)
        joiner.start()
        result["join_s"] = seen_everywhere(watchers, "http://192.0.2.1:8000", True,
                                           event_timeout)
        joiner.stop()
        result["leave_s"] = seen_everywhere(watchers, "http://192.0.2.1:8000", False,
                                            event_timeout)
        crasher = Registrar(stores[1], "web", "http://192.0.2.2:8000", None, PING)
        extra.append(crasher)
        crasher.start()
        result["crash_s"] = result["crash_beat_s"] = None
        if seen_everywhere(watchers, "http://192.0.2.2:8000", True, event_timeout):
            crasher._stopping.set()  # stops beating, keeps its record: a crash
            crasher._stopped = True
            result["crash_s"] = seen_everywhere(watchers, "http://192.0.2.2:8000", False,
                                                PING + GRACE + event_timeout)
            if result["crash_s"] is not None:  # from its last heartbeat
                result["crash_beat_s"] = time.monotonic() - crasher._last_beat
        return result
    finally:
        loops = [*watchers, *registrars, *extra]
        for loop in loops:
            loop._stopping.set()
        for loop in loops:  # let calls in flight finish before the next size starts
            if loop._thread is not None:
                loop._thread.join(30)
        server.drop_database(url.rsplit("/", 1)[1].split("?")[0])  # name, no options
        for store in stores:
            store.close()


def fmt(value: float | None, digits: int = 1) -> str:
    return "never" if value is None else f"{value:.{digits}f}"


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| instances | design | run (registrars / watchers) | store CPU needed (cores) | "
            "measured store CPU | ms per heartbeat | ms per refresh | commands/s | "
            "documents/s | join s | leave s | crash s | crash s after last beat |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
            "| ---: | ---: |"]
    for r in results:
        rows.append(
            f"| {r['instances']:,} | {r['design']} | {r['registrars_run']:,} / "
            f"{r['watchers_run']:,} | **{r['store_cpu_needed']:.3f}** | "
            f"{r['store_cpu_measured']:.3f} | {r['ms_per_heartbeat']:.2f} | "
            f"{r['ms_per_refresh']:.2f} | {r['commands_per_s']:,.0f} | "
            f"{r['documents_per_s']:,.0f} | {fmt(r['join_s'])} | {fmt(r['leave_s'])} | "
            f"{fmt(r['crash_s'])} | {fmt(r['crash_beat_s'])} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,100,1000,5000")
    parser.add_argument("--designs", default="today,log")
    parser.add_argument("--window", type=float, default=8.0,
                        help="seconds of each measurement (default 8)")
    parser.add_argument("--event-timeout", type=float, default=20.0)
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite",
                        help="FerretDB's backend (postgresql: a throwaway PostgreSQL, "
                             "Debian's postgresql package)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    # SIGTERM: leave through the `with` below, so FerretDB is stopped too
    gevent.signal_handler(signal.SIGTERM, gevent.kill, gevent.getcurrent(), SystemExit(143))
    sizes = [int(x) for x in args.sizes.split(",")]
    designs = args.designs.split(",")
    started = dt.datetime.now(dt.timezone.utc)
    results = []
    with MongoServer.launch(use_env=False, backend=args.backend) as server:
        print(f"store: {server!r} ({server.backend} backend); ping {PING:g}s, grace {GRACE:g}s, "
              f"window {args.window:g}s", flush=True)
        for n in sizes:
            for design in designs:
                result = run_one(server, design, n, args.window, args.event_timeout)
                results.append(result)
                print(json.dumps(result), flush=True)
    print(f"\nrun {started:%Y-%m-%d %H:%M}-{dt.datetime.now(dt.timezone.utc):%H:%M} UTC, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
