"""Service-to-service calls: ``cluster.discover("search").get("/items")``.

:func:`discover` returns a :class:`ServiceClient`, a ``requests.Session`` whose
relative URLs go to one live endpoint of the service. It stays on that endpoint (so
keep-alive connections are reused) until the endpoint leaves the discovery table,
drains (while another endpoint does not) or a request to it fails to connect; then it
moves to another live endpoint and, when the request can safely be sent again, sends
it there, so callers see no error for an endpoint that died. "Safely" is decided by
the same attempt loop the balancer uses (cluster.proxy.attempts): a request that never
reached the endpoint always moves; one that did only when it is a bodiless GET, HEAD
or OPTIONS.

A bodiless GET, HEAD or OPTIONS whose connection the endpoint closed before answering
(a kept connection its idle timeout closed as the request crossed) is first sent again
once to the same endpoint, on another connection, as at the balancer. An endpoint that
closes connections unanswered for good (a probe connection too: its app is dead behind
a live listener) is ejected, as one that refuses, and the client moves on from it.

A request given no ``timeout`` gets the cluster's: ``--connect-timeout`` to connect
and ``--read-timeout`` for each wait for the endpoint, as at the balancer (requests'
own default is none: a connect to a host that is gone, whose record has not expired
yet, waited for the kernel to give up, about two minutes, before moving on).

A client made before a fork (at import under gunicorn ``--preload``, multiprocessing)
works in the child too: on its first request there, it takes the child's own shared
node and connections (a node passed in is the caller's to make after the fork).

Interim 1xx answers (100, 103 Early Hints) are skipped, as at the balancer, and more
than :data:`~cluster.http1.MAX_INTERIM` of them fail the call (requests'
ConnectionError) rather than hold it forever (see cluster.interim).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import ssl
import threading
import time
from http.client import RemoteDisconnected
from typing import Any

import requests
from requests.exceptions import ConnectionError as RequestsConnectionError
from requests.exceptions import ConnectTimeout
from requests.utils import DEFAULT_CA_BUNDLE_PATH
from urllib3.exceptions import (
    ConnectTimeoutError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    SSLError,
)

from cluster.config import Settings
from cluster.errors import (
    ClusterError,
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamError,
    dropping,
)
from cluster.interim import InterimAdapter
from cluster.node import Cluster, keeps_open
from cluster.proxy.attempts import attempt, replayable
from cluster.rand import RANDOM
from cluster.records import Endpoint

log = logging.getLogger(__name__)



class NoEndpoint(ClusterError, RequestsConnectionError):
    """No live endpoint of the service is known (after trying those that were).

    Also a requests ConnectionError, what requests raises for a host it cannot reach:
    code written for requests (``except requests.RequestException``) handles it."""


def _reason(exc: RequestsConnectionError) -> Any:
    """What urllib3 says went wrong under a requests ConnectionError (None: unknown)."""
    return getattr(exc.args[0], "reason", None) if exc.args else None


def _never_connected(exc: RequestsConnectionError) -> bool:
    """True when the request never reached the endpoint: refused, a connect timeout, or
    a host name that does not resolve (urllib3 2's NameResolutionError, a subclass of
    NewConnectionError: matched by its name alone, a POST to such an endpoint failed
    instead of moving to another one)."""
    if isinstance(exc, ConnectTimeout):
        return True
    return isinstance(_reason(exc), (NewConnectionError, ConnectTimeoutError))


def _tls_cause(exc: RequestsConnectionError) -> Any:
    cause = _reason(exc)
    if isinstance(cause, SSLError) and cause.args:
        cause = cause.args[0]
    return cause


def _tls_refused(exc: RequestsConnectionError) -> bool:
    """True when the TLS handshake failed on this side, before the request was sent:
    the endpoint's certificate did not verify (or named another host), or it answered
    the handshake in plain text (an http server behind an https endpoint URL)."""
    cause = _tls_cause(exc)
    return isinstance(cause, ssl.SSLCertVerificationError) or \
        getattr(cause, "reason", None) == "WRONG_VERSION_NUMBER"


def _not_verified(exc: RequestsConnectionError) -> bool:
    """True when the endpoint's certificate did not verify with this call's trust."""
    return isinstance(_tls_cause(exc), ssl.SSLCertVerificationError)


def _closed_unanswered(exc: RequestsConnectionError) -> bool:
    """True when the endpoint closed or reset the connection before any byte of an
    answer (urllib3's "Connection aborted."), as when a kept connection is closed by
    the endpoint's idle timeout just as a request is sent on it."""
    cause = exc.args[0] if exc.args else None
    if isinstance(cause, MaxRetryError):
        cause = cause.reason
    return isinstance(cause, ProtocolError) and cause.args[:1] == ("Connection aborted.",) \
        and len(cause.args) > 1 and isinstance(
            cause.args[1], (RemoteDisconnected, ConnectionResetError, BrokenPipeError))


class ServiceClient(requests.Session):
    """A Session bound to a live endpoint of ``service``; absolute URLs pass untouched."""

    def __init__(self, service: str, node: Cluster, attempts: int | None = None, *,
                 shared: Settings | None = None) -> None:
        super().__init__()
        self._mount_adapters()
        self.service = service
        self.node = node
        #: this client's own settings: the node is shared by every discover() of its
        #: discovery URL, and was made with the first call's (its --retries and
        #: timeouts were every later client's)
        self.settings = shared if shared is not None else node.settings
        #: endpoints one call may try: ``--retries`` (CLUSTER_RETRIES) others after the
        #: first, as the balancer does, unless given
        self.attempts = self.settings.retries + 1 if attempts is None else attempts
        #: the settings of discover()'s shared node, when ``node`` is that one
        self._shared = shared
        self._pid = os.getpid()
        self._current: Endpoint | None = None
        self._lock = threading.Lock()
        #: endpoint hash -> until when (monotonic) this client passes it over: its
        #: certificate did not verify with this client's trust (see _untrust)
        self._untrusted: dict[str, float] = {}

    def _mount_adapters(self) -> None:
        # interim (1xx) answers skipped, and not forever (see cluster.interim)
        self.mount("https://", InterimAdapter())
        self.mount("http://", InterimAdapter())

    def __getstate__(self) -> dict[str, Any]:
        """As a Session pickles (multiprocessing hands its arguments over so), with the
        service and this client's settings; the node is the unpickling process's own.
        Unpickled, a client missed its own attributes: every call raised
        AttributeError."""
        if self._shared is None:
            raise TypeError(f"a {self.service!r} client over a node passed to discover() "
                            "cannot be pickled: pickle one discover() made without node=")
        # requests.Session's own state (its __attrs__), with the client's
        return {**{attr: getattr(self, attr, None) for attr in self.__attrs__},
                "service": self.service, "settings": self.settings,
                "attempts": self.attempts}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for attr, value in state.items():  # as requests.Session.__setstate__
            setattr(self, attr, value)
        self._shared = self.settings
        self._pid = os.getpid()
        self._current = None
        self._lock = threading.Lock()
        self._untrusted = {}
        self.node = _shared_node(self.settings)

    def _node_here(self) -> Cluster:
        """The node, after a fork too. A client made before a fork (at import, under
        gunicorn --preload; multiprocessing) kept the parent's node, whose threads do
        not run in the child: its table never changed again, endpoints that left
        were tried forever and new ones never seen. Nor are the parent's kept
        connections the child's to use."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._lock = threading.Lock()  # another thread may have held it at the fork
            self._current = None
            for adapter in self.adapters.values():
                adapter.close()  # the parent's connections; its pools are made anew
            if self._shared is not None:
                self.node = _shared_node(self._shared)
            elif self.node.pid != self._pid:
                log.warning("%s: a client made in process %d, whose discovery node does "
                            "not run here: make the node after the fork", self.service,
                            self.node.pid)
        return self.node

    def __repr__(self) -> str:
        where = self._current.url if self._current else "no endpoint yet"
        return f"<ServiceClient {self.service} -> {where}>"

    @property
    def base_url(self) -> str:
        """The URL of the endpoint requests go to now; raises :class:`NoEndpoint`."""
        self._node_here()
        return self._endpoint(frozenset()).url

    def _endpoint(self, exclude: frozenset[str]) -> Endpoint:
        with self._lock:
            live = {e.hash: e for e in self.node.endpoints(self.service)}
            current = self._current
            ejected = self.node.ejected()
            skip = exclude | ejected
            if self._untrusted:
                now = time.monotonic()
                for key, until in list(self._untrusted.items()):
                    if until <= now:
                        del self._untrusted[key]
                skip |= self._untrusted.keys()
            choices = [e for h, e in live.items() if h not in skip]
            if not choices:  # every one left is ejected: try them anyway (panic mode)
                choices = [e for h, e in live.items() if h not in exclude]
            # Draining endpoints take no new calls while another one does, as at the
            # balancer: a client stayed on one until it stopped, its POSTs racing the
            # close of its kept connections (an error for the caller).
            choices = [e for e in choices if not e.draining] or choices
            if current is not None and current.hash in {e.hash for e in choices} \
                    and (current.hash not in ejected or ejected.issuperset(live)):
                return live[current.hash]
            # An ejected current endpoint is left too: a POST it closed unanswered is
            # not sent elsewhere, but the calls after it were all sent to it again.
            if not choices:
                raise NoEndpoint(f"no live endpoint of service {self.service!r}")
            self._current = RANDOM.choice(choices)
            if current is not None:
                log.info("%s: moving from %s to %s", self.service, current.url,
                         self._current.url)
            return self._current

    def request(  # type: ignore[override]
        self, method: str, url: str | bytes, *args: Any, **kwargs: Any
    ) -> requests.Response:
        target = url.decode() if isinstance(url, bytes) else url
        node = self._node_here()
        if _ABSOLUTE.match(target):
            return super().request(method, target, *args, **kwargs)
        has_body = _has_body(args, kwargs)
        # Which responses arrived: a failure after the endpoint answered (following a
        # redirect it sent, reading a body) is no failure to reach the endpoint
        answers: list[requests.Response] = []

        def mark(response: requests.Response, **_: Any) -> None:
            answers.append(response)
        args, kwargs = _marking(mark, self.hooks, args, kwargs)
        if "timeout" not in kwargs and len(args) < 7:  # params, data... timeout is 7th
            settings = self.settings
            kwargs["timeout"] = (settings.connect_timeout, settings.read_timeout)

        def pick(exclude: frozenset[str]) -> Endpoint | NoEndpoint:
            # None left is a decision too: after an endpoint that was reached and broke
            # off, the attempt loop raises that failure, not a "no live endpoint" the
            # caller would take for an empty table
            try:
                return self._endpoint(exclude)
            except NoEndpoint as exc:
                return exc

        may_replay = replayable(method.upper(), has_body)

        #: the failure of the endpoint tried last: a NoEndpoint after it says what it was
        tried: list[UpstreamError] = []

        def send(endpoint: Endpoint | NoEndpoint) -> requests.Response:
            if isinstance(endpoint, NoEndpoint):
                if not tried:
                    raise endpoint
                # as the balancer's 503 says it; it said only "no live endpoint", of a
                # service whose one endpoint had just refused or timed out
                raise NoEndpoint(f"{endpoint} (last: {tried[-1]})") from tried[-1].__cause__
            url = endpoint.url + "/" + target.lstrip("/")
            try:
                try:
                    return super(ServiceClient, self).request(method, url, *args, **kwargs)
                except RequestsConnectionError as exc:
                    if answers or not (may_replay and _closed_unanswered(exc)):
                        raise
                    # A kept connection the endpoint closed as the request crossed (its
                    # idle timeout: Node's is 5 s): sent again, once, on another
                    # connection to the same endpoint, as the balancer does. It was an
                    # error for the caller, or a move away from (and an ejection of) a
                    # healthy endpoint.
                    log.debug("%s: connection closed unanswered (%s), sending again",
                              endpoint.url, exc)
                    return super(ServiceClient, self).request(method, url, *args, **kwargs)
            except RequestsConnectionError as exc:
                if answers:
                    # The endpoint answered (a redirect to a host that refuses, a body
                    # that stalled): the caller's error, as requests raised it. Taken
                    # for a failure to connect, a POST answered 303 was sent again to
                    # every other endpoint, and each healthy endpoint was ejected.
                    raise
                error: UpstreamConnectError | UpstreamBroken
                reason = _reason(exc)
                what = f"{type(exc).__name__}: {reason if reason is not None else exc}"[:200]
                if _not_verified(exc):
                    # nothing sent: even a POST moves on; only this client leaves it
                    error = UpstreamConnectError(endpoint.url, what)
                    error.untrusted = True
                    self._untrust(endpoint)
                    tried.append(error)
                    raise error from exc
                tls = None
                if url.startswith("https:"):
                    # an endpoint held out is probed as this request verified it
                    tls = self._verifying(url, kwargs)
                    if tls is not None:
                        node.probe_tls[endpoint.url] = tls
                if _tls_refused(exc):
                    # as at the balancer: nothing sent, so even a POST moves on, and the
                    # endpoint (it accepts connections) stays out while probes fail
                    error = dropping(UpstreamConnectError(endpoint.url, what), True)
                elif _never_connected(exc):
                    error = UpstreamConnectError(endpoint.url, what)
                    error.refused = isinstance(reason, NewConnectionError) and isinstance(
                        reason.__cause__, ConnectionRefusedError)
                else:
                    error = UpstreamBroken(endpoint.url, what)
                    if _closed_unanswered(exc) or isinstance(reason, SSLError):
                        # Which connection it was, requests does not say: an endpoint
                        # that also closes a probe connection at once (or, for https,
                        # fails its handshake: one closed during the handshake is an
                        # SSLError) takes connections but serves none (ejected: see
                        # cluster.proxy.attempts); one that keeps it open closed a kept
                        # one as its idle timeout ran out.
                        dropping(error, not keeps_open(endpoint.url,
                                                        self.settings.connect_timeout, tls))
                tried.append(error)
                raise error from exc  # __cause__: re-raised below as requests raised it

        try:
            return attempt(pick, send, endpoint_of=_endpoint_of, node=node,
                           retries=self.attempts - 1, may_replay=may_replay,
                           on_retry=self._moved,
                           gave_up=lambda decision: isinstance(decision, NoEndpoint))
        except (UpstreamConnectError, UpstreamBroken) as exc:
            if isinstance(exc.__cause__, RequestsConnectionError):
                raise exc.__cause__ from None
            raise
        finally:
            for answer in answers:  # the requests as the caller made them (picklable)
                hooks = answer.request.hooks.get("response", [])
                if mark in hooks:
                    hooks.remove(mark)

    def _verifying(self, url: str, kwargs: dict[str, Any]) -> ssl.SSLContext | None:
        """A TLS context that verifies ``url``'s endpoint as this call's request did:
        its ``verify=`` and ``cert=``, else the session's, else REQUESTS_CA_BUNDLE,
        else certifi's bundle (requests' default; not the system's store, which the
        probes use otherwise). A private CA given to requests left an endpoint that
        once closed a connection unanswered ejected for good: no probe verified it."""
        merged = self.merge_environment_settings(
            url, kwargs.get("proxies") or {}, kwargs.get("stream"), kwargs.get("verify"),
            kwargs.get("cert"))
        cert = merged.get("cert")
        return _tls_context(merged.get("verify", True),
                            tuple(cert) if isinstance(cert, (list, tuple)) else cert)

    def _untrust(self, endpoint: Endpoint) -> None:
        """This client passes ``endpoint`` over for ``--eject-seconds``: its certificate
        did not verify with this client's ``verify=``. Not ejected from the node, which
        every client of the process shares: one client's wrong CA took a healthy
        endpoint from all of them, for good, as its probe verified as that client did.
        (A certificate nobody trusts costs each client one failed handshake a period.)"""
        with self._lock:
            self._untrusted[endpoint.hash] = time.monotonic() + self.settings.eject_seconds

    def _moved(self, endpoint: Endpoint, exc: UpstreamError) -> None:
        """The attempt loop moves on (and said so): a broken (not refused) endpoint is
        dropped too."""
        if not isinstance(exc, UpstreamConnectError):
            self.node.eject(endpoint, reason=exc.reason, accepts=True)


#: a URL with a scheme: sent as it is (one in a query string, "/login?next=http://...",
#: made a relative URL absolute, and requests refused it)
_ABSOLUTE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")

#: where requests.Session.request takes hooks after (method, url)
_HOOKS = 9

#: where requests.Session.request takes a body after (method, url): data, files, json
_BODY_ARGUMENTS = ((1, "data"), (4, "files"), (13, "json"))


def _marking(mark: Any, session_hooks: dict[str, Any], args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) of a Session.request call with ``mark`` added to its response
    hooks; the caller's, or else the session's (a request's response hooks replace the
    session's when requests merges them), are kept."""
    given = args[_HOOKS] if len(args) > _HOOKS else kwargs.get("hooks")
    hooks = dict(given or {})
    own = hooks.get("response") or []
    own = [own] if callable(own) else list(own)
    if not own:
        own = list(session_hooks.get("response") or [])
    hooks["response"] = [mark, *own]  # first: a hook that fails is after the answer
    if len(args) > _HOOKS:
        return (*args[:_HOOKS], hooks, *args[_HOOKS + 1:]), kwargs
    return args, {**kwargs, "hooks": hooks}


def _has_body(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Does a Session.request call send a body, by keyword or by position? (One passed
    by position was not seen: such a GET was replayed on another endpoint as if bare.)"""
    return any((args[index] if index < len(args) else kwargs.get(name)) is not None
               for index, name in _BODY_ARGUMENTS)


@functools.lru_cache(maxsize=16)
def _tls_context(verify: Any, cert: Any) -> ssl.SSLContext | None:
    """requests' verification as an ssl context (None: it cannot be made here, and the
    probe uses the system's): ``verify`` True (certifi's bundle), False (none), or a
    CA file or directory; ``cert`` a client certificate file or (cert, key)."""
    try:
        if verify is False:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            where = DEFAULT_CA_BUNDLE_PATH if verify is True else str(verify)
            if os.path.isdir(where):
                context = ssl.create_default_context(capath=where)
            else:
                context = ssl.create_default_context(cafile=where)
        if isinstance(cert, tuple):
            context.load_cert_chain(*cert[:2])
        elif cert:
            context.load_cert_chain(str(cert))
    except (OSError, ValueError, ssl.SSLError) as exc:
        log.debug("no probe TLS context for verify=%r cert=%r: %s", verify, cert, exc)
        return None
    return context


def _endpoint_of(decision: Endpoint | NoEndpoint) -> Endpoint | None:
    return None if isinstance(decision, NoEndpoint) else decision


_NODES: dict[str | None, Cluster] = {}
_NODES_LOCK = threading.Lock()


def _fresh_lock_in_child() -> None:
    """A lock another thread held at a fork stays held in the child: a new one."""
    global _NODES_LOCK
    _NODES_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_fresh_lock_in_child)


def discover(service: str, node: Cluster | None = None, **settings: Any) -> ServiceClient:
    """A client for ``service``, bound to one of its live endpoints.

    Without ``node``, one observing :class:`~cluster.node.Cluster` per discovery URL is
    shared by every client of the process (settings as for ``Cluster``; the
    ``CLUSTER_*`` environment applies). Raises ``ConfigError`` for bad settings;
    requests raise :class:`NoEndpoint` while the service has no live endpoint.
    """
    if node is None:
        resolved = Settings.load(**settings)
        return ServiceClient(service, _shared_node(resolved), shared=resolved)
    return ServiceClient(service, node)


def _shared_node(resolved: Settings) -> Cluster:
    """The process's observing node for ``resolved.discovery_url``: made on first use,
    and anew in a forked child (the parent's is left alone: its store and threads are
    the parent's)."""
    with _NODES_LOCK:
        node = _NODES.get(resolved.discovery_url)
        if node is None or node.pid != os.getpid():
            node = Cluster(resolved, register=False).start(wait=resolved.connect_timeout)
            _NODES[resolved.discovery_url] = node
    return node
