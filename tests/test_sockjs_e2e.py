"""SockJS sessions stay on one endpoint across balancers, with real SockJS software.

Two `sockjs` (node) echo servers, each kept in discovery by a `cluster register` sidecar;
two balancer-only `cluster serve` instances; nginx round-robin before them, standing in
for DNS round-robin (no keep-alive to the balancers, so every request goes to the next
one); and the stock `sockjs-client` under node, forced onto xhr-polling so every poll and
every send of a session is its own HTTP request. The session must stay on one server
whichever balancer carries each request, end cleanly when that server dies, and the next
session must land on the live one.

Three ways the SockJS ``base_url`` gets its balancer part are covered:
``front``: the sidecars register with ``--balancer-url`` = the front;
``host``: nobody has a balancer URL, so the balancer derives it from the Host header
(which nginx passes through, so it is the front again);
``own``: each balancer has its own ``--balancer-url``, so the session goes straight to
the balancer that answered /sockjs/info, not through the front.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pytest
import requests

from helpers import (
    ROOT,
    Proc,
    cluster_argv,
    free_port,
    start_reporting,
    start_serve,
    wait_until,
)

SOCKJS = ROOT / "tests" / "sockjs"
NODE = shutil.which("node") or "node"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
COMMON = ["--ping-interval", "1", "--expiry-grace", "1"]
MESSAGES = 60
#: generous guards so a broken build fails instead of hanging; not timing assertions
PATIENCE = 30.0


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def require_node_packages() -> None:
    """Fail (never skip) with the fix when the node side is missing."""
    missing = [p for p in ("sockjs", "sockjs-client") if not (SOCKJS / "node_modules" / p).is_dir()]
    if shutil.which("node") is None or missing:
        pytest.fail(f"node or the npm packages {missing} are missing: run "
                    f"`npm ci --no-audit --no-fund` in {SOCKJS} (scripts/run-tests does)")


class SockJSClient:
    """tests/sockjs/client.js in a real node process, driven by JSON lines; stopped by PID."""

    def __init__(self, front: str, log_path: Path) -> None:
        self.stderr = open(log_path, "wb")  # closed in stop()
        self.popen = subprocess.Popen(
            [NODE, "client.js", "--front", front], cwd=str(SOCKJS), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1,
        )
        self.pid = self.popen.pid
        self.events: queue.Queue[dict] = queue.Queue()
        self.reader = threading.Thread(target=self._read, name="sockjs-client", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                self.events.put({"event": "raw", "line": line.rstrip()})
        self.events.put({"event": "exited"})

    def command(self, **cmd: object) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(json.dumps(cmd) + "\n")
        self.popen.stdin.flush()

    def until(self, *names: str, timeout: float = PATIENCE) -> list[dict]:
        """Events up to and including the first one named; fails rather than hangs."""
        got: list[dict] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self.events.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no {names} event within {timeout}s; got {got}") from None
            got.append(event)
            if event["event"] in names:
                return got
            if event["event"] == "exited":
                raise AssertionError(f"client exited before {names}; got {got}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        # The reader ends at EOF now that the process is gone; join it before closing
        # the pipe under it.
        self.reader.join(5)
        for pipe in (self.popen.stdin, self.popen.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self.stderr.close()


@dataclass
class Setup:
    mode: str
    front: str
    balancers: list[str]
    balancer_procs: list[Proc]
    urls: dict[str, str]  # server name -> endpoint URL
    servers: dict[str, Proc] = field(default_factory=dict)
    sidecars: dict[str, Proc] = field(default_factory=dict)
    nginx_dir: Path = Path()

    def access_log(self) -> list[list[str]]:
        """nginx's access log: method, uri, status, upstream address, upstream status."""
        text = (self.nginx_dir / "access.log").read_text()
        return [line.split() for line in text.splitlines() if line.strip()]

    def table(self, balancer: str) -> set[str]:
        status = requests.get(balancer + "/_cluster/status", timeout=5).json()
        return {e["endpoint"] for e in status["endpoints"] if e["service"] == "web"}


def render_nginx(directory: Path, port: int, balancer_ports: list[int]) -> Path:
    text = (SOCKJS / "nginx.conf.template").read_text()
    for key, value in {"@DIR@": str(directory), "@PORT@": str(port),
                       "@BALANCER1@": str(balancer_ports[0]),
                       "@BALANCER2@": str(balancer_ports[1])}.items():
        text = text.replace(key, value)
    conf = directory / "nginx.conf"
    conf.write_text(text)
    return conf


def start_sidecar(setup: Setup, name: str, discovery_url: str) -> Proc:
    url = setup.urls[name]
    argv = cluster_argv("register", "--service", "web", "--endpoint-url", url,
                        "--health-url", url + "/sockjs/info", "--ping-interval", "1")
    if setup.mode == "front":
        argv += ["--balancer-url", setup.front]
    return Proc(argv, env={"CLUSTER_DISCOVERY_URL": discovery_url}, name=f"sidecar-{name}")


def start_own_balancer(discovery_url: str, index: int) -> tuple[Proc, int]:
    """A balancer whose ``--balancer-url`` names its own port: that port must be known
    before it starts, so it is picked with ``free_port()``. If another process takes it
    meanwhile, `cluster serve` exits ("cannot listen on ...: Address already in use") and
    is started again on another port; the port file is written only once *this* process
    listens, so a foreign listener on the port is never mistaken for it."""
    for _attempt in range(3):
        port = free_port()  # needed before the start: see above
        try:
            return start_reporting(
                lambda port_file, p=port: cluster_argv(
                    "serve", "--ui-service", "web", "--bind", f"127.0.0.1:{p}",
                    "--port-file", str(port_file), "--balancer-url", f"http://127.0.0.1:{p}",
                    "--log-level", "debug", *COMMON),
                env={"CLUSTER_DISCOVERY_URL": discovery_url}, name=f"balancer-{index}")
        except RuntimeError as exc:
            if "Address already in use" not in str(exc):
                raise
    raise RuntimeError("three ports taken in a row: something else is wrong")


def start_nginx(directory: Path, balancer_ports: list[int]) -> tuple[Proc, int]:
    """nginx before the balancers. nginx cannot bind port 0 ("invalid port"), so its
    port is picked with ``free_port()``; if another process takes it before nginx binds,
    nginx gives up ("still could not bind()") and it is retried on another port. Ready
    means its pid file holds its PID: nginx writes it only after binding its port."""
    directory.mkdir()
    pid_file = directory / "nginx.pid"
    for _attempt in range(3):
        port = free_port()  # nginx cannot report a port it picked: see above
        conf = render_nginx(directory, port, balancer_ports)
        error_log = directory / "error.log"
        error_log.unlink(missing_ok=True)
        nginx = Proc([NGINX, "-p", str(directory), "-c", str(conf), "-e", str(error_log)],
                     name="nginx")
        try:
            wait_until(lambda n=nginx: n.poll() is not None or (
                pid_file.exists() and pid_file.read_text().strip() == str(n.pid)),
                timeout=PATIENCE, what="nginx's pid file")
        except BaseException:
            nginx.stop()
            raise
        if nginx.poll() is None:
            return nginx, port
        nginx.stop()
        said = error_log.read_text() if error_log.exists() else ""
        if "Address already in use" not in said:
            raise RuntimeError(f"nginx exited with {nginx.returncode}:\n{said}\n"
                               f"{nginx.output()}")
    raise RuntimeError("three ports taken in a row: something else is wrong")


@contextlib.contextmanager
def sockjs_cluster(mode: str, discovery_url: str, tmp: Path) -> Iterator[Setup]:
    require_node_packages()
    procs: list[Proc] = []
    try:
        servers, urls = {}, {}
        for name in ("s1", "s2"):
            proc, port = start_reporting(
                lambda port_file, n=name: [NODE, str(SOCKJS / "server.js"), "--port", "0",
                                           "--port-file", str(port_file), "--name", n],
                name=f"sockjs-{name}")
            procs.append(proc)
            servers[name], urls[name] = proc, f"http://127.0.0.1:{port}"
            # each server tells its own name, the one it prefixes its echoes with
            assert requests.get(urls[name] + "/name", timeout=10).text == name
        balancer_procs, balancer_ports = [], []
        for index in range(2):
            if mode == "own":
                proc, port = start_own_balancer(discovery_url, index)
            else:
                proc, port = start_serve("--ui-service", "web", "--log-level", "debug",
                                         *COMMON, env={"CLUSTER_DISCOVERY_URL": discovery_url},
                                         name=f"balancer-{index}")
            procs.append(proc)
            balancer_procs.append(proc)
            balancer_ports.append(port)
        nginx, front_port = start_nginx(tmp / "nginx", balancer_ports)
        procs.append(nginx)
        setup = Setup(
            mode=mode, front=f"http://127.0.0.1:{front_port}",
            balancers=[f"http://127.0.0.1:{p}" for p in balancer_ports],
            balancer_procs=balancer_procs, urls=urls, servers=servers,
            nginx_dir=tmp / "nginx",
        )
        for name in urls:
            proc = start_sidecar(setup, name, discovery_url)
            procs.append(proc)
            setup.sidecars[name] = proc
        every = set(setup.urls.values())
        wait_until(lambda: all(setup.table(b) == every for b in setup.balancers),
                   timeout=PATIENCE, what="both balancers see both SockJS servers")
        yield setup
    finally:
        for proc in reversed(procs):
            proc.stop()


def info_balancers(setup: Setup, asked: str) -> set[str]:
    """Which balancer URLs may start base_url when /sockjs/info is asked of ``asked``."""
    if setup.mode == "front":
        return {setup.front}
    if setup.mode == "own":  # the answering balancer's own --balancer-url
        return set(setup.balancers) if asked == setup.front else {asked}
    return {asked}  # host: the URL the client used, from the Host header


def check_info(setup: Setup) -> None:
    """/sockjs/info through either balancer or the front: base_url added, fields kept."""
    raw = requests.get(setup.urls["s1"] + "/sockjs/info", timeout=10).json()
    assert set(raw) >= {"websocket", "cookie_needed", "origins", "entropy"}
    hashes = {sha1(url) for url in setup.urls.values()}
    for asked in [*setup.balancers, setup.front]:
        for path in ("/sockjs/info", "/web/sockjs/info"):
            response = requests.get(asked + path, timeout=10)
            assert response.status_code == 200, (asked, path, response.text)
            assert response.headers["Content-Type"].startswith("application/json")
            info = response.json()
            for key in ("websocket", "cookie_needed", "origins"):
                assert info[key] == raw[key], (key, info)
            assert isinstance(info["entropy"], int)
            match = re.fullmatch(r"(http://127\.0\.0\.1:\d+)/cluster-ddp/([0-9a-f]{40})/web",
                                 info["base_url"])
            assert match, info["base_url"]
            assert match.group(1) in info_balancers(setup, asked), (asked, info["base_url"])
            assert match.group(2) in hashes


@pytest.mark.parametrize("mode", ["front", "host", "own"])
def test_sockjs_session_sticks_to_one_endpoint_across_balancers(mode, sqlite_url, tmp_path):
    with sockjs_cluster(mode, sqlite_url, tmp_path) as setup:
        check_info(setup)
        client = SockJSClient(setup.front, tmp_path / "client.log")
        try:
            # Stock sockjs-client: GET FRONT/sockjs/info, then it follows base_url itself.
            client.command(cmd="session", mode="library")
            opened = client.until("open", "close", "timeout")[-1]
            assert opened["event"] == "open", opened
            assert opened["transport"] == "xhr-polling"
            match = re.fullmatch(r"(http://127\.0\.0\.1:\d+)/cluster-ddp/([0-9a-f]{40})/web",
                                 opened["base_url"])
            assert match, opened
            assert match.group(1) in info_balancers(setup, setup.front)
            session_path = urlsplit(opened["session_url"]).path
            assert session_path.startswith(urlsplit(opened["base_url"]).path + "/")

            client.command(cmd="echo", count=MESSAGES, tag="a")
            events = client.until("echoed", timeout=PATIENCE * 4)
            echoes = [e for e in events if e["event"] == "echo"]
            assert events[-1]["count"] == MESSAGES, events[-3:]
            assert all(e["ok"] for e in echoes), [e for e in echoes if not e["ok"]][:3]
            servers = Counter(e["server"] for e in echoes)
            assert len(servers) == 1, servers  # one endpoint for the whole session
            (name,) = servers
            assert match.group(2) == sha1(setup.urls[name])

            # Who carried the session's requests: nginx's $upstream_addr and each
            # balancer's own access log must agree.
            addresses = [urlsplit(b).netloc for b in setup.balancers]

            def who_carried() -> tuple[Counter[str], list[int]] | None:
                """Session requests per balancer, by nginx and by the balancers' logs.

                Both log a request once its response is complete, which for the last
                send may be just after the echo arrived: None until they agree.
                """
                carried = Counter(row[3] for row in setup.access_log()
                                  if row[1].startswith(session_path))
                in_logs = [proc.output().count(session_path) for proc in setup.balancer_procs]
                if mode != "own" and [carried[a] for a in addresses] != in_logs:
                    return None
                return carried, in_logs

            carried, in_logs = wait_until(who_carried, timeout=PATIENCE,
                                          what="nginx's and the balancers' logs agree")
            if mode == "own":
                # base_url is one balancer's own URL: the session bypasses the front.
                assert carried == {}, carried
                direct = addresses.index(urlsplit(match.group(1)).netloc)
                assert in_logs[direct] >= 2 * MESSAGES and in_logs[1 - direct] == 0, in_logs
            else:
                assert set(carried) == set(addresses), carried
                total = sum(carried.values())
                assert total >= 2 * MESSAGES  # a send and a poll per message
                assert min(carried.values()) >= total // 4, carried  # round-robin 2:1
                kinds = Counter((row[3], row[1].rsplit("/", 1)[-1])
                                for row in setup.access_log() if row[1].startswith(session_path))
                for address in addresses:  # each balancer carried polls and sends
                    assert kinds[address, "xhr"] > 0 and kinds[address, "xhr_send"] > 0, kinds

            # The session's server dies: the client's pending poll fails, and the
            # session closes instead of hanging or carrying on elsewhere.
            other = "s2" if name == "s1" else "s1"
            setup.servers[name].kill()
            closing = client.until("close")
            assert [e["event"] for e in closing] == ["close"], closing
            assert closing[-1]["code"] != 1000, closing  # not a normal closure
            # Until its record goes, the old session's requests fail (502: its server
            # refuses) or are a 404 (record gone); never served by the other server.
            for balancer in setup.balancers:
                response = requests.post(balancer + session_path + "/xhr", timeout=10)
                assert response.status_code in (502, 404), (balancer, response.text)
            setup.sidecars[name].signal(signal.SIGTERM)
            assert setup.sidecars[name].wait(PATIENCE) == 0
            wait_until(lambda: all(setup.table(b) == {setup.urls[other]}
                                   for b in setup.balancers),
                       timeout=PATIENCE, what="both balancers drop the dead server")

            # Whichever balancer a request of the old session reaches: a clean 404.
            for balancer in [*setup.balancers, setup.front, setup.front]:
                for suffix, body in (("/xhr", None), ("/xhr_send", '["late"]')):
                    response = requests.post(balancer + session_path + suffix, data=body,
                                             timeout=10)
                    assert response.status_code == 404, (balancer, suffix, response.text)
                    assert "start a new session" in response.text
            # and stock sockjs-client reopening on the old base_url fails cleanly on it
            client.command(cmd="session", mode="url", url=opened["base_url"])
            retried = client.until("open", "close", "timeout")
            assert retried[-1]["event"] == "close", retried

            # The next session (fresh /sockjs/info, read by the client itself this
            # time) lands on the live server and echoes.
            client.command(cmd="session", mode="manual")
            started = client.until("open", "close", "timeout")
            info = started[0]
            assert info["event"] == "info" and info["status"] == 200, info
            assert info["info"]["base_url"].endswith(f"/cluster-ddp/{sha1(setup.urls[other])}/web")
            assert started[-1]["event"] == "open", started
            client.command(cmd="echo", count=20, tag="b")
            events = client.until("echoed")
            assert events[-1]["count"] == 20, events[-3:]
            assert {e["server"] for e in events if e["event"] == "echo"} == {other}
        finally:
            client.stop()
        for proc in setup.balancer_procs:
            assert proc.poll() is None
            assert "Traceback" not in proc.output()
