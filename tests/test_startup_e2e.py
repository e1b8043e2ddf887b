"""A clean start: `cluster demo` and `cluster serve --workers-count 8` on the embedded
store (many processes opening one new SQLite file at once) log no WARNING at all.
Concurrent start-up must be handled, not retried past: the watcher's refresh interval
(where a "works again after" warning would appear) is waited out before stopping."""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path

from helpers import Proc, cluster_argv, free_port, start_serve, status_json, wait_until

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")

#: the watcher refreshes every ping/2 s: 2.5 s with the default ping interval of 5 s
REFRESH = 2.5


def consecutive_free_ports(count: int) -> int:
    """The first of ``count`` consecutive ports that were free a moment ago.

    `cluster demo --bind HOST:PORT` needs PORT and the next two, which no port file
    can give: so this one test picks ports and hopes. They are picked below the
    kernel's ephemeral range, which every ``bind(port 0)`` and outgoing connection of
    the other tests (and of the demo's own pip install) draws from; a pick inside it was
    taken before the demo bound it ("cannot listen on ...: Address already in use")
    when other tests ran beside this one.
    """
    first_ephemeral = int(EPHEMERAL_RANGE.read_text().split()[0])
    for _ in range(50):
        if first_ephemeral - count > 10_000:
            first = random.randrange(10_000, first_ephemeral - count)
        else:
            first = free_port()  # no room below the range: picked, then closed
        sockets = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports")


def test_demo_starts_without_a_warning(tmp_path):
    port = consecutive_free_ports(3)
    # No CLUSTER_DISCOVERY_URL: the default embedded file under a new XDG_STATE_HOME.
    demo = Proc(cluster_argv("demo", "--bind", f"127.0.0.1:{port}"),
                env={"XDG_STATE_HOME": str(tmp_path / "state")},
                name="demo")
    try:
        wait_until(lambda: "dashboard: " in demo.output() or demo.poll() is not None,
                   timeout=60, what="the demo's dashboard line")
        assert demo.poll() is None, demo.output()
        time.sleep(REFRESH + 1)
        assert demo.stop() == 0
        output = demo.output()
        assert f"dashboard: http://127.0.0.1:{port}/_cluster/" in output
        assert "WARNING" not in output and "Traceback" not in output, output
    finally:
        demo.stop()


def test_eight_workers_start_without_a_warning(sqlite_url):
    server, _port = start_serve("--workers-count", "8", "--service", "web",
                                "--app", "cluster.demo:app",
                                env={"CLUSTER_DISCOVERY_URL": sqlite_url}, name="workers8",
                                timeout=60)
    try:
        wait_until(lambda: len(status_json(sqlite_url)["endpoints"]) == 8, timeout=60,
                   interval=0.5, what="eight worker records")
        time.sleep(REFRESH + 1)
        assert server.stop(timeout=30) == 0
        output = server.output()
        assert output.count("] registered web at") == 8, output
        assert "WARNING" not in output and "Traceback" not in output, output
    finally:
        server.stop()
