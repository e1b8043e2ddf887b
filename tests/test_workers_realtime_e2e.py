"""Socket.IO sessions stay in one process, under each way of running several.

Three ways, each with real processes: two ``cluster serve`` instances, ``cluster serve
--workers-count 2`` and gunicorn ``-w 2`` with ``cluster.gunicorn``. Against each,
three real clients: python-socketio with long-polling only, python-socketio with its
default transports (polling, then the upgrade to WebSocket) and node's
socket.io-client with ``withCredentials: true``. Every session sends 50 echoes; the
app answers each with its pid, so one session must see one pid, and no process may
print engineio's "Invalid session" (a request of a session that reached a process
not holding it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import requests
import requests.adapters
import socketio

from helpers import ROOT, Proc, gunicorn_port, python, start_serve, status_json, wait_until

SOCKETIO = ROOT / "tests" / "sio"
ECHOES = 50
SESSIONS = 3
RUNNERS = ["two-instances", "workers", "gunicorn"]


def app_env(discovery_url: str) -> dict[str, str]:
    return {"CLUSTER_DISCOVERY_URL": discovery_url,
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(SOCKETIO)])}


def start(runner: str, discovery_url: str, tmp: Path, procs: list[Proc]) -> list[int]:
    """Start the processes of ``runner``, each on a port the OS picks, into ``procs``
    (the caller stops them, also those started before one fails to start); return
    their public ports, listening. Clients use the first one."""
    env = app_env(discovery_url)
    common = ["--service", "chat", "--app", "sio_app:app", "--ping-interval", "1",
              "--expiry-grace", "1"]
    ports: list[int] = []
    if runner == "two-instances":
        for index in range(2):
            proc, port = start_serve(*common, env=env, name=f"sio-{index}", timeout=30)
            procs.append(proc)
            ports.append(port)
    elif runner == "workers":
        proc, port = start_serve(*common, "--workers-count", "2", env=env, name=runner,
                                 timeout=30)
        procs.append(proc)
        ports.append(port)
    else:
        env.update(CLUSTER_SERVICE="chat", CLUSTER_PING_INTERVAL="1", CLUSTER_EXPIRY_GRACE="1")
        proc = Proc(python("-m", "gunicorn", "-c", "python:cluster.gunicorn", "-w", "2",
                           "-b", "127.0.0.1:0", "--graceful-timeout", "3",
                           "--control-socket", str(tmp / "gunicorn.ctl"), "sio_app:app"),
                    env=env, name=runner)
        procs.append(proc)
        ports.append(gunicorn_port(proc, timeout=30))
    return ports


@pytest.fixture(scope="module", params=RUNNERS)
def cluster_of(request, tmp_path_factory) -> Iterator[tuple[str, list[Proc]]]:
    tmp = tmp_path_factory.mktemp(request.param)
    discovery_url = f"sqlite://{tmp / 'discovery.sqlite3'}"
    records = 2  # two instances, two workers: a record each
    procs: list[Proc] = []
    try:
        ports = start(request.param, discovery_url, tmp, procs)
        url = f"http://127.0.0.1:{ports[0]}"
        wait_until(lambda: len([r for r in status_json(discovery_url)["endpoints"]
                                if r["healthy"]]) == records, timeout=20,
                   what=f"{records} records")
        if len(ports) > 1:  # separate instances: each has read the other's record
            wait_until(lambda: all(len(requests.get(f"http://127.0.0.1:{p}"
                                                    "/_cluster/status", timeout=5)
                                       .json()["endpoints"]) == records for p in ports),
                       timeout=10, what="every instance sees every other")
        yield url, procs
    finally:
        for proc in procs:
            proc.stop()
    for proc in procs:
        output = proc.output()
        assert "Invalid session" not in output, output[-3000:]
        assert "Traceback" not in output, output[-3000:]


class OneConnectionPerRequest(requests.adapters.HTTPAdapter):
    """Reads each response whole, then closes the idle pooled connections: the next
    request opens a new connection (without a ``Connection: close`` request header,
    which servers need not echo and clients then race on)."""

    def send(self, request, **kwargs):
        response = super().send(request, **kwargs)
        response.content  # noqa: B018 - read the body so the connection goes back idle
        self.poolmanager.clear()
        return response


def python_session(url: str, transports: list[str] | None,
                   fresh_connections: bool = False) -> tuple[list[int], str]:
    """One python-socketio session: the pids that answered, the transport at the end.

    With ``fresh_connections`` every HTTP request goes on a new connection, so the
    kernel hands about half of a session's polls to a process that does not hold it:
    the relay to the right one is exercised on every session, not left to chance.
    """
    http = requests.Session()
    if fresh_connections:
        http.mount("http://", OneConnectionPerRequest())
    client = socketio.Client(reconnection=False, http_session=http)
    client.connect(url, transports=transports, wait_timeout=10)
    try:
        pids = []
        for i in range(ECHOES):
            answer = client.call("echo", f"m{i}", timeout=10)
            assert answer["data"] == f"m{i}"
            pids.append(answer["pid"])
            if i == 0 and transports is None:
                wait_until(lambda: client.transport() == "websocket", timeout=5,
                           what="the upgrade to websocket")
        return pids, client.transport()
    finally:
        client.disconnect()


def node_session(url: str, mode: str) -> dict:
    if not (SOCKETIO / "node_modules" / "socket.io-client").is_dir() or not shutil.which("node"):
        pytest.fail(f"node or socket.io-client is missing: run `npm ci --no-audit --no-fund` "
                    f"in {SOCKETIO} (scripts/run-tests does)")
    done = subprocess.run(["node", str(SOCKETIO / "client.js"), url, mode, str(ECHOES)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_python_client_long_polling_stays_in_one_process(cluster_of):
    url, _ = cluster_of
    seen = set()
    for _ in range(SESSIONS):
        pids, transport = python_session(url, ["polling"], fresh_connections=True)
        assert len(pids) == ECHOES and len(set(pids)) == 1, pids
        assert transport == "polling"
        seen |= set(pids)
    assert seen  # every session answered


def test_python_client_upgrades_to_websocket_in_the_same_process(cluster_of):
    url, _ = cluster_of
    for _ in range(SESSIONS):
        pids, transport = python_session(url, None)
        assert len(pids) == ECHOES and len(set(pids)) == 1, pids
        assert transport == "websocket"


@pytest.mark.parametrize("mode", ["polling", "default"])
def test_node_client_with_credentials_stays_in_one_process(cluster_of, mode):
    url, _ = cluster_of
    for _ in range(SESSIONS):
        result = node_session(url, mode)
        assert result["error"] is None, result
        assert len(result["pids"]) == ECHOES and len(set(result["pids"])) == 1, result
        if mode == "default":
            assert result["first"] == "polling" and result["upgraded"], result
            assert result["transport"] == "websocket", result
        else:
            assert result["transport"] == "polling", result
