"""The README's first command, exactly as written, on a fresh checkout with Debian's own
Python (/usr/bin/python3, where PEP 668 refuses `pip install .`): it makes a virtualenv,
installs the checkout, and brings the demo up with its dashboard URL."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import requests

from helpers import ROOT, wait_until
from test_startup_e2e import consecutive_free_ports

SYSTEM_PYTHON = Path("/usr/bin/python3")
#: a PATH on which python3 is the system's (no virtualenv, no /usr/local)
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def readme_first_command() -> str:
    readme = (ROOT / "README.md").read_text()
    quick = readme[readme.index("## Quick start"):]
    block = quick[quick.index("```sh\n") + 6:]
    return block.splitlines()[0].split("#")[0].strip()


def fresh_checkout(target: Path) -> None:
    """The files of this checkout that git knows (committed or not), as a clone has them."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for name in listed:
        source = ROOT / name
        if "node_modules" in name or not source.is_file():
            continue
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target / name)


def test_readme_quick_start_runs_the_demo_with_debian_python(tmp_path):
    assert SYSTEM_PYTHON.exists(), "Debian's python3 is expected at /usr/bin/python3"
    command = readme_first_command()
    assert command == "scripts/quickstart"
    checkout = tmp_path / "cluster"
    fresh_checkout(checkout)
    port = consecutive_free_ports(3)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CLUSTER_", "PYTHON", "VIRTUAL_ENV", "PIP_"))}
    env.update(PATH=SYSTEM_PATH, CLUSTER_BIND=f"127.0.0.1:{port}",
               XDG_STATE_HOME=str(tmp_path / "state"))
    log = tmp_path / "quickstart.log"
    with open(log, "wb") as out:
        # Not helpers.Proc: that puts this worktree on PYTHONPATH, and the demo must run
        # from what the script installed.
        demo = subprocess.Popen([str(checkout / command)], cwd=checkout, env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    print(f"quick start output: {log}")
    try:
        url = f"http://127.0.0.1:{port}/_cluster/"
        wait_until(lambda: f"dashboard: {url}" in log.read_text() or demo.poll() is not None,
                   timeout=600, interval=0.5, what="the dashboard URL")
        output = log.read_text()
        assert demo.poll() is None, output
        assert re.search(r"making a virtualenv in \.venv with /usr/bin/python3", output), output
        page = requests.get(url, timeout=10)
        assert page.status_code == 200 and "cluster dashboard" in page.text
        installed = checkout / ".venv" / "bin" / "cluster"
        assert installed.exists()
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGTERM)  # the script exec'd the demo: same PID
        try:
            demo.wait(30)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait(5)
    assert demo.returncode == 0, log.read_text()
    for n in range(3):  # the demo stopped its three instances
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port + n), timeout=2).close()
