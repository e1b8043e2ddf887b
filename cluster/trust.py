"""``--trusted-proxies``: exact addresses and networks, matched the same everywhere.

The admin pages matched networks (``10.0.0.0/8``) while the forwarded headers and the
hop marker compared the peer's address as a string, so a network trusted for one was
silently not trusted for the others. Every check now uses :func:`trusted_peers`.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Iterable

#: peers remembered per process (a network's verdict for an address never changes)
_CACHE_SIZE = 4096


class TrustedPeers(frozenset):  # type: ignore[type-arg]
    """A frozenset of the exact addresses whose ``in`` also matches the networks.

    Still a frozenset (hashable, equal by its entries), so it stands wherever the
    plain set of addresses did.
    """

    _networks: tuple[Any, ...]
    _seen: dict[str, bool]

    def __new__(cls, entries: Iterable[str]) -> TrustedPeers:
        listed = tuple(entries)
        self = super().__new__(cls, listed)
        self._networks = tuple(ipaddress.ip_network(e, strict=False)
                               for e in listed if "/" in e)
        self._seen = {}
        return self

    def __contains__(self, peer: object) -> bool:
        if frozenset.__contains__(self, peer):
            return True
        hit = self._seen.get(peer) if isinstance(peer, str) else None
        if hit is None:
            try:
                address = ipaddress.ip_address(peer)  # type: ignore[arg-type]
            except ValueError:
                hit = False
            else:
                hit = any(address in network for network in self._networks)
            if isinstance(peer, str) and len(self._seen) < _CACHE_SIZE:
                self._seen[peer] = hit
        return hit


def trusted_peers(entries: Iterable[str]) -> frozenset[str]:
    """The set to test peers against: a plain frozenset when every entry is an exact
    address (the default: no cost on the request path), else a :class:`TrustedPeers`."""
    listed = tuple(entries)
    if any("/" in e for e in listed):
        return TrustedPeers(listed)
    return frozenset(listed)


def check_entry(raw: str) -> str:
    """One --trusted-proxies entry: an IP address or network, else ValueError."""
    entry = raw.strip()
    try:
        if "/" in entry:
            ipaddress.ip_network(entry, strict=False)
        else:
            ipaddress.ip_address(entry)
    except ValueError:
        raise ValueError(f"{entry!r} is not an IP address or network") from None
    return entry
