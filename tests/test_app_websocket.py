"""The WebSocket a local app gets from the door (cluster/app_websocket.py), under hostile
and heavy messages: unmasked in C, text checked in C, a message size limit (1009), an
unmasked client frame refused (1002).

The e2e tests run a gevent-websocket app (tests/apps/gws_echo.py) as two `cluster serve`
instances with ``--max-websocket-message 65536`` and send raw frames, so each test says
exactly which bytes a hostile client sends; the app is reached on the instance itself
and through the other one (the tunnel relays; the serving instance enforces).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import gevent
import gevent.socket
import pytest
import requests
import websocket
from geventwebsocket.utf8validator import Utf8Validator
from geventwebsocket.websocket import Header

from cluster.app_websocket import (
    PIECE,
    FrameWriter,
    MessageCheck,
    unmask,
    unmask_cooperatively,
)
from helpers import read_until_close, start_library_app, start_serve
from test_local_websocket_e2e import Cluster, cluster_of, view

LIMIT = 65536
SIO = Path(__file__).resolve().parent / "sio"
TEXT, BINARY, CONTINUATION, CLOSE = 0x1, 0x2, 0x0, 0x8


# --- pure logic ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 7, 8, 9, 125, 126, 65536, 70_001])
def test_unmask_is_the_rfc_xor(size: int) -> None:
    payload, mask = os.urandom(size), os.urandom(4)
    expected = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert unmask(payload, mask) == expected
    assert unmask(expected, mask) == payload


def test_a_large_payload_is_unmasked_in_pieces_with_the_same_result() -> None:
    payload, mask = os.urandom(3 * PIECE + 5), os.urandom(4)
    assert bytes(unmask_cooperatively(payload, mask)) == unmask(payload, mask)


def test_a_large_text_is_checked_in_pieces_with_the_same_verdict() -> None:
    text = ("é" * PIECE).encode()  # 2 MiB: two pieces, a character across none
    check = MessageCheck(LIMIT)
    assert check.validate(text) == (True, True, len(text), len(text))
    check.reset()
    broken = text[:PIECE + 1] + b"\xff" + text[PIECE + 2:]  # the é at PIECE, cut
    assert check.validate(broken)[:3] == (False, False, PIECE)


def _samples() -> list[bytes]:
    rng = random.Random(7)
    crafted = [b"", b"ascii", "héllo wörld €𝄞".encode(), b"\xc0\xaf", b"\xe0\x80\xaf",
               b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xff",
               b"\x80", b"a\xe2\x82", b"\xe2\x82\xac", b"\xf0\x9d\x84\x9e", b"\xf0\x9d",
               "€".encode() * 3 + b"\xe2"]
    alphabet = [b"a", "é".encode(), "€".encode(), "𝄞".encode(), b"\xe2", b"\x82", b"\xed",
                b"\xa0", b"\xf4", b"\x90", b"\xc0", b"\xff"]
    made = [b"".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 12)))
            for _ in range(3000)]
    return crafted + made


def test_message_check_agrees_with_gevent_websockets_validator_piece_by_piece() -> None:
    """Same verdict as the pure-Python automaton it replaces, on valid and invalid
    UTF-8 cut into pieces anywhere (frames may split a character)."""
    rng = random.Random(11)
    for data in _samples():
        cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, 3)))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        ours, theirs = MessageCheck(LIMIT), Utf8Validator()
        ours.reset()
        theirs.reset()
        for piece in pieces:
            mine, reference = ours.validate(piece), theirs.validate(piece)
            assert mine[0] == reference[0], (data, pieces)
            if not reference[0]:
                break
            assert mine[1] == reference[1], (data, pieces)


def _header(opcode: int, length: int, fin: bool = True) -> Header:
    return Header(fin=fin, opcode=opcode, flags=0, length=length)


def test_message_check_counts_a_message_over_its_frames() -> None:
    check = MessageCheck(100)
    check.admit(_header(BINARY, 60, fin=False))
    check.admit(_header(0x9, 125))  # a ping between the pieces does not count
    check.admit(_header(CONTINUATION, 40, fin=False))
    with pytest.raises(Exception, match="limit 100"):
        check.admit(_header(CONTINUATION, 1))
    check.admit(_header(TEXT, 100))  # a new message starts the count again
    with pytest.raises(Exception, match="limit 100"):
        check.admit(_header(BINARY, 2 ** 63 - 1))


def test_frame_writer_takes_turns_first_come_first_served() -> None:
    """Frames of several greenlets to a slow reader go out whole and in the order they
    were asked for: a close asked for while a greenlet sends without pause comes after
    the frame being written, not after all of that greenlet's frames (gevent's locks let
    the greenlet that releases one take it straight back) and not in its middle."""
    ours, theirs = gevent.socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    writer = FrameWriter(ours.sendall)
    data = [b"\x82\x7f" + struct.pack("!Q", 65536) + bytes([i]) * 65536 for i in range(20)]
    closing = b"\x88\x02\x03\xe9"

    started = []  # frames the sender began to write
    asked = []  # how many it had begun when the close was asked for

    def sender() -> None:
        for piece in data:
            started.append(piece)
            writer(piece)

    def closer() -> None:
        gevent.sleep(0.05)  # the sender waits in the middle of a frame by then
        asked.append(len(started))
        writer(closing)

    greenlets = [gevent.spawn(sender), gevent.spawn(closer)]
    received = b""
    with gevent.Timeout(10):
        while len(received) < sum(map(len, data)) + len(closing):
            gevent.sleep(0.001)
            received += theirs.recv(8192)
    gevent.joinall(greenlets, raise_error=True)
    ours.close()
    theirs.close()
    frames = []
    while received:
        size, at = (2, 2) if received[:1] == b"\x88" else (65536, 10)
        frames.append(received[:at + size])
        received = received[at + size:]
    assert 0 < asked[0] < len(data)
    assert frames.index(closing) == asked[0], [f[:2] for f in frames]
    assert [f for f in frames if f != closing] == data


# --- e2e: two `cluster serve` instances of the gevent-websocket echo app ---------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    store = f"sqlite://{tmp_path_factory.mktemp('appws') / 'discovery.sqlite3'}"
    with cluster_of("gws_echo:app", "gws", store, "--max-websocket-message",
                    str(LIMIT)) as cluster:
        yield cluster


def frame(opcode: int, payload: bytes, fin: bool = True, masked: bool = True,
          announced: int | None = None) -> bytes:
    """One client frame; ``announced`` puts another length in the header than sent."""
    length = len(payload) if announced is None else announced
    first = (0x80 if fin else 0) | opcode
    bit = 0x80 if masked else 0
    if length < 126:
        head = struct.pack("!BB", first, bit | length)
    elif length < 65536:
        head = struct.pack("!BBH", first, bit | 126, length)
    else:
        head = struct.pack("!BBQ", first, bit | 127, length)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + unmask(payload, mask)


class Conn:
    """A raw WebSocket client connection to instance ``a``, pinned to ``pick``."""

    def __init__(self, pair: Cluster, pick: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", pair.ports["a"]), timeout=10)
        self.sock.sendall(
            b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Cookie: cluster-endpoint::gws=" + pair.hashes[pick].encode() + b"\r\n\r\n")
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            assert chunk, self.buffer
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head

    def _take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError(f"closed with {self.buffer[:200]!r}")
            self.buffer += chunk
        taken, self.buffer = self.buffer[:size], self.buffer[size:]
        return taken

    def read_frame(self) -> tuple[int, bytes]:
        first, second = self._take(2)
        length = second & 0x7F
        if length == 126:
            length = struct.unpack("!H", self._take(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self._take(8))[0]
        assert not second & 0x80, "a server's frames are not masked"
        return first & 0x0F, self._take(length)

    def close_code(self) -> tuple[int, bytes]:
        """The close frame the server sends next, then the end of the connection."""
        opcode, payload = self.read_frame()
        assert opcode == CLOSE, (opcode, payload[:100])
        rest, closed = read_until_close(self.sock, 5)
        assert closed, "the connection stays open after the close frame"
        return struct.unpack("!H", payload[:2])[0], payload[2:]

    def name(self) -> str:
        self.sock.sendall(frame(TEXT, b"cmd:name"))
        opcode, payload = self.read_frame()
        return payload.decode()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@contextlib.contextmanager
def connected(pair: Cluster, pick: str) -> Iterator[Conn]:
    conn = Conn(pair, pick)
    try:
        assert conn.name() == pick
        yield conn
    finally:
        conn.close()


PICKS = pytest.mark.parametrize("pick", ["a", "b"],
                                ids=["served-here", "through-another-instance"])


@PICKS
def test_a_message_at_the_limit_is_echoed_whole(pair: Cluster, pick: str) -> None:
    with connected(pair, pick) as conn:
        blob = os.urandom(LIMIT)
        conn.sock.sendall(frame(BINARY, blob))
        assert conn.read_frame() == (BINARY, blob)
        text = ("é€𝄞" * (LIMIT // 9)).encode()
        conn.sock.sendall(frame(TEXT, text[:1001], fin=False))  # splits a character
        conn.sock.sendall(frame(CONTINUATION, text[1001:]))
        assert conn.read_frame() == (TEXT, text)


@PICKS
@pytest.mark.parametrize("frames", [
    [frame(BINARY, bytes(LIMIT + 1))],
    [frame(TEXT, b"x" * 30000, fin=False), frame(CONTINUATION, b"y" * 30000, fin=False),
     frame(CONTINUATION, b"z" * 30000)],
    [frame(BINARY, b"", announced=2 ** 62)],  # only the header: the payload never comes
    # still being sent when refused: the close frame must not be lost to a reset
    [frame(BINARY, bytes(8 << 20))],
], ids=["one-frame", "three-frames", "announced-2**62", "8-MiB"])
def test_a_message_past_the_limit_closes_with_1009(pair: Cluster, pick: str,
                                                   frames: list[bytes]) -> None:
    with connected(pair, pick) as conn:
        for data in frames:
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                conn.sock.sendall(data)
        assert conn.close_code() == (1009, b"message too big")
    with connected(pair, pick) as conn:  # the instance serves on
        conn.sock.sendall(frame(TEXT, b"still here"))
        assert conn.read_frame() == (TEXT, b"still here")


@PICKS
@pytest.mark.parametrize("size", [LIMIT, 5_000_000])
def test_nodes_ws_client_gets_the_echo_or_1009(pair: Cluster, pick: str, size: int) -> None:
    """A real client (node's ws) sending a message past the limit gets the close frame
    with 1009, not a reset: the instance reads the rest of the message before it
    closes (else the reset overtook the close frame and ws reported 1006)."""
    if not (SIO / "node_modules" / "ws").is_dir() or not shutil.which("node"):
        pytest.fail(f"node or its ws package is missing: run `npm ci` in {SIO}")
    done = subprocess.run(
        ["node", str(SIO / "ws_send.js"), pair.url("a").replace("http", "ws", 1) +
         "/echo", str(size), pair.cookie(pick)], capture_output=True, text=True, timeout=60,
        env={**os.environ, "NODE_PATH": str(SIO / "node_modules")})
    assert done.returncode == 0, done.stdout + done.stderr
    seen = json.loads(done.stdout)
    if size <= LIMIT:
        assert seen == {"echo": size, "close": 1000, "reason": ""}, seen
    else:
        assert seen == {"close": 1009, "reason": "message too big"}, seen


@PICKS
def test_an_unmasked_client_frame_closes_with_1002(pair: Cluster, pick: str) -> None:
    with connected(pair, pick) as conn:
        conn.sock.sendall(frame(TEXT, b"not masked", masked=False))
        assert conn.close_code()[0] == 1002


@PICKS
def test_invalid_utf8_text_closes_with_1007(pair: Cluster, pick: str) -> None:
    with connected(pair, pick) as conn:
        conn.sock.sendall(frame(TEXT, b"ok \xed\xa0\x80 surrogate"))
        assert conn.close_code()[0] == 1007


def test_a_16_mib_message_is_echoed_whole_under_the_default_limit(tmp_path: Path) -> None:
    """The default limit (16 MiB) admits a 16 MiB message, text or binary, and unmasks
    it right; one byte more is refused."""
    store = f"sqlite://{tmp_path / 'discovery.sqlite3'}"
    proc, port = start_serve("--service", "gws", "--app", "gws_echo:app",
                             env={"CLUSTER_DISCOVERY_URL": store, "BACKEND_NAME": "a"},
                             name="appws-default")
    try:
        pair = Cluster("gws")
        pair.ports["a"] = port
        pair.hashes["a"] = view(pair.url("a"))["hash"]
        with connected(pair, "a") as conn:
            blob = os.urandom(16 << 20)
            conn.sock.sendall(frame(BINARY, blob))
            assert conn.read_frame() == (BINARY, blob)
            text = ("é" * (8 << 20)).encode()
            conn.sock.sendall(frame(TEXT, text))
            assert conn.read_frame() == (TEXT, text)
            conn.sock.sendall(frame(BINARY, b"", announced=(16 << 20) + 1))
            assert conn.close_code() == (1009, b"message too big")
    finally:
        alive = proc.poll() is None
        proc.stop()
    assert alive and "Traceback" not in proc.output(), proc.output()[-3000:]


@pytest.mark.parametrize("wrapped", [False, True], ids=["cluster-serve", "cluster.wrap"])
def test_a_flood_of_empty_frames_does_not_hold_the_process(sqlite_url: str,
                                                           wrapped: bool) -> None:
    """A client sends frames faster than the app reads them: empty continuation frames,
    which grow no message and get no answer. The process's other clients are served
    meanwhile. Under cluster.wrap() the socket reads from pywsgi's buffered file, which
    never waits while bytes are there: the process answered nobody else for as long as
    the flood lasted (the front door's reader gives the others a turn)."""
    env = {"CLUSTER_DISCOVERY_URL": sqlite_url, "BACKEND_NAME": "a"}
    if wrapped:
        proc, port = start_library_app({**env, "CLUSTER_SERVICE": "flood"}, "gws_echo:app",
                                       name="flood-wrapped")
    else:
        proc, port = start_serve("--service", "flood", "--app", "gws_echo:app", env=env,
                                 name="flood")
    flood = socket.create_connection(("127.0.0.1", port), timeout=10)
    stop = threading.Event()

    def pump() -> None:
        blob = frame(CONTINUATION, b"", fin=False) * 20000
        with contextlib.suppress(OSError):
            while not stop.is_set():
                flood.sendall(blob)

    pumping = threading.Thread(target=pump, daemon=True)
    try:
        flood.sendall(b"GET /flood HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                      b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                      b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        assert flood.recv(4096).startswith(b"HTTP/1.1 101 ")
        flood.sendall(frame(TEXT, b"x", fin=False))  # a message that never ends
        pumping.start()
        time.sleep(0.5)
        began = time.monotonic()
        assert requests.get(f"http://127.0.0.1:{port}/whoami", timeout=5).text == "a"
        other = websocket.create_connection(f"ws://127.0.0.1:{port}/", timeout=5)
        other.send("still here")
        assert other.recv() == "still here"
        other.close()
        assert time.monotonic() - began < 3
        assert pumping.is_alive()  # the flood went on all the while
    finally:
        stop.set()
        flood.close()
        pumping.join(10)
        proc.stop()
    assert "Traceback" not in proc.output(), proc.output()[-3000:]
