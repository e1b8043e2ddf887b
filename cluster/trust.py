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


def peer_address(address: str) -> str:
    """The address as ``--trusted-proxies`` writes it: an IPv4 client of a dual-stack
    listener (``--bind [::]:PORT``) arrives as ``::ffff:127.0.0.1``, and would match
    neither ``127.0.0.1`` nor ``127.0.0.0/8``."""
    if address.startswith("::ffff:") and "." in address:
        return address[7:]
    return address


def forwarded_clients(x_forwarded_for: str, forwarded: str, real_ip: str) -> list[str]:
    """Every address a request says it was forwarded for (``X-Forwarded-For``,
    ``Forwarded: for=``, ``X-Real-IP``), ports and brackets taken off; an entry that
    is not an address (``unknown``, an obfuscated ``_name``) is kept as written, so it
    is never trusted."""
    found = [e for e in x_forwarded_for.split(",") if e.strip()]
    for element in forwarded.replace(";", ",").split(","):
        key, _, value = element.strip().partition("=")
        if key.strip().lower() == "for":
            found.append(value.strip().strip('"'))
    if real_ip.strip():
        found.append(real_ip)
    return [peer_address(_without_port(e.strip())) for e in found]


def _without_port(entry: str) -> str:
    if entry.startswith("["):  # [v6]:port or [v6]
        return entry[1:].partition("]")[0]
    if entry.count(":") == 1:  # v4:port
        return entry.partition(":")[0]
    return entry
