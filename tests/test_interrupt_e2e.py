"""Ctrl-C while a command is still starting ends it quietly, as Ctrl-C later does.

A new user's typical Ctrl-C lands in the first fraction of a second, while gevent is
being imported and patched: that printed a KeyboardInterrupt traceback (and `cluster
demo`, whose instances got the same Ctrl-C, blamed them: "an instance exited at
start"). The signal is sent at a point the process has really reached, read from
/proc/PID/maps (a shared library that loads at that point), not after a guessed delay.
Ctrl-C comes from a terminal with SIGINT at its default disposition, so the children
are started that way (a shell's background job would inherit it ignored).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, TESTS
from test_startup_e2e import consecutive_free_ports

#: a stop by Ctrl-C: 130 (the command's own), 0 (stopped as after start-up), or killed
#: by SIGINT without a word (a signal that came before Python could handle it)
QUIET_STOPS = (0, 130, -signal.SIGINT)


def _start(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    def as_a_terminal_starts_it() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.setpgrp()  # Ctrl-C reaches the whole foreground process group

    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS / "apps")]),
                **env}
    return subprocess.Popen(argv, cwd=str(cwd), env=full_env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=as_a_terminal_starts_it)


def _wait_for_library(pid: int, name: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if name in Path(f"/proc/{pid}/maps").read_text():
                return
        except OSError:
            return  # exited already: its output says why
        time.sleep(0.001)
    raise AssertionError(f"{name} was never loaded by {pid}")


def _children(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []


def _group(pgid: int) -> list[str]:
    """The live processes of process group ``pgid`` (read from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[2] == str(pgid) and fields[0] != "Z":  # field 5 of stat: the group
            found.append(stat.parent.name)
    return found


def _ctrl_c(proc: subprocess.Popen[bytes]) -> str:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return out.decode(errors="replace")


@pytest.mark.parametrize("library", ["greenlet", "_ssl", "_hashlib"])
@pytest.mark.parametrize("command", ["python -m cluster", "scripts/cluster-instance"])
def test_ctrl_c_while_serve_starts_prints_no_traceback(tmp_path, command, library):
    # greenlet loads as gevent is imported, _ssl as monkey.patch_all() patches ssl,
    # _hashlib later still (while cluster's own modules are imported)
    argv = ([sys.executable, "-m", "cluster", "serve"] if command == "python -m cluster"
            else [sys.executable, str(ROOT / "scripts" / "cluster-instance")])
    proc = _start([*argv, "--service", "web", "--app", "backend:app", "--bind",
                   "127.0.0.1:0", "--discovery-url", f"sqlite://{tmp_path / 'd.sqlite3'}"],
                  env={}, cwd=tmp_path)
    _wait_for_library(proc.pid, library)
    output = _ctrl_c(proc)
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert proc.returncode in QUIET_STOPS, (proc.returncode, output)


def test_ctrl_c_while_the_demo_starts_stops_it_quietly(tmp_path):
    port = consecutive_free_ports(3)
    proc = _start([sys.executable, "-m", "cluster", "demo", "--bind", f"127.0.0.1:{port}"],
                  env={"XDG_STATE_HOME": str(tmp_path / "state")}, cwd=tmp_path)
    # the instances are importing gevent: Ctrl-C reaches them and the runner at once
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        children = _children(proc.pid)
        if len(children) == 3:
            break
        time.sleep(0.005)
    assert len(children) == 3, children
    for child in children:  # each past Python's own start-up (a Ctrl-C there is Python's)
        _wait_for_library(int(child), "greenlet")
    output = _ctrl_c(proc)
    time.sleep(0.5)  # the runner waited for its children; nothing of the group is left
    left = _group(proc.pid)
    for pid in left:
        os.kill(int(pid), signal.SIGKILL)
    assert not left, left
    assert "Traceback" not in output and "exited at start" not in output, output
    assert proc.returncode in QUIET_STOPS, (proc.returncode, output)
