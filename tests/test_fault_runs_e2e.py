"""The fault runs of issue 8 (bench/fault_runs.py) as tests.

CI: a short rolling restart: 3 instances of a gevent-websocket echo app behind two
balancer-only fronts, each instance in turn SIGTERMed and started again on its port at
a 2 s cadence, under a light Python HTTP load through both fronts and with WebSocket
clients connected through the fronts alternately. A graceful stop deregisters, finishes
the requests in flight and closes WebSockets with 1001, so: no failed request, only 1001
closes, every client back in, every message echoed.

Soak (``tox -e soak``, wrk when installed): the three runs at bench length and longer.
"""

from __future__ import annotations

import shutil
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import fault_runs  # noqa: E402


def settings(run: str, *argv: str) -> object:
    return fault_runs.parser().parse_args([run, *argv])


def assert_websockets_survived(outcome: fault_runs.Outcome, codes: set[str]) -> None:
    ws = outcome.ws
    assert ws is not None
    assert set(ws.closes) <= codes, f"closes by code: {ws.closes_text()}"
    assert ws.connected_at_end == ws.clients, \
        f"{ws.clients - ws.connected_at_end} clients never got back in: {dict(ws.errors)}"
    assert ws.sent > ws.clients and ws.lost == 0 and ws.wrong == 0, \
        f"sent {ws.sent}, echoed {ws.echoed}, wrong echoes {ws.wrong}"


@pytest.mark.soak  # 11 s; tests/test_rolling_deploy_e2e.py keeps a rolling deploy in CI
@pytest.mark.timeout(90)
def test_rolling_restart_with_websockets_through_two_fronts() -> None:
    outcome = fault_runs.rolling(settings("rolling", "--http", "python", "--ws-clients", "12",
                                          "--settle", "1", "--tail", "2"))
    print(fault_runs.row(outcome))
    assert outcome.notes["restarts"] == 3
    assert outcome.http_requests > 100 and outcome.http_failed == 0, outcome.http_failures
    assert_websockets_survived(outcome, {"1001"})
    assert outcome.ws is not None and outcome.ws.closes["1001"] > 0  # the stops were seen
    assert outcome.tracebacks == [], "\n".join(outcome.tracebacks)


HTTP = "wrk" if shutil.which("wrk") else "python"


@pytest.mark.soak
@pytest.mark.timeout(600)
def test_soak_rolling_restarts() -> None:
    outcome = fault_runs.rolling(settings("rolling", "--http", HTTP, "--rounds", "10"))
    print(fault_runs.row(outcome))
    assert outcome.http_failed == 0, outcome.http_failures
    assert_websockets_survived(outcome, {"1001"})
    assert outcome.tracebacks == [], "\n".join(outcome.tracebacks)


@pytest.mark.soak
@pytest.mark.timeout(300)
def test_soak_sigkill_loses_only_requests_in_flight() -> None:
    outcome = fault_runs.kill(settings("kill", "--http", HTTP, "--settle", "10",
                                       "--tail", "10"))
    print(fault_runs.row(outcome))
    assert outcome.http_failed <= outcome.notes["in-flight bound"], outcome.http_failures
    # tunnels to the killed instance end without a close frame; the clients come back
    assert_websockets_survived(outcome, {"1001", "1006"})
    assert outcome.tracebacks == [], "\n".join(outcome.tracebacks)


@pytest.mark.soak
@pytest.mark.timeout(600)
def test_soak_store_down_for_a_minute() -> None:
    outcome = fault_runs.store(settings("store", "--http", HTTP, "--tail", "20"))
    print(fault_runs.row(outcome))
    assert outcome.http_failed == 0, outcome.http_failures
    assert outcome.notes["saw the outage"].startswith("4 of 4")
    assert outcome.tracebacks == [], "\n".join(outcome.tracebacks)
