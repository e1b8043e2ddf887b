"""HTTP/1.1 without I/O: request and response heads, framing, a chunked scanner.

Bytes go in, plain objects come out; nothing here reads or writes a socket (as h11
does). The front door, the forwarder and the WebSocket bridge all parse and build
heads here, so they agree on what a message is. Every rule a request breaks raises
:class:`~cluster.errors.RequestError` carrying the status to answer with (RFC 9112):

- Transfer-Encoding whose final coding is not ``chunked``: 400; a coding we do not
  implement before a final ``chunked``: 501. Either way the body length is unknowable,
  so the connection must close.
- Content-Length with Transfer-Encoding: 400 (RFC 9112 6.3 allows rejecting it, and a
  proxy that forwards such a message is how requests get smuggled).
- Content-Length that is not plain digits, or two different ones: 400.
- Request line longer than the limit: 414; a header line, the head, or the field count
  over its limit: 431. A bare CR or LF, a NUL, obsolete line folding or a space before
  the colon: 400.
- No Host in an HTTP/1.1 request, two Host lines, or a Host value that is not
  ``host[:port]``: 400 (RFC 9112 3.2).
- A request target that is neither the origin form (``/path``), the absolute form
  (``http://host/path``) nor ``OPTIONS *``: 400 (RFC 9112 3.2); CONNECT: 501.
- Bytes that cannot begin a request line (a TLS handshake): 400 as soon as they arrive.

Policy choices: heads must use CRLF (a bare-LF head is a 400, not guessed at); leading
empty lines before a request line are skipped (RFC 9112 2.2); targets may carry
non-ASCII bytes (clients send raw UTF-8 paths and pywsgi accepted them); an
absolute-form target becomes the origin form and its authority the Host (RFC 9112
3.2.2).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from cluster.errors import RequestError

CRLF = b"\r\n"
HEAD_END = b"\r\n\r\n"

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+").fullmatch
#: what the first byte of a request line can be: a method's (token) or an empty line's
_METHOD_BYTES = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                          b"abcdefghijklmnopqrstuvwxyz\r")
# name ":" value, where the value holds no CR, LF or NUL (tabs and obs-text are fine)
_FIELD_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*").fullmatch
_TARGET = re.compile(rb"[\x21-\x7e\x80-\xff]+").fullmatch
# All field lines of a head at once: one C-level pass instead of one per line.
_FIELD_BLOCK = re.compile(
    rb"(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*)*").fullmatch
# Hop-by-hop fields that are rare in responses, found in one pass when present.
_RARE_HOP = re.compile(rb"\r\n(?:keep-alive|te|trailer|upgrade|proxy-[^:\r]*):")
_REQUEST_LINE = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e\x80-\xff]+) (HTTP/1\.[01])").fullmatch
# RFC 9112 3.2: Host = uri-host [ ":" port ] (RFC 3986 3.2.2: an IP literal in brackets,
# or a reg-name of unreserved, pct-encoded and sub-delims characters); a value that is
# not gets 400, as it would otherwise reach the app's links and the endpoint as it is.
_HOST_VALUE = re.compile(
    rb"(?:\[[0-9A-Za-z:.\-_~!$&'()*+,;=%]+\]|[0-9A-Za-z\-._~%!$&'()*+,;=]+)(?::[0-9]*)?").fullmatch
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*))?")

#: Response bodies by framing.
NO_BODY, FIXED, CHUNKED, UNTIL_CLOSE = range(4)

# Request header names the door treats specially (lower-case). Every other field is
# passed on as it came. 'drop' ones are hop-by-hop or rewritten by us.
_HOST, _LENGTH, _TRANSFER, _CONNECTION, _UPGRADE, _COOKIE, _HOP, _EXPECT, _XFF, _XFP, \
    _XFH, _FORWARDED, _REAL_IP, _VIA, _DROP = range(15)
_REQUEST_SPECIAL = {
    b"host": _HOST, b"content-length": _LENGTH, b"transfer-encoding": _TRANSFER,
    b"connection": _CONNECTION, b"upgrade": _UPGRADE, b"cookie": _COOKIE,
    b"x-cluster-hop": _HOP, b"expect": _EXPECT, b"x-forwarded-for": _XFF,
    b"x-forwarded-proto": _XFP, b"x-forwarded-host": _XFH, b"forwarded": _FORWARDED,
    b"x-real-ip": _REAL_IP, b"keep-alive": _DROP, b"te": _DROP, b"trailer": _DROP,
    b"proxy": _DROP, b"via": _VIA,
}
#: the first bytes of those names (and of Proxy-*): a line that starts otherwise is an
#: ordinary field, passed on without splitting it (most of a browser's head)
_SPECIAL_INITIALS = frozenset(b"".join(name[:1] for name in _REQUEST_SPECIAL).upper() +
                              b"".join(name[:1] for name in _REQUEST_SPECIAL))


class Limits(NamedTuple):
    """Bounds on a request head, in bytes and fields (the door's settings)."""

    request_line: int = 8192
    header_line: int = 8192
    head_size: int = 65536
    header_count: int = 100


DEFAULT_LIMITS = Limits()


class RequestHead:
    """One parsed request head. Values are bytes as received (latin-1 when decoded).

    ``fields`` are the end-to-end header lines passed on unchanged, each the raw line
    without CRLF; everything hop-by-hop or rewritten by a proxy is pulled out into its
    own attribute.
    """

    __slots__ = ("method", "target", "version", "fields", "host", "content_length",
                 "chunked", "keep_alive", "upgrade", "connection", "cookie", "hop",
                 "expect_continue", "forwarded_for", "forwarded_proto", "forwarded_host",
                 "forwarded", "real_ip", "via")

    def __init__(self, method: bytes, target: bytes, version: bytes) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.fields: list[bytes] = []
        self.host = b""
        self.content_length = -1  # -1: no Content-Length
        self.chunked = False
        self.keep_alive = version == b"HTTP/1.1"
        self.upgrade = b""
        self.connection: tuple[bytes, ...] = ()  # lower-case Connection tokens
        self.cookie = b""
        self.hop = b""
        self.expect_continue = False
        self.forwarded_for = b""
        self.forwarded_proto = b""
        self.forwarded_host = b""
        self.forwarded = b""
        self.real_ip = b""
        self.via = b""

    def __repr__(self) -> str:
        return f"<RequestHead {self.method.decode('latin-1')} {self.target[:60]!r}>"

    @property
    def has_body(self) -> bool:
        return self.chunked or self.content_length > 0

    @property
    def is_websocket(self) -> bool:
        """An HTTP/1.1 GET with ``Upgrade: websocket`` and ``Connection: upgrade`` and no
        body (RFC 6455 4.1; RFC 9110 7.8: an Upgrade in an HTTP/1.0 request is ignored,
        and a server may ignore any other: with a body, whether the frames begin after it
        or at it is a matter of opinion between two servers, so it is not an upgrade)."""
        return (self.method == b"GET" and b"upgrade" in self.connection
                and b"websocket" in self.upgrade.lower() and self.version == b"HTTP/1.1"
                and not self.has_body)

    def header_pairs(self) -> list[tuple[str, str]]:
        """Every field as (name, value) strings, for a WSGI environ: the end-to-end ones
        and the special ones a local app still sees (Host, Cookie, Upgrade...)."""
        pairs = []
        for line in self.fields:
            key, _, raw = line.partition(b":")
            pairs.append((key.decode("latin-1"), raw.strip(b" \t").decode("latin-1")))
        for name, value in (("Host", self.host), ("Cookie", self.cookie),
                            ("Upgrade", self.upgrade), ("X-Forwarded-For", self.forwarded_for),
                            ("X-Forwarded-Proto", self.forwarded_proto),
                            ("X-Forwarded-Host", self.forwarded_host),
                            ("Forwarded", self.forwarded), ("X-Real-IP", self.real_ip),
                            ("Via", self.via)):
            if value:
                pairs.append((name, value.decode("latin-1")))
        if self.connection:
            pairs.append(("Connection", b", ".join(self.connection).decode("latin-1")))
        if self.content_length >= 0:
            pairs.append(("Content-Length", str(self.content_length)))
        if self.chunked:
            pairs.append(("Transfer-Encoding", "chunked"))
        if self.expect_continue:
            pairs.append(("Expect", "100-continue"))
        return pairs


def find_head_end(buf: bytes | bytearray, limit: int, start: int = 0) -> int:
    """Index just past the blank line ending the head in ``buf``, or -1 for "need more".

    Raises RequestError 431 once ``buf`` holds more than ``limit`` bytes without an end,
    and 400 for a head that ends with bare LFs (it would never be found otherwise).
    ``start``: where to look from, for a caller that looked before: the length of
    ``buf`` then, less 3 (a blank line may have started in the bytes seen already).
    Without it, a head trickled in byte by byte is searched whole once per byte.
    """
    # past the empty lines a request may start with (RFC 9112 2.2): two of them are no
    # head end (nginx skips any number). The door drops them as they come (a trickle
    # of them would be searched again on each byte).
    first = empty_lines(buf)
    if first > start:
        start = first
    end = buf.find(HEAD_END, start)
    if end >= 0:
        if end > limit:
            raise RequestError(431, "request head too large")
        return end + 4
    # limit + 3: a head of exactly ``limit`` bytes may have 3 bytes of its blank line in
    # ``buf`` already; refusing it then would depend on how the bytes arrived.
    if len(buf) > limit + 3:
        raise RequestError(431, "request head too large")
    if buf.find(b"\n\n", start) >= 0 or buf.find(b"\n\r\n", start) >= 0:
        raise RequestError(400, "bare LF in the request head")
    if start == first:
        if first < len(buf) and buf[first] not in _METHOD_BYTES:
            # Not the start of a request line: a TLS handshake sent to a plain port
            # (its first byte is 0x16) gets its 400 now, not after the header timeout.
            raise RequestError(400, "not an HTTP/1 request")
    return -1


_EMPTY_LINES = re.compile(rb"(?:\r\n)*").match


def empty_lines(buf: bytes | bytearray) -> int:
    """The length of the empty lines (CRLFs) ``buf`` begins with."""
    if buf[:2] != CRLF:
        return 0
    return _EMPTY_LINES(buf).end()  # type: ignore[union-attr]


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip(b" \t").lower() for t in value.split(b",") if t.strip(b" \t")]


def _diagnose_request_line(line: bytes) -> None:
    """Raise the right RequestError for a request line the fast regex refused."""
    parts = line.split(b" ")
    if len(parts) == 3:
        version = parts[2]
        if version[:5] == b"HTTP/" and len(version) == 8 and version[5:6].isdigit() and \
                version[6:7] == b"." and version[7:8].isdigit():
            if version not in (b"HTTP/1.0", b"HTTP/1.1"):
                raise RequestError(505, "HTTP version not supported")
    raise RequestError(400, "malformed request line")


def parse_request_head(head: bytes, limits: Limits = DEFAULT_LIMITS) -> RequestHead:
    """Parse ``head`` (from the request line up to, not including, the blank line).

    Raises RequestError with the status to answer.
    """
    if head[:2] == CRLF:  # RFC 9112 2.2: ignore empty lines before the request line
        head = head[empty_lines(head):]
    eol = head.find(CRLF)
    line, block = (head, b"") if eol < 0 else (head[:eol], head[eol:])
    if len(line) > limits.request_line:
        raise RequestError(414, "request line too long")
    match = _REQUEST_LINE(line)
    if match is None:
        _diagnose_request_line(line)
    method, target, version = match.groups()  # type: ignore[union-attr]
    if len(block) > limits.header_line or len(block) > 4096:
        lines = block.split(CRLF)
        if len(lines) - 1 > limits.header_count:
            raise RequestError(431, f"more than {limits.header_count} header fields")
        if max(map(len, lines)) > limits.header_line:
            raise RequestError(431, "header line too long")
    if block and not _FIELD_BLOCK(block):
        raise RequestError(400, "malformed header line")
    lines = block.split(CRLF)
    if len(lines) - 1 > limits.header_count:
        raise RequestError(431, f"more than {limits.header_count} header fields")
    req = RequestHead(method, target, version)
    fields = req.fields
    special = _REQUEST_SPECIAL.get
    initials = _SPECIAL_INITIALS
    transfer: list[bytes] = []
    lengths: list[bytes] = []
    hosts = 0
    for line in lines[1:]:
        if line[0] not in initials:
            fields.append(line)
            continue
        name, _, value = line.partition(b":")
        lname = name.lower()
        kind = special(lname)
        if kind is None:
            if lname[:6] == b"proxy-":
                continue  # Proxy-Authorization, Proxy-Connection...: hop-by-hop
            fields.append(line)
            continue
        value = value.strip(b" \t")
        if kind == _HOST:
            hosts += 1
            req.host = value
        elif kind == _LENGTH:
            lengths.append(value)
        elif kind == _TRANSFER:
            # an empty value still counts: a Transfer-Encoding without a final chunked
            transfer.extend(_tokens(value) or (b"",))
        elif kind == _CONNECTION:
            req.connection += tuple(_tokens(value))
        elif kind == _UPGRADE:
            req.upgrade = value
        elif kind == _COOKIE:
            req.cookie = req.cookie + b"; " + value if req.cookie else value
        elif kind == _HOP:
            req.hop = value
        elif kind == _EXPECT:
            # RFC 9110 10.1.1: ignored in an HTTP/1.0 request (15.2: no 1xx to a 1.0
            # client, which would take the 100 for its answer)
            if value.lower() == b"100-continue" and version == b"HTTP/1.1":
                req.expect_continue = True
        elif kind == _XFF:
            req.forwarded_for = req.forwarded_for + b", " + value if req.forwarded_for \
                else value
        elif kind == _XFP:
            req.forwarded_proto = value
        elif kind == _XFH:
            req.forwarded_host = value
        elif kind == _FORWARDED:
            req.forwarded = req.forwarded + b", " + value if req.forwarded else value
        elif kind == _REAL_IP:
            req.real_ip = value
        elif kind == _VIA:
            req.via = req.via + b", " + value if req.via else value
        # _DROP: hop-by-hop (Keep-Alive, TE, Trailer) and Proxy (httpoxy)
    if hosts != 1 and (hosts > 1 or version == b"HTTP/1.1"):
        raise RequestError(400, "a request needs exactly one Host header")
    if method == b"CONNECT":
        # A tunnel to anywhere is not what a balancer is for; passed on, an app's 200
        # would put any proxy in front of this one into tunnel mode for the connection.
        raise RequestError(501, "CONNECT is not supported")
    if target[:1] != b"/":
        if target[:8].lower().startswith((b"http://", b"https://")):
            _origin_form(req)
        elif target != b"*" or method != b"OPTIONS":
            # RFC 9112 3.2: the origin form, the absolute form, or OPTIONS *
            raise RequestError(400, "invalid request target")
    if req.host and not _HOST_VALUE(req.host):
        raise RequestError(400, "invalid Host header")
    if transfer:
        if lengths:
            raise RequestError(400, "both Content-Length and Transfer-Encoding")
        if transfer[-1] != b"chunked":
            raise RequestError(400, "Transfer-Encoding does not end in chunked")
        if len(transfer) > 1:
            raise RequestError(501, "unsupported transfer coding")
        if version == b"HTTP/1.0":
            raise RequestError(400, "Transfer-Encoding in an HTTP/1.0 request")
        req.chunked = True
    elif lengths:
        first = lengths[0]
        if not first.isdigit() or len(first) > 18 or any(v != first for v in lengths):
            raise RequestError(400, "bad Content-Length")
        req.content_length = int(first)
    if req.connection:
        if b"close" in req.connection:
            req.keep_alive = False
        elif b"keep-alive" in req.connection:
            req.keep_alive = True
    return req


def _origin_form(req: RequestHead) -> None:
    """An absolute-form target (``http://host/path?q``) as the origin form ``/path?q``
    with that host as Host: RFC 9112 3.2.2 makes a server accept it and use its
    authority instead of any Host field. Routing, the app and the endpoint then see
    the path they would for the origin form, not a path starting with ``http:``."""
    target = req.target
    start = target.index(b"//") + 2
    end = start
    while end < len(target) and target[end] not in b"/?":
        end += 1
    req.host = target[start:end]
    rest = target[end:]
    req.target = rest if rest[:1] == b"/" else b"/" + rest
    if not req.host:
        raise RequestError(400, "absolute-form target without a host")


class ResponseHead(NamedTuple):
    """One parsed response head: what a proxy needs to pass it on."""

    code: int
    status_line: bytes  # "HTTP/1.1 200 OK", the reason as sent (or a default)
    #: the field lines to pass on, each preceded by CRLF (b"\r\nA: b\r\nC: d"), so
    #: status_line + fields + CRLF + CRLF is a head: hop-by-hop fields and
    #: Transfer-Encoding removed, Content-Length kept
    fields: bytes
    length: int  # Content-Length, or -1
    chunked: bool  # Transfer-Encoding ends in chunked
    transfer: bytes  # the raw Transfer-Encoding value (b"" when absent)
    keep_alive: bool  # the upstream keeps the connection after this response
    upgrade: bytes  # Upgrade value (meaningful on a 101)

    def field_pairs(self) -> list[tuple[str, str]]:
        """The fields as (name, value) strings (for a WSGI start_response)."""
        pairs = []
        for line in self.fields.split(CRLF)[1:]:
            name, _, value = line.partition(b":")
            pairs.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
        return pairs


def _field_value(block: bytes, low: bytes, at: int) -> tuple[bytes, int]:
    """(stripped value, end index) of the line starting at ``at`` (its leading CRLF)."""
    end = low.find(CRLF, at + 2)
    if end < 0:
        end = len(low)
    colon = low.find(b":", at)
    return block[colon + 1:end].strip(b" \t"), end


#: Status lines seen before: (code, status line to send, HTTP/1.1). Endpoints send few
#: distinct ones, and the regex, the reason lookup and the rewrite cost more than a
#: lookup; bounded in entries and in the length of a line kept (an endpoint could send
#: a new reason every time, each of up to 64 KiB), and emptied when full, so that lines
#: seen first do not keep the usual ones out for good.
_STATUS_LINES: dict[bytes, tuple[int, bytes, bool]] = {}
_STATUS_LINES_MAX = 256
_STATUS_KEPT_MAX = 128


def _status_line(first: bytes) -> tuple[int, bytes, bool]:
    """(code, status line as passed on, HTTP/1.1) of a response's first line."""
    known = _STATUS_LINES.get(first)
    if known is not None:
        return known
    match = _STATUS_LINE.fullmatch(first)
    if match is None:
        raise ValueError(f"bad status line {first[:40]!r}")
    minor, code_b, reason = match.groups()
    code = int(code_b)
    status_line = first if reason else b"HTTP/1.1 " + code_b + b" " + _reason(code)
    if minor == b"0":
        status_line = b"HTTP/1.1" + status_line[8:]
    known = (code, status_line, minor == b"1")
    if len(first) <= _STATUS_KEPT_MAX:
        if len(_STATUS_LINES) >= _STATUS_LINES_MAX:
            _STATUS_LINES.clear()
        _STATUS_LINES[first] = known
    return known


#: Most fields in a response head: past it the head is refused (502). Envoy and HAProxy
#: stop at about 100 by default, and http.client (requests) refuses more than 100; this
#: leaves apps room (many Set-Cookie lines) while thousands, all within the 64 KiB head
#: limit, are a broken or hostile endpoint, not an answer to pass on.
MAX_RESPONSE_FIELDS = 500
#: Most interim (1xx) answers before the final one: an endpoint that sends 100 or 103
#: forever never answers; past this many it is a 502 rather than a request held open.
MAX_INTERIM = 100

#: Response heads parsed lately, by their bytes: an endpoint answering the same resource
#: sends the same head until its Date changes (once a second). The parse is a pure
#: function of those bytes and a ResponseHead is immutable, so a hit is exact. Bounded
#: in entries and in the size of a head kept.
_RESPONSES: dict[bytes, ResponseHead] = {}
_RESPONSES_MAX = 256
_RESPONSE_KEPT_MAX = 2048


def parse_response_head(head: bytes) -> ResponseHead:
    """Parse a response head (status line up to, not including, the blank line).

    Raises ValueError for anything a careful proxy must not pass on: a bad status line,
    a malformed field (bare CR/LF, NUL, obs-fold), a bad or conflicting Content-Length,
    more than MAX_RESPONSE_FIELDS fields.
    Runs once per proxied response, hence the memo of recent heads, the targeted
    searches rather than a loop over every line, and a short way for the usual head (at
    most one Content-Length, at most one ``Connection: keep-alive`` or ``close``, no
    other hop-by-hop field).
    """
    known = _RESPONSES.get(head)
    if known is not None:
        return known
    parsed = _parse_response_head(head)
    if len(head) <= _RESPONSE_KEPT_MAX:
        if len(_RESPONSES) >= _RESPONSES_MAX:
            _RESPONSES.clear()
        _RESPONSES[head] = parsed
    return parsed


def _parse_response_head(head: bytes) -> ResponseHead:
    eol = head.find(CRLF)
    first, block = (head, b"") if eol < 0 else (head[:eol], head[eol:])  # block: CRLF...
    code, status_line, http11 = _status_line(first)
    if not block:
        return ResponseHead(code, status_line, b"", -1, False, b"", http11, b"")
    # a field line is at least 4 bytes (CRLF, a name, a colon): count only past that
    if len(block) > 4 * MAX_RESPONSE_FIELDS and block.count(CRLF) > MAX_RESPONSE_FIELDS:
        raise ValueError(f"more than {MAX_RESPONSE_FIELDS} fields in the response head")
    if not _FIELD_BLOCK(block):
        raise ValueError("malformed header line in the response")
    low = block.lower()
    if b"\r\ntransfer-encoding:" in low or _RARE_HOP.search(low):
        return _parse_fields(code, status_line, http11, block, low)
    length = -1
    at = low.find(b"\r\ncontent-length:")
    if at >= 0:
        end = low.find(CRLF, at + 17)
        if end < 0:
            end = len(low)
        value = block[at + 17:end].strip(b" \t")
        if not value.isdigit() or len(value) > 18 or \
                low.find(b"\r\ncontent-length:", end) >= 0:
            return _parse_fields(code, status_line, http11, block, low)
        length = int(value)
    at = low.find(b"\r\nconnection:")
    if at < 0:
        return ResponseHead(code, status_line, block, length, False, b"", http11, b"")
    end = low.find(CRLF, at + 13)
    if end < 0:
        end = len(low)
    value = low[at + 13:end].strip(b" \t")
    if value == b"keep-alive":
        keep = True
    elif value == b"close":
        keep = False
    else:
        return _parse_fields(code, status_line, http11, block, low)
    if low.find(b"\r\nconnection:", end) >= 0:
        return _parse_fields(code, status_line, http11, block, low)
    return ResponseHead(code, status_line, block[:at] + block[end:], length, False, b"",
                        keep, b"")


def _parse_fields(code: int, status_line: bytes, http11: bool, block: bytes,
                  low: bytes) -> ResponseHead:
    """parse_response_head for any valid field block (``low``: it in lower case)."""
    length = -1
    cut: list[tuple[int, int]] = []
    at = low.find(b"\r\ncontent-length:")
    while at >= 0:
        value, end = _field_value(block, low, at)
        if not value.isdigit() or len(value) > 18 or (length >= 0 and int(value) != length):
            raise ValueError(f"bad Content-Length {value[:40]!r}")
        if length >= 0:
            # The same length again (RFC 9110 8.6 lets a recipient take it as one):
            # passed on once, as strict parsers (Node's llhttp: "Duplicate
            # Content-Length") refuse the whole answer otherwise.
            cut.append((at, end))
        length = int(value)
        at = low.find(b"\r\ncontent-length:", end)
    connection: list[bytes] = []
    at = low.find(b"\r\nconnection:")
    while at >= 0:
        value, end = _field_value(block, low, at)
        connection.extend(_tokens(value))
        cut.append((at, end))
        at = low.find(b"\r\nconnection:", end)
    transfer: list[bytes] = []
    raw_transfer = b""
    at = low.find(b"\r\ntransfer-encoding:")
    while at >= 0:
        value, end = _field_value(block, low, at)
        transfer.extend(_tokens(value))
        raw_transfer = raw_transfer + b", " + value if raw_transfer else value
        cut.append((at, end))
        at = low.find(b"\r\ntransfer-encoding:", end)
    upgrade = b""
    if _RARE_HOP.search(low):
        for found in _RARE_HOP.finditer(low):
            value, end = _field_value(block, low, found.start())
            if low[found.start() + 2:found.start() + 9] == b"upgrade":
                upgrade = value
            cut.append((found.start(), end))
    fields = block
    if cut:
        cut.sort()
        parts = []
        pos = 0
        for start, end in cut:
            parts.append(block[pos:start])
            pos = end
        parts.append(block[pos:])
        fields = b"".join(parts)
    if connection:
        keep = b"close" not in connection if http11 else b"keep-alive" in connection
        # Content-Length is for every recipient (RFC 9110 7.6.1 forbids naming it): were
        # it dropped, the client would get an answer without framing on a kept
        # connection, and read the next answer as the rest of this one.
        named = [t for t in connection
                 if t not in (b"close", b"keep-alive", b"upgrade", b"content-length")]
        if named and fields:  # fields named by Connection are hop-by-hop too
            drop = set(named)
            fields = b"".join(CRLF + f for f in fields.split(CRLF)[1:]
                              if f.partition(b":")[0].lower() not in drop)
    else:
        keep = http11
    chunked = bool(transfer) and transfer[-1] == b"chunked"
    if transfer and (length >= 0 or not http11):
        # RFC 9112 6.3: Transfer-Encoding wins over a Content-Length, but the two
        # together (or Transfer-Encoding in HTTP/1.0, 6.1) are how a response is split
        # or smuggled: once the body is read by the chunked framing, the connection is
        # not trusted with another request.
        keep = False
    return ResponseHead(code, status_line, fields, length, chunked, raw_transfer, keep,
                        upgrade)


def plain_chunked(transfer: bytes) -> bool:
    """True for a Transfer-Encoding value that is one ``chunked`` and nothing else: the
    only coding a proxy that does not pass on its client's TE was asked for (RFC 9110
    10.1.4)."""
    return transfer.lower() == b"chunked" or _tokens(transfer) == [b"chunked"]


def without_field(fields: bytes, name: bytes) -> bytes:
    """``fields`` (a block of CRLF-led lines) without the lines of field ``name``."""
    lname = name.lower()
    return b"".join(CRLF + f for f in fields.split(CRLF)[1:]
                    if f.partition(b":")[0].strip().lower() != lname)


def response_framing(method: bytes, head: ResponseHead) -> tuple[int, int]:
    """(NO_BODY | FIXED | CHUNKED | UNTIL_CLOSE, length) per RFC 9112 6.3."""
    if method == b"HEAD" or head.code < 200 or head.code in (204, 304):
        return NO_BODY, 0
    if head.transfer:
        # Transfer-Encoding wins over Content-Length; a final coding other than chunked
        # means "until close".
        return (CHUNKED, -1) if head.chunked else (UNTIL_CLOSE, -1)
    if head.length >= 0:
        return FIXED, head.length
    return UNTIL_CLOSE, -1


_REASONS = {100: b"Continue", 101: b"Switching Protocols", 200: b"OK", 201: b"Created",
            204: b"No Content", 301: b"Moved Permanently", 302: b"Found",
            304: b"Not Modified", 400: b"Bad Request", 403: b"Forbidden",
            404: b"Not Found", 408: b"Request Timeout", 413: b"Content Too Large",
            414: b"URI Too Long", 426: b"Upgrade Required", 431:
            b"Request Header Fields Too Large", 500: b"Internal Server Error",
            501: b"Not Implemented", 502: b"Bad Gateway", 503: b"Service Unavailable",
            504: b"Gateway Timeout", 505: b"HTTP Version Not Supported"}


def _reason(code: int) -> bytes:
    reason = _REASONS.get(code)
    if reason is None:
        try:
            from http import HTTPStatus

            reason = HTTPStatus(code).phrase.encode("latin-1")
        except ValueError:
            reason = b"Unknown"
    return reason


def simple_response(code: int, body: bytes, content_type: bytes = b"text/plain; charset=utf-8",
                    close: bool = False, extra: tuple[bytes, ...] = ()) -> bytes:
    """A whole short response, head and body."""
    lines = [b"HTTP/1.1 %d %s" % (code, _reason(code)), b"Content-Type: " + content_type,
             b"Content-Length: %d" % len(body), b"Cache-Control: no-store", *extra]
    if close:
        lines.append(b"Connection: close")
    return CRLF.join(lines) + HEAD_END + body


def head_only_response(code: int, extra: tuple[bytes, ...], close: bool = False) -> bytes:
    """A response that has no content (204, 304): its status line and ``extra`` fields,
    nothing added but ``Connection: close``."""
    lines = [b"HTTP/1.1 %d %s" % (code, _reason(code)), *extra]
    if close:
        lines.append(b"Connection: close")
    return CRLF.join(lines) + HEAD_END


class ChunkError(ValueError):
    """A chunked body that breaks the framing rules."""


_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)
_MAX_SIZE_LINE = 4096
_MAX_TRAILER = 65536
_MAX_CHUNK = 2 ** 63 - 1
_CHUNK_LINE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*").fullmatch


class ChunkedScanner:
    """Finds where a chunked body ends, fed the bytes as they come.

    A proxy passes chunked bodies through byte for byte; it only has to know where
    each one stops (the next message starts there). With ``decode`` it also returns
    the data pieces (to re-frame a body for an HTTP/1.0 client).
    """

    __slots__ = ("state", "remaining", "pending", "trailer", "decode")

    def __init__(self, decode: bool = False) -> None:
        self.state = _SIZE
        self.remaining = 0
        self.pending = b""  # an incomplete size or trailer line
        self.trailer = 0
        self.decode = decode

    @property
    def done(self) -> bool:
        return self.state == _DONE

    def feed(self, data: bytes) -> tuple[int, list[bytes]]:
        """Consume ``data`` up to the end of the body: (bytes of it that belong to the
        body, data pieces when decoding). Raises ChunkError on a framing error."""
        pos = 0
        size = len(data)
        pieces: list[bytes] = []
        while pos < size and self.state != _DONE:
            state = self.state
            if state == _DATA:
                take = min(self.remaining, size - pos)
                if self.decode:
                    pieces.append(data[pos:pos + take])
                pos += take
                self.remaining -= take
                if not self.remaining:
                    self.state = _DATA_END
                continue
            eol = data.find(b"\n", pos)
            if eol < 0:
                self.pending += data[pos:]
                if len(self.pending) > (_MAX_SIZE_LINE if state != _TRAILER else _MAX_TRAILER):
                    raise ChunkError("chunk line too long")
                return size, pieces
            line = self.pending + data[pos:eol + 1]
            self.pending = b""
            pos = eol + 1
            if line[-2:] != CRLF:
                raise ChunkError("chunk line not ended by CRLF")
            line = line[:-2]
            if state == _SIZE:
                if len(line) > _MAX_SIZE_LINE:  # also when it arrived in one piece
                    raise ChunkError("chunk line too long")
                digits, semicolon, _ = line.partition(b";")
                if semicolon:  # BWS may come before an extension's ";", nowhere else
                    digits = digits.rstrip(b" \t")
                if not digits or len(digits) > 16 or digits.strip(b"0123456789abcdefABCDEF"):
                    raise ChunkError(f"bad chunk size {line[:20]!r}")
                # Passed on byte for byte, so nothing another parser reads otherwise: a
                # bare CR or other control byte in an extension (a line end to some), a
                # size past 2**63 - 1 (negative where sizes are signed 64-bit integers).
                if not _CHUNK_LINE(line):
                    raise ChunkError(f"control byte in a chunk line {line[:20]!r}")
                self.remaining = int(digits, 16)
                if self.remaining > _MAX_CHUNK:
                    raise ChunkError(f"chunk size past 2**63 - 1 {line[:20]!r}")
                self.state = _DATA if self.remaining else _TRAILER
            elif state == _DATA_END:
                if line:
                    raise ChunkError("chunk data not followed by CRLF")
                self.state = _SIZE
            else:  # trailer fields, then the empty line
                if not line:
                    self.state = _DONE
                else:
                    self.trailer += len(line)
                    if self.trailer > _MAX_TRAILER:
                        raise ChunkError("trailer too long")
                    # passed on byte for byte: only lines any field parser reads alike
                    if not _FIELD_LINE(line):
                        raise ChunkError("malformed trailer field")
        return pos, pieces


#: The end of a head's last line and the empty line after it, each ended by LF or CRLF.
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")


def find_response_head(buf: bytes) -> tuple[int, int]:
    """(end of the head, length of its last line end and blank line) in ``buf``, or
    (-1, 0).

    Responses may end their lines with a bare LF, some lines or all of them (RFC 9112
    2.2 lets a recipient take an LF, with or without a CR before it, for a line end;
    some small servers do it): such a head is passed to :func:`crlf_head` first. It
    ends at its first empty line however that line and the one before it end: an
    ``LF CRLF`` end was never found, and the balancer waited out the read timeout for
    an answer curl reads at once.
    """
    end = buf.find(HEAD_END)
    found = _BLANK_LINE.search(buf, 0, end + 4 if end >= 0 else len(buf))
    if found is None:
        return -1, 0
    return found.start(), found.end() - found.start()


def crlf_head(head: bytes) -> bytes:
    """A bare-LF head with CRLF line ends (a CR elsewhere stays and is refused later)."""
    return head.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def head_from_environ(environ: dict[str, object], target: bytes) -> RequestHead:
    """A WSGI request as the core's RequestHead (for the WSGI adapter, which proxies
    requests that another server already parsed)."""
    def get(key: str) -> str:
        value = environ.get(key)
        return value if isinstance(value, str) else ""

    method = (get("REQUEST_METHOD") or "GET").encode("latin-1")
    version = b"HTTP/1.0" if get("SERVER_PROTOCOL") == "HTTP/1.0" else b"HTTP/1.1"
    head = RequestHead(method, target, version)
    fields = head.fields
    for key, value in environ.items():
        if key[:5] != "HTTP_" or not isinstance(value, str):
            continue
        # Names are case-insensitive, but some servers are not: write the usual spelling.
        name = "-".join(part.capitalize() for part in key[5:].split("_")).replace(
            "Websocket", "WebSocket")
        line = f"{name}: {value}".encode("latin-1")
        kind = _REQUEST_SPECIAL.get(name.lower().encode("latin-1"))
        raw = value.strip().encode("latin-1")
        if kind is None:
            if name.lower().startswith("proxy-"):
                continue
            fields.append(line)
        elif kind == _HOST:
            head.host = raw
        elif kind == _CONNECTION:
            head.connection = tuple(_tokens(raw))
        elif kind == _UPGRADE:
            head.upgrade = raw
        elif kind == _COOKIE:
            head.cookie = raw
        elif kind == _HOP:
            head.hop = raw
        elif kind == _TRANSFER:
            head.chunked = raw.lower() == b"chunked"
        elif kind == _XFF:
            head.forwarded_for = raw
        elif kind == _XFP:
            head.forwarded_proto = raw
        elif kind == _XFH:
            head.forwarded_host = raw
        elif kind == _FORWARDED:
            head.forwarded = raw
        elif kind == _REAL_IP:
            head.real_ip = raw
        elif kind == _VIA:
            head.via = raw
        # Content-Length/-Type come without the prefix; Expect is answered by the server
    ctype = get("CONTENT_TYPE")
    if ctype:
        fields.append(b"Content-Type: " + ctype.encode("latin-1"))
    length = get("CONTENT_LENGTH")
    if length.isdigit() and not head.chunked:
        head.content_length = int(length)
    if head.connection:
        head.keep_alive = b"close" not in head.connection
    return head
