"""cluster.netio.Reader: a read watcher kept running between waits must never make the
event loop spin, lose bytes, or leave a waiter asleep on a closed socket."""

from __future__ import annotations

import gevent
import pytest
from gevent import socket as gsocket

from cluster.netio import Reader


@pytest.fixture
def pair():
    a, b = gsocket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_reads_what_arrives_after_the_wait_started(pair) -> None:
    a, b = pair
    reader = Reader(a)
    gevent.spawn_later(0.01, b.sendall, b"hello")
    assert reader.recv(100) == b"hello"
    b.sendall(b"again")
    assert reader.recv(100) == b"again"
    b.close()
    assert reader.recv(100) == b""


def test_bytes_nobody_waits_for_stop_the_watcher_and_are_read_later(pair) -> None:
    a, b = pair
    reader = Reader(a)
    gevent.spawn_later(0.01, b.sendall, b"one")
    assert reader.recv(100) == b"one"
    assert a._read_event.active  # kept running between waits
    b.sendall(b"early")  # arrives while nobody waits (a pooled connection, say)
    gevent.sleep(0.05)
    assert not a._read_event.active  # fired once, stopped itself: no busy loop
    assert reader.recv(100) == b"early"


def test_closing_the_socket_wakes_the_waiter_with_an_error(pair) -> None:
    a, _ = pair
    reader = Reader(a)
    waiter = gevent.spawn(reader.recv, 100)
    gevent.sleep(0.01)
    a.close()  # what the sweeper does to a connection past its deadline
    waiter.join(timeout=2)
    assert waiter.dead
    assert isinstance(waiter.exception, OSError)
    with pytest.raises(OSError):
        reader.recv(100)


def test_disarmed_socket_can_be_read_with_gevents_own_recv(pair) -> None:
    a, b = pair
    reader = Reader(a)
    gevent.spawn_later(0.01, b.sendall, b"x")
    assert reader.recv(1) == b"x"
    reader.disarm()
    gevent.spawn_later(0.01, b.sendall, b"y")
    assert a.recv(1) == b"y"  # gevent refuses a second waiter on an armed watcher
