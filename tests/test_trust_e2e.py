"""Trust at the front door, driven from an outside address or by a misbehaving endpoint.

127.0.0.2 is a loopback address that is not in --trusted-proxies (127.0.0.1, ::1) and
is no endpoint's address: it plays the outside client. Every instance is a real
`cluster serve` process on ports the OS chose (--bind 127.0.0.1:0 --port-file).
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import time
from pathlib import Path
from typing import Iterator

import pytest

from helpers import Proc, cluster_argv, start_app, start_serve, wait_until

OUTSIDE = "127.0.0.2"
SECRET = "correct horse battery staple"
TIMEOUT = 15


def serve(stops: contextlib.ExitStack, name: str, discovery: str, *args: str,
          env: dict | None = None) -> tuple[Proc, int]:
    """Start `cluster serve` on a port of the OS's choosing; return it and its port.

    ``stops`` stops it by PID when its block ends, so a later start that fails still
    stops this one.
    """
    proc, port = start_serve("--ping-interval", "1", "--expiry-grace", "1", *args,
                             env={"CLUSTER_DISCOVERY_URL": discovery, "BACKEND_NAME": name,
                                  **(env or {})},
                             name=name)
    stops.callback(proc.stop)
    return proc, port


def raw_get(port: int, path: str, headers: tuple[str, ...] = (), source: str = OUTSIDE,
            host: str = "app.example") -> tuple[int, dict[str, str], bytes]:
    """One GET over a fresh connection from ``source``: (status, headers, body)."""
    with socket.socket() as sock:
        sock.bind((source, 0))
        sock.settimeout(TIMEOUT)
        sock.connect(("127.0.0.1", port))
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Connection: close", *headers]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    first, *rest = head.decode("latin-1").split("\r\n")
    fields: dict[str, str] = {}
    for line in rest:  # repeated fields joined, so a second Set-Cookie is seen too
        name, _, value = line.partition(":")
        key = name.strip().lower()
        fields[key] = f"{fields[key]}, {value.strip()}" if key in fields else value.strip()
    return int(first.split(" ")[1]), fields, body


@contextlib.contextmanager
def web_and_api(tmp: Path, *extra: str) -> Iterator[tuple[int, int, str]]:
    """Service `web` (backend app "web") and service `api` (backend app "api") whose
    UI service is `web`: a client of api's instance is proxied to web."""
    discovery = f"sqlite://{tmp / 'discovery.sqlite3'}"
    with contextlib.ExitStack() as stops:  # api stopped first, then web
        _, web_port = serve(stops, "web", discovery, "--service", "web", "--app",
                            "backend:app", *extra)
        _, api_port = serve(stops, "api", discovery, "--service", "api", "--ui-service",
                            "web", "--app", "backend:app", *extra)
        wait_until(lambda: raw_get(api_port, "/whoami", source="127.0.0.1")[2] == b"web",
                   timeout=TIMEOUT, what="api's instance to see web")
        yield web_port, api_port, discovery


@pytest.mark.parametrize("extra", [(), ("--secret", SECRET)], ids=["by-address", "signed"])
def test_forged_hop_marker_is_ignored(tmp_path: Path, extra: tuple[str, ...]) -> None:
    with web_and_api(tmp_path, *extra) as (_web, api_port, _):
        for marker in ("1", f"{int(time.time())}.{'0' * 64}", "999.x"):
            status, _, body = raw_get(api_port, "/whoami", (f"X-Cluster-Hop: {marker}",))
            # routed like any request (to web), not served by api's own app
            assert (status, body) == (200, b"web"), marker
        if extra:
            # with a secret even a trusted address needs a valid signature
            status, _, body = raw_get(api_port, "/whoami", ("X-Cluster-Hop: 1",),
                                      source="127.0.0.1")
            assert body == b"web"
        else:
            # without one the marker is honoured from a trusted address, as between members
            status, _, body = raw_get(api_port, "/whoami", ("X-Cluster-Hop: 1",),
                                      source="127.0.0.1")
            assert body == b"api"
        # and no app ever sees a marker, forged or not
        _, _, body = raw_get(api_port, "/headers", ("X-Cluster-Hop: 1",))
        assert "X-Cluster-Hop" not in json.loads(body)["headers"]


def test_status_page_is_for_trusted_peers_and_never_through_a_hop(tmp_path: Path) -> None:
    with web_and_api(tmp_path) as (web_port, api_port, _):
        status, fields, body = raw_get(web_port, "/_cluster/status", source="127.0.0.1")
        assert status == 200 and "endpoints" in json.loads(body)
        # from outside: an ordinary request for the app (the backend has no such page)
        status, _, body = raw_get(web_port, "/_cluster/status")
        assert status == 404 and b"endpoints" not in body
        # proxied once (api -> web): web sees a member's marker, serves its app
        status, _, body = raw_get(api_port, "/_cluster/status")
        assert status == 404 and b"endpoints" not in body


def test_forwarded_headers_from_outside_are_replaced(tmp_path: Path) -> None:
    with web_and_api(tmp_path) as (_web, api_port, _):
        status, _, body = raw_get(api_port, "/headers", (
            "X-Forwarded-For: 203.0.113.9", "X-Forwarded-Proto: javascript",
            "X-Forwarded-Host: evil.example", "Forwarded: for=203.0.113.9",
            "X-Real-IP: 203.0.113.9", "Proxy: http://evil.example:1"))
        seen = json.loads(body)["headers"]
        assert status == 200 and json.loads(body)["name"] == "web"
        assert seen["X-Forwarded-For"] == OUTSIDE
        assert seen["X-Real-Ip"] == OUTSIDE
        assert seen["X-Forwarded-Proto"] == "http"
        assert seen["X-Forwarded-Host"] == "app.example"
        assert "Forwarded" not in seen and "Proxy" not in seen
        # a trusted proxy's claims are kept, its scheme validated
        _, _, body = raw_get(api_port, "/headers", (
            "X-Forwarded-For: 203.0.113.9", "X-Forwarded-Proto: javascript"),
            source="127.0.0.1")
        seen = json.loads(body)["headers"]
        assert seen["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"
        assert seen["X-Forwarded-Proto"] == "http"


def test_a_trusted_network_is_trusted_for_forwarded_headers_too(tmp_path: Path) -> None:
    """--trusted-proxies 127.0.0.0/8 (a network, as the README shows) opened the admin
    pages but the forwarded headers compared the peer as a string: a proxy in the
    network had its X-Forwarded-For replaced, by the local app and by a balancer."""
    with web_and_api(tmp_path, "--trusted-proxies", "127.0.0.0/8") as (web_port, api_port,
                                                                        _):
        claims = ("X-Forwarded-For: 203.0.113.9", "X-Forwarded-Proto: https")
        # OUTSIDE (127.0.0.2) is in the network: the local app sees its claims
        _, _, body = raw_get(web_port, "/headers", claims)
        seen = json.loads(body)["headers"]
        assert json.loads(body)["name"] == "web"
        assert seen["X-Forwarded-For"] == "203.0.113.9", seen
        assert seen["X-Forwarded-Proto"] == "https", seen
        # and a balancer keeps them, adding the peer it saw
        _, _, body = raw_get(api_port, "/headers", claims)
        seen = json.loads(body)["headers"]
        assert json.loads(body)["name"] == "web"
        assert seen["X-Forwarded-For"] == f"203.0.113.9, {OUTSIDE}", seen
        assert seen["X-Forwarded-Proto"] == "https", seen


@pytest.mark.parametrize("extra", [(), ("--secret", SECRET)], ids=["by-address", "signed"])
def test_a_member_relaying_keeps_the_clients_address_for_the_app(
        tmp_path: Path, extra: tuple[str, ...]) -> None:
    """Across hosts the members are not in each other's --trusted-proxies (loopback
    only, by default): the app behind a relay lost X-Forwarded-For and X-Real-IP, and
    saw only the balancer's address. A request whose hop marker proves membership
    (signed, or from an endpoint's address) keeps the fields the member set."""
    with web_and_api(tmp_path, "--trusted-proxies", "192.0.2.1", *extra) as (_, api_port, _):
        _, _, body = raw_get(api_port, "/headers", ("X-Forwarded-For: 203.0.113.9",))
        answer = json.loads(body)
        seen = answer["headers"]
        assert answer["name"] == "web"
        assert seen.get("X-Forwarded-For") == OUTSIDE, seen  # the client's claim replaced
        assert seen.get("X-Real-Ip") == OUTSIDE, seen
        assert seen.get("X-Forwarded-Proto") == "http", seen
        assert "X-Cluster-Hop" not in seen


def test_sockjs_base_url_takes_no_scheme_but_http_or_https(tmp_path: Path) -> None:
    with web_and_api(tmp_path) as (web_port, _api, _):
        _, _, body = raw_get(web_port, "/sockjs/info", ("X-Forwarded-Proto: javascript",),
                             source="127.0.0.1")
        assert json.loads(body)["base_url"].startswith("http://")
        _, _, body = raw_get(web_port, "/sockjs/info", ("X-Forwarded-Proto: https",),
                             source="127.0.0.1")
        assert json.loads(body)["base_url"].startswith("https://")


@contextlib.contextmanager
def behind_balancer(tmp: Path, *extra: str) -> Iterator[tuple[int, Proc, Proc, Proc]]:
    """The misbehaving endpoint registered as service `bad`, a balancer in front:
    (the balancer's port, the endpoint, its sidecar, the balancer)."""
    discovery = f"sqlite://{tmp / 'discovery.sqlite3'}"
    with contextlib.ExitStack() as stops:  # stopped front first, endpoint last
        endpoint, port = start_app("bad_endpoint.py", name="bad-endpoint")
        stops.callback(endpoint.stop)
        sidecar = Proc(cluster_argv("register", "--service", "bad", "--endpoint-url",
                                    f"http://127.0.0.1:{port}", "--ping-interval", "1"),
                       env={"CLUSTER_DISCOVERY_URL": discovery}, name="sidecar")
        stops.callback(sidecar.stop)
        front, front_port = serve(stops, "front", discovery, "--ui-service", "bad", *extra)
        wait_until(lambda: raw_get(front_port, "/ok", source="127.0.0.1")[0] == 200,
                   timeout=TIMEOUT, what="the balancer to see the endpoint")
        yield front_port, endpoint, sidecar, front
    assert "Traceback" not in front.output(), front.output()


@pytest.mark.parametrize("script", ["/extra", "/nocontent"])
def test_bytes_after_a_response_never_reach_another_client(tmp_path: Path,
                                                          script: str) -> None:
    with behind_balancer(tmp_path) as (port, endpoint, _, _):
        for _ in range(5):
            status, fields, body = raw_get(port, script)
            assert (status, body) in ((200, b"ok"), (204, b"")), (status, body)
            assert "stolen" not in fields.get("set-cookie", "")
            time.sleep(0.4)  # the stray bytes are in the pooled connection by now
            status, fields, body = raw_get(port, "/ok")
            assert (status, body) == (200, b"ok"), (status, fields, body)
            assert "stolen" not in fields.get("set-cookie", "")


def test_malformed_answer_to_a_get_is_502_not_503(tmp_path: Path) -> None:
    with behind_balancer(tmp_path) as (port, _, _, _):
        status, _, body = raw_get(port, "/garbage")
        assert status == 502, body


def test_pooled_connections_of_departed_endpoints_are_closed(tmp_path: Path) -> None:
    with behind_balancer(tmp_path) as (port, endpoint, sidecar, _):
        raw_get(port, "/ok")  # leaves one idle pooled connection to the endpoint
        assert "closed-by-peer" not in endpoint.output()
        sidecar.stop()  # deregisters: the endpoint leaves the table
        wait_until(lambda: "closed-by-peer" in endpoint.output(), timeout=10,
                   what="the balancer to close its pooled connection")


@pytest.mark.parametrize("script", ["/hold", "/hold-body"])
def test_a_client_that_leaves_ends_its_wait_for_the_endpoint(tmp_path: Path,
                                                              script: str) -> None:
    """A long poll whose browser left (a closed tab): its endpoint connection is closed,
    as nginx does, instead of held until the endpoint answers; and a stop right after
    has no request left to wait for (it waited out its whole drain, 10 s)."""
    with behind_balancer(tmp_path) as (port, endpoint, _, front):
        # Half-closed after sending, an answer within a second still comes, whenever
        # the once-a-second check falls (nginx would cut it): three tries, each 0.6 s.
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
                sock.sendall(b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n")
                sock.shutdown(socket.SHUT_WR)
                assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        client = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        client.sendall(f"GET {script} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        wait_until(lambda: "holding" in endpoint.output(), timeout=TIMEOUT,
                   what="the request at the endpoint")
        client.close()
        wait_until(lambda: "closed-by-peer" in endpoint.output().partition("holding")[2],
                   timeout=5, what="the balancer to close the endpoint connection")
        assert raw_get(port, "/ok")[0] == 200  # and it serves on
        front.signal(signal.SIGTERM)
        assert front.wait(5) == 0, front.output()


def test_client_that_stops_reading_is_cut_and_its_upstream_released(tmp_path: Path) -> None:
    discovery = f"sqlite://{tmp_path / 'discovery.sqlite3'}"
    with contextlib.ExitStack() as stops:  # front stopped first, then web
        serve(stops, "web", discovery, "--service", "web", "--app", "backend:app")
        front, front_port = serve(stops, "front", discovery, "--ui-service", "web",
                                  "--write-timeout", "1")
        wait_until(lambda: raw_get(front_port, "/whoami")[2] == b"web", timeout=TIMEOUT,
                   what="the balancer to see web")
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", front_port))
            sock.sendall(b"GET /download?size=268435456 HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(3)  # never read: the balancer's sends stall past --write-timeout
            sock.settimeout(TIMEOUT)
            got = 0
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(1 << 20):
                    got += len(chunk)
            assert got < 256 << 20  # cut, not delivered in full
        # the balancer still serves, and said nothing louder than a line
        assert raw_get(front_port, "/whoami")[2] == b"web"
    assert "Traceback" not in front.output(), front.output()


def test_client_aborts_leave_no_traceback(tmp_path: Path) -> None:
    discovery = f"sqlite://{tmp_path / 'discovery.sqlite3'}"
    with contextlib.ExitStack() as stops:  # front stopped first, then web
        web, _ = serve(stops, "web", discovery, "--service", "web", "--app", "backend:app")
        front, front_port = serve(stops, "front", discovery, "--ui-service", "web")
        wait_until(lambda: raw_get(front_port, "/whoami")[2] == b"web", timeout=TIMEOUT,
                   what="the balancer to see web")
        for path in ("/slow?seconds=0.5", "/download?size=33554432", "/whoami") * 20:
            sock = socket.create_connection(("127.0.0.1", front_port))
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            sock.close()  # RST mid-request
        time.sleep(1.5)
        assert raw_get(front_port, "/whoami")[2] == b"web"
    for proc in (front, web):
        assert "Traceback" not in proc.output(), proc.output()
