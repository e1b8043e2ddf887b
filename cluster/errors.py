"""One error root for everything `cluster` raises on purpose.

Callers catch :class:`ClusterError` to handle any of ours; the families say which
layer failed so the caller can choose between a one-line exit (config), a retry with
the last known table (discovery) or an HTTP status (upstream).
"""

from __future__ import annotations

from typing import TypeVar


class ClusterError(Exception):
    """Root of every error `cluster` raises deliberately."""


class ConfigError(ClusterError):
    """A setting has a bad value; the message names the setting and the problem."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


class DiscoveryError(ClusterError):
    """The discovery store could not be read or written (it may come back)."""


class UpstreamError(ClusterError):
    """Proxying to an endpoint failed; ``status`` is what the client should see."""

    status = 502
    #: True when nothing of the request reached the endpoint, so another may be tried.
    retryable = False
    #: True once part of the endpoint's answer reached the client: nothing may be
    #: retried or replayed, and no error page can be sent any more.
    answered = False
    #: True when the endpoint answered, but wrongly (a malformed or oversized head, a
    #: certificate that does not verify): when nobody is left to try, the client is told
    #: that (502), not "no live endpoint" (503), which is the truth only when none could
    #: be reached or all went away.
    misbehaved = False
    #: True when the endpoint closed or reset a new connection before any byte of an
    #: answer: it takes connections but serves none (a dead app behind a live listener,
    #: a port forwarder whose target is gone), and a probe connection made then was
    #: closed too (see cluster.proxy.attempts.closes_new). It is ejected as one that
    #: refuses, and only a probe that sees it keep a connection open brings it back.
    dropped = False
    #: True when the endpoint may be fine but this caller does not trust it: the
    #: certificate did not verify with a discover() client's own ``verify=``. Clients
    #: of one process trust differently, and all share one node: ejected there, one
    #: client's wrong CA took the endpoint from every other (for good: the probe
    #: verified as that client did). Only that client passes it over.
    untrusted = False

    def __init__(self, endpoint: str, reason: str) -> None:
        super().__init__(f"{endpoint}: {reason}")
        self.endpoint = endpoint
        self.reason = reason


class UpstreamConnectError(UpstreamError):
    """The endpoint refused or did not accept the connection; no byte was sent."""

    retryable = True
    #: True when its host refused (no process listened there): its next heartbeat,
    #: from a restarted process, may end its ejection. Not when it could not be
    #: reached at all (a connect timeout, no route): its heartbeat reaches the store,
    #: which says nothing of the way from here.
    refused = False


class OutOfDescriptors(UpstreamError):
    """This instance could not open a socket to the endpoint: its own descriptors ran
    out (EMFILE, ENFILE). The endpoint is not at fault: it is neither ejected nor
    swapped for another (which would fail the same way); the client gets a 503."""

    status = 503


class UpstreamBroken(UpstreamError):
    """The endpoint closed or garbled the exchange after the request was sent."""


_E = TypeVar("_E", bound="UpstreamError")


def misbehaving(error: UpstreamError) -> UpstreamError:
    """``error``, marked as an endpoint's wrong answer (see UpstreamError.misbehaved)."""
    error.misbehaved = True
    return error


def dropping(error: _E, fresh: bool) -> _E:
    """``error``, marked as a new connection closed unanswered (UpstreamError.dropped)
    when ``fresh``: on a reused one it is an idle timeout crossing the request."""
    error.dropped = fresh
    return error


class UpstreamTimeout(UpstreamError):
    """The endpoint did not answer within the read timeout."""

    status = 504


class ClientLeft(UpstreamError):
    """The client closed its connection while the endpoint's answer was awaited, and
    the endpoint connection was closed for it (nginx's 499): nothing is retried,
    replayed or answered, and the endpoint is not at fault."""

    status = 499
    answered = True


class RequestError(ClusterError):
    """A client's request breaks HTTP/1.1's rules; ``status`` is the answer (400, 414,
    431, 501, 505...). The connection is closed after answering: once framing is in
    doubt, the next request on it cannot be found reliably."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
