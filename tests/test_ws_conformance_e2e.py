"""RFC 6455 conformance of the WebSocket a local app gets, as a hostile client sees it.

Autobahn|Testsuite's categories (framing, pings, reserved bits and opcodes,
fragmentation, UTF-8, close handling), written as raw frames against two real
`cluster serve` instances of the gevent-websocket echo app (tests/apps/gws_echo.py),
and again as two cluster.wrap() members under a WSGIServer of their own:
each case runs on the instance the client connected to, and on the other one through
the transparent tunnel, which must pass every frame and the close handshake as they
are and end both TCP sides promptly. Where the RFC leaves the choice to the server,
the expectation is what Autobahn marks OK.

Each case sends its frames at once and then expects the frames it lists; a case whose
list does not end with a close frame then closes the socket itself (1000, echoed).
After the close frame the server must end the TCP connection within a second, with
nothing after the close frame, and the process serves the next client (the fixture
also checks that no instance died or logged a traceback).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from helpers import wait_until
from test_app_websocket import (
    BINARY,
    CLOSE,
    CONTINUATION,
    LIMIT,
    PICKS,
    SIO,
    TEXT,
    Conn,
    frame,
)
from test_local_websocket_e2e import Cluster, cluster_of

PING, PONG = 0x9, 0xA
RSV1, RSV2, RSV3 = 0x40, 0x20, 0x10
#: how soon the server must end the TCP connection after its close frame
PROMPT = 1.0


@pytest.fixture(scope="module", params=["serve", "wrap"],
                ids=["cluster-serve", "cluster.wrap-under-WSGIServer"])
def pair(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The app under `cluster serve` (the door), or made a member by cluster.wrap() under
    a WSGIServer with ClusterHandler (library mode; the default message limit)."""
    store = f"sqlite://{tmp_path_factory.mktemp('wsconf') / 'discovery.sqlite3'}"
    with cluster_of("gws_echo:app", "gws", store, "--max-websocket-message", str(LIMIT),
                    wrapped=request.param == "wrap") as cluster:
        cluster.wrapped = request.param == "wrap"  # type: ignore[attr-defined]
        yield cluster


def close(code: int, reason: bytes = b"") -> bytes:
    return frame(CLOSE, struct.pack("!H", code) + reason)


def text(data: bytes | str, fin: bool = True) -> bytes:
    return frame(TEXT, data.encode() if isinstance(data, str) else data, fin=fin)


def more(data: bytes | str, fin: bool = True) -> bytes:
    return frame(CONTINUATION, data.encode() if isinstance(data, str) else data, fin=fin)


def stretched(opcode: int, payload: bytes, width: int) -> bytes:
    """A masked frame whose length takes ``width`` extra bytes (2 or 8) even when fewer
    would do (RFC 6455 5.2 asks the sender for the minimal encoding)."""
    mask = b"\x01\x02\x03\x04"
    size = struct.pack("!BH" if width == 2 else "!BQ", 0x80 | (126 if width == 2 else 127),
                       len(payload))
    return bytes([0x80 | opcode]) + size + mask + bytes(
        b ^ mask[i % 4] for i, b in enumerate(payload))


#: what the server answers: a frame as (opcode, payload), or FAILS(code) for a close
#: frame whose code alone is checked
Reply = tuple[int, bytes]


def FAILS(code: int) -> Reply:  # noqa: N802 - reads as a constant in the tables
    return (CLOSE, struct.pack("!H", code))


def ECHO(code: int, reason: bytes = b"") -> Reply:  # noqa: N802
    return (CLOSE, struct.pack("!H", code) + reason)


NORMAL = ECHO(1000)
PAYLOAD_125 = bytes(range(125))
Case = tuple[list[bytes], list[Reply]]

CONTROL: dict[str, Case] = {
    "ping-0": ([frame(PING, b"")], [(PONG, b"")]),
    "ping-125": ([frame(PING, PAYLOAD_125)], [(PONG, PAYLOAD_125)]),
    "ping-126": ([frame(PING, bytes(126))], [FAILS(1002)]),
    "ping-fragmented": ([frame(PING, b"frag", fin=False), more(b"ment")], [FAILS(1002)]),
    "pong-fragmented": ([frame(PONG, b"frag", fin=False), more(b"ment")], [FAILS(1002)]),
    "close-fragmented": ([frame(CLOSE, b"\x03\xe8", fin=False), more(b"")], [FAILS(1002)]),
    "unsolicited-pong": ([frame(PONG, b"unasked"), text("after")], [(TEXT, b"after")]),
    "pings-between-fragments": (
        [text("frag", fin=False), frame(PING, b"p1"), more("me", fin=False),
         frame(PING, b"p2"), more("nt")],
        [(PONG, b"p1"), (PONG, b"p2"), (TEXT, b"fragment")]),
    "ping-burst": ([frame(PING, b"%d" % i) for i in range(100)] + [text("done")],
                   [(PONG, b"%d" % i) for i in range(100)] + [(TEXT, b"done")]),
}

RESERVED: dict[str, Case] = {
    "rsv1-text": ([frame(TEXT | RSV1, b"x")], [FAILS(1002)]),
    "rsv2-after-a-text": ([text("ok"), frame(TEXT | RSV2, b"x"), frame(PING, b"p")],
                          [(TEXT, b"ok"), FAILS(1002)]),
    "rsv3-text": ([frame(TEXT | RSV3, b"x")], [FAILS(1002)]),
    "rsv1+3-binary": ([frame(BINARY | RSV1 | RSV3, b"x")], [FAILS(1002)]),
    "rsv2+3-ping": ([frame(PING | RSV2 | RSV3, b"x")], [FAILS(1002)]),
    "rsv-all-close": ([frame(CLOSE | RSV1 | RSV2 | RSV3, b"\x03\xe8")], [FAILS(1002)]),
    **{f"opcode-{op:#x}": ([frame(op, b"x" * op)], [FAILS(1002)])
       for op in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)},
    "opcode-0x5-after-a-text": ([text("ok"), frame(5, b""), frame(PING, b"p")],
                                [(TEXT, b"ok"), FAILS(1002)]),
}

FRAGMENTS: dict[str, Case] = {
    "continuation-unstarted": ([more("x")], [FAILS(1002)]),
    "continuation-unstarted-nofin": ([more("x", fin=False), more("y")], [FAILS(1002)]),
    "text-inside-text": ([text("a", fin=False), text("b")], [FAILS(1002)]),
    "binary-inside-text": ([text("a", fin=False), frame(BINARY, b"b")], [FAILS(1002)]),
    "empty-fragments": ([text("", fin=False), more("", fin=False), more("")], [(TEXT, b"")]),
    "empty-first-and-last": ([frame(BINARY, b"", fin=False), more(b"\0\1", fin=False),
                              more(b"")], [(BINARY, b"\0\1")]),
    "one-byte-fragments": ([text("a", fin=False)] + [more(bytes([97 + i % 26]), fin=False)
                                                     for i in range(1, 299)] + [more("!")],
                           [(TEXT, bytes(97 + i % 26 for i in range(299)) + b"!")]),
}

_MUSIC = "𝄞".encode()
_KOSME = "κόσμε".encode()
UTF8: dict[str, Case] = {
    **{f"invalid-{name}": ([text(data)], [FAILS(1007)]) for name, data in {
        "ff": b"ab\xff", "overlong": b"\xc0\xaf", "surrogate": _KOSME + b"\xed\xa0\x80ed",
        "past-u10ffff": b"\xf4\x90\x80\x80", "five-bytes": b"\xf8\x88\x80\x80\x80",
        "cut-at-the-end": b"abc\xe2\x82"}.items()},
    "invalid-across-fragments": ([text(_KOSME + b"\xf4", fin=False), more(b"\x90\x80\x80ed")],
                                 [FAILS(1007)]),
    "cut-at-the-end-of-fragments": ([text("ab", fin=False), more(b"\xe2\x82")], [FAILS(1007)]),
    # fail fast: the rest of the message never comes
    "fail-fast-first-fragment": ([text(b"ok\xff", fin=False)], [FAILS(1007)]),
    "fail-fast-split-prefix": ([text(b"ok\xf4", fin=False), more(b"\x90", fin=False)],
                               [FAILS(1007)]),
    "fail-fast-surrogate-prefix": ([text(b"\xed", fin=False), more(b"\xa0", fin=False)],
                                   [FAILS(1007)]),
    # fail fast inside one frame: its announced rest never comes (Autobahn 6.4.3-4)
    "fail-fast-inside-a-frame": ([frame(TEXT, _KOSME + b"\xf4\x90\x80\x80",
                                        announced=len(_KOSME) + 10)], [FAILS(1007)]),
    "fail-fast-inside-a-frame-surrogate": ([frame(TEXT, b"ok\xed\xa0", announced=10)],
                                           [FAILS(1007)]),
    "valid-split-characters": ([text(_KOSME[:3], fin=False), more(_KOSME[3:8], fin=False),
                                more(_KOSME[8:])], [(TEXT, _KOSME)]),
    "valid-4-byte-char-in-4-frames": ([text(_MUSIC[:1], fin=False)] +
                                      [more(_MUSIC[i:i + 1], fin=i == 3) for i in (1, 2, 3)],
                                      [(TEXT, _MUSIC)]),
}

CLOSING: dict[str, Case] = {
    "close-empty": ([frame(CLOSE, b"")], [NORMAL]),
    "close-1-byte": ([frame(CLOSE, b"\x03")], [FAILS(1002)]),
    **{f"close-invalid-{code}": ([close(code)], [FAILS(1002)])
       for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535)},
    **{f"close-valid-{code}": ([close(code, b"bye")], [ECHO(code, b"bye")])
       for code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
                    3000, 3999, 4000, 4999)},
    "close-reason-123": ([close(1000, b"r" * 123)], [ECHO(1000, b"r" * 123)]),
    "close-reason-124": ([close(1000, b"r" * 124)], [FAILS(1002)]),
    "close-reason-invalid": ([close(1000, _KOSME + b"\xed\xa0\x80")], [FAILS(1007)]),
    "close-reason-cut": ([close(1000, _KOSME[:3])], [FAILS(1007)]),
    "data-after-close": ([close(1000), text("ignored"), frame(PING, b"ignored")], [NORMAL]),
    "close-twice": ([close(1000), close(1001)], [NORMAL]),
    "close-between-fragments": ([text("frag", fin=False), close(1000), more("ment")],
                                [NORMAL]),
}

FRAMING: dict[str, Case] = {
    **{f"binary-{size}": ([frame(BINARY, bytes(size))], [(BINARY, bytes(size))])
       for size in (0, 125, 126, 127, 65535, 65536)},
    "length-msb-set": ([frame(BINARY, b"", announced=(1 << 63) + 5)], [FAILS(1002)]),
    "length-16-bit-for-5": ([stretched(TEXT, b"hello", 2)], [(TEXT, b"hello")]),
    "length-64-bit-for-5": ([stretched(BINARY, b"hello", 8)], [(BINARY, b"hello")]),
    "ping-length-16-bit": ([stretched(PING, b"hello", 2)], [FAILS(1002)]),
    "unmasked-ping": ([frame(PING, b"p", masked=False)], [FAILS(1002)]),
}

CASES = {**CONTROL, **RESERVED, **FRAGMENTS, **UTF8, **CLOSING, **FRAMING}


@contextlib.contextmanager
def opened(pair: Cluster, pick: str) -> Iterator[Conn]:
    """A connection pinned to ``pick``, after a round trip that shows the instance serves."""
    conn = Conn(pair, pick)
    try:
        assert conn.name() == pick
        conn.sock.settimeout(3)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        yield conn
    finally:
        conn.close()


def replies(conn: Conn, count: int) -> list[Reply]:
    """Up to ``count`` frames, fewer when a close frame (the last) or the end comes first."""
    got: list[Reply] = []
    with contextlib.suppress(EOFError, socket.timeout, ConnectionResetError):
        while len(got) < count and (not got or got[-1][0] != CLOSE):
            got.append(conn.read_frame())
    return got


def ends_promptly(conn: Conn) -> None:
    """After its close frame the server ends the TCP connection at once, with nothing
    more and with a FIN, not a reset (which can destroy the close frame before the
    client reads it: node's ws then reports 1006)."""
    began = time.monotonic()
    rest = b""
    with contextlib.suppress(socket.timeout):
        while chunk := conn.sock.recv(65536):
            rest += chunk
    took = time.monotonic() - began
    assert conn.buffer + rest == b"" and not chunk, "more after the close frame"
    assert took < PROMPT, f"the connection ended {took:.2f} s after the close frame"


def matches(got: list[Reply], want: list[Reply]) -> bool:
    """Frames as expected; a FAILS(code) close frame may carry a reason."""
    if len(got) != len(want):
        return False
    return all(g == w or (w[0] == CLOSE == g[0] and len(w[1]) == 2 and g[1][:2] == w[1])
               for g, w in zip(got, want))


def run(pair: Cluster, pick: str, case: str) -> None:
    frames, want = CASES[case]
    with opened(pair, pick) as conn:
        for data in frames:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.sock.sendall(data)
        got = replies(conn, len(want))
        assert matches(got, want), (got, want)
        if want[-1][0] != CLOSE:
            conn.sock.sendall(close(1000))
            assert replies(conn, 1) == [NORMAL]
        ends_promptly(conn)


@PICKS
@pytest.mark.parametrize("case", list(CASES))
def test_rfc6455_case(pair: Cluster, pick: str, case: str) -> None:
    run(pair, pick, case)


def _chopped(conn: Conn, data: bytes) -> None:
    for i in range(len(data)):
        conn.sock.sendall(data[i:i + 1])
        time.sleep(0.001)


@PICKS
def test_frames_chopped_into_single_bytes(pair: Cluster, pick: str) -> None:
    """Autobahn 2.6 and 5.x with chops: a frame may come a byte at a time."""
    with opened(pair, pick) as conn:
        _chopped(conn, frame(PING, PAYLOAD_125) + text("chop", fin=False) + more("ped"))
        assert replies(conn, 2) == [(PONG, PAYLOAD_125), (TEXT, b"chopped")]
        _chopped(conn, close(1000, b"done"))
        assert replies(conn, 1) == [ECHO(1000, b"done")]
        ends_promptly(conn)


def open_sockets(pair: Cluster) -> dict[str, int]:
    """The sockets each instance holds open, read off /proc (the door counts its
    connections too, cluster.wrap() does not: the descriptors tell for both)."""
    seen = {}
    for name, proc in zip(("a", "b"), pair.procs):
        count = 0
        for fd in Path(f"/proc/{proc.pid}/fd").iterdir():
            with contextlib.suppress(OSError):  # closed since the listing
                count += os.readlink(fd).startswith("socket:")
        seen[name] = count
    return seen


def test_both_instances_let_go_of_the_connection_at_once(pair: Cluster) -> None:
    """Through the tunnel, whoever closes: instance ``a`` (the tunnel) and ``b`` (the
    app) both close their sockets as soon as the client has (not HALF_CLOSED_SECONDS
    or LINGER_SECONDS later)."""
    before = open_sockets(pair)
    for case in ("close-valid-1000", "ping-126", "fail-fast-first-fragment",
                 "data-after-close"):
        run(pair, "b", case)
    with opened(pair, "b") as conn:
        conn.sock.sendall(text("cmd:close 4000 bye"))
        assert replies(conn, 1) == [ECHO(4000, b"bye")]
        ends_promptly(conn)
    wait_until(lambda: all(n <= before[name] for name, n in open_sockets(pair).items()),
               timeout=PROMPT, interval=0.05, what=f"sockets back to {before}")


@PICKS
@pytest.mark.parametrize("first, want", [
    (frame(TEXT | RSV1, b"x"), FAILS(1002)), (text(b"\xff"), FAILS(1007)),
    (close(999), FAILS(1002)), (text("cmd:close 4000 kick"), ECHO(4000, b"kick")),
], ids=["rsv1", "invalid-utf8", "close-999", "app-closes"])
def test_a_close_while_the_client_still_sends(pair: Cluster, pick: str, first: bytes,
                                              want: Reply) -> None:
    """The server closes (fails the connection, or the app closes it) while the client
    has more bytes on the way, as Autobahn sends its frames: they are read and dropped
    until the client closes, and the connection ends with a FIN. Closed with bytes
    unread, it ended with a reset, which can overtake the close frame."""
    with opened(pair, pick) as conn:
        flood = b"".join(frame(BINARY, bytes(60000)) for _ in range(40))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, socket.timeout):
            conn.sock.sendall(first + flood)
        assert matches(replies(conn, 1), [want])
        ends_promptly(conn)


@PICKS
def test_nodes_ws_client_gets_the_apps_close_while_it_sends(pair: Cluster, pick: str) -> None:
    """The app closes (4000) while node's ws is still sending a 5 MB message: ws reports
    the app's code and reason, not 1006 (as it did when the instance reset the
    connection with the message unread)."""
    if not (SIO / "node_modules" / "ws").is_dir() or not shutil.which("node"):
        pytest.fail(f"node or its ws package is missing: run `npm ci` in {SIO}")
    done = subprocess.run(
        ["node", str(SIO / "ws_send.js"), pair.url("a").replace("http", "ws", 1) + "/echo",
         "5000000", pair.cookie(pick), "cmd:close 4000 kick"], capture_output=True,
        text=True, timeout=60, env={**os.environ, "NODE_PATH": str(SIO / "node_modules")})
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout) == {"close": 4000, "reason": "kick"}, done.stdout


@PICKS
@pytest.mark.parametrize("command, want", [
    ("cmd:close 4003 bye now", ECHO(4003, b"bye now")),
    ("cmd:close 1000 ", ECHO(1000)),
    ("cmd:return", NORMAL),
], ids=["app-closes-4003", "app-closes-1000", "app-returns"])
@pytest.mark.parametrize("answer", [True, False], ids=["client-answers", "client-silent"])
def test_the_app_ends_the_socket(pair: Cluster, pick: str, command: str, want: Reply,
                                 answer: bool) -> None:
    """An app's close(code, reason) reaches the client whole, an app that just returns
    closes with 1000, and the TCP connection then ends at once, whether the client
    answers with its close frame (RFC 6455 5.5.1) or not."""
    with opened(pair, pick) as conn:
        conn.sock.sendall(text(command))
        assert replies(conn, 1) == [want]
        if answer:
            conn.sock.sendall(frame(CLOSE, want[1][:2]))
        ends_promptly(conn)


@PICKS
def test_a_client_that_resets_while_its_messages_are_echoed(pair: Cluster, pick: str) -> None:
    """The echo app's send() meets the reset (gevent-websocket raises WebSocketError,
    which the app, as most, does not catch): one line in the log, not a traceback, and
    the instance serves on."""
    for _ in range(3):
        with opened(pair, pick) as conn:
            with contextlib.suppress(OSError):
                conn.sock.sendall(text("x" * 30000) * 50)
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with opened(pair, pick):
        pass
    for proc in pair.procs:
        assert "Traceback" not in proc.output(), proc.output()[-3000:]


@PICKS
def test_the_app_closes_from_another_greenlet(pair: Cluster, pick: str) -> None:
    """An app closes while its reading greenlet waits in receive() (as engineio's writer
    does): the client's answering close frame wakes that receive(), which returns None
    (a TypeError escaped it: the close had dropped the socket's read function)."""
    with opened(pair, pick) as conn:
        conn.sock.sendall(text("cmd:close-later 4001 later"))
        assert replies(conn, 1) == [ECHO(4001, b"later")]
        conn.sock.sendall(close(4001))
        ends_promptly(conn)
    time.sleep(0.1)
    for proc in pair.procs:
        assert "Traceback" not in proc.output(), proc.output()[-3000:]
