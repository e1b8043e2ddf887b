"""Library mode: the WSGI adapter for servers we do not own (``cluster.wrap()``).

Under ``cluster serve``, gunicorn with cluster's worker, or :func:`cluster.server.
make_server` the front door (cluster.door) routes before any WSGI environ exists. Under
any other WSGI server this adapter does the same job from the environ: ``route()``
decides; it serves locally, proxies (HTTP or WebSocket, through the same HTTP/1.1 core,
connect layer and attempt loop as the door), answers SockJS info, or replies with a
short status. Upstream failures become one log line and a clean status: 502 broken,
504 slow, 503 nobody left, never a traceback.
"""

from __future__ import annotations

import io
import logging
from http import HTTPStatus
from typing import Any, Callable, Iterable

from cluster.admin import Admin
from cluster.admin import Response as AdminResponse
from cluster.config import Settings
from cluster.cookies import cookie_attributes, set_cookie
from cluster.errors import UpstreamBroken, UpstreamError
from cluster.handler import HIJACK_KEY, ClusterHandler, is_websocket_upgrade
from cluster.hop import HopMarker
from cluster.node import Cluster
from cluster.observe import NULL_OBSERVER, Observer
from cluster.placement import Placement
from cluster.proxy.attempts import attempt, client_answer, replayable
from cluster.proxy.http import BODY_KEY, HttpForwarder
from cluster.proxy.websocket import WebSocketBridge
from cluster.routing import (
    HOP_ENVIRON,
    Policy,
    Proxy,
    Reply,
    RequestView,
    Serve,
    SockJSInfo,
    route,
)
from cluster.sockjs import MAX_INFO_BYTES, rewrite_info
from cluster.trust import forwarded_clients, peer_address, trusted_peers

log = logging.getLogger(__name__)

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
StartResponse = Callable[..., Any]


def policy_for(settings: Settings, self_hash: str, has_local_app: bool) -> Policy:
    return Policy(
        service=settings.service,
        ui_service=settings.own_ui_service,
        self_hash=self_hash,
        has_local_app=has_local_app,
        self_weight=settings.self_weight,
        public_services=frozenset(settings.public_services),
        sockjs_prefix=settings.sockjs_prefix,
        balancer_url=settings.balancer_url,
        trusted_proxies=trusted_peers(settings.trusted_proxies),
        app_version=settings.own_app_version,
        version_order=settings.version_order,
        version_weights=settings.version_weights,
    )


def reply(start_response: StartResponse, status: int, body: str,
          content_type: str = "text/plain; charset=utf-8") -> list[bytes]:
    data = (body + ("\n" if content_type.startswith("text/plain") else "")).encode()
    return reply_bytes(start_response, status, data, content_type)


def reply_bytes(start_response: StartResponse, status: int, data: bytes,
                content_type: str, extra: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    start_response(
        f"{status} {phrase}",
        [("Content-Type", content_type), ("Content-Length", str(len(data))),
         ("Cache-Control", "no-store"), *extra],
    )
    return [data]


def admin_reply(start_response: StartResponse, page: AdminResponse) -> list[bytes]:
    return reply_bytes(start_response, page.status, page.body, page.content_type,
                       page.headers)


class ClusterApp:
    """A cluster member as a WSGI app: the local app (or none) plus balancing."""

    def __init__(self, local_app: WSGIApp | None, node: Cluster,
                 observer: Observer = NULL_OBSERVER) -> None:
        self.local_app = local_app
        self.node = node
        s = node.settings
        self.policy = policy_for(s, node.self_hash, local_app is not None)
        self.forwarder = HttpForwarder(connect_timeout=s.connect_timeout,
                                       read_timeout=s.read_timeout,
                                       trusted_proxies=self.policy.trusted_proxies)
        self.bridge = WebSocketBridge(connect_timeout=s.connect_timeout,
                                      write_timeout=s.write_timeout,
                                      trusted_proxies=self.policy.trusted_proxies)
        self.retries = s.retries
        #: the sticky cookies' attributes (--cookie-samesite)
        self.cookie_attributes = cookie_attributes(s.cookie_samesite)
        self.hop = HopMarker(s.secret, self.policy.trusted_proxies)
        self.observer = observer
        self.admin = Admin(node, s, observer)
        #: new sessions placed by load (cluster.placement); here without live figures
        #: of its own (this adapter does not see its WebSockets end), so this instance's
        #: own placements count on top of its record, like anyone's
        self.placement: Placement | None = None
        if s.placement == "load":
            self.placement = Placement(None, None,
                                       read_at=lambda: node.watcher.read_at,
                                       lag=node.watcher.refresh_interval,
                                       max_age=2 * s.ping_interval + node.watcher.refresh_interval)

    def __repr__(self) -> str:
        return f"<ClusterApp {self.node!r} {self.forwarder!r}>"

    def close(self) -> None:
        self.node.close()
        self.forwarder.close()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") == "CONNECT":
            # As at the door (cluster.http1): a balancer opens no tunnels, and an app's
            # 200 would turn the client's connection into one the server reads as HTTP.
            return reply_bytes(start_response, 501, b"CONNECT is not supported\n",
                               "text/plain; charset=utf-8", (("Connection", "close"),))
        node = self.node
        marker = environ.get(HOP_ENVIRON)
        hop = False
        if isinstance(marker, str) and marker:
            from cluster.proxy.http import request_target

            hop = self.hop.verify(marker.encode("latin-1"),
                                  str(environ.get("REQUEST_METHOD", "GET")).encode("latin-1"),
                                  request_target(environ).encode("latin-1"),
                                  peer_address(str(environ.get("REMOTE_ADDR") or "")),
                                  node.table)
        if marker is not None and not hop:
            environ.pop(HOP_ENVIRON, None)  # an unproven marker reaches no app
        request = RequestView.from_environ(environ, hop=hop)
        if not hop and self.admin.handles(request.path):
            # Trusted networks, or anyone with --admin-token (else the app's own path).
            get = environ.get
            answer = self.admin.answer(request.path, request.remote_addr, request.query,
                                       str(get("HTTP_AUTHORIZATION", "")), request.method,
                                       forwarded_clients(str(get("HTTP_X_FORWARDED_FOR", "")),
                                                         str(get("HTTP_FORWARDED", "")),
                                                         str(get("HTTP_X_REAL_IP", ""))),
                                       str(get("HTTP_ORIGIN", "")))
            if answer is not None:
                return admin_reply(start_response, answer)

        def pick(tried: frozenset[str]) -> Any:
            # tried: never again; ejected: only when nothing else is left (panic mode)
            table = node.table
            placement = self.placement
            if placement is None:
                return route(request, table, self.policy, tried, ejected=node.ejected())
            decision = route(request, table, self.policy, tried, ejected=node.ejected(),
                             load=placement.scores(table))
            # a new WebSocket counts where it went until that endpoint's figure has it
            cookie = getattr(decision, "set_cookie", None)
            if cookie is not None:
                if "HTTP_UPGRADE" in environ and is_websocket_upgrade(environ):
                    placement.placed(cookie[1])
            elif isinstance(decision, SockJSInfo):
                placement.placed(decision.endpoint.hash if decision.endpoint is not None
                                 else self.policy.self_hash or "")
            return decision

        # the client's forwarding claims reach the local app from a trusted proxy or a
        # proven member only, as at the front door (_pairs_for_app)
        believed = hop or request.remote_addr in self.policy.trusted_proxies

        def send(decision: Any) -> Iterable[bytes]:
            if isinstance(decision, Serve):
                return self._serve(decision, for_local_app(environ, believed),
                                   start_response)
            if isinstance(decision, Reply):
                return reply(start_response, decision.status, decision.body)
            if isinstance(decision, SockJSInfo):
                return self._sockjs_info(decision, environ, start_response, believed)
            return self._proxy(decision, environ, start_response)

        has_body = environ.get("CONTENT_LENGTH") not in (None, "", "0") or \
            "HTTP_TRANSFER_ENCODING" in environ
        try:
            return attempt(pick, send, endpoint_of=_endpoint_of, node=node,
                           retries=self.retries,
                           may_replay=replayable(request.method, has_body),
                           gave_up=_no_endpoint_left)
        except UpstreamError as failure:
            log.warning("%s %s failed: %s", request.method, request.path, failure)
            status, text = client_answer(failure, self.policy.ui_service or "")
            return reply(start_response, status, text)

    def status(self) -> dict[str, Any]:
        """This instance's view: its identity, its table, what it has ejected."""
        return self.admin.status()

    def _hop_header(self, environ: dict[str, Any], path_qs: str) -> tuple[str, str]:
        line = self.hop.line(str(environ.get("REQUEST_METHOD", "GET")).encode("latin-1"),
                             path_qs.encode("latin-1"))
        name, _, value = line.decode("latin-1").partition(": ")
        return name, value

    def _serve(self, decision: Serve, environ: dict[str, Any],
               start_response: StartResponse) -> Iterable[bytes]:
        assert self.local_app is not None
        if decision.path is not None:
            environ = dict(environ, PATH_INFO=decision.path)
        taken = environ.pop(BODY_KEY, None)
        if taken is not None:
            # an attempt to relay it read the body, and its endpoint refused: the app
            # reads it from here (it waited on a wsgi.input already read to the end)
            environ = dict(environ, **{"wsgi.input": io.BytesIO(taken)})
        cookies = [set_cookie(c, self.cookie_attributes)
                   for c in (decision.set_cookie, decision.set_version) if c is not None]
        if "HTTP_UPGRADE" in environ and "wsgi.websocket" not in environ:
            if is_websocket_upgrade(environ):
                # Served here: under ClusterHandler the handshake is answered now that
                # the route is known.
                handler = getattr(environ.get(HIJACK_KEY), "__self__", None)
                if isinstance(handler, ClusterHandler):
                    settings = self.node.settings
                    return handler.serve_websocket(self.local_app, cookies,
                                                   settings.max_websocket_message,
                                                   settings.write_timeout, environ)
            else:
                environ = _without_upgrade(environ)
        if not cookies:
            return self.local_app(environ, start_response)

        def with_cookie(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
            return start_response(status, [*headers, *cookies], *exc)

        return self.local_app(environ, with_cookie)

    def _proxy(self, decision: Proxy, environ: dict[str, Any],
               start_response: StartResponse) -> Iterable[bytes]:
        url = decision.endpoint.url
        hop = self._hop_header(environ, decision.path_qs)
        cookies = [set_cookie(c, self.cookie_attributes)
                   for c in (decision.set_cookie, decision.set_version) if c is not None]
        # is_websocket_upgrade is False without an Upgrade header: skip it for plain HTTP.
        if "HTTP_UPGRADE" in environ and is_websocket_upgrade(environ):
            return self.bridge.bridge(environ, start_response, url, decision.path_qs, (hop,),
                                      cookies)
        response = self.forwarder.forward(environ, url, decision.path_qs, (hop,))
        start_response(response.status, [*response.headers, *cookies])
        body: Iterable[bytes] = response.body
        return body

    def _sockjs_info(self, decision: SockJSInfo, environ: dict[str, Any],
                     start_response: StartResponse, believed: bool = False) -> Iterable[bytes]:
        """SockJS info from the chosen endpoint, asked with the client's own headers
        (Origin, Cookie...), passed on with its status and headers, ``base_url``
        pointing at it."""
        if decision.endpoint is None:
            status, headers, body = self._local_info(for_local_app(environ, believed),
                                                     decision.path_qs)
            where = "local app"
        else:
            response = self.forwarder.forward(
                environ, decision.endpoint.url, decision.path_qs,
                (self._hop_header(environ, decision.path_qs),))
            status, headers = response.status, response.headers
            body = _read_limited(response.body)
            where = decision.endpoint.url
        code = int(status[:3]) if status[:3].isdigit() else 502
        answer = rewrite_info(code, headers, body, decision.base_url, where)
        if not answer.content_type:  # a 204 or 304: the endpoint's fields, nothing added
            start_response(f"{answer.status} {HTTPStatus(answer.status).phrase}",
                           answer.fields)
            return []
        return reply_bytes(start_response, answer.status, answer.body, answer.content_type,
                           answer.fields)

    def _local_info(self, environ: dict[str, Any],
                    path_qs: str) -> tuple[str, list[tuple[str, str]], bytes]:
        assert self.local_app is not None
        path, _, query = path_qs.partition("?")
        captured: dict[str, Any] = {}

        def capture(status: str, headers: Any, *exc: Any) -> Callable[[bytes], None]:
            captured["status"] = status
            captured["headers"] = list(headers)
            return lambda data: None

        result = self.local_app(dict(environ, PATH_INFO=path, QUERY_STRING=query), capture)
        try:
            body = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        return (captured.get("status", "500 Internal Server Error"),
                captured.get("headers", []), body)


#: the fields that say whom and how a request was forwarded for (cluster.trust)
_FORWARDING_KEYS = frozenset({"HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_PROTO",
                              "HTTP_X_FORWARDED_HOST", "HTTP_FORWARDED", "HTTP_X_REAL_IP"})
#: never for an app: Proxy (httpoxy) and the hop marker (meant for this instance)
_NEVER_KEYS = frozenset({"HTTP_PROXY", HOP_ENVIRON})


def for_local_app(environ: dict[str, Any], believed: bool) -> dict[str, Any]:
    """``environ`` as the local app may see it, the same as under the front door: the
    forwarding fields only when ``believed`` (a --trusted-proxies peer, or a member
    whose hop marker proved it), never ``Proxy`` nor the hop marker. Else any client
    told the app its address (X-Forwarded-For) and scheme, which the door and the
    relay replace."""
    drop = _NEVER_KEYS if believed else _NEVER_KEYS | _FORWARDING_KEYS
    if drop.isdisjoint(environ):
        return environ
    return {key: value for key, value in environ.items() if key not in drop}


def _without_upgrade(environ: dict[str, Any]) -> dict[str, Any]:
    """``environ`` without an Upgrade that is ignored (HTTP/1.0, a body: RFC 9110 7.8),
    as a relayed request's endpoint would get it (hop-by-hop) and as the front door
    gives it: else an app that upgrades on its own (engine.io) sets out to, finds no
    socket, and raises."""
    environ = dict(environ)
    del environ["HTTP_UPGRADE"]
    tokens = [token for token in str(environ.pop("HTTP_CONNECTION", "")).split(",")
              if token.strip() and token.strip().lower() != "upgrade"]
    if tokens:
        environ["HTTP_CONNECTION"] = ",".join(tokens)
    return environ


def _endpoint_of(decision: Any) -> Any:
    return getattr(decision, "endpoint", None)


def _no_endpoint_left(decision: Any) -> bool:
    return isinstance(decision, Reply) and decision.status == 503


def _read_limited(body: Iterable[bytes]) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        for chunk in body:
            size += len(chunk)
            if size > MAX_INFO_BYTES:
                raise UpstreamBroken("sockjs info", "response larger than 64 KiB")
            chunks.append(chunk)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return b"".join(chunks)


def wrap(app: WSGIApp | None, node: Cluster | None = None, **settings: Any) -> ClusterApp:
    """Make ``app`` a cluster member: register it, watch the others, balance.

    ``settings`` are :class:`~cluster.config.Settings` fields (they override the
    ``CLUSTER_*`` environment); call ``close()`` on the result to deregister.
    Raises :class:`~cluster.errors.ConfigError` for a bad setting.
    """
    if node is None:
        node = Cluster(register=app is not None, **settings).start()
    return ClusterApp(app, node)
