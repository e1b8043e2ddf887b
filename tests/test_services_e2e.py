"""Public services, the UI service, the sidecar and cluster.discover(), end to end."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time

import requests

from cluster.records import endpoint_hash
from helpers import (
    ROOT,
    TESTS,
    Proc,
    backend,
    cluster_argv,
    live_endpoints,
    python,
    refused_port,
    start_backend,
    start_serve,
    wait_port,
    wait_until,
)


class Member:
    """A test backend process registered by a `cluster register` sidecar."""

    def __init__(self, discovery_url: str, service: str, name: str) -> None:
        self.server, self.port = start_backend(name)
        self.url = f"http://127.0.0.1:{self.port}"
        self.hash = endpoint_hash(self.url)
        try:
            self.sidecar = Proc(
                cluster_argv("register", "--service", service, "--endpoint-url", self.url,
                             "--health-url", self.url + "/whoami", "--ping-interval", "1",
                             "--expiry-grace", "1"),
                env={"CLUSTER_DISCOVERY_URL": discovery_url}, name=f"sidecar-{name}")
        except BaseException:
            self.server.stop()
            raise

    def stop(self) -> None:
        self.sidecar.stop()
        self.server.stop()


def balancer(discovery_url: str, *args: str) -> tuple[Proc, str]:
    proc, port = start_serve("--ping-interval", "1", "--expiry-grace", "1", *args,
                             env={"CLUSTER_DISCOVERY_URL": discovery_url,
                                  "BACKEND_NAME": "front"},
                             name="balancer")
    return proc, f"http://127.0.0.1:{port}"


def view(url: str) -> dict:
    return requests.get(url + "/_cluster/status", timeout=5).json()


def test_public_services_reachable_internal_ones_refused(mongo_url):
    with contextlib.ExitStack() as stack:
        chat = Member(mongo_url, "chat", "chat1")
        stack.callback(chat.stop)
        billing = Member(mongo_url, "billing", "billing1")
        stack.callback(billing.stop)
        front, url = balancer(mongo_url, "--service", "web", "--app", "backend:app",
                              "--public-services", "chat")
        stack.callback(front.stop)
        wait_until(lambda: len(view(url)["endpoints"]) == 3, timeout=10)
        info = requests.get(url + "/chat/sockjs/info?t=1", timeout=5)
        assert info.status_code == 200
        body = info.json()
        assert body["server"] == "chat1" and body["websocket"] is True
        assert body["base_url"] == f"{url}/cluster-ddp/{chat.hash}/chat"
        session = requests.get(f"{url}/cluster-ddp/{chat.hash}/chat/000/abc/xhr", timeout=5)
        assert (session.status_code, session.text) == (200, "chat1 /sockjs/000/abc/xhr")

        assert requests.get(url + "/billing/sockjs/info", timeout=5).status_code == 403
        refused = requests.get(f"{url}/cluster-ddp/{billing.hash}/billing/0/a/xhr", timeout=5)
        assert refused.status_code == 403 and "billing" in refused.text
        gone = requests.get(f"{url}/cluster-ddp/{'0' * 40}/chat/0/a/xhr", timeout=5)
        assert gone.status_code == 404
        # the instance's own service is reachable as always
        assert requests.get(url + "/whoami", timeout=5).text == "front"


def test_ui_service_is_served_by_proxying(mongo_url):
    ui = Member(mongo_url, "ui", "ui1")
    try:
        api, url = balancer(mongo_url, "--service", "api", "--app", "backend:app",
                            "--ui-service", "ui")
    except BaseException:
        ui.stop()
        raise
    try:
        wait_until(lambda: len(view(url)["endpoints"]) == 2, timeout=10)
        for _ in range(10):
            response = requests.get(url + "/whoami", timeout=5)
            assert response.text == "ui1"
            assert response.cookies.get("cluster-endpoint::ui") in (None, ui.hash)
    finally:
        api.stop()
        ui.stop()


def test_sidecar_keeps_the_record_while_healthy_and_removes_it_on_sigterm(sqlite_url):
    member = Member(sqlite_url, "search", "s1")
    try:
        wait_until(lambda: live_endpoints(sqlite_url) == {member.url}, timeout=10)
        member.server.kill()  # the program dies; its sidecar lives on
        wait_until(lambda: live_endpoints(sqlite_url) == set(), timeout=5,
                   what="record removed after the failed health check")
        assert member.sidecar.poll() is None
        # The program comes back on the port it had (the OS's pick at its first start,
        # bound again by number): the sidecar checks that one address. Only in the
        # restart window could another process take it.
        member.server = Proc(backend(member.port, name="s1"), name="s1")
        wait_port(member.port, proc=member.server)
        wait_until(lambda: live_endpoints(sqlite_url) == {member.url}, timeout=5,
                   what="record back with the program")
        member.sidecar.signal(15)
        assert member.sidecar.wait(10) == 0
        assert live_endpoints(sqlite_url) == set()
    finally:
        member.stop()


def test_sidecar_says_why_its_health_check_fails(sqlite_url):
    """A health URL that never answers (here refused; an https one whose certificate
    requests cannot verify is the same) kept the sidecar silent for good: the endpoint
    never registered, and the reason only at debug level. Now one warning with the
    reason, not one per beat."""
    with refused_port() as dead:
        sidecar = Proc(cluster_argv("register", "--service", "search", "--endpoint-url",
                                    f"http://127.0.0.1:{dead}", "--health-url",
                                    f"http://127.0.0.1:{dead}/health", "--ping-interval",
                                    "0.2"),
                       env={"CLUSTER_DISCOVERY_URL": sqlite_url}, name="sidecar")
        try:
            wait_until(lambda: "health check" in sidecar.output(), timeout=10,
                       what="the sidecar to say why it does not register")
            time.sleep(1)  # five more failed checks
            lines = [line for line in sidecar.output().splitlines() if "health check" in line]
            assert len(lines) == 1 and "WARNING" in lines[0], sidecar.output()
            assert f"127.0.0.1:{dead}/health" in lines[0] and "ConnectionError" in lines[0]
            assert live_endpoints(sqlite_url) == set()
        finally:
            sidecar.stop()
        assert "Traceback" not in sidecar.output()


def test_discover_fails_over_within_one_ping_interval(mongo_url):
    members = [Member(mongo_url, "search", "s1")]
    try:
        members.append(Member(mongo_url, "search", "s2"))
    except BaseException:
        members[0].stop()
        raise
    caller = subprocess.Popen(
        python(str(TESTS / "apps" / "discover_caller.py"), "search"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env={"CLUSTER_DISCOVERY_URL": mongo_url, "CLUSTER_PING_INTERVAL": "1",
             "CLUSTER_EXPIRY_GRACE": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )

    def ask(command: str) -> dict:
        assert caller.stdin and caller.stdout
        caller.stdin.write(command + "\n")
        caller.stdin.flush()
        return json.loads(caller.stdout.readline())

    try:
        wait_until(lambda: live_endpoints(mongo_url) == {m.url for m in members}, timeout=10)
        wait_until(lambda: "base_url" in ask("where"), timeout=10, what="caller sees search")
        first = ask("call")
        assert first["status"] == 200 and first["body"] in ("s1", "s2")
        again = [ask("call") for _ in range(5)]
        assert {a["body"] for a in again} == {first["body"]}, "stays on one endpoint"

        victim = next(m for m in members if m.url == first["base_url"])
        survivor = next(m for m in members if m is not victim)
        victim.server.kill()
        # The very next call after the kill succeeds on the other endpoint: failover is
        # immediate, well within one ping interval, and the caller sees no error.
        after = ask("call")
        assert after == {"status": 200, "body": survivor.server.name,
                         "base_url": survivor.url}
        assert all(ask("call")["body"] == survivor.server.name for _ in range(5))
    finally:
        if caller.poll() is None:
            caller.stdin.write("quit\n")  # type: ignore[union-attr]
            caller.stdin.flush()  # type: ignore[union-attr]
            try:
                caller.wait(10)
            except subprocess.TimeoutExpired:
                caller.kill()
                caller.wait(5)
        caller.stdin.close()  # type: ignore[union-attr]
        caller.stdout.close()  # type: ignore[union-attr]
        for m in members:
            m.stop()
