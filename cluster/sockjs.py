"""SockJS info answers: the endpoint's own answer with ``base_url`` pointing at it.

Shared by the front door and the WSGI adapter, so both hand out the same URL.
"""

from __future__ import annotations

import json

JSON = b"application/json; charset=UTF-8"
#: An info answer larger than this is refused (it is a small JSON object).
MAX_INFO_BYTES = 64 * 1024


def rewrite_info(code: int, body: bytes, base_url: str, where: str) -> tuple[int, bytes, bytes]:
    """(status, body, content type) to answer a SockJS info request with.

    A non-200 answer is passed on as a short text; a 200 that is not a JSON object is
    a broken endpoint (502).
    """
    if code != 200:
        return code, f"sockjs info from {where}: {code}\n".encode(), b"text/plain; charset=utf-8"
    try:
        info = json.loads(body)
        if not isinstance(info, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        return 502, f"sockjs info from {where} is not a JSON object: {exc}\n".encode(), \
            b"text/plain; charset=utf-8"
    info["base_url"] = base_url
    return 200, json.dumps(info).encode(), JSON
