"""An unreadable embedded store: one warning per outage, one line when it ends, no
traceback, and the instance keeps serving from its last table throughout."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import requests

from helpers import start_instance, wait_until


def test_unreadable_sqlite_store_is_one_warning_and_one_recovery_line(tmp_path: Path):
    store = tmp_path / "discovery.sqlite3"
    aside = tmp_path / "aside"
    aside.mkdir()
    proc, port = start_instance(f"sqlite://{store}", "s0")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: "endpoint joined" in proc.output(), timeout=10)
        for round_ in range(2):  # two outages: one warning and one recovery line each
            # As root, chmod 000 does not stop sqlite: put a directory in the file's place
            # (first round), then a file that is not a database (second round).
            wait_until(store.exists, timeout=5)
            moved = []
            for name in os.listdir(tmp_path):
                if name.startswith(store.name):
                    shutil.move(str(tmp_path / name), str(aside / name))
                    moved.append(name)
            if round_ == 0:
                store.mkdir()
            else:
                store.write_bytes(b"this is not a database\n" * 100)
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:  # serving from the last table meanwhile
                response = requests.get(url + "/whoami", timeout=5)
                assert response.status_code == 200 and response.text == "s0"
                time.sleep(0.1)
            assert requests.get(url + "/_cluster/status", timeout=5).json()["store_failing"]
            if store.is_dir():
                store.rmdir()
            else:
                store.unlink()
            for name in moved:
                shutil.move(str(aside / name), str(tmp_path / name))
            wait_until(lambda n=round_: proc.output().count("works again") == n + 1,
                       timeout=10, what="the recovery line")
        logs = proc.output()
        assert logs.count("WARNING") == 2, logs
        assert logs.count("discovery store sqlite://") == 4, logs  # 2 warnings + 2 recoveries
        assert "Traceback" not in logs
        assert "endpoint left" not in logs, "the table survived the outage"
        assert requests.get(url + "/whoami", timeout=5).text == "s0"
        assert proc.poll() is None
    finally:
        proc.stop()


def test_a_store_refusing_the_credentials_is_one_line_per_event(mongo_server, mongo_url):
    """FerretDB refuses a URL's credentials with a message of two lines, which pymongo
    repeats in its ", full error: {...}": every warning about the store was three
    lines, the last two without time or level. Each stays one line, the password in
    none of them."""
    scheme, _, rest = mongo_url.partition("://")
    url = f"{scheme}://alice:Pa55word-xyz@{rest}"
    url += ("&" if "?" in url else "?") + "directConnection=true"
    proc, _port = start_instance(url, "s0")
    try:
        wait_until(lambda: "failed (" in proc.output(), timeout=15)
    finally:
        proc.stop()
    output = proc.output()
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")
    assert all(stamp.match(line) for line in output.splitlines()), output
    assert "full error" not in output and "Pa55word" not in output, output
    assert "could not remove web" in output, output
