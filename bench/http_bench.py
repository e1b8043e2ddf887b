"""HTTP benchmark, pinned: `cluster serve` against nginx as a proxy, and against pywsgi.

    python bench/http_bench.py [--duration 5] [--rounds 4] [--no-websocket] [--no-relay]
                               [--heads wrk|browser]

The method of issue 7, on a 2-core machine. The process under test runs on CPU 0
(``taskset``); the nginx static backend and ``wrk -t1 -c50 --latency`` run on CPU 1.
Every server is started at once, then measured in interleaved rounds (the order flips
every round); each figure is the median over rounds, each ratio the median of the
per-round ratios.

Table 1, proxies in front of one nginx static backend (1 worker, 100 B and 64 KiB files):

- ``cluster serve``: ``python -m cluster serve --ui-service web --bind 127.0.0.1:0
  --port-file F`` (a balancer with no local app), discovery in a temp SQLite file, the
  backend registered as service ``web`` by the sidecar ``python -m cluster register
  --service web --endpoint-url http://127.0.0.1:PORT`` (CPU 1); measured once the
  balancer's ``GET /_cluster/status`` lists the backend;
- ``nginx``: nginx as the equivalent reverse proxy (bench/nginx_proxy.conf: 1 worker,
  ``keepalive 32`` upstream, ``proxy_buffering off``, ``proxy_request_buffering off``);
- ``C relay``: bench/ws_relay.c, built with ``cc`` at each run (``--no-relay`` skips
  it): an epoll loop that copies bytes between each client connection and one of its
  own to the backend, with no HTTP at all, polling 50 µs after I/O as the balancer
  does. Not a proxy anyone would run: what the layout itself leaves, in the same
  rounds. Its p99 is the floor for that of any proxy on CPU 0 (wrk and the backend
  share CPU 1, and every request crosses between the cores four times).

Table 2, a hello app (bench/hello_app.py, 100 B) on CPU 0:

- ``cluster serve --service hello --app hello_app:app`` (no other endpoint: every
  request is served locally), discovery in its own temp SQLite file;
- the same app under plain gevent pywsgi (``python bench/hello_app.py``).

Per target: requests/s, p50 and p99 (wrk --latency), the CPU time of the process under
test (utime+stime from /proc/PID/stat of it and its children, over the measured window)
per request, and how busy each core was meanwhile (from /proc/stat: other work on the
machine shows up there too). ``--heads browser`` gives wrk bench/browser_heads.lua: a
browser's 0.8 KB head, cookies among its fields, with the query string and the Referer
changing every request, so no two heads are the same (wrk's own are all alike). Then
the WebSocket figures (bench/ws_bench.py, same pinning) unless ``--no-websocket``. It
prints markdown tables for docs/benchmarks.md and the exact command. Every process is
started here, stopped by PID, and lives in a temp dir removed at the end. Needs wrk
and nginx (Debian: ``apt-get install -y wrk nginx``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PROXY_CPU, LOAD_CPU = 0, 1
SERVICE = "web"
#: Issue 7's targets.
TARGET_RATIO = {100: 0.45, 65536: 0.60}
TARGET_US_100 = 45.0
TARGET_P99_MS = 4.0
TARGET_HELLO = 0.9


# -- processes ------------------------------------------------------------------------

@dataclass
class Server:
    """A started process under test: its PID and the port it listens on."""

    name: str
    pid: int
    port: int


def cluster_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "cluster", *args]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), str(BENCH), str(ROOT / "tests" / "apps"),
                    os.environ.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check_alive(proc, log)
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}; see {log}")


def check_alive(proc: subprocess.Popen, log: Path) -> None:
    if proc.poll() is not None:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{tail}")


def listening_ports(pid: int) -> list[int]:
    """TCP ports ``pid`` listens on, from its socket descriptors and /proc/net/tcp."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def wait_bound(proc: subprocess.Popen, port_file: Path, log: Path,
               timeout: float = 30.0, grace: float = 3.0) -> int:
    """The port a ``--bind 127.0.0.1:0 --port-file F`` process listens on: from F once
    written. A `cluster serve` older than the front door binds port 0 but writes no file:
    then, ``grace`` seconds after it listens, the port is read from /proc."""
    deadline = time.monotonic() + timeout
    listening_since = None
    while time.monotonic() < deadline:
        check_alive(proc, log)
        with contextlib.suppress(OSError):
            text = port_file.read_text()
            if text.endswith("\n"):
                return int(text.strip().rsplit(":", 1)[1])
        ports = listening_ports(proc.pid)
        if ports:
            listening_since = listening_since or time.monotonic()
            if time.monotonic() - listening_since > grace:
                print(f"  note: {log.stem} wrote no --port-file; port {ports[0]} read from "
                      "/proc (a cluster serve without the front door)", flush=True)
                return ports[0]
        time.sleep(0.05)
    raise TimeoutError(f"{proc.args} never reported its port; see {log}")


@contextlib.contextmanager
def launched(argv: list[str], workdir: Path, name: str, cpu: int | None, *,
             port: int | None = None, port_file: Path | None = None,
             env: dict[str, str] | None = None) -> Iterator[Server]:
    """Run ``argv`` pinned to ``cpu`` until the block ends; yields it once it listens
    (on ``port``, or on the port written to ``port_file``). Stopped by PID."""
    log = workdir / f"{name}.log"
    pinned = ["taskset", "-c", str(cpu), *argv] if cpu is not None else argv
    with open(log, "wb") as out:  # taskset execs: the PID is the program's own
        proc = subprocess.Popen(pinned, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=child_env(env),
                                cwd=str(workdir))
    try:
        if port_file is not None:
            port = wait_bound(proc, port_file, log)
        elif port is not None:
            wait_port(port, proc, log)
        yield Server(name, proc.pid, port or 0)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)


def status_lists(port: int, endpoint: str) -> bool:
    """Does the instance's GET /_cluster/status list ``endpoint``?"""
    with contextlib.suppress(OSError, ValueError):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_cluster/status",
                                    timeout=2) as response:
            view = json.load(response)
        return any(e["endpoint"] == endpoint for e in view.get("endpoints", []))
    return False


def wait_listed(server: Server, endpoint: str, workdir: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not status_lists(server.port, endpoint):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{server.name} never listed {endpoint}; see {workdir}")
        time.sleep(0.2)


@contextlib.contextmanager
def cluster_balancer(workdir: Path, endpoint: str, name: str = "cluster",
                     launcher: list[str] | None = None,
                     options: tuple[str, ...] = ()) -> Iterator[Server]:
    """A balancer-only `cluster serve --ui-service web` on CPU 0 and a `cluster register`
    sidecar (CPU 1) putting ``endpoint`` in a temp SQLite store as service web; yields
    the balancer once its status lists the endpoint. ``launcher``: the argv that runs
    `cluster` (default ``python -m cluster``); ``options``: more `serve` flags."""
    env = {"CLUSTER_DISCOVERY_URL": f"sqlite:///{workdir / (name + '.sqlite3')}"}
    port_file = workdir / f"{name}.port"
    run = launcher or cluster_argv()
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(launched(
            [*run, "serve", "--ui-service", SERVICE, "--bind", "127.0.0.1:0",
             "--port-file", str(port_file), *options],
            workdir, name, PROXY_CPU, port_file=port_file, env=env))
        stack.enter_context(launched(
            cluster_argv("register", "--service", SERVICE, "--endpoint-url", endpoint,
                         "--ping-interval", "1"),
            workdir, f"{name}-sidecar", LOAD_CPU, env=env))
        wait_listed(server, endpoint, workdir)
        yield server


@contextlib.contextmanager
def cluster_hello(workdir: Path) -> Iterator[Server]:
    """`cluster serve --service hello --app hello_app:app` on CPU 0, alone in its own
    discovery file; yields it once its status lists itself."""
    env = {"CLUSTER_DISCOVERY_URL": f"sqlite:///{workdir / 'hello.sqlite3'}"}
    port_file = workdir / "cluster-hello.port"
    with launched(cluster_argv("serve", "--service", "hello", "--app", "hello_app:app",
                               "--bind", "127.0.0.1:0", "--port-file", str(port_file),
                               "--ping-interval", "1"),
                  workdir, "cluster-hello", PROXY_CPU, port_file=port_file, env=env) as server:
        wait_listed(server, f"http://127.0.0.1:{server.port}", workdir)
        yield server


def pywsgi_hello(workdir: Path) -> contextlib.AbstractContextManager[Server]:
    port_file = workdir / "pywsgi-hello.port"
    return launched([sys.executable, str(BENCH / "hello_app.py"), "--bind", "127.0.0.1:0",
                     "--port-file", str(port_file)],
                    workdir, "pywsgi-hello", PROXY_CPU, port_file=port_file)


@contextlib.contextmanager
def static_backend(workdir: Path, sizes: Iterable[int]) -> Iterator[str]:
    """The nginx static backend on CPU 1, serving a file of random bytes per size in
    ``sizes`` (named by it: /100); yields its base URL. Stopped by PID at the end."""
    nginx_dirs(workdir)
    www = workdir / "www"
    www.mkdir(exist_ok=True)
    for size in sizes:
        (www / str(size)).write_bytes(os.urandom(size))
    port = free_port()  # nginx cannot report a port it picked itself
    with launched(nginx_argv("nginx_backend.conf", workdir, PORT=port), workdir, "backend",
                  LOAD_CPU, port=port):
        yield f"http://127.0.0.1:{port}"


def build_relay(workdir: Path, cc: str) -> Path:
    """bench/ws_relay.c compiled into ``workdir``; returns the program."""
    program = workdir / "ws_relay"
    subprocess.run([cc, "-O2", "-o", str(program), str(BENCH / "ws_relay.c")], check=True)
    return program


#: How long the C relay polls after I/O, µs: the balancer's --busy-poll auto window.
RELAY_WINDOW = 50
#: The rows of the proxy table, in order; the ratios are to nginx's.
PROXY_ROWS = ("cluster serve", "nginx", "C relay")


def nginx_dirs(workdir: Path) -> None:
    """The temp directories nginx wants, readable by its workers (nobody under root)."""
    workdir.chmod(0o755)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / f"tmp-{sub}").mkdir(exist_ok=True)


def nginx_argv(template: str, workdir: Path, **values: object) -> list[str]:
    text = (BENCH / template).read_text()
    values.setdefault("DIR", workdir)
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    conf = workdir / template
    conf.write_text(text)
    return ["nginx", "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "stderr.log")]


# -- measuring ------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its direct children (nginx: master + worker)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def core_times() -> dict[int, tuple[int, int]]:
    """Per core: (busy, total) jiffies from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            numbers = [int(v) for v in values[:8]]
            idle = numbers[3] + numbers[4]
            out[int(name[3:])] = (sum(numbers) - idle, sum(numbers))
    return out


def busy_percent(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]],
                 cpu: int) -> float:
    busy = after[cpu][0] - before[cpu][0]
    total = after[cpu][1] - before[cpu][1]
    return 100.0 * busy / total if total else float("nan")


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    return float(match.group(1)) * _UNITS[match.group(2)] if match else float("nan")


#: --heads: wrk's own request head, or a browser's that changes every request
HEAD_SCRIPTS = {"wrk": None, "browser": BENCH / "browser_heads.lua"}


def wrk_argv(url: str, duration: int, connections: int, heads: str = "wrk") -> list[str]:
    script = HEAD_SCRIPTS[heads]
    return ["taskset", "-c", str(LOAD_CPU), "wrk", "-t1", f"-c{connections}",
            f"-d{duration}s", "--latency", *(["-s", str(script)] if script else []), url]


def wrk(url: str, duration: int, connections: int, heads: str = "wrk") -> dict[str, float]:
    out = subprocess.run(wrk_argv(url, duration, connections, heads), capture_output=True,
                         text=True, check=True, timeout=duration + 60).stdout
    done = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not done or not rps:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    result = {"requests": float(done.group(1)), "rps": float(rps.group(1))}
    for pct in ("50", "99"):
        match = re.search(rf"^\s+{pct}(?:\.0+)?%\s+(\S+)", out, re.M)
        result[f"p{pct}"] = _ms(match.group(1)) if match else float("nan")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    result["bad"] = float(bad.group(1)) if bad else 0.0
    if errors:
        print(f"    wrk socket errors on {url}: {errors.group(1)}", file=sys.stderr)
    return result


def check_answer(url: str, size: int) -> None:
    """Each target must answer 200 with the whole body before it is measured."""
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read()
        if response.status != 200 or len(body) != size:
            raise RuntimeError(f"{url} answered {response.status} with {len(body)} bytes, "
                               f"not 200 with {size}")


def measure(label: str, server: Server, path: str, args: argparse.Namespace) -> dict[str, float]:
    url = f"http://127.0.0.1:{server.port}/{path}"
    if args.warmup:
        wrk(url, args.warmup, args.connections, args.heads)
    cores0, cpu0 = core_times(), cpu_seconds(server.pid)
    result = wrk(url, args.duration, args.connections, args.heads)
    cpu1, cores1 = cpu_seconds(server.pid), core_times()
    result["us"] = (cpu1 - cpu0) * 1e6 / result["requests"] if result["requests"] else 0.0
    result["busy0"] = busy_percent(cores0, cores1, PROXY_CPU)
    result["busy1"] = busy_percent(cores0, cores1, LOAD_CPU)
    bad = f"  NON-2xx {result['bad']:.0f}" if result["bad"] else ""
    print(f"  {label:<22} {result['rps']:9.0f} req/s  p50 {result['p50']:6.2f} ms  "
          f"p99 {result['p99']:6.2f} ms  {result['us']:6.1f} us/req  "
          f"cpu0 {result['busy0']:3.0f}% cpu1 {result['busy1']:3.0f}%{bad}", flush=True)
    return result


def size_label(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 and size % 1024 == 0 else f"{size} B"


# -- the run --------------------------------------------------------------------------

#: (table, row, size): one measured case; rows of one (table, size) are compared.
Case = tuple[str, str, int]


def run(args: argparse.Namespace, workdir: Path, sizes: list[int]) -> dict[Case, list[dict]]:
    """Start every server at once (idle ones cost nothing), then measure each case once
    per round, interleaved, the order flipped every other round."""
    results: dict[Case, list[dict]] = {}
    with contextlib.ExitStack() as stack:
        backend_port = free_port()  # nginx cannot report a port it picked itself
        stack.enter_context(launched(
            nginx_argv("nginx_backend.conf", workdir, PORT=backend_port),
            workdir, "backend", LOAD_CPU, port=backend_port))
        backend = f"http://127.0.0.1:{backend_port}"
        servers: dict[str, tuple[Server, str]] = {}  # row -> (server, path or "{size}")
        if "proxy" in args.tables:
            servers["cluster serve"] = (stack.enter_context(
                cluster_balancer(workdir, backend)), "{size}")
            nginx_port = free_port()
            servers["nginx"] = (stack.enter_context(launched(
                nginx_argv("nginx_proxy.conf", workdir, PORT=nginx_port,
                           UPSTREAM_PORT=backend_port),
                workdir, "nginx-proxy", PROXY_CPU, port=nginx_port)), "{size}")
            if args.relay:
                relay_port = free_port()
                servers["C relay"] = (stack.enter_context(launched(
                    [str(build_relay(workdir, args.relay)), str(relay_port),
                     str(backend_port), str(RELAY_WINDOW)],
                    workdir, "c-relay", PROXY_CPU, port=relay_port)), "{size}")
        if "hello" in args.tables:
            servers["cluster serve --app"] = (stack.enter_context(cluster_hello(workdir)),
                                              "hello")
            servers["pywsgi"] = (stack.enter_context(pywsgi_hello(workdir)), "hello")
        cases: list[Case] = []
        if "proxy" in args.tables:
            cases += [("proxy", row, size) for size in sizes for row in PROXY_ROWS
                      if row in servers]
        if "hello" in args.tables:
            cases += [("hello", row, 100) for row in ("cluster serve --app", "pywsgi")]
        for _table, row, size in cases:
            server, path = servers[row]
            check_answer(f"http://127.0.0.1:{server.port}/{path.format(size=size)}", size)
        for round_no in range(args.rounds):
            print(f"round {round_no + 1} of {args.rounds} (load average "
                  f"{os.getloadavg()[0]:.2f})", flush=True)
            for case in cases if round_no % 2 == 0 else cases[::-1]:
                table, row, size = case
                server, path = servers[row]
                label = f"{row} {size_label(size)}"
                results.setdefault(case, []).append(
                    measure(label, server, path.format(size=size), args))
    return results


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def ratio(results: dict[Case, list[dict]], case: Case, base: Case, key: str = "rps") -> float:
    """Median over rounds of the per-round ratio (both measured in the same round)."""
    pairs = zip(results[case], results[base])
    return statistics.median(a[key] / b[key] for a, b in pairs if b[key])


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def report(results: dict[Case, list[dict]], sizes: list[int], rounds: int) -> list[str]:
    """The markdown tables and the targets; returns the lines printed."""
    lines: list[str] = []
    add = lines.append
    if any(case[0] == "proxy" for case in results):
        add("| response | proxy (CPU 0) | req/s | vs nginx | p50 ms | p99 ms | "
            "proxy CPU µs/req | req/s range | CPU 0 / 1 busy |")
        add("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for size in sizes:
            for row in PROXY_ROWS:
                runs = results.get(("proxy", row, size))
                if not runs:
                    continue
                rel = (f"{ratio(results, ('proxy', row, size), ('proxy', 'nginx', size)):.2f}"
                       if row != "nginx" else "1")
                name = f"**{row}**" if row == "cluster serve" else row
                add(f"| {size_label(size)} | {name} | {median(runs, 'rps'):.0f} | {rel} | "
                    f"{median(runs, 'p50'):.2f} | {median(runs, 'p99'):.2f} | "
                    f"{median(runs, 'us'):.1f} | {min(r['rps'] for r in runs):.0f}-"
                    f"{max(r['rps'] for r in runs):.0f} | {median(runs, 'busy0'):.0f}% / "
                    f"{median(runs, 'busy1'):.0f}% |")
        add("")
        for size in sizes:
            case, base = ("proxy", "cluster serve", size), ("proxy", "nginx", size)
            if case not in results or base not in results:
                continue
            got = ratio(results, case, base)
            want = TARGET_RATIO.get(size)
            if want is not None:
                add(f"- req/s vs nginx at {size_label(size)}: {got:.2f} (target ≥ {want:.2f}): "
                    f"{verdict(got >= want)}")
            p99 = median(results[case], "p99")
            floor = ("proxy", "C relay", size)
            beside = (f"; the C relay {median(results[floor], 'p99'):.2f} ms, the balancer's "
                      f"{ratio(results, case, floor, 'p99'):.2f} times it"
                      if floor in results else "")
            add(f"- p99 at {size_label(size)}: {p99:.2f} ms (target ≤ {TARGET_P99_MS:g} ms"
                f"{beside}): {verdict(p99 <= TARGET_P99_MS)}")
            if size == 100:
                us = median(results[case], "us")
                add(f"- proxy CPU per 100 B request: {us:.1f} µs (target ≤ "
                    f"{TARGET_US_100:g} µs; nginx {median(results[base], 'us'):.1f} µs): "
                    f"{verdict(us <= TARGET_US_100)}")
        add("")
    hello, plain = ("hello", "cluster serve --app", 100), ("hello", "pywsgi", 100)
    if hello in results and plain in results:
        add("| hello app, 100 B (CPU 0) | req/s | vs pywsgi | p50 ms | p99 ms | "
            "server CPU µs/req | req/s range | CPU 0 / 1 busy |")
        add("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for case, name in ((hello, "**cluster serve --app**"), (plain, "pywsgi")):
            runs = results[case]
            rel = f"{ratio(results, case, plain):.2f}" if case != plain else "1"
            add(f"| {name} | {median(runs, 'rps'):.0f} | {rel} | {median(runs, 'p50'):.2f} | "
                f"{median(runs, 'p99'):.2f} | {median(runs, 'us'):.1f} | "
                f"{min(r['rps'] for r in runs):.0f}-{max(r['rps'] for r in runs):.0f} | "
                f"{median(runs, 'busy0'):.0f}% / {median(runs, 'busy1'):.0f}% |")
        got = ratio(results, hello, plain)
        add("")
        add(f"- hello app vs pywsgi: {got:.2f} (target ≥ {TARGET_HELLO:g}): "
            f"{verdict(got >= TARGET_HELLO)}")
        add("")
    add(f"Medians of {rounds} interleaved round(s); ratios are medians of per-round ratios.")
    bad = sum(r["bad"] for runs in results.values() for r in runs)
    if bad:
        add(f"**{bad:.0f} non-2xx responses** during the run: the figures are suspect.")
    return lines


def versions() -> str:
    def first_line(argv: list[str]) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (done.stdout or done.stderr).strip().splitlines()[0]
        return "?"

    import gevent

    nginx = first_line(["nginx", "-v"]).rsplit("/", 1)[-1]
    wrk_v = first_line(["wrk", "-v"]).split()[1]
    commit = first_line(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])
    return (f"cluster {commit}, Python {platform.python_version()}, gevent "
            f"{gevent.__version__}, nginx {nginx}, wrk {wrk_v}, kernel {platform.release()}, "
            f"{os.cpu_count()} cores")


def command_line() -> str:
    return " ".join(["python", "bench/http_bench.py", *sys.argv[1:]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5,
                        help="seconds per measured wrk run (whole seconds, as wrk takes)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="seconds of wrk before each measured run (0: none)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="measure every case this many times, interleaved; medians")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--sizes", default="100,65536", help="proxied response sizes, bytes")
    parser.add_argument("--tables", default="proxy,hello",
                        help="which tables: proxy (vs nginx), hello (vs pywsgi)")
    parser.add_argument("--heads", choices=sorted(HEAD_SCRIPTS), default="wrk",
                        help="request heads: wrk's own (43 bytes, the same each time), or "
                             "a browser's 0.7 KB that changes every request "
                             "(bench/browser_heads.lua)")
    parser.add_argument("--no-websocket", dest="websocket", action="store_false",
                        help="skip the WebSocket figures (bench/ws_bench.py)")
    parser.add_argument("--no-relay", dest="relay", action="store_const", const=None,
                        default=shutil.which("cc"),
                        help="skip the C relay row (skipped anyway without a C compiler)")
    args = parser.parse_args()
    args.tables = set(args.tables.split(","))
    if os.cpu_count() is None or os.cpu_count() < 2:  # type: ignore[operator]
        sys.exit("needs 2 cores: the proxy on CPU 0, backend and load on CPU 1")
    for tool in ("wrk", "nginx", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (Debian: apt-get install -y wrk nginx)")
    sizes = [int(s) for s in args.sizes.split(",")]
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    script = " -s bench/browser_heads.lua" if HEAD_SCRIPTS[args.heads] else ""
    print(f"$ {command_line()}\n{versions()}\nstarted {started} UTC, load average "
          f"{os.getloadavg()[0]:.2f}; wrk -t1 -c{args.connections} -d{args.duration:g}s "
          f"--latency{script} (after {args.warmup:g}s of warm-up) on CPU {LOAD_CPU}",
          flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="http-bench-"))
    try:
        nginx_dirs(workdir)
        www = workdir / "www"
        www.mkdir()
        for size in sizes:
            (www / str(size)).write_bytes(os.urandom(size))
        results = run(args, workdir, sizes)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ended = time.strftime("%H:%M", time.gmtime())
    print(f"\nrun of {started}-{ended} UTC, load average now {os.getloadavg()[0]:.2f}\n")
    print("\n".join(report(results, sizes, args.rounds)), flush=True)
    if args.websocket:
        print(flush=True)
        subprocess.run([sys.executable, str(BENCH / "ws_bench.py"),
                        "--duration", f"{args.duration:g}", "--rounds", str(args.rounds)],
                       check=True)
    print(f"\ncommand: `{command_line()}`")


if __name__ == "__main__":
    main()
