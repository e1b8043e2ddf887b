"""The hop marker: how an instance tells the next one "a cluster member routed this".

A request carrying the marker is served where it lands (so requests never bounce
between instances whose tables briefly disagree). That makes the marker a key: from a
client it would bypass routing, ``--public-services`` and the status page. So it is
honoured only when it proves membership:

- with a shared secret (``--secret``, ``CLUSTER_SECRET``): the marker is
  ``<unix time>.<HMAC-SHA256(secret, time + method + target)>`` and must verify within
  :data:`WINDOW` seconds (clock skew between hosts included);
- without one: only from the address of a live endpoint in the table or from
  ``--trusted-proxies``. (Endpoints registered by host name rather than address are
  not recognised this way: use a secret for those.)

Anything else is stripped and the request is routed like any other.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any, Callable
from urllib.parse import urlsplit

HEADER = b"X-Cluster-Hop"
#: seconds a signed marker stays valid, either way (clock skew between hosts)
WINDOW = 60


class HopMarker:
    """Makes and checks markers for one instance."""

    __slots__ = ("_key", "_trusted", "_plain", "_clock", "_members_of", "_members")

    def __init__(self, secret: str | None, trusted: frozenset[str],
                 clock: Callable[[], float] = time.time) -> None:
        self._key = secret.encode() if secret else None
        self._trusted = trusted
        self._plain = HEADER + b": 1"
        self._clock = clock
        self._members_of: Any = None
        self._members: frozenset[str] = frozenset()

    def __repr__(self) -> str:
        return f"<HopMarker {'signed' if self._key else 'by address'}>"

    def line(self, method: bytes, target: bytes) -> bytes:
        """The header line to send with a request this instance routed."""
        if self._key is None:
            return self._plain
        stamp = b"%d" % int(self._clock())
        return HEADER + b": " + stamp + b"." + self._sign(stamp, method, target)

    def _sign(self, stamp: bytes, method: bytes, target: bytes) -> bytes:
        assert self._key is not None
        mac = hmac.new(self._key, stamp + b" " + method + b" " + target, hashlib.sha256)
        return mac.hexdigest().encode()

    def verify(self, value: bytes, method: bytes, target: bytes, peer: str,
               table: Any) -> bool:
        """Is ``value`` (a received marker) honoured for this request from ``peer``?"""
        if self._key is not None:
            stamp, dot, sig = value.partition(b".")
            if not dot or not stamp.isdigit() or len(stamp) > 12:
                return False
            if abs(self._clock() - int(stamp)) > WINDOW:
                return False
            return hmac.compare_digest(sig, self._sign(stamp, method, target))
        return peer in self._trusted or peer in self._member_addresses(table)

    def _member_addresses(self, table: Any) -> frozenset[str]:
        """Hosts of the table's live endpoints (recomputed when the table changes)."""
        if table is not self._members_of:
            hosts = set()
            for endpoint in getattr(table, "endpoints", ()):
                try:
                    host = urlsplit(endpoint.url).hostname
                except ValueError:
                    continue
                if host:
                    hosts.add(host)
            self._members = frozenset(hosts)
            self._members_of = table
        return self._members
