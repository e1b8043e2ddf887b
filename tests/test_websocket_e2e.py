"""WebSocket traffic through a real `cluster serve` balancer to registered endpoints.

The client is websocket-client, the endpoints are gevent-websocket echo servers
(tests/apps/ws_echo.py) registered by `cluster register` sidecars: the product's own
path from routing decision to frame pumping, not a stand-in proxy.
"""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import requests
import websocket
from websocket import ABNF

from cluster.records import endpoint_hash
from helpers import Proc, cluster_argv, start_app, start_serve, wait_until


class EchoMember:
    def __init__(self, discovery_url: str, name: str) -> None:
        self.server, self.port = start_app("ws_echo.py", name=name)
        self.url = f"http://127.0.0.1:{self.port}"
        try:
            self.sidecar = Proc(cluster_argv("register", "--service", "web", "--endpoint-url",
                                             self.url, "--ping-interval", "1"),
                                env={"CLUSTER_DISCOVERY_URL": discovery_url},
                                name=f"sc-{name}")
        except BaseException:
            self.server.stop()
            raise

    def stop(self) -> None:
        self.sidecar.stop()
        self.server.stop()


@pytest.fixture
def cluster_ws(sqlite_url):
    with contextlib.ExitStack() as stops:  # a failed start still stops what started
        members = []
        for n in (1, 2):
            members.append(EchoMember(sqlite_url, f"echo{n}"))
            stops.callback(members[-1].stop)
        front, port = start_serve("--ui-service", "web", "--ping-interval", "1",
                                  env={"CLUSTER_DISCOVERY_URL": sqlite_url}, name="balancer")
        stops.callback(front.stop)
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: len(requests.get(base + "/_cluster/status", timeout=5)
                               .json()["endpoints"]) == 2, timeout=10)
        yield base, members, front
    assert "Traceback" not in front.output()


def connect(base: str, path: str = "/ws", **kwargs) -> websocket.WebSocket:
    return websocket.create_connection(base.replace("http", "ws", 1) + path, timeout=10,
                                       **kwargs)


def test_text_binary_large_and_fragmented_messages(cluster_ws):
    base, _, _ = cluster_ws
    ws = connect(base, subprotocols=["chat.v1", "echo.v2"])
    try:
        assert ws.getsubprotocol() == "echo.v2"
        ws.send("héllo")
        assert ws.recv() == "héllo"
        blob = os.urandom(4096)
        ws.send_binary(blob)
        opcode, data = ws.recv_data()
        assert (opcode, data) == (ABNF.OPCODE_BINARY, blob)
        big = os.urandom(1024 * 1024)
        ws.send_binary(big)
        assert ws.recv_data()[1] == big
        ws.send_frame(ABNF.create_frame("frag", ABNF.OPCODE_TEXT, fin=0))
        ws.send_frame(ABNF.create_frame("ment", ABNF.OPCODE_CONT, fin=0))
        ws.send_frame(ABNF.create_frame("ed", ABNF.OPCODE_CONT, fin=1))
        assert ws.recv() == "fragmented"
        ws.send("cmd:frames")
        assert ws.recv() == "3", "the three fragments reached the endpoint as three frames"
        ws.send("cmd:headers")
        headers = json.loads(ws.recv())["headers"]
        assert headers.get("X-Cluster-Hop") == "1"
        assert "127.0.0.1" in headers.get("X-Forwarded-For", "")
    finally:
        ws.close()


def test_client_close_code_and_reason_reach_the_endpoint(cluster_ws):
    base, members, _ = cluster_ws
    target = members[0]
    ws = connect(base, "/ws?id=client-closes",
                 cookie=f"cluster-endpoint::web={endpoint_hash(target.url)}")
    ws.send("ping")
    assert ws.recv() == "ping"
    ws.close(status=4001, reason=b"client done")
    got = wait_until(lambda: (lambda r: r.json() if r.status_code == 200 else None)(
        requests.get(target.url + "/closes?id=client-closes", timeout=5)), timeout=5)
    assert got == {"code": 4001, "reason": "client done"}


def test_server_close_code_and_reason_reach_the_client(cluster_ws):
    base, _, _ = cluster_ws
    ws = connect(base, "/ws")
    ws.send("cmd:close 4003 bye now")
    frame = ws.recv_frame()
    assert frame.opcode == ABNF.OPCODE_CLOSE
    assert int.from_bytes(frame.data[:2], "big") == 4003 and frame.data[2:] == b"bye now"
    ws.close()


def test_refused_upgrade_reaches_the_client_as_its_status(cluster_ws):
    base, _, _ = cluster_ws
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        connect(base, "/forbidden")
    assert info.value.status_code == 403


def test_sticky_cookie_pins_websockets_and_dead_endpoint_is_not_a_hang(cluster_ws):
    base, members, _ = cluster_ws
    target = members[1]
    cookie = f"cluster-endpoint::web={endpoint_hash(target.url)}"
    for _ in range(5):
        ws = connect(base, "/ws", cookie=cookie)
        ws.send("cmd:headers")
        assert json.loads(ws.recv())["headers"]["Host"].startswith("127.0.0.1")
        ws.close()
    target.server.kill()
    # the pinned endpoint is gone: the handshake goes to the live one, promptly
    ws = connect(base, "/ws", cookie=cookie)
    ws.send("still here")
    assert ws.recv() == "still here"
    ws.close()
