"""Interim (1xx) answers for ``cluster.discover()``'s requests, skipped as the balancer
skips them: every one but 101, and at most :data:`~cluster.http1.MAX_INTERIM`; and,
as at the balancer, a connection that carried a HEAD is not kept.

http.client (under urllib3 and requests) skips 100 Continue only, and without a
limit: an endpoint sending 100 forever held the call forever (each one restarts the
read timeout), and a 103 Early Hints was handed to the caller as the answer, its real
answer lost. The fix sits in the response's status-line read, the one place every
request of the session goes through.
"""

from __future__ import annotations

import functools
import http.client
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3 import PoolManager
from urllib3.connectionpool import HTTPConnectionPool

from cluster.http1 import MAX_INTERIM


class TooManyInterim(http.client.HTTPException):
    """The endpoint sent more than MAX_INTERIM interim answers and no final one."""


class _Response(http.client.HTTPResponse):
    def begin(self) -> None:
        super().begin()
        if self._method == "HEAD":  # type: ignore[attr-defined]
            # Not kept for another request, as at the balancer: some servers (gevent's
            # pywsgi) send a HEAD answer's body anyway, read as the next answer's head
            # (BadStatusLine, and a healthy endpoint ejected).
            self.will_close = True

    def _read_status(self) -> tuple[str, int, str]:
        interim = 0
        while True:
            version, status, reason = super()._read_status()  # type: ignore[misc]
            if not 100 <= status < 200 or status == 101:
                return version, status, reason
            interim += 1
            if interim > MAX_INTERIM:
                raise TooManyInterim(f"more than {MAX_INTERIM} interim (1xx) answers")
            http.client.parse_headers(self.fp)  # its fields: Link hints, nothing for us


@functools.cache
def _skipping(pool: type[HTTPConnectionPool]) -> type[HTTPConnectionPool]:
    """``pool`` (a manager's pool class: plain, TLS, or a SOCKS proxy's) whose
    connections read their answers with :class:`_Response`. Its own connection class is
    kept: replaced by the plain one, a SOCKS proxy's pools failed every request
    (TypeError, its ``_socks_options`` unknown there)."""
    if getattr(pool.ConnectionCls, "response_class", None) is _Response:
        return pool  # already (requests hands a proxy's manager back on every call)
    connection = type(pool.ConnectionCls.__name__, (pool.ConnectionCls,),
                      {"response_class": _Response})
    return type(pool.__name__, (pool,), {"ConnectionCls": connection})


def _skipping_all(manager: PoolManager) -> None:
    manager.pool_classes_by_scheme = {
        scheme: _skipping(pool) for scheme, pool in manager.pool_classes_by_scheme.items()}


class InterimAdapter(HTTPAdapter):
    """requests' adapter whose connections skip interim answers (see the module)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        _skipping_all(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        _skipping_all(manager)
        return manager
