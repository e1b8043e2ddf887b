"""WebSocket proxying, end to end and in its pure parts.

Real processes on 127.0.0.1: websocket-client (a library nobody here wrote) talks to a
gevent-websocket echo server (tests/apps/ws_echo.py) through the tiny proxy
tests/apps/ws_forward_only.py, which is WebSocketBridge served by gevent's WSGIServer
with ClusterHandler.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import os
import random
import socket
import struct
import threading
from typing import Iterator

import pytest
import websocket
from websocket import ABNF

from cluster.handler import is_websocket_upgrade
from cluster.proxy.tunnel import FrameEdge
from cluster.proxy.websocket import (
    MAX_REFUSAL_BODY,
    WebSocketBridge,
    parse_response_head,
    upgrade_request_head,
)
from helpers import (
    TESTS,
    Proc,
    accept_forever,
    app_running,
    get,
    read_request_head,
    refused_port,
    wait_until,
)

ECHO = TESTS / "apps" / "ws_echo.py"
FORWARD = TESTS / "apps" / "ws_forward_only.py"
TIMEOUT = 10  # generous: a hang fails, a slow machine does not


@contextlib.contextmanager
def forward_only(backend: str, *extra: str) -> Iterator[tuple[Proc, int]]:
    """tests/apps/ws_forward_only.py in front of ``backend``."""
    with app_running(FORWARD.name, "--backend", backend, *extra) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def echo_port() -> Iterator[int]:
    with app_running(ECHO.name) as (_, port):
        yield port


@pytest.fixture(scope="module")
def proxy(echo_port: int) -> Iterator[str]:
    """host:port of a forward-only proxy in front of the echo server."""
    with forward_only(f"http://127.0.0.1:{echo_port}") as (proc, port):
        yield f"127.0.0.1:{port}"
        output = proc.output()
    # Hijacked connections must end quietly: no error page attempt, no traceback.
    assert "Traceback" not in output, output


@contextlib.contextmanager
def connect(proxy: str, path: str = "/", **options) -> Iterator[websocket.WebSocket]:
    ws = websocket.create_connection(f"ws://{proxy}{path}", timeout=TIMEOUT, **options)
    try:
        yield ws
    finally:
        close_client(ws)


def close_client(ws: websocket.WebSocket, timeout: float = 3) -> None:
    """Close handshake if still possible, then the socket in any case (websocket-client's
    close() returns early, socket open, once it saw the connection drop)."""
    with contextlib.suppress(OSError, websocket.WebSocketException):
        ws.close(timeout=timeout)
    ws.shutdown()


def close_payload(data: bytes) -> tuple[int, str]:
    return struct.unpack("!H", data[:2])[0], data[2:].decode("utf-8")


def bridges(proxy: str) -> dict:
    return get(f"http://{proxy}/bridges?greenlets=1", headers={"Connection": "close"}).json()


# --- end to end --------------------------------------------------------------------


def test_text_and_binary_messages_echo_through(proxy: str) -> None:
    with connect(proxy, "/chat?id=text&greet=1") as ws:
        assert ws.recv() == "hello"  # sent by the backend right behind its 101
        ws.send("héllo ✓")
        assert ws.recv() == "héllo ✓"
        payload = bytes(range(256)) * 4
        ws.send_binary(payload)
        opcode, data = ws.recv_data()
        assert (opcode, data) == (ABNF.OPCODE_BINARY, payload)


def test_one_mebibyte_messages(proxy: str) -> None:
    blob = os.urandom(1 << 20)
    text = "x" * (1 << 20)
    with connect(proxy) as ws:
        ws.send_binary(blob)
        assert ws.recv() == blob
        ws.send(text)
        assert ws.recv() == text


def test_fragmented_message_arrives_as_continuation_frames(proxy: str) -> None:
    with connect(proxy) as ws:
        ws.send_frame(ABNF.create_frame("part one, ", ABNF.OPCODE_TEXT, fin=0))
        ws.send_frame(ABNF.create_frame("part two, ", ABNF.OPCODE_CONT, fin=0))
        ws.send_frame(ABNF.create_frame("end", ABNF.OPCODE_CONT, fin=1))
        assert ws.recv() == "part one, part two, end"
        ws.send("cmd:frames")
        assert ws.recv() == "3"  # the backend saw three frames, not one reassembled


def test_ping_pong_both_ways(proxy: str) -> None:
    with connect(proxy) as ws:
        ws.ping("from client")
        opcode, data = ws.recv_data(control_frame=True)
        assert (opcode, data) == (ABNF.OPCODE_PONG, b"from client")
        ws.send("cmd:ping from server")
        # websocket-client answers the server's ping by itself inside recv()
        assert ws.recv() == "pong from server"


def test_close_code_and_reason_from_server_reach_client(proxy: str) -> None:
    with connect(proxy) as ws:
        ws.send("cmd:close 4001 server says bye")
        opcode, data = ws.recv_data(control_frame=True)
        assert opcode == ABNF.OPCODE_CLOSE
        assert close_payload(data) == (4001, "server says bye")


def test_close_code_and_reason_from_client_reach_server(proxy: str, echo_port: int) -> None:
    with connect(proxy, "/?id=client-close") as ws:
        ws.send_close(4002, b"client says bye")
        opcode, data = ws.recv_data(control_frame=True)
        assert opcode == ABNF.OPCODE_CLOSE
        assert close_payload(data) == (4002, "client says bye")  # the server's echo
    seen = wait_until(
        lambda: get(f"http://127.0.0.1:{echo_port}/closes?id=client-close").json(),
        what="the echo server to record the close")
    assert seen == {"code": 4002, "reason": "client says bye"}


def test_subprotocol_negotiated_end_to_end(proxy: str) -> None:
    with connect(proxy, subprotocols=["echo.v1", "echo.v2"]) as ws:
        assert ws.getsubprotocol() == "echo.v2"
        ws.send("cmd:headers")
        seen = json.loads(ws.recv())["headers"]
    assert seen["Sec-Websocket-Protocol"] == "echo.v1,echo.v2"


def test_handshake_headers_seen_by_backend(proxy: str) -> None:
    extra = ["Sec-WebSocket-Extensions: x-test; level=1", "X-Custom: kept",
             "Proxy-Authorization: Basic c2VjcmV0", "X-Forwarded-For: 10.1.2.3"]
    with connect(proxy, "/some/path?q=1", header=extra, host="app.example") as ws:
        ws.send("cmd:headers")
        info = json.loads(ws.recv())
    headers = info["headers"]
    assert (info["path"], info["query"]) == ("/some/path", "q=1")
    assert headers["Sec-Websocket-Extensions"] == "x-test; level=1"
    assert headers["X-Custom"] == "kept"
    assert headers["Sec-Websocket-Version"] == "13"
    assert headers["Upgrade"].lower() == "websocket"
    assert headers["Connection"].lower() == "upgrade"
    assert "Proxy-Authorization" not in headers  # hop-by-hop: stops at the proxy
    assert headers["Host"] == "app.example"
    assert headers["X-Forwarded-Host"] == "app.example"
    assert headers["X-Forwarded-For"] == "10.1.2.3, 127.0.0.1"
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["Via"] == "1.1 cluster"
    assert headers["X-Cluster-Hop"] == "forward-only"


def _frame(data: bytes) -> tuple[int, bytes, bytes]:
    """Parse one unmasked server frame: (opcode, payload, rest)."""
    opcode, length = data[0] & 0x0F, data[1] & 0x7F
    start = 2
    if length == 126:
        length, start = struct.unpack("!H", data[2:4])[0], 4
    assert length < 127
    return opcode, data[start:start + length], data[start + length:]


def _read_until(sock: socket.socket, buf: bytes, predicate) -> bytes:
    while not predicate(buf):
        data = sock.recv(65536)
        if not data:
            break
        buf += data
    return buf


def _raw_upgrade(proxy: str, path: str, behind: bytes = b"") -> tuple[socket.socket, bytes]:
    """Open a WebSocket by hand (``behind`` goes in the same send as the request);
    return the socket and the bytes received after the 101 head."""
    handshake = (f"GET {path} HTTP/1.1\r\nHost: {proxy}\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n").encode()
    host, port = proxy.split(":")
    sock = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    sock.sendall(handshake + behind)
    buf = _read_until(sock, b"", lambda b: b"\r\n\r\n" in b)
    head, _, buf = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
    return sock, buf


def _whole_frame(b: bytes) -> bool:
    return len(b) >= 2 and len(b) >= 2 + (b[1] & 0x7F)


def test_frames_sent_behind_the_upgrade_request_are_forwarded(proxy: str) -> None:
    """A client may write its first frame in the same packet as the upgrade request;
    the proxy's request reader then holds it. It must still reach the backend, and after
    the close handshake the proxy must close the connection without writing anything
    else."""
    first = ABNF.create_frame("early bird", ABNF.OPCODE_TEXT).format()
    sock, buf = _raw_upgrade(proxy, "/raw", behind=first)
    with sock:
        opcode, payload, buf = _frame(_read_until(sock, buf, _whole_frame))
        assert (opcode, payload) == (ABNF.OPCODE_TEXT, b"early bird")
        sock.sendall(ABNF.create_frame(struct.pack("!H", 1000) + b"done",
                                       ABNF.OPCODE_CLOSE).format())
        rest = _read_until(sock, buf, lambda b: False)  # everything up to EOF
    opcode, payload, tail = _frame(rest)
    assert (opcode, payload) == (ABNF.OPCODE_CLOSE, struct.pack("!H", 1000) + b"done")
    assert tail == b""


def test_backend_closing_ends_the_tunnel_even_if_client_stays_silent(proxy: str) -> None:
    """The backend closes its TCP connection; the client never answers. The proxy must
    still close the client side (a tunnel that waits for the silent client would leak)."""
    sock, buf = _raw_upgrade(proxy, "/silent")
    with sock:
        sock.sendall(ABNF.create_frame("cmd:close 4003 done", ABNF.OPCODE_TEXT).format())
        rest = _read_until(sock, buf, lambda b: False)  # EOF, or the timeout fails us
    opcode, payload, tail = _frame(rest)
    assert (opcode, payload) == (ABNF.OPCODE_CLOSE, struct.pack("!H", 4003) + b"done")
    assert tail == b""


def test_refused_upgrade_reaches_client_as_403(proxy: str) -> None:
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(f"ws://{proxy}/forbidden", timeout=TIMEOUT)
    assert info.value.status_code == 403
    assert info.value.resp_body == b"forbidden by backend"
    assert info.value.resp_headers["x-backend"] == "ws_echo"


def test_unreachable_endpoint_gives_502() -> None:
    with refused_port() as dead, forward_only(f"http://127.0.0.1:{dead}") as (_, port):
        with pytest.raises(websocket.WebSocketBadStatusException) as info:
            websocket.create_connection(f"ws://127.0.0.1:{port}/", timeout=TIMEOUT)
        assert info.value.status_code == 502
        assert bridges(f"127.0.0.1:{port}")["open"] == 0


def test_silent_endpoint_gives_504() -> None:
    """The endpoint accepts TCP but never answers the upgrade: 504, not a hang."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes connects; nobody ever reads
        dead = silent.getsockname()[1]
        with forward_only(f"http://127.0.0.1:{dead}", "--handshake-timeout", "0.5") as (_, port):
            with pytest.raises(websocket.WebSocketBadStatusException) as info:
                websocket.create_connection(f"ws://127.0.0.1:{port}/", timeout=TIMEOUT)
            assert info.value.status_code == 504


@pytest.mark.parametrize("answer_with", ["body", "head"])
def test_a_refusal_past_the_limits_is_502_not_passed_on(answer_with: str) -> None:
    """An upgrade refused with a body that ends at close and runs past the 1 MiB a
    refusal may have: the client got its first MiB with a Content-Length saying that
    was all (a truncated page presented as complete). Now a 502, as for a refusal whose
    Content-Length or chunks say it is too large. A head past 64 KiB whose end came in
    a later read than the check was passed on too."""
    body = b"x" * (MAX_REFUSAL_BODY + 100000)
    # a head of 70 KB whose end comes in a later read than the 64 KiB check
    head = b"".join(b"X-Big-%d: %s\r\n" % (n, b"a" * 1400) for n in range(50))
    answer_with_head = answer_with == "head"

    def answer(conn: socket.socket) -> None:
        with conn:
            buf = read_request_head(conn)
            if not buf:
                return
            with contextlib.suppress(OSError):
                if answer_with_head:
                    conn.sendall(b"HTTP/1.1 403 Forbidden\r\n" + head
                                 + b"Content-Length: 2\r\n\r\nno")
                else:
                    conn.sendall(b"HTTP/1.1 403 Forbidden\r\nConnection: close\r\n\r\n"
                                 + body)

    with socket.create_server(("127.0.0.1", 0)) as listener:
        threading.Thread(target=accept_forever, args=(listener, answer), daemon=True).start()
        backend = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with forward_only(backend) as (proc, port):
            with pytest.raises(websocket.WebSocketBadStatusException) as info:
                websocket.create_connection(f"ws://127.0.0.1:{port}/", timeout=TIMEOUT)
            assert info.value.status_code == 502, (info.value.status_code,
                                                   len(info.value.resp_body or b""))
            assert "Traceback" not in proc.output(), proc.output()


def test_a_101_whose_lines_end_in_bare_lf_is_taken() -> None:
    """RFC 9112 2.2 lets a recipient take a bare LF for a line end, and the door does
    (as websocket-client does talking to such a server directly); the bridge waited
    for a CRLF CRLF that never came and answered 504 after its handshake timeout."""
    def answer(conn: socket.socket) -> None:
        with conn:
            buf = read_request_head(conn)
            if not buf:
                return
            key = next(line.split(b":", 1)[1].strip() for line in buf.split(b"\r\n")
                       if line.lower().startswith(b"sec-websocket-key:"))
            accept = base64.b64encode(hashlib.sha1(
                key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\nUpgrade: websocket\n"
                         b"Connection: Upgrade\nSec-WebSocket-Accept: " + accept
                         + b"\n\n\x81\x02hi")
            with contextlib.suppress(OSError):
                conn.recv(100)

    with socket.create_server(("127.0.0.1", 0)) as listener:
        threading.Thread(target=accept_forever, args=(listener, answer), daemon=True).start()
        backend = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with forward_only(backend, "--handshake-timeout", "2") as (proc, port):
            ws = websocket.create_connection(f"ws://127.0.0.1:{port}/", timeout=TIMEOUT)
            try:
                assert ws.recv() == "hi"
            finally:
                ws.close()
            assert "Traceback" not in proc.output(), proc.output()


def test_many_sockets_then_plain_http_and_no_leftover_handlers(proxy: str) -> None:
    """Interleaved sockets do not cross; every way of ending one frees its tunnel, and
    the same proxy keeps serving plain HTTP on fresh connections afterwards."""
    baseline = wait_until(lambda: (b := bridges(proxy))["open"] == 0 and b,
                          what="earlier tunnels to end")
    sockets = [websocket.create_connection(f"ws://{proxy}/many?id=m{i}", timeout=TIMEOUT)
               for i in range(30)]
    try:
        assert bridges(proxy)["open"] == 30
        for i, ws in enumerate(sockets):
            ws.send(f"socket {i}")
        for i, ws in enumerate(reversed(sockets)):
            assert ws.recv() == f"socket {len(sockets) - 1 - i}"
        for i, ws in enumerate(sockets):
            if i % 3 == 0:
                ws.close(status=1000)  # clean client close
            elif i % 3 == 1:
                ws.send("cmd:close 1001 away")  # server close
                assert ws.recv_data(control_frame=True)[0] == ABNF.OPCODE_CLOSE
            else:
                ws.sock.close()  # the client vanishes without a close frame
    finally:
        for ws in sockets:
            close_client(ws, timeout=0.2)
    after = wait_until(
        lambda: (b := bridges(proxy))["open"] == 0
        and b["greenlets"] <= baseline["greenlets"] and b,
        what="all tunnels and their greenlets to end")
    assert after["served"] == baseline["served"] + 30
    for _ in range(3):
        reply = get(f"http://{proxy}/plain", headers={"Connection": "close"})
        assert reply.status_code == 200 and reply.text.startswith("forward-only")


# --- pure parts ----------------------------------------------------------------------


def _environ(**headers: str) -> dict:
    environ = {"REQUEST_METHOD": "GET", "REMOTE_ADDR": "192.0.2.7", "wsgi.url_scheme": "http",
               "HTTP_HOST": "front:80", "HTTP_UPGRADE": "websocket",
               "HTTP_CONNECTION": "Upgrade", "HTTP_SEC_WEBSOCKET_KEY": "k",
               "HTTP_SEC_WEBSOCKET_VERSION": "13"}
    environ.update({"HTTP_" + k.upper(): v for k, v in headers.items()})
    return environ


@pytest.mark.parametrize(("method", "upgrade", "connection", "expected"), [
    ("GET", "websocket", "Upgrade", True),
    ("GET", "WebSocket", "keep-alive, upgrade", True),
    ("POST", "websocket", "Upgrade", False),
    ("GET", "h2c", "Upgrade", False),
    ("GET", "websocket", "keep-alive", False),
    ("GET", "", "", False),
])
def test_is_websocket_upgrade(method: str, upgrade: str, connection: str,
                              expected: bool) -> None:
    environ = {"REQUEST_METHOD": method, "HTTP_UPGRADE": upgrade,
               "HTTP_CONNECTION": connection}
    assert is_websocket_upgrade(environ) is expected


@pytest.mark.parametrize(("extra", "expected"), [
    ({"SERVER_PROTOCOL": "HTTP/1.1", "CONTENT_LENGTH": ""}, True),
    ({"SERVER_PROTOCOL": "HTTP/1.1", "CONTENT_LENGTH": "0"}, True),
    ({"SERVER_PROTOCOL": "HTTP/1.0"}, False),
    ({"CONTENT_LENGTH": "5"}, False),
    ({"HTTP_TRANSFER_ENCODING": "chunked"}, False),
], ids=["http11", "length-0", "http10", "a-body", "chunked-body"])
def test_an_upgrade_of_http10_or_with_a_body_is_ignored(extra: dict, expected: bool) -> None:
    """RFC 9110 7.8 lets a server ignore an Upgrade; the front door does for these, and
    so does the WSGI adapter (cluster.wrap), so both route them as plain requests."""
    environ = {"REQUEST_METHOD": "GET", "HTTP_UPGRADE": "websocket",
               "HTTP_CONNECTION": "Upgrade", **extra}
    assert is_websocket_upgrade(environ) is expected


def _parse_request(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    assert lines[-2:] == ["", ""]
    return lines[0], [tuple(line.split(": ", 1)) for line in lines[1:-2]]  # type: ignore


def test_upgrade_request_head_headers() -> None:
    environ = _environ(connection="Upgrade, X-Secret", x_secret="s", keep_alive="300",
                       proxy="http://evil:1", proxy_authorization="Basic eA==",
                       sec_websocket_protocol="a, b", x_forwarded_for="10.0.0.1",
                       via="1.0 edge", x_cluster_hop="spoofed")
    head = upgrade_request_head(environ, "/p?q=1", "10.0.0.9:3000", [("X-Cluster-Hop", "1")])
    line, headers = _parse_request(head)
    names = [n.lower() for n, _ in headers]
    as_dict = dict(headers)
    assert line == "GET /p?q=1 HTTP/1.1"
    assert not {"x-secret", "keep-alive", "proxy", "proxy-authorization"} & set(names)
    assert as_dict["Sec-WebSocket-Protocol"] == "a, b"
    assert as_dict["Sec-WebSocket-Key"] == "k"
    assert (as_dict["Upgrade"], as_dict["Connection"]) == ("websocket", "Upgrade")
    assert as_dict["Host"] == "front:80"
    # 192.0.2.7 is no trusted proxy: what it claims is replaced by what was seen
    assert as_dict["X-Forwarded-For"] == "192.0.2.7"
    assert as_dict["X-Forwarded-Host"] == "front:80"
    assert as_dict["X-Forwarded-Proto"] == "http"
    trusted = upgrade_request_head(environ, "/p", "10.0.0.9:3000",
                                   trusted_proxies=frozenset({"192.0.2.7"}))
    assert dict(_parse_request(trusted)[1])["X-Forwarded-For"] == "10.0.0.1, 192.0.2.7"
    assert as_dict["Via"] == "1.0 edge, 1.1 cluster"
    assert names.count("x-cluster-hop") == 1 and as_dict["X-Cluster-Hop"] == "1"
    assert len(names) == len(set(names))


def test_upgrade_request_head_endpoint_host_and_injection() -> None:
    endpoint = "10.0.0.9:3000"
    _line, headers = _parse_request(
        upgrade_request_head(_environ(), "/", endpoint, preserve_host=False))
    assert dict(headers)["Host"] == endpoint
    no_host = _environ()
    del no_host["HTTP_HOST"]
    _line, headers = _parse_request(upgrade_request_head(no_host, "/", endpoint))
    assert dict(headers)["Host"] == endpoint  # HTTP/1.1 needs one
    with pytest.raises(ValueError):
        upgrade_request_head(_environ(), "/x\r\nEvil: 1", endpoint)
    with pytest.raises(ValueError):
        upgrade_request_head(_environ(), "/", endpoint, [("X-Hop", "1\r\nEvil: 1")])
    with pytest.raises(ValueError):
        upgrade_request_head(_environ(), "http://elsewhere/", endpoint)


def test_parse_response_head() -> None:
    status, reason, headers = parse_response_head(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Protocol:  echo.v2 \r\n\r\n")
    assert (status, reason) == (101, "Switching Protocols")
    assert headers == [("Upgrade", "websocket"), ("Sec-WebSocket-Protocol", "echo.v2")]
    for bad in (b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 abc X\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n"):
        with pytest.raises(ValueError):
            parse_response_head(bad)


def test_bridge_without_cluster_handler_answers_501() -> None:
    """Under a server that cannot hand the socket over, no tunnel is attempted."""
    seen: list[tuple[str, list]] = []
    bridge = WebSocketBridge()
    body = bridge.bridge(_environ(), lambda s, h: seen.append((s, h)),
                         "http://127.0.0.1:1", "/")
    assert seen[0][0].startswith("501")
    assert b"ClusterHandler" in b"".join(body)
    assert repr(bridge) == "<WebSocketBridge [open: 0 | served: 0 | refused: 0]>"


def test_pump_generic_path_copies_then_closes_both() -> None:
    """Sockets that are not plain gevent sockets (TLS upstreams) take the generic
    copy loop: bytes pass in order, and EOF on the source closes the destination."""
    import threading

    from cluster.proxy.tunnel import _plain_gevent_socket, _pump

    a_out, a_in = socket.socketpair()
    b_in, b_out = socket.socketpair()
    assert not _plain_gevent_socket(a_in)
    moved: list[int] = []
    worker = threading.Thread(target=lambda: moved.append(_pump(a_in, b_in)))
    worker.start()
    try:
        blob = os.urandom(300_000)
        a_out.sendall(blob)
        a_out.close()  # EOF for the pump
        b_out.settimeout(TIMEOUT)
        assert _read_until(b_out, b"", lambda b: False) == blob  # then EOF from the pump
        worker.join(TIMEOUT)
        assert moved == [len(blob)]
    finally:
        for sock in (a_out, a_in, b_in, b_out):
            sock.close()


def test_pump_fast_path_on_gevent_sockets_and_close_from_other_direction() -> None:
    """gevent's own sockets take the wait-then-read loop (this also notices a gevent
    upgrade that drops the internals it uses); closing the source from another greenlet,
    as the other direction does, ends the pump at once."""
    import gevent
    from gevent import socket as gsocket

    from cluster.proxy.tunnel import _plain_gevent_socket, _pump

    a_out, a_in = gsocket.socketpair()
    b_in, b_out = gsocket.socketpair()
    assert _plain_gevent_socket(a_in) and _plain_gevent_socket(b_in)
    try:
        pump = gevent.spawn(_pump, a_in, b_in)
        a_out.sendall(b"frame one")
        with gevent.Timeout(TIMEOUT):
            assert b_out.recv(100) == b"frame one"
            a_in.close()  # what the other direction's pump does when its side ends
            assert pump.get() == len(b"frame one")
            assert b_out.recv(100) == b""  # the pump closed its destination too
    finally:
        for sock in (a_out, a_in, b_in, b_out):
            sock.close()


def _tunnel_between_socketpairs():
    """A Tunnel between (client, endpoint) ends of two gevent socket pairs; returns the
    tunnel, the far ends (client, endpoint) and the list its on_close appends to."""
    from gevent import socket as gsocket

    from cluster.proxy.tunnel import Tunnel

    client, near_client = gsocket.socketpair()
    near_endpoint, endpoint = gsocket.socketpair()
    closed: list[bool] = []
    tunnel = Tunnel(near_client, near_endpoint, lambda: closed.append(True))
    tunnel.start()
    return tunnel, client, endpoint, closed


def test_tunnel_passes_a_half_close_on_and_relays_the_other_way_until_it_ends() -> None:
    """A server that closes a WebSocket first (RFC 6455 7.1.1) ends its sending; the
    client must still get every byte and the EOF, and what the client sends after that
    (the rest of a message, its close frame) must still reach the server. Closing the
    whole tunnel at the first EOF reset the client's connection instead."""
    import gevent

    tunnel, client, endpoint, closed = _tunnel_between_socketpairs()
    try:
        with gevent.Timeout(TIMEOUT):
            endpoint.sendall(b"close frame")
            endpoint.shutdown(socket.SHUT_WR)
            assert _read_until(client, b"", lambda b: False) == b"close frame"  # then EOF
            blob = os.urandom(300_000)
            client.sendall(blob)
            client.shutdown(socket.SHUT_WR)
            assert _read_until(endpoint, b"", lambda b: False) == blob
            while not closed:
                gevent.sleep(0.01)
        assert tunnel.closed and closed == [True]
    finally:
        for sock in (client, endpoint):
            sock.close()


def test_tunnel_half_closed_by_one_side_closes_when_the_other_stays_silent(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import gevent

    from cluster.proxy import tunnel as tunnel_module

    monkeypatch.setattr(tunnel_module, "HALF_CLOSED_SECONDS", 0.3)
    tunnel, client, endpoint, closed = _tunnel_between_socketpairs()
    try:
        with gevent.Timeout(TIMEOUT):
            endpoint.shutdown(socket.SHUT_WR)
            assert client.recv(10) == b""
            began = time.monotonic()
            while not closed:
                gevent.sleep(0.01)
            assert time.monotonic() - began >= 0.2
            assert endpoint.recv(10) == b""  # the tunnel closed the endpoint's side too
    finally:
        for sock in (client, endpoint):
            sock.close()


def test_tunnel_write_timeout_spares_a_reader_that_progresses_and_not_one_that_stopped(
) -> None:
    """A client that reads now and then (every 0.3 s, under the 0.6 s write timeout)
    keeps its tunnel; once it stops reading, the tunnel closes both sides about one
    write timeout later (the stall timer runs only while a send is parked)."""
    import time

    import gevent
    from gevent import socket as gsocket

    from cluster.proxy.tunnel import Tunnel

    client, near_client = gsocket.socketpair()
    near_endpoint, endpoint = gsocket.socketpair()
    closed: list[float] = []
    Tunnel(near_client, near_endpoint, lambda: closed.append(time.monotonic()), 0.6).start()

    def send_forever() -> None:
        try:
            while True:
                endpoint.sendall(b"y" * 65536)
        except OSError:
            pass

    sender = gevent.spawn(send_forever)
    try:
        with gevent.Timeout(TIMEOUT):
            began = time.monotonic()
            while time.monotonic() - began < 2.0:  # past three write timeouts
                gevent.sleep(0.3)
                client.setblocking(False)
                try:
                    while client.recv(1 << 20):
                        pass
                except BlockingIOError:
                    pass
            assert not closed
            stopped = time.monotonic()
            while not closed:
                gevent.sleep(0.05)
            assert 0.5 <= closed[0] - stopped <= 2.0, closed[0] - stopped
            sender.join()  # the endpoint's side was closed too: its send failed
    finally:
        sender.kill()
        for sock in (client, endpoint):
            sock.close()


def test_cluster_handler_leaves_no_reference_cycle() -> None:
    """The hijack hook in the environ must not keep finished connections alive until
    the cycle collector runs (at 10,000 connections that is real memory)."""
    import gc

    import gevent
    from gevent import socket as gsocket
    from gevent.pywsgi import WSGIServer

    from cluster.handler import ClusterHandler

    def app(environ, start_response):
        assert callable(environ["cluster.hijack"])
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    server = WSGIServer(("127.0.0.1", 0), app, handler_class=ClusterHandler, log=None)
    server.start()
    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            with gsocket.create_connection(("127.0.0.1", server.server_port)) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                with gevent.Timeout(TIMEOUT):
                    assert _read_until(sock, b"", lambda b: False).endswith(b"ok")
        gevent.sleep(0.1)  # let the handlers finish their cleanup
        assert sum(isinstance(o, ClusterHandler) for o in gc.get_objects()) == 0
    finally:
        gc.enable()
        server.stop()


def _any_frame(rng: random.Random) -> bytes:
    """A WebSocket frame with a payload of 0 to 70000 bytes (each length encoding),
    masked or not."""
    size = rng.choice([0, 1, 125, 126, 127, 65535, 65536, rng.randrange(70000)])
    masked = rng.random() < 0.5
    head = bytes([0x82])
    bit = 0x80 if masked else 0
    if size < 126:
        head += bytes([bit | size])
    elif size < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", size)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", size)
    return head + (b"\x01\x02\x03\x04" if masked else b"") + b"z" * size


@pytest.mark.parametrize("seed", range(20))
def test_the_tunnel_knows_where_each_frame_ends_however_the_reads_cut_them(
        seed: int) -> None:
    """FrameEdge (what lets a stopping tunnel put its 1001 between two frames): fed a
    stream of frames in reads cut anywhere, it is at an edge exactly after the last
    byte of a frame; read ``want()`` bytes at a time from there, it never reads past
    the end of the frame under way."""
    rng = random.Random(seed)
    frames = [_any_frame(rng) for _ in range(12)]
    stream = b"".join(frames)
    ends = set(itertools.accumulate(len(f) for f in frames)) | {0}
    edge, at = FrameEdge(), 0
    while at < len(stream):
        if rng.random() < 0.3 and not edge.at_edge:  # going away: up to the edge only
            step = edge.want()
            assert step > 0 and at + step <= min(e for e in ends if e > at)
        else:
            step = rng.choice([1, 2, 3, 7, 100, 4096, 65536, 200000])
        piece = stream[at:at + step]
        edge.feed(piece)
        at += len(piece)
        assert edge.at_edge == (at in ends), at
        assert (edge.want() == 0) == edge.at_edge
