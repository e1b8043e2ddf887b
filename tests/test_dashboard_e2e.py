"""The live dashboard in a real browser (headless Chromium, Debian's package) against a
three-instance cluster under steady traffic, and `cluster status --watch` beside it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests

from helpers import Proc, cluster_argv, wait_until
from test_observe_e2e import live_endpoints, serve

ROW = re.compile(r'<tr data-endpoint="([^"]+)" data-requests="(\d+)"')
#: where the screenshot is kept (printed by the test); CI may collect this directory
ARTIFACTS = Path(os.environ.get("CLUSTER_TEST_ARTIFACTS")
                 or Path(tempfile.gettempdir()) / "cluster-test-artifacts")


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "headless Chromium is needed: apt-get install chromium (scripts/run-tests does)"
    return found


def browse(profile: Path, *args: str) -> str:
    """Run headless Chromium once (stopped by PID if it hangs); its stdout."""
    argv = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            f"--user-data-dir={profile}", "--virtual-time-budget=3000", *args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}"
    return out.decode("utf-8", "replace")


@pytest.fixture
def three_under_traffic(sqlite_url, tmp_path):
    """Three instances; about 20 requests/s without cookies to the first (they spread)."""
    procs: list[Proc] = []
    stop = threading.Event()
    try:
        urls = []
        for n in range(3):
            proc, url = serve(sqlite_url, tmp_path, f"i{n}")
            procs.append(proc)
            urls.append(url)
        base = urls[0]
        wait_until(lambda: len(live_endpoints(base)) == 3, timeout=15, what="three endpoints")

        def traffic() -> None:
            while not stop.wait(0.05):
                try:
                    requests.get(base + "/whoami", timeout=5).close()
                except requests.RequestException:
                    pass

        sender = threading.Thread(target=traffic, daemon=True)
        sender.start()
        yield urls
        stop.set()
        sender.join(10)
    finally:
        stop.set()
        for proc in procs:
            proc.stop()
    for proc in procs:
        assert "Traceback" not in proc.output()


def test_dashboard_shows_the_endpoints_and_moving_counts(three_under_traffic, tmp_path):
    urls = three_under_traffic
    page = urls[0] + "/_cluster/"
    time.sleep(1.5)
    first = browse(tmp_path / "profile", "--dump-dom", page)
    time.sleep(3)
    second = browse(tmp_path / "profile", "--dump-dom", page)
    rows1, rows2 = dict(ROW.findall(first)), dict(ROW.findall(second))
    assert set(rows1) == set(rows2) == set(urls), (rows1, rows2)
    counts1 = {url: int(n) for url, n in rows1.items()}
    counts2 = {url: int(n) for url, n in rows2.items()}
    assert sum(counts2.values()) > sum(counts1.values()) > 0, (counts1, counts2)
    assert all(counts2[u] >= counts1[u] for u in urls)
    assert all(counts2[u] > 0 for u in urls), counts2  # traffic spread over all three
    # the page refreshed itself from the JSON twin (not only its inlined first status)
    assert int(re.search(r'data-fetches="(\d+)"', second)[1]) >= 1
    assert "this instance" in second and ">live<" in second

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    browse(tmp_path / "profile", "--hide-scrollbars", "--window-size=1280,720",
           f"--screenshot={shot}", page)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    print(f"dashboard screenshot: {shot}")


def test_status_watch_redraws_with_rates_until_ctrl_c(three_under_traffic, sqlite_url,
                                                      dead_port):
    urls = three_under_traffic
    dead = f"http://127.0.0.1:{dead_port}"  # a record whose status page cannot answer
    sidecar = Proc(cluster_argv("register", "--service", "web", "--endpoint-url", dead,
                                "--ping-interval", "1"),
                   env={"CLUSTER_DISCOVERY_URL": sqlite_url}, name="sc-dead")
    watch = None
    try:
        wait_until(lambda: len(live_endpoints(urls[0])) == 4, timeout=15, what="the record")
        time.sleep(2)  # rates cover a few seconds of traffic
        watch = Proc(cluster_argv("status", "--watch", "--expiry-grace", "1"),
                     env={"CLUSTER_DISCOVERY_URL": sqlite_url}, name="watch")
        wait_until(lambda: watch.output().count("\x1b[H\x1b[2J") >= 3, timeout=20,
                   what="three redraws")
        watch.signal(signal.SIGINT)
        assert watch.wait(10) == 0
        output = watch.output()
    finally:
        if watch is not None:
            watch.stop()
        sidecar.stop()
    last = output.split("\x1b[H\x1b[2J")[-1]
    assert "REQ/S" in last and "ERRORS" in last and "Traceback" not in output
    assert "KeyboardInterrupt" not in output  # gevent's hub printed it on Ctrl-C
    rows = {line.split()[1]: line.split() for line in last.splitlines()
            if line.startswith("web ")}
    assert set(rows) == {*urls, dead}
    assert rows[dead][-2:] == ["-", "-"]
    rates = [float(rows[url][-2]) for url in urls]
    assert sum(rates) > 0, last
