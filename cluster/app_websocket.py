"""The WebSocket a local app gets (``environ['wsgi.websocket']``), fit for hostile clients.

It is gevent-websocket's ``WebSocket``, so apps, Flask-Sockets, python-socketio and
Flask-SocketIO use it as they would under gevent-websocket's own handler. As released,
that class

- unmasks every frame byte by byte and checks text with a UTF-8 automaton written in
  Python (unless the optional wsaccel is installed): one 16 MiB message held the whole
  process, and every other client of it, for 1.5-2.7 s;
- checks text only once a whole frame came (an invalid first byte of a 16 MiB frame,
  or of one whose rest never comes, waits for it), checks it again, then decodes it;
- takes a message of any size: a frame header may announce 2^63 bytes, and
  continuation frames grow a message without end;
- accepts unmasked frames from a client (RFC 6455 5.1: the server must close);
- writes a close frame's reason without its code;
- checks a client's close frame loosely (RFC 6455 5.5.1, 7.4): echoes codes 5000 and
  up, and a reason cut in the middle of a character, refuses 1012-1014 (registered
  since: service restart, try again later, bad gateway);
- ends the TCP connection with bytes of the client unread: the kernel sends a reset,
  which can overtake the close frame (node's ws reports 1006, not the code);
- reads frames for as long as the client's bytes are there: under a WSGIServer of
  one's own (pywsgi's buffered socket file, which never waits while it has bytes), a
  client sending empty frames without pause held the process, and every other client
  of it, for as long as it went on;
- lets any greenlet write a frame while another one's waits for a slow client: the
  second lands in the middle of the first (the door's 1001 at a stop, a drain or a
  rebalance, an app's ``close()`` or ``send()`` from another greenlet), or raises
  gevent's ConcurrentObjectUseError.

Here unmasking is one XOR of two big integers and text is decoded by CPython's UTF-8
decoder (both in C) as it arrives, which is its check; a message past
``--max-websocket-message`` closes the socket with 1009 before its payload is read, an
unmasked frame or a length with its top bit set closes it with 1002, close frames carry
their code and are checked as Autobahn's testsuite expects, and after the close frame
our side of the connection ends (FIN) at once while :func:`cluster.netio.linger` reads what the
client still sends (the door calls it when the app returns), a socket reading frames
without a wait lets the process's other connections have a turn every few milliseconds
(as the door's reader does), and frames are written one at a time, whole, in the order
they were asked for (:class:`FrameWriter`).
"""

from __future__ import annotations

import codecs
import socket
from collections import deque
from typing import Any, Callable

from gevent.event import Event
from geventwebsocket.exceptions import ProtocolError, WebSocketError
from geventwebsocket.websocket import MSG_ALREADY_CLOSED, Header, WebSocket

from cluster.netio import Turns, let_others_run, linger

#: close codes no endpoint may put in a close frame (RFC 6455 7.4.1)
_UNSENDABLE = frozenset({1004, 1005, 1006, 1015})

#: close codes a client may send: RFC 6455 7.4.1's, 1012-1014 (IANA registry), and
#: 3000-4999 (libraries, applications); Autobahn 7.7 and 7.9 test both sides
_RECEIVABLE = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015), *range(3000, 5000)})

#: RFC 6455 7.4.1: "a message that is too big for it to process"
MESSAGE_TOO_BIG = 1009
#: RFC 6455 7.4.1: "an unexpected condition that prevented it from fulfilling the request"
INTERNAL_ERROR = 1011

_TEXT, _BINARY, _CONTINUATION = WebSocket.OPCODE_TEXT, WebSocket.OPCODE_BINARY, \
    WebSocket.OPCODE_CONTINUATION


class MessageTooBig(Exception):
    """A message grew past the limit. Not a WebSocketError: gevent-websocket's receive()
    closes those with 1000 (a socket error) or 1002 (a ProtocolError); this one gets 1009."""


#: a big message is unmasked and checked this much at a time, the process's other
#: connections served in between (a multiple of 4, so each piece starts at the mask's
#: first byte): about 4 ms of CPU each
PIECE = 1 << 20


def unmask(payload: bytes | memoryview, mask: bytes) -> bytes:
    """``payload`` XOR the 4-byte ``mask`` repeated (RFC 6455 5.3), in C."""
    size = len(payload)
    if not size:
        return b""
    key = (mask * (size // 4 + 1))[:size]
    mixed = int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")
    return mixed.to_bytes(size, "little")


def unmask_cooperatively(payload: bytes, mask: bytes) -> bytes | bytearray:
    """:func:`unmask` piece by piece, yielding to other greenlets between pieces, so a
    16 MiB message does not hold every other client of the process for its whole
    unmasking (about 70 ms)."""
    if len(payload) <= PIECE:
        return unmask(payload, mask)
    view = memoryview(payload)
    plain = bytearray()
    for start in range(0, len(payload), PIECE):
        plain += unmask(view[start:start + PIECE], mask)
        let_others_run()
    return plain


class MessageCheck:
    """Stands where gevent-websocket keeps its UTF-8 validator (the object's slots are
    fixed, so the state lives here): follows each message over its frame headers (the
    order of its frames, its size against the limit, text or not), and decodes text
    incrementally with CPython's decoder, which is the UTF-8 check."""

    __slots__ = ("limit", "size", "text", "open", "parts", "turns", "_decoder", "_total")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: gives the process's other connections a turn between frames read without a
        #: wait; None when the socket's reader does so itself (the door's)
        self.turns: Turns | None = None
        self.size = 0  # bytes of the message being read, announced so far
        self.text = False  # the message being read is text
        self.open = False  # a message was started and not finished (FIN) yet
        self.parts: list[str] = []  # the text message so far, decoded
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._total = 0

    def admit(self, header: Header) -> bool:
        """Check ``header``'s frame against its message before its payload is read: out
        of order (RFC 6455 5.4) it raises ProtocolError, past the limit MessageTooBig.
        True when its payload is text."""
        if header.opcode in (_TEXT, _BINARY):
            if self.open:
                raise ProtocolError("a new message before the fragmented one ended")
            self.size = header.length
            self.text = header.opcode == _TEXT
            self.reset()
        elif header.opcode == _CONTINUATION:
            if not self.open:
                raise ProtocolError("a continuation frame with no message started")
            self.size += header.length
        else:
            return False  # control frames: at most 125 bytes, checked by Header
        self.open = not header.fin
        if self.size > self.limit:
            raise MessageTooBig(f"message of {self.size} bytes or more, "
                                f"limit {self.limit}")
        return self.text

    def finish(self) -> str:
        """The text message, ended: UnicodeError when it ends inside a character."""
        if self._decoder.getstate()[0]:
            raise UnicodeError("text message ends inside a character")
        text, self.parts = "".join(self.parts), []
        return text

    # gevent-websocket's validator interface: reset() per message, validate() per piece

    def reset(self) -> None:
        self._decoder.reset()
        self._total = 0
        self.parts = []

    def validate(self, data: bytes) -> tuple[bool, bool, int, int]:
        """(valid, ends on a whole character, index in ``data``, index in the message)."""
        view = memoryview(data)
        for start in range(0, len(data), PIECE):
            if start:
                let_others_run()
            try:
                self.parts.append(self._decoder.decode(view[start:start + PIECE], False))
            except UnicodeDecodeError as exc:
                at = start + exc.start
                return False, False, at, self._total + at
        pending = self._decoder.getstate()[0]
        if pending[:1] == b"\xed" and pending[1:2] >= b"\xa0":
            # a surrogate's first two bytes: CPython waits for the third to say so,
            # the automaton it replaces fails at once (the same verdict a frame sooner)
            return False, False, len(data), self._total + len(data)
        self._total += len(data)
        return True, not pending, len(data), self._total


class AppWebSocket(WebSocket):  # type: ignore[misc]
    """gevent-websocket's WebSocket with the fixes above; see :func:`adopt`."""

    __slots__ = ()

    def read_frame(self) -> tuple[Header, bytes | bytearray]:
        """gevent-websocket's: one frame, its payload unmasked, for an app that reads
        frames itself (text included: read_message() alone takes text as decoded)."""
        return self._read_frame(True)

    def _read_frame(self, keep_text: bool) -> tuple[Header, bytes | bytearray]:
        header = Header.decode_header(self.stream)
        turns = self.utf8validator.turns
        if turns is not None:  # frames sent without pause: the others' turn now and then
            turns.check()
        if self.closed:  # by another greenlet while this one waited (its reads are gone)
            raise WebSocketError(MSG_ALREADY_CLOSED)
        if header.flags:
            raise ProtocolError("reserved bits set without an extension")
        if not header.mask:
            raise ProtocolError("unmasked frame from a client")
        if header.length >> 63:
            raise ProtocolError("payload length with its most significant bit set")
        text = self.utf8validator.admit(header)
        if not header.length:
            return header, b""
        # In the middle of a frame the door bounds each wait for the client by
        # --write-timeout (between frames there is no timeout): a client that announces
        # a large message and stops would otherwise hold what it sent for ever.
        rfile = self.handler.rfile
        bounded = hasattr(rfile, "in_message")
        if bounded:
            rfile.in_message = True
        try:
            if text:  # decoded into the MessageCheck as it arrives; bytes for read_frame()
                return header, self.read_text(header.length, header.mask, keep_text)
            try:
                payload = self.raw_read(header.length)
            except OSError:
                payload = b""
        finally:
            if bounded:
                rfile.in_message = False
        if len(payload) != header.length:
            raise WebSocketError("Unexpected EOF reading frame payload")
        return header, unmask_cooperatively(payload, header.mask)

    def read_text(self, length: int, mask: bytes, keep: bool = False) -> bytes | bytearray:
        """A text frame's payload, unmasked and decoded (into the MessageCheck) as its
        bytes arrive: invalid UTF-8 fails the connection at once, not once the rest of
        the frame came (which may be never; Autobahn 6.4.3-4 want it so). The unmasked
        bytes are returned when ``keep`` (read_frame()), else b""."""
        rfile, check = self.handler.rfile, self.utf8validator
        kept = bytearray()
        # what is buffered, else one receive: the door's reader has read_some, pywsgi's
        # buffered socket file (cluster.wrap() under ClusterHandler) read1
        read_some = getattr(rfile, "read_some", None) or rfile.read1
        done = 0
        while done < length:
            piece = read_some(min(length - done, PIECE))
            if not piece:
                raise WebSocketError("Unexpected EOF reading frame payload")
            turn = done % 4  # the mask byte this piece starts at
            plain = unmask(piece, mask[turn:] + mask[:turn])
            if not check.validate(plain)[0]:
                raise UnicodeError("invalid UTF-8 in a text message")
            if keep:
                kept += plain
            if done // PIECE != (done + len(piece)) // PIECE:
                let_others_run()  # a big message arriving at full speed: a MiB at a time
            done += len(piece)
        return kept

    def read_message(self) -> Any:
        """gevent-websocket's: frames up to a whole message (control frames answered
        between them). The order of frames was checked, and text decoded, as they came
        (MessageCheck, read_text): once, where gevent-websocket checks it twice and
        then decodes it."""
        message = bytearray()
        while True:
            header, payload = self._read_frame(False)
            opcode = header.opcode
            if opcode == self.OPCODE_PING:
                self.handle_ping(header, payload)
            elif opcode == self.OPCODE_PONG:
                self.handle_pong(header, payload)
            elif opcode == self.OPCODE_CLOSE:
                self.handle_close(header, payload)
                return None
            elif opcode not in (_TEXT, _BINARY, _CONTINUATION):
                raise ProtocolError(f"reserved opcode {opcode}")
            else:
                message += payload  # (text frames: b"")
                if header.fin:
                    break
        check = self.utf8validator
        return check.finish() if check.text else message

    def receive(self) -> Any:
        """gevent-websocket's: the next message, or None once the socket is closed."""
        try:
            return super().receive()
        except MessageTooBig:
            self.close(MESSAGE_TOO_BIG, "message too big")
            return None

    def handle_close(self, header: Header, payload: bytes | bytearray) -> None:
        """The client's close frame, echoed (RFC 6455 5.5.1) when it is well formed: no
        payload, or a code a client may send and a reason that is whole UTF-8. Else
        the connection fails: 1002, or 1007 for the reason (receive() closes)."""
        if not payload:
            self._closed_by_client()
            self.close(1000, b"")
            return
        if len(payload) < 2:
            raise ProtocolError("a close frame of one byte")
        reason = bytes(payload[2:])
        try:
            reason.decode("utf-8")
        except UnicodeDecodeError:
            raise UnicodeError("a close reason that is not UTF-8") from None
        code = int.from_bytes(payload[:2], "big")
        if code not in _RECEIVABLE:
            raise ProtocolError(f"close code {code}")
        self._closed_by_client()
        self.close(code, reason)

    def _closed_by_client(self) -> None:
        """The client's close frame, well formed, came: see :func:`end_websocket`."""
        if self.handler is not None:
            self.handler.close_received = True

    def close(self, code: int | None = 1000, message: Any = b"") -> None:
        """A close frame as RFC 6455 5.5.1 has it: the 2-byte code, then the reason.
        As released, ``close(code, message)`` writes the message alone: its echo of a
        client's close, and an app's own ``close(4000, "why")``, reach the client with
        the reason's first two bytes as the code (websockets and Node's ws fail the
        connection, Chromium reports code 25209)."""
        was_open = not self.closed
        if not was_open:
            self.current_app.on_close(MSG_ALREADY_CLOSED)
        if isinstance(message, str):
            reason = message.encode("utf-8")
        else:
            reason = bytes(message or b"")
        payload = b""  # no code, or one that may not be sent (1005, 1006, 1015...)
        if isinstance(code, int) and 1000 <= code <= 4999 and code not in _UNSENDABLE:
            # a control frame holds 125 bytes: the reason is cut there, on a character
            payload = code.to_bytes(2, "big") + \
                reason[:123].decode("utf-8", "ignore").encode("utf-8")
        try:
            self.send_frame(payload, opcode=self.OPCODE_CLOSE)
            if was_open:  # nothing may follow a close frame: the client sees the end
                self.handler.socket.shutdown(socket.SHUT_WR)  # now, not when the app returns
        except OSError:  # WebSocketError too
            pass  # the socket is being closed anyway
        finally:  # as gevent-websocket's close() leaves it (its slots, unknown to mypy)
            for name, value in (("closed", True), ("stream", None), ("raw_write", None),
                                ("raw_read", None), ("environ", None)):
                setattr(self, name, value)


class FrameWriter:
    """The socket's write as a WebSocket uses it: one frame at a time, whole, in the
    order greenlets asked (gevent-websocket writes each frame with one call). A frame
    waiting for a slow client had another greenlet's written into its middle: the
    client read its bytes as payload, then a frame cut short (1006, not the 1001 of a
    stop). First come, first served: gevent's locks let the greenlet that releases one
    take it again at once, so an app sending without pause kept the door's 1001 out."""

    __slots__ = ("write", "busy", "_waiting")

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self.write = write
        self.busy = False  # a frame is being written
        self._waiting: deque[Event] = deque()  # greenlets waiting their turn

    def __call__(self, data: bytes) -> None:
        if self.busy:
            turn = Event()
            self._waiting.append(turn)
            try:
                turn.wait()
            except BaseException:  # killed (a stop's end) or timed out while waiting
                if turn.is_set():
                    self._next()  # it was handed the turn: pass it on
                else:
                    self._waiting.remove(turn)
                raise
        else:
            self.busy = True
        try:
            self.write(data)
        finally:
            self._next()

    def _next(self) -> None:
        if self._waiting:
            self._waiting.popleft().set()  # still busy: the turn is handed over
        else:
            self.busy = False


#: how long a WebSocket whose closing handshake is complete lingers (what the client
#: sent just before its close frame may still be on the way)
AFTER_CLOSE_SECONDS = 0.25


def end_websocket(handler: Any, sock: Any, read: Callable[[int], bytes]) -> None:
    """The end of a WebSocket the local app served: close lingering (netio.linger: a
    FIN, not a reset that loses the last close frame), until the client closes too, or,
    once its close frame came, for AFTER_CLOSE_SECONDS. Then the closing handshake is
    complete, nothing follows but the client's FIN, and RFC 6455 7.1.1 has the server
    close the TCP connection first: a client that waits for that (websocket-client
    does) held the socket open for LINGER_SECONDS, and a stop or a drain with it."""
    if getattr(handler, "close_received", False):
        linger(sock, read, AFTER_CLOSE_SECONDS)
    else:
        linger(sock, read)


def run_app(app: Callable[..., Any], environ: dict[str, Any], websocket: Any) -> None:
    """Run a WebSocket ``app`` as gevent-websocket's handler does: its result iterated
    (a middleware written as a generator runs the app only then), then closed (PEP
    3333). An app that raises has its socket closed with 1011 (internal error) before
    the exception goes on to the handler's log: the close that follows otherwise
    (gevent-websocket's, when the app is done) says 1000, a normal closure, and a
    client that reconnects only after a failure took the crash for a goodbye."""
    try:
        result = app(environ, _no_response)
        try:
            for _ in result:
                pass
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
    except Exception:
        if not websocket.closed:
            websocket.close(INTERNAL_ERROR, "internal error")
        raise


def _no_response(*args: Any) -> Callable[[bytes], None]:
    """start_response for an app on a WebSocket: it has nothing left to answer."""
    return lambda data: None


def adopt(websocket: Any, max_message: int,
          write: Callable[[bytes], None] | None = None) -> None:
    """Make gevent-websocket's freshly made WebSocket a :class:`AppWebSocket` (same
    slots, so the class can be swapped: the handler builds the object itself).

    ``write`` replaces its socket's ``sendall`` (the door's bounded send: a client that
    stops reading is let go after --write-timeout, and the app's ``send()`` raises
    gevent-websocket's WebSocketError, instead of blocking for as long as the client
    keeps the connection). Either is used through a :class:`FrameWriter`."""
    if type(websocket) is WebSocket:
        websocket.__class__ = AppWebSocket
        websocket.utf8validator = MessageCheck(max_message)
        if not hasattr(websocket.handler.rfile, "turns"):  # not the door's reader
            websocket.utf8validator.turns = Turns()
        websocket.raw_write = FrameWriter(write if write is not None
                                          else websocket.raw_write)
