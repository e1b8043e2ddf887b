"""gunicorn's own request limits, keep-alive and connection count under cluster's worker.

A gunicorn user sets ``--limit-request-line``, ``--limit-request-fields``,
``--limit-request-field_size``, ``--keep-alive`` and ``--worker-connections`` and
expects them to hold; the worker's front door takes them over (cluster.gunicorn
.GUNICORN_LIMITS) unless the ``CLUSTER_*`` variable of the same setting is set.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
from gunicorn.config import Config

from cluster.config import Settings
from cluster.errors import ConfigError
from cluster.gunicorn import apply_gunicorn_limits
from helpers import Proc, gunicorn_port, python, read_until_close, self_signed, wait_until


def gunicorn_config(**values: object) -> Config:
    cfg = Config()
    for name, value in values.items():
        cfg.set(name, value)
    return cfg


def test_set_gunicorn_limits_become_the_doors() -> None:
    cfg = gunicorn_config(limit_request_line=300, limit_request_fields=5, keepalive=1,
                          worker_connections=4, limit_request_field_size=1000)
    settings = apply_gunicorn_limits(Settings.load(env={}), cfg, env={})
    assert (settings.max_request_line, settings.max_header_count, settings.keepalive_timeout,
            settings.max_connections, settings.max_header_line) == (300, 5, 1.0, 4, 1000)


def test_gunicorn_defaults_leave_clusters_and_cluster_variables_win() -> None:
    defaults = Settings.load(env={})
    assert apply_gunicorn_limits(defaults, Config(), env={}) == defaults
    env = {"CLUSTER_MAX_HEADER_COUNT": "8"}
    settings = apply_gunicorn_limits(Settings.load(env=env),
                                     gunicorn_config(limit_request_fields=5), env=env)
    assert settings.max_header_count == 8


def test_gunicorn_zero_means_no_limit_of_its_own() -> None:
    """gunicorn's 0: no line limit (the whole head's bound still holds); keep-alive 0
    (none) has no door equivalent: not applied, and said so."""
    warnings: list[str] = []
    cfg = gunicorn_config(limit_request_line=0, limit_request_field_size=0, keepalive=0)
    defaults = Settings.load(env={})
    settings = apply_gunicorn_limits(defaults, cfg, env={},
                                     warn=lambda msg, *args: warnings.append(msg % args))
    assert settings.max_request_line == settings.max_header_line == defaults.max_head_size
    assert settings.keepalive_timeout == defaults.keepalive_timeout
    assert len(warnings) == 1 and "keepalive 0" in warnings[0], warnings


def test_a_value_cluster_refuses_names_gunicorns_setting() -> None:
    with pytest.raises(ConfigError, match=r"^gunicorn's limit_request_line \(100\): .*256"):
        apply_gunicorn_limits(Settings.load(env={}),
                              gunicorn_config(limit_request_line=100), env={})


def answer(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        return read_until_close(sock, 3.0)[0]


def get(target: str, *fields: str) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1", *fields, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_gunicorns_limits_hold_at_its_shared_port(tmp_path: Path) -> None:
    env = {"CLUSTER_DISCOVERY_URL": f"sqlite://{tmp_path / 'discovery.sqlite3'}",
           "CLUSTER_SERVICE": "web", "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = Proc(python("-m", "gunicorn", "-c", "python:cluster.gunicorn", "-w", "1",
                       "-b", "127.0.0.1:0", "--limit-request-line", "300",
                       "--limit-request-fields", "4", "--keep-alive", "1",
                       "--worker-connections", "4", "cluster.demo:app"),
                env=env, name="gunicorn")
    try:
        port = gunicorn_port(proc, timeout=30)
        wait_until(lambda: answer(port, get("/")).startswith(b"HTTP/1.1 200 "), timeout=20,
                   what="the worker to serve")
        # the request line: 300 bytes at most (cluster's own default is 8192)
        assert answer(port, get("/" + "a" * 250)).startswith(b"HTTP/1.1 200 ")
        assert answer(port, get("/" + "a" * 300)).startswith(b"HTTP/1.1 414 ")
        # header fields: 4 at most, Host and Connection included (cluster's: 100)
        assert answer(port, get("/", "X-A: 1", "X-B: 2")).startswith(b"HTTP/1.1 200 ")
        assert answer(port, get("/", "X-A: 1", "X-B: 2", "X-C: 3")).startswith(
            b"HTTP/1.1 431 ")
        # keep-alive: an idle connection is closed after 1 s (cluster's: 60 s)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            started = time.monotonic()
            data, closed = read_until_close(sock, 4.0)
            assert data.startswith(b"HTTP/1.1 200 ") and closed, data[:100]
            assert time.monotonic() - started < 3.5
        # connections: past 4 open ones a prompt 503, not a wait in the backlog
        silent = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(4)]
        try:
            time.sleep(0.3)  # accepted and counted
            refused = answer(port, get("/"))
            assert refused.startswith(b"HTTP/1.1 503 "), refused[:100]
        finally:
            for sock in silent:
                sock.close()
        wait_until(lambda: answer(port, get("/")).startswith(b"HTTP/1.1 200 "), timeout=10,
                   what="a slot once the silent connections closed")
        assert proc.poll() is None and "Traceback" not in proc.output(), proc.output()[-3000:]
    finally:
        proc.stop()


def test_a_limit_cluster_refuses_stops_gunicorn_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "CLUSTER_SERVICE": "web",
           "CLUSTER_DISCOVERY_URL": f"sqlite://{tmp_path / 'discovery.sqlite3'}"}
    proc = Proc(python("-m", "gunicorn", "-c", "python:cluster.gunicorn", "-w", "1",
                       "-b", "127.0.0.1:0", "--limit-request-line", "100",
                       "cluster.demo:app"), env=env, name="gunicorn")
    try:
        wait_until(lambda: proc.poll() is not None, timeout=30, what="gunicorn to stop")
        output = proc.output()
        assert "cluster: gunicorn's limit_request_line (100): " in output, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
    finally:
        proc.stop()


def test_the_worker_without_clusters_hooks_stops_with_one_line(tmp_path: Path) -> None:
    """``gunicorn -k cluster.gunicorn.Worker`` without ``-c python:cluster.gunicorn``: no
    hook made the worker's door, and it served as gevent's plain worker, unregistered and
    with none of the door's bounds (a silent connection held past the header timeout for
    good). It stops at once with one line saying how to start it."""
    env = {**os.environ, "CLUSTER_SERVICE": "web", "CLUSTER_HEADER_TIMEOUT": "1",
           "CLUSTER_DISCOVERY_URL": f"sqlite://{tmp_path / 'discovery.sqlite3'}"}
    proc = Proc(python("-m", "gunicorn", "-k", "cluster.gunicorn.Worker", "-w", "1",
                       "-b", "127.0.0.1:0", "cluster.demo:app"), env=env, name="gunicorn")
    try:
        wait_until(lambda: proc.poll() is not None, timeout=30, what="gunicorn to stop")
        output = proc.output()
        assert "-c python:cluster.gunicorn" in output, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
        assert proc.returncode != 0
    finally:
        proc.stop()


def test_worker_connections_is_per_worker_at_gunicorns_shared_port(tmp_path: Path) -> None:
    """``-w 2 --worker-connections 5``: ten connections held at once, as under gunicorn's
    own gevent worker (a worker with a full pool stops accepting, its sibling takes the
    next ones); one worker used to accept the whole burst and answer 503 past its own 5
    while the other sat idle. Past both, still a prompt 503."""
    cap = 5
    env = {"CLUSTER_DISCOVERY_URL": f"sqlite://{tmp_path / 'discovery.sqlite3'}",
           "CLUSTER_SERVICE": "web", "CLUSTER_HEADER_TIMEOUT": "20",
           "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = Proc(python("-m", "gunicorn", "-c", "python:cluster.gunicorn", "-w", "2",
                       "-b", "127.0.0.1:0", "--worker-connections", str(cap), "cluster.demo:app"),
                env=env, name="gunicorn")
    silent: list[socket.socket] = []
    try:
        port = gunicorn_port(proc, timeout=30)
        wait_until(lambda: proc.output().count("cluster: worker ") == 2, timeout=30,
                   what="both workers serving")
        time.sleep(0.5)  # gunicorn starts the workers' servers after that line
        silent = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2 * cap)]
        for sock in silent:  # each in a request (an idle one would make room for a newcomer)
            sock.sendall(b"GET / HTTP/1.1\r\n")
        time.sleep(1.0)  # past a full worker's pause
        for sock in silent:
            sock.setblocking(False)
            try:
                data = sock.recv(100)
            except BlockingIOError:
                continue  # held
            raise AssertionError(f"connection {silent.index(sock)} of {2 * cap} was answered "
                                 f"{data[:40]!r}")
        refused = answer(port, get("/"))
        assert refused.startswith(b"HTTP/1.1 503 "), refused[:100]
        assert "Traceback" not in proc.output(), proc.output()[-3000:]
    finally:
        for sock in silent:
            sock.close()
        proc.stop()


@pytest.mark.parametrize("case", ["bad-variable", "gunicorn-limit", "certfile", "no-hooks"])
def test_what_every_worker_would_refuse_stops_the_arbiter_once(tmp_path: Path,
                                                                 case: str) -> None:
    """``-w 4`` and a setting no worker can serve with: each worker used to say so and
    exit 3 on its own, and gunicorn's arbiter, halting for the first, met the next
    exits and ended with a HaltServer traceback and exit status 1 (every run with four
    workers). Now the arbiter checks before forking: one line, exit status 3, and its
    --pid file removed."""
    env = {**os.environ, "CLUSTER_SERVICE": "web",
           "CLUSTER_DISCOVERY_URL": f"sqlite://{tmp_path / 'discovery.sqlite3'}"}
    config = ["-c", "python:cluster.gunicorn"]
    extra: list[str] = []
    expected = {"bad-variable": "cluster: --header-timeout (CLUSTER_HEADER_TIMEOUT): ",
                "gunicorn-limit": "cluster: gunicorn's limit_request_line (100): ",
                "certfile": "cluster: gunicorn's --certfile/--keyfile: ",
                "no-hooks": "-c python:cluster.gunicorn"}[case]
    if case == "bad-variable":
        env["CLUSTER_HEADER_TIMEOUT"] = "abc"
    elif case == "gunicorn-limit":
        extra = ["--limit-request-line", "100"]
    elif case == "certfile":
        cert, key = self_signed(tmp_path)
        extra = ["--certfile", str(cert), "--keyfile", str(key)]
    else:
        config = ["-k", "cluster.gunicorn.Worker"]
    pidfile = tmp_path / "gunicorn.pid"
    proc = Proc(python("-m", "gunicorn", *config, "-w", "4", "-b", "127.0.0.1:0",
                       "--pid", str(pidfile), *extra, "cluster.demo:app"),
                env=env, name="gunicorn")
    try:
        status = proc.wait(timeout=30)
    finally:
        proc.stop()
    output = proc.output()
    assert "Traceback" not in output, output[-3000:]
    assert status == 3, output[-3000:]
    assert output.count(expected) == 1, output[-3000:]
    assert "Booting worker" not in output, output[-3000:]
    assert not pidfile.exists()
