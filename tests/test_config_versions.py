"""The drain and version settings: parsing, defaults, one-line errors."""

from __future__ import annotations

import pytest

from cluster.config import Settings, to_environment
from cluster.errors import ConfigError
from test_config import run_cluster


def test_version_weights_parse_and_go_through_the_environment():
    s = Settings.load(["--version-weights", "1.2.0=90, 1.3.0=10", "--version-order",
                       "1.2.0,1.3.0"])
    assert s.version_weights == (("1.2.0", 90.0), ("1.3.0", 10.0))
    assert s.version_order == ("1.2.0", "1.3.0")
    again = Settings.load(env=to_environment(s))
    assert again.version_weights == s.version_weights and again.version_order == s.version_order


def test_app_version_defaults_to_app_version_from_the_environment(monkeypatch):
    monkeypatch.setenv("APP_VERSION", "2.0.1")
    assert Settings.load().own_app_version == "2.0.1"
    assert Settings.load(["--app-version", "2.1"]).own_app_version == "2.1"
    monkeypatch.setenv("APP_VERSION", "not a version")
    assert Settings.load().own_app_version == ""
    monkeypatch.delenv("APP_VERSION")
    assert Settings.load().own_app_version == ""


@pytest.mark.parametrize("args, problem", [
    (["--version-weights", "1.2.0"], "VERSION=WEIGHT"),
    (["--version-weights", "1.2.0=x"], "not a number"),
    (["--version-weights", "1.2.0=-1"], "0 or more"),
    (["--version-weights", "1.2.0=0"], "every weight is 0"),
    (["--version-weights", "1=1,1=2"], "twice"),
    (["--app-version", "1 2"], "1-64"),
    (["--drain-seconds", "-1"], "negative"),
])
def test_bad_values_are_one_line_errors(args, problem):
    with pytest.raises(ConfigError, match=problem):
        Settings.load(args)


def test_cluster_drain_without_a_target_is_one_line_exit_2():
    result = run_cluster("drain")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "cluster drain: error: --pid-file (CLUSTER_PID_FILE): say which instance to drain: "
        "--pid, --pid-file or --url"]


def test_cluster_drain_of_a_missing_process_is_one_line_exit_2(tmp_path):
    pid_file = tmp_path / "gone.pid"
    pid_file.write_text("999999999\n")
    result = run_cluster("drain", "--pid-file", str(pid_file))
    assert result.returncode == 2 and "no process 999999999" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
