"""Idle WebSocket memory of the proxy, and 32-byte echo round trips direct vs proxied.

    python bench/ws_idle_memory.py [--count 10000] [--concurrency 200] [--sample 500]
                                   [--rtt-connections 20] [--rtt-seconds 3] [--rtt-rounds 4]

One run, three processes started here and stopped by PID at the end:

- ``echo``  tests/apps/ws_echo.py, the gevent-websocket echo server (the endpoint);
- ``proxy`` tests/apps/ws_forward_only.py, WebSocketBridge served by pywsgi with
  ClusterHandler (the unit measured);
- this script, a gevent client that speaks raw WebSocket frames (pre-built, so the
  client costs little CPU).

Steps: raise RLIMIT_NOFILE to the hard limit everywhere; warm the proxy up with a few
hundred short-lived sockets; read its VmRSS; open ``--count`` WebSockets through it
(``--concurrency`` handshakes in flight) and leave them idle; read VmRSS again once it
is steady -> bytes per idle proxied connection. Then a random sample of them must still
echo, all are closed, and the proxy must report zero open tunnels. Last, the echo
round-trip rate for 32-byte text messages over ``--rtt-connections`` connections,
direct to the echo server and through the proxy, in ``--rtt-rounds`` alternating rounds
(the median ratio is the figure: the machine is shared), with the CPU time each server
process spent per round trip (the steadier figure).

A proxied WebSocket holds two descriptors in the proxy, so ``--count`` is lowered to
what its RLIMIT_NOFILE hard limit allows; the output says so when it happens.
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
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
from gevent.pool import Pool  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import TESTS, Proc, free_port, python, wait_port  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--sample", type=int, default=500)
    parser.add_argument("--rtt-connections", type=int, default=20)
    parser.add_argument("--rtt-seconds", type=float, default=3.0)
    parser.add_argument("--rtt-rounds", type=int, default=4)
    args = parser.parse_args()

    hard = raise_nofile()
    echo_port, proxy_port = free_port(), free_port()
    echo = Proc(python(str(TESTS / "apps" / "ws_echo.py"), "--port", str(echo_port)),
                name="ws_echo")
    proxy = Proc(python(str(TESTS / "apps" / "ws_forward_only.py"), "--port", str(proxy_port),
                        "--backend", f"http://127.0.0.1:{echo_port}"), name="ws_proxy")
    results: dict[str, object] = {"nofile_hard_limit": hard}
    try:
        wait_port(echo_port, proc=echo)
        wait_port(proxy_port, proc=proxy)

        # Warm-up: imports, first-use allocations, greenlet/socket free lists.
        warm, failed = open_many(proxy_port, 300, 100)
        assert not failed, "warm-up handshakes failed"
        for sock in warm:
            echo_once(sock, client_frame(b"warm"), server_frame(b"warm"))
            close_ws(sock)
        wait_for(lambda: bridges(proxy_port)["open"] == 0, 30, "warm-up tunnels to end")

        limit = (hard - open_fds(proxy.pid) - 16) // 2
        count = min(args.count, limit)
        if count < args.count:
            print(f"note: --count {args.count} lowered to {count}: the proxy holds 2 "
                  f"descriptors per tunnel and RLIMIT_NOFILE hard limit is {hard}")
        results.update(requested=args.count, count=count)

        proxy_before, echo_before = steady_rss(proxy.pid), steady_rss(echo.pid)
        t0 = time.monotonic()
        sockets, failures = open_many(proxy_port, count, args.concurrency)
        opened_in = time.monotonic() - t0
        open_now = wait_for(lambda: (n := bridges(proxy_port)["open"]) >= len(sockets) and n,
                            60, "the proxy to report every tunnel open")
        proxy_after, echo_after = steady_rss(proxy.pid), steady_rss(echo.pid)
        held = len(sockets)
        per_conn = (proxy_after - proxy_before) / held
        results.update(
            opened=held, failures=failures, open_seconds=round(opened_in, 2),
            proxy_open_reported=open_now,
            proxy_rss_before=proxy_before, proxy_rss_after=proxy_after,
            proxy_bytes_per_idle_ws=round(per_conn),
            echo_bytes_per_idle_ws=round((echo_after - echo_before) / held),
            proxy_fds=open_fds(proxy.pid))
        print(f"opened {held} proxied WebSockets in {opened_in:.1f}s ({failures} failed); "
              f"proxy reports {open_now} open, holds {results['proxy_fds']} fds")
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
        wait_for(lambda: bridges(proxy_port)["open"] == 0, 120, "every tunnel to end")
        results["proxy_rss_after_close"] = steady_rss(proxy.pid)
        print(f"all closed; proxy reports 0 open; VmRSS now "
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
                                              [echo.pid, proxy.pid])
                acc = rtt[name]
                acc[0] += trips
                acc[1] += elapsed
                acc[2] += cpu[echo.pid]
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
    finally:
        proxy.stop()
        echo.stop()


if __name__ == "__main__":
    main()
