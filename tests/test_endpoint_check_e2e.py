"""An --endpoint-url where nothing answers is said once at start, and the instance runs on.

A mistyped port or host in CLUSTER_ENDPOINT_URL registered an address no other
instance could reach, without a word: each of them was refused, ejected it and tried
again. The instance now tries a connection to its own endpoint once it listens and
logs one warning naming the URL and the setting (it keeps serving: an address that
only other hosts can reach, behind NAT, is possible).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import time
from typing import Iterator

import requests

from helpers import (
    Proc,
    blackholed_port,
    cluster_argv,
    connecting_to,
    gunicorn_port,
    python,
    refused_port,
    serving,
    status_json,
    wait_until,
)

SAID = "does not accept connections from this host"


def test_an_endpoint_url_nobody_answers_is_one_warning_and_the_instance_serves(sqlite_url):
    with refused_port() as dead, serving(
            "--service", "web", "--app", "backend:app", "--discovery-url", sqlite_url,
            "--endpoint-url", f"http://127.0.0.1:{dead}") as (proc, port):
        wait_until(lambda: SAID in proc.output(), timeout=15, what="the endpoint warning")
        lines = [line for line in proc.output().splitlines() if SAID in line]
        assert len(lines) == 1, lines
        assert "WARNING" in lines[0] and f"http://127.0.0.1:{dead}" in lines[0], lines
        assert "--endpoint-url (CLUSTER_ENDPOINT_URL)" in lines[0], lines
        assert proc.poll() is None
        assert "Traceback" not in proc.output()


def test_a_reachable_endpoint_says_nothing(sqlite_url):
    with serving("--service", "web", "--app", "backend:app",
                 "--discovery-url", sqlite_url) as (proc, _port):
        wait_until(lambda: "registered web" in proc.output(), timeout=15)
        time.sleep(1.0)
        assert SAID not in proc.output() and "WARNING" not in proc.output(), proc.output()


def test_gunicorn_workers_warn_of_an_endpoint_host_nobody_answers_on(tmp_path, sqlite_url):
    """Under gunicorn CLUSTER_ENDPOINT_URL gives the workers' host (each keeps its own
    port): a host the workers do not listen on (127.0.0.2, with gunicorn bound to
    127.0.0.1) is one warning per worker, and the workers serve."""
    proc = Proc(python("-m", "gunicorn", "-c", "python:cluster.gunicorn", "-w", "1",
                       "-b", "127.0.0.1:0", "--control-socket", str(tmp_path / "g.ctl"),
                       "backend:app"),
                env={"CLUSTER_SERVICE": "web", "CLUSTER_DISCOVERY_URL": sqlite_url,
                     "CLUSTER_ENDPOINT_URL": "http://127.0.0.2:8000"}, name="gunicorn")
    try:
        port = gunicorn_port(proc)
        wait_until(lambda: SAID in proc.output(), timeout=20, what="the endpoint warning")
        assert "http://127.0.0.2:" in proc.output()
        assert requests.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200
    finally:
        proc.stop()
    assert "Traceback" not in proc.output(), proc.output()


def test_a_second_instance_given_the_first_ones_endpoint_url_is_told(sqlite_url):
    """The typical way to get two instances with one endpoint URL: CLUSTER_ENDPOINT_URL
    exported once, a second instance started on another port. They heartbeat one record,
    and the first to stop deletes it under the other; the second now says so at start."""
    with serving("--service", "web", "--app", "backend:app", "--discovery-url", sqlite_url,
                 name="first") as (first, port), \
            serving("--service", "web", "--app", "backend:app", "--discovery-url", sqlite_url,
                    env={"CLUSTER_ENDPOINT_URL": f"http://127.0.0.1:{port}"},
                    name="second") as (second, second_port):
        said = "is another process's port on this host"
        wait_until(lambda: said in second.output(), timeout=15, what="the duplicate warning")
        lines = [line for line in second.output().splitlines() if said in line]
        assert len(lines) == 1 and f"127.0.0.1:{second_port}" in lines[0], lines
        assert second.poll() is None and first.poll() is None
        assert "WARNING" not in first.output(), first.output()


@contextlib.contextmanager
def checking_a_blackholed_endpoint(sqlite_url: str, name: str) -> Iterator[Proc]:
    """`cluster serve` whose --endpoint-url is blackholed, in its start-up check (its
    connect under way, up to 2 s): the process, stopped by PID at the end."""
    with blackholed_port() as hole:
        proc = Proc(cluster_argv("serve", "--service", "web", "--app", "backend:app",
                                 "--bind", "127.0.0.1:0", "--discovery-url", sqlite_url,
                                 "--endpoint-url", f"http://127.0.0.1:{hole}"), name=name)
        try:
            wait_until(lambda: connecting_to(proc.pid, hole) or proc.poll() is not None,
                       timeout=20, interval=0.01, what="the check's connect")
            yield proc
        finally:
            proc.stop()


def test_ctrl_c_during_the_check_stops_at_once_without_registering(sqlite_url):
    """The check of a blackholed endpoint waits up to 2 s for its connection. A SIGINT
    (or SIGTERM) then was only noted: the instance waited the check out, registered (a
    join every other instance saw), logged that it serves, and only then stopped. It
    stops now, before registering."""
    with checking_a_blackholed_endpoint(sqlite_url, "serve-interrupted") as proc:
        started = time.monotonic()
        proc.signal(signal.SIGINT)
        assert proc.wait(5) == 0, proc.output()
        assert time.monotonic() - started < 1.0, proc.output()
    assert "registered" not in proc.output() and "serving" not in proc.output(), proc.output()
    assert "Traceback" not in proc.output(), proc.output()


def test_a_drain_then_a_stop_during_the_check_leaves_no_record(sqlite_url):
    """SIGUSR2 (a drain: `cluster drain`, a rolling deploy) while the instance still
    checks its endpoint, then SIGTERM: the drain wrote the record at once (marked
    draining) although the instance had not registered yet, and the stop, which came
    before registering, removed nothing: the record stayed until it expired."""
    with checking_a_blackholed_endpoint(sqlite_url, "serve-drained-early") as proc:
        proc.signal(signal.SIGUSR2)
        wait_until(lambda: "draining (SIGUSR2)" in proc.output(), timeout=5)
        time.sleep(0.2)
        proc.signal(signal.SIGTERM)
        assert proc.wait(5) == 0, proc.output()
    assert status_json(sqlite_url, "--all")["endpoints"] == [], proc.output()
    assert "registered" not in proc.output(), proc.output()
    assert "Traceback" not in proc.output(), proc.output()


def test_an_https_endpoint_on_this_host_is_not_taken_for_a_second_instance(sqlite_url):
    """cluster serves no TLS: an https endpoint URL is a TLS terminator in front of the
    instance, always another port of this host when it runs here. Every such instance
    was told at start that it shared its record with another instance. (A plain
    listener stands in for the terminator: the check only opens a TCP connection.)"""
    with socket.socket() as terminator:
        terminator.bind(("127.0.0.1", 0))
        terminator.listen(8)
        port = terminator.getsockname()[1]
        with serving("--service", "web", "--app", "backend:app", "--discovery-url",
                     sqlite_url, "--endpoint-url", f"https://127.0.0.1:{port}") as (proc, _p):
            wait_until(lambda: "registered web" in proc.output()
                       and "serving web" in proc.output(), timeout=15)
            assert "WARNING" not in proc.output(), proc.output()


def test_a_second_instance_on_the_same_port_at_another_address_is_told(sqlite_url):
    """The check compared ports only: a second instance bound to 127.0.0.2 on the first
    one's port, given the first one's endpoint URL (http://127.0.0.1:PORT), was taken for
    the first: no warning, and the two heartbeat one record."""
    with serving("--service", "web", "--app", "backend:app", "--discovery-url", sqlite_url,
                 name="first") as (first, port), \
            serving("--service", "web", "--app", "backend:app", "--discovery-url", sqlite_url,
                    "--bind", f"127.0.0.2:{port}",
                    env={"CLUSTER_ENDPOINT_URL": f"http://127.0.0.1:{port}"},
                    name="second") as (second, _port):
        said = "is another process's port on this host"
        wait_until(lambda: said in second.output(), timeout=15, what="the duplicate warning")
        assert "WARNING" not in first.output(), first.output()


def test_an_endpoint_url_naming_the_bound_address_by_name_says_nothing(sqlite_url):
    """--bind localhost:PORT and the endpoint http://127.0.0.1:PORT: the same listener."""
    with serving("--service", "web", "--app", "backend:app", "--discovery-url", sqlite_url,
                 "--bind", "localhost:0") as (proc, port):
        wait_until(lambda: "registered web" in proc.output()
                   and "serving web" in proc.output(), timeout=15)
        assert "WARNING" not in proc.output(), proc.output()
