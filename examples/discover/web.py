"""The ``web`` service: a page built from the ``api`` service, found by discovery.

``cluster.discover("api")`` is a requests.Session bound to a live endpoint of ``api``;
it moves to another one when that endpoint leaves or refuses, so there is no address
to configure and no proxy in between.
"""

from __future__ import annotations

from flask import Flask, jsonify

import cluster

app = Flask(__name__)


@app.get("/")
def index():
    try:
        response = cluster.discover("api").get("/items", timeout=5)
    except cluster.ClusterError as exc:  # no live endpoint of api
        return jsonify(error=str(exc)), 503
    return jsonify(api=response.json(), status=response.status_code)
