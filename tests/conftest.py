"""Fixtures shared by every test: the MongoDB-protocol server and discovery URLs."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from helpers import refused_port
from mongo_server import MongoServer

APPS = Path(__file__).resolve().parent / "apps"
if str(APPS) not in sys.path:
    sys.path.insert(0, str(APPS))


@pytest.fixture(scope="session")
def mongo_server() -> Iterator[MongoServer]:
    """One real server per session (see tests/mongo_server.py), stopped by PID at the end.

    Fails (never skips) with instructions when no server can be found or built.
    """
    server = MongoServer.launch()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def mongo_url(mongo_server: MongoServer) -> Iterator[str]:
    """A URL with a database of its own, so tests never see each other's records."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    yield mongo_server.database_url(name)
    if not mongo_server.running:  # a test stopped the database and failed before restarting
        mongo_server.start()
    mongo_server.drop_database(name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A discovery URL for the embedded SQLite store, in this test's own directory.

    ``tmp_path`` is absolute, so this reads ``sqlite:///tmp/.../discovery.sqlite3``: the
    URL path is the file path, as cluster.discovery takes it (``urlsplit(url).path``).
    """
    return f"sqlite://{tmp_path / 'discovery.sqlite3'}"


# Hypothesis: brief in the CI suite, longer on demand (HYPOTHESIS_PROFILE=long, tox -e fuzz).
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=150, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=10_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port where connections are refused for the whole test (bound, never listening)."""
    with refused_port() as port:
        yield port
