"""Metrics and access logs of real `cluster serve` processes, with real traffic.

- `/_cluster/metrics`, parsed with prometheus_client's own parser, moves exactly with
  the requests sent: one process, and `--workers-count 2` (summed over the workers);
- the access log has the right line for a local request, a proxied one, one retried
  after a refusing endpoint, and a proxied WebSocket; lifecycle events are logged once.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import requests
import websocket
from prometheus_client.parser import text_string_to_metric_families

from cluster.records import endpoint_hash
from helpers import (
    Proc,
    cluster_argv,
    exchange,
    needs_ipv6,
    read_port_file,
    start_app,
    wait_until,
)

COOKIE = "cluster-endpoint::web"
#: what gunicorn's arbiter logs once its shared socket listens
def serve(discovery_url: str, tmp: Path, name: str, *extra: str,
          app: str = "backend:app") -> tuple[Proc, str]:
    """`cluster serve` of the test backend on a port of the OS's choosing."""
    port_file = tmp / f"{name}.port"
    proc = Proc(cluster_argv("serve", "--service", "web", "--app", app,
                             "--bind", "127.0.0.1:0", "--port-file", str(port_file),
                             "--ping-interval", "1", "--expiry-grace", "1", *extra),
                env={"CLUSTER_DISCOVERY_URL": discovery_url, "BACKEND_NAME": name}, name=name)
    try:
        wait_until(lambda: port_file.exists() or proc.poll() is not None, timeout=30,
                   what=f"{name}'s port file")
        assert proc.poll() is None, proc.output()
    except BaseException:
        proc.stop()
        raise
    return proc, "http://" + port_file.read_text().strip()


def metrics(base: str) -> dict[tuple[str, tuple], float]:
    text = requests.get(base + "/_cluster/metrics", timeout=10).text
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def total(found: dict, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in found.items()
               if n == name and all((k, val) in ls for k, val in labels.items()))


def live_endpoints(base: str) -> list[str]:
    return [e["endpoint"] for e in requests.get(base + "/_cluster/status", timeout=5)
            .json()["endpoints"]]


def test_metrics_move_with_the_traffic_of_one_process(sqlite_url, tmp_path):
    proc, base = serve(sqlite_url, tmp_path, "solo")
    try:
        wait_until(lambda: live_endpoints(base) == [base], timeout=10, what="registration")
        before = metrics(base)
        for _ in range(25):
            assert requests.get(base + "/whoami", timeout=5).status_code == 200
        for _ in range(5):
            assert requests.get(base + "/status/503", timeout=5).status_code == 503
        after = metrics(base)
        moved = {code: total(after, "cluster_requests_total", endpoint="local", code=code)
                 - total(before, "cluster_requests_total", endpoint="local", code=code)
                 for code in ("2xx", "5xx")}
        assert moved == {"2xx": 25, "5xx": 5}
        # the first scrape itself was answered by cluster ("-"), as a 2xx of no service
        assert total(after, "cluster_requests_total", endpoint="-", code="2xx") >= 1
        assert total(after, "cluster_open_connections") >= 1  # the scrape's own
        assert 0 <= total(after, "cluster_discovery_refresh_age_seconds") < 5
        assert total(after, "cluster_discovery_errors_total") == 0
    finally:
        proc.stop()
    assert "Traceback" not in proc.output()


def test_metrics_of_two_workers_are_summed(sqlite_url, tmp_path):
    proc, base = serve(sqlite_url, tmp_path, "pair", "--workers-count", "2",
                       app="cluster.demo:app")
    try:
        wait_until(lambda: len(live_endpoints(base)) == 2, timeout=20, what="two workers")
        before = metrics(base)
        pids = set()
        for _ in range(40):  # no cookie: spread over both workers (served or passed on)
            response = requests.get(base + "/whoami", timeout=5)
            assert response.status_code == 200
            pids.add(response.json()["pid"])
        assert len(pids) == 2
        after = metrics(base)  # whichever worker answers, the sum over both
        served = (total(after, "cluster_requests_total", endpoint="local", code="2xx")
                  - total(before, "cluster_requests_total", endpoint="local", code="2xx"))
        assert served == 40
        per_worker = {}
        for worker in live_endpoints(base):  # each worker's own status page
            data = requests.get(worker + "/_cluster/status", timeout=5).json()
            assert data["multiprocess"] is True
            per_worker[worker] = data["served"]["requests"]
        assert all(n > 0 for n in per_worker.values()), per_worker
    finally:
        proc.stop()
    output = proc.output()
    assert "Traceback" not in output and "WARNING" not in output, output


class Sidecar:
    """A `cluster register` record for an endpoint served by another program."""

    def __init__(self, discovery_url: str, url: str, name: str) -> None:
        self.proc = Proc(cluster_argv("register", "--service", "web", "--endpoint-url", url,
                                      "--ping-interval", "1"),
                         env={"CLUSTER_DISCOVERY_URL": discovery_url}, name=name)


def test_access_log_lines_for_local_proxied_retried_and_websocket(sqlite_url, tmp_path,
                                                                  dead_port):
    log_file = tmp_path / "access.log"
    echo, echo_port = start_app("ws_echo.py", name="echo")
    echo_url, dead_url = f"http://127.0.0.1:{echo_port}", f"http://127.0.0.1:{dead_port}"
    procs = [echo]
    try:
        procs.append(Sidecar(sqlite_url, echo_url, "sc-echo").proc)
        procs.append(Sidecar(sqlite_url, dead_url, "sc-dead").proc)  # nothing listens there
        front, base = serve(sqlite_url, tmp_path, "front", "--access-log", "json",
                            "--access-log-file", str(log_file))
        procs.append(front)
        wait_until(lambda: len(live_endpoints(base)) == 3, timeout=15, what="three records")

        def sticky(url: str) -> dict[str, str]:
            return {COOKIE: endpoint_hash(url)}

        local = requests.get(base + "/whoami?n=1", cookies=sticky(base), timeout=5)
        assert local.headers["X-Served-By"] == "front"
        proxied = requests.get(base + "/closes?id=none", cookies=sticky(echo_url), timeout=5)
        assert proxied.status_code == 404  # ws_echo's own answer: it was proxied there
        retried = requests.get(base + "/whoami?n=2", cookies=sticky(dead_url), timeout=5)
        assert retried.status_code == 200
        ws = websocket.create_connection(base.replace("http", "ws", 1) + "/ws?id=t1",
                                         cookie=f"{COOKIE}={endpoint_hash(echo_url)}",
                                         timeout=10)
        ws.send("ping")
        assert ws.recv() == "ping"
        ws.close()

        def lines() -> dict[str, dict]:
            found = {}
            for line in log_file.read_text().splitlines():
                entry = json.loads(line)
                found[entry["target"]] = entry
            return found

        logged = wait_until(lambda: (lambda f: f if "/ws?id=t1" in f else None)(lines()),
                            timeout=10, what="the WebSocket's line")
        line = logged["/whoami?n=1"]
        assert (line["upstream"], line["status"], line["retries"]) == ("local", 200, 0)
        assert line["upstream_time"] == 0 and line["total_time"] > 0
        line = logged["/closes?id=none"]
        assert (line["upstream"], line["status"], line["retries"]) == (echo_url, 404, 0)
        assert 0 < line["upstream_time"] <= line["total_time"]
        line = logged["/whoami?n=2"]
        assert line["status"] == 200 and line["retries"] == 1
        assert line["upstream"] in ("local", echo_url) and line["upstream"] != dead_url
        line = logged["/ws?id=t1"]
        assert (line["upstream"], line["status"], line["websocket"]) == (echo_url, 101, True)
        assert line["method"] == "GET" and line["remote"] == "127.0.0.1"

        found = metrics(base)
        assert total(found, "cluster_retries_total", endpoint=dead_url, reason="connect") == 1
        assert total(found, "cluster_ejections_total", endpoint=dead_url) == 1
        status = requests.get(base + "/_cluster/status", timeout=5).json()
        (dead,) = [e for e in status["endpoints"] if e["endpoint"] == dead_url]
        assert dead["ejected"] and "refused" in dead["ejected_reason"], dead
    finally:
        for proc in reversed(procs):
            proc.stop()
    output = front.output()
    # lifecycle events, once each, at info level (the ejection is a warning)
    assert output.count(f"INFO cluster.registry [{front.pid}] registered web at {base}") == 1
    assert output.count(f"endpoint joined: web {dead_url}") == 1
    assert output.count(f"ejecting web {dead_url}") == 1
    assert "stopping: deregistering, then draining" in output
    assert "Traceback" not in output


def test_metrics_of_gunicorn_workers_are_summed(sqlite_url, tmp_path):
    from test_balancing_e2e import start_runner

    proc, port = start_runner("gunicorn", sqlite_url, 0, tmp_path)  # -w 2, cluster.gunicorn
    base = f"http://127.0.0.1:{port}"
    try:
        # each gunicorn worker registers a private endpoint; the shared port is not one
        wait_until(lambda: len(live_endpoints(base)) == 2 and base not in live_endpoints(base),
                   timeout=20, what="registration")
        before = metrics(base)
        pids = {requests.get(base + "/whoami", timeout=5).json()["pid"] for _ in range(40)}
        assert len(pids) == 2
        after = metrics(base)
        served = (total(after, "cluster_requests_total", endpoint="local", code="2xx")
                  - total(before, "cluster_requests_total", endpoint="local", code="2xx"))
        assert served == 40
    finally:
        proc.stop()
    assert "Traceback" not in proc.output()


def test_admin_pages_by_token_under_another_prefix(sqlite_url, tmp_path):
    token = "t0ken-for-the-admin-pages"
    # loopback is not trusted here: only the token opens the pages
    proc, base = serve(sqlite_url, tmp_path, "guarded", "--admin-prefix", "/ops",
                       "--admin-token", token, "--trusted-proxies", "192.0.2.1")
    try:
        wait_until(lambda: requests.get(base + "/ops/status", timeout=5,
                                        params={"token": token}).status_code == 200,
                   timeout=10, what="the status page")
        assert requests.get(base + "/ops/status", timeout=5).status_code == 401
        assert requests.get(base + "/ops/status?token=wrong", timeout=5).status_code == 401
        bearer = {"Authorization": f"Bearer {token}"}
        page = requests.get(base + "/ops/", headers=bearer, timeout=5)
        assert page.status_code == 200 and "cluster dashboard" in page.text
        assert 'const PREFIX = "/ops";' in page.text  # it refreshes from /ops/status
        assert requests.get(base + "/ops/metrics", headers=bearer, timeout=5).ok
        # the old path is the app's again
        mine = requests.get(base + "/_cluster/status", timeout=5)
        assert mine.headers.get("X-Served-By") == "guarded"
    finally:
        proc.stop()
    assert "Traceback" not in proc.output()


def test_admin_pages_through_a_proxy_a_browser_and_a_dual_stack_bind(sqlite_url, tmp_path):
    """What a proxy on the loopback forwards for an outside client is the app's (the
    pages would be open to everyone behind it); a browser page cannot drain the
    instance; refusals say what is allowed."""
    proc, base = serve(sqlite_url, tmp_path, "fronted")
    try:
        wait_until(lambda: requests.get(base + "/_cluster/status", timeout=5).ok,
                   timeout=10, what="the status page")
        for forwarded in ({"X-Forwarded-For": "203.0.113.9"},
                          {"X-Forwarded-For": "127.0.0.1, 203.0.113.9"},
                          {"Forwarded": "for=203.0.113.9;proto=https"},
                          {"X-Real-IP": "203.0.113.9"}):
            page = requests.get(base + "/_cluster/status", headers=forwarded, timeout=5)
            assert page.headers.get("X-Served-By") == "fronted", forwarded  # the app's
            drain = requests.post(base + "/_cluster/drain", headers=forwarded, timeout=5)
            assert drain.headers.get("X-Served-By") == "fronted", forwarded
        inside = requests.get(base + "/_cluster/status", timeout=5,
                              headers={"X-Forwarded-For": "127.0.0.1"})
        assert inside.status_code == 200 and inside.json()["endpoint"] == base
        wrong = requests.delete(base + "/_cluster/status", timeout=5)
        assert (wrong.status_code, wrong.headers.get("Allow")) == (405, "GET, HEAD")
        wrong = requests.get(base + "/_cluster/drain", timeout=5)
        assert (wrong.status_code, wrong.headers.get("Allow")) == (405, "POST")
        page = requests.post(base + "/_cluster/drain", timeout=5,
                             headers={"Origin": "http://evil.example"})
        assert page.status_code == 403
        assert requests.get(base + "/_cluster/status", timeout=5).json()["draining"] is False
    finally:
        proc.stop()
    assert "Traceback" not in proc.output()


@needs_ipv6
def test_an_ipv4_client_of_a_dual_stack_bind_is_trusted_as_ipv4(sqlite_url, tmp_path):
    """--bind [::]:PORT takes IPv4 clients as ::ffff:127.0.0.1: the default trust of
    127.0.0.1 must still hold for them (the status page, cluster status --watch)."""
    port_file = tmp_path / "dual.port"
    proc = Proc(cluster_argv("serve", "--service", "web", "--app", "backend:app",
                             "--bind", "[::]:0", "--port-file", str(port_file)),
                env={"CLUSTER_DISCOVERY_URL": sqlite_url, "BACKEND_NAME": "dual"}, name="dual")
    try:
        port = int(read_port_file(port_file, proc))
        for host in ("127.0.0.1", "[::1]"):
            url = f"http://{host}:{port}/_cluster/status"
            page = wait_until(lambda url=url: requests.get(url, timeout=5), timeout=10,
                              what=url)
            assert page.status_code == 200 and "X-Served-By" not in page.headers, host
    finally:
        proc.stop()
    assert "Traceback" not in proc.output()


def test_access_log_does_not_write_the_admin_token(sqlite_url, tmp_path):
    """?token=… opens the admin pages from anywhere: it must not land in a log file that
    others read. The app's own query fields are logged as sent."""
    token = "t0ken-for-the-admin-pages"
    log_file = tmp_path / "access.log"
    proc, base = serve(sqlite_url, tmp_path, "logged", "--admin-token", token,
                       "--trusted-proxies", "192.0.2.1", "--access-log", "combined",
                       "--access-log-file", str(log_file))
    try:
        wait_until(lambda: requests.get(base + "/_cluster/status", timeout=5,
                                        params={"token": token}).status_code == 200,
                   timeout=10, what="the status page")
        assert requests.get(base + f"/_cluster/?a=1&token={token}", timeout=5).ok
        # another spelling that opens the pages too (the path and the name are decoded;
        # http.client sends it as written, requests would normalise it)
        client = http.client.HTTPConnection(base.removeprefix("http://"), timeout=5)
        client.request("GET", f"/%5Fcluster/status?tok%65n={token}")
        assert client.getresponse().status == 200
        client.close()
        requests.get(base + "/search?token=app-field", timeout=5)  # the app answers
        wait_until(lambda: "/search" in log_file.read_text(), timeout=5,
                   what="the access log lines")
    finally:
        proc.stop()
    text = log_file.read_text()
    assert token not in text and token not in proc.output()
    assert '"GET /_cluster/status?token=- HTTP/1.1" 200' in text, text
    assert '"GET /_cluster/?a=1&token=- HTTP/1.1" 200' in text, text
    assert '"GET /%5Fcluster/status?tok%65n=- HTTP/1.1" 200' in text, text
    assert "/search?token=app-field " in text, text


def test_local_websocket_is_counted_open_and_logged_when_it_ends(sqlite_url, tmp_path):
    log_file = tmp_path / "access.log"
    proc, base = serve(sqlite_url, tmp_path, "gws", "--access-log", "json",
                       "--access-log-file", str(log_file), app="gws_echo:app")
    try:
        wait_until(lambda: live_endpoints(base) == [base], timeout=10, what="registration")
        ws = websocket.create_connection(base.replace("http", "ws", 1) + "/echo", timeout=10)
        try:
            ws.send("hi")
            assert ws.recv() == "hi"
            assert total(metrics(base), "cluster_open_websockets", endpoint="local") == 1
            status = requests.get(base + "/_cluster/status", timeout=5).json()
            assert status["websockets"] == 1
        finally:
            ws.close()
        wait_until(lambda: total(metrics(base), "cluster_open_websockets") == 0, timeout=10,
                   what="the WebSocket counted closed")
        (line,) = [json.loads(x) for x in log_file.read_text().splitlines()
                   if json.loads(x)["target"] == "/echo"]
        assert (line["upstream"], line["status"], line["websocket"]) == ("local", 101, True)
    finally:
        proc.stop()
    assert "Traceback" not in proc.output()


def test_sigusr1_reopens_the_access_log_file_after_rotation(sqlite_url, tmp_path):
    """logrotate moves the file away and sends SIGUSR1, as for nginx: the next lines go
    to a new file. SIGUSR1's default action killed the instance, its record left behind."""
    import signal

    log_file = tmp_path / "access.log"
    proc, base = serve(sqlite_url, tmp_path, "rotated", "--access-log", "combined",
                       "--access-log-file", str(log_file))
    try:
        wait_until(lambda: requests.get(base + "/whoami", timeout=5).ok, timeout=10,
                   what="the instance")
        requests.get(base + "/before", timeout=5)
        wait_until(lambda: "/before" in log_file.read_text(), timeout=5, what="the line")
        log_file.rename(tmp_path / "access.log.1")
        proc.signal(signal.SIGUSR1)
        wait_until(lambda: log_file.exists(), timeout=5, what="a new access log file")
        requests.get(base + "/after", timeout=5)
        wait_until(lambda: "/after" in log_file.read_text(), timeout=5,
                   what="the next line in the new file")
        assert "/after" not in (tmp_path / "access.log.1").read_text()
        assert proc.poll() is None and base in live_endpoints(base)
    finally:
        proc.stop()
    assert "Traceback" not in proc.output()


def test_sigusr1_to_a_supervisor_reopens_every_workers_access_log(sqlite_url, tmp_path):
    import signal

    log_file = tmp_path / "access.log"
    proc, base = serve(sqlite_url, tmp_path, "rotated2", "--access-log", "combined",
                       "--access-log-file", str(log_file), "--workers-count", "2")
    try:
        wait_until(lambda: len(status_rows(sqlite_url)) == 2, timeout=20,
                   what="both workers registered")
        log_file.rename(tmp_path / "access.log.1")
        proc.signal(signal.SIGUSR1)
        wait_until(lambda: proc.output().count("SIGUSR1: reopening") == 2, timeout=10,
                   what="both workers to reopen")
        for endpoint in status_rows(sqlite_url):  # each worker's own port
            requests.get(endpoint + "/after", timeout=5)
        wait_until(lambda: log_file.exists() and log_file.read_text().count("/after") >= 2,
                   timeout=5, what="the lines in the new file")
        assert "/after" not in (tmp_path / "access.log.1").read_text()  # none kept the old
        assert proc.poll() is None
    finally:
        proc.stop()
    assert "Traceback" not in proc.output()


def status_rows(discovery_url: str) -> list[str]:
    from helpers import status_json

    return [e["endpoint"] for e in status_json(discovery_url)["endpoints"]]


def test_refused_requests_are_logged_and_counted(sqlite_url, tmp_path):
    """A request refused before it was parsed (400, 414, 505) was in no access log line
    and no metric, only an info line: a scanner, a TLS client on the plain port or a
    broken client was invisible where an operator looks (nginx logs them). Its line
    is logged as far as it came, escaped, the admin token hidden."""
    token = "t0ken-for-the-admin-pages"
    log_file = tmp_path / "access.log"
    proc, base = serve(sqlite_url, tmp_path, "refusing", "--admin-token", token,
                       "--access-log", "combined", "--access-log-file", str(log_file))
    port = int(base.rpartition(":")[2])
    tls_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"A" * 20 + b"\r\n\r\n"
    try:
        before = total(metrics(base), "cluster_requests_total", code="4xx", endpoint="-")
        for data in (b"GET /a\x1b[31mred HTTP/1.1\r\nHost: x\r\n\r\n",
                     f"GET /_cluster/status?token={token} HTTP/1.1\r\nBad field\r\n\r\n"
                     .encode(),
                     b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", tls_hello,
                     b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"):
            answers, _ = exchange(port, data)
            assert [a.status for a in answers] in ([400], [505], [414]), answers
        after = metrics(base)
        wait_until(lambda: len(log_file.read_text().splitlines()) >= 5, timeout=5,
                   what="five access log lines")
    finally:
        proc.stop()
    lines = log_file.read_text().splitlines()
    assert total(after, "cluster_requests_total", code="4xx", endpoint="-") == before + 4
    assert total(after, "cluster_requests_total", code="5xx", endpoint="-") >= 1
    assert any('"GET /a\\x1b[31mred HTTP/1.1" 400 ' in line for line in lines), lines
    assert any('"GET /_cluster/status?token=- HTTP/1.1" 400 ' in line for line in lines)
    assert any('"GET / HTTP/2.0" 505 ' in line for line in lines), lines
    assert any(line.split('"')[1].startswith("\\x16\\x03\\x01") and '" 400 ' in line
               for line in lines), lines
    assert any('"GET /aaaa' in line and '" 414 ' in line for line in lines), lines
    assert all(line.isascii() and "upstream=- " in line for line in lines), lines
    assert token not in log_file.read_text()


def test_an_access_log_that_cannot_be_written_says_so_once(sqlite_url, tmp_path):
    """A full disk (/dev/full) lost every access log line without a word; nginx logs
    the failed write. One warning per failure, however many lines are lost."""
    proc, base = serve(sqlite_url, tmp_path, "full", "--access-log", "combined",
                       "--access-log-file", "/dev/full")
    try:
        for _ in range(5):
            assert requests.get(base + "/whoami", timeout=5).ok
        wait_until(lambda: "cannot write the access log" in proc.output(), timeout=5,
                   what="the warning")
    finally:
        proc.stop()
    assert proc.output().count("cannot write the access log to /dev/full") == 1, \
        proc.output()


def test_refused_request_lines_reach_the_debug_log_escaped(sqlite_url, tmp_path):
    """Without --access-log, --log-level debug logs each request on cluster.access.
    A refused request's line comes as the client sent it: written raw, a line feed in
    it forged a log line of the attacker's choosing, and an ANSI escape or a NUL went
    to the terminal of whoever read the log. Escaped as the access log escapes it."""
    proc, base = serve(sqlite_url, tmp_path, "debugging", "--log-level", "debug")
    port = int(base.rpartition(":")[2])
    try:
        for data in (b"GET /a\nWARNING forged line HTTP/1.1\r\nHost: x\r\n\r\n",
                     b"GET /b\x1b[2J\x00 HTTP/1.1\r\nHost: x\r\n\r\n"):
            answers, _ = exchange(port, data)
            assert [a.status for a in answers] == [400], answers
        wait_until(lambda: proc.output().count('" 400 ') >= 2, timeout=5,
                   what="two debug lines")
    finally:
        proc.stop()
    output = proc.output()
    assert "\nWARNING forged line" not in output, output
    assert "\x1b" not in output and "\x00" not in output, output
    assert '"GET /a\\x0aWARNING forged line HTTP/1.1" 400 ' in output, output
    assert '"GET /b\\x1b[2J\\x00 HTTP/1.1" 400 ' in output, output
