"""Relay one request from a front-door client to an endpoint, and its answer back.

No WSGI here: the request head was parsed once by the door; it is rewritten once
(hop-by-hop fields out, X-Forwarded-* and the hop marker in) and sent with the body as
its framing says; the response head is parsed once and passed on with minimal edits
(the sticky cookie added, hop-by-hop fields out); bodies stream through in pieces as
they arrive, at the pace of the slower side (a full socket buffer is back-pressure).
nginx equivalent::

    proxy_http_version 1.1; proxy_set_header Connection "";   # keep-alive upstream
    proxy_buffering off; proxy_request_buffering off;          # stream both ways
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; ...
    proxy_next_upstream error timeout;                          # see attempts.py

Policy choices and known weak spots:

- ``Expect: 100-continue`` is answered by this instance once the endpoint is connected,
  and not forwarded; the endpoint gets the body straight after the head.
- A request body is sent whole before the response is read. An endpoint that answers
  early (413) and closes is handled: its answer is read after the failed send, and the
  client connection ends after it (the rest of the body is never read as requests),
  closing lingering (the door drains what the client still sends, as after a malformed
  request).
- The read timeout bounds the wait for a whole response head (from the end of the
  request, and afresh after each interim answer), and each read of a body after it.
- A small request (no body, or one already in the buffer) found a pooled connection
  closed under it is resent once on a fresh connection; a streamed body is not, so it
  always goes over a fresh connection.
- Interim 1xx answers (100, 103) are not passed on, and more than
  :data:`~cluster.http1.MAX_INTERIM` of them is a 502; a 101 is, for WebSocket
  upgrades only (the only Upgrade passed on).
- A connection that carried a HEAD is not pooled (some servers send a body anyway).
- A small request, and a small answer that is all here, is sent once the other
  connections ready in the same pass of the event loop have run (:func:`_after_others`):
  fewer wake-ups of the processes on the other end, no wait when nothing else is ready.
- Between plain TCP sockets, the rest of a large Content-Length body (past the first
  8 KiB read with the head) goes endpoint -> pipe -> client with ``os.splice``
  (:meth:`Exchange._splice_fixed`, cluster/proxy/pipes.py) and never enters Python;
  TLS endpoints, chunked and until-close bodies are copied through Python as before.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from socket import MSG_MORE
from typing import Any, Callable

from gevent import sleep

from cluster.conn import BODY, NONE, UPSTREAM, WRITE, ClientConn
from cluster.errors import (
    ClientLeft,
    RequestError,
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
    dropping,
    misbehaving,
)
from cluster.http1 import (
    CHUNKED,
    CRLF,
    FIXED,
    HEAD_END,
    MAX_INTERIM,
    NO_BODY,
    ChunkedScanner,
    ChunkError,
    RequestHead,
    ResponseHead,
    crlf_head,
    find_response_head,
    parse_response_head,
    plain_chunked,
    response_framing,
    without_field,
)
from cluster.netio import Turns, is_plain, send_all, wait_writable
from cluster.proxy import pipes
from cluster.proxy.attempts import closes_new, replayable
from cluster.proxy.upstream import Connection, Pool

log = logging.getLogger(__name__)

#: Largest response head accepted from an endpoint, checked on every read.
MAX_RESPONSE_HEAD = 65536
#: Largest single read (see cluster.netio on why not more).
RECV_SIZE = 65536
#: The first read of an answer: its head and a 64 KiB body in one read (at 64 KiB the
#: last few hundred bytes cost a read of their own). Still below the allocator's mmap
#: threshold: strace shows no mmap, munmap or brk per read.
HEAD_READ = RECV_SIZE + 16384
#: The first read of an answer when its body may be spliced (both sockets plain TCP):
#: the head and the start of the body; the rest of a large body never enters Python.
#: (Smaller measured better at 64 KiB: 16 KiB cost 1.8 µs more per answer.)
SPLICE_HEAD_READ = 8192
#: A Content-Length body with at least this much left after the first read is moved
#: endpoint -> pipe -> client with os.splice (cluster.proxy.pipes), not copied.
SPLICE_FROM = 16384
#: Request bodies up to this size that are already in the buffer are kept for a resend.
RESEND_LIMIT = 65536
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
#: Body bytes read with a response head are kept as a view, not a copy, from this size.
_VIEW_FROM = 8192
_VALID_PROTO = (b"http", b"https")
_SPLICE_NONBLOCK = getattr(os, "SPLICE_F_NONBLOCK", 2)
_SPLICING = pipes.AVAILABLE


class Forwarding:
    """What this instance adds to every request it relays (fixed per process)."""

    __slots__ = ("trusted", "scheme", "via")

    def __init__(self, trusted: frozenset[str], scheme: bytes = b"http") -> None:
        self.trusted = trusted
        self.scheme = scheme
        self.via = b"1.1 cluster"

    def lines(self, head: RequestHead, peer: str) -> list[bytes]:
        """X-Forwarded-For/-Proto/-Host, X-Real-IP, Forwarded and Via for ``head``.

        From a trusted peer (--trusted-proxies) the client's values are kept (and the
        scheme validated); from anyone else they are replaced by what this instance
        saw, so an endpoint can believe them.
        """
        address = peer.encode()
        if peer in self.trusted:
            xff = head.forwarded_for + b", " + address if head.forwarded_for else address
            proto = head.forwarded_proto.split(b",")[0].strip().lower()
            if proto not in _VALID_PROTO:
                proto = self.scheme
            out = [b"X-Forwarded-For: " + xff, b"X-Forwarded-Proto: " + proto,
                   b"X-Real-IP: " + (head.real_ip or address)]
            host = head.forwarded_host or head.host
            if head.forwarded:
                out.append(b"Forwarded: " + head.forwarded)
        else:
            out = [b"X-Forwarded-For: " + address, b"X-Forwarded-Proto: " + self.scheme,
                   b"X-Real-IP: " + address]
            host = head.host
        if host:
            out.append(b"X-Forwarded-Host: " + host)
        out.append(b"Via: " + (head.via + b", " + self.via if head.via else self.via))
        return out


def request_head(head: RequestHead, target: bytes, hostport: bytes, forwarded: list[bytes],
                 hop: bytes, framing: bytes, upgrade: bool = False) -> bytes:
    """The head sent to the endpoint (see the module docstring). ``hop`` holds the hop
    marker line (or any CRLF-joined lines to add last; b"" for none)."""
    fields = head.fields
    named = [t for t in head.connection if t not in (b"close", b"keep-alive", b"upgrade")]
    if named:  # fields the client named in Connection are hop-by-hop too
        drop = set(named)
        fields = [f for f in fields if f.partition(b":")[0].lower() not in drop]
    parts = [head.method + b" " + target + b" HTTP/1.1", b"Host: " + (head.host or hostport)]
    parts += fields
    if head.cookie:
        parts.append(b"Cookie: " + head.cookie)
    if framing:
        parts.append(framing)
    if upgrade:
        parts.append(b"Upgrade: " + head.upgrade)
        parts.append(b"Connection: Upgrade")
    parts += forwarded
    if hop:
        parts.append(hop)
    return CRLF.join(parts) + HEAD_END


class Exchange:
    """One request's trip to one endpoint (tried again by attempts.py on another)."""

    __slots__ = ("client", "head", "pool", "url", "upstream", "raw_head", "response",
                 "started", "upstream_seconds", "sent", "splice", "cut")

    def __init__(self, client: ClientConn, head: RequestHead, pool: Pool, url: str) -> None:
        self.client = client
        self.head = head
        self.pool = pool
        self.url = url
        self.upstream: Connection | None = None
        self.raw_head = b""
        self.response: ResponseHead | None = None
        self.started = 0.0
        self.upstream_seconds = 0.0
        self.sent = 0  # bytes written to the client
        self.splice = False  # the answer's body may be spliced (see _read_head)
        self.cut = False  # the request body was not all sent (the endpoint answered early)

    def send_request(self, out_head: bytes, body: bytes | None) -> None:
        """Send the head and the body; ``body`` is the whole body when it is already
        here (None: stream it from the client as its framing says).

        Raises UpstreamConnectError (nothing sent), UpstreamBroken, UpstreamTimeout;
        the client's own faults are not the endpoint's: RequestError 400 for a malformed
        chunked body, OSError when the client left in the middle of its body.
        """
        started = self.started = time.monotonic()
        client = self.client
        pool = self.pool
        head = self.head
        streamed = body is None
        # A WebSocket gets a connection of its own: a pooled one may lead to an endpoint
        # that is stopping (it finishes requests on open connections but accepts no new
        # ones), which would take the upgrade and then end it with the drain; a new
        # connection is refused there and the upgrade goes to another endpoint.
        fresh = streamed or head.is_websocket
        if not fresh and client.small_answers:
            _after_others()
        conn = None if fresh else pool.acquire(self.url)
        resent = False
        while True:
            if conn is None:
                conn = open_after_stale(pool, self.url, resent, head.method, head.has_body)
            self.upstream = conn
            client.upstream = conn
            try:
                if head.expect_continue and (streamed or body):
                    head.expect_continue = False
                    client.send(CONTINUE)
                # From here until the response head is in, the read timeout applies
                # (the sweeper answers 504 past it).
                client.phase = UPSTREAM
                client.deadline = started + pool.read_timeout if pool.read_timeout else 0.0
                if streamed:
                    send_all(conn.sock, out_head)
                    self._stream_body(conn)
                    client.expect(UPSTREAM, pool.read_timeout)
                else:
                    send_all(conn.sock, out_head + body if body else out_head)
                self._read_head(conn)
                return
            except _Stale:
                log.debug("%s: pooled connection was closed, resending on a new one", self.url)
                conn.close()
                conn = None
                resent = True
                started = time.monotonic()
            except RequestError:
                conn.close()  # no 502, no retry, no warning about the endpoint
                raise
            except _ClientGone as exc:
                conn.close()  # nor for a client that left in the middle of its body:
                # nginx's 499 too (it was a status 0, an error of the endpoint's)
                raise ClientLeft(self.url, f"client {client.peer}: {exc}") from None
            except UpstreamError:
                conn.close()
                raise
            except OSError as exc:
                conn.close()
                raise self._error(exc, "sending the request") from None
            finally:
                client.phase = NONE

    def _error(self, exc: BaseException, doing: str) -> UpstreamError:
        if self.client.gone:
            return ClientLeft(self.url, f"client {self.client.peer} closed its connection "
                                        f"({doing})")
        if self.client.timed_out:
            return UpstreamTimeout(self.url, f"no answer within the read timeout ({doing})")
        return UpstreamBroken(self.url, f"{doing}: {exc}")

    def _stream_body(self, conn: Connection) -> None:
        """Relay the client's body to the endpoint as its framing says."""
        client = self.client
        head = self.head
        sock = conn.sock
        # a body sent and taken at full speed never waits: the others get turns
        turns = Turns()
        try:
            if head.chunked:
                scanner = ChunkedScanner()
                while not scanner.done:
                    turns.check()
                    if not client.buf:
                        client.expect(BODY, client.write_timeout)
                        if not _from_client(client.fill):
                            raise _ClientGone("client closed in the middle of its body")
                    used, _ = scanner.feed(bytes(client.buf))
                    client.expect(UPSTREAM, self.pool.read_timeout)
                    send_all(sock, client.buf[:used])
                    del client.buf[:used]
            else:
                left = head.content_length
                while left > 0:
                    turns.check()
                    if not client.buf:
                        client.expect(BODY, client.write_timeout)
                    data = _from_client(client.take, min(left, RECV_SIZE))
                    if not data:
                        raise _ClientGone("client closed in the middle of its body")
                    client.expect(UPSTREAM, self.pool.read_timeout)
                    send_all(sock, data)
                    left -= len(data)
        except ChunkError as exc:
            raise RequestError(400, f"bad chunked body: {exc}") from None
        except OSError as exc:
            if isinstance(exc, _ClientGone):
                raise
            # The endpoint may have answered early (413) and closed: read its answer.
            # The rest of the client's body is still to come on the client connection,
            # so that connection ends after the answer (see relay_response).
            self.cut = True
            log.debug("%s: sending the body failed (%s); reading an early answer", self.url,
                      exc)
        finally:
            client.phase = NONE

    def _read_head(self, conn: Connection) -> None:
        """Read the response head (skipping interim 1xx but 101) into self.response.
        The caller has set the client's phase and deadline for the wait."""
        client = self.client
        buf = bytes(conn.buf)  # bytes here (no copy)
        conn.buf = b""
        reader = conn.reader
        interim = 0
        # A plain endpoint socket: read little, splice the rest of a large body.
        splice = self.splice = conn.plain and _SPLICING
        size = SPLICE_HEAD_READ if splice else HEAD_READ
        while True:
            sep = 4  # the length of the blank line ending the head
            end = buf.find(HEAD_END)
            if end < 0 and buf and (b"\n\n" in buf or b"\n\r\n" in buf):
                # a bare-LF head already here, after an interim answer in the same read
                # (waiting for more bytes waited out the read timeout: a 504)
                end, sep = find_response_head(buf)
            # The deadline is not moved while a head comes in: the read timeout bounds
            # the wait for the whole head, so a head trickled in a byte at a time ends
            # in a 504 too (the body's reads each get the read timeout, nginx-like).
            while end < 0:
                if len(buf) > MAX_RESPONSE_HEAD:
                    raise misbehaving(UpstreamBroken(self.url,
                                                     "response head larger than 64 KiB"))
                if no_status_line(buf):
                    raise misbehaving(UpstreamBroken(self.url, not_http(buf)))
                try:
                    data = reader.recv(size)
                except OSError as exc:
                    if not buf and conn.reused and not client.timed_out and \
                            not client.gone:
                        raise _Stale() from None
                    error = self._error(exc, "reading the response head")
                    if type(error) is UpstreamBroken:
                        dropping(error, not buf and not interim and not conn.reused
                                 and closes_new(self.url, self.pool.connect_timeout))
                    raise error from None
                if not data:
                    if not buf and conn.reused:
                        raise _Stale()
                    raise dropping(UpstreamBroken(self.url, closed_before_head(buf)),
                                   not buf and not interim
                                   and closes_new(self.url, self.pool.connect_timeout))
                buf = buf + data if buf else data
                end = buf.find(HEAD_END)
                if end < 0 and (b"\n\n" in buf or b"\n\r\n" in buf):
                    end, sep = find_response_head(buf)  # lines that end in bare LF
            if end > MAX_RESPONSE_HEAD:
                raise misbehaving(UpstreamBroken(self.url,
                                                 "response head larger than 64 KiB"))
            raw = buf[:end] if sep == 4 else crlf_head(buf[:end])
            try:
                response = parse_response_head(raw)
            except ValueError as exc:
                raw, response, end, sep = _bare_lf_head(self.url, buf, end, sep, exc)
            if response.code >= 200 or (response.code == 101 and self.head.is_websocket):
                break
            if response.code == 101:
                # RFC 9110 15.2.2: only to a request that asked, and only a WebSocket
                # upgrade is passed on (h2c, or an Upgrade on a POST, is not): relayed as
                # an answer, the client would switch protocols on a connection the door
                # still reads as HTTP/1.1, and the endpoint connection would be pooled.
                raise misbehaving(UpstreamBroken(self.url, "101 to a request without Upgrade"))
            # 100 Continue, 103 Early Hints: not passed on (see the module docstring). Each
            # says the endpoint is alive, so the next head gets the read timeout afresh;
            # an endless stream of them is bounded by their number.
            interim += 1
            if interim > MAX_INTERIM:
                raise misbehaving(UpstreamBroken(
                    self.url, f"more than {MAX_INTERIM} interim (1xx) answers"))
            client.expect(UPSTREAM, self.pool.read_timeout)
            buf = buf[end + sep:]
        if response.transfer and not plain_chunked(response.transfer):
            # Only chunked is asked for (the client's TE is not passed on, RFC 9110
            # 10.1.4): gzip data passed as content, or a coding clients cannot read
            # (http.client, h11 know only chunked), is worse than a 502 (as nginx).
            raise misbehaving(UpstreamBroken(
                self.url, f"Transfer-Encoding {response.transfer[:60]!r}: not plain chunked"))
        # The body bytes that came with the head: a large piece is not copied out of the
        # read, only viewed (relay_response sends it as it is, or copies it to scan it).
        end += sep
        conn.buf = buf[end:] if len(buf) - end < _VIEW_FROM else memoryview(buf)[end:]
        self.raw_head = raw
        self.response = response
        self.upstream_seconds = time.monotonic() - self.started

    # --- the answer ---------------------------------------------------------------

    def relay_response(self, extra: bytes, client_keep: bool) -> bool:
        """Send the response to the client; returns whether the client connection may
        carry another request. ``extra`` holds CRLF-led header lines to add.

        Once a byte is sent, failures close the connection (raise OSError to the door)
        rather than being retried: :attr:`sent` says how far it got.
        """
        response = self.response
        conn = self.upstream
        assert response is not None and conn is not None
        client = self.client
        head = self.head
        if self.cut:
            # An early answer: what is left of the request body would be read as the
            # next request (a desync a front proxy could be used to smuggle requests
            # through), and the endpoint connection is out of step. Neither is kept.
            client_keep = False
            response = response._replace(keep_alive=False)
        key = (self.raw_head, head.method, head.version, client_keep, extra)
        known = _RELAYED.get(key)
        if known is None:
            known = _relayed_head(response, head, client_keep, extra)
            if len(self.raw_head) <= _RELAYED_KEPT_MAX:
                if len(_RELAYED) >= _RELAYED_MAX:
                    _RELAYED.clear()
                _RELAYED[key] = known
        mode, length, dechunk, client_keep, out = known
        buf = conn.buf
        conn.buf = b""
        pool_it = response.keep_alive and head.method != b"HEAD"
        try:
            if mode == NO_BODY:
                if buf:
                    pool_it = False  # bytes after a body-less answer: out of step
                self._to_client(out)
            elif mode == FIXED:
                first = buf[:length]
                if len(buf) > length:
                    pool_it = False  # bytes past the response: never hand them to anyone
                left = length - len(first)
                if left >= SPLICE_FROM and self.splice and is_plain(client.sock) and \
                        self._splice_fixed(conn, out, first, left):
                    left = 0
                elif len(first) < _VIEW_FROM and not (left and self.splice):
                    if not left:
                        _after_others()
                    self._to_client(out + first)
                else:
                    # The head, the first piece and whatever else of the body is already
                    # here in one call, without joining them.
                    parts: list[bytes | memoryview] = [out, first]
                    more = _ready(conn, left) if left else b""
                    if more:
                        parts.append(more)
                        left -= len(more)
                    self.client.send_parts(parts)
                    self.sent += len(out) + len(first) + len(more)
                if left > 0:
                    self._relay_fixed(conn, left)
            elif mode == CHUNKED:
                self._relay_chunked(conn, out, bytes(buf), dechunk)
                if conn.buf:
                    pool_it = False
            else:
                self._to_client(out + buf)
                self._relay_until_close(conn)
                pool_it = False
        except BaseException:
            conn.close()
            self.client.upstream = None
            raise
        if pool_it:
            self.pool.release(conn)
        else:
            conn.close()
        client.upstream = None
        client.small_answers = self.sent < _VIEW_FROM
        return client_keep

    def _to_client(self, data: bytes) -> None:
        self.client.send(data)
        self.sent += len(data)

    def _recv_body(self, conn: Connection, done: int) -> bytes:
        client = self.client
        client.expect(UPSTREAM, self.pool.read_timeout)
        try:
            data = conn.reader.recv(RECV_SIZE)
        except OSError as exc:
            error = self._error(exc, f"response body cut after {done} bytes")
            error.answered = True
            raise error from None
        finally:
            client.phase = NONE
        return data

    def _relay_fixed(self, conn: Connection, left: int) -> None:
        if left <= 0:
            return
        client = self.client
        buf = client.relay_buffer()
        size = len(buf)
        reader = conn.reader
        timeout = self.pool.read_timeout
        while left > 0:
            client.expect(UPSTREAM, timeout)
            try:
                got = reader.recv_into(buf[:left] if left < size else buf)
            except OSError as exc:
                error = self._error(exc, f"response body cut {left} bytes before its end")
                error.answered = True
                raise error from None
            finally:
                client.phase = NONE
            if not got:
                error = UpstreamBroken(self.url, f"closed {left} bytes before the end of "
                                                 "the response body")
                error.answered = True
                raise error
            client.send(buf[:got])
            self.sent += got
            left -= got

    def _splice_fixed(self, conn: Connection, out: bytes, first: bytes | memoryview,
                      left: int) -> bool:
        """Send the head ``out`` and ``first``, then move the ``left`` bytes that end a
        Content-Length body from the endpoint to the client through a pipe
        (cluster.proxy.pipes), never copying them into Python. False when no pipe can
        be had (nothing sent: the caller copies instead).

        Waits, deadlines and errors are those of the copying path: each wait for the
        endpoint is a read (phase UPSTREAM, the read timeout), each wait for the client
        a write (phase WRITE, the write timeout); an endpoint that fails or closes
        before the end is a cut body (answered), a client that fails is an OSError.
        """
        pipe = pipes.take()
        if pipe is None:
            return False
        rfd, wfd = pipe
        client = self.client
        empty = False
        try:
            # What is already in the socket, without waiting; the head then goes out
            # with MSG_MORE so that it leaves in one segment with those bytes.
            try:
                moved = os.splice(conn.sock._sock.fileno(), wfd, left, flags=_SPLICE_NONBLOCK)
            except OSError:  # nothing yet, or the end: the wait below sees it again
                moved = 0
            client.send_parts([out, first] if first else [out], MSG_MORE if moved else 0)
            self.sent += len(out) + len(first)
            down = client.raw
            while True:
                if moved:
                    left -= moved
                    while moved:  # out of the pipe, into the client's socket
                        try:
                            done = os.splice(rfd, down.fileno(), moved,
                                             flags=_SPLICE_NONBLOCK)
                        except BlockingIOError:
                            phase, deadline = client.phase, client.deadline
                            client.expect(WRITE, client.write_timeout)
                            try:
                                wait_writable(client.sock)
                            finally:
                                client.phase, client.deadline = phase, deadline
                            continue
                        if not done:
                            raise OSError(errno.EPIPE, "client socket took nothing")
                        moved -= done
                        self.sent += done
                    if not left:
                        break
                moved = self._splice_in(conn, wfd, left)
            empty = True
        finally:
            pipes.give_back(pipe, empty)
        return True

    def _splice_in(self, conn: Connection, wfd: int, left: int) -> int:
        """Move up to ``left`` body bytes from the endpoint into an empty pipe, waiting
        for them as a read does; raises a cut-body UpstreamError as _relay_fixed."""
        client = self.client
        up = conn.sock
        while True:
            try:
                moved = os.splice(up._sock.fileno(), wfd, left, flags=_SPLICE_NONBLOCK)
            except BlockingIOError:
                client.expect(UPSTREAM, self.pool.read_timeout)
                try:
                    conn.reader.wait()
                except OSError as exc:
                    raise self._cut(exc, left) from None
                finally:
                    client.phase = NONE
                continue
            except OSError as exc:
                raise self._cut(exc, left) from None
            if not moved:
                error = UpstreamBroken(self.url, f"closed {left} bytes before the end of "
                                                 "the response body")
                error.answered = True
                raise error
            return moved

    def _cut(self, exc: BaseException, left: int) -> UpstreamError:
        error = self._error(exc, f"response body cut {left} bytes before its end")
        error.answered = True
        return error

    def _relay_chunked(self, conn: Connection, out: bytes, buf: bytes, dechunk: bool) -> None:
        scanner = ChunkedScanner(decode=dechunk)
        first = True
        while True:
            try:
                used, pieces = scanner.feed(buf)
            except ChunkError as exc:
                error = misbehaving(UpstreamBroken(self.url, f"garbled chunked body: {exc}"))
                error.answered = not first
                raise error from None
            data = b"".join(pieces) if dechunk else buf[:used]
            if first:
                data = out + data
                first = False
            if data:
                self._to_client(data)
            if scanner.done:
                conn.buf = buf[used:]
                return
            buf = self._recv_body(conn, self.sent)
            if not buf:
                error = UpstreamBroken(self.url, "closed in the middle of a chunked body")
                error.answered = True
                raise error

    def _relay_until_close(self, conn: Connection) -> None:
        while True:
            data = self._recv_body(conn, self.sent)
            if not data:
                return
            self._to_client(data)


#: The head sent to the client and how to relay the body, by (the endpoint's head as
#: received, the request's method and version, the client's keep-alive, the added
#: lines): endpoints send the same head over and over (nginx until its Date changes).
_RELAYED: dict[tuple[bytes, bytes, bytes, bool, bytes], tuple[int, int, bool, bool, bytes]] = {}
_RELAYED_MAX = 256
_RELAYED_KEPT_MAX = 2048


def _relayed_head(response: ResponseHead, head: RequestHead, client_keep: bool,
                  extra: bytes) -> tuple[int, int, bool, bool, bytes]:
    """(mode, length, dechunk, client_keep, head to send) for ``response`` to a client
    that sent ``head`` (see Exchange.relay_response)."""
    mode, length = response_framing(head.method, response)
    fields = response.fields
    old_client = head.version == b"HTTP/1.0"
    dechunk = False
    framing = b""
    if mode == CHUNKED:
        if response.length >= 0:
            fields = without_field(fields, b"content-length")
        if old_client:
            dechunk = True  # an HTTP/1.0 client cannot read chunks: end by closing
            client_keep = False
        else:
            framing = b"\r\nTransfer-Encoding: chunked"
    elif mode == FIXED or mode == NO_BODY:
        if response.code in (204, 304) and response.length >= 0 and head.method != b"HEAD":
            fields = without_field(fields, b"content-length")
    else:  # until close
        client_keep = False
        if response.transfer:
            framing = b"\r\nTransfer-Encoding: " + response.transfer
    if not client_keep:
        framing += b"\r\nConnection: close"
    elif old_client:
        framing += b"\r\nConnection: keep-alive"
    out = response.status_line + fields + framing + extra + HEAD_END
    return mode, length, dechunk, client_keep, out


def _bare_lf_head(url: str, buf: bytes, end: int, sep: int,
                  error: ValueError) -> tuple[bytes, ResponseHead, int, int]:
    """(head, its parse, end, blank line length) for a head in ``buf`` that failed to
    parse as the one ending at ``end``: one whose lines end in bare LF may end before a
    CRLF CRLF in its body, or end there with a bare LF among its other lines (RFC 9112
    2.2 lets a recipient accept bare LF; the forwarder does too). Looked for only after
    a failure, so a usual head costs nothing more. Raises the misbehaving UpstreamBroken
    for ``error`` when it is not such a head."""
    bare, bare_sep = find_response_head(buf) if sep == 4 else (-1, 0)
    if 0 <= bare <= end:
        raw = crlf_head(buf[:bare])
        try:
            return raw, parse_response_head(raw), bare, bare_sep
        except ValueError as exc:
            error = exc
    raise misbehaving(UpstreamBroken(url, f"malformed response head: {error}")) from None


def _ready(conn: Connection, size: int) -> bytes:
    """Up to ``size`` bytes already in ``conn``'s socket, without waiting (b"": none yet,
    or not a plain socket). The rest of a large body is usually there by the time its
    first piece is read: taken now, it goes out in the same send as the first piece,
    rather than after another trip through the event loop and a send of its own."""
    if not is_plain(conn.sock):
        return b""
    try:
        data: bytes = conn.sock._sock.recv(min(size, RECV_SIZE))
    except (BlockingIOError, InterruptedError):
        return b""
    except OSError:
        return b""  # the read that follows reports the connection's end as a cut body
    return data  # b"" at EOF: the read that follows sees it again and reports the cut


def _after_others() -> None:
    """Yield until the other connections made ready by this pass of the event loop
    have run up to their own sends, then send with them.

    Each send to a process that sleeps wakes it, and waking a sleeping core is the
    dearest part of a loopback send (in a VM, an interrupt between cores is an exit
    to the hypervisor). Small requests and answers sent back to back wake the endpoint
    and the clients once per pass instead of once per message (docs/benchmarks.md has
    the figures). Costs one switch through the hub; with nothing else ready, the
    send goes out at once. Large answers do not wait: their bytes are sent while
    they are still in the cache.
    """
    sleep(0)


class _Stale(Exception):
    """A reused connection was found closed before any response byte: resend fresh."""


#: what every response head starts with (cluster.http1: HTTP/1.0 or HTTP/1.1)
_STATUS_START = b"HTTP/1."


def no_status_line(buf: bytes) -> bool:
    """True when ``buf``, where a response head is to start, cannot begin one (a body
    sent after a 1xx, as by an app whose final status was "103"): a 502 at once. Waited
    for, the head never came on a kept connection, and the client had a 504 after the
    read timeout (nginx refuses a bad status line as it comes)."""
    return buf[:7] != _STATUS_START[:len(buf)]


def not_http(buf: bytes) -> str:
    """Why an answer that :func:`no_status_line` refused is refused, saying what came."""
    return f"not an HTTP/1 answer, after {len(buf)} bytes and no response head: {buf[:40]!r}"


def closed_before_head(buf: bytes) -> str:
    """Why an answer that ended before its head did is refused: with bytes, say what
    came (an HTTP/0.9 answer, another protocol), not "before answering"."""
    if not buf:
        return "closed the connection before answering"
    return f"closed the connection after {len(buf)} bytes and no response head: {buf[:40]!r}"


def open_after_stale(pool: Pool, url: str, resent: bool, method: bytes | str,
                     has_body: bool) -> Connection:
    """A new connection to ``url``. After a pooled connection was found closed under a
    request (``resent``), a refusal is no longer "nothing was sent": the endpoint may
    have taken the request and died. Then only a replayable request may go elsewhere;
    for any other it is a 502 (UpstreamBroken), never a resend to another endpoint."""
    try:
        return pool.open(url)
    except UpstreamConnectError as exc:
        if resent and not replayable(method, has_body):
            raise UpstreamBroken(url, f"closed the connection, then refused a new one "
                                      f"({exc.reason})") from None
        raise


class _ClientGone(OSError):
    """The client went away or broke its body's framing while we relayed it."""


def _from_client(read: Callable[..., Any], *args: Any) -> Any:
    """``read(*args)`` from the client; its failure (a reset, or the sweeper closing a
    client silent in the middle of its body) is _ClientGone. Taken for the endpoint's,
    it was followed by a wait for the endpoint's early answer: the endpoint, still
    waiting for the rest of the body, held both connections for its own timeout."""
    try:
        return read(*args)
    except OSError as exc:
        raise _ClientGone(f"client connection lost in the middle of its body: {exc}") \
            from None


def read_small_body(exchange: Exchange, limit: int) -> bytes:
    """The whole body of the answer in ``exchange`` (for SockJS info), at most ``limit``
    bytes; the endpoint connection is closed afterwards. Raises UpstreamBroken, or
    UpstreamTimeout for a silence past the read timeout (never ``answered``: nothing of
    this answer has been sent when it fails)."""
    response = exchange.response
    conn = exchange.upstream
    assert response is not None and conn is not None
    mode, length = response_framing(exchange.head.method, response)
    buf = bytes(conn.buf)
    try:
        if mode == NO_BODY:
            return b""
        if mode == CHUNKED:
            scanner = ChunkedScanner(decode=True)
            out: list[bytes] = []
            size = 0
            while True:
                used, pieces = scanner.feed(buf)
                out += pieces
                size += sum(map(len, pieces))
                if size > limit:
                    raise UpstreamBroken(exchange.url, "answer too large")
                if scanner.done:
                    return b"".join(out)
                buf = exchange._recv_body(conn, size)
                if not buf:
                    raise UpstreamBroken(exchange.url, "closed in the middle of the answer")
        want = length if mode == FIXED else limit + 1
        if want > limit and mode == FIXED:
            raise UpstreamBroken(exchange.url, "answer too large")
        while len(buf) < want:
            data = exchange._recv_body(conn, len(buf))
            if not data:
                if mode == FIXED:
                    raise UpstreamBroken(exchange.url, "closed in the middle of the answer")
                break
            buf += data
        if len(buf) > limit:
            raise UpstreamBroken(exchange.url, "answer too large")
        return buf[:want] if mode == FIXED else buf
    except ChunkError as exc:
        raise UpstreamBroken(exchange.url, f"garbled chunked answer: {exc}") from None
    except UpstreamError as exc:
        # A read that failed says "answered" (its bytes would have gone on as they
        # came), but this body is read whole before anything is sent: the client is
        # still owed an answer, a 502 or 504, not a connection closed on it unanswered.
        if not isinstance(exc, ClientLeft):
            exc.answered = False
        raise
    finally:
        conn.close()
        exchange.client.upstream = None


def connect_error(url: str, exc: Any) -> UpstreamConnectError:
    return UpstreamConnectError(url, str(exc))
