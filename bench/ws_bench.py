"""WebSocket benchmark, pinned: echo round trips through `cluster serve` vs direct, and
the balancer's memory per idle proxied WebSocket.

    python bench/ws_bench.py [--duration 5] [--rounds 4] [--connections 50]
                             [--client go|python] [--idle 2000] [--also-busy-poll 0]
                             [--relay-window 50] [--no-nginx] [--no-relay]

The method of bench/http_bench.py (issue 7), on a 2-core machine:

- the echo server, tests/apps/ws_echo.py (gevent-websocket), on CPU 1;
- a balancer-only ``cluster serve --ui-service web --bind 127.0.0.1:0 --port-file F``
  on CPU 0, with its default settings (busy polling adapting up to 50 µs, see
  cluster/busypoll.py), discovery in a temp SQLite file, the echo server registered as
  service ``web`` by the ``cluster register`` sidecar (CPU 1); started through a tiny
  launcher that raises RLIMIT_NOFILE to the hard limit first;
- a second such balancer with ``--busy-poll 0``, measured in the same rounds: its loop
  sleeps whenever it has nothing to do, so each message has to wake CPU 0
  (``--also-busy-poll N``: another setting; -1: skip it);
- nginx as a WebSocket proxy on CPU 0 (bench/nginx_ws_proxy.conf: 1 worker, no
  buffering), the reference for what a proxy costs in this layout (``--no-nginx``: skip);
- bench/ws_relay.c on CPU 0, built with ``cc`` at each run: a relay that only moves
  bytes, busy polling for a fixed ``--relay-window`` (default 50 µs; ``--no-relay``:
  skip). What it makes is
  what moving each message through another core leaves of the direct rate, before any
  work of a proxy's own;
- the load generator on CPU 1: ``--connections`` WebSockets doing ping-pong of 32-byte
  text messages for ``--duration`` seconds, direct to the echo server, through the
  balancer and through nginx, in ``--rounds`` interleaved rounds. ``--client go``
  (default when ``go`` is installed): bench/ws_load.go, built into the temp dir;
  ``--client python``: one gevent process with pre-built frames (this script with
  ``--load``). Each reports its own CPU time, so the table shows what share of CPU 1
  the client takes.

Figures: round trips per second (median over rounds; the ratio is the median of the
per-round ratios), CPU µs per round trip of the balancer, the echo server and the
client, how busy each core was; then ``--idle`` WebSockets opened through the balancer
and left idle: its VmRSS delta divided by their number (after a warm-up of 300
short-lived ones). Prints markdown for docs/benchmarks.md and the exact command.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import http_bench as hb  # noqa: E402
import ws_idle_memory as wim  # noqa: E402
from http_bench import LOAD_CPU, PROXY_CPU  # noqa: E402
from ws_idle_memory import Proxy, client_frame, close_ws, echo_once, server_frame  # noqa: E402

TARGET_RATIO = 0.9
TARGET_IDLE_BYTES = 16 * 1024
MESSAGE = 32


# -- the load generators ----------------------------------------------------------------

def python_load(port: int, connections: int, seconds: float) -> None:
    """--load: ping-pong on ``connections`` sockets; the protocol of bench/ws_load.go."""
    frame, expected = client_frame(b"x" * MESSAGE), server_frame(b"x" * MESSAGE)
    sockets = [wim.open_ws(port, "/rtt") for _ in range(connections)]
    for sock in sockets:
        echo_once(sock, frame, expected)
    print("ready", flush=True)
    sys.stdin.readline()
    counts = [0] * connections
    cpu0, t0 = time.process_time(), time.monotonic()
    stop = t0 + seconds

    def loop(i: int) -> None:
        sock = sockets[i]
        while time.monotonic() < stop:
            echo_once(sock, frame, expected)
            counts[i] += 1

    gevent.joinall([gevent.spawn(loop, i) for i in range(connections)], raise_error=True)
    elapsed, cpu = time.monotonic() - t0, time.process_time() - cpu0
    for sock in sockets:
        close_ws(sock)
    print(json.dumps({"trips": sum(counts), "elapsed": elapsed, "cpu": cpu}), flush=True)


def load_argv(client: str, workdir: Path, port: int, args: argparse.Namespace) -> list[str]:
    if client == "go":
        return [str(workdir / "ws_load"), "-port", str(port), "-connections",
                str(args.connections), "-seconds", f"{args.duration:g}"]
    return [sys.executable, str(Path(__file__).resolve()), "--load", str(port),
            "--connections", str(args.connections), "--duration", f"{args.duration:g}"]


def rtt_run(client: str, workdir: Path, port: int, args: argparse.Namespace,
            watched: dict[str, int]) -> dict[str, float]:
    """One timed ping-pong run against ``port``; CPU µs per round trip of each watched
    process and of the client, and each core's busy share."""
    proc = subprocess.Popen(["taskset", "-c", str(LOAD_CPU),
                             *load_argv(client, workdir, port, args)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=hb.child_env())
    try:
        ready = proc.stdout.readline()  # type: ignore[union-attr]
        if ready.strip() != b"ready":
            raise RuntimeError(f"the {client} load generator failed: {ready!r}")
        cpu0 = {name: hb.cpu_seconds(pid) for name, pid in watched.items()}
        cores0 = hb.core_times()
        irq0 = interrupts()
        proc.stdin.write(b"go\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        line = proc.stdout.readline()  # type: ignore[union-attr]
        cores1 = hb.core_times()
        irq1 = interrupts()
        cpu1 = {name: hb.cpu_seconds(pid) for name, pid in watched.items()}
        if proc.wait(30) != 0 or not line:
            raise RuntimeError(f"the {client} load generator exited with {proc.returncode}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    done = json.loads(line)
    trips = done["trips"] or 1
    result = {"rate": done["trips"] / done["elapsed"], "client_us": done["cpu"] * 1e6 / trips,
              "busy0": hb.busy_percent(cores0, cores1, PROXY_CPU),
              "busy1": hb.busy_percent(cores0, cores1, LOAD_CPU)}
    for key in irq1:
        result[key] = (irq1[key] - irq0[key]) / trips
    for name in watched:
        result[f"{name}_us"] = (cpu1[name] - cpu0[name]) * 1e6 / trips
    return result


def interrupts() -> dict[str, int]:
    """Function-call and reschedule interrupts received by each core, from /proc/interrupts."""
    out = {}
    for line in Path("/proc/interrupts").read_text().splitlines():
        name, *rest = line.split()
        if name in ("CAL:", "RES:"):
            for cpu in (0, 1):
                out[f"{name[:3].lower()}{cpu}"] = int(rest[cpu])
    return out


# -- idle memory ------------------------------------------------------------------------

def idle_memory(proxy: Proxy, count: int, concurrency: int) -> dict[str, float]:
    """VmRSS of the balancer per idle proxied WebSocket, after a warm-up."""
    warm, failed = wim.open_many(proxy.port, 300, 100)
    if failed:
        raise RuntimeError(f"{failed} warm-up handshakes failed")
    for sock in warm:
        echo_once(sock, client_frame(b"warm"), server_frame(b"warm"))
        close_ws(sock)
    settle(lambda: proxy.open_tunnels() == 0)
    before = wim.steady_rss(proxy.pid)
    sockets, failures = wim.open_many(proxy.port, count, concurrency)
    settle(lambda: proxy.open_tunnels() >= len(sockets))
    after = wim.steady_rss(proxy.pid)
    held = len(sockets)
    sample = random.sample(sockets, min(100, held))
    for i, sock in enumerate(sample):
        payload = f"still alive {i}".encode()
        echo_once(sock, client_frame(payload), server_frame(payload))
    for sock in sockets:
        close_ws(sock)
    closed = settle(lambda: proxy.open_tunnels() == 0)
    return {"count": held, "failures": failures, "before": before, "after": after,
            "per_socket": (after - before) / held if held else float("nan"),
            "sample": len(sample), "closed": closed, "fds_after": wim.open_fds(proxy.pid)}


def settle(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


# -- the run ----------------------------------------------------------------------------

MODES = ("direct", "cluster", "busy", "nginx", "relay")


def run(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, list[dict]], dict]:
    if args.client == "go":
        subprocess.run(["go", "build", "-o", str(workdir / "ws_load"),
                        str(BENCH / "ws_load.go")], check=True, cwd=str(workdir),
                       env=dict(os.environ, CGO_ENABLED="0"))
    relay_program = hb.build_relay(workdir, args.relay) if args.relay else None
    skipped = {"nginx": not args.nginx, "busy": args.also_busy_poll < 0,
               "relay": not args.relay}
    modes = [m for m in MODES if not skipped.get(m)]
    with contextlib.ExitStack() as stack:
        echo_port_file = workdir / "ws-echo.port"
        echo = stack.enter_context(hb.launched(
            [sys.executable, str(hb.ROOT / "tests" / "apps" / "ws_echo.py"),
             "--port", "0", "--port-file", str(echo_port_file)], workdir, "ws-echo",
            LOAD_CPU, port_file=echo_port_file))
        echo_port = echo.port
        balancer = stack.enter_context(hb.cluster_balancer(
            workdir, f"http://127.0.0.1:{echo_port}", name="ws-cluster",
            launcher=[sys.executable, "-c", wim.LAUNCHER]))
        ports = {"direct": echo_port, "cluster": balancer.port}
        watched = {"echo": echo.pid, "cluster": balancer.pid}
        if args.also_busy_poll >= 0:
            busy = stack.enter_context(hb.cluster_balancer(
                workdir, f"http://127.0.0.1:{echo_port}", name="ws-cluster-busy",
                launcher=[sys.executable, "-c", wim.LAUNCHER],
                options=("--busy-poll", str(args.also_busy_poll))))
            ports["busy"], watched["busy"] = busy.port, busy.pid
        if args.nginx:
            hb.nginx_dirs(workdir)
            nginx_port = hb.free_port()
            nginx = stack.enter_context(hb.launched(
                hb.nginx_argv("nginx_ws_proxy.conf", workdir, PORT=nginx_port,
                              UPSTREAM_PORT=echo_port),
                workdir, "ws-nginx", PROXY_CPU, port=nginx_port))
            ports["nginx"], watched["nginx"] = nginx_port, nginx.pid
        if relay_program:
            relay_port = hb.free_port()
            relay = stack.enter_context(hb.launched(
                [str(relay_program), str(relay_port), str(echo_port),
                 str(args.relay_window)], workdir, "ws-relay", PROXY_CPU, port=relay_port))
            ports["relay"], watched["relay"] = relay_port, relay.pid
        proxy = Proxy("cluster", balancer.pid, balancer.port)
        proxy.set_idle()
        rounds: dict[str, list[dict]] = {mode: [] for mode in modes}
        for round_no in range(args.rounds):
            for mode in modes if round_no % 2 == 0 else modes[::-1]:
                result = rtt_run(args.client, workdir, ports[mode], args, watched)
                result["proxy_us"] = result.get(f"{mode}_us", 0.0)
                rounds[mode].append(result)
                print(f"  round {round_no + 1} {mode:<8} {result['rate']:8.0f} round trips/s  "
                      f"CPU us/trip: proxy {result['proxy_us']:5.1f} echo "
                      f"{result['echo_us']:5.1f} client {result['client_us']:5.1f}  "
                      f"cpu0 {result['busy0']:3.0f}% cpu1 {result['busy1']:3.0f}%", flush=True)
        idle = idle_memory(proxy, args.idle, 200) if args.idle else {}
    return rounds, idle


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def report(rounds: dict[str, list[dict]], idle: dict, args: argparse.Namespace) -> list[str]:
    lines: list[str] = []
    add = lines.append
    proxies = [m for m in ("cluster", "busy", "nginx", "relay") if m in rounds]
    names = {"cluster": "**cluster serve**",
             "busy": f"**cluster serve --busy-poll {args.also_busy_poll}**", "nginx": "nginx",
             "relay": f"bench/ws_relay.c, window {args.relay_window} µs"}

    def ratio(mode: str, base: str = "direct") -> float:
        pairs = zip(rounds[base], rounds[mode])
        return statistics.median(p["rate"] / b["rate"] for b, p in pairs)

    def row(label: str, cell) -> None:
        add(f"| {label} | {cell('direct')} | " + " | ".join(cell(m) for m in proxies) + " |")

    add(f"| {MESSAGE}-byte echo, {args.connections} connections, {args.client} client "
        "(CPU 1) | direct | " + " | ".join(f"via {names[m]} (CPU 0)" for m in proxies) + " |")
    add("| --- | ---: |" + " ---: |" * len(proxies))
    row("round trips/s (median)", lambda m: f"{med(rounds[m], 'rate'):.0f}")
    row("vs direct (median of rounds)", lambda m: "1" if m == "direct" else f"{ratio(m):.2f}")
    row("round trips/s, range over rounds", lambda m: f"{min(r['rate'] for r in rounds[m]):.0f}-"
        f"{max(r['rate'] for r in rounds[m]):.0f}")
    row("proxy CPU µs per round trip",
        lambda m: "-" if m == "direct" else f"{med(rounds[m], 'proxy_us'):.1f}")
    row("echo server CPU µs per round trip", lambda m: f"{med(rounds[m], 'echo_us'):.1f}")
    row("client CPU µs per round trip", lambda m: f"{med(rounds[m], 'client_us'):.1f}")
    row("CPU 0 / CPU 1 busy", lambda m: f"{med(rounds[m], 'busy0'):.0f}% / "
        f"{med(rounds[m], 'busy1'):.0f}%")
    row("interrupts per round trip to CPU 0 / CPU 1 (function call + reschedule)",
        lambda m: f"{med(rounds[m], 'cal0') + med(rounds[m], 'res0'):.2f} / "
        f"{med(rounds[m], 'cal1') + med(rounds[m], 'res1'):.2f}")
    add("")
    for mode in ("cluster", "busy"):
        if mode not in rounds:
            continue
        got = ratio(mode)
        flags = "" if mode == "cluster" else f" with --busy-poll {args.also_busy_poll}"
        add(f"- echo round trips through the balancer{flags} vs direct: {got:.3f} "
            f"(target ≥ {TARGET_RATIO:g}): {verdict(got >= TARGET_RATIO)}"
            + (f"; nginx in the same rounds: {ratio('nginx'):.2f} of direct, so the "
               f"balancer makes {ratio(mode, 'nginx'):.2f} of nginx's rate"
               if "nginx" in rounds else ""))
    if "relay" in rounds:
        add(f"- bench/ws_relay.c (only moves bytes; the same busy polling) vs direct: "
            f"{ratio('relay'):.2f}: what this layout leaves a proxy on CPU 0 that relays "
            "each message as it comes"
            + f"; the balancer makes {ratio('cluster', 'relay'):.2f} of its rate")
    if idle:
        per = idle["per_socket"]
        add(f"- balancer memory per idle proxied WebSocket: {per:,.0f} bytes "
            f"({idle['count']} open, VmRSS {idle['before'] / 2**20:.1f} -> "
            f"{idle['after'] / 2**20:.1f} MiB; target ≤ {TARGET_IDLE_BYTES:,} bytes): "
            f"{verdict(per <= TARGET_IDLE_BYTES)}")
        add(f"  ({idle['failures']} failed handshakes; {idle['sample']} random idle ones "
            f"still echoed; after closing all the balancer "
            f"{'held no tunnel' if idle['closed'] else 'STILL HELD TUNNELS'})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds; medians")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--client", choices=("go", "python"),
                        default="go" if shutil.which("go") else "python",
                        help="the load generator (default: go when installed)")
    parser.add_argument("--idle", type=int, default=2000,
                        help="idle WebSockets for the memory figure (0: skip)")
    parser.add_argument("--also-busy-poll", type=int, default=0, metavar="MICROSECONDS",
                        help="also measure a balancer run with this --busy-poll "
                        "(default 0: polling off; -1: skip it)")
    parser.add_argument("--relay-window", type=int, default=50, metavar="MICROSECONDS",
                        help="how long bench/ws_relay.c polls after I/O")
    parser.add_argument("--no-nginx", dest="nginx", action="store_false",
                        help="skip nginx as a WebSocket proxy (the reference)")
    parser.add_argument("--no-relay", dest="relay", action="store_const", const=None,
                        default=shutil.which("cc"),
                        help="skip bench/ws_relay.c (skipped anyway without a C compiler)")
    parser.add_argument("--load", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        python_load(args.load, args.connections, args.duration)
        return
    os.sched_setaffinity(0, {LOAD_CPU})  # this process opens the idle sockets
    command = " ".join(["python", "bench/ws_bench.py", *sys.argv[1:]])
    print(f"$ {command}\nstarted {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="ws-bench-"))
    try:
        rounds, idle = run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nended {time.strftime('%H:%M', time.gmtime())} UTC, load average "
          f"{os.getloadavg()[0]:.2f}\n")
    print("\n".join(report(rounds, idle, args)))
    print(f"\ncommand: `{command}`", flush=True)


if __name__ == "__main__":
    main()
