"""Busy polling on a core shared with a CPU-bound process: what it costs both.

    python bench/busy_poll_shared_core.py [--duration 5] [--rounds 4] [--connections 4]

Busy polling (cluster/busypoll.py) pays on a core the balancer has to itself. This
measures the case it must not make worse: another process keeps the same core busy.
On a 2-core machine:

- CPU 0: two balancer-only ``cluster serve`` (bench/http_bench.py's
  ``cluster_balancer``), one with ``--busy-poll 50`` (polling on, as ``auto`` turns it
  on for one process on this host), one with ``--busy-poll 0``; and the *hog*, a
  pure-Python counting loop run for ``--duration`` + 1 seconds, alone or beside one
  balancer carrying traffic;
- CPU 1: the nginx static backend (100 B) and ``wrk -t1 -c<connections> --latency``.

Per round (the order flipped every other round): the hog alone, then with wrk through
each balancer. Figures: the hog's loops per second, and wrk's requests/s and p99
through each balancer, medians over rounds. Every process is started here and stopped
by PID. Needs wrk and nginx (Debian: ``apt-get install -y wrk nginx``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import http_bench as hb

HOG = ("import sys, time\n"
       "n, end = 0, time.monotonic() + float(sys.argv[1])\n"
       "while time.monotonic() < end:\n"
       "    n += 1\n"
       "print(n)\n")
MODES = ("alone", "--busy-poll 50", "--busy-poll 0")


def hog_and_load(url: str | None, args: argparse.Namespace) -> dict[str, float]:
    """The hog on CPU 0 for duration + 1 s; wrk through ``url`` meanwhile (None: the
    hog alone)."""
    seconds = args.duration + 1
    hog = subprocess.Popen(["taskset", "-c", str(hb.PROXY_CPU), sys.executable, "-c", HOG,
                            str(seconds)], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        load = hb.wrk(url, args.duration, args.connections) if url else {}
        out, _ = hog.communicate(timeout=seconds + 30)
    finally:
        if hog.poll() is None:
            hog.kill()
            hog.wait(10)
    return {"loops": int(out) / seconds, "rps": load.get("rps", 0.0),
            "p99": load.get("p99", 0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--connections", type=int, default=4)
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        backend = stack.enter_context(hb.static_backend(workdir, [100]))
        urls: dict[str, str | None] = {"alone": None}
        for mode in MODES[1:]:
            name = "cluster-poll-" + mode.rsplit(" ", 1)[1]
            server = stack.enter_context(hb.cluster_balancer(
                workdir, backend, name=name, options=tuple(mode.split())))
            urls[mode] = f"http://127.0.0.1:{server.port}/100"
        started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        print(f"started {started} UTC; hog and balancers on CPU {hb.PROXY_CPU}, backend "
              f"and wrk -t1 -c{args.connections} on CPU {hb.LOAD_CPU}", flush=True)
        for round_no in range(args.rounds):
            for mode in MODES if round_no % 2 == 0 else MODES[::-1]:
                got = hog_and_load(urls[mode], args)
                results[mode].append(got)
                print(f"  round {round_no + 1} {mode:<15} hog {got['loops'] / 1e6:6.2f} "
                      f"M loops/s  wrk {got['rps']:8.0f} req/s  p99 {got['p99']:6.2f} ms",
                      flush=True)
    alone = statistics.median(r["loops"] for r in results["alone"])
    print(f"\nended {time.strftime('%H:%M', time.gmtime())} UTC\n")
    print("| CPU 0: the hog and | hog loops/s (median) | vs hog alone | "
          "req/s through the balancer | p99 ms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for mode in MODES:
        loops = statistics.median(r["loops"] for r in results[mode])
        if mode == "alone":
            print(f"| nothing | {loops:,.0f} | 1 | - | - |")
            continue
        rps = statistics.median(r["rps"] for r in results[mode])
        p99 = statistics.median(r["p99"] for r in results[mode])
        print(f"| `cluster serve {mode}` | {loops:,.0f} | {loops / alone:.2f} | "
              f"{rps:,.0f} | {p99:.2f} |")
    command = " ".join(["python bench/busy_poll_shared_core.py", *sys.argv[1:]])
    print(f"\nMedians of {args.rounds} interleaved rounds.\n\ncommand: `{command}`")


if __name__ == "__main__":
    main()
