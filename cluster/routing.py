"""Where a request goes: a pure function of the request and an endpoint table.

No sockets, no clock, no globals: ``route()`` takes a :class:`RequestView`, the
current :class:`~cluster.registry.EndpointTable`, this instance's :class:`Policy` and
a random source, and returns a :class:`Decision`. Moving bytes lives elsewhere. (One
memo: :func:`service_view` remembers what it derived from the latest table; the
answer is the same with or without it.)

What it replaces in nginx terms: ``upstream`` with ``sticky cookie`` (the
``cluster-endpoint::<service>`` cookie), ``proxy_next_upstream error timeout`` (the
``exclude`` set: endpoints already tried or passively ejected), and a ``location
/cluster-ddp/`` per endpoint that pins a SockJS session to one server.

Before a new session is placed, :func:`candidates` leaves out draining endpoints and
keeps one app version (the session's own while it has live endpoints, else the newest
or a canary draw, see cluster/versions.py); ``_pick_from`` then chooses among what is
left. A session's version travels in a second cookie, ``cluster-version::<service>``,
so the first stays exactly meteorhacks' (an endpoint hash).

The admin pages (``--admin-prefix``) are not routed: cluster.admin answers them before
``route()`` for the clients it lets in, and to everyone else they are the app's paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, Union
from urllib.parse import quote

from cluster import versions
from cluster.rand import RANDOM
from cluster.records import Endpoint
from cluster.registry import EndpointTable
from cluster.trust import peer_address

HOP_HEADER = "X-Cluster-Hop"
HOP_ENVIRON = "HTTP_X_CLUSTER_HOP"
COOKIE_PREFIX = "cluster-endpoint::"
#: the session's app version, next to the meteorhacks-shaped endpoint cookie
VERSION_COOKIE_PREFIX = "cluster-version::"
DDP_PREFIX = "/cluster-ddp/"


class RequestView:
    """The parts of a request that routing looks at.

    A plain slotted class, not a dataclass: one is made per request on the door's hot
    path, and a frozen dataclass's ``__init__`` costs several times more.
    """

    __slots__ = ("method", "path", "query", "cookie_header", "hop", "scheme", "host",
                 "forwarded_proto", "forwarded_host", "remote_addr", "raw_target")

    def __init__(self, method: str = "GET", path: str = "/", query: str = "",
                 cookie_header: str = "", hop: bool = False, scheme: str = "http",
                 host: str = "", forwarded_proto: str = "", forwarded_host: str = "",
                 remote_addr: str = "", raw_target: str = "") -> None:
        self.method = method
        self.path = path
        self.query = query
        self.cookie_header = cookie_header
        #: a hop marker that proved membership (see cluster.hop); others are ignored
        self.hop = hop
        self.scheme = scheme
        self.host = host
        self.forwarded_proto = forwarded_proto
        self.forwarded_host = forwarded_host
        self.remote_addr = remote_addr
        #: the request-target exactly as received (RAW_URI), when the server provides it
        self.raw_target = raw_target

    def __repr__(self) -> str:
        return f"<RequestView {self.method} {self.raw_target or self.path!r}>"

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RequestView):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    @classmethod
    def from_environ(cls, environ: Mapping[str, object],
                     hop: bool | None = None) -> RequestView:
        """The view of a WSGI environ; a value that is not a string counts as absent.

        ``hop``: whether the request's hop marker was verified (None: a marker counts
        when present, for callers that verified it already or trust every peer).
        """

        def get(key: str, default: str = "") -> str:
            value = environ.get(key, default)
            return value if isinstance(value, str) else default

        return cls(
            method=get("REQUEST_METHOD", "GET"),
            path=get("PATH_INFO", "/") or "/",
            query=get("QUERY_STRING"),
            cookie_header=get("HTTP_COOKIE"),
            hop=(HOP_ENVIRON in environ) if hop is None else hop,
            scheme=get("wsgi.url_scheme", "http"),
            host=get("HTTP_HOST") or get("SERVER_NAME"),
            forwarded_proto=get("HTTP_X_FORWARDED_PROTO"),
            forwarded_host=get("HTTP_X_FORWARDED_HOST"),
            remote_addr=peer_address(get("REMOTE_ADDR")),
            raw_target=get("RAW_URI"),
        )

    @property
    def path_qs(self) -> str:
        """What to send upstream: the raw target when known, so %2F stays %2F."""
        if self.raw_target.startswith("/"):
            return self.raw_target
        path = quote(self.path, safe="/%:@!$&'()*+,;=-._~")
        return f"{path}?{self.query}" if self.query else path

    def cookie(self, name: str) -> str | None:
        """The value of cookie ``name``; a small scan, cheaper than SimpleCookie."""
        if name not in self.cookie_header:
            return None
        for part in self.cookie_header.split(";"):
            key, sep, value = part.strip().partition("=")
            if sep and key == name:
                return value.strip().strip('"')
        return None

    def public_base(self, trusted_proxies: frozenset[str]) -> str:
        """This instance's URL as the client sees it.

        X-Forwarded-Proto/-Host are believed only from trusted proxies; anyone else
        could otherwise make us hand out a base URL of their choosing.
        """
        trusted = self.remote_addr in trusted_proxies
        scheme = self.scheme
        host = self.host
        if trusted and self.forwarded_proto:
            claimed = self.forwarded_proto.split(",")[0].strip().lower()
            if claimed in ("http", "https"):  # never javascript: or anything else
                scheme = claimed
        if trusted and self.forwarded_host:
            host = self.forwarded_host.split(",")[0].strip()
        return f"{scheme}://{host}"


@dataclass(frozen=True)
class Policy:
    """This instance's fixed routing settings."""

    service: str | None = None
    ui_service: str | None = None
    self_hash: str | None = None
    has_local_app: bool = True
    self_weight: float = 1.0
    public_services: frozenset[str] = frozenset()
    sockjs_prefix: str = "/sockjs"
    balancer_url: str | None = None
    trusted_proxies: frozenset[str] = frozenset({"127.0.0.1", "::1"})
    #: this instance drains (its record says so too, one table refresh later)
    draining: bool = False
    #: the app version this instance runs ("": none)
    app_version: str = ""
    #: --version-order, oldest first (empty: version sort)
    version_order: tuple[str, ...] = ()
    #: --version-weights as (version, weight) pairs (empty: the newest version)
    version_weights: tuple[tuple[str, float], ...] = ()

    def reachable(self, service: str) -> bool:
        """Outside clients may reach public services and the UI service only."""
        return service in self.public_services or service == self.ui_service

    @property
    def serves_ui_locally(self) -> bool:
        return self.has_local_app and self.service is not None and self.service == self.ui_service


@dataclass(frozen=True)
class Serve:
    """Serve with the local app, the path rewritten when ``path`` is set."""

    path: str | None = None
    set_cookie: tuple[str, str] | None = None
    #: the session's version cookie, when it must be set or changed
    set_version: tuple[str, str] | None = None


@dataclass(frozen=True)
class Proxy:
    """Send to ``endpoint`` with ``path_qs``.

    ``retry`` allows another endpoint when this one refuses the connection; a
    pinned SockJS session must not move, so it sets ``retry=False``.
    """

    endpoint: Endpoint
    path_qs: str
    set_cookie: tuple[str, str] | None = None
    retry: bool = True
    #: the session's version cookie, when it must be set or changed
    set_version: tuple[str, str] | None = None


@dataclass(frozen=True)
class SockJSInfo:
    """Answer SockJS info from ``endpoint`` (None: the local app) with ``base_url``."""

    endpoint: Endpoint | None
    path_qs: str
    base_url: str


@dataclass(frozen=True)
class Reply:
    """Answer here with a short text body."""

    status: int
    body: str


Decision = Union[Serve, Proxy, SockJSInfo, Reply]
#: an endpoint's load by its hash, lower is less loaded (cluster.placement makes one)
Scores = Callable[[str], float]


def cookie_name(service: str) -> str:
    return COOKIE_PREFIX + service


def route(
    request: RequestView,
    table: EndpointTable,
    policy: Policy,
    exclude: frozenset[str] = frozenset(),
    rand: Callable[[], float] = RANDOM.random,
    *,
    ejected: frozenset[str] = frozenset(),
    load: Scores | None = None,
) -> Decision:
    """Decide what to do with ``request``.

    ``exclude`` holds endpoint hashes never to pick (already tried for this request);
    ``ejected`` holds those passively ejected, left out while anything else of the
    service is live but tried anyway when nothing else is (a panic mode, as Envoy's
    panic threshold: a guess at a recovered endpoint beats a certain 503). ``rand``
    returns floats in [0, 1). ``load`` scores endpoints by hash (lower: less loaded;
    see cluster.placement): with it a new session is placed by the power of two
    choices, without it uniformly at random (by weight).
    """
    if request.path.startswith(DDP_PREFIX):
        return _route_session(request, table, policy)
    if request.hop:
        # Another instance chose us: serve, whatever our own table says, so a request
        # never bounces between two instances whose tables disagree for a moment. (It
        # never gets the status page: that would answer a client the first hop did
        # not trust, and hide the app's own page of that name.)
        return Serve() if policy.has_local_app else Reply(502, "this instance has no local app")
    info = _sockjs_info_service(request.path, policy)
    if info is not None:
        return _route_sockjs_info(request, table, policy, info, exclude, rand, ejected,
                                  load)
    service = policy.ui_service
    if service is None:
        return Serve() if policy.has_local_app else Reply(503, "no service configured")
    return _route_sticky(request, table, policy, service, exclude, rand, ejected, load)


_Cookie = Union[tuple[str, str], None]
_Picked = Union[tuple[Union[Endpoint, None], bool, _Cookie], Reply]
#: (endpoint or None for the local app, local, endpoint cookie, version cookie)
_Session = Union[tuple[Union[Endpoint, None], bool, _Cookie, _Cookie], Reply]


def _pick(
    request: RequestView,
    table: EndpointTable,
    policy: Policy,
    service: str,
    exclude: frozenset[str],
    rand: Callable[[], float],
    ejected: frozenset[str] = frozenset(),
    load: Scores | None = None,
) -> _Session:
    """:func:`_pick_session` without the ejected endpoints, or with them when nothing
    else of the service is left (panic mode); ``exclude`` is never picked."""
    if ejected:
        picked = _pick_session(request, table, policy, service, exclude | ejected, rand,
                               load)
        if not isinstance(picked, Reply):
            return picked
    return _pick_session(request, table, policy, service, exclude, rand, load)


@dataclass(frozen=True)
class Member:
    """What the candidate filter knows of one endpoint of a service (this instance
    included, also before its own record is in the table)."""

    hash: str
    version: str
    draining: bool


@dataclass(frozen=True)
class ServiceView:
    """What the candidate filter needs of one service in one table: its members by
    hash, and whether they are *uniform* (none draining, one version, ``version``)."""

    found: Mapping[str, Member]
    uniform: bool
    version: str
    version_cookie: str


_VIEWS: dict[tuple[str, int], tuple[EndpointTable, Policy, ServiceView]] = {}


def service_view(table: EndpointTable, policy: Policy, service: str) -> ServiceView:
    """The :class:`ServiceView` of ``service``, remembered for the latest table of each
    (service, policy): a request should not cost a pass over the endpoints."""
    key = (service, id(policy))  # hashing a Policy per request would cost more
    cached = _VIEWS.get(key)
    if cached is not None and cached[0] is table and cached[1] is policy:
        return cached[2]
    found = {e.hash: Member(e.hash, e.version, e.draining)
             for e in table.by_service.get(service, ())}
    self_hash = policy.self_hash
    if policy.has_local_app and service == policy.service and self_hash is not None:
        own = found.get(self_hash)
        found[self_hash] = Member(self_hash, own.version if own else policy.app_version,
                                  policy.draining or (own is not None and own.draining))
    present = {m.version for m in found.values()}
    uniform = not any(m.draining for m in found.values()) and len(present) <= 1
    view = ServiceView(found, uniform, next(iter(present)) if len(present) == 1 else "",
                       VERSION_COOKIE_PREFIX + service)
    if len(_VIEWS) > 64:  # policies are few; tables replace each other
        _VIEWS.clear()
    _VIEWS[key] = (table, policy, view)
    return view


def candidates(found: Mapping[str, Member], exclude: frozenset[str], session_version: str,
               policy: Policy, rand: Callable[[], float]) -> frozenset[str]:
    """The hashes a new pick may choose from (empty only when nothing is left).

    Draining endpoints are left out unless every usable one drains (a draining
    endpoint beats a 503). A session whose version is known (``session_version``) keeps
    it while that version has a usable endpoint that is not draining; otherwise one
    version is chosen among the rest: the newest, or by ``--version-weights``.
    """
    usable = [m for m in found.values() if m.hash not in exclude]
    if not usable:
        return frozenset()
    live = [m for m in usable if not m.draining] or usable
    if session_version:
        same = [m for m in live if m.version == session_version and not m.draining]
        if same:
            return frozenset(m.hash for m in same)
    present = {m.version for m in live}
    if len(present) > 1:
        chosen = versions.choose(present, policy.version_order, policy.version_weights, rand)
        live = [m for m in live if m.version == chosen]
    return frozenset(m.hash for m in live)


def _pick_session(
    request: RequestView,
    table: EndpointTable,
    policy: Policy,
    service: str,
    exclude: frozenset[str],
    rand: Callable[[], float],
    load: Scores | None = None,
) -> _Session:
    """Keep the session where it is, else filter the candidates, then :func:`_pick_from`.

    The sticky endpoint is kept while it lives (draining or not) and runs the session's
    version (an endpoint that now runs another version is a restarted process: the
    session is treated as gone). A session that must move keeps its version while that
    version has live endpoints (:func:`candidates`).
    """
    view = service_view(table, policy, service)
    version_name = view.version_cookie
    session_version = request.cookie(version_name) or ""
    if view.uniform and (not session_version or session_version == view.version):
        # nothing to filter (the usual case)
        picked = _pick_from(request, table, policy, service, exclude, rand, load)
        if isinstance(picked, Reply) or session_version == view.version:
            return picked if isinstance(picked, Reply) else (*picked, None)
        return (*picked, (version_name, view.version))
    found = view.found
    wanted = request.cookie(COOKIE_PREFIX + service)
    kept = found.get(wanted or "")
    leave_out = exclude
    if kept is None or kept.hash in exclude or (
            session_version and kept.version != session_version):
        keep = candidates(found, exclude, session_version, policy, rand)
        leave_out = exclude | (found.keys() - keep)
    # _pick_from follows the cookie when its endpoint is (still) a candidate
    picked = _pick_from(request, table, policy, service, leave_out, rand, load)
    if isinstance(picked, Reply):
        return picked
    endpoint, local, set_cookie = picked
    chosen = found.get(policy.self_hash or "") if local else None
    version = chosen.version if chosen is not None else (
        endpoint.version if endpoint is not None else policy.app_version)
    set_version = (version_name, version) if version != session_version else None
    return endpoint, local, set_cookie, set_version


def _pick_from(
    request: RequestView,
    table: EndpointTable,
    policy: Policy,
    service: str,
    exclude: frozenset[str],
    rand: Callable[[], float],
    load: Scores | None = None,
) -> _Picked:
    """(endpoint, local, cookie-to-set) for ``service``, or a Reply when none is live.

    The sticky cookie wins while its endpoint is live and not excluded; otherwise a
    new placement among the candidates, where this instance weighs ``self_weight`` and
    every other endpoint weighs 1, as in meteorhacks:cluster (see :func:`place`).
    """
    local_ok = policy.has_local_app and service == policy.service and policy.self_hash is not None
    self_hash = policy.self_hash if local_ok else None
    candidates = table.by_service.get(service, ())
    others: Sequence[Endpoint]
    if not exclude and (policy.self_hash is None or policy.self_hash not in table.by_hash):
        # Nothing to leave out (a plain balancer's usual case): EndpointTable.build
        # indexes the same live endpoints by service and by hash.
        others = candidates
    else:
        others = [
            e for e in candidates if e.hash not in exclude and e.hash != policy.self_hash
        ]
    name = COOKIE_PREFIX + service
    wanted = request.cookie(name)
    if wanted:
        if wanted == self_hash and self_hash not in exclude:
            return None, True, None
        for endpoint in others:
            if endpoint.hash == wanted:
                return endpoint, False, None
    self_weight = policy.self_weight if self_hash and self_hash not in exclude else 0.0
    total = self_weight + len(others)
    if total <= 0:
        if self_hash and self_hash not in exclude and not others:
            # self weight 0 with no one else alive: serving beats a 503.
            return None, True, (name, self_hash)
        return Reply(503, f"no live endpoint for service {service!r}")
    index = place(others, self_hash if self_weight > 0 else None, self_weight, rand, load)
    if index < 0:
        assert self_hash is not None
        return None, True, (name, self_hash)
    chosen = others[index]
    return chosen, False, (name, chosen.hash)


def _draw(count: int, self_weight: float, rand: Callable[[], float],
          skip: int | None = None) -> int:
    """One weighted draw: -1 for this instance (weight ``self_weight``), else the index
    of one of ``count`` others (weight 1 each), never ``skip``."""
    total = self_weight + count
    if skip is not None:
        total -= self_weight if skip < 0 else 1.0
        if skip < 0:
            self_weight = 0.0
    point = rand() * total
    if point < self_weight:
        return -1
    index = min(int(point - self_weight), count - 1)
    if skip is not None and skip >= 0 and index >= skip:
        index = min(index + 1, count - 1)
    return index


def place(
    others: Sequence[Endpoint],
    self_hash: str | None,
    self_weight: float,
    rand: Callable[[], float],
    load: Scores | None = None,
) -> int:
    """Where a new session goes: -1 for this instance, else an index into ``others``.

    Without ``load``: a weighted random draw. With it, the power of two choices: two
    different candidates drawn by weight, the one with the lower load per unit of
    weight wins (a tie: the first drawn). Two random candidates rather than the least
    loaded of all: balancers that see the same slightly stale loads would otherwise all
    send their next sessions to the same endpoint (herding). ``self_hash`` None: this
    instance is not a candidate. ``others`` must not be empty unless this one is.
    """
    weight = self_weight if self_hash is not None else 0.0
    first = _draw(len(others), weight, rand)
    if load is None or len(others) + (1 if weight > 0 else 0) < 2:
        return first
    second = _draw(len(others), weight, rand, skip=first)

    def per_weight(index: int) -> float:
        if index < 0:
            assert self_hash is not None
            return load(self_hash) / weight
        return load(others[index].hash)

    return second if per_weight(second) < per_weight(first) else first


def _route_sticky(
    request: RequestView,
    table: EndpointTable,
    policy: Policy,
    service: str,
    exclude: frozenset[str],
    rand: Callable[[], float],
    ejected: frozenset[str] = frozenset(),
    load: Scores | None = None,
) -> Decision:
    picked = _pick(request, table, policy, service, exclude, rand, ejected, load)
    if isinstance(picked, Reply):
        return picked
    endpoint, local, set_cookie, set_version = picked
    if local:
        return Serve(set_cookie=set_cookie, set_version=set_version)
    assert endpoint is not None
    return _proxy(endpoint, request.path_qs, set_cookie, set_version)


_PROXIES: dict[tuple[int, str, _Cookie, _Cookie], Proxy] = {}
#: longer paths are not kept: 4,096 entries of 8 KiB request lines would hold 32 MiB
_PROXIES_PATH_MAX = 512


def _proxy(endpoint: Endpoint, path_qs: str, set_cookie: _Cookie, set_version: _Cookie) -> Proxy:
    """``Proxy(endpoint, path_qs, ...)``, the same (frozen) object again for the same
    arguments: building a frozen dataclass costs about 1 µs, a third of a whole route()
    (docs/benchmarks.md). The entry holds ``endpoint``, so its id is not reused while
    the entry lives; the cache is emptied when it grows (paths vary without bound).
    A target with a query string is seldom asked for twice: it is not looked up, which
    halves its cost."""
    if "?" in path_qs or len(path_qs) > _PROXIES_PATH_MAX:
        return Proxy(endpoint, path_qs, set_cookie=set_cookie, set_version=set_version)
    key = (id(endpoint), path_qs, set_cookie, set_version)
    made = _PROXIES.get(key)
    if made is None:
        made = Proxy(endpoint, path_qs, set_cookie=set_cookie, set_version=set_version)
        if len(_PROXIES) >= 4096:
            _PROXIES.clear()
        _PROXIES[key] = made
    return made


def _sockjs_info_service(path: str, policy: Policy) -> str | None:
    """The service whose SockJS info ``path`` asks for, if it is such a path."""
    if not path.endswith("/info"):  # nearly every request: no string built
        return None
    suffix = policy.sockjs_prefix + "/info"
    if path == suffix:
        return policy.ui_service or policy.service or ""
    if path.endswith(suffix) and path.count("/") == suffix.count("/") + 1:
        return path[1 : -len(suffix)]
    return None


def _route_sockjs_info(
    request: RequestView,
    table: EndpointTable,
    policy: Policy,
    service: str,
    exclude: frozenset[str],
    rand: Callable[[], float],
    ejected: frozenset[str] = frozenset(),
    load: Scores | None = None,
) -> Decision:
    if not service or not policy.reachable(service):
        return Reply(403, f"service {service!r} is not public here")
    picked = _pick(request, table, policy, service, exclude, rand, ejected, load)
    if isinstance(picked, Reply):
        return picked
    endpoint, local, _, _ = picked
    info_path = policy.sockjs_prefix + "/info"
    path_qs = f"{info_path}?{request.query}" if request.query else info_path
    if request.method != "GET":
        # A CORS preflight (OPTIONS), or a method SockJS refuses (405, HEAD included):
        # the endpoint's own answer, as any request's; it names no URL to rewrite.
        if local:
            return Serve(path=info_path)
        assert endpoint is not None
        return Proxy(endpoint, path_qs)
    if local:
        own = table.by_hash.get(policy.self_hash or "")
        balancer = _balancer_for(own, service, request, table, policy, rand)
        target_hash = policy.self_hash
    else:
        assert endpoint is not None
        balancer = _balancer_for(endpoint, service, request, table, policy, rand)
        target_hash = endpoint.hash
    base_url = f"{balancer}{DDP_PREFIX}{target_hash}/{service}"
    return SockJSInfo(None if local else endpoint, path_qs, base_url)


def _balancer_for(
    endpoint: Endpoint | None,
    service: str,
    request: RequestView,
    table: EndpointTable,
    policy: Policy,
    rand: Callable[[], float],
) -> str:
    """The endpoint's own balancer, else a random live one of the same service, else
    this instance. Never another service's: any writer to the store can announce a
    balancer for its own records, and only for those."""
    if endpoint is not None and endpoint.balancer:
        return endpoint.balancer
    balancers = table.balancers_by_service.get(service, ())
    if balancers:
        return balancers[min(int(rand() * len(balancers)), len(balancers) - 1)]
    return policy.balancer_url or request.public_base(policy.trusted_proxies)


def _route_session(request: RequestView, table: EndpointTable, policy: Policy) -> Decision:
    """``/cluster-ddp/<hash>/<service>/<rest>`` goes to exactly that endpoint."""
    if _escapes(request.path, request.raw_target):
        return Reply(400, "dot segments and encoded slashes are not allowed in session paths")
    parts = request.path[len(DDP_PREFIX):].split("/", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        return Reply(404, "malformed session path")
    endpoint_hash, service = parts[0], parts[1]
    if not _is_sha1_hex(endpoint_hash):  # not a hash any record can have; not echoed back
        return Reply(404, "malformed session path")
    rest = "/" + parts[2] if len(parts) == 3 else ""
    if not policy.reachable(service):
        return Reply(403, f"service {service!r} is not public here")
    target = policy.sockjs_prefix + rest
    if endpoint_hash == policy.self_hash and policy.has_local_app and service == policy.service:
        return Serve(path=target)
    endpoint = table.by_hash.get(endpoint_hash)
    if endpoint is None or endpoint.service != service:
        # The session's server is gone: a clean 404 makes the client start a new
        # session, instead of silently continuing it on a server that never saw it.
        return Reply(404, f"endpoint {endpoint_hash} of {service!r} is gone; start a new session")
    path_qs = RequestView(path=target, query=request.query).path_qs
    return Proxy(endpoint, path_qs, retry=False)


_ENCODED_SEPARATORS = ("%2f", "%5c", "\\")


def _escapes(path: str, raw_target: str) -> bool:
    """Could this session path leave the endpoint's SockJS prefix once rewritten?

    ``path`` is decoded (PATH_INFO); ``raw_target`` is the request-target as sent,
    when the server gives it. Dot segments (``.``, ``..``, also as ``%2e`` in any
    case) and encoded slashes or backslashes (``%2f``, ``%5c``, ``\\``) are refused
    in either form: an endpoint, or a server in front of it, may decode and
    normalize them into a path outside ``/sockjs/``.
    """
    raw = raw_target.partition("?")[0] if raw_target.startswith("/") else ""
    for text in (path, raw):
        lowered = text.lower()
        if any(sep in lowered for sep in _ENCODED_SEPARATORS):
            return True
        for segment in lowered.split("/"):
            if segment.replace("%2e", ".") in (".", ".."):
                return True
    return False


def _is_sha1_hex(text: str) -> bool:
    return len(text) == 40 and all(c in "0123456789abcdef" for c in text)
