"""cluster's own log lines in a gunicorn worker go through gunicorn's error log.

They had no handler there: the info lines (registered, deregistered, endpoint joined)
were lost, and the warnings came out bare, without time, pid or level.
"""

from __future__ import annotations

import re
import signal

from helpers import gunicorn_port, wait_until
from test_gunicorn_e2e import gunicorn, live

#: gunicorn's error log format: ``[time] [pid] [LEVEL] message``
LINE = r"^\[[^]]+\] \[\d+\] \[{level}\] {message}"


def registered_and_stopped(tmp_path, discovery: str, *args: str) -> str:
    """gunicorn's output from a start (two workers registered) to a SIGTERM stop."""
    proc = gunicorn(tmp_path, discovery, *args)
    try:
        gunicorn_port(proc)
        wait_until(lambda: len(live(discovery)) == 2, timeout=20, what="two records")
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        proc.stop()
    return proc.output()


def test_cluster_lines_take_gunicorns_format_and_level(tmp_path):
    discovery = f"sqlite://{tmp_path / 'discovery.sqlite3'}"
    output = registered_and_stopped(tmp_path, discovery)
    for message in ("registered web at http://127.0.0.1:", "deregistered web at "):
        found = re.findall(LINE.format(level="INFO", message=re.escape(message)), output,
                           re.MULTILINE)
        assert len(found) == 2, output  # one per worker

    quiet = gunicorn(tmp_path, discovery, "--log-level", "warning")
    try:  # (no "Listening at" line to wait for at this level)
        wait_until(lambda: len(live(discovery)) == 2, timeout=20, what="two records")
    finally:
        quiet.stop()
    assert "registered web at" not in quiet.output()
    assert "[INFO]" not in quiet.output()


def test_a_level_the_users_log_config_gives_cluster_holds(tmp_path):
    """A logging config that only sets levels (no handlers of its own: gunicorn's
    error log prints) and quiets cluster to warnings: the worker reset cluster's level
    to gunicorn's --log-level, and every info line came back."""
    import json

    config = tmp_path / "logging.json"
    config.write_text(json.dumps({
        "version": 1, "disable_existing_loggers": False,
        "root": {"level": "INFO", "handlers": []},
        "loggers": {"cluster": {"level": "WARNING"}}}))
    discovery = f"sqlite://{tmp_path / 'discovery.sqlite3'}"
    output = registered_and_stopped(tmp_path, discovery, "--log-config-json", str(config))
    assert "Booting worker" in output, output  # gunicorn's own lines still print
    assert "registered web at" not in output and "deregistered web" not in output, output
