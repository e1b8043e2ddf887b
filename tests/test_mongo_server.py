"""The test harness itself: a real server that answers, keeps data and frees its port."""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from typing import Any, Iterator

import pytest
from pymongo import MongoClient
from pymongo.errors import ServerSelectionTimeoutError

from mongo_server import MongoServer, with_database


@contextlib.contextmanager
def client(url: str, **kwargs: Any) -> Iterator[MongoClient[dict[str, Any]]]:
    kwargs.setdefault("serverSelectionTimeoutMS", 10_000)
    conn: MongoClient[dict[str, Any]] = MongoClient(url, **kwargs)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
def own_server() -> Iterator[MongoServer]:
    """A private managed server, so stopping it cannot disturb the session's one."""
    server = MongoServer.launch(use_env=False)
    try:
        yield server
    finally:
        server.close()


def port_is_free(port: int) -> bool:
    """Nothing listens there any more (SO_REUSEADDR: closed connections may linger)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_server_answers_hello_with_server_time(mongo_server: MongoServer) -> None:
    with client(mongo_server.url) as conn:
        hello = conn.admin.command("hello")
    assert hello["ok"] == 1
    assert hello["isWritablePrimary"] is True
    assert isinstance(hello["localTime"], datetime.datetime)
    if mongo_server.managed:
        assert hello["setName"] == "rs0"


def test_each_test_gets_its_own_database(mongo_url: str) -> None:
    with client(mongo_url) as conn:
        db = conn.get_default_database()
        assert db.name.startswith("t_")
        assert db.list_collection_names() == []
        db.clusterEndpoints.insert_one({"endpoint": "http://127.0.0.1:1"})
        db.clusterEndpoints.update_one({}, {"$currentDate": {"timestamp": True}})
        doc = db.clusterEndpoints.find_one()
    assert doc is not None
    assert isinstance(doc["timestamp"], datetime.datetime)


def test_data_survives_stop_and_start_on_the_same_port(own_server: MongoServer) -> None:
    url, port, first_pid = own_server.url, own_server.port, own_server.pid
    assert port is not None and first_pid is not None
    with client(with_database(url, "keep")) as conn:
        conn.keep.items.insert_one({"_id": "a", "v": 1})

        own_server.stop()
        assert not own_server.running
        with pytest.raises(ProcessLookupError):
            os.kill(first_pid, 0)
        assert port_is_free(port)
        with client(url, serverSelectionTimeoutMS=300) as probe:
            with pytest.raises(ServerSelectionTimeoutError):
                probe.admin.command("hello")

        own_server.start()
        assert (own_server.url, own_server.port) == (url, port)
        assert own_server.pid != first_pid
        # the client made before the restart reconnects by itself
        assert conn.keep.items.find_one({"_id": "a"}) == {"_id": "a", "v": 1}


def test_data_survives_a_crash(own_server: MongoServer) -> None:
    with client(with_database(own_server.url, "crash")) as conn:
        conn.crash.items.insert_one({"_id": "b"})
        own_server.kill()
        assert own_server.port is not None and port_is_free(own_server.port)
        own_server.start()
        assert conn.crash.items.count_documents({}) == 1


def test_close_removes_the_data_directory() -> None:
    server = MongoServer.launch(use_env=False)
    data_dir = server.data_dir
    assert data_dir is not None and data_dir.is_dir()
    server.close()
    assert not data_dir.exists()
    assert not server.running


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mongodb://127.0.0.1:5/?replicaSet=rs0", "mongodb://127.0.0.1:5/t_1?replicaSet=rs0"),
        ("mongodb://127.0.0.1:5", "mongodb://127.0.0.1:5/t_1"),
        ("mongodb://u:p@a:1,b:2/old?w=1&replicaSet=x", "mongodb://u:p@a:1,b:2/t_1?w=1&replicaSet=x"),
        ("mongodb://h?directConnection=true", "mongodb://h/t_1?directConnection=true"),
        ("mongodb+srv://cluster.example/old", "mongodb+srv://cluster.example/t_1"),
    ],
)
def test_with_database_replaces_only_the_path(url: str, expected: str) -> None:
    assert with_database(url, "t_1") == expected
