"""The WSGI app that turns a routing decision into an action.

``route()`` decides; this module serves locally, proxies (HTTP or WebSocket), answers
SockJS info, or replies with a short status. Upstream failures become one log line
and a clean status: 502 broken, 504 slow, 503 nobody left, never a traceback.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any, Callable, Iterable

from cluster.admin import Admin
from cluster.config import Settings
from cluster.errors import UpstreamBroken, UpstreamError
from cluster.node import Cluster
from cluster.observe import NULL_OBSERVER, Observer
from cluster.proxy.http import HttpForwarder
from cluster.proxy.websocket import WebSocketBridge, is_websocket_upgrade
from cluster.routing import (
    HOP_ENVIRON,
    HOP_HEADER,
    Policy,
    Proxy,
    Reply,
    RequestView,
    Serve,
    SockJSInfo,
    Status,
    route,
)

log = logging.getLogger(__name__)

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
StartResponse = Callable[..., Any]

_MAX_INFO_BYTES = 64 * 1024


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
        trusted_proxies=frozenset(settings.trusted_proxies),
        admin_prefix=settings.admin_prefix + "/",
    )


def _cookie_header(cookie: tuple[str, str]) -> tuple[str, str]:
    return ("Set-Cookie", f"{cookie[0]}={cookie[1]}; Path=/; HttpOnly; SameSite=Lax")


def reply(start_response: StartResponse, status: int, body: str,
          content_type: str = "text/plain; charset=utf-8") -> list[bytes]:
    data = (body + ("\n" if content_type.startswith("text/plain") else "")).encode()
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    start_response(
        f"{status} {phrase}",
        [("Content-Type", content_type), ("Content-Length", str(len(data))),
         ("Cache-Control", "no-store")],
    )
    return [data]


class ClusterApp:
    """A cluster member as a WSGI app: the local app (or none) plus balancing."""

    def __init__(self, local_app: WSGIApp | None, node: Cluster,
                 observer: Observer = NULL_OBSERVER) -> None:
        self.local_app = local_app
        self.node = node
        s = node.settings
        self.observer = observer
        self.admin = Admin(node, s, observer)
        self._admin_prefix = s.admin_prefix
        self.policy = policy_for(s, node.self_hash, local_app is not None)
        self.forwarder = HttpForwarder(connect_timeout=s.connect_timeout,
                                       read_timeout=s.read_timeout)
        self.bridge = WebSocketBridge(connect_timeout=s.connect_timeout)
        self.retries = s.retries
        self._hop = (HOP_HEADER, "1")

    def __repr__(self) -> str:
        return f"<ClusterApp {self.node!r} {self.forwarder!r}>"

    def close(self) -> None:
        self.node.close()
        self.forwarder.close()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path.startswith(self._admin_prefix) and HOP_ENVIRON not in environ:
            answered = self._admin(environ, path)
            if answered is not None:
                status, content_type, body = answered
                return reply(start_response, status, body.decode(), content_type=content_type)
        request = RequestView.from_environ(environ)
        node = self.node
        tried: set[str] = set()
        while True:
            exclude = node.ejected()
            if tried:
                exclude = exclude | tried
            decision = route(request, node.table, self.policy, exclude)
            if isinstance(decision, Serve):
                return self._serve(decision, environ, start_response)
            if isinstance(decision, Reply):
                return reply(start_response, decision.status, decision.body)
            if isinstance(decision, Status):
                return reply(start_response, 200, json.dumps(self.status()),
                             content_type="application/json")
            endpoint = decision.endpoint
            try:
                if isinstance(decision, SockJSInfo):
                    return self._sockjs_info(decision, environ, start_response)
                return self._proxy(decision, environ, start_response)
            except UpstreamError as exc:
                failure = exc
            replayable = failure.retryable or (
                isinstance(failure, UpstreamBroken) and _replayable(environ)
            )
            if endpoint is not None and replayable:
                if failure.retryable:
                    node.eject(endpoint)
                tried.add(endpoint.hash)
                retry = not isinstance(decision, Proxy) or decision.retry
                if retry and len(tried) <= self.retries:
                    log.warning("retrying elsewhere: %s", failure)
                    continue
            log.warning("%s %s failed: %s", request.method, request.path, failure)
            return reply(start_response, failure.status, f"upstream {failure.reason}")

    def status(self) -> dict[str, Any]:
        """This instance's view (see :meth:`cluster.admin.Admin.status`)."""
        return self.admin.status()

    def _admin(self, environ: dict[str, Any], path: str) -> tuple[int, str, bytes] | None:
        """An admin page, when the path is one and the client may read it; else None
        (an ordinary request for the app)."""
        if not self.admin.handles(path):
            return None
        query = environ.get("QUERY_STRING", "")
        if not self.admin.allowed(environ.get("REMOTE_ADDR", ""), query,
                                  environ.get("HTTP_AUTHORIZATION", "")):
            if self.node.settings.admin_token:
                return 401, "text/plain; charset=utf-8", b"admin token required"
            return None
        return self.admin.respond(path, query)

    def _serve(self, decision: Serve, environ: dict[str, Any],
               start_response: StartResponse) -> Iterable[bytes]:
        assert self.local_app is not None
        if decision.path is not None:
            environ = dict(environ, PATH_INFO=decision.path)
        if decision.set_cookie is None:
            return self.local_app(environ, start_response)
        cookie = _cookie_header(decision.set_cookie)

        def with_cookie(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
            return start_response(status, [*headers, cookie], *exc)

        return self.local_app(environ, with_cookie)

    def _proxy(self, decision: Proxy, environ: dict[str, Any],
               start_response: StartResponse) -> Iterable[bytes]:
        url = decision.endpoint.url
        # is_websocket_upgrade is False without an Upgrade header: skip it for plain HTTP.
        if "HTTP_UPGRADE" in environ and is_websocket_upgrade(environ):
            return self.bridge.bridge(environ, start_response, url, decision.path_qs, (self._hop,))
        response = self.forwarder.forward(environ, url, decision.path_qs, (self._hop,))
        headers = response.headers
        if decision.set_cookie is not None:
            headers = [*headers, _cookie_header(decision.set_cookie)]
        start_response(response.status, headers)
        body: Iterable[bytes] = response.body
        return body

    def _sockjs_info(self, decision: SockJSInfo, environ: dict[str, Any],
                     start_response: StartResponse) -> Iterable[bytes]:
        """SockJS info from the chosen endpoint, with ``base_url`` pointing at it."""
        if decision.endpoint is None:
            status, body = self._local_info(environ, decision.path_qs)
            where = "local app"
        else:
            response = self.forwarder.forward(
                environ, decision.endpoint.url, decision.path_qs, (self._hop,)
            )
            status, body = response.status, _read_limited(response.body)
            where = decision.endpoint.url
        if not status.startswith("200"):
            return reply(start_response, int(status[:3]), f"sockjs info from {where}: {status}")
        try:
            info = json.loads(body)
            if not isinstance(info, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            raise UpstreamBroken(where, f"sockjs info is not a JSON object: {exc}") from None
        info["base_url"] = decision.base_url
        return reply(start_response, 200, json.dumps(info),
                     content_type="application/json; charset=UTF-8")

    def _local_info(self, environ: dict[str, Any], path_qs: str) -> tuple[str, bytes]:
        assert self.local_app is not None
        path, _, query = path_qs.partition("?")
        captured: dict[str, str] = {}

        def capture(status: str, headers: Any, *exc: Any) -> Callable[[bytes], None]:
            captured["status"] = status
            return lambda data: None

        result = self.local_app(dict(environ, PATH_INFO=path, QUERY_STRING=query), capture)
        try:
            body = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        return captured.get("status", "500 Internal Server Error"), body


_IDEMPOTENT_WITHOUT_BODY = frozenset({"GET", "HEAD", "OPTIONS"})


def _replayable(environ: dict[str, Any]) -> bool:
    """May a request whose endpoint broke before answering be sent to another?

    Only bodiless GET/HEAD/OPTIONS: the endpoint may have acted on the request before
    it died, and those are safe to repeat (nginx's ``proxy_next_upstream`` makes the
    same choice for non-idempotent methods).
    """
    return (
        environ.get("REQUEST_METHOD") in _IDEMPOTENT_WITHOUT_BODY
        and environ.get("CONTENT_LENGTH") in (None, "", "0")
        and "HTTP_TRANSFER_ENCODING" not in environ
    )


def _read_limited(body: Iterable[bytes]) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        for chunk in body:
            size += len(chunk)
            if size > _MAX_INFO_BYTES:
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
