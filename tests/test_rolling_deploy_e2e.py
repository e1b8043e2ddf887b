"""scripts/rolling-deploy upgrades three instances under HTTP load with no failed request.

Three instances of version 1 (each with a --pid-file slot) behind a balancer-only front,
FerretDB as the store; the script replaces them one by one with version 2 (start the
new one, wait until it is in the table, drain the old one, wait for it to exit). Echo
WebSocket clients connected through the front see only 1001 closes, get back in, and
lose no message (bench/faultload.py's clients).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from cluster.cli import process_alive
from drainload import HttpLoad
from helpers import ROOT, start_serve, status_json, wait_until

sys.path.insert(0, str(ROOT / "bench"))
from faultload import WsFleet  # noqa: E402

TIMEOUT = 15
INSTANCE = ("--service", "web", "--app", "gws_echo:app", "--ping-interval", "1",
            "--expiry-grace", "1", "--drain-seconds", "1", "--drain-close-seconds", "0.5")


def _stop_pid(pid: int) -> None:
    """Stop a process the script started (not our child): SIGTERM, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if process_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(60)
def test_rolling_deploy_of_three_instances_under_load(mongo_url: str, tmp_path: Path) -> None:
    env = {"CLUSTER_DISCOVERY_URL": mongo_url}
    slots = [str(tmp_path / f"web-{i}.pid") for i in range(3)]
    old = []
    new_pids: list[int] = []
    fleet: WsFleet | None = None
    try:
        for i, pid_file in enumerate(slots):
            proc, _ = start_serve(*INSTANCE, "--app-version", "1", "--pid-file", pid_file,
                                  env={**env, "BACKEND_NAME": "v1"}, name=f"v1-{i}")
            old.append(proc)
        front, front_port = start_serve("--ui-service", "web", "--ping-interval", "1",
                                        "--expiry-grace", "1", env=env, name="front")
        old.append(front)
        wait_until(lambda: len(requests.get(f"http://127.0.0.1:{front_port}/_cluster/status",
                                            timeout=5).json()["endpoints"]) == 3,
                   timeout=TIMEOUT, what="the front to see the three instances")
        fleet = WsFleet([f"ws://127.0.0.1:{front_port}/"], 6)
        fleet.start(timeout=TIMEOUT)
        with HttpLoad(front_port, clients=3) as load:
            time.sleep(0.5)
            deploy = subprocess.run(
                [sys.executable, str(ROOT / "scripts" / "rolling-deploy"), "--service", "web",
                 *[arg for slot in slots for arg in ("--pid-file", slot)], "--timeout", "20",
                 "--", sys.executable, "-m", "cluster", "serve", *INSTANCE, "--bind",
                 "127.0.0.1:0", "--app-version", "2", "--pid-file", "{pid_file}"],
                env={**os.environ, **env, "BACKEND_NAME": "v2",
                     "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "apps")])},
                cwd=ROOT, capture_output=True, text=True, timeout=45)
            new_pids = [int(Path(slot).read_text()) for slot in slots if Path(slot).exists()]
            assert deploy.returncode == 0, deploy.stdout + deploy.stderr
            time.sleep(0.5)
            tail = time.monotonic()
            time.sleep(0.5)
        ws = fleet.finish(timeout=TIMEOUT)
        assert load.stats.failed == 0, load.stats.failures
        assert set(ws.closes) == {"1001"}, ws.closes_text()  # each old socket went away
        assert ws.connected_at_end == 6 and ws.lost == 0 and ws.wrong == 0, \
            (ws.connected_at_end, ws.sent, ws.echoed, dict(ws.errors))
        assert load.stats.requests > 100
        assert load.stats.by(tail) and set(load.stats.by(tail)) == {"v2"}
        assert "done: 3 instances upgraded" in deploy.stdout
        for proc in old[:3]:
            assert proc.wait(TIMEOUT) == 0  # each drained and stopped by itself
        assert sorted(new_pids) != sorted(p.pid for p in old[:3]) and len(new_pids) == 3
        rows = [r for r in status_json(mongo_url)["endpoints"] if r["healthy"]]
        assert len(rows) == 3 and {r["version"] for r in rows} == {"2"}
    finally:
        if fleet is not None:
            fleet.stop.set()
        started = {p.pid for p in old}
        for slot in slots:  # whatever the script started, even if it failed half-way
            text = Path(slot).read_text().strip() if Path(slot).exists() else ""
            if text.isdigit() and int(text) not in started:
                _stop_pid(int(text))
        for proc in old:
            proc.stop()
    for proc in old:
        assert "Traceback" not in proc.output(), proc.output()
