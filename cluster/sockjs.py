"""SockJS info answers: the endpoint's own answer with ``base_url`` pointing at it.

Shared by the front door and the WSGI adapter, so both hand out the same URL. The
endpoint's status and header fields are passed on (its CORS fields above all: a
browser on another origin reads the answer only with them), and only ``base_url`` in
its body is rewritten.
"""

from __future__ import annotations

import json
from typing import NamedTuple

JSON = "application/json; charset=UTF-8"
TEXT = "text/plain; charset=utf-8"
#: An info answer larger than this is refused (it is a small JSON object).
MAX_INFO_BYTES = 64 * 1024
#: fields of the endpoint's answer set anew by whoever sends the rewritten one (its
#: framing, and the type and caching every short answer of cluster carries)
_REMADE = frozenset(("content-length", "transfer-encoding", "content-type", "cache-control",
                     "connection", "keep-alive"))

Fields = list[tuple[str, str]]


class InfoAnswer(NamedTuple):
    """What to answer a SockJS info request with: ``fields`` are the endpoint's, less
    the ones in ``_REMADE`` (the sender adds Content-Type, Content-Length and
    Cache-Control: no-store)."""

    status: int
    fields: Fields
    body: bytes
    content_type: str


def rewrite_info(code: int, fields: Fields, body: bytes, base_url: str,
                 where: str) -> InfoAnswer:
    """The answer to pass on for the endpoint's (``code``, ``fields``, ``body``).

    A 200 gets ``base_url`` in its JSON object; any other status is the endpoint's own
    answer, passed on as it is; a 200 that is not a JSON object is a broken endpoint
    (502).
    """
    kept = [(name, value) for name, value in fields if name.lower() not in _REMADE]
    content_type = next((value for name, value in fields if name.lower() == "content-type"),
                        JSON if code == 200 else TEXT)
    if code != 200:
        return InfoAnswer(code, kept, body, content_type)
    try:
        info = json.loads(body)
        if not isinstance(info, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        return InfoAnswer(502, [], f"sockjs info from {where} is not a JSON object: {exc}\n"
                          .encode(), TEXT)
    info["base_url"] = base_url
    return InfoAnswer(200, kept, json.dumps(info).encode(), content_type)
