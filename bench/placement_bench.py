"""Placement of new WebSocket sessions: by load against uniform random, in one run.

Each round starts a fresh bed (tests/wsfleet.py): three echo instances
(tests/apps/gws_echo.py under ``cluster serve``) and three balancer-only instances,
FerretDB as the discovery store, ``--ping-interval 1``. The balancers run with
``--placement load`` or ``--placement random``; rounds of the two alternate (the order
reversed every other round). A round opens ``--sockets`` WebSockets, each through a
balancer drawn at random, at ``--rate`` a second (0: as fast as they connect), and
counts the sockets each instance holds (each client asks its instance's name). Per
round: max/mean (1.00 is a perfect spread) and the standard deviation of the sockets
per instance; per mode: their medians and worst values over the rounds.

    python bench/placement_bench.py                   # 5 rounds of each, 300 sockets
    python bench/placement_bench.py --rounds 3 --rate 0

Every process is started here and stopped by PID (tests/helpers.py's Proc).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from mongo_server import MongoServer  # noqa: E402
from wsfleet import Fleet, bed, spread  # noqa: E402

NAMES = ("i0", "i1", "i2")


def one_round(server: MongoServer, mode: str, sockets: int, rate: float) -> dict[str, Any]:
    database = f"placement_{uuid.uuid4().hex[:12]}"
    try:
        with bed(server.database_url(database), 3, 3, "--placement", mode,
                 "--log-level", "warning") as made:
            fleet = Fleet([port for _, port in made.balancers])
            try:
                started = time.monotonic()
                fleet.open(sockets, rate)
                seconds = time.monotonic() - started
                if fleet.errors:
                    raise RuntimeError(f"{mode}: {fleet.errors[:3]}")
                counts = fleet.counts()
            finally:
                fleet.close()
    finally:
        server.drop_database(database)
    ratio, std = spread(counts, NAMES)
    return {"max_mean": ratio, "std": std, "seconds": seconds,
            "counts": [counts.get(n, 0) for n in NAMES]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sockets", type=int, default=300)
    parser.add_argument("--rate", type=float, default=75.0,
                        help="sockets opened per second (0: as fast as they connect)")
    args = parser.parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc)
    results: dict[str, list[dict[str, Any]]] = {"load": [], "random": []}
    with MongoServer.launch(use_env=False) as server:
        pace = f"at {args.rate:g}/s" if args.rate else "as fast as they connect"
        print(f"store: {server!r}; {args.sockets} sockets, opened {pace}", flush=True)
        for n in range(args.rounds):
            for mode in (("load", "random") if n % 2 == 0 else ("random", "load")):
                result = one_round(server, mode, args.sockets, args.rate)
                results[mode].append(result)
                print(f"round {n + 1} {mode:6} sockets per instance {result['counts']} "
                      f"max/mean {result['max_mean']:.3f} stddev {result['std']:.1f} "
                      f"({result['seconds']:.1f}s to open)", flush=True)
    print(f"\nrun {started:%Y-%m-%d %H:%M}-{dt.datetime.now(dt.timezone.utc):%H:%M} UTC, "
          f"load average {os.getloadavg()[0]:.1f}; "
          f"command: python bench/placement_bench.py {' '.join(argv or sys.argv[1:])}\n")
    print("| placement | rounds | max/mean median | max/mean worst | stddev median "
          "| stddev worst |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode, rows in results.items():
        ratios = [r["max_mean"] for r in rows]
        stds = [r["std"] for r in rows]
        print(f"| {mode} | {len(rows)} | {statistics.median(ratios):.3f} | {max(ratios):.3f} "
              f"| {statistics.median(stds):.1f} | {max(stds):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
