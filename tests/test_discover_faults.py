"""cluster.discover() against endpoints that fail: what a calling service sees.

Real processes on 127.0.0.1: `cluster register` sidecars put the records in an embedded
store (as for a program that is not Python), tests/apps/backend.py serves, and a
:class:`~test_proxy_http.ScriptedUpstream` (a real TCP server in this process) breaks
off. The caller is a ServiceClient in this process, over a Cluster node of its own.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import ssl
import struct
import subprocess
import threading
import time
from typing import Any, Callable, Iterator

import pytest
import requests

from cluster.client import NoEndpoint, ServiceClient, discover
from cluster.config import Settings
from cluster.interim import InterimAdapter, _Response
from cluster.node import Cluster
from cluster.records import endpoint_hash
from helpers import (
    Proc,
    blackholed_port,
    cluster_argv,
    gunicorn_port,
    python,
    refused_port,
    self_signed,
    start_app,
    start_backend,
    wait_until,
)
from test_ejection_e2e import AcceptsThenCloses
from test_proxy_http import ScriptedUpstream

TIMEOUT = 20


@contextlib.contextmanager
def records(store: str, service: str, *urls: str, **settings: float) -> Iterator[Cluster]:
    """A sidecar per URL keeping its record of ``service``, and an observing node (with
    ``settings``) that sees them all (closed, and the sidecars stopped by PID, at the
    end)."""
    sidecars: list[Proc] = []
    node = None
    try:
        for url in urls:
            sidecars.append(Proc(cluster_argv("register", "--service", service,
                                              "--endpoint-url", url, "--ping-interval", "1"),
                                 env={"CLUSTER_DISCOVERY_URL": store}, name="sidecar"))
        node = Cluster(Settings(discovery_url=store, ping_interval=1.0, **settings),
                       register=False).start()
        wait_until(lambda: {e.url for e in node.endpoints(service)} == set(urls),
                   timeout=TIMEOUT, what="the records")
        yield node
    finally:
        if node is not None:
            node.close()
        for sidecar in sidecars:
            sidecar.stop()


def test_an_endpoint_whose_name_does_not_resolve_is_passed_over(sqlite_url) -> None:
    """A record whose host name does not resolve (a host gone from DNS) is a connect
    failure like a refusal (the README's promise): nothing was sent, so even a POST
    moves to another endpoint. urllib3 2 reports it as NameResolutionError, which was
    taken for a failure after sending: the POST failed whenever the client had picked
    that endpoint first (about one call in two here). The name's first label starts
    with a hyphen, which the C library refuses without asking a DNS server: nothing
    leaves the loopback."""
    server, port = start_backend("b1")
    try:
        with records(sqlite_url, "search", f"http://127.0.0.1:{port}",
                     "http://-no-such-host.invalid:8000") as node:
            for _ in range(10):  # each new client picks its first endpoint at random
                client = discover("search", node=node)
                resp = client.post("/echo", data=b"once", timeout=TIMEOUT)
                assert (resp.status_code, resp.content) == (200, b"once")
                assert client.base_url == f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@contextlib.contextmanager
def never_accepting() -> Iterator[int]:
    """A port on 127.0.0.1 where a connect hangs (as to a host that went away without a
    word): a listener whose queue is full and never accepted from, so the kernel drops
    every further SYN. Closed at the end of the block."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT):  # fills it
            yield port


def test_a_call_without_a_timeout_moves_on_after_the_connect_timeout(sqlite_url) -> None:
    """A request given no timeout gets the cluster's connect timeout: an endpoint that
    does not accept (its host gone, its record not yet expired) is left for another one
    after --connect-timeout, as the README says of every attempt. With requests' default
    (none) the call waited about two minutes for the kernel to give up the connect."""
    server, port = start_backend("b1")
    try:
        with never_accepting() as silent, records(
                sqlite_url, "search", f"http://127.0.0.1:{port}",
                f"http://127.0.0.1:{silent}", connect_timeout=1.0) as node:
            for _ in range(4):  # each new client picks its first endpoint at random
                client = discover("search", node=node)
                started = time.monotonic()
                resp = client.get("/whoami")
                assert (resp.status_code, resp.text) == (200, "b1")
                assert time.monotonic() - started < 5
    finally:
        server.stop()


def _reset(conn: socket.socket) -> None:
    """The request read, then a reset instead of an answer."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_an_only_endpoint_that_breaks_off_raises_its_own_error(sqlite_url) -> None:
    """A GET whose only endpoint took the request and reset (or answered garbage) may be
    replayed, but there is no other endpoint: the caller gets requests' own error for
    what happened, as it would calling the endpoint directly. It got NoEndpoint "no
    live endpoint of service", the answer for an empty table, about an endpoint that is
    up. An endpoint that refuses is still NoEndpoint: none could be reached; it says
    which one was tried last and how it failed, as the balancer's 503 does."""
    upstream = ScriptedUpstream({
        "/reset": _reset,
        "/garbage": lambda c: c.sendall(b"SSH-2.0-not-http\r\n\r\n"),
        "/ok": lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    })
    try:
        with records(sqlite_url, "web", upstream.url) as node:
            client = discover("web", node=node)
            with pytest.raises(requests.ConnectionError) as reset:
                client.get("/reset", timeout=TIMEOUT)
            assert not isinstance(reset.value, NoEndpoint)
            with pytest.raises(requests.ConnectionError, match="BadStatusLine"):
                client.get("/garbage", timeout=TIMEOUT)
            assert client.get("/ok", timeout=TIMEOUT).text == "ok"
    finally:
        upstream.close()
    with refused_port() as port, records(sqlite_url, "refusing",
                                          f"http://127.0.0.1:{port}") as node:
        with pytest.raises(NoEndpoint, match=f"last: http://127.0.0.1:{port}: .*refused") \
                as refused:
            discover("refusing", node=node).get("/ok", timeout=TIMEOUT)
        # what requests raised, as the cause (it was None, and the message said nothing
        # of the endpoint that had just refused)
        assert isinstance(refused.value.__cause__, requests.ConnectionError)


def test_no_endpoint_is_what_requests_code_already_catches(sqlite_url) -> None:
    """Code written for requests catches requests.RequestException (ConnectionError for
    a host it cannot reach); NoEndpoint went past it, a 500 in the calling app."""
    with records(sqlite_url, "search") as node:
        with pytest.raises(requests.ConnectionError, match="no live endpoint"):
            discover("search", node=node).get("/x", timeout=TIMEOUT)


def test_a_kept_connection_closed_as_a_get_crosses_it_is_not_an_error(sqlite_url) -> None:
    """An endpoint that closes a kept connection just as the next request is sent on it
    (its idle timeout; here: on every second request of a connection) has a GET sent
    again on another connection to the same endpoint, as the balancer does: no error,
    and the client stays on that healthy endpoint. The GET failed with requests'
    "Remote end closed connection without response", or, with another endpoint known,
    moved away and ejected this one. A POST is not sent again: it may have taken effect."""
    answered: set[int] = set()

    def once(conn: socket.socket) -> bool:
        if id(conn) in answered:
            return False  # the second request on this connection: closed unanswered
        answered.add(id(conn))
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return True

    upstream = ScriptedUpstream({"/once": once})
    other = ScriptedUpstream({"/once": once})
    try:
        with records(sqlite_url, "web", upstream.url, other.url) as node:
            client = discover("web", node=node)
            first = client.base_url
            for _ in range(4):
                assert client.get("/once", timeout=TIMEOUT).text == "ok"
            assert client.base_url == first and not node.ejected()
            # the kept connection has answered one request: the endpoint closes it now
            with pytest.raises(requests.ConnectionError, match="without response"):
                client.post("/once", data=b"x", timeout=TIMEOUT)
    finally:
        upstream.close()
        other.close()


def test_an_endpoint_that_closes_connections_unanswered_is_left(sqlite_url) -> None:
    """An endpoint that accepts and closes every connection unanswered (its app dead
    behind a live listener) is ejected after the first call it fails, and a client on
    it moves on. A POST there is not sent elsewhere (it may have been taken), but it
    is the only one to fail: before, the endpoint was never ejected and a client that
    had picked it stayed on it, every later call failing as well (here 3 of 3 calls
    of each such client)."""
    server, port = start_backend("b1")
    try:
        with AcceptsThenCloses() as dead, records(sqlite_url, "search",
                                                  f"http://127.0.0.1:{port}",
                                                  dead.url) as node:
            live = f"http://127.0.0.1:{port}"
            failures = 0
            for _ in range(40):  # new clients, each picking its first endpoint at random,
                client = discover("search", node=node)  # until one picks the dead one
                try:
                    resp = client.post("/echo", data=b"first", timeout=TIMEOUT)
                except requests.ConnectionError:
                    failures += 1
                    break
                assert (resp.status_code, resp.content) == (200, b"first")
            assert failures == 1, "none of 40 clients picked the dead endpoint first"
            assert endpoint_hash(dead.url) in node.ejected()
            assert client.base_url == live  # the client that failed moved on
            for n in range(8):  # and that failure was the only one
                client = discover("search", node=node)
                for _ in range(3):
                    resp = client.post("/echo", data=b"%d" % n, timeout=TIMEOUT)
                    assert (resp.status_code, resp.content) == (200, b"%d" % n)
                assert client.base_url == live
    finally:
        server.stop()


def test_interim_answers_are_skipped_but_not_forever(sqlite_url) -> None:
    """A 103 Early Hints before the answer is skipped (the balancer skips it too): the
    caller got the 103, with no body, as the answer, the real one lost. An endpoint
    sending 100 Continue without end fails the call after MAX_INTERIM of them, as at
    the balancer (a 502 there): the call was held as long as the endpoint kept on
    (each interim answer restarted the read timeout), here 5 s, then got its 200."""
    from cluster.http1 import MAX_INTERIM

    def endless(conn: socket.socket) -> None:
        deadline = time.monotonic() + 5
        with contextlib.suppress(OSError):
            while time.monotonic() < deadline:
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                time.sleep(0.002)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")

    upstream = ScriptedUpstream({
        "/hints": lambda c: c.sendall(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok") or True,
        "/endless": endless,
    })
    try:
        with records(sqlite_url, "web", upstream.url) as node:
            client = discover("web", node=node)
            for _ in range(2):  # the second on the kept connection: nothing left over
                resp = client.get("/hints", timeout=TIMEOUT)
                assert (resp.status_code, resp.text) == (200, "ok")
            started = time.monotonic()
            with pytest.raises(requests.ConnectionError,
                               match=f"more than {MAX_INTERIM} interim"):
                client.get("/endless", timeout=TIMEOUT)
            assert time.monotonic() - started < 4
    finally:
        upstream.close()


def test_an_https_endpoint_whose_handshake_fails_is_passed_over(sqlite_url, tmp_path) -> None:
    """An https endpoint whose certificate does not verify, or that answers the
    handshake in plain HTTP, was never sent the request: even a POST moves to another
    endpoint. requests' SSLError was taken for a failure after sending: the POST failed
    (6 of 8 calls). The plain-HTTP one is ejected, as at the balancer; the one whose
    certificate this client does not trust is passed over by this client only (see
    test_one_clients_untrusted_certificate_leaves_other_clients_the_endpoint)."""
    cert, key = self_signed(tmp_path)
    server, port = start_backend("b1")
    untrusted, tls_port = start_app("ws_echo.py", "--certfile", str(cert), "--keyfile",
                                    str(key), name="tls-echo")
    try:
        for bad in (f"https://localhost:{tls_port}", f"https://127.0.0.1:{port}"):
            with records(sqlite_url, f"s{len(bad)}", f"http://127.0.0.1:{port}",
                         bad) as node:
                # Each new client picks its first endpoint at random: new ones until one
                # has picked the failing one (6 in a row all missed it once in CI). Read
                # right after the call: the endpoint's next heartbeat lets it back.
                ejected: set[str] = set()
                passed_over = False
                for n in range(40):
                    client = discover(f"s{len(bad)}", node=node)
                    resp = client.post("/echo", data=b"%d" % n, timeout=TIMEOUT)
                    assert (resp.status_code, resp.content) == (200, b"%d" % n)
                    ejected |= node.ejected()
                    passed_over = bool(client._untrusted)
                    if ejected or passed_over:
                        break
                if "localhost" in bad:  # a certificate this client does not trust
                    assert passed_over and not ejected
                    assert client.base_url == f"http://127.0.0.1:{port}"
                else:
                    assert ejected == {endpoint_hash(bad)}
    finally:
        untrusted.stop()
        server.stop()


def client_on(node: Cluster, url: str) -> requests.Session:
    """A discover() client of service "sec" whose first pick is ``url``."""
    for _ in range(200):  # a new client picks its first endpoint at random
        client = discover("sec", node=node)
        if client.base_url == url:
            return client
    raise AssertionError(f"no client picked {url}")


def test_one_clients_untrusted_certificate_leaves_other_clients_the_endpoint(
        sqlite_url, tmp_path) -> None:
    """Two discover() clients of one process, one given the endpoint's private CA
    (verify=), one not. The second one's failed handshake ejected the endpoint from the
    node they share, and its probe verified as that client did: the first client,
    which trusts it, was moved off it and never got it back. Now only the client that
    does not trust it passes it over."""
    cert, key = self_signed(tmp_path)
    server, port = start_backend("b1")
    try:
        with TLSAcceptsThenCloses(str(cert), str(key)) as tls, \
                records(sqlite_url, "sec", f"http://127.0.0.1:{port}", tls.url) as node:
            tls.healthy = True
            # verify= on each call: requests lets REQUESTS_CA_BUNDLE override a
            # session's own verify
            trusting, doubting = client_on(node, tls.url), client_on(node, tls.url)
            assert trusting.get("/whoami", timeout=TIMEOUT, verify=str(cert)).text == "back"
            # requests' default trust (certifi or REQUESTS_CA_BUNDLE): not this self-signed
            resp = doubting.post("/echo", data=b"moved", timeout=TIMEOUT)
            assert (resp.status_code, resp.content) == (200, b"moved")  # nothing was sent
            assert doubting.base_url == f"http://127.0.0.1:{port}"
            assert endpoint_hash(tls.url) not in node.ejected()
            for _ in range(3):
                assert trusting.get("/whoami", timeout=TIMEOUT, verify=str(cert)).text \
                    == "back"
            assert trusting.base_url == tls.url
    finally:
        server.stop()


def test_a_head_answer_that_carries_a_body_does_not_spoil_the_next_call(sqlite_url) -> None:
    """gevent's pywsgi (tests/apps/backend.py) sends a HEAD answer's body anyway. The
    kept connection then held those bytes, read as the next answer's head: a POST
    after a HEAD failed with BadStatusLine, and a GET moved away from (and ejected) the
    healthy endpoint. A connection that carried a HEAD is not kept, as at the
    balancer."""
    server, port = start_backend("b1")
    try:
        with records(sqlite_url, "web", f"http://127.0.0.1:{port}") as node:
            client = discover("web", node=node)
            for n in range(3):
                assert client.head("/whoami", timeout=TIMEOUT).status_code == 200
                resp = client.post("/echo", data=b"%d" % n, timeout=TIMEOUT)
                assert (resp.status_code, resp.content) == (200, b"%d" % n)
            assert not node.ejected()
    finally:
        server.stop()


def test_a_client_made_before_a_fork_follows_the_table_in_the_child(sqlite_url) -> None:
    """gunicorn --preload imports the app, and so makes its discover() client, in the
    arbiter, then forks the workers. The client kept the arbiter's node, whose threads
    do not run in a worker: the table stayed as it was at the fork. Once the endpoint
    of then left and another joined, every call in the workers was "no live endpoint
    of service 'search'" (10 of 10). On its first request in a worker the client now
    takes that process's own node."""
    first, first_port = start_backend("b1")
    second = None
    sidecars = [Proc(cluster_argv("register", "--service", "search", "--endpoint-url",
                                  f"http://127.0.0.1:{first_port}", "--ping-interval", "1"),
                     env={"CLUSTER_DISCOVERY_URL": sqlite_url}, name="sidecar-b1")]
    workers = None
    try:
        node = Cluster(Settings(discovery_url=sqlite_url), register=False).start()
        try:
            wait_until(lambda: node.endpoints("search"), timeout=TIMEOUT, what="b1's record")
        finally:
            node.close()
        workers = Proc(python("-m", "gunicorn", "--preload", "-w", "2", "-b", "127.0.0.1:0",
                              "discover_preload:app"),
                       env={"CLUSTER_DISCOVERY_URL": sqlite_url,
                            "CLUSTER_PING_INTERVAL": "1"}, name="gunicorn")
        base = f"http://127.0.0.1:{gunicorn_port(workers)}"
        assert requests.get(base, timeout=TIMEOUT).text.endswith(" b1")
        second, second_port = start_backend("b2")
        sidecars.append(Proc(cluster_argv("register", "--service", "search", "--endpoint-url",
                                          f"http://127.0.0.1:{second_port}",
                                          "--ping-interval", "1"),
                             env={"CLUSTER_DISCOVERY_URL": sqlite_url}, name="sidecar-b2"))
        sidecars[0].stop()  # b1 deregisters
        first.stop()
        wait_until(lambda: all(requests.get(base, timeout=TIMEOUT).text.endswith(" b2")
                               for _ in range(6)), timeout=TIMEOUT, what="b2 in the workers")
        answers = {requests.get(base, timeout=TIMEOUT).text for _ in range(10)}
        assert {a.split(" ", 1)[1] for a in answers} == {"b2"}, answers
    finally:
        if workers is not None:
            workers.stop()
            assert "Traceback" not in workers.output(), workers.output()
        for sidecar in sidecars:
            sidecar.stop()
        first.stop()
        if second is not None:
            second.stop()


def test_an_https_endpoint_that_closes_connections_unanswered_is_left(sqlite_url) -> None:
    """As for http: an https endpoint that accepts and closes every connection fails
    the TLS handshake (requests' SSLError, "EOF occurred in violation of protocol").
    It was never ejected and a client on it stayed on it, every call failing."""
    server, port = start_backend("b1")
    try:
        with AcceptsThenCloses() as dead:
            dead_url = dead.url.replace("http://", "https://")
            with records(sqlite_url, "search", f"http://127.0.0.1:{port}",
                         dead_url) as node:
                failures = 0
                # Each new client picks its first endpoint at random: go on until one
                # picked the dead one (eight that all missed it came once in 256 runs).
                for n in range(64):
                    if failures and n >= 8:
                        break
                    client = discover("search", node=node)
                    for _ in range(3):
                        try:
                            resp = client.post("/echo", data=b"%d" % n, timeout=TIMEOUT)
                        except requests.ConnectionError:
                            failures += 1
                            continue
                        assert (resp.status_code, resp.content) == (200, b"%d" % n)
                assert failures <= 1
                assert endpoint_hash(dead_url) in node.ejected()
    finally:
        server.stop()


class TLSAcceptsThenCloses(AcceptsThenCloses):
    """:class:`AcceptsThenCloses` over https (``https://localhost:port``): while not
    healthy it closes each connection before any TLS handshake."""

    def __init__(self, cert: str, key: str) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        super().__init__()
        self.url = self.url.replace("http://127.0.0.1", "https://localhost")

    def _serve(self, conn: socket.socket) -> None:
        if self.healthy:
            try:
                conn.settimeout(10)
                conn = self.context.wrap_socket(conn, server_side=True)
            except OSError:
                conn.close()
                return
        super()._serve(conn)


def test_an_https_endpoint_of_a_ca_given_to_requests_is_probed_as_requests_verify(
        sqlite_url, tmp_path) -> None:
    """An https endpoint whose CA requests is told to trust (verify=, as here, or
    REQUESTS_CA_BUNDLE), closing connections unanswered for a while (its app
    restarting), is ejected; once it serves again, the next probe readmits it. The
    probe verified with the system's trust store, not requests' settings: the endpoint
    stayed ejected for good (each failed probe held it out longer)."""
    cert, key = self_signed(tmp_path)
    server, port = start_backend("b1")
    try:
        with TLSAcceptsThenCloses(str(cert), str(key)) as flaky, \
                records(sqlite_url, "sec", f"http://127.0.0.1:{port}", flaky.url) as node:
            # closed unanswered: the GET moves to b1, and the endpoint is ejected
            resp = client_on(node, flaky.url).get("/whoami", timeout=TIMEOUT, verify=str(cert))
            assert resp.status_code == 200
            assert endpoint_hash(flaky.url) in node.ejected()
            flaky.healthy = True
            wait_until(lambda: endpoint_hash(flaky.url) not in node.ejected(), timeout=5,
                       what="the probe to readmit the endpoint")
            resp = client_on(node, flaky.url).get("/whoami", timeout=TIMEOUT, verify=str(cert))
            assert (resp.status_code, resp.text) == (200, "back")
    finally:
        server.stop()


def test_adapters_mounted_before_a_fork_still_serve_in_the_child(sqlite_url) -> None:
    """A client made before a fork keeps, in the child, the adapters its user mounted
    (retries, a custom transport): only their connections, the parent's, are dropped.
    They were replaced by cluster's own in the child: a user's HTTPAdapter with
    max_retries, mounted at import under gunicorn --preload, served no worker."""
    from requests.adapters import HTTPAdapter

    class Counting(HTTPAdapter):
        sent = 0

        def send(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            Counting.sent += 1
            return super().send(*args, **kwargs)

    server, port = start_backend("b1")
    try:
        with records(sqlite_url, "web", f"http://127.0.0.1:{port}"):
            client = discover("web", discovery_url=sqlite_url)
            mine = Counting(max_retries=2)
            client.mount("http://", mine)
            assert client.get("/whoami", timeout=TIMEOUT).status_code == 200
            assert Counting.sent == 1
            pid = os.fork()
            if pid == 0:  # the child: one call, and its verdict as the exit status
                ok = False
                try:
                    resp = client.get("/whoami", timeout=TIMEOUT)
                    ok = resp.status_code == 200 and Counting.sent == 2 and \
                        client.get_adapter(f"http://127.0.0.1:{port}/") is mine
                finally:
                    os._exit(0 if ok else 1)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
    finally:
        server.stop()


def test_the_probe_context_follows_requests_verify_and_cert(tmp_path) -> None:
    """verify=False probes without verifying, a CA directory is one, and cert= is the
    client certificate the probe shows (an endpoint that asks for one closed a probe
    without it: held out for good)."""
    from cluster.client import _tls_context

    cert, key = self_signed(tmp_path, san=False)
    unverified = _tls_context(False, None)
    assert unverified is not None and unverified.verify_mode == ssl.CERT_NONE
    by_dir = _tls_context(str(tmp_path), None)
    assert by_dir is not None and by_dir.verify_mode == ssl.CERT_REQUIRED
    by_file = _tls_context(str(cert), (str(cert), str(key)))
    assert by_file is not None and by_file.get_ca_certs()[0]["subject"] == \
        ((("commonName", "localhost"),),)
    other = tmp_path / "other.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(other), "2048"], check=True,
                   capture_output=True, timeout=60)
    assert _tls_context(str(cert), (str(cert), str(other))) is None  # the chain is loaded
    assert _tls_context(str(tmp_path / "missing.pem"), None) is None


def test_each_discover_call_keeps_its_own_timeouts_on_the_shared_node(sqlite_url) -> None:
    """Every discover() of one discovery URL shares one observing node, made with the
    first call's settings: a later call's --connect-timeout (and --read-timeout,
    --retries) was that first call's."""
    first = discover("held", discovery_url=sqlite_url)  # makes the node: 5 s to connect
    with blackholed_port() as port, records(sqlite_url, "held", f"http://127.0.0.1:{port}"):
        hasty = discover("held", discovery_url=sqlite_url, connect_timeout=0.5, retries=0)
        assert hasty.node is first.node
        wait_until(lambda: hasty.node.endpoints("held"), timeout=TIMEOUT, what="the record")
        began = time.monotonic()
        with pytest.raises(requests.ConnectionError):
            hasty.get("/x")
        took = time.monotonic() - began
    assert took < 2.5, f"gave up after {took:.1f} s: the first call's 5 s connect timeout"


def test_retries_setting_bounds_the_endpoints_a_call_tries(sqlite_url, monkeypatch) -> None:
    """``--retries`` (CLUSTER_RETRIES) is "other endpoints to try when one refuses a
    connection", for the balancer and cluster.discover() alike; discover() tried three
    whatever it said."""
    with records(sqlite_url, "search", retries=5) as node:
        assert discover("search", node=node).attempts == 6
    monkeypatch.setenv("CLUSTER_RETRIES", "0")
    client = discover("search", discovery_url=sqlite_url)
    assert client.attempts == 1
    # each call's own settings, though every call of one discovery URL shares one node
    # (made with the first call's: its retries and timeouts were every later client's)
    patient = discover("search", discovery_url=sqlite_url, retries=4)
    assert patient.node is client.node
    assert (patient.attempts, client.attempts) == (5, 1)
    with refused_port() as port, records(sqlite_url, "search", f"http://127.0.0.1:{port}",
                                          retries=0) as node:
        # one attempt: the refusal itself, where a second would have found the table
        # empty (NoEndpoint, as with the default)
        with pytest.raises(requests.ConnectionError, match="refused") as raised:
            discover("search", node=node).get("/x", timeout=TIMEOUT)
        assert not isinstance(raised.value, NoEndpoint)


def test_a_body_given_by_position_is_a_body_too() -> None:
    """Whether a failed call may be sent to another endpoint depends on its body: one
    passed by position (``request("GET", "/x", None, b"...")``) was not seen, and such
    a GET was replayed as if bare."""
    import inspect

    from cluster.client import _BODY_ARGUMENTS, _has_body

    names = list(inspect.signature(requests.Session.request).parameters)[3:]
    assert [names[index] for index, _ in _BODY_ARGUMENTS] == ["data", "files", "json"]
    assert not _has_body((), {}) and not _has_body(({"q": "1"},), {"headers": {}})
    assert _has_body((None, b"x"), {}) and _has_body((None,) * 4 + ({"f": b"x"},), {})
    assert _has_body((None,) * 13 + ({"a": 1},), {}) and _has_body((), {"json": {}})


@contextlib.contextmanager
def closing_clients() -> Iterator[Callable[..., ServiceClient]]:
    """discover(), whose clients are closed at the end of the block (a kept connection
    of one left to the garbage collector is a ResourceWarning in a later test)."""
    made: list[ServiceClient] = []

    def make(*args: Any, **kwargs: Any) -> ServiceClient:
        made.append(discover(*args, **kwargs))
        return made[-1]

    try:
        yield make
    finally:
        for client in made:
            client.close()


def test_a_post_answered_with_a_redirect_that_fails_is_not_sent_again(sqlite_url) -> None:
    """A POST answered 303 whose Location cannot be reached (a host that refuses) took
    effect: the caller gets requests' ConnectionError, as from requests alone. The
    failure of the redirect was taken for the endpoint refusing the POST: the POST was
    sent to every other endpoint too (three times here) and each healthy endpoint was
    ejected. Response hooks, the caller's and the session's, still see every answer,
    and a response still pickles (the client's own hook is gone from it); a hook of
    the caller's that fails (its own call to a service that is down) is after the
    answer too."""
    def answer(status: str, location: str) -> Callable[[socket.socket], bool]:
        def script(conn: socket.socket) -> bool:
            conn.sendall(f"HTTP/1.1 {status}\r\nLocation: {location}\r\n"
                         "Content-Length: 2\r\n\r\nok".encode())
            return True
        return script

    with refused_port() as dead:
        scripts = {"/form": answer("303 See Other", f"http://127.0.0.1:{dead}/done"),
                   "/moved": answer("302 Found", "/here"), "/here": answer("200 OK", "/")}
        upstreams = [ScriptedUpstream(scripts) for _ in range(3)]
        try:
            with records(sqlite_url, "web", *(u.url for u in upstreams)) as node, \
                    closing_clients() as discover:
                client = discover("web", node=node)
                with pytest.raises(requests.ConnectionError, match="refused"):
                    client.post("/form", data=b"x", timeout=TIMEOUT)
                assert sum(len(u.seen) for u in upstreams) == 1
                assert not node.ejected()
                seen: list[int] = []
                client.hooks["response"].append(lambda r, **_: seen.append(r.status_code))
                resp = client.get("/moved", timeout=TIMEOUT)
                assert (resp.status_code, resp.text, seen) == (200, "ok", [302, 200])
                resp = client.get("/moved", hooks={"response": lambda r, **_: seen.append(0)},
                                  timeout=TIMEOUT)
                assert seen == [302, 200, 0, 0]
                resp = discover("web", node=node).get("/moved", timeout=TIMEOUT)
                assert pickle.loads(pickle.dumps(resp)).history[0].status_code == 302

                def log_elsewhere(response: requests.Response, **_: object) -> None:
                    requests.post(f"http://127.0.0.1:{dead}/log", timeout=TIMEOUT)

                before = sum(len(u.seen) for u in upstreams)
                with pytest.raises(requests.ConnectionError, match="refused"):
                    client.post("/here", data=b"x", hooks={"response": log_elsewhere},
                                timeout=TIMEOUT)
                assert sum(len(u.seen) for u in upstreams) == before + 1
                assert not node.ejected()
        finally:
            for upstream in upstreams:
                upstream.close()


def test_a_url_in_the_query_string_leaves_the_path_relative(sqlite_url) -> None:
    """``client.get("/login?next=http://shop/")`` goes to the endpoint: a scheme only at
    the start makes a URL absolute. Any "://" in it did: requests got the bare path and
    raised InvalidSchema."""
    server, port = start_backend("b1")
    try:
        with records(sqlite_url, "search", f"http://127.0.0.1:{port}") as node, \
                closing_clients() as discover:
            resp = discover("search", node=node).get("/headers?next=http://shop/",
                                                     timeout=TIMEOUT)
            assert resp.json()["query"] == "next=http://shop/"
    finally:
        server.stop()


def _whoami(client: requests.Session) -> str:
    """A pool task: the client it was handed, used in the worker process."""
    return client.get("/whoami", timeout=TIMEOUT).text


# Its spawned pool runs the collector, which can report a socket another test left
# unclosed (twice in CI, neither reproduced alone): this test is about pickling.
@pytest.mark.filterwarnings("ignore::ResourceWarning",
                            "ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_client_pickles_as_a_session_does(sqlite_url) -> None:
    """A client handed to a multiprocessing worker (pickled, as every argument there is)
    works in it, as a requests.Session does, over the worker's own node; it lost its
    own attributes and every call raised AttributeError. One over a node passed in says
    why it cannot be pickled."""
    import multiprocessing

    from cluster import client as client_module

    server, port = start_backend("b1")
    try:
        with records(sqlite_url, "search", f"http://127.0.0.1:{port}") as node, \
                closing_clients() as discover:
            client = discover("search", discovery_url=sqlite_url, retries=4)
            client.headers["X-Caller"] = "me"
            with pickle.loads(pickle.dumps(client)) as copy:
                assert (copy.attempts, copy.headers["X-Caller"]) == (5, "me")
                assert copy.get("/whoami", timeout=TIMEOUT).text == "b1"
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                assert pool.apply(_whoami, (client,)) == "b1"
            with pytest.raises(TypeError, match="node passed to discover"):
                pickle.dumps(discover("search", node=node))
    finally:
        server.stop()
        with client_module._NODES_LOCK:
            shared = client_module._NODES.pop(sqlite_url, None)
        if shared is not None:
            shared.close()


def test_a_draining_endpoint_takes_no_new_calls(sqlite_url) -> None:
    """Once an endpoint drains (its record says so), clients on it move to another one
    and new clients do not pick it, as the balancers place no request there: its
    stop then closes no connection a call is crossing. A client stayed on it until it
    left the table, a POST on a kept connection racing that close (an error), and
    one client in two picked it anew. With every endpoint draining they still serve."""
    servers = [start_backend(name) for name in ("b1", "b2")]
    members = [Cluster(Settings(discovery_url=sqlite_url, service="search", ping_interval=1.0,
                                endpoint_url=f"http://127.0.0.1:{port}")).start()
               for _, port in servers]
    try:
        with Cluster(Settings(discovery_url=sqlite_url, ping_interval=1.0),
                     register=False) as node, closing_clients() as discover:
            wait_until(lambda: len(node.endpoints("search")) == 2, timeout=TIMEOUT,
                       what="both records")
            on_b1 = next(c for c in iter(lambda: discover("search", node=node), None)
                         if c.get("/whoami", timeout=TIMEOUT).text == "b1")
            assert members[0].registrar is not None
            members[0].registrar.drain()
            wait_until(lambda: any(e.draining for e in node.endpoints("search")),
                       timeout=TIMEOUT, what="the drain in the table")
            assert on_b1.post("/whoami", data=b"x", timeout=TIMEOUT).text == "b2"
            for _ in range(8):
                client = discover("search", node=node)
                assert client.get("/whoami", timeout=TIMEOUT).text == "b2"
            assert members[1].registrar is not None
            members[1].registrar.drain()
            wait_until(lambda: all(e.draining for e in node.endpoints("search")),
                       timeout=TIMEOUT, what="both drains in the table")
            assert on_b1.get("/whoami", timeout=TIMEOUT).text == "b2"  # stays: all drain
    finally:
        for member in members:
            member.close()
        for server, _ in servers:
            server.stop()


class Socks5Proxy:
    """A real SOCKS5 proxy on 127.0.0.1 (no authentication, CONNECT only) that lists
    the (host, port) of each tunnel it opens. Closed, with every socket, at close()."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.tunnels: list[tuple[str, int]] = []
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self._sockets.append(conn)
            threading.Thread(target=self._tunnel, args=(conn,), daemon=True).start()

    def _tunnel(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError, IndexError, struct.error):
            conn.recv(conn.recv(2)[1])  # the methods offered: "none" is taken
            conn.sendall(b"\x05\x00")
            kind = conn.recv(4)[3]
            host = socket.inet_ntoa(conn.recv(4)) if kind == 1 else \
                conn.recv(conn.recv(1)[0]).decode()
            port = struct.unpack("!H", conn.recv(2))[0]
            self.tunnels.append((host, port))
            upstream = socket.create_connection((host, port), timeout=TIMEOUT)
            self._sockets.append(upstream)
            conn.sendall(b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00")
            threading.Thread(target=self._pump, args=(upstream, conn), daemon=True).start()
            self._pump(conn, upstream)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        for sock in self._sockets:
            sock.close()


def test_a_socks_proxy_in_the_environment_is_used(sqlite_url, monkeypatch) -> None:
    """With ALL_PROXY=socks5://... (and PySocks, requests[socks]) requests tunnel through
    the proxy; a client's calls do too, interim answers still skipped. Every one failed
    with a TypeError from inside urllib3: the adapter gave the SOCKS proxy's pools the
    plain connection class, which knows no SOCKS options."""
    import socks  # noqa: F401 - PySocks, in the test extras: requests needs it for socks5://

    def hinted(conn: socket.socket) -> bool:
        conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
                     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return True

    upstream = ScriptedUpstream({"/hinted": hinted})
    proxy = Socks5Proxy()
    try:
        with records(sqlite_url, "web", upstream.url) as node, \
                closing_clients() as discover:
            monkeypatch.setenv("ALL_PROXY", f"socks5://127.0.0.1:{proxy.port}")
            with discover("web", node=node) as client:
                resp = client.get("/hinted", timeout=TIMEOUT)
                assert (resp.status_code, resp.text) == (200, "ok")
            assert proxy.tunnels == [("127.0.0.1", upstream.port)]
    finally:
        proxy.close()
        upstream.close()
    # requests hands back the same manager for every call through a proxy: its pool
    # classes stay the ones made the first time, not a subclass more each call
    adapter = InterimAdapter()
    pools = adapter.proxy_manager_for(f"http://127.0.0.1:{proxy.port}").pool_classes_by_scheme
    again = adapter.proxy_manager_for(f"http://127.0.0.1:{proxy.port}").pool_classes_by_scheme
    assert again == pools
    assert all(pool.ConnectionCls.response_class is _Response for pool in pools.values())
