"""`pip install 'cluster[gunicorn]'` alone is enough for the README's gunicorn command.

A fresh virtualenv gets this checkout with the gunicorn extra (from PyPI: gevent,
pymongo, gunicorn...; about 30-60 s, once), then the README's command runs an app
from the current folder and answers through cluster. The checkout is not on the
path: what runs is what was installed.
"""

from __future__ import annotations

import subprocess
import venv

import pytest
import requests

from helpers import ROOT, Proc, gunicorn_port, wait_until

APP = '''
def application(environ, start_response):
    body = b"hello from a fresh install"
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''


@pytest.mark.soak  # 16 s to 60 s of pip; CI runs every test against the gunicorn extra installed
@pytest.mark.timeout(300)
def test_the_gunicorn_extra_runs_the_readme_command_in_a_fresh_virtualenv(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    install = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "--quiet",
         "--disable-pip-version-check", f"{ROOT}[gunicorn]"],
        capture_output=True, text=True, timeout=240, cwd=str(tmp_path),
    )
    assert install.returncode == 0, install.stdout + install.stderr
    app_dir = tmp_path / "myproject"
    app_dir.mkdir()
    (app_dir / "wsgi.py").write_text(APP)
    (app_dir / "__init__.py").write_text("")

    # The README's command, on a port the OS picks (gunicorn logs it) and two workers.
    env = {"CLUSTER_SERVICE": "web",
           "CLUSTER_DISCOVERY_URL": f"sqlite://{tmp_path / 'discovery.sqlite3'}",
           "PYTHONPATH": "", "PATH": f"{bin_dir}:/usr/bin:/bin"}
    proc = Proc([str(bin_dir / "gunicorn"), "-c", "python:cluster.gunicorn", "-w", "2",
                 "-b", "127.0.0.1:0", "--control-socket", str(tmp_path / "g.ctl"),
                 "myproject.wsgi:application"], env=env, cwd=tmp_path, name="fresh-gunicorn")
    try:
        port = gunicorn_port(proc, timeout=30)
        response = wait_until(lambda: _get(port), timeout=15, what="a 200")
        assert response.text == "hello from a fresh install"
        assert "cluster-endpoint::web" in response.headers.get("Set-Cookie", "")
        where = subprocess.run([str(bin_dir / "python"), "-c",
                                "import cluster; print(cluster.__file__)"],
                               capture_output=True, text=True, env=env, cwd=str(tmp_path))
        assert where.stdout.startswith(str(env_dir)), where.stdout + where.stderr
    finally:
        proc.stop()
    assert "Traceback" not in proc.output(), proc.output()


def _get(port: int) -> requests.Response | None:
    response = requests.get(f"http://127.0.0.1:{port}/", timeout=5)
    return response if response.status_code == 200 else None
