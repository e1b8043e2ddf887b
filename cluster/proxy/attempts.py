"""The one attempt loop: pick an endpoint, send, eject what refused, replay what is safe.

The front door, the WSGI adapter and ``cluster.discover()`` all go through
:func:`attempt`, so they agree on when a request may move to another endpoint:

- the endpoint refused or never accepted the connection (nothing was sent): always,
  and the endpoint is ejected from this instance's picks for a while; so is one that
  closed or reset a new connection before any byte of an answer and a probe
  connection too (it accepts, but serves nothing: :func:`closes_new`), though then the
  request itself moves only as the next rule says;
- it failed after the request was sent but before any byte of an answer: only for a
  replayable request, :func:`replayable` (GET, HEAD, OPTIONS without a body: the
  endpoint may have acted on anything else before it died; nginx's
  ``proxy_next_upstream`` makes the same choice for non-idempotent methods);
- never once part of an answer reached the client.

At most ``retries`` other endpoints are tried after the first.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, TypeVar

from cluster.errors import OutOfDescriptors, UpstreamBroken, UpstreamError
from cluster.node import PROBE_INTERVAL, keeps_open

log = logging.getLogger(__name__)

T = TypeVar("T")
D = TypeVar("D")

REPLAYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", b"GET", b"HEAD", b"OPTIONS"})


def replayable(method: str | bytes, has_body: bool) -> bool:
    """May this request be sent again to another endpoint after its first one broke?"""
    return not has_body and method in REPLAYABLE_METHODS


def client_answer(error: UpstreamError, service: str) -> tuple[int, str]:
    """(status, text) to tell a client whose request got nowhere.

    Endpoints that could not be reached at all (refused, or silent, on connect) mean no
    live endpoint: 503, as when the table has none. An endpoint that answered wrongly,
    broke off or was too slow is the upstream's failure: its own 502 or 504.
    """
    if isinstance(error, OutOfDescriptors):
        return 503, error.reason
    if error.retryable and not error.misbehaved:
        return 503, f"no live endpoint for service {service!r} (last: {error.reason})"
    return error.status, f"upstream {error.reason}"


def closes_new(url: str, timeout: float) -> bool:
    """After ``url``'s endpoint closed a new connection before any byte of an answer:
    does it close a probe connection too (its app dead behind a live listener)? One
    that keeps the probe open, as an HTTP server awaiting a request does, ended that
    connection over that request: a worker killed past its timeout (an upload too
    slow for it, a slow app), a body it refused. Ejected for that, any client could
    take healthy endpoints out at will. discover() judges so too; it costs the
    failing request up to LINGER seconds more."""
    return not keeps_open(url, min(PROBE_INTERVAL, timeout))


def attempt(pick: Callable[[frozenset[str]], D], send: Callable[[D], T], *,
            endpoint_of: Callable[[D], Any], node: Any, retries: int,
            may_replay: bool, on_retry: Callable[[Any, UpstreamError], None] | None = None,
            first: tuple[D, UpstreamError] | None = None,
            gave_up: Callable[[D], bool] = lambda decision: False) -> T:
    """``send(pick(tried))`` until it succeeds or may not try again; raises the last
    UpstreamError when it gives up. ``endpoint_of(decision)`` is the Endpoint a
    decision sends to (None for one that needs no endpoint); ``node.eject(endpoint,
    reason=...)`` is called for an endpoint that refused the connection (with
    ``reachable=False`` for one not reached at all, ``accepts=True`` for one that
    closed a new connection unanswered). ``first``: a decision already tried and how
    it failed (a caller's own fast first try). ``gave_up(d)``: true for a decision
    that says no endpoint is left (then the last failure is
    raised instead when an endpoint was reached and failed, by answering wrongly or
    breaking off, so a client sees 502, not a misleading 503). ``on_retry(endpoint,
    error)`` and the "trying another endpoint" warning come once the next decision is
    known to be something other than giving up."""
    tried: set[str] = set()
    failed = first
    last: UpstreamError | None = None
    last_endpoint: Any = None
    while True:
        if failed is None:
            decision = pick(frozenset(tried))
            if last is not None:
                if endpoint_of(decision) is None and gave_up(decision):
                    if last.misbehaved or not last.retryable:
                        # nobody left after an endpoint was reached and failed: say so
                        # (502), not "no live endpoint"; when none could be reached the
                        # 503 is the truth
                        raise last
                else:
                    # Said (and counted) only once there is another to try: with none
                    # left, "trying another endpoint" was a second, untrue line for one
                    # failure, and a retry counted that never happened.
                    log.warning("%s; trying another endpoint", last)
                    if on_retry is not None:
                        on_retry(last_endpoint, last)
            try:
                return send(decision)
            except UpstreamError as error:
                failed = (decision, error)
        decision, exc = failed
        failed = None
        endpoint = endpoint_of(decision)
        if endpoint is None:
            raise exc
        if exc.untrusted:
            pass  # the caller's trust, not the endpoint's health: the caller skips it
        elif exc.dropped:
            # A new connection closed unanswered: as dead as a refusal (nginx counts
            # both as a failed attempt), whatever the method, though only a replayable
            # request moves on. Left in, every request tried it first, and each POST
            # that did failed.
            node.eject(endpoint, reason=exc.reason, accepts=True)
        elif exc.retryable:
            if getattr(exc, "refused", False):
                node.eject(endpoint, reason=exc.reason)
            else:  # not reached at all: a heartbeat is no sign it can be now
                node.eject(endpoint, reason=exc.reason, reachable=False)
        again = exc.retryable or (may_replay and isinstance(exc, UpstreamBroken)
                                  and not exc.answered)
        if not again or len(tried) >= retries:
            raise exc
        tried.add(endpoint.hash)
        last = exc
        last_endpoint = endpoint
