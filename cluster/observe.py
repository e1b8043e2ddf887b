"""What the front door reports as it works: the hook the metrics, the access log and
the dashboard hang on.

The door calls these methods on its hot path, so the base class does nothing and costs
one method call each; :mod:`cluster.metrics` (or anything else) overrides what it needs.
Times are seconds from ``time.monotonic()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TypeVar
from urllib.parse import unquote_plus, unquote_to_bytes

if TYPE_CHECKING:
    from cluster.config import Settings

T = TypeVar("T")


class HeadLike(Protocol):
    """What a record reads from a request head (cluster.http1.RequestHead)."""

    method: bytes
    target: bytes
    version: bytes
    fields: list[bytes]


class RequestRecord:
    """One finished request, as the access log and the metrics see it.

    The door makes one per request with :meth:`of_head`: the request line's parts, the
    Referer and the User-Agent are then decoded from the head only when someone reads
    them (an access log does; the metrics never do).
    """

    __slots__ = ("remote", "_method", "_target", "_version", "status", "sent", "endpoint",
                 "service", "upstream_seconds", "total_seconds", "retries", "_referer",
                 "_user_agent", "websocket", "_head")

    def __init__(self, remote: str, method: str, target: str, version: str, status: int,
                 sent: int, endpoint: str, service: str, upstream_seconds: float,
                 total_seconds: float, retries: int, referer: str, user_agent: str,
                 websocket: bool = False) -> None:
        self.remote = remote
        self._method: str | None = method
        self._target: str | None = target
        self._version: str | None = version  # "HTTP/1.1"
        self.status = status  # 0 when no response was sent (client gone)
        self.sent = sent  # response bytes written to the client (body and head)
        self.endpoint = endpoint  # endpoint URL, "local" or "-" (answered by cluster)
        self.service = service  # the service routed to, "" when none
        self.upstream_seconds = upstream_seconds  # connect to response head; 0 if local
        self.total_seconds = total_seconds
        self.retries = retries  # other endpoints tried before this answer
        self._referer: str | None = referer
        self._user_agent: str | None = user_agent
        self.websocket = websocket
        self._head: HeadLike | None = None

    @classmethod
    def of_head(cls, head: HeadLike, remote: str, status: int, sent: int, endpoint: str,
                service: str, upstream_seconds: float, total_seconds: float, retries: int,
                websocket: bool = False) -> RequestRecord:
        """A record whose request line and Referer/User-Agent come from ``head``."""
        record = cls.__new__(cls)
        record.remote = remote
        record._method = record._target = record._version = None
        record._referer = record._user_agent = None
        record.status = status
        record.sent = sent
        record.endpoint = endpoint
        record.service = service
        record.upstream_seconds = upstream_seconds
        record.total_seconds = total_seconds
        record.retries = retries
        record.websocket = websocket
        record._head = head
        return record

    @property
    def method(self) -> str:
        if self._method is None:
            assert self._head is not None
            self._method = self._head.method.decode("latin-1")
        return self._method

    @property
    def target(self) -> str:
        if self._target is None:
            assert self._head is not None
            self._target = self._head.target.decode("latin-1")
        return self._target

    @property
    def version(self) -> str:
        if self._version is None:
            assert self._head is not None
            self._version = self._head.version.decode("latin-1")
        return self._version

    @property
    def referer(self) -> str:
        if self._referer is None:
            self._referer = self._field(b"referer")
        return self._referer

    @property
    def user_agent(self) -> str:
        if self._user_agent is None:
            self._user_agent = self._field(b"user-agent")
        return self._user_agent

    def _field(self, name: bytes) -> str:
        """The first value of header field ``name`` in the head ("" when absent)."""
        if self._head is not None:
            for line in self._head.fields:
                key, _, value = line.partition(b":")
                if key.lower() == name:
                    return value.strip().decode("latin-1")
        return ""


class Observer:
    """No-op base: every hook the door and the proxy call."""

    def request_done(self, record: RequestRecord) -> None:
        """A request was answered (or the client went away mid-answer)."""

    def connection_opened(self) -> None:
        """A client connection was accepted and is being served."""

    def connection_closed(self) -> None:
        """A client connection that :meth:`connection_opened` counted is gone."""

    def connection_refused(self) -> None:
        """A client connection got 503 because the connection cap was reached."""

    def websocket_opened(self, endpoint: str) -> None:
        """A WebSocket (tunnelled to ``endpoint``, or "local") started."""

    def websocket_closed(self, endpoint: str) -> None:
        """A WebSocket that :meth:`websocket_opened` counted ended."""

    def retried(self, endpoint: str, reason: str) -> None:
        """A request left ``endpoint`` for another one (connect refused, or replayed)."""

    def ejected(self, endpoint: str, reason: str) -> None:
        """``endpoint`` was left out of this instance's picks."""


#: The observer used when nobody installed one.
NULL_OBSERVER = Observer()


def without_admin_token(target: str, admin_prefix: str) -> str:
    """``target`` with the value of a ``token`` query field under the admin prefix
    replaced by ``-``: the admin token opens the dashboard from anywhere, and log files
    are read (and shipped) by more people than those who may hold it. The path and the
    field's name are matched percent-decoded, as the door and ``parse_qs`` read them
    (``/%5Fcluster/status?tok%65n=…`` opens the pages too)."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    seen = unquote_to_bytes(path).decode("latin-1") if "%" in path else path
    if not (seen == admin_prefix or seen.startswith(admin_prefix + "/")):
        return target
    fields = query.split("&")
    safe = [f"{name}=-" if unquote_plus(name) == "token" else f
            for f in fields for name in (f.partition("=")[0],)]
    return target if safe == fields else f"{path}?{'&'.join(safe)}"


class DebugAccessLog(Observer):
    """One line per request on the ``cluster.access`` logger at debug level (what
    ``--log-level debug`` shows); a ``token`` query field under ``admin_prefix`` is
    written as ``-``, as in the access log."""

    def __init__(self, admin_prefix: str | None = None) -> None:
        import logging

        self.log = logging.getLogger("cluster.access")
        self.admin_prefix = admin_prefix

    def request_done(self, record: RequestRecord) -> None:
        from cluster.accesslog import quoted

        target = record.target
        if self.admin_prefix and "?" in target:
            target = without_admin_token(target, self.admin_prefix)
        # escaped as in the access log: a request refused before its head was parsed
        # comes with its line as sent (a bare LF, an ANSI escape), which written raw
        # forged log lines or moved the terminal of whoever read them
        request = quoted(" ".join(p for p in (record.method, target, record.version) if p))
        self.log.debug('%s "%s" %d %d %s %.6f', record.remote, request, record.status,
                       record.sent, record.endpoint, record.total_seconds)
class Observers(Observer):
    """Fan-out: every hook called on each of several observers, in order."""

    def __init__(self, observers: list[Observer]) -> None:
        self.observers = tuple(observers)

    def __repr__(self) -> str:
        return f"<Observers {list(self.observers)!r}>"

    def request_done(self, record: RequestRecord) -> None:
        for observer in self.observers:
            observer.request_done(record)

    def connection_opened(self) -> None:
        for observer in self.observers:
            observer.connection_opened()

    def connection_closed(self) -> None:
        for observer in self.observers:
            observer.connection_closed()

    def connection_refused(self) -> None:
        for observer in self.observers:
            observer.connection_refused()

    def websocket_opened(self, endpoint: str) -> None:
        for observer in self.observers:
            observer.websocket_opened(endpoint)

    def websocket_closed(self, endpoint: str) -> None:
        for observer in self.observers:
            observer.websocket_closed(endpoint)

    def retried(self, endpoint: str, reason: str) -> None:
        for observer in self.observers:
            observer.retried(endpoint, reason)

    def ejected(self, endpoint: str, reason: str) -> None:
        for observer in self.observers:
            observer.ejected(endpoint, reason)


def combine(observers: list[Observer]) -> Observer:
    """One observer for several: the no-op, the only one, or a fan-out."""
    if not observers:
        return NULL_OBSERVER
    if len(observers) == 1:
        return observers[0]
    return Observers(observers)


def find(observer: Observer, kind: type[T]) -> T | None:
    """The first observer of ``kind`` in ``observer`` (itself or inside a fan-out)."""
    if isinstance(observer, kind):
        return observer
    if isinstance(observer, Observers):
        for inner in observer.observers:
            found = find(inner, kind)
            if found is not None:
                return found
    return None


def from_settings(settings: Settings) -> Observer:
    """What ``cluster serve`` reports to: the metrics (always: the dashboard and
    ``/_cluster/metrics`` read them) and, with ``--access-log``, the access log (else,
    with ``--log-level debug``, the debug one).
    Raises ConfigError for an access-log file that cannot be opened."""
    from cluster import accesslog
    from cluster.metrics import MetricsObserver

    observers: list[Observer] = [MetricsObserver()]
    access = accesslog.from_settings(settings)
    if access is not None:
        observers.append(access)
    elif settings.log_level == "debug":
        observers.append(DebugAccessLog(settings.admin_prefix))
    return combine(observers)
