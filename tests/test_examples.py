"""The worked examples under examples/, run as their READMEs say: from their folder.

They are started with the installed ``cluster`` console script (whose ``sys.path[0]``
is its bin folder, not the current one), so they also show that ``--app mod:app``
imports ``mod`` from the folder cluster is started in, as gunicorn does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests
import socketio
import websocket

from helpers import ROOT, Proc, read_port_file, status_json, wait_until

EXAMPLES = ROOT / "examples"
CLUSTER = Path(sys.executable).with_name("cluster")


def serve(folder: Path, discovery_url: str, *args: str,
          cwd: Path | None = None) -> tuple[Proc, str]:
    """``cluster serve ARGS`` from ``folder`` on a port the OS picks: (process, URL)."""
    assert CLUSTER.exists(), f"the cluster console script is not installed beside {sys.executable}"
    with tempfile.TemporaryDirectory(prefix="cluster-port-") as folder_of_port:
        port_file = Path(folder_of_port) / "port"
        proc = Proc([str(CLUSTER), "serve", *args, "--bind", "127.0.0.1:0",
                     "--port-file", str(port_file), "--ping-interval", "1",
                     "--expiry-grace", "1"],
                    env={"CLUSTER_DISCOVERY_URL": discovery_url, "PYTHONPATH": str(ROOT)},
                    cwd=cwd or folder, name=folder.name)
        try:
            port = read_port_file(port_file, proc, timeout=30)
        except BaseException:
            proc.stop()
            raise
    return proc, f"http://127.0.0.1:{port}"


def clean(*procs: Proc) -> None:
    for proc in procs:
        proc.stop()
    for proc in procs:
        assert "Traceback" not in proc.output(), proc.output()[-3000:]


def test_flask_socketio_chat_broadcasts_what_one_says(sqlite_url):
    proc, url = serve(EXAMPLES / "flask_socketio_chat", sqlite_url,
                      "--service", "chat", "--app", "app:app")
    alice, bob = socketio.Client(reconnection=False), socketio.Client(reconnection=False)
    heard: list[str] = []
    bob.on("said", lambda message: heard.append(message["text"]))
    try:
        assert "cluster chat" in requests.get(url + "/", timeout=5).text
        alice.connect(url, wait_timeout=10)
        bob.connect(url, wait_timeout=10)
        assert alice.call("say", "hello bob", timeout=10) == "ok"
        wait_until(lambda: heard == ["hello bob"], timeout=10, what="bob hears alice")
    finally:
        alice.disconnect()
        bob.disconnect()
        clean(proc)


def test_python_socketio_sessions_stay_in_one_worker(sqlite_url):
    folder = EXAMPLES / "python_socketio"
    proc, url = serve(folder, sqlite_url, "--service", "echo", "--app", "app:app",
                      "--workers-count", "2")
    try:
        wait_until(lambda: len(status_json(sqlite_url)["endpoints"]) == 2, timeout=15,
                   what="both workers registered")
        for _ in range(3):
            done = subprocess.run([sys.executable, "client.py", url, "20"], cwd=str(folder),
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            result = json.loads(done.stdout)
            assert len(result["pids"]) == 1 and result["echoes"] == 20, result
            assert result["transport"] == "websocket", result
    finally:
        clean(proc)


def test_gevent_websocket_echo(sqlite_url):
    proc, url = serve(EXAMPLES / "gevent_websocket", sqlite_url, "--service", "ws",
                      "--app", "app:app")
    try:
        ws = websocket.create_connection(url.replace("http", "ws") + "/echo", timeout=10)
        try:
            assert ws.recv().startswith("hello from pid ")
            for text in ("one", "two", "ü" * 1000):
                ws.send(text)
                assert ws.recv() == text
        finally:
            ws.close()
    finally:
        clean(proc)


def test_flask_app_calls_another_service_through_discover(sqlite_url):
    folder = EXAMPLES / "discover"
    api, api_url = serve(folder, sqlite_url, "--service", "api", "--app", "api:app")
    procs = [api]
    try:  # a failed start of web still stops api
        web, web_url = serve(folder, sqlite_url, "--service", "web", "--app", "web:app")
        procs.append(web)
        wait_until(lambda: len(status_json(sqlite_url)["endpoints"]) == 2, timeout=15,
                   what="api and web registered")
        page = requests.get(web_url + "/", timeout=10).json()
        assert page["status"] == 200
        assert page["api"]["items"] == ["apple", "pear", "plum"]
        assert page["api"]["served_by"] == api.pid
        api.stop()
        wait_until(lambda: requests.get(web_url + "/", timeout=10).status_code == 503,
                   timeout=15, what="a clean 503 once api is gone")
    finally:
        clean(*procs)


def test_chdir_and_pythonpath_find_the_app_elsewhere(sqlite_url, tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "greeting.py").write_text("TEXT = b'hello from lib'\n")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "hello.py").write_text(
        "from greeting import TEXT\n\n\ndef app(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Length', str(len(TEXT)))])\n"
        "    return [TEXT]\n")
    proc, url = serve(tmp_path, sqlite_url, "--service", "web", "--app", "hello:app",
                      "--chdir", "site", "--pythonpath", "lib", cwd=tmp_path)
    try:
        assert requests.get(url + "/", timeout=5).text == "hello from lib"
    finally:
        clean(proc)


def test_a_missing_chdir_is_one_line_and_status_2(tmp_path):
    done = subprocess.run([str(CLUSTER), "serve", "--app", "x:app", "--chdir",
                           str(tmp_path / "nowhere")], capture_output=True, text=True,
                          timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--chdir" in done.stderr, done.stderr


@pytest.mark.parametrize("folder", sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir()))
def test_every_example_has_a_readme_that_names_its_command(folder):
    text = (EXAMPLES / folder / "README.md").read_text()
    assert "cluster serve" in text and "```sh" in text
