"""`cluster serve --workers-count N`: one public port, N registered worker processes."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections import Counter
from pathlib import Path

import requests

from helpers import Proc, cluster_argv, start_serve, status_json, wait_until


def pids_behind(url: str, session: requests.Session | None = None, count: int = 60) -> Counter:
    get = (session or requests).get
    pids: Counter[int] = Counter()
    for _ in range(count):
        response = get(url + "/whoami", timeout=5)
        assert response.status_code == 200, (response.status_code, response.text)
        pids[response.json()["pid"]] += 1
    return pids


def two_workers(discovery_url: str, tmpdir: Path | None = None) -> tuple[Proc, int]:
    """Two workers behind one public port the OS picks (the supervisor reports it);
    ``tmpdir``: their TMPDIR (where the supervisor makes its metrics directory)."""
    env = {"CLUSTER_DISCOVERY_URL": discovery_url}
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return start_serve("--workers-count", "2", "--service", "web",
                       "--app", "cluster.demo:app", "--ping-interval", "1",
                       "--expiry-grace", "1", env=env, name="workers")


def test_workers_share_the_port_register_each_and_are_supervised(sqlite_url):
    parent, port = two_workers(sqlite_url)
    url = f"http://127.0.0.1:{port}"
    try:
        rows = wait_until(lambda: [r for r in status_json(sqlite_url)["endpoints"]
                                   if r["healthy"]] if len(status_json(sqlite_url)["endpoints"])
                          == 2 else None, timeout=10, what="two worker records")
        private = {r["endpoint"] for r in rows}
        assert url not in private and len(private) == 2  # each worker its own endpoint

        spread = pids_behind(url)
        assert len(spread) == 2 and min(spread.values()) >= 10, spread

        session = requests.Session()
        sticky = pids_behind(url, session)
        assert len(sticky) == 1, "a cookie keeps a client in one worker process"

        victim = next(iter(sticky))
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: victim not in pids_behind(url, count=20) and
                   len(pids_behind(url, count=40)) == 2, timeout=20,
                   what="a replacement worker serving")
        wait_until(lambda: len([r for r in status_json(sqlite_url)["endpoints"]
                                if r["healthy"]]) == 2, timeout=10,
                   what="the dead worker's record expired, the new one registered")
        # the session's worker is gone: the cookie is replaced, nothing fails
        assert all(v > 0 for v in pids_behind(url, session, count=10).values())

        live = {r["endpoint"] for r in status_json(sqlite_url)["endpoints"] if r["healthy"]}
        parent.signal(signal.SIGTERM)
        assert parent.wait(30) == 0
        remaining = {r["endpoint"] for r in status_json(sqlite_url, "--all")["endpoints"]}
        assert remaining.isdisjoint(live), "SIGTERM'd workers deregister at once"
        assert "Traceback" not in parent.output()
    finally:
        parent.stop()


def test_workers_stop_when_their_parent_is_killed(sqlite_url, tmp_path):
    """The orphaned workers stop; the metrics directory the killed parent could not
    remove is removed by the next supervisor to start (54 such directories were left
    in /tmp by one day of test runs before)."""
    parent, port = two_workers(sqlite_url, tmp_path)
    try:
        pids = set(pids_behind(f"http://127.0.0.1:{port}"))
        parent.kill()

        def gone(pid: int) -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        wait_until(lambda: all(gone(p) for p in pids), timeout=15, what="orphans to stop")
        assert [r for r in status_json(sqlite_url)["endpoints"] if r["healthy"]] == []
        assert metrics_dirs(tmp_path) == [parent.pid]  # a SIGKILL leaves it behind
    finally:
        parent.stop()
    again, _ = two_workers(sqlite_url, tmp_path)
    try:
        assert metrics_dirs(tmp_path) == [again.pid]
    finally:
        again.stop()
    assert metrics_dirs(tmp_path) == []


def metrics_dirs(parent: Path) -> list[int]:
    """The PIDs in the names of the metrics directories in ``parent``."""
    return [int(d.name.split("-")[2]) for d in parent.iterdir()
            if d.name.startswith("cluster-metrics-")]


def test_a_sigterm_as_soon_as_the_port_file_appears_is_a_clean_stop(sqlite_url, tmp_path):
    """Whoever reads --port-file may stop the instance at once (a deploy script, a
    test). By then the supervisor handles SIGTERM: it stops its workers, exits 0 and
    removes its metrics directory. It used to write the file before it handled
    signals, and a SIGTERM in between was SIGTERM's default action: killed, the
    directory left behind (a CI run caught it)."""
    for attempt in range(5):
        port_file = tmp_path / f"port-{attempt}"
        proc = Proc(cluster_argv("serve", "--workers-count", "2", "--service", "web",
                                 "--app", "cluster.demo:app", "--bind", "127.0.0.1:0",
                                 "--port-file", str(port_file)),
                    env={"CLUSTER_DISCOVERY_URL": sqlite_url, "TMPDIR": str(tmp_path)},
                    name="workers")
        try:
            deadline = time.monotonic() + 20
            while not port_file.exists():  # polled tightly: the gap was milliseconds
                assert proc.poll() is None, proc.output()
                assert time.monotonic() < deadline, "no port file"
                time.sleep(0.0002)
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(30) == 0, proc.output()
        finally:
            proc.stop()
        assert metrics_dirs(tmp_path) == [], proc.output()


def test_the_connection_cap_is_per_worker_at_the_shared_port(sqlite_url):
    """--max-connections is per process: with two workers behind the shared port, a
    burst of twice the cap is held (each worker takes what the other, at its cap, left:
    one process used to accept the whole burst and answer 503 past its own cap while
    its sibling sat idle), and a connection past both caps still gets a prompt 503."""
    cap = 5
    parent, port = start_serve("--workers-count", "2", "--service", "web",
                               "--app", "cluster.demo:app", "--max-connections", str(cap),
                               "--header-timeout", "20",
                               env={"CLUSTER_DISCOVERY_URL": sqlite_url}, name="workers")
    socks: list[socket.socket] = []
    try:
        wait_until(lambda: parent.output().count("and the shared public socket") == 2,
                   timeout=20, what="both workers serving the shared port")
        socks = [socket.create_connection(("127.0.0.1", port), timeout=5)
                 for _ in range(2 * cap)]
        for sock in socks:  # each in a request (an idle one would make room for a newcomer)
            sock.sendall(b"GET / HTTP/1.1\r\n")
        time.sleep(1.0)  # past the pause of a worker at its cap
        for sock in socks:
            sock.setblocking(False)
            try:
                data = sock.recv(100)
            except BlockingIOError:
                continue  # held, waiting for the rest of its head: as it should be
            raise AssertionError(f"connection {socks.index(sock)} of {2 * cap} was "
                                 f"answered {data[:40]!r}")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
            started = time.monotonic()
            extra.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert extra.recv(100).startswith(b"HTTP/1.1 503")
            assert time.monotonic() - started < 2
    finally:
        for sock in socks:
            sock.close()
        parent.stop()


def test_a_connection_during_the_stop_is_refused_at_once(sqlite_url):
    """While the workers drain (here one holds a WebSocket whose client does not answer
    the 1001), a new connection to the shared port is refused, as by a single process
    that stops, so its client can go elsewhere at once. The supervisor kept its copy of
    the listener until the workers were gone: the connection was accepted into the
    backlog, never served, and reset only then (after --graceful-timeout at worst)."""
    parent, port = start_serve("--workers-count", "2", "--service", "web",
                               "--app", "gws_echo:app", env={"CLUSTER_DISCOVERY_URL": sqlite_url},
                               name="workers")
    held = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        held.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        assert held.recv(4096).startswith(b"HTTP/1.1 101 ")
        parent.signal(signal.SIGTERM)
        time.sleep(0.5)  # the workers have begun their stop: the 1001 is on its way
        started = time.monotonic()
        try:
            late = socket.create_connection(("127.0.0.1", port), timeout=5)
        except ConnectionRefusedError:
            pass
        else:
            with late:
                late.settimeout(3)
                late.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
                try:
                    answer = late.recv(4096)
                except OSError as exc:  # a reset
                    answer = repr(exc).encode()
            raise AssertionError(f"a connection during the stop was accepted: {answer!r} "
                                 f"after {time.monotonic() - started:.1f} s")
    finally:
        held.close()
        parent.stop()
    assert parent.returncode == 0, parent.output()
