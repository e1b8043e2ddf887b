"""Which app version is the newest, and which one a new session goes to.

Pure functions, no I/O: routing (cluster/routing.py) calls :func:`choose` with the
versions that have live, non-draining endpoints.

Order. With ``--version-order`` (oldest first) a listed version is newer than every
unlisted one, and later in the list is newer. Otherwise, and among unlisted versions, a
version sort: a leading release number (``1.10.0`` after ``1.9.2``, an optional ``v``
first) compares by its numbers; a release with a suffix (``1.3.0-rc1``) comes before the
bare release, except a ``+build`` suffix; versions without a release number (a git
hash) come before every numbered one, in text order. An endpoint that advertises no
version is older than every version.
"""

from __future__ import annotations

import re
from typing import Callable, Collection, Sequence

_RELEASE = re.compile(r"[vV]?(\d+(?:\.\d+)*)(.*)")
_PARTS = re.compile(r"\d+|\D+")

#: the key of any version, comparable with any other
Key = tuple[object, ...]


def _natural(text: str) -> tuple[tuple[int, int, str], ...]:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in _PARTS.findall(text))


def sort_key(version: str) -> Key:
    """The version sort of the module docstring ("" sorts first)."""
    if not version:
        return (-1,)
    match = _RELEASE.fullmatch(version)
    if match is None:
        return (0, _natural(version))
    release = tuple(int(n) for n in match.group(1).split("."))
    rest = match.group(2)
    final = 1 if not rest or rest.startswith("+") else 0
    return (1, release, final, _natural(rest))


def rank(version: str, order: Sequence[str] = ()) -> Key:
    """How new ``version`` is: listed in ``order`` (oldest first) beats unlisted."""
    if version and version in order:
        return (1, order.index(version))
    return (0, sort_key(version))


def newest(versions: Collection[str], order: Sequence[str] = ()) -> str:
    """The newest of ``versions`` (not empty)."""
    return max(versions, key=lambda v: rank(v, order))


def choose(versions: Collection[str], order: Sequence[str],
           weights: Sequence[tuple[str, float]], rand: Callable[[], float]) -> str:
    """The version a new session goes to, among ``versions`` (not empty).

    With ``weights`` (canary), a weighted draw among the weighted versions present;
    versions without a weight get none. When no weighted version is present (or all
    weigh 0), and without weights, the newest.
    """
    listed = [(v, w) for v, w in weights if v in versions and w > 0]
    total = sum(w for _, w in listed)
    if total > 0:
        point = rand() * total
        for version, weight in listed:
            if point < weight:
                return version
            point -= weight
        return listed[-1][0]
    return newest(versions, order)
