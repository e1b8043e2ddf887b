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

import http.client
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

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


class _Connection(HTTPConnection):
    response_class = _Response


class _TLSConnection(HTTPSConnection):
    response_class = _Response


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


_POOLS = {"http": _Pool, "https": _TLSPool}


class InterimAdapter(HTTPAdapter):
    """requests' adapter whose connections skip interim answers (see the module)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = _POOLS
        return manager
