"""The ``api`` service: a list of items, saying which process served it."""

from __future__ import annotations

import os

from flask import Flask, jsonify

app = Flask(__name__)


@app.get("/items")
def items():
    return jsonify(items=["apple", "pear", "plum"], served_by=os.getpid())
