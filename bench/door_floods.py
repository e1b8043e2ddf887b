"""Resource bounds of `cluster serve` against clients that try to exhaust its memory,
descriptors or time: one run of every case, with the figures a reader checks.

    python bench/door_floods.py [--write-timeout 3] [--idle 2000] [--resets 1000]
                                [--only CASE,CASE]

Every process is started here (bench/bed.py) and stopped by PID at the end: ``local``
(`cluster serve --app backend:app`), ``front`` (a balancer with no app) in front of
``member`` (backend:app), ``wsfront`` (balancer, ``--max-connections`` 50) in front of
``wsmember`` (tests/apps/gws_echo.py), and ``wslocal`` (gws_echo served by the instance
itself). All get ``--write-timeout`` (3 s unless told) and ``--header-timeout 5``.
Figures are read from /proc/PID/status (VmRSS), /proc/PID/fd and the instance's own
GET /_cluster/status (connections, websockets). Cases (``--only`` picks some):

- ``slow-body``: a declared 10 MB upload sent a byte at a time, every second and then
  every write-timeout + 1 s, Content-Length and chunked, to ``local`` and ``front``:
  how long the connection lives.
- ``tiny-chunks``: a chunked body of 1-byte chunks sent as fast as the instance takes
  it (8 s), and a 3 GB Content-Length upload: the longest wait of other clients'
  GET /_cluster/status meanwhile (every 0.1 s).
- ``chunk-memory``: a body of 2,000,000 1-byte chunks to ``local``'s /echo, which reads
  it whole (``wsgi.input.read()``): peak RSS.
- ``pipeline``: 200,000 pipelined GETs written by a client that never reads: RSS, the
  others' longest wait, and when the connection is closed.
- ``chunk-abuse``: a 100 KB chunk extension, a 100 KB trailer line, a 100-digit size,
  and trailer lines sent for 5 s: the answer and how long it took.
- ``ws-cap``: 150 WebSockets through ``wsfront``: how many got 101 and 503, whether the
  open ones echo, and the status page from an already open connection.
- ``ws-half``: 20 WebSockets to ``wslocal`` announcing a 16 MiB message and stopping
  after 8 MiB: RSS while held, when they are closed, RSS after.
- ``resets``: connections reset (RST) in the middle of a head, a body, a chunked body, a
  5 MB response, and an upgraded WebSocket's frame: descriptors, RSS and the status
  figures before and after.
- ``idle``: that many keep-alive connections left idle after one GET: RSS per
  connection, to ``local`` and to ``front``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bed import Bed, free_port, wait_port  # noqa: E402

from helpers import raw_websocket  # noqa: E402

GET = b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n"


# --- what is measured -------------------------------------------------------------------

def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fetch(port: int, target: str, timeout: float = 60.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            piece = sock.recv(65536)
            if not piece:
                return data
            data += piece


def status(port: int) -> tuple[int, int]:
    data = fetch(port, "/_cluster/status")
    seen = json.loads(data.split(b"\r\n\r\n", 1)[1])
    return seen["connections"], seen["websockets"]


def sees(port: int, service: str) -> bool:
    data = fetch(port, "/_cluster/status")
    seen = json.loads(data.split(b"\r\n\r\n", 1)[1])
    return any(e["service"] == service for e in seen["endpoints"])


def waits_while(port: int, busy: Callable[[], bool]) -> list[float]:
    """How long each GET /_cluster/status took, one every 0.1 s while ``busy()``."""
    waits = []
    while busy():
        started = time.monotonic()
        fetch(port, "/_cluster/status")
        waits.append(time.monotonic() - started)
        time.sleep(0.1)
    return waits


def worst(waits: list[float]) -> str:
    return f"{len(waits)} probes, longest {max(waits):.3f} s" if waits else "no probe"


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the peer closed ``sock`` (reading and dropping), None if it did not."""
    started = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - started < seconds:
        try:
            if not sock.recv(1 << 20):
                return time.monotonic() - started
        except socket.timeout:
            continue
        except OSError:
            return time.monotonic() - started
    return None


# --- the cases --------------------------------------------------------------------------

def slow_body(port: int, chunked: bool, gap: float, seconds: float) -> str:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: 10000000"
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n\r\n")
        started = time.monotonic()
        sock.settimeout(gap)
        sent = 0
        while time.monotonic() - started < seconds:
            try:
                sock.send(b"1\r\nx\r\n" if chunked else b"x")
                sent += 1
                if not sock.recv(100):
                    return f"closed after {time.monotonic() - started:.1f} s ({sent} bytes)"
            except socket.timeout:
                continue
            except OSError:
                return f"closed after {time.monotonic() - started:.1f} s ({sent} bytes)"
    return f"still open after {seconds:.0f} s ({sent} bytes)"


def tiny_chunks(port: int, seconds: float) -> str:
    piece = b"1\r\nx\r\n" * 10922
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        stop = time.monotonic() + seconds
        sent = [0]

        def pump() -> None:
            while time.monotonic() < stop:
                sock.sendall(piece)
                sent[0] += len(piece)
            sock.sendall(b"0\r\n\r\n")

        pumping = threading.Thread(target=pump)
        pumping.start()
        time.sleep(0.3)
        waits = waits_while(port, pumping.is_alive)
        pumping.join()
        sock.settimeout(120)
        started = time.monotonic()
        answer = sock.recv(15)
    return (f"{sent[0] / 1e6:.1f} MB of 1-byte chunks, answered {answer!r} "
            f"{time.monotonic() - started:.1f} s after the last; others: {worst(waits)}")


def big_upload(port: int, megabytes: int) -> str:
    block = bytes(1_000_000)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                     % (megabytes * len(block)))
        started = time.monotonic()

        def pump() -> None:
            for _ in range(megabytes):
                sock.sendall(block)

        pumping = threading.Thread(target=pump)
        pumping.start()
        waits = waits_while(port, pumping.is_alive)
        pumping.join()
        took = time.monotonic() - started
        sock.recv(15)
    return f"{megabytes} MB Content-Length upload in {took:.1f} s; others: {worst(waits)}"


def chunk_memory(port: int, pid: int, count: int) -> dict:
    """A body of ``count`` 1-byte chunks to /echo, which reads it whole: peak RSS."""
    before = rss_kib(pid)
    peak = [before]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_kib(pid))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=300) as sock:
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                         b"Connection: close\r\n\r\n" + b"1\r\nx\r\n" * count + b"0\r\n\r\n")
            answered = 0
            while True:
                piece = sock.recv(1 << 20)
                if not piece:
                    break
                answered += len(piece)
    finally:
        done.set()
        watcher.join()
    grew = peak[0] - before
    return {"grew_kib": grew,
            "text": f"{count} 1-byte chunks read whole by the app: RSS {before} -> peak "
                    f"{peak[0]} KiB (+{grew // 1024} MiB for {count / 1e6:.1f} MB of data); "
                    f"answer {answered} bytes"}


def pipeline(port: int, pid: int, count: int) -> dict:
    data = GET * count
    before = rss_kib(pid)
    peak = before
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.settimeout(0.5)
        done = threading.Event()
        waits: list[float] = []
        prober = threading.Thread(target=lambda: waits.extend(
            waits_while(port, lambda: not done.is_set())))
        prober.start()
        sent = 0
        started = time.monotonic()
        while sent < len(data) and time.monotonic() - started < 30:
            try:
                sent += sock.send(data[sent:sent + (1 << 20)])
            except socket.timeout:
                pass
            except OSError:
                break
            peak = max(peak, rss_kib(pid))
        stuck = time.monotonic()
        done.set()
        prober.join()
        gone = closed_within(sock, 30)
    closed = None if gone is None else stuck - started + gone
    return {"grew_kib": peak - before, "longest_wait": max(waits, default=0.0),
            "closed_after": closed,
            "text": f"{sent / 1e6:.1f} of {len(data) / 1e6:.1f} MB written in "
                    f"{stuck - started:.1f} s; RSS {before} -> peak {peak} KiB; others: "
                    f"{worst(waits)}; closed "
                    f"{'never' if closed is None else f'{closed:.1f} s'} after the first byte"}


def chunk_abuse(port: int, case: str) -> str:
    head = b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        try:
            if case == "extension":
                sock.sendall(head + b"1;" + b"a" * 100_000 + b"\r\nx\r\n0\r\n\r\n")
            elif case == "trailer line":
                sock.sendall(head + b"1\r\nx\r\n0\r\nX-T: " + b"a" * 100_000 + b"\r\n\r\n")
            elif case == "size":
                sock.sendall(head + b"F" * 100 + b"\r\n")
            else:  # trailer lines for 5 s
                sock.sendall(head + b"1\r\nx\r\n0\r\n")
                block = (b"X-T: " + b"a" * 90 + b"\r\n") * 1000
                while time.monotonic() - started < 5:
                    sock.sendall(block)
                sock.sendall(b"\r\n")
        except OSError:
            pass
        try:
            answer = sock.recv(12)
        except OSError as exc:
            answer = repr(exc).encode()
    return f"{case}: {answer!r} after {time.monotonic() - started:.1f} s"


def ws_cap(port: int, pid: int, count: int) -> str:
    watcher = socket.create_connection(("127.0.0.1", port), timeout=10)
    ask = b"GET /_cluster/status HTTP/1.1\r\nHost: x\r\n\r\n"
    watcher.sendall(ask)
    watcher.recv(65536)
    statuses: dict[bytes, int] = {}
    socks = []
    for _ in range(count):
        sock, got = raw_websocket(port, timeout=10)
        got = got[:12]
        statuses[got] = statuses.get(got, 0) + 1
        if got == b"HTTP/1.1 101":
            socks.append(sock)
        else:
            sock.close()
    echoed = 0
    for sock in socks:
        sock.sendall(b"\x81\x82\x00\x00\x00\x00hi")
        echoed += sock.recv(100) == b"\x81\x02hi"
    held = fds(pid)
    watcher.sendall(ask)
    answer = watcher.recv(65536)
    seen = json.loads(answer.split(b"\r\n\r\n", 1)[1]) if b"\r\n\r\n" in answer else {}
    for sock in socks:
        sock.close()
    watcher.close()
    return (f"{count} handshakes: {statuses}; {echoed} of {len(socks)} open ones echo; "
            f"descriptors {held}; status from an open connection: connections "
            f"{seen.get('connections')}, websockets {seen.get('websockets')}")


def ws_half(port: int, pid: int, count: int, write_timeout: float) -> str:
    before = rss_kib(pid)
    header = b"\x82\xff" + struct.pack(">Q", (16 << 20) - 1) + b"\0\0\0\0"
    half = bytes(8 << 20)
    socks = []
    for _ in range(count):
        sock, _ = raw_websocket(port, timeout=10)
        sock.sendall(header + half)
        socks.append(sock)
    time.sleep(1)
    held = rss_kib(pid)
    times = [closed_within(sock, write_timeout + 10) for sock in socks]
    for sock in socks:
        sock.close()
    time.sleep(1)
    closed = [t for t in times if t is not None]
    return (f"{count} WebSockets holding 8 MiB of a 16 MiB message: RSS {before} -> {held} "
            f"KiB ({(held - before) // count} KiB each); {len(closed)} closed, the last "
            f"{max(closed) + 1 if closed else 0:.1f} s after sending; RSS after "
            f"{rss_kib(pid)} KiB")


def resets(port: int, pid: int, count: int, modes: list[str]) -> dict:
    before = (fds(pid), rss_kib(pid), status(port))
    for mode in modes:
        for i in range(count):
            sock = socket.create_connection(("127.0.0.1", port))
            if mode == "head":
                sock.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\nX-A: ")
            elif mode == "body":
                sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000"
                             b"\r\n\r\n" + bytes(10000))
            elif mode == "chunked":
                sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: "
                             b"chunked\r\n\r\n2710\r\n" + bytes(10000) + b"\r\n")
            elif mode == "response":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.sendall(b"GET /download?size=5000000 HTTP/1.1\r\nHost: x\r\n\r\n")
                sock.recv(1000)
            else:  # an upgraded WebSocket in the middle of a frame
                sock.close()
                sock, _ = raw_websocket(port, timeout=10)
                sock.sendall(b"\x82\xff" + (1 << 20).to_bytes(8, "big") + b"\0\0\0\0" +
                             bytes(1000))
            if i % 50 == 0:
                time.sleep(0.01)
            reset(sock)
    time.sleep(3)
    after = (fds(pid), rss_kib(pid), status(port))
    return {"before": before, "after": after,
            "text": f"{count} x {','.join(modes)}: descriptors {before[0]} -> {after[0]}, "
                    f"RSS {before[1]} -> {after[1]} KiB, (connections, websockets) "
                    f"{before[2]} -> {after[2]}"}


def idle(port: int, pid: int, count: int) -> dict:
    for _ in range(200):  # warm up
        fetch(port, "/whoami")
    time.sleep(1)
    before, held_before = rss_kib(pid), fds(pid)
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(GET)
        socks.append(sock)
    for sock in socks:
        sock.recv(4096)
    time.sleep(2)
    after, held = rss_kib(pid), fds(pid)
    for sock in socks:
        sock.close()
    each = (after - before) * 1024 // count
    return {"bytes_each": each, "descriptors": held - held_before,
            "text": f"{count} idle keep-alive connections: RSS {before} -> {after} KiB = "
                    f"{each} B each; descriptors {held_before} -> {held}"}


# --- the run ----------------------------------------------------------------------------

def start(bed: Bed, write_timeout: float) -> tuple[dict[str, int], dict[str, int]]:
    """The six processes of the module docstring, listening: (ports, pids) by name."""
    extra = ["--write-timeout", f"{write_timeout:g}", "--header-timeout", "5"]
    ports = {name: free_port() for name in
             ("local", "member", "front", "wsmember", "wsfront", "wslocal")}
    pids: dict[str, int] = {}
    for name, argv in (
            ("local", ["--service", "loc", "--app", "backend:app"]),
            ("member", ["--service", "web", "--app", "backend:app"]),
            ("front", ["--ui-service", "web"]),
            ("wsmember", ["--service", "ws", "--app", "gws_echo:app"]),
            ("wsfront", ["--ui-service", "ws", "--max-connections", "50"]),
            ("wslocal", ["--service", "wsl", "--app", "gws_echo:app"])):
        proc = bed.start(["serve", *argv, "--bind", f"127.0.0.1:{ports[name]}",
                          *bed.common, *extra], name)
        if not wait_port(ports[name], proc):
            raise RuntimeError(f"{name} exited with {proc.returncode}")
        pids[name] = proc.pid
    for name, service in (("front", "web"), ("wsfront", "ws")):  # they see their members
        deadline = time.monotonic() + 15
        while not sees(ports[name], service):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} does not see service {service}")
            time.sleep(0.2)
    return ports, pids


CASES = ("slow-body", "tiny-chunks", "chunk-memory", "pipeline", "chunk-abuse", "ws-cap", "ws-half",
         "resets", "idle")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-timeout", type=float, default=3.0)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--resets", type=int, default=1000)
    parser.add_argument("--only", default=",".join(CASES))
    args = parser.parse_args()
    only = args.only.split(",")
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    bed = Bed(prefix="door-floods-")
    try:
        ports, pids = start(bed, args.write_timeout)
        local, front = ports["local"], ports["front"]
        print(f"write timeout {args.write_timeout:g} s; pids {pids}", flush=True)
        if "slow-body" in only:
            for name, port in (("local", local), ("front", front)):
                for chunked in (False, True):
                    for gap in (1.0, args.write_timeout + 1):
                        print(f"slow-body {name} {'chunked' if chunked else 'length'} one "
                              f"byte every {gap:g} s: "
                              f"{slow_body(port, chunked, gap, 10)}", flush=True)
        if "tiny-chunks" in only:
            for name, port in (("local", local), ("front", front)):
                print(f"tiny-chunks {name}: {tiny_chunks(port, 8)}", flush=True)
                print(f"big-upload {name}: {big_upload(port, 3000)}", flush=True)
        if "chunk-memory" in only:
            figures = chunk_memory(local, pids["local"], 2_000_000)
            print(f"chunk-memory local: {figures['text']}", flush=True)
        if "pipeline" in only:
            for name, port in (("local", local), ("front", front)):
                print(f"pipeline {name}: {pipeline(port, pids[name], 200_000)['text']}",
                      flush=True)
        if "chunk-abuse" in only:
            for name, port in (("local", local), ("front", front)):
                for case in ("extension", "trailer line", "size", "trailer lines"):
                    print(f"chunk-abuse {name} {chunk_abuse(port, case)}", flush=True)
        if "ws-cap" in only:
            print(f"ws-cap wsfront (cap 50): {ws_cap(ports['wsfront'], pids['wsfront'], 150)}",
                  flush=True)
        if "ws-half" in only:
            for name in ("wslocal", "wsfront"):
                print(f"ws-half {name}: "
                      f"{ws_half(ports[name], pids[name], 20, args.write_timeout)}", flush=True)
        if "resets" in only:
            for name in ("local", "front"):
                figures = resets(ports[name], pids[name], args.resets,
                                 ["head", "body", "chunked", "response"])
                print(f"resets {name}: {figures['text']}", flush=True)
            for name in ("wslocal", "wsfront"):
                figures = resets(ports[name], pids[name], args.resets, ["ws"])
                print(f"resets {name}: {figures['text']}", flush=True)
        if "idle" in only:
            for name in ("local", "front"):
                print(f"idle {name}: {idle(ports[name], pids[name], args.idle)['text']}",
                      flush=True)
        for found in bed.tracebacks():
            print("TRACEBACK in", found)
    finally:
        bed.close()


if __name__ == "__main__":
    main()
