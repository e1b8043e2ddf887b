"""The fault runs of issue 8: rolling restart, SIGKILL, store outage, all under load.

    python bench/fault_runs.py rolling [--rounds 1] [--cadence 2] [--ws-clients 30]
    python bench/fault_runs.py kill [--down 3]
    python bench/fault_runs.py store [--outage 60] [--tail 10]
    (each also takes --http wrk|python and --connections 20)

Real processes on 127.0.0.1, started here and stopped by PID; their temp dir is removed
at the end (bench/bed.py). Discovery: a temp SQLite file (``store``: FerretDB from
tests/mongo_server.py); every instance runs with --ping-interval 1 --expiry-grace 1.

- ``rolling``: 3 instances of ``cluster serve --service web --app gws_echo:app`` (a
  gevent-websocket echo app that also answers GET /whoami) behind two balancer-only
  fronts (``--ui-service web``). Load: ``wrk -t1 -c20`` on GET /whoami through each front,
  and ``--ws-clients`` WebSocket clients connected through the fronts alternately, each
  sending a message every 200 ms and checking the echo; on a close they reconnect
  through the same front and send the unanswered message again. Each instance in turn
  gets SIGTERM (it deregisters, finishes its requests, closes its WebSockets with 1001)
  and is started again on the same port, one SIGTERM every ``--cadence`` seconds.
- ``kill``: the same bed and load; one instance gets SIGKILL and is started again
  ``--down`` seconds later. Only requests in flight at the kill may fail: at most the
  wrk connections (a bodiless GET in flight is replayed on another instance, so 0 is
  possible).
- ``store``: FerretDB as the store, 3 ``backend:app`` instances and one front under
  wrk; the store is stopped for ``--outage`` seconds, started again, and the load goes
  on ``--tail`` seconds more. Then every instance's /_cluster/status must list the 3
  endpoints with store_failing false.

Each prints a markdown table row and the exact command that made it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from bed import ROOT, Bed, WrkResult, free_port, wrk, wrk_result
from faultload import HttpLoad, WsFleet, WsStats

INSTANCES = 3


@dataclass
class Outcome:
    """What one run measured; ``ok`` says whether it met the goal of issue 8."""

    run: str
    http_requests: int = 0
    http_failed: int = 0
    http_failures: str = ""
    ws: WsStats | None = None
    tracebacks: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)


def status(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_cluster/status",
                                timeout=5) as response:
        return dict(json.load(response))


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds it took until ``predicate`` held (errors count as not yet)."""
    started = time.monotonic()
    while True:
        try:
            if predicate():
                return time.monotonic() - started
        except (OSError, ValueError):
            pass
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what}: not after {timeout:.0f}s")
        time.sleep(0.2)


def sees_all(port: int, count: int = INSTANCES) -> bool:
    view = status(port)
    return len(view["endpoints"]) == count and not view["store_failing"]


class Load:
    """HTTP load through every front: wrk, or Python keep-alive clients (CI)."""

    def __init__(self, kind: str, fronts: list[int], connections: int) -> None:
        self.kind = kind
        self.wrks: list[subprocess.Popen[str]] = []
        self.python: HttpLoad | None = None
        if kind == "wrk":
            self.wrks = [wrk(f"http://127.0.0.1:{port}/whoami", connections)
                         for port in fronts]
        else:
            self.python = HttpLoad(fronts)
            self.python.start()

    def finish(self, outcome: Outcome) -> None:
        if self.python is not None:
            stats = self.python.finish()
            outcome.http_requests, outcome.http_failed = stats.requests, stats.failed
            outcome.http_failures = "; ".join(f"{n}x {why}" for why, n in
                                              stats.failures.most_common(5))
            return
        results: list[WrkResult] = [wrk_result(proc, interrupt=True) for proc in self.wrks]
        outcome.http_requests = sum(r.requests for r in results)
        outcome.http_failed = sum(r.failed for r in results)
        outcome.http_failures = "; ".join(
            f"front {n + 1}: non-2xx {r.non2xx}, socket errors {r.errors_text()}"
            for n, r in enumerate(results))

    def abort(self) -> None:
        if self.python is not None:
            self.python.finish()
        for proc in self.wrks:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


def _read_logs(bed: Bed, outcome: Outcome) -> None:
    """Tracebacks, and when requests failed, the warnings that say why."""
    outcome.tracebacks = bed.tracebacks()
    if outcome.http_failed:
        outcome.http_failures += "; the logs said: " + "; ".join(bed.warnings())


def _bed_with_fronts(bed: Bed, app: str, fronts: int) -> tuple[list[int], list[Any], list[int]]:
    ports = [free_port() for _ in range(INSTANCES)]
    members = [bed.member(port, f"m{n}", app=app) for n, port in enumerate(ports)]
    front_ports = [free_port() for _ in range(fronts)]
    for n, port in enumerate(front_ports):
        bed.front(port, name=f"front{n + 1}")
    for port in front_ports:
        wait_for(lambda p=port: sees_all(p), 20, f"front {port} to see {INSTANCES} instances")
    return ports, members, front_ports


@dataclass
class Loaded:
    """A bed of 3 instances and 2 fronts under HTTP load and WebSocket clients."""

    bed: Bed
    ports: list[int]
    members: list[Any]
    fronts: list[int]


@contextlib.contextmanager
def under_load(args: argparse.Namespace, outcome: Outcome, prefix: str) -> Iterator[Loaded]:
    """Set the bed up, start the load, let it settle; after the fault (the body), keep the
    load ``--tail`` seconds and put its figures into ``outcome``. Everything is stopped
    and removed however the body ends."""
    bed = Bed(prefix=prefix)
    load: Load | None = None
    fleet: WsFleet | None = None
    try:
        ports, members, fronts = _bed_with_fronts(bed, "gws_echo:app", 2)
        fleet = WsFleet([f"ws://127.0.0.1:{port}/ws" for port in fronts], args.ws_clients)
        fleet.start()
        load = Load(args.http, fronts, args.connections)
        time.sleep(args.settle)
        yield Loaded(bed, ports, members, fronts)
        time.sleep(args.tail)
        load.finish(outcome)
        load = None
        outcome.ws = fleet.finish()
        fleet = None
        _read_logs(bed, outcome)
    finally:
        if load is not None:
            load.abort()
        if fleet is not None:
            fleet.finish(5)
        bed.close()


def rolling(args: argparse.Namespace) -> Outcome:
    """3 instances restarted one by one, under HTTP load and WebSockets through 2 fronts."""
    outcome = Outcome("rolling")
    with under_load(args, outcome, "faults-rolling-") as run:
        gaps = []
        for step in range(args.rounds * INSTANCES):
            began = time.monotonic()
            n = step % INSTANCES
            run.members[n].send_signal(signal.SIGTERM)
            run.members[n].wait(20)  # drained: its requests done, its WebSockets closed
            run.members[n] = run.bed.member(run.ports[n], f"m{n}", app="gws_echo:app")
            gaps.append(time.monotonic() - began)
            time.sleep(max(0.0, args.cadence - (time.monotonic() - began)))
    outcome.notes["restarts"] = len(gaps)
    outcome.notes["slowest restart"] = f"{max(gaps):.1f} s" if gaps else "-"
    return outcome


def kill(args: argparse.Namespace) -> Outcome:
    """SIGKILL of one instance under load; it comes back ``--down`` seconds later."""
    outcome = Outcome("kill")
    with under_load(args, outcome, "faults-kill-") as run:
        run.members[0].send_signal(signal.SIGKILL)
        run.members[0].wait(10)
        time.sleep(args.down)
        run.members[0] = run.bed.member(run.ports[0], "m0", app="gws_echo:app")
    bound = args.connections * len(run.fronts) if args.http == "wrk" else len(run.fronts)
    outcome.notes["in-flight bound"] = bound
    return outcome


def store(args: argparse.Namespace) -> Outcome:
    """FerretDB stopped for ``--outage`` seconds under load, then started again."""
    sys.path.insert(0, str(ROOT / "tests"))
    from mongo_server import MongoServer

    outcome = Outcome("store")
    server = MongoServer.launch()
    bed: Bed | None = None
    load: Load | None = None
    try:
        bed = Bed(discovery_url=server.database_url(f"faults{int(time.time())}"),
                  prefix="faults-store-")
        ports, _members, fronts = _bed_with_fronts(bed, "backend:app", 1)
        load = Load(args.http, fronts, args.connections)
        time.sleep(args.settle)
        server.stop()
        down = time.monotonic()
        time.sleep(args.outage)
        during = [status(port) for port in [*ports, *fronts]]
        server.start()
        back = time.monotonic()
        outcome.notes["outage"] = f"{back - down:.0f} s"
        outcome.notes["saw the outage"] = \
            f"{sum(v['store_failing'] for v in during)} of {len(during)}"
        outcome.notes["endpoints kept in it"] = min(len(v["endpoints"]) for v in during)
        for port in [*ports, *fronts]:  # under load: every view whole again, store working
            wait_for(lambda p=port: sees_all(p), 30, f"{port} to recover")
        recovered = time.monotonic() - back
        time.sleep(max(0.0, args.tail - recovered))
        load.finish(outcome)
        load = None
        views = [status(port) for port in [*ports, *fronts]]
        outcome.notes["recovered"] = (
            f"{recovered:.1f} s after the store came back; at the end all {len(views)} list "
            f"{min(len(v['endpoints']) for v in views)} endpoints, store_failing "
            f"{str(any(v['store_failing'] for v in views)).lower()}")
        _read_logs(bed, outcome)
        return outcome
    finally:
        if load is not None:
            load.abort()
        if bed is not None:
            bed.close()
        server.close()


def row(outcome: Outcome) -> str:
    """A markdown table (header and row) for one outcome."""
    head = ["run", "HTTP requests", "failed HTTP"]
    cells = [outcome.run, f"{outcome.http_requests:,}", str(outcome.http_failed)]
    ws = outcome.ws
    if ws is not None:
        head += ["WS clients", "WS sent / echoed", "closes by code", "failed reconnects",
                 "reconnected", "lost"]
        cells += [str(ws.clients), f"{ws.sent:,} / {ws.echoed:,}", ws.closes_text(),
                  str(ws.failed_connects), f"{ws.connected_at_end} of {ws.clients}",
                  str(ws.lost + ws.wrong)]
    for key, value in outcome.notes.items():
        head.append(key)
        cells.append(str(value))
    head.append("tracebacks")
    cells.append(str(len(outcome.tracebacks)))
    return "\n".join(["| " + " | ".join(head) + " |", "|" + " --- |" * len(head),
                      "| " + " | ".join(cells) + " |"])


RUNS = {"rolling": rolling, "kill": kill, "store": store}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = top.add_subparsers(dest="run", required=True)
    for name, settle, tail in (("rolling", 2.0, 3.0), ("kill", 3.0, 4.0),
                               ("store", 3.0, 10.0)):
        one = sub.add_parser(name, help=RUNS[name].__doc__)
        one.add_argument("--http", choices=("wrk", "python"), default="wrk")
        one.add_argument("--connections", type=int, default=20, help="per wrk (one a front)")
        one.add_argument("--settle", type=float, default=settle,
                         help="seconds of load before the fault")
        one.add_argument("--tail", type=float, default=tail,
                         help="seconds of load after the fault")
        if name != "store":
            one.add_argument("--ws-clients", type=int, default=30)
        if name == "rolling":
            one.add_argument("--rounds", type=int, default=1, help="restarts of each instance")
            one.add_argument("--cadence", type=float, default=2.0,
                             help="seconds from one SIGTERM to the next")
        if name == "kill":
            one.add_argument("--down", type=float, default=3.0,
                             help="seconds before the killed instance is started again")
        if name == "store":
            one.add_argument("--outage", type=float, default=60.0)
    return top


def command(args: argparse.Namespace) -> str:
    """The run as a command line with every setting spelled out."""
    argv = ["python", "bench/fault_runs.py", args.run]
    for key, value in sorted(vars(args).items()):
        if key != "run":
            argv += [f"--{key.replace('_', '-')}", f"{value:g}" if isinstance(value, float)
                     else str(value)]
    return shlex.join(argv)


def main() -> int:
    args = parser().parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on SIGTERM too
    outcome = RUNS[args.run](args)
    print(row(outcome))
    print(f"\ncommand: {command(args)}")
    if outcome.http_failed:
        print(f"failed HTTP: {outcome.http_failures}")
    if outcome.ws is not None and (outcome.ws.failed_connects or outcome.ws.wrong):
        print(f"WebSocket: {outcome.ws.wrong} wrong echoes; failed connects: "
              f"{dict(outcome.ws.errors.most_common(5))}")
    for text in outcome.tracebacks:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
