"""What the front door reports as it works: the hook the metrics, the access log and
the dashboard hang on.

The door calls these methods on its hot path, so the base class does nothing and costs
one method call each; :mod:`cluster.metrics` (or anything else) overrides what it needs.
Times are seconds from ``time.monotonic()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from cluster.config import Settings

T = TypeVar("T")


class RequestRecord:
    """One finished request, as the access log and the metrics see it."""

    __slots__ = ("remote", "method", "target", "version", "status", "sent", "endpoint",
                 "service", "upstream_seconds", "total_seconds", "retries", "referer",
                 "user_agent", "websocket")

    def __init__(self, remote: str, method: str, target: str, version: str, status: int,
                 sent: int, endpoint: str, service: str, upstream_seconds: float,
                 total_seconds: float, retries: int, referer: str, user_agent: str,
                 websocket: bool = False) -> None:
        self.remote = remote
        self.method = method
        self.target = target
        self.version = version  # "HTTP/1.1"
        self.status = status  # 0 when no response was sent (client gone)
        self.sent = sent  # response bytes written to the client (body and head)
        self.endpoint = endpoint  # endpoint URL, "local" or "-" (answered by cluster)
        self.service = service  # the service routed to, "" when none
        self.upstream_seconds = upstream_seconds  # connect to response head; 0 if local
        self.total_seconds = total_seconds
        self.retries = retries  # other endpoints tried before this answer
        self.referer = referer
        self.user_agent = user_agent
        self.websocket = websocket


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


class DebugAccessLog(Observer):
    """One line per request on the ``cluster.access`` logger at debug level (what
    ``--log-level debug`` shows)."""

    def __init__(self) -> None:
        import logging

        self.log = logging.getLogger("cluster.access")

    def request_done(self, record: RequestRecord) -> None:
        self.log.debug('%s "%s %s %s" %d %d %s %.6f', record.remote, record.method,
                       record.target, record.version, record.status, record.sent,
                       record.endpoint, record.total_seconds)
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
        observers.append(DebugAccessLog())
    return combine(observers)
