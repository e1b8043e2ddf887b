"""An --endpoint-url where nothing answers is said once at start, and the instance runs on.

A mistyped port or host in CLUSTER_ENDPOINT_URL registered an address no other
instance could reach, without a word: each of them was refused, ejected it and tried
again. The instance now tries a connection to its own endpoint once it listens and
logs one warning naming the URL and the setting (it keeps serving: an address that
only other hosts can reach, behind NAT, is possible).
"""

from __future__ import annotations

import time

import requests

from helpers import Proc, gunicorn_port, python, refused_port, serving, wait_until

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
