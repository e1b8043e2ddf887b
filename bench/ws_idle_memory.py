"""Idle WebSocket memory of the balancer, and 32-byte echo round trips direct vs proxied.

    python bench/ws_idle_memory.py [--via cluster|forwarder] [--count 10000]
                                   [--concurrency 200] [--sample 500] [--rtt-connections 20]
                                   [--rtt-seconds 3] [--rtt-rounds 4]

One run; every process is started here and stopped by PID at the end:

- ``echo``    tests/apps/ws_echo.py, the gevent-websocket echo server (the endpoint);
- ``proxy``   with ``--via cluster`` (default) the real product, as bench/http_bench.py
  runs it: ``cluster serve --ui-service web`` (a balancer with no local app), discovery
  in a temp SQLite file, the echo server registered as service ``web`` by the
  ``cluster register --ping-interval 1`` sidecar (a fourth process), measured once the
  balancer's GET /_cluster/status lists it. With ``--via forwarder`` the old stand-in
  tests/apps/ws_forward_only.py (WebSocketBridge alone under pywsgi + ClusterHandler);
- this script, a gevent client that speaks raw WebSocket frames (pre-built, so the
  client costs little CPU).

RLIMIT_NOFILE is raised to the hard limit in the client, the echo server and the
proxy. ``cluster serve`` does not raise it itself, so it is started through a tiny
``python -c`` launcher that raises it and then calls ``cluster.entry.main``.

Steps: warm the proxy up with a few hundred short-lived sockets; read its VmRSS; open
``--count`` WebSockets through it (``--concurrency`` handshakes in flight) and leave them
idle; read VmRSS again once it is steady -> bytes per idle proxied connection. Then a
random sample of them must still echo, all are closed, and the proxy must hold no tunnel
any more. Last, the echo round-trip rate for 32-byte text messages over
``--rtt-connections`` connections, direct to the echo server and through the proxy, in
``--rtt-rounds`` alternating rounds (the median ratio is the figure: the machine is
shared), with the CPU time each server process spent per round trip (the steadier figure).

Open tunnels: the stand-in reports them at GET /bridges; the balancer does not report
them, so they are counted from its descriptors (two per tunnel: client side and endpoint
side, above the count it holds when idle). For the same reason ``--count`` is lowered to
what the proxy's RLIMIT_NOFILE hard limit allows; the output says so when it happens.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import base64  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from contextlib import ExitStack  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
from gevent.pool import Pool  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import TESTS, cluster_argv, free_port, python, running  # noqa: E402

SERVICE = "web"
# `cluster serve` leaves RLIMIT_NOFILE alone: raise it to the hard limit, then run it.
LAUNCHER = ("import resource, sys\n"
            "_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))\n"
            "from cluster.entry import main\n"
            "main(sys.argv[1:])\n")

MASK = b"\x11\x22\x33\x44"


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A masked, final client frame (RFC 6455 5.2); payload < 126 bytes."""
    assert len(payload) < 126
    masked = bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + MASK + masked


def server_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    assert len(payload) < 126
    return bytes([0x80 | opcode, len(payload)]) + payload


def handshake(host: str, port: int, path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    buf = b""
    while len(buf) < size:
        data = sock.recv(size - len(buf))
        if not data:
            raise ConnectionError(f"closed after {len(buf)} of {size} bytes")
        buf += data
    return buf


def open_ws(port: int, path: str = "/idle") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(handshake("127.0.0.1", port, path))
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("closed during the handshake")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101 ") or rest:
        raise ConnectionError(f"bad handshake answer: {head[:60]!r}")
    return sock


def echo_once(sock: socket.socket, frame: bytes, expected: bytes) -> None:
    sock.sendall(frame)
    got = recv_exactly(sock, len(expected))
    if got != expected:
        raise AssertionError(f"echo mismatch: {got!r}")


def close_ws(sock: socket.socket) -> None:
    try:
        sock.sendall(client_frame(b"\x03\xe8", opcode=0x8))
    except OSError:
        pass
    finally:
        sock.close()


def rss(pid: int) -> int:
    """Resident set size in bytes (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def steady_rss(pid: int, settle: float = 1.0, tries: int = 20) -> int:
    """VmRSS once two reads ``settle`` seconds apart agree within 1%."""
    last = rss(pid)
    for _ in range(tries):
        time.sleep(settle)
        now = rss(pid)
        if abs(now - last) <= last / 100:
            return now
        last = now
    return last


def bridges(port: int) -> dict:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    with sock:
        sock.sendall(b"GET /bridges HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return json.loads(data.partition(b"\r\n\r\n")[2])


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(what)


def open_many(port: int, count: int, concurrency: int) -> tuple[list[socket.socket], int]:
    pool = Pool(concurrency)
    sockets: list[socket.socket] = []
    failures = 0

    def one(_: int) -> None:
        nonlocal failures
        try:
            sockets.append(open_ws(port))
        except OSError as exc:
            failures += 1
            if failures <= 3:
                print(f"  handshake failed: {exc}", file=sys.stderr)

    for i in range(count):
        pool.spawn(one, i)
    pool.join()
    return sockets, failures


def rtt_run(port: int, connections: int, seconds: float,
            pids: list[int]) -> tuple[int, float, dict[int, float]]:
    """32-byte text echoes back to back on ``connections`` sockets for ``seconds``:
    round trips done, time taken, and CPU seconds spent meanwhile by each of ``pids``."""
    payload = b"x" * 32
    frame, expected = client_frame(payload), server_frame(payload)
    sockets = [open_ws(port, "/rtt") for _ in range(connections)]
    for sock in sockets:
        echo_once(sock, frame, expected)  # warm
    counts = [0] * connections
    stop = time.monotonic() + seconds

    def loop(i: int) -> None:
        sock = sockets[i]
        while time.monotonic() < stop:
            echo_once(sock, frame, expected)
            counts[i] += 1

    pids = [*pids, os.getpid()]  # the client too, for scale
    cpu0 = {pid: cpu_seconds(pid) for pid in pids}
    t0 = time.monotonic()
    gevent.joinall([gevent.spawn(loop, i) for i in range(connections)], raise_error=True)
    elapsed = time.monotonic() - t0
    cpu = {pid: cpu_seconds(pid) - cpu0[pid] for pid in pids}
    for sock in sockets:
        close_ws(sock)
    return sum(counts), elapsed, cpu


def raise_nofile() -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def nofile_of(pid: int) -> str:
    """The process's own "Max open files" soft/hard, to show the raise took effect."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return f"{soft}/{hard}"
    return "?"


def status_lists(port: int, endpoint: str) -> bool:
    """Does the balancer's GET /_cluster/status list ``endpoint``?"""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_cluster/status",
                                    timeout=2) as response:
            view = json.load(response)
    except (OSError, ValueError):
        return False
    return any(e["endpoint"] == endpoint for e in view.get("endpoints", []))


class Proxy:
    """The process measured, and how many tunnels it holds open right now."""

    def __init__(self, via: str, pid: int, port: int) -> None:
        self.via, self.pid, self.port = via, pid, port
        self.idle_fds = 0

    def set_idle(self) -> None:
        """Remember the descriptors it holds with no tunnel (the lowest of a few reads)."""
        counts = []
        for _ in range(5):
            counts.append(open_fds(self.pid))
            time.sleep(0.2)
        self.idle_fds = min(counts)

    def open_tunnels(self) -> int:
        if self.via == "forwarder":
            return int(bridges(self.port)["open"])
        return max(0, (open_fds(self.pid) - self.idle_fds) // 2)


def start(via: str, echo_port: int, stack: ExitStack) -> Proxy:
    """Start the proxy in front of the echo server; its processes end with ``stack``."""
    port, endpoint = free_port(), f"http://127.0.0.1:{echo_port}"
    if via == "forwarder":
        proc = stack.enter_context(running(
            python(str(TESTS / "apps" / "ws_forward_only.py"), "--port", str(port),
                   "--backend", endpoint), port=port, name="ws_proxy"))
        return Proxy(via, proc.pid, port)
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ws-bench-")))
    env = {"CLUSTER_DISCOVERY_URL": f"sqlite:///{workdir / 'discovery.sqlite3'}"}
    proc = stack.enter_context(running(
        python("-c", LAUNCHER, "serve", "--ui-service", SERVICE, "--bind", f"127.0.0.1:{port}"),
        port=port, env=env, cwd=workdir, name="balancer"))
    stack.enter_context(running(
        cluster_argv("register", "--service", SERVICE, "--endpoint-url", endpoint,
                     "--ping-interval", "1"), env=env, cwd=workdir, name="sidecar"))
    wait_for(lambda: status_lists(port, endpoint), 20,
             f"the balancer's /_cluster/status to list {endpoint}")
    return Proxy(via, proc.pid, port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--via", choices=("cluster", "forwarder"), default="cluster",
                        help="the proxy measured: `cluster serve` (default) or the stand-in")
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--sample", type=int, default=500)
    parser.add_argument("--rtt-connections", type=int, default=20)
    parser.add_argument("--rtt-seconds", type=float, default=3.0)
    parser.add_argument("--rtt-rounds", type=int, default=4)
    args = parser.parse_args()

    hard = raise_nofile()
    with ExitStack() as stack:
        echo_port = free_port()
        echo = stack.enter_context(running(
            python(str(TESTS / "apps" / "ws_echo.py"), "--port", str(echo_port)),
            port=echo_port, name="ws_echo"))
        proxy = start(args.via, echo_port, stack)
        measure(args, hard, echo.pid, echo_port, proxy)


def measure(args: argparse.Namespace, hard: int, echo_pid: int, echo_port: int,
            proxy: Proxy) -> None:
    proxy_port = proxy.port
    results: dict[str, object] = {
        "via": args.via, "nofile_hard_limit": hard,
        "nofile_proxy": nofile_of(proxy.pid), "nofile_echo": nofile_of(echo_pid)}
    print(f"via {args.via}: proxy pid {proxy.pid} on 127.0.0.1:{proxy_port}, RLIMIT_NOFILE "
          f"{results['nofile_proxy']}; echo pid {echo_pid}, {results['nofile_echo']}")
    proxy.set_idle()
    # Warm-up: imports, first-use allocations, greenlet/socket free lists.
    warm, failed = open_many(proxy_port, 300, 100)
    assert not failed, "warm-up handshakes failed"
    for sock in warm:
        echo_once(sock, client_frame(b"warm"), server_frame(b"warm"))
        close_ws(sock)
    wait_for(lambda: proxy.open_tunnels() == 0, 30, "warm-up tunnels to end")

    limit = (hard - open_fds(proxy.pid) - 16) // 2
    count = min(args.count, limit)
    if count < args.count:
        print(f"note: --count {args.count} lowered to {count}: the proxy holds 2 "
              f"descriptors per tunnel and RLIMIT_NOFILE hard limit is {hard}")
    results.update(requested=args.count, count=count)

    proxy_before, echo_before = steady_rss(proxy.pid), steady_rss(echo_pid)
    t0 = time.monotonic()
    sockets, failures = open_many(proxy_port, count, args.concurrency)
    opened_in = time.monotonic() - t0
    open_now = wait_for(lambda: (n := proxy.open_tunnels()) >= len(sockets) and n,
                        60, "the proxy to hold every tunnel open")
    proxy_after, echo_after = steady_rss(proxy.pid), steady_rss(echo_pid)
    held = len(sockets)
    per_conn = (proxy_after - proxy_before) / held
    results.update(
        opened=held, failures=failures, open_seconds=round(opened_in, 2),
        proxy_open_tunnels=open_now,
        proxy_rss_before=proxy_before, proxy_rss_after=proxy_after,
        proxy_bytes_per_idle_ws=round(per_conn),
        echo_bytes_per_idle_ws=round((echo_after - echo_before) / held),
        proxy_fds=open_fds(proxy.pid))
    print(f"opened {held} proxied WebSockets in {opened_in:.1f}s ({failures} failed); "
          f"proxy holds {open_now} tunnels, {results['proxy_fds']} fds "
          f"({proxy.idle_fds} before the warm-up)")
    print(f"proxy VmRSS {proxy_before / 2**20:.1f} MiB -> {proxy_after / 2**20:.1f} MiB: "
          f"{per_conn:,.0f} bytes per idle proxied WebSocket")
    print(f"(echo server: {results['echo_bytes_per_idle_ws']:,} bytes per idle "
          "gevent-websocket connection, for scale)")

    sample = random.sample(sockets, min(args.sample, held))
    for i, sock in enumerate(sample):
        payload = f"still alive {i}".encode()
        echo_once(sock, client_frame(payload), server_frame(payload))
    results["sample_echoed"] = len(sample)
    print(f"{len(sample)} random idle sockets still echo")

    for sock in sockets:
        close_ws(sock)
    wait_for(lambda: proxy.open_tunnels() == 0, 120, "every tunnel to end")
    results["proxy_rss_after_close"] = steady_rss(proxy.pid)
    print(f"all closed; the proxy holds no tunnel; VmRSS now "
          f"{results['proxy_rss_after_close'] / 2**20:.1f} MiB")

    rtt = {"direct": [0, 0.0, 0.0, 0.0, 0.0], "proxied": [0, 0.0, 0.0, 0.0, 0.0]}
    ratios = []
    for round_no in range(args.rtt_rounds):
        # Alternate the order so a change in machine load hits both sides alike.
        order = ("direct", "proxied") if round_no % 2 == 0 else ("proxied", "direct")
        rates = {}
        for name in order:
            port = echo_port if name == "direct" else proxy_port
            trips, elapsed, cpu = rtt_run(port, args.rtt_connections, args.rtt_seconds,
                                          [echo_pid, proxy.pid])
            acc = rtt[name]
            acc[0] += trips
            acc[1] += elapsed
            acc[2] += cpu[echo_pid]
            acc[3] += cpu[proxy.pid]
            acc[4] += cpu[os.getpid()]
            rates[name] = trips / elapsed
        ratios.append(rates["proxied"] / rates["direct"])
        print(f"  round {round_no + 1}: direct {rates['direct']:,.0f}/s, "
              f"proxied {rates['proxied']:,.0f}/s, ratio {ratios[-1]:.2f}")
    for name, (trips, elapsed, echo_cpu, _proxy_cpu, client_cpu) in rtt.items():
        results[f"rtt_{name}_per_s"] = round(trips / elapsed)
        results[f"rtt_{name}_echo_cpu_us"] = round(echo_cpu / trips * 1e6, 1)
        results[f"rtt_{name}_client_cpu_us"] = round(client_cpu / trips * 1e6, 1)
    results["rtt_proxy_cpu_us"] = round(rtt["proxied"][3] / rtt["proxied"][0] * 1e6, 1)
    results["rtt_ratio_median"] = round(statistics.median(ratios), 3)
    results["rtt_ratios"] = [round(r, 3) for r in ratios]
    print(f"32-byte echo round trips, {args.rtt_connections} connections, "
          f"{args.rtt_rounds} x {args.rtt_seconds:g}s each: direct "
          f"{results['rtt_direct_per_s']:,}/s, proxied {results['rtt_proxied_per_s']:,}/s, "
          f"median ratio {results['rtt_ratio_median']:.2f}")
    print(f"CPU per round trip: proxy {results['rtt_proxy_cpu_us']} us; echo server "
          f"{results['rtt_direct_echo_cpu_us']} us direct, "
          f"{results['rtt_proxied_echo_cpu_us']} us proxied; this client "
          f"{results['rtt_direct_client_cpu_us']} / {results['rtt_proxied_client_cpu_us']} us")
    print(json.dumps(results))



if __name__ == "__main__":
    main()
