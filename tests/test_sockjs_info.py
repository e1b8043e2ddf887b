"""cluster.sockjs.rewrite_info: what a balancer answers for the endpoint's info."""

from __future__ import annotations

import json

from cluster.sockjs import rewrite_info

BASE = "http://b.example/cluster-ddp/abc/web"


def test_a_200_gets_base_url_and_keeps_the_endpoints_fields():
    answer = rewrite_info(200, [("Access-Control-Allow-Origin", "http://o"),
                                ("Content-Length", "20"), ("Connection", "keep-alive")],
                          b'{"websocket": true}', BASE, "e")
    assert answer.status == 200 and json.loads(answer.body)["base_url"] == BASE
    assert answer.fields == [("Access-Control-Allow-Origin", "http://o")]
    assert answer.content_type.startswith("application/json")


def test_a_204_or_304_is_passed_on_without_added_framing():
    """RFC 9110 8.6: no Content-Length on a 204; a 304's is the 200's. Nothing is
    added: a cache freshening its 200 with the 304 would take on an added type."""
    fields = [("Access-Control-Allow-Methods", "OPTIONS, GET"), ("Content-Length", "50"),
              ("ETag", '"v1"'), ("Transfer-Encoding", "chunked"), ("Connection", "close")]
    answer = rewrite_info(204, fields, b"", BASE, "e")
    assert (answer.status, answer.body, answer.content_type) == (204, b"", "")
    assert answer.fields == [("Access-Control-Allow-Methods", "OPTIONS, GET"),
                             ("ETag", '"v1"')]
    answer = rewrite_info(304, fields, b"", BASE, "e")
    assert answer.fields == [("Access-Control-Allow-Methods", "OPTIONS, GET"),
                             ("Content-Length", "50"), ("ETag", '"v1"')]
    assert answer.content_type == ""


def test_a_200_that_is_not_a_json_object_is_a_502():
    assert rewrite_info(200, [], b"[1]", BASE, "e").status == 502
