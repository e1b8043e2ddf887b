"""Property tests (Hypothesis) of the pure parts that take outside input: route(),
record parsing, cookie parsing and request-head parsing. Brief by default (the `ci`
profile); longer with ``HYPOTHESIS_PROFILE=long`` (``tox -e fuzz``). Profiles live in
tests/conftest.py."""

from __future__ import annotations

import datetime as dt
import re
import string
from urllib.parse import urlsplit

from hypothesis import assume, given
from hypothesis import strategies as st

from cluster.errors import RequestError
from cluster.http1 import parse_request_head
from cluster.records import (
    MAX_PING_MS,
    MAX_URL_LENGTH,
    MIN_PING_MS,
    Endpoint,
    MalformedRecord,
    check_record,
    endpoint_hash,
    parse_record,
)
from cluster.registry import EndpointTable, parse_documents
from cluster.routing import (
    COOKIE_PREFIX,
    DDP_PREFIX,
    Policy,
    Proxy,
    Reply,
    RequestView,
    Serve,
    SockJSInfo,
    route,
)

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
SERVICES = ["web", "chat", "api"]
URLS = [f"http://10.0.0.{n}:3000" for n in range(1, 7)]
HASHES = [endpoint_hash(u) for u in URLS]

# --- route() ----------------------------------------------------------------------------

endpoints_st = st.lists(
    st.builds(
        lambda url, service, balancer: Endpoint(service, url, endpoint_hash(url), balancer,
                                                NOW, 5.0),
        st.sampled_from(URLS), st.sampled_from(SERVICES),
        st.sampled_from([None, "https://lb1.example", "https://lb2.example"])),
    max_size=6, unique_by=lambda e: e.url)

policy_st = st.builds(
    Policy,
    service=st.sampled_from([None, *SERVICES]),
    ui_service=st.sampled_from([None, *SERVICES]),
    self_hash=st.sampled_from([None, *HASHES, "f" * 40]),
    has_local_app=st.booleans(),
    self_weight=st.sampled_from([0.0, 0.5, 1.0]),
    public_services=st.frozensets(st.sampled_from(SERVICES)),
)

hash_text = st.sampled_from([*HASHES, "0" * 40, ""]) | st.text(max_size=8)
segment = st.sampled_from(["", ".", "..", "%2e%2E", "%2f", "a%5cb", "\\", "x", "1", "info",
                           "sockjs", "xhr"]) | st.text(max_size=6)
path_st = st.one_of(
    st.sampled_from(["/", "/sockjs/info", "/chat/sockjs/info", "/x/y", "/_cluster/status"]),
    st.builds(lambda h, s, rest: f"{DDP_PREFIX}{h}/{s}/" + "/".join(rest),
              hash_text, st.sampled_from([*SERVICES, ""]), st.lists(segment, max_size=4)),
    st.text(max_size=30).map(lambda t: "/" + t),
)
cookie_st = st.lists(
    st.tuples(st.sampled_from([COOKIE_PREFIX + s for s in SERVICES] + ["a", ""]), hash_text),
    max_size=3,
).map(lambda pairs: "; ".join(f"{k}={v}" for k, v in pairs))


def request_st():
    return st.builds(
        lambda path, cookie, hop, raw, addr: RequestView(
            path=path, cookie_header=cookie, hop=hop,
            raw_target=path if raw else "", remote_addr=addr, host="front:80"),
        path_st, cookie_st | st.text(max_size=40), st.booleans(), st.booleans(),
        st.sampled_from(["127.0.0.1", "203.0.113.9", ""]))


@given(request_st(), endpoints_st, policy_st, st.frozensets(st.sampled_from(HASHES)),
       st.frozensets(st.sampled_from(HASHES)),
       st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=4))
def test_route_is_total_and_consistent_with_the_table(request, endpoints, policy, exclude,
                                                       ejected, points):
    tbl = EndpointTable.build(NOW, endpoints, grace=1.0)
    draws = iter(points * 4)
    decision = route(request, tbl, policy, exclude, lambda: next(draws), ejected=ejected)
    assert isinstance(decision, (Serve, Proxy, SockJSInfo, Reply))
    if isinstance(decision, Reply):
        assert 400 <= decision.status < 600 and "\n" not in decision.body
        return
    if isinstance(decision, Serve):
        assert policy.has_local_app
        return
    target = getattr(decision, "endpoint", None)
    if target is None:
        return
    assert tbl.by_hash.get(target.hash) == target, "only endpoints of the table"
    assert target.hash != policy.self_hash or not policy.has_local_app or \
        request.path.startswith(DDP_PREFIX)
    if request.path.startswith(DDP_PREFIX):
        # a session goes to exactly the endpoint it names, and its rest cannot escape
        assert isinstance(decision, Proxy) and not decision.retry
        assert request.path[len(DDP_PREFIX):].startswith(target.hash + "/")
        rest = decision.path_qs.split("?")[0].lower()
        assert ".." not in rest.split("/") and "%2f" not in rest and "\\" not in rest
        return
    assert target.hash not in exclude, "never an endpoint already tried"
    service = target.service
    candidates = {e.hash for e in tbl.by_service.get(service, ())} - {policy.self_hash}
    if target.hash in ejected:  # panic: only when nothing else was left
        assert candidates - exclude <= ejected
    if isinstance(decision, Proxy):
        assert service == policy.ui_service
        wanted = request.cookie(COOKIE_PREFIX + service)
        if wanted in candidates - exclude - ejected:
            assert target.hash == wanted and decision.set_cookie is None, "cookie honoured"
        elif decision.set_cookie is not None:
            assert decision.set_cookie == (COOKIE_PREFIX + service, target.hash)
    if isinstance(decision, SockJSInfo):
        balancers = tbl.balancers_by_service.get(service, ())
        base = decision.base_url.split(DDP_PREFIX)[0]
        assert base == target.balancer or base in balancers or base == "http://front:80"
        assert decision.base_url.endswith(f"{DDP_PREFIX}{target.hash}/{service}")


# --- records ------------------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                    st.datetimes(timezones=st.none() | st.just(dt.timezone.utc)))
json_like = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
url_parts = st.builds(
    lambda scheme, creds, host, port, rest: f"{scheme}://{creds}{host}{port}{rest}",
    st.sampled_from(["http", "https", "ftp", "HTTP", ""]),
    st.sampled_from(["", "u:p@", "@"]),
    st.sampled_from(["10.0.0.1", "a.example", "[::1]", "[zz]", "", "a b", "a\r\nb", "é.x"]),
    st.sampled_from(["", ":80", ":0", ":65535", ":65536", ":-1", ":x", ":"]),
    st.sampled_from(["", "/", "/p", "/?q", "#f", "/\x00", "/" + "a" * 3000]) | st.text(max_size=8),
)
good_url = st.builds(
    lambda scheme, host, port, path: f"{scheme}://{host}{port}{path}",
    st.sampled_from(["http", "https"]),
    st.sampled_from(["10.0.0.1", "a.example", "[::1]", "web_1.internal"]),
    st.sampled_from(["", ":1", ":80", ":65535"]),
    st.sampled_from(["", "/", "/prefix/"]))
field_values = {
    "serviceName": st.one_of(st.sampled_from(["web", "a:b.c_d-e", "x" * 128]),
                             st.sampled_from(["a b", "", "x" * 129, "wéb", "a\nb"]), scalars),
    "endpoint": st.one_of(good_url, url_parts, scalars),
    "balancer": st.one_of(st.none(), good_url, url_parts, scalars),
    "timestamp": st.one_of(st.datetimes(timezones=st.none() | st.just(dt.timezone.utc)),
                           scalars),
    "pingInterval": st.one_of(st.integers(MIN_PING_MS, MAX_PING_MS),
                              st.sampled_from([99, MAX_PING_MS + 1, 1e15, float("nan")]),
                              scalars),
}
record_st = st.fixed_dictionaries(field_values).flatmap(
    lambda d: st.tuples(st.sets(st.sampled_from(sorted(d))),
                        st.dictionaries(st.text(max_size=6), json_like, max_size=2))
    .map(lambda drop_extra: {**drop_extra[1],
                             **{k: v for k, v in d.items() if k not in drop_extra[0]}}))

SERVICE_RULE = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def assert_usable_url(url: str) -> None:
    assert len(url) <= MAX_URL_LENGTH
    assert all(33 <= ord(c) <= 126 for c in url), "no whitespace, control or non-ASCII"
    parts = urlsplit(url)
    assert parts.scheme in ("http", "https") and parts.hostname
    assert parts.port is None or 1 <= parts.port <= 65535
    assert "@" not in parts.netloc and not parts.query and not parts.fragment


@given(record_st, st.none() | st.just(NOW))
def test_record_parsing_never_raises_and_accepted_records_keep_every_rule(doc, now):
    try:
        endpoint, problem = check_record(doc, now)
    except MalformedRecord as exc:
        assert "\n" not in str(exc) and "\r" not in str(exc) and len(str(exc)) < 700
        return
    assert SERVICE_RULE.fullmatch(endpoint.service)
    assert_usable_url(doc["endpoint"])
    assert endpoint.hash == endpoint_hash(doc["endpoint"])
    assert MIN_PING_MS / 1000 <= endpoint.ping_interval <= MAX_PING_MS / 1000
    if endpoint.balancer is not None:
        assert_usable_url(endpoint.balancer)
    assert (problem is None) == (endpoint.balancer is not None or doc.get("balancer") in
                                 (None, ""))
    assert parse_record(doc, now) == endpoint


@given(st.lists(record_st, max_size=5))
def test_parse_documents_never_raises_and_accounts_for_every_record(docs):
    endpoints, problems = parse_documents(docs, NOW)
    assert len(endpoints) + len([p for p in problems if "balancer ignored" not in p[1]]) \
        == len(docs)
    for identity, problem in problems:
        for text in (identity, problem):
            assert "\n" not in text and "\r" not in text and len(text) < 700


# --- cookies ------------------------------------------------------------------------------

token = st.text(alphabet=string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~:",
                min_size=1, max_size=12)
cookie_value = st.text(
    alphabet=string.ascii_letters + string.digits + "!#$%&'()*+-./:<>?@[]^_`{|}~", max_size=12)


@given(st.lists(st.tuples(token, cookie_value), max_size=6), token)
def test_cookie_is_the_first_pair_with_that_name(pairs, name):
    header = "; ".join(f"{k}={v}" for k, v in pairs)
    expected = next((v for k, v in pairs if k == name), None)
    assert RequestView(cookie_header=header).cookie(name) == expected


@given(st.text(max_size=80), st.text(max_size=20))
def test_cookie_parsing_never_raises(header, name):
    assume(name)
    value = RequestView(cookie_header=header).cookie(name)
    assert value is None or (name in header and value in header.replace('"', "") + value)


# --- request heads (cluster/http1.py, the front door's parser) ---------------------------

head_piece = st.sampled_from([
    b"GET", b"POST", b" ", b"/", b"/a?b=1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"\r\n",
    b"\n", b"\r", b"\x00", b":", b"Host", b"host: x", b"Content-Length: 5",
    b"Content-Length: 05", b"Content-Length: -1", b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: gzip", b"Transfer-Encoding: gzip, chunked", b"Connection: close",
    b"Cookie: a=1", b" folded", b"\t", b"X_Under: 1", b"Proxy: evil", b"\xff",
]) | st.binary(max_size=8)
token_bytes = st.text(alphabet=string.ascii_letters + string.digits + "-", min_size=1,
                      max_size=10).map(str.encode)
value_bytes = st.binary(max_size=20).map(
    lambda b: bytes(c for c in b if c == 9 or 32 <= c <= 126 or c >= 128).strip(b" \t"))
target_bytes = st.binary(min_size=1, max_size=30).map(
    lambda b: b"/" + bytes(c for c in b if 33 <= c <= 126 or c >= 128))


@given(st.lists(head_piece, max_size=24).map(b"".join))
def test_request_head_parsing_never_raises_anything_but_a_status(head):
    try:
        req = parse_request_head(head)
    except RequestError as exc:
        assert exc.status in (400, 414, 431, 501, 505)
        return
    # what was accepted keeps the rules the door relies on
    assert req.version in (b"HTTP/1.0", b"HTTP/1.1")
    assert not any(c in req.target for c in b" \r\n\x00")
    for line in req.fields:
        assert b"\r" not in line and b"\n" not in line and b"\x00" not in line
        assert not line.lower().startswith((b"proxy:", b"proxy-", b"transfer-encoding:",
                                            b"content-length:", b"host:"))
    assert not (req.chunked and req.content_length >= 0)
    assert req.content_length >= -1


@given(st.sampled_from([b"GET", b"POST", b"PUT", b"OPTIONS"]), target_bytes,
       st.sampled_from([b"HTTP/1.0", b"HTTP/1.1"]), token_bytes,
       st.lists(st.tuples(token_bytes.map(lambda t: b"X-" + t), value_bytes), max_size=6),
       st.none() | st.integers(0, 10**12))
def test_a_well_formed_request_head_parses_to_what_was_sent(method, target, version, host,
                                                             fields, length):
    lines = [method + b" " + target + b" " + version, b"Host: " + host]
    lines += [name + b": " + value for name, value in fields]
    if length is not None:
        lines.append(b"Content-Length: " + str(length).encode())
    req = parse_request_head(b"\r\n".join(lines))
    assert (req.method, req.target, req.version, req.host) == (method, target, version, host)
    assert [f.partition(b":")[0] for f in req.fields] == [name for name, _ in fields]
    assert [f.partition(b":")[2].strip(b" \t") for f in req.fields] == [v for _, v in fields]
    assert req.content_length == (-1 if length is None else length)
    assert req.has_body == bool(length)
