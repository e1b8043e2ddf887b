"""https endpoints, through both proxies: the front door and the WSGI adapter.

Both connect through cluster.proxy.upstream, which verifies the endpoint's certificate
against the system's trust store; here that store is a test CA made with openssl and
given to the cluster processes as SSL_CERT_FILE (OpenSSL's own variable).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests
import websocket

from helpers import (
    Proc,
    cluster_argv,
    self_signed,
    start_app,
    start_instance,
    start_library_app,
    start_serve,
    wait_until,
)

TIMEOUT = 15


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost: (cert, key)."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(where)
    return cert, key


@contextlib.contextmanager
def tls_endpoint(tmp: Path, certificate: tuple[Path, Path]) -> Iterator[str]:
    """A wss/https echo server registered as service `sec`; yields the discovery URL."""
    cert, key = certificate
    discovery = f"sqlite://{tmp / 'discovery.sqlite3'}"
    server, port = start_app("ws_echo.py", "--certfile", str(cert), "--keyfile", str(key),
                             name="tls-echo")
    try:
        sidecar = Proc(cluster_argv("register", "--service", "sec", "--endpoint-url",
                                    f"https://localhost:{port}", "--ping-interval", "1"),
                       env={"CLUSTER_DISCOVERY_URL": discovery}, name="sidecar")
        try:
            yield discovery
        finally:
            sidecar.stop()
    finally:
        server.stop()


def front_door(discovery: str, cert: Path) -> tuple[Proc, int]:
    return start_serve("--ui-service", "sec",
                       env={"CLUSTER_DISCOVERY_URL": discovery, "SSL_CERT_FILE": str(cert)},
                       name="front")


def library_front(discovery: str, cert: Path) -> tuple[Proc, int]:
    """tests/apps/library_app.py: cluster.wrap() under a plain gevent WSGIServer, whose
    UI service is `sec`, so it proxies through the WSGI adapter."""
    return start_library_app({"CLUSTER_DISCOVERY_URL": discovery, "SSL_CERT_FILE": str(cert),
                              "CLUSTER_UI_SERVICE": "sec", "CLUSTER_SELF_WEIGHT": "0"})


@pytest.mark.parametrize("way", ["door", "wsgi-adapter"])
def test_https_endpoint_http_and_websocket(tmp_path: Path, certificate: tuple[Path, Path],
                                           way: str) -> None:
    cert, _ = certificate
    with tls_endpoint(tmp_path, certificate) as discovery:
        proc, port = (front_door(discovery, cert) if way == "door"
                      else library_front(discovery, cert))
        try:
            url = f"http://127.0.0.1:{port}"
            resp = wait_until(lambda: _get(url + "/plain"), timeout=TIMEOUT,
                              what="the front to reach the https endpoint")
            assert resp.text.startswith("ws_echo ")
            ws = websocket.create_connection(f"ws://127.0.0.1:{port}/chat", timeout=TIMEOUT)
            try:
                for message in ("one", "two", "x" * 70000):
                    ws.send(message)
                    assert ws.recv() == message
                ws.send_binary(b"\x00\xff")
                assert ws.recv() == b"\x00\xff"
            finally:
                ws.close()
        finally:
            proc.stop()
        assert "Traceback" not in proc.output(), proc.output()


@pytest.mark.parametrize("way", ["door", pytest.param("wsgi-adapter", marks=pytest.mark.soak)])
def test_a_tls_tunnel_to_a_client_that_stops_reading_is_closed(
        tmp_path: Path, certificate: tuple[Path, Path], way: str) -> None:
    """The tunnel to an https endpoint runs as two greenlets (not the event-loop
    Tunnel): --write-timeout held there too. The endpoint floods, the client upgraded
    and reads nothing: the balancer lets go of both sides after 1 s."""
    from test_ws_write_timeout_e2e import drained_to_the_end, stalled_client

    cert, _ = certificate
    with tls_endpoint(tmp_path, certificate) as discovery:
        env = {"CLUSTER_DISCOVERY_URL": discovery, "SSL_CERT_FILE": str(cert)}
        if way == "door":
            proc, port = start_serve("--ui-service", "sec", "--write-timeout", "1", env=env,
                                     name="front")
        else:
            proc, port = start_library_app({**env, "CLUSTER_UI_SERVICE": "sec",
                                            "CLUSTER_SELF_WEIGHT": "0",
                                            "CLUSTER_WRITE_TIMEOUT": "1"})
        try:
            wait_until(lambda: _get(f"http://127.0.0.1:{port}/plain"), timeout=TIMEOUT,
                       what="the front to reach the https endpoint")
            client = stalled_client(port, "/feed?flood=1")
            if way == "door":
                wait_until(lambda: "closing a WebSocket tunnel" in proc.output(),
                           timeout=10, what="the front to let go of the stalled client")
            else:
                time.sleep(3)  # three write timeouts (library_app.py logs no info lines)
            assert drained_to_the_end(client)  # then the client finds its end
            assert proc.poll() is None
        finally:
            proc.stop()
        assert "Traceback" not in proc.output(), proc.output()


def test_untrusted_certificate_is_a_clean_502(tmp_path: Path,
                                               certificate: tuple[Path, Path]) -> None:
    """Without the test CA the endpoint's certificate does not verify: 502, and the
    endpoint is not used, rather than talking to an impostor."""
    with tls_endpoint(tmp_path, certificate) as discovery:
        proc, port = front_door(discovery, Path("/nonexistent-ca.pem"))
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: requests.get(url + "/_cluster/status", timeout=5)
                       .json()["endpoints"], timeout=TIMEOUT, what="the endpoint listed")
            resp = requests.get(url + "/plain", timeout=TIMEOUT)
            assert resp.status_code == 502 and "TLS" in resp.text, resp.text
        finally:
            proc.stop()
        assert "Traceback" not in proc.output(), proc.output()


def _get(url: str) -> requests.Response | None:
    try:
        resp = requests.get(url, timeout=5)
    except requests.RequestException:
        return None
    return resp if resp.ok else None


def test_an_endpoint_whose_certificate_does_not_verify_stays_ejected(
        tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    """Its TLS handshake fails on every connection, which a bare connect probe and the
    heartbeat of its registration cannot see: it was let back within half a second
    each time, and each request that then picked it paid a failed handshake and a
    retry, two warnings logged (7 ejections in 3 s). Now the probe completes a
    handshake as a request would: one ejection, held while probes fail."""
    with tls_endpoint(tmp_path, certificate) as discovery:
        good, _ = start_instance(discovery, "good", service="sec")
        proc, port = front_door(discovery, Path("/nonexistent-ca.pem"))
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: len(requests.get(url + "/_cluster/status", timeout=5)
                                   .json()["endpoints"]) == 2,
                       timeout=TIMEOUT, what="both endpoints listed")
            for n in range(30):  # 3 s: heartbeats and probes of the untrusted endpoint
                resp = requests.post(url + "/echo", data=b"%d" % n, timeout=TIMEOUT)
                assert (resp.status_code, resp.content) == (200, b"%d" % n)
                time.sleep(0.1)
            ejections = proc.output().count("ejecting sec https://localhost")
            assert ejections == 1, proc.output()
            assert "CERTIFICATE_VERIFY_FAILED" in proc.output()
        finally:
            proc.stop()
            good.stop()
        assert "Traceback" not in proc.output(), proc.output()


@pytest.mark.parametrize("way", ["door", "wsgi-adapter"])
def test_stray_bytes_in_a_tls_record_never_reach_another_client(
        tmp_path: Path, certificate: tuple[Path, Path], way: str) -> None:
    """An https endpoint sends an unrequested second answer in the same TLS record as
    the end of its body. The TLS layer decrypts the record whole, so those bytes sit
    there, not in the socket, where the pool's poll looks before reusing a connection:
    the next request on the pooled connection got them as its answer ("stolen"). A
    connection whose TLS layer holds bytes is now thrown away, as a readable one is."""
    cert, key = certificate
    discovery = f"sqlite://{tmp_path / 'discovery.sqlite3'}"
    with contextlib.ExitStack() as stops:
        endpoint, port = start_app("bad_endpoint.py", "--certfile", str(cert), "--keyfile",
                                   str(key), name="bad-tls")
        stops.callback(endpoint.stop)
        sidecar = Proc(cluster_argv("register", "--service", "sec", "--endpoint-url",
                                    f"https://localhost:{port}", "--ping-interval", "1"),
                       env={"CLUSTER_DISCOVERY_URL": discovery}, name="sidecar")
        stops.callback(sidecar.stop)
        proc, front = (front_door(discovery, cert) if way == "door"
                       else library_front(discovery, cert))
        stops.callback(proc.stop)
        url = f"http://127.0.0.1:{front}"
        wait_until(lambda: _get(url + "/ok"), timeout=TIMEOUT,
                   what="the front to reach the https endpoint")
        for _ in range(3):
            resp = requests.get(url + "/glued", timeout=TIMEOUT)
            assert (resp.status_code, resp.content) == (200, b"ok")
            resp = requests.get(url + "/ok", timeout=TIMEOUT)
            assert (resp.status_code, resp.content) == (200, b"ok"), resp.content
            assert "stolen" not in resp.headers.get("Set-Cookie", "")
    assert "Traceback" not in proc.output(), proc.output()
