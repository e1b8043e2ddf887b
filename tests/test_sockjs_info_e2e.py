"""A balancer's /sockjs/info answers as the SockJS server behind it does.

Browsers on another origin read the info answer only with the server's CORS fields
(stock sockjs-client sends its XHRs with credentials: ``Access-Control-Allow-Origin``
must name the origin, ``Access-Control-Allow-Credentials: true``) and preflight with
OPTIONS. The balancer asks the endpoint with the client's own fields and passes on its
status and fields, rewriting only ``base_url``; every other method gets the endpoint's
own answer. Checked against a real SockJS server (node's ``sockjs``) through the front
door and through ``cluster.wrap()``, and against a local app answering info itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
from typing import Iterator

import pytest
import requests

from helpers import (
    Proc,
    cluster_argv,
    read_until_close,
    start_balancers,
    start_instance,
    start_library_app,
    start_reporting,
    wait_until,
)
from test_sockjs_e2e import NODE, SOCKJS, require_node_packages

ORIGIN = "http://app.example"
ASKED = {"Origin": ORIGIN, "Access-Control-Request-Method": "GET",
         "Access-Control-Request-Headers": "x-requested-with", "Cookie": "JSESSIONID=abc"}
#: what a browser's CORS check, and a client's method handling, read
COMPARED = ("Access-Control-Allow-Origin", "Access-Control-Allow-Credentials", "Vary",
            "Access-Control-Allow-Methods", "Access-Control-Allow-Headers",
            "Access-Control-Max-Age", "Allow", "Set-Cookie")
COMMON = {"CLUSTER_PING_INTERVAL": "1", "CLUSTER_EXPIRY_GRACE": "1"}


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def table(base: str) -> set[str]:
    status = requests.get(base + "/_cluster/status", timeout=5).json()
    return {e["endpoint"] for e in status["endpoints"] if e["service"] == "web"}


def ask(base: str, method: str) -> requests.Response:
    return requests.request(method, base + "/sockjs/info?t=1", headers=ASKED, timeout=10,
                            allow_redirects=False)


def check_like(direct: requests.Response, through: requests.Response, where: str) -> None:
    """``through`` carries ``direct``'s status and CORS fields."""
    assert through.status_code == direct.status_code, (where, through.text)
    for name in COMPARED:
        assert through.headers.get(name) == direct.headers.get(name), (where, name)


@contextlib.contextmanager
def sockjs_behind_balancers(store: str) -> Iterator[tuple[str, list[str]]]:
    """One node SockJS server of service ``web`` (kept in discovery by a sidecar), a
    balancer-only `cluster serve` and a `cluster.wrap()` app of another service whose
    UI service is ``web``: (the server's URL, [door URL, library URL])."""
    require_node_packages()
    procs: list[Proc] = []
    try:
        server, port = start_reporting(
            lambda port_file: [NODE, str(SOCKJS / "server.js"), "--port", "0",
                               "--port-file", str(port_file), "--name", "s1"],
            name="sockjs-s1")
        procs.append(server)
        url = f"http://127.0.0.1:{port}"
        procs.append(Proc(cluster_argv("register", "--service", "web", "--endpoint-url", url,
                                       "--health-url", url + "/sockjs/info",
                                       "--ping-interval", "1"),
                          env={"CLUSTER_DISCOVERY_URL": store}, name="sidecar"))
        door_port, library_port = start_balancers(store, "web", COMMON, procs)
        balancers = [f"http://127.0.0.1:{door_port}", f"http://127.0.0.1:{library_port}"]
        wait_until(lambda: all(table(b) == {url} for b in balancers), timeout=30,
                   what="both balancers see the SockJS server")
        yield url, balancers
    finally:
        for proc in reversed(procs):
            proc.stop()


def test_info_through_door_and_library_answers_as_the_sockjs_server(sqlite_url):
    with sockjs_behind_balancers(sqlite_url) as (server, balancers):
        for method in ("GET", "OPTIONS", "POST", "DELETE", "HEAD"):
            direct = ask(server, method)
            assert direct.status_code == {"GET": 200, "OPTIONS": 204}.get(method, 405)
            for balancer in balancers:
                through = ask(balancer, method)
                check_like(direct, through, f"{method} {balancer}")
        raw = ask(server, "GET").json()
        for balancer in balancers:
            answer = ask(balancer, "GET")
            assert answer.headers["Access-Control-Allow-Origin"] == ORIGIN
            assert answer.headers["Content-Type"].startswith("application/json")
            info = answer.json()
            assert {k: v for k, v in info.items() if k not in ("entropy", "base_url")} == \
                {k: v for k, v in raw.items() if k != "entropy"}
            assert re.fullmatch(rf"http://127\.0\.0\.1:\d+/cluster-ddp/{sha1(server)}/web",
                                info["base_url"]), info
        # HTTP/1.0 may send no Host: the address the request came in on stands for it
        # (the door handed out "http:///cluster-ddp/...")
        door = balancers[0]
        with socket.create_connection(("127.0.0.1", int(door.rsplit(":", 1)[1])),
                                      timeout=10) as sock:
            sock.sendall(b"GET /sockjs/info HTTP/1.0\r\n\r\n")
            data, _ = read_until_close(sock, 10)
        info = json.loads(data.partition(b"\r\n\r\n")[2])
        assert info["base_url"].startswith(f"{door}/cluster-ddp/{sha1(server)}/"), info


@pytest.mark.parametrize("mode", ["door", "library"])
def test_info_of_the_local_app_keeps_its_fields(mode, sqlite_url):
    """The chosen endpoint is this instance: its app's own answer, fields and all."""
    if mode == "door":
        proc, port = start_instance(sqlite_url, "solo")
    else:
        proc, port = start_library_app(
            {"CLUSTER_DISCOVERY_URL": sqlite_url, "BACKEND_NAME": "solo", **COMMON},
            "backend:app")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: table(base), timeout=20, what="the instance in its table")
        answer = ask(base, "GET")
        assert answer.status_code == 200, answer.text
        assert answer.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert answer.headers["Access-Control-Allow-Credentials"] == "true"
        assert answer.headers["X-Served-By"] == "solo"
        assert answer.json()["base_url"].endswith("/web")
        # a bodiless answer passes with its own fields and nothing added (RFC 9110 8.6)
        cached = requests.get(base + "/sockjs/info", timeout=10,
                              headers={"Origin": ORIGIN, "If-None-Match": '"info"'})
        assert (cached.status_code, cached.headers.get("ETag")) == (304, '"info"')
        assert "Content-Type" not in cached.headers, cached.headers
        assert "Content-Length" not in cached.headers, cached.headers
        preflight = ask(base, "OPTIONS")
        assert preflight.status_code == 204
        assert preflight.headers["Access-Control-Allow-Methods"] == "OPTIONS, GET"
        assert ask(base, "POST").status_code == 405
    finally:
        proc.stop()
