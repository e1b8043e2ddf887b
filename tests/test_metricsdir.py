"""The metrics directories of supervisors that no longer run are removed, only those."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from cluster.metricsdir import make_metrics_dir, remove_orphans


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_the_directories_of_stopped_supervisors_go(tmp_path: Path) -> None:
    dead = tmp_path / f"cluster-metrics-{dead_pid()}-ab12_cd"
    alive = tmp_path / f"cluster-metrics-{os.getpid()}-xy34"
    old_style = tmp_path / "cluster-metrics-abc123"  # made before PIDs were in the name
    other = tmp_path / f"not-cluster-{dead_pid()}-x"
    a_file = tmp_path / f"cluster-metrics-{dead_pid()}-file"
    for directory in (dead, alive, old_style, other):
        directory.mkdir()
        (directory / "counter_1.db").write_bytes(b"x")
    a_file.write_text("not a directory")
    assert remove_orphans(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (alive, old_style, other, a_file))


def test_a_new_directory_carries_this_process_id(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    stale = tmp_path / f"cluster-metrics-{dead_pid()}-qq"
    stale.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    made = Path(make_metrics_dir())
    assert made.parent == tmp_path and made.name.startswith(f"cluster-metrics-{os.getpid()}-")
    assert not stale.exists()
