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
#: statuses whose answer has no content: passed on with the endpoint's own fields (a
#: 304's Content-Length is the length a 200 would have), none added
BODILESS = frozenset((204, 304))
_FRAMING = frozenset(("transfer-encoding", "connection", "keep-alive"))


class InfoAnswer(NamedTuple):
    """What to answer a SockJS info request with: ``fields`` are the endpoint's, less
    the ones in ``_REMADE`` (the sender adds Content-Type, Content-Length and
    Cache-Control: no-store)."""

    status: int
    fields: Fields
    body: bytes
    #: "" for a status in BODILESS: the fields are all there is, nothing is added
    content_type: str


def rewrite_info(code: int, fields: Fields, body: bytes, base_url: str,
                 where: str) -> InfoAnswer:
    """The answer to pass on for the endpoint's (``code``, ``fields``, ``body``).

    A 200 gets ``base_url`` in its JSON object; any other status is the endpoint's own
    answer, passed on as it is; a 200 that is not a JSON object is a broken endpoint
    (502).
    """
    if code in BODILESS:
        # RFC 9110 8.6: no Content-Length on a 204, and a 304's is the 200's
        return InfoAnswer(code, [(name, value) for name, value in fields
                                 if name.lower() not in _FRAMING and
                                 not (code == 204 and name.lower() == "content-length")],
                          b"", "")
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
