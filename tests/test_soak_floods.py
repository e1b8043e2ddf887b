"""Long floods against the front door (`tox -e soak`; not part of the CI suite).

The runs of bench/door_floods.py at bench size, with what they must show: a thousand
resets of each kind leave no descriptor or connection behind, a pipelining client that
never reads is bounded in memory and closed by --write-timeout while the others are
served, 2,000 idle keep-alive connections cost a bounded amount each, and a body of
1-byte chunks read whole costs a bounded amount per chunk. The short
cases are in tests/test_door_floods.py.
"""

from __future__ import annotations

import resource
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import door_floods  # noqa: E402
from bed import Bed  # noqa: E402

WRITE_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def bed() -> tuple[dict[str, int], dict[str, int]]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 8192 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (8192, hard))
    bed = Bed(prefix="soak-floods-")
    try:
        yield door_floods.start(bed, WRITE_TIMEOUT)
        assert not bed.tracebacks(), bed.tracebacks()
    finally:
        bed.close()


@pytest.mark.soak
@pytest.mark.parametrize("name,modes", [
    ("local", ["head", "body", "chunked", "response"]),
    ("front", ["head", "body", "chunked", "response"]),
    ("wslocal", ["ws"]), ("wsfront", ["ws"])])
def test_a_thousand_resets_of_each_kind_leave_nothing_behind(bed, name, modes) -> None:
    ports, pids = bed
    figures = door_floods.resets(ports[name], pids[name], 1000, modes)
    print(figures["text"])
    (fds_before, _, status_before), (fds_after, _, status_after) = \
        figures["before"], figures["after"]
    assert fds_after <= fds_before, figures["text"]
    assert status_after == status_before == (1, 0), figures["text"]


@pytest.mark.soak
@pytest.mark.parametrize("name", ["local", "front"])
def test_a_pipelining_client_that_never_reads_is_bounded(bed, name) -> None:
    ports, pids = bed
    figures = door_floods.pipeline(ports[name], pids[name], 200_000)
    print(figures["text"])
    assert figures["grew_kib"] < 10_000, figures["text"]
    assert figures["longest_wait"] < 0.5, figures["text"]
    assert figures["closed_after"] is not None, figures["text"]


@pytest.mark.soak
@pytest.mark.parametrize("name", ["local", "front"])
def test_idle_keep_alive_connections_cost_a_bounded_amount_each(bed, name) -> None:
    ports, pids = bed
    figures = door_floods.idle(ports[name], pids[name], 2000)
    print(figures["text"])
    assert figures["bytes_each"] < 32_768, figures["text"]


@pytest.mark.soak
def test_a_body_of_one_byte_chunks_read_whole_costs_less_than_100_bytes_a_chunk(bed) -> None:
    """pywsgi keeps each chunk's data as a piece in a list, then joins them (CPython's
    join takes 80 bytes a piece for the while): about 90 bytes a chunk at the peak.
    Pieces that were new 1-byte objects made it 130 (+260 MB for 2 MB of data)."""
    ports, pids = bed
    figures = door_floods.chunk_memory(ports["local"], pids["local"], 2_000_000)
    print(figures["text"])
    assert figures["grew_kib"] * 1024 < 100 * 2_000_000, figures["text"]
