"""WebSocket apps served by `cluster serve` itself: the front door hands them the socket.

Each app runs as two `cluster serve --app ...` instances (``a`` and ``b``) of one service
sharing a discovery store. The sticky cookie ``cluster-endpoint::<service>=<hash>`` picks
the instance: pinned to the instance the client connects to, the upgrade is served
locally (the door gives the app ``environ['wsgi.websocket']``); pinned to the other one,
it is tunnelled there and served locally by that instance. The apps answer with their
instance name, so each test knows who served it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Iterator

import pytest
import requests
import socketio
import websocket
from websocket import ABNF

from helpers import (
    Proc,
    read_until_close,
    start_library_app,
    start_serve,
    wait_until,
)

COMMON = ("--ping-interval", "1", "--expiry-grace", "1")


class Cluster:
    """Instances ``a`` and ``b`` of ``service`` and a balancer-only ``front``."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.procs: list[Proc] = []
        self.ports: dict[str, int] = {}
        self.hashes: dict[str, str] = {}

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def cookie(self, name: str) -> str:
        return f"cluster-endpoint::{self.service}={self.hashes[name]}"


def view(base: str) -> dict:
    return requests.get(base + "/_cluster/status", timeout=5).json()


def start_wrapped(app: str, service: str, store: str, name: str,
                  env: dict[str, str] | None = None) -> tuple[Proc, int]:
    """tests/apps/library_app.py: ``app`` made a member of ``service`` by cluster.wrap()
    under a plain gevent WSGIServer with ClusterHandler (library mode under a server of
    one's own, not the front door); more CLUSTER_* settings in ``env``."""
    return start_library_app(
        {"CLUSTER_DISCOVERY_URL": store, "BACKEND_NAME": name, "CLUSTER_SERVICE": service,
         "CLUSTER_PING_INTERVAL": "1", "CLUSTER_EXPIRY_GRACE": "1", **(env or {})}, app,
        name=f"{service}-{name}")


@contextlib.contextmanager
def cluster_of(app: str, service: str, store: str, *extra: str,
               wrapped: bool = False, env: dict[str, str] | None = None,
               app_fails: bool = False) -> Iterator[Cluster]:
    """Two instances serving ``app`` (with ``extra`` settings, or CLUSTER_* ones in
    ``env``; ``wrapped``: through :func:`start_wrapped`) and a balancer-only front, all
    stopped by PID. None may log a traceback, unless ``app_fails`` (the app's own)."""
    cluster = Cluster(service)
    try:
        for name in ("a", "b"):
            if wrapped:
                proc, port = start_wrapped(app, service, store, name, env)
            else:
                proc, port = start_serve("--service", service, "--app", app, *COMMON, *extra,
                                         env={"CLUSTER_DISCOVERY_URL": store,
                                              "BACKEND_NAME": name, **(env or {})},
                                         name=f"{service}-{name}")
            cluster.procs.append(proc)
            cluster.ports[name] = port
        proc, port = start_serve("--ui-service", service, *COMMON, name=f"{service}-front",
                                 env={"CLUSTER_DISCOVERY_URL": store, **(env or {})})
        cluster.procs.append(proc)
        cluster.ports["front"] = port
        for name in ("a", "b"):
            cluster.hashes[name] = view(cluster.url(name))["hash"]
        wait_until(lambda: all(
            {e["hash"] for e in view(cluster.url(n))["endpoints"]} >= set(cluster.hashes.values())
            for n in ("a", "b", "front")), timeout=15, what="every instance sees both")
        yield cluster
    finally:
        outputs = []
        for proc in cluster.procs:
            alive = proc.poll() is None
            proc.stop()
            outputs.append((proc, alive, proc.output()))
    for proc, alive, output in outputs:
        assert alive, f"{proc} died:\n{output[-3000:]}"
        assert app_fails or "Traceback" not in output, f"{proc}:\n{output[-5000:]}"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite://{tmp_path_factory.mktemp('ws') / 'discovery.sqlite3'}"


# --- gevent-websocket ----------------------------------------------------------------


@pytest.fixture(scope="module", params=["serve", "wrap"],
                ids=["cluster-serve", "cluster.wrap-under-WSGIServer"])
def gws(request: pytest.FixtureRequest, store: str) -> Iterator[Cluster]:
    wrapped = request.param == "wrap"
    with cluster_of("gws_echo:app", "wgws" if wrapped else "gws", store,
                    wrapped=wrapped) as cluster:
        yield cluster


@pytest.mark.parametrize("pick", ["a", "b"], ids=["served-here", "through-another-instance"])
def test_gevent_websocket_app_echoes_text_and_binary(gws: Cluster, pick: str) -> None:
    ws = websocket.create_connection(gws.url("a").replace("http", "ws", 1) + "/echo",
                                     cookie=gws.cookie(pick), timeout=10)
    try:
        ws.send("cmd:name")
        assert ws.recv() == pick
        ws.send("héllo")
        assert ws.recv_data() == (ABNF.OPCODE_TEXT, "héllo".encode())
        blob = os.urandom(70_000)  # over 64 KiB: a 64-bit payload length
        ws.send_binary(blob)
        assert ws.recv_data() == (ABNF.OPCODE_BINARY, blob)
        for i in range(20):
            ws.send(f"m{i}")
            assert ws.recv() == f"m{i}"
    finally:
        ws.close()


@pytest.mark.parametrize("pick", ["a", "b"], ids=["served-here", "through-another-instance"])
def test_close_codes_and_reasons_reach_the_other_end_whole(gws: Cluster, pick: str) -> None:
    """A close frame is a 2-byte code, then the reason (RFC 6455 5.5.1). As released,
    gevent-websocket's close(code, message) writes the message alone, so its echo of a
    client's close (or an app's own close) reaches the client with the reason's first
    two bytes as the code: websockets and Node's ws fail the connection (1006, 'invalid
    status code'), Chromium reports code 25209 ("by" of "bytearray(b'...')")."""
    def close_frame_after(message: str | None = None, close: tuple[int, bytes] = (0, b"")) -> bytes:
        ws = websocket.create_connection(gws.url("a").replace("http", "ws", 1) + "/echo",
                                         cookie=gws.cookie(pick), timeout=10)
        try:
            ws.send("cmd:name")
            assert ws.recv() == pick
            if message is None:
                ws.send_close(*close)
            else:
                ws.send(message)
            frame = ws.recv_frame()
            assert frame.opcode == ABNF.OPCODE_CLOSE
            return frame.data
        finally:
            ws.shutdown()

    code = (4001).to_bytes(2, "big")
    assert close_frame_after(close=(4001, b"client done")) == code + b"client done"
    code = (4003).to_bytes(2, "big")
    assert close_frame_after("cmd:close 4003 bye now") == code + b"bye now"
    # a reason longer than a control frame holds (125 bytes) is cut on a character
    code = (4004).to_bytes(2, "big")
    assert close_frame_after("cmd:close 4004 " + "é" * 100) == code + ("é" * 61).encode()


@pytest.mark.parametrize("pick", ["a", "b"], ids=["served-here", "through-another-instance"])
def test_apps_broadcast_over_gevent_websockets_registry_of_sockets(gws: Cluster,
                                                                  pick: str) -> None:
    """gevent-websocket's handler keeps the server's open sockets in
    ``ws.handler.server.clients`` and this one's in ``ws.handler.active_client``, which
    its chat example (and apps written after it) broadcast over. Under cluster.wrap()
    with ClusterHandler neither existed: the app raised AttributeError and the
    sockets closed with 1000."""
    url = gws.url("a").replace("http", "ws", 1) + "/chat"
    first = websocket.create_connection(url, cookie=gws.cookie(pick), timeout=10)
    second = websocket.create_connection(url, cookie=gws.cookie(pick), timeout=10)
    try:
        first.send("cmd:broadcast hello all")
        assert second.recv() == "hello all active=True"
        assert first.recv() == "hello all active=True"
    finally:
        first.close()
        second.close()


def test_the_socket_has_gevent_websockets_logger(gws: Cluster) -> None:
    """``ws.logger`` is gevent-websocket's handler's logger; under cluster.wrap() with
    ClusterHandler an app that logged through it raised AttributeError (a traceback,
    its socket closed)."""
    ws = websocket.create_connection(gws.url("a").replace("http", "ws", 1) + "/log",
                                     timeout=10)
    try:
        ws.send("cmd:log hello")
        assert ws.recv() == "logged"
    finally:
        ws.close()


@pytest.fixture(scope="module", params=["serve", "wrap"],
                ids=["cluster-serve", "cluster.wrap-under-WSGIServer"])
def generator(request: pytest.FixtureRequest, store: str) -> Iterator[Cluster]:
    """gws_echo's app under a middleware written as a generator; its ``cmd:raise``
    puts the app's traceback in the log."""
    wrapped = request.param == "wrap"
    with cluster_of("gws_echo:generator_app", "wgen" if wrapped else "gen", store,
                    wrapped=wrapped, app_fails=True) as cluster:
        yield cluster


@pytest.mark.parametrize("pick", ["a", "b"], ids=["served-here", "through-another-instance"])
def test_an_app_under_a_generator_middleware_runs(generator: Cluster, pick: str) -> None:
    """WSGI lets an app's result be lazy, and gevent-websocket's handler iterates it:
    the app runs then. cluster.wrap() under ClusterHandler only called the middleware,
    so the app never ran and every socket closed with 1000 at once."""
    ws = websocket.create_connection(generator.url("a").replace("http", "ws", 1) + "/x",
                                     cookie=generator.cookie(pick), timeout=10)
    try:
        ws.send("cmd:name")
        assert ws.recv() == pick
    finally:
        ws.close()


@pytest.mark.parametrize("pick", ["a", "b"], ids=["served-here", "through-another-instance"])
def test_an_app_that_raises_closes_its_socket_with_1011(generator: Cluster, pick: str) -> None:
    """RFC 6455 7.4.1: 1011, the server met an unexpected condition. The close that
    followed an app's exception said 1000 (a normal closure): a client that reconnects
    or reports only on a failure took the crash for a goodbye. The traceback is
    logged, and the instance serves on."""
    url = generator.url("a").replace("http", "ws", 1) + "/x"
    ws = websocket.create_connection(url, cookie=generator.cookie(pick), timeout=10)
    try:
        ws.send("cmd:raise")
        frame = ws.recv_frame()
        assert (frame.opcode, frame.data) == (ABNF.OPCODE_CLOSE,
                                              (1011).to_bytes(2, "big") + b"internal error")
    finally:
        ws.shutdown()
    serving = generator.procs[("a", "b").index(pick)]
    wait_until(lambda: "RuntimeError: the app's bug" in serving.output(), timeout=5,
               what="the app's traceback in its instance's log")
    ws = websocket.create_connection(url, cookie=generator.cookie(pick), timeout=10)
    try:
        ws.send("cmd:name")
        assert ws.recv() == pick
    finally:
        ws.close()


def environ_seen(url: str, cookie: str = "", source: str = "127.0.0.1",
                 header: tuple[str, ...] = ()) -> dict[str, str]:
    """What the gevent-websocket app was told of a WebSocket to ``url`` (cmd:environ),
    connected from ``source`` with ``header`` lines."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", int(url.rsplit(":", 1)[1].split("/", 1)[0])))
    ws = websocket.create_connection(url, socket=sock, cookie=cookie, header=list(header),
                                     timeout=10)
    try:
        ws.send("cmd:environ")
        return json.loads(ws.recv())
    finally:
        ws.close()


@pytest.mark.parametrize("pick", ["a", "b"], ids=["served-here", "through-another-instance"])
def test_a_sockjs_session_websocket_reaches_the_app_at_its_own_path(gws: Cluster,
                                                                    pick: str) -> None:
    """A SockJS session's WebSocket, ``/cluster-ddp/<hash>/<service>/<rest>``, reaches the
    app as ``/sockjs/<rest>`` as the session's polls do. Served by cluster.wrap() under
    ClusterHandler, the 101 and the app took the request's own environ, not the one
    routing rewrote: the app was asked for the /cluster-ddp/ path."""
    url = (gws.url("a").replace("http", "ws", 1)
           + f"/cluster-ddp/{gws.hashes[pick]}/{gws.service}/123/abcd/websocket?t=1")
    seen = environ_seen(url)
    assert (seen["PATH_INFO"], seen["QUERY_STRING"]) == ("/sockjs/123/abcd/websocket", "t=1")


FORGED = ("X-Forwarded-For: 203.0.113.9", "X-Forwarded-Proto: javascript",
          "X-Forwarded-Host: evil.example", "Forwarded: for=203.0.113.9",
          "X-Real-IP: 203.0.113.9", "Proxy: http://evil.example:1", "X-Cluster-Hop: 1")
OUTSIDE = "127.0.0.2"  # no member's address, not in --trusted-proxies (loopback)


def http_environ_seen(base: str, cookie: str, source: str, header: tuple[str, ...] = (),
                      path: str = "/environ") -> dict[str, str]:
    """What the app was told of a plain GET ``path`` (its JSON), sent from ``source``."""
    port = int(base.rsplit(":", 1)[1])
    with socket.socket() as sock:
        sock.bind((source, 0))
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        lines = [f"GET {path} HTTP/1.1", "Host: app.example", f"Cookie: {cookie}",
                 "Connection: close", *header]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data, _closed = read_until_close(sock, 5.0)
    assert data.startswith(b"HTTP/1.1 200 "), data[:300]
    return json.loads(data.partition(b"\r\n\r\n")[2])


@pytest.mark.parametrize("pick", ["a", "b"], ids=["served-here", "through-another-instance"])
def test_forwarding_claims_from_outside_never_reach_the_app(gws: Cluster, pick: str) -> None:
    """README, Forwarded headers: a client's X-Forwarded-*, Forwarded and X-Real-IP are
    kept from --trusted-proxies only, Proxy never (httpoxy), and no app sees a hop
    marker. The front door held to it; cluster.wrap() gave its own app whatever any
    client claimed (the address, scheme and host an app builds its links and its
    rate limits on), Proxy included."""
    url = gws.url("a").replace("http", "ws", 1) + "/echo"
    for seen in (environ_seen(url, gws.cookie(pick), OUTSIDE, FORGED),
                 http_environ_seen(gws.url("a"), gws.cookie(pick), OUTSIDE, FORGED),
                 http_environ_seen(gws.url("a"), gws.cookie(pick), OUTSIDE, FORGED,
                                   "/sockjs/info")):
        assert not {"HTTP_PROXY", "HTTP_FORWARDED", "HTTP_X_CLUSTER_HOP"} & set(seen), seen
        if pick == "a":  # what the app saw came from the client itself: none of it
            assert seen["REMOTE_ADDR"] == OUTSIDE
            assert not {"HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_PROTO",
                        "HTTP_X_FORWARDED_HOST", "HTTP_X_REAL_IP"} & set(seen), seen
        else:  # what the relaying member saw
            assert seen["HTTP_X_FORWARDED_FOR"] == seen["HTTP_X_REAL_IP"] == OUTSIDE, seen
            assert seen["HTTP_X_FORWARDED_PROTO"] == "http", seen
            assert seen["HTTP_X_FORWARDED_HOST"] != "evil.example", seen  # the Host
    # a trusted proxy's claims are the app's to see
    seen = environ_seen(url, gws.cookie(pick), "127.0.0.1", FORGED[:1])
    assert seen["HTTP_X_FORWARDED_FOR"].startswith("203.0.113.9"), seen


@pytest.mark.parametrize("wrapped", [False, True], ids=["cluster-serve", "cluster.wrap"])
def test_a_relayed_websocket_believes_the_configured_trusted_proxies(
        store: str, wrapped: bool) -> None:
    """--trusted-proxies 127.0.0.0/8: a proxy at 127.0.0.2 is trusted, so its client's
    address goes on to the instance that serves the WebSocket, as for plain HTTP.
    cluster.wrap()'s WebSocket relay judged by loopback alone, whatever the setting,
    and replaced it (so a network trusted for HTTP was not for WebSockets, and an
    address taken out of the setting still was)."""
    with cluster_of("gws_echo:app", "tgws" if wrapped else "tsgws", store, wrapped=wrapped,
                    env={"CLUSTER_TRUSTED_PROXIES": "127.0.0.0/8"}) as cluster:
        url = cluster.url("a").replace("http", "ws", 1) + "/echo"
        seen = environ_seen(url, cluster.cookie("b"), OUTSIDE, FORGED[:1])
        assert seen["HTTP_X_FORWARDED_FOR"] == f"203.0.113.9, {OUTSIDE}", seen
        seen = http_environ_seen(cluster.url("a"), cluster.cookie("b"), OUTSIDE, FORGED[:1])
        assert seen["HTTP_X_FORWARDED_FOR"] == f"203.0.113.9, {OUTSIDE}", seen


@pytest.mark.parametrize("pick", ["a", "b"], ids=["served-here", "through-another-instance"])
def test_the_101_is_a_bare_switch(gws: Cluster, pick: str) -> None:
    """RFC 6455 4.2.2: the accept key, Upgrade and Connection; no body framing (a
    Content-Length or chunked coding would tell the client a body follows)."""
    lines = ["GET /echo HTTP/1.1", "Host: 127.0.0.1", f"Cookie: {gws.cookie(pick)}",
             *(f"{k}: {v}" for k, v in HANDSHAKE.items())]
    with socket.create_connection(("127.0.0.1", gws.ports["a"]), timeout=5) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 4096:
            data += sock.recv(4096) or b"(closed)"
    head = data.partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 101 "), data[:300]
    assert b"\r\nsec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=" in head, head
    assert b"\r\nupgrade: websocket" in head and b"\r\nconnection: upgrade" in head, head
    assert b"content-length" not in head and b"transfer-encoding" not in head, head


def test_a_new_sockets_101_names_its_endpoint_in_the_sticky_cookie(gws: Cluster) -> None:
    """A cookieless upgrade is a new session: its 101 sets the sticky cookie for the
    instance that serves it, as every new session's first answer does, so the client's
    next requests (a reconnect, its pages) go to the instance that has its state. The
    door's 101 for a socket it served itself had none; a tunnelled one did."""
    picks: set[tuple[str, str]] = set()  # (the instance connected to, the one serving)
    for _ in range(20):
        for door in ("a", "b"):  # placement by load may prefer one: through both, it is
            # served where it came in by one of them and tunnelled by the other
            ws = websocket.create_connection(gws.url(door).replace("http", "ws", 1) + "/echo",
                                             timeout=10)
            try:
                ws.send("cmd:name")
                name = ws.recv()
                cookie = ws.getheaders().get("set-cookie", "")
            finally:
                ws.close()
            assert cookie.startswith(gws.cookie(name) + ";"), (door, name, cookie)
            picks.add((door, "here" if name == door else "tunnelled"))
        if {where for _, where in picks} == {"here", "tunnelled"}:
            break
    assert {where for _, where in picks} == {"here", "tunnelled"}, picks


def test_a_wrapped_balancers_101_carries_one_cookie_and_no_load_figure(
        gws: Cluster, store: str) -> None:
    """A cluster.wrap() app balancing for the service tunnels a new socket to an
    instance: its 101 sets the sticky cookie once, naming the instance that holds the
    socket, and does not pass on the X-Cluster-Load figure the instance sent for its
    balancer (the door strips it; the wrap()'s bridge sent it to the client)."""
    proc, port = start_library_app({"CLUSTER_DISCOVERY_URL": store, "CLUSTER_SERVICE": "lbal",
                                    "CLUSTER_UI_SERVICE": gws.service,
                                    "CLUSTER_PING_INTERVAL": "1"}, name="lbal")
    try:
        wait_until(lambda: {e["hash"] for e in view(f"http://127.0.0.1:{port}")["endpoints"]}
                   >= set(gws.hashes.values()), timeout=15, what="the wrap() app to see both")
        for _ in range(4):
            lines = ["GET /echo HTTP/1.1", "Host: 127.0.0.1",
                     *(f"{k}: {v}" for k, v in HANDSHAKE.items())]
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
                data = b""
                while b"\r\n\r\n" not in data and len(data) < 4096:
                    data += sock.recv(4096) or b"(closed)"
                head, _, data = data.partition(b"\r\n\r\n")
                mask = b"\x01\x02\x03\x04"
                sock.sendall(b"\x81\x88" + mask + bytes(
                    c ^ mask[i % 4] for i, c in enumerate(b"cmd:name")))
                while len(data) < 3:
                    data += sock.recv(4096) or b"(closed)"
            assert head.startswith(b"HTTP/1.1 101 "), head
            name = data[2:2 + data[1]].decode()
            cookies = [line for line in head.lower().split(b"\r\n")
                       if line.startswith(b"set-cookie:")]
            assert len(cookies) == 1, head
            assert cookies[0].startswith(b"set-cookie: " + gws.cookie(name).lower().encode()
                                         + b";"), (name, head)
            assert b"x-cluster-load" not in head.lower(), head
    finally:
        proc.stop()
    assert "Traceback" not in proc.output(), proc.output()


def test_plain_http_to_the_websocket_app_still_works(gws: Cluster) -> None:
    got = requests.get(gws.url("a") + "/whoami", headers={"Cookie": gws.cookie("b")},
                       timeout=5)
    assert (got.status_code, got.text) == (200, "b")
    got = requests.get(gws.url("a") + "/not-a-socket", timeout=5)
    assert got.status_code == 426  # the app's own answer: no socket was handed to it


HANDSHAKE = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
             "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


def handshake(port: int, cookie: str, version: str = "HTTP/1.1",
              **changes: str | None) -> tuple[bytes, bool]:
    """What a WebSocket handshake with ``changes`` to its fields (None: left out), sent on
    a raw socket, is answered, up to the close (True) or two seconds."""
    fields = {**HANDSHAKE, **{k.replace("_", "-"): v for k, v in changes.items()}}
    lines = [f"GET /echo {version}", "Host: 127.0.0.1", f"Cookie: {cookie}"]
    lines += [f"{k}: {v}" for k, v in fields.items() if v is not None]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return read_until_close(sock, 2.0)


@pytest.mark.parametrize("changes, status", [
    ({"Sec-WebSocket-Key": "short"}, b"400"),  # not base64: binascii.Error
    ({"Sec-WebSocket-Key": "c2hvcnQ="}, b"400"),  # base64, but not 16 bytes
    ({"Sec-WebSocket-Key": None}, b"400"),
    ({"Sec-WebSocket-Version": None}, b"426"),
], ids=["key-not-base64", "key-not-16-bytes", "no-key", "no-version"])
@pytest.mark.parametrize("pick", ["a", "b"], ids=["served-here", "through-another-instance"])
def test_a_bad_handshake_gets_its_status_not_a_500(gws: Cluster, pick: str, changes: dict,
                                                   status: bytes) -> None:
    """gevent-websocket refuses these with str bodies (or raises): the door must still
    answer its status, with no traceback, and the instance stays up. The connection
    ends there, served here or not: what the client sends next may be frames."""
    data, closed = handshake(gws.ports["a"], gws.cookie(pick), **changes)
    assert data.startswith(b"HTTP/1.1 " + status + b" "), data[:200]
    assert closed
    for proc in gws.procs:
        assert proc.poll() is None and "Traceback" not in proc.output(), proc.output()[-3000:]


KEY = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="


@pytest.mark.parametrize("lines", [
    [KEY, "Sec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==", "Sec-WebSocket-Version: 13"],
    [KEY, KEY, "Sec-WebSocket-Version: 13"],
    ["Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==, AQIDBAUGBwgJCgsMDQ4PEA==",
     "Sec-WebSocket-Version: 13"],
    ["Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==AQID", "Sec-WebSocket-Version: 13"],
    [KEY, "Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 13"],
], ids=["two-keys", "the-same-key-twice", "two-keys-in-one-field", "bytes-after-padding",
        "two-versions"])
@pytest.mark.parametrize("pick", ["a", "b"], ids=["served-here", "through-another-instance"])
def test_a_handshake_with_two_keys_or_a_malformed_one_is_refused(
        gws: Cluster, pick: str, lines: list[str]) -> None:
    """RFC 6455 4.2.1 and 11.3.1: one key, 16 bytes of base64, and one version, else
    400. gevent-websocket decodes the key leniently (a comma, and what follows the
    padding, skipped): two keys, joined by a comma in the environ, got a 101, and the
    client its Accept computed from a key it sent along with another."""
    head = ["GET /echo HTTP/1.1", "Host: 127.0.0.1", f"Cookie: {gws.cookie(pick)}",
            "Upgrade: websocket", "Connection: Upgrade", *lines]
    with socket.create_connection(("127.0.0.1", gws.ports["a"]), timeout=5) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        data, closed = read_until_close(sock, 2.0)
    assert data.startswith(b"HTTP/1.1 400 "), data[:200]
    assert closed
    for proc in gws.procs:
        assert proc.poll() is None and "Traceback" not in proc.output(), proc.output()[-3000:]


@pytest.fixture(scope="module", params=["serve", "wrap"],
                ids=["cluster-serve", "cluster.wrap-under-WSGIServer"])
def chooser(request: pytest.FixtureRequest, store: str) -> Iterator[Cluster]:
    """tests/apps/ws_echo.py: an app that picks subprotocol ``echo.v2`` with
    gevent-websocket's ``app_protocol(path)``."""
    wrapped = request.param == "wrap"
    with cluster_of("ws_echo:app", "wproto" if wrapped else "proto", store,
                    wrapped=wrapped) as cluster:
        yield cluster


def chosen_protocol(port: int, offer: str, cookie: str = "") -> str | None:
    """The Sec-WebSocket-Protocol of the 101 answering an upgrade offering ``offer``."""
    lines = ["GET /echo HTTP/1.1", "Host: 127.0.0.1",
             *(f"{k}: {v}" for k, v in HANDSHAKE.items()),
             f"Sec-WebSocket-Protocol: {offer}", *([f"Cookie: {cookie}"] if cookie else [])]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            piece = sock.recv(4096)
            assert piece, data
            data += piece
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    assert head[0].startswith("HTTP/1.1 101 "), head
    found = [line.partition(":")[2].strip() for line in head[1:]
             if line.lower().startswith("sec-websocket-protocol:")]
    assert len(found) <= 1, head
    return found[0] if found else None


@pytest.mark.parametrize("pick", ["", "a", "b"],
                         ids=["new-session", "served-here", "through-another-instance"])
def test_the_app_picks_a_subprotocol_only_from_the_offer(chooser: Cluster, pick: str) -> None:
    """RFC 6455 4.2.2: the server answers one of the subprotocols the client offered,
    or none. gevent-websocket's ``app_protocol`` was honoured by the door only for a
    session already pinned here (a new session's app is wrapped to set the sticky
    cookie, and lost it: node's ws and websocket-client refuse a 101 without the
    subprotocol they asked for), and then whenever its name was anywhere in the offer
    (``xecho.v2x`` got ``echo.v2``, which makes every client fail the connection)."""
    cookie = chooser.cookie(pick) if pick else ""
    port = chooser.ports["a"]
    assert chosen_protocol(port, "echo.v2", cookie) == "echo.v2"
    assert chosen_protocol(port, "chat, echo.v2", cookie) == "echo.v2"
    assert chosen_protocol(port, "xecho.v2x, echo.v2.1", cookie) is None
    ws = websocket.create_connection(chooser.url("a").replace("http", "ws", 1) + "/echo",
                                     subprotocols=["echo.v2"], cookie=cookie, timeout=10)
    try:
        assert ws.getsubprotocol() == "echo.v2"
        ws.send_binary(b"hello")
        assert ws.recv() == b"hello"
    finally:
        ws.close()


@pytest.mark.parametrize("pick", ["a", "b"], ids=["served-here", "through-another-instance"])
def test_an_app_reading_frames_itself_gets_their_text(chooser: Cluster, pick: str) -> None:
    """gevent-websocket's ``read_frame()`` gives a frame's payload; tests/apps/ws_echo.py
    reads frames so. The hardened socket decodes text as it arrives, and its
    read_frame() gave b"" for every text frame: served here, the app echoed empty
    messages."""
    ws = websocket.create_connection(chooser.url("a").replace("http", "ws", 1) + "/echo",
                                     cookie=chooser.cookie(pick), timeout=10)
    try:
        ws.send("héllo")
        assert ws.recv() == "héllo"
        ws.send_frame(ABNF.create_frame(b"fragm\xc3", ABNF.OPCODE_TEXT, 0))
        ws.send_frame(ABNF.create_frame(b"\xa9nted", ABNF.OPCODE_CONT, 1))
        assert ws.recv() == "fragménted"  # é split between the frames
        ws.send("cmd:frames")
        assert ws.recv() == "2"
    finally:
        ws.close()


@pytest.mark.parametrize("pick", ["a", "b"], ids=["served-here", "through-another-instance"])
def test_an_http10_upgrade_is_a_plain_request(gws: Cluster, pick: str) -> None:
    """RFC 9110 7.8: an Upgrade in an HTTP/1.0 request is ignored, wherever it is served;
    the app answers it as plain HTTP (426: no socket was handed to it)."""
    data, _closed = handshake(gws.ports["a"], gws.cookie(pick), version="HTTP/1.0")
    assert data.startswith(b"HTTP/1.1 426 "), data[:200]
    assert b"wsgi.websocket missing" in data


@pytest.mark.parametrize("pick", ["a", "b"], ids=["served-here", "through-another-instance"])
def test_an_upgrade_with_a_body_is_a_plain_request(gws: Cluster, pick: str) -> None:
    """A handshake is a GET without a body (RFC 6455 4.1). With one, where the frames
    begin is a matter of opinion: relayed, the body was dropped while the head sent on
    still announced it (an endpoint that reads it would take the first frame bytes
    for it); served here, gevent-websocket read the body as frames. The Upgrade is
    ignored instead (RFC 9110 7.8 allows it), wherever it is served: the app answers a
    plain request, its body read as a body, and the connection carries on."""
    with socket.create_connection(("127.0.0.1", gws.ports["a"]), timeout=5) as sock:
        lines = ["GET /echo HTTP/1.1", "Host: 127.0.0.1", f"Cookie: {gws.cookie(pick)}",
                 *(f"{k}: {v}" for k, v in HANDSHAKE.items()), "Content-Length: 5"]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\nhello").encode()
                     + f"GET /whoami HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {gws.cookie(pick)}"
                       "\r\nConnection: close\r\n\r\n".encode())  # (not a 2 s wait)
        data, _closed = read_until_close(sock, 2.0)
    assert data.startswith(b"HTTP/1.1 426 "), data[:200]
    assert b"wsgi.websocket missing" in data
    assert data.endswith(b"\r\n\r\n" + pick.encode()), data[-200:]


def test_a_handshake_cluster_answers_itself_ends_the_connection(gws: Cluster) -> None:
    """The status page answering a WebSocket handshake refuses it like any non-101:
    the connection ends there (what the client sent after the head may be frames, which
    a kept connection would read as its next request head)."""
    with socket.create_connection(("127.0.0.1", gws.ports["a"]), timeout=5) as sock:
        lines = ["GET /_cluster/status HTTP/1.1", "Host: 127.0.0.1",
                 *(f"{k}: {v}" for k, v in HANDSHAKE.items())]
        frame = ABNF.create_frame("GET / HTTP/1.1", ABNF.OPCODE_TEXT).format()
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + frame)
        data, closed = read_until_close(sock, 2.0)
    assert data.startswith(b"HTTP/1.1 200 "), data[:200]
    head = data.partition(b"\r\n\r\n")[0]
    assert b"Connection: close" in head and closed, head
    assert data.count(b"HTTP/1.1 ") == 1, data[-300:]


# --- Flask-Sockets ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def flask_sockets(store: str) -> Iterator[Cluster]:
    with cluster_of("flask_sockets_app:app", "fsockets", store) as cluster:
        yield cluster


@pytest.mark.parametrize("pick", ["a", "b"], ids=["served-here", "through-another-instance"])
def test_flask_sockets_app_echoes(flask_sockets: Cluster, pick: str) -> None:
    ws = websocket.create_connection(flask_sockets.url("a").replace("http", "ws", 1) + "/echo",
                                     cookie=flask_sockets.cookie(pick), timeout=10)
    try:
        ws.send("cmd:name")
        assert ws.recv() == pick
        blob = os.urandom(70_000)
        ws.send_binary(blob)
        assert ws.recv_data() == (ABNF.OPCODE_BINARY, blob)
        ws.send("héllo")
        assert ws.recv() == "héllo"
    finally:
        ws.close()
    got = requests.get(flask_sockets.url("a") + "/whoami",
                       headers={"Cookie": flask_sockets.cookie(pick)}, timeout=5)
    assert (got.status_code, got.text) == (200, pick)


# --- python-socketio and Flask-SocketIO, async_mode='gevent' -----------------------------


@pytest.fixture(scope="module", params=["sio_app:app", "flask_sio_app:app", "wrapped"],
                ids=["python-socketio", "flask-socketio", "python-socketio-cluster.wrap"])
def sio(request: pytest.FixtureRequest, store: str) -> Iterator[Cluster]:
    if request.param == "wrapped":
        with cluster_of("sio_app:app", "wsio", store, wrapped=True) as cluster:
            yield cluster
        return
    service = "sio" if request.param.startswith("sio") else "flasksio"
    with cluster_of(request.param, service, store) as cluster:
        yield cluster


def echo_twenty(client: socketio.Client) -> set[str]:
    names = set()
    for i in range(20):
        got = client.call("echo", {"n": i}, timeout=10)
        assert got["data"] == {"n": i}
        assert got["transport"] == "websocket", got
        names.add(got["name"])
    return names


@pytest.mark.parametrize("via, pick", [("a", "a"), ("a", "b"), ("front", "b")],
                         ids=["local-pick", "remote-pick", "balancer-only-front"])
def test_socketio_client_upgrades_to_websocket(sio: Cluster, via: str, pick: str) -> None:
    client = socketio.Client(reconnection=False)
    try:
        client.connect(sio.url(via), headers={"Cookie": sio.cookie(pick)}, wait_timeout=10)
        assert client.transport() == "websocket"
        assert echo_twenty(client) == {pick}
    finally:
        client.disconnect()


@pytest.mark.parametrize("pick", ["a", "b"], ids=["served-here", "through-another-instance"])
def test_an_http10_upgrade_reaches_socketio_as_a_plain_request(sio: Cluster, pick: str) -> None:
    """The door ignores an HTTP/1.0 Upgrade (RFC 9110 7.8). Relayed, Upgrade and
    Connection go no further (hop-by-hop) and engine.io answers its own 400; served
    here, the app must not see them either, or engine.io sets out to upgrade, finds no
    socket and raises (a 500 and a traceback in the instance's log)."""
    with socket.create_connection(("127.0.0.1", sio.ports["a"]), timeout=5) as sock:
        lines = ["GET /socket.io/?EIO=4&transport=websocket HTTP/1.0", "Host: 127.0.0.1",
                 f"Cookie: {sio.cookie(pick)}", *(f"{k}: {v}" for k, v in HANDSHAKE.items())]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data, _closed = read_until_close(sock, 2.0)
    assert data.startswith(b"HTTP/1.1 400 "), data[:300]
    for proc in sio.procs:
        assert "Traceback" not in proc.output(), proc.output()[-3000:]


def test_socketio_without_a_cookie_sticks_to_the_instance_the_front_picked(
        sio: Cluster) -> None:
    """The balancer picks on the first polling request and sets the cookie; the client
    keeps it for the later polls and the upgrade, so one instance serves the session."""
    client = socketio.Client(reconnection=False)
    try:
        client.connect(sio.url("front"), wait_timeout=10)
        assert client.transport() == "websocket"
        names = echo_twenty(client)
        assert len(names) == 1 and names <= {"a", "b"}, names
    finally:
        client.disconnect()

