"""Busy polling under a CPU quota (a container's ``--cpus``): what polling costs there.

    python bench/busy_poll_quota.py [--quota 1.0] [--connections 1,50] [--duration 5]
                                    [--rounds 3]

Run as root (it makes cgroups). On a 2-core machine, the layout of bench/http_bench.py:

- CPU 0: two balancer-only ``cluster serve`` (http_bench's ``cluster_balancer``), one
  with ``--busy-poll 50`` (what ``auto`` chose before it counted quotas: one process,
  two host cores), one with ``--busy-poll 0`` (what it chooses now under a quota of one
  core or less); each in a cgroup of its own with a CFS quota of ``--quota`` cores over
  100 ms periods (v1 ``cpu`` controller, else v2 ``cpu.max``);
- CPU 1: the nginx static backend (100 B) and ``wrk -t1 -c<connections> --latency``.

Per round (order flipped every other round) and per connection count: wrk through
each balancer. Figures, medians over rounds: requests/s, p99, the balancer's CPU (of a
core) and how often its cgroup was throttled (periods per second, and milliseconds per
second in which it could not run). Every process is started here and stopped by PID;
the cgroups are removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import http_bench as hb

MODES = ("--busy-poll 50", "--busy-poll 0")
PERIOD_US = 100_000


@contextlib.contextmanager
def cpu_cgroup(cores: float) -> Iterator[Path]:
    """A new cgroup with a quota of ``cores``; removed at the end (it must be empty)."""
    v1, v2 = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup")
    if (v1 / "cpu.cfs_quota_us").exists():
        parent, version = v1, 1
    elif "cpu" in (v2 / "cgroup.subtree_control").read_text().split():
        parent, version = v2, 2
    else:
        sys.exit("no cgroup cpu controller to write (run as root, cgroup v1 cpu or v2 cpu)")
    group = parent / f"cluster-bench-{uuid.uuid4().hex[:12]}"
    group.mkdir()
    quota = int(cores * PERIOD_US)
    if version == 1:
        (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (group / "cpu.cfs_quota_us").write_text(str(quota))
    else:
        (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
    try:
        yield group
    finally:
        for _ in range(100):
            if not (group / "cgroup.procs").read_text().strip():
                break
            time.sleep(0.1)
        group.rmdir()


def throttling(group: Path) -> tuple[int, float]:
    """(throttled periods, seconds throttled) so far, from the cgroup's cpu.stat."""
    stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines())
    if "throttled_time" in stat:  # v1: nanoseconds
        return int(stat["nr_throttled"]), int(stat["throttled_time"]) / 1e9
    return int(stat["nr_throttled"]), int(stat["throttled_usec"]) / 1e6


def measure(url: str, pid: int, group: Path, args: argparse.Namespace,
            connections: int) -> dict[str, float]:
    hb.wrk(url, 1, connections)  # warm-up
    periods0, throttled0 = throttling(group)
    cpu0, wall0 = hb.cpu_seconds(pid), time.monotonic()
    load = hb.wrk(url, args.duration, connections)
    cpu1, wall1 = hb.cpu_seconds(pid), time.monotonic()
    periods1, throttled1 = throttling(group)
    wall = wall1 - wall0
    return {"rps": load["rps"], "p99": load["p99"], "cpu": (cpu1 - cpu0) / wall,
            "periods": (periods1 - periods0) / wall,
            "throttled_ms": (throttled1 - throttled0) * 1e3 / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quota", type=float, default=1.0, help="cores per balancer")
    parser.add_argument("--connections", default="1,50", help="wrk -c, comma-separated")
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    counts = [int(c) for c in args.connections.split(",")]
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        backend = stack.enter_context(hb.static_backend(workdir, [100]))
        servers = {}
        for mode in MODES:
            # Entered after the balancer's context, so it is left (and removed) after the
            # balancer has been stopped.
            group = stack.enter_context(cpu_cgroup(args.quota))
            launcher = ["sh", "-c", f'echo $$ > "{group}/cgroup.procs" && exec "$@"', "sh",
                        *hb.cluster_argv()]
            name = "cluster-poll-" + mode.rsplit(" ", 1)[1]
            server = stack.enter_context(hb.cluster_balancer(
                workdir, backend, name=name, launcher=launcher, options=tuple(mode.split())))
            servers[mode] = (server, group)
        started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        print(f"started {started} UTC; balancers on CPU {hb.PROXY_CPU}, each in a cgroup "
              f"of {args.quota:g} cores; backend and wrk -t1 on CPU {hb.LOAD_CPU}", flush=True)
        for round_no in range(args.rounds):
            for connections in counts:
                for mode in MODES if round_no % 2 == 0 else MODES[::-1]:
                    server, group = servers[mode]
                    got = measure(f"http://127.0.0.1:{server.port}/100", server.pid, group,
                                  args, connections)
                    results.setdefault((mode, connections), []).append(got)
                    print(f"  round {round_no + 1} -c{connections:<3} {mode:<15} "
                          f"{got['rps']:8.0f} req/s  p99 {got['p99']:7.2f} ms  cpu "
                          f"{got['cpu']:4.2f}  throttled {got['periods']:5.1f}/s "
                          f"{got['throttled_ms']:6.1f} ms/s", flush=True)
    print(f"\nended {time.strftime('%H:%M', time.gmtime())} UTC\n")
    print(f"| quota {args.quota:g} cores | wrk -c | req/s | p99 ms | balancer CPU (cores) | "
          "throttled periods/s | throttled ms/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for connections in counts:
        for mode in MODES:
            runs = results[(mode, connections)]

            def med(key: str, runs: list[dict[str, float]] = runs) -> float:
                return statistics.median(r[key] for r in runs)
            print(f"| `cluster serve {mode}` | {connections} | {med('rps'):,.0f} | "
                  f"{med('p99'):.2f} | {med('cpu'):.2f} | {med('periods'):.1f} | "
                  f"{med('throttled_ms'):.1f} |")
    command = " ".join(["python bench/busy_poll_quota.py", *sys.argv[1:]])
    print(f"\nMedians of {args.rounds} interleaved rounds.\n\ncommand: `{command}`")


if __name__ == "__main__":
    main()
