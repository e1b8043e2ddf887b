"""The ways to drain: `cluster drain --pid-file` of a `cluster serve --workers-count 2` (the
supervisor passes SIGUSR2 on to each worker, both records say draining, then both leave
and the supervisor exits 0), `cluster drain --url` (POST /_cluster/drain), and what
`cluster status` and the status page show."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import ROOT, cluster_argv, start_serve, status_json, wait_until

TIMEOUT = 15


@pytest.mark.timeout(40)
@pytest.mark.parametrize("how", ["--pid-file", "--url"])
def test_drain_of_a_supervisor_drains_every_worker(sqlite_url: str, tmp_path: Path,
                                                   how: str) -> None:
    """By the supervisor's PID, or by POST to the shared port: a POST lands on one
    worker, which passes it to the supervisor (drained alone, it would be restarted)."""
    pid_file = tmp_path / "web.pid"
    parent, port = start_serve("--service", "web", "--app", "gws_echo:app", "--workers-count", "2",
                            "--ping-interval", "1", "--expiry-grace", "1",
                            "--drain-seconds", "1.5", "--drain-close-seconds", "0.2",
                            "--pid-file", str(pid_file),
                            env={"CLUSTER_DISCOVERY_URL": sqlite_url}, name="supervisor")
    try:
        wait_until(lambda: len(status_json(sqlite_url)["endpoints"]) == 2, timeout=TIMEOUT,
                   what="both workers to register")
        assert pid_file.read_text().strip() == str(parent.pid)
        target = str(pid_file) if how == "--pid-file" else f"http://127.0.0.1:{port}"
        drain = subprocess.Popen(cluster_argv("drain", how, target, "--wait"),
                                 cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                "CLUSTER_DISCOVERY_URL": sqlite_url},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_until(lambda: [r["draining"] for r in status_json(sqlite_url)["endpoints"]]
                       == [True, True], timeout=TIMEOUT,
                       what="both workers' records to say draining")
            out, _ = drain.communicate(timeout=TIMEOUT)
        finally:
            if drain.poll() is None:
                drain.kill()
                drain.wait()
        assert drain.returncode == 0, out
        assert parent.wait(TIMEOUT) == 0
        assert status_json(sqlite_url)["endpoints"] == []
        assert not pid_file.exists()  # removed by the supervisor on its way out
        output = parent.output()
        assert output.count("draining (SIGUSR2)") == 2, output
        assert "every worker has drained and stopped" in output
        assert "restarting" not in output, output
    finally:
        parent.stop()
    assert "Traceback" not in parent.output(), parent.output()


@pytest.mark.timeout(40)
def test_drain_over_http_and_the_status_page(sqlite_url: str) -> None:
    import requests

    proc, port = start_serve("--service", "web", "--app", "gws_echo:app", "--ping-interval", "1",
                             "--expiry-grace", "1", "--drain-seconds", "1", "--app-version",
                             "2.0", env={"CLUSTER_DISCOVERY_URL": sqlite_url}, name="web")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: status_json(sqlite_url)["endpoints"], timeout=TIMEOUT,
                   what="the instance to register")
        assert requests.get(f"{base}/_cluster/drain", timeout=5).status_code == 405
        before = requests.get(f"{base}/_cluster/status", timeout=5).json()
        assert before["version"] == "2.0" and before["draining"] is False
        drain = subprocess.run(cluster_argv("drain", "--url", base, "--wait"), cwd=ROOT,
                               env={"PYTHONPATH": str(ROOT), "CLUSTER_DISCOVERY_URL": sqlite_url},
                               capture_output=True, text=True, timeout=TIMEOUT)
        assert drain.returncode == 0, drain.stdout + drain.stderr
        assert f"{base} is draining" in drain.stdout and "has left the table" in drain.stdout
        assert proc.wait(TIMEOUT) == 0
        assert "draining (POST /_cluster/drain)" in proc.output()
    finally:
        proc.stop()


def test_status_table_shows_version_and_draining() -> None:
    from cluster.cli import table_lines

    row = {"service": "web", "endpoint": "http://10.0.0.1:1", "hash": "ab" * 20,
           "balancer": None, "age": 0.5, "healthy": True, "draining": True, "version": "1.3"}
    lines = table_lines({"store": "x", "endpoints": [row, {**row, "draining": False,
                                                           "version": ""}],
                         "balancers": [], "malformed": []})
    assert lines[1].split() == ["SERVICE", "ENDPOINT", "HASH", "VERSION", "BALANCER",
                                "HEARTBEAT", "STATE", "LOAD"]
    # columns: ..., HEARTBEAT ("0.5s ago": two words), STATE, LOAD ("-": none published)
    assert lines[2].split()[3] == "1.3" and lines[2].split()[-2:] == ["draining", "-"]
    assert lines[3].split()[3] == "-" and lines[3].split()[-2:] == ["live", "-"]


@pytest.mark.timeout(40)
def test_drain_url_of_an_app_that_answers_200_is_an_error_not_a_drain(sqlite_url: str) -> None:
    """Where the admin pages are closed to the caller the app answers the POST: a 200
    that is not the drain page must not be reported as a drain (it was, then a
    JSONDecodeError traceback followed)."""
    proc, port = start_serve("--service", "web", "--app", "library_app:hello",
                             "--trusted-proxies", "192.0.2.1",
                             env={"CLUSTER_DISCOVERY_URL": sqlite_url}, name="closed")
    try:
        drain = subprocess.run(cluster_argv("drain", "--url", f"http://127.0.0.1:{port}"),
                               cwd=ROOT, env={"PYTHONPATH": str(ROOT),
                                              "CLUSTER_DISCOVERY_URL": sqlite_url},
                               capture_output=True, text=True, timeout=TIMEOUT)
        assert drain.returncode != 0 and drain.stdout == "", drain.stdout
        (line,) = drain.stderr.strip().splitlines()
        assert "not a cluster instance's drain page" in line and "--admin-token" in line
        assert proc.poll() is None
    finally:
        proc.stop()


@pytest.mark.parametrize("pid", ["0", "-1"])
def test_drain_pid_must_be_a_process_id(pid: str) -> None:
    """kill(0) signals the caller's process group and kill(-1) every process: run in a
    session of its own, so a regression could only hit the command itself."""
    drain = subprocess.run(cluster_argv("drain", "--pid", pid), cwd=ROOT,
                           env={"PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                           timeout=TIMEOUT, start_new_session=True)
    assert drain.returncode == 2, drain.stdout + drain.stderr
    assert drain.stderr.strip().splitlines() == [
        f"cluster drain: error: --pid: {pid} is not a process ID"], drain.stderr


@pytest.mark.timeout(40)
def test_drain_over_http_answers_at_once_while_the_store_is_stuck(sqlite_url: str) -> None:
    """The record is marked in the background: a store that cannot take the write (here
    the SQLite file locked by another writer) must not hold up the answer, which the
    CLI would take for a failure while the drain goes on (it did, after 5 s)."""
    import sqlite3
    import time

    import requests

    proc, port = start_serve("--service", "web", "--app", "gws_echo:app", "--ping-interval", "1",
                             "--expiry-grace", "1", "--drain-seconds", "30",
                             env={"CLUSTER_DISCOVERY_URL": sqlite_url}, name="stuck")
    base = f"http://127.0.0.1:{port}"
    locker = sqlite3.connect(sqlite_url.removeprefix("sqlite://"), isolation_level=None)
    try:
        wait_until(lambda: status_json(sqlite_url)["endpoints"], timeout=TIMEOUT,
                   what="the instance to register")
        locker.execute("BEGIN EXCLUSIVE")  # every other writer now waits
        started = time.monotonic()
        answer = requests.post(f"{base}/_cluster/drain", timeout=10)
        took = time.monotonic() - started
        assert answer.status_code == 202 and answer.json()["draining"] is True
        assert took < 2.0, f"the drain answer took {took:.1f}s"  # the store waits 5 s
        locker.execute("COMMIT")
        wait_until(lambda: status_json(sqlite_url)["endpoints"][0]["draining"],
                   timeout=TIMEOUT, what="the record to say draining once the store can")
    finally:
        locker.close()
        proc.stop()
    assert "Traceback" not in proc.output()


@pytest.mark.parametrize("how", ["--pid", "--pid-file"])
def test_drain_refuses_a_pid_that_is_another_program(tmp_path: Path, how: str) -> None:
    """SIGUSR2's default action ends a process: a stale pid file (its PID reused since by
    another program) or a mistyped --pid made `cluster drain` kill that program."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        pid_file = tmp_path / "web.pid"
        pid_file.write_text(f"{other.pid}\n")
        target = [how, str(other.pid) if how == "--pid" else str(pid_file)]
        drain = subprocess.run(cluster_argv("drain", *target), cwd=ROOT,
                               env={"PYTHONPATH": str(ROOT)}, capture_output=True,
                               text=True, timeout=TIMEOUT)
        assert drain.returncode == 2, drain.stdout + drain.stderr
        (line,) = drain.stderr.strip().splitlines()
        assert f"process {other.pid} ('sleep 60') is not a cluster instance" in line
        assert other.poll() is None, "the other program was signalled"
    finally:
        other.kill()
        other.wait(5)


@pytest.mark.timeout(40)
def test_drain_reaches_an_instance_run_under_a_name_of_its_own(sqlite_url: str) -> None:
    """An instance whose command line does not say cluster (a symlink to
    cluster-instance, or a script of one's own that calls cluster.entry.main, run by
    the venv's Python) is a cluster instance all the same: it was refused as "another
    program". It handles SIGUSR2, which /proc tells."""
    import os
    import sys
    import tempfile

    from helpers import Proc, read_port_file

    folder = Path(tempfile.mkdtemp(prefix="srv-"))
    script, port_file, pid_file = folder / "web", folder / "port", folder / "web.pid"
    script.symlink_to(ROOT / "scripts" / "cluster-instance")
    proc = Proc([sys.executable, str(script), "--service", "web", "--app", "gws_echo:app",
                 "--bind", "127.0.0.1:0", "--port-file", str(port_file), "--pid-file",
                 str(pid_file), "--ping-interval", "1", "--expiry-grace", "1",
                 "--drain-seconds", "0.5", "--drain-close-seconds", "0.1"],
                env={"CLUSTER_DISCOVERY_URL": sqlite_url}, name="web")
    try:
        read_port_file(port_file, proc)
        wait_until(lambda: status_json(sqlite_url)["endpoints"], timeout=TIMEOUT,
                   what="the instance to register")
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert b"cluster" not in cmdline, cmdline  # what the test is about
        drain = subprocess.run(cluster_argv("drain", "--pid-file", str(pid_file), "--wait"),
                               cwd=ROOT, env={"PYTHONPATH": str(ROOT)},
                               capture_output=True, text=True, timeout=TIMEOUT)
        assert drain.returncode == 0, drain.stdout + drain.stderr
        assert proc.wait(TIMEOUT) == 0
        assert "draining (SIGUSR2)" in proc.output(), proc.output()
    finally:
        proc.stop()
        for path in (pid_file, port_file, script):
            path.unlink(missing_ok=True)
        os.rmdir(folder)


def test_drain_refuses_a_process_that_would_die_of_sigusr2() -> None:
    """/proc/PID/status says whether SIGUSR2 is caught, ignored or blocked; a process
    that does none of these (any program, or a cluster instance still starting) dies
    of it, so nothing is sent."""
    from cluster.cli import _handles_usr2

    def status(caught: str, ignored: str = "0", blocked: str = "0") -> str:
        return (f"Name:\tx\nSigPnd:\t0000000000000000\nSigBlk:\t{blocked:0>16}\n"
                f"SigIgn:\t{ignored:0>16}\nSigCgt:\t{caught:0>16}\n")

    assert _handles_usr2(status("802"))  # gevent's handlers of SIGINT and SIGUSR2
    assert _handles_usr2(status("0", ignored="800"))
    assert _handles_usr2(status("0", blocked="800"))
    assert not _handles_usr2(status("2"))  # SIGINT alone
    assert not _handles_usr2(status("0"))
    assert _handles_usr2("Name:\tx\n")  # /proc without the fields: kill() decides


@pytest.mark.timeout(60)
def test_drain_refuses_gunicorn(sqlite_url: str, tmp_path: Path) -> None:
    """gunicorn with cluster.gunicorn has no drain (README), but its command line names
    cluster: `cluster drain --pid` sent the arbiter SIGUSR2, its binary upgrade, and a
    second arbiter started on the same port."""
    import time

    from helpers import gunicorn_port
    from test_gunicorn_e2e import gunicorn

    proc = gunicorn(tmp_path, sqlite_url)
    try:
        gunicorn_port(proc)
        drain = subprocess.run(cluster_argv("drain", "--pid", str(proc.pid)), cwd=ROOT,
                               env={"PYTHONPATH": str(ROOT)}, capture_output=True,
                               text=True, timeout=TIMEOUT)
        assert drain.returncode == 2, drain.stdout + drain.stderr
        (line,) = drain.stderr.strip().splitlines()
        assert f"process {proc.pid} (" in line and "is gunicorn" in line, line
        time.sleep(1.0)
        assert proc.poll() is None
    finally:
        proc.stop()
    assert "usr2" not in proc.output().lower(), proc.output()
