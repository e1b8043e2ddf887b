"""The temp directory that worker processes share for prometheus_client's counters.

A supervisor (``--workers-count``, or gunicorn's arbiter) makes one at start and removes
it when it stops. One that is killed (SIGKILL, an OOM kill, a power cut of its container)
cannot, and each such stop left a directory of about 0.5 MB in /tmp for good. The name
now carries the supervisor's PID, so the next supervisor to start removes the
directories of supervisors no longer running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "cluster-metrics-"
#: cluster-metrics-<pid>-<mkdtemp's random part>
_OWNED = re.compile(re.escape(PREFIX) + r"(\d+)-[A-Za-z0-9_]+")


def make_metrics_dir() -> str:
    """A new directory of this process, after removing those of dead supervisors."""
    parent = Path(tempfile.gettempdir())
    remove_orphans(parent)
    return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent)


def remove_orphans(parent: Path) -> int:
    """Remove this user's metrics directories whose supervisor no longer runs; the count.

    A PID that runs again (reused) keeps its directory: left, never wrongly removed."""
    removed = 0
    uid = os.getuid()
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            match = _OWNED.fullmatch(entry.name)
            if match is None or not _mine(entry, uid) or _running(int(match.group(1))):
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += not os.path.exists(entry.path)
    if removed:
        log.debug("removed %d metrics directories of stopped supervisors", removed)
    return removed


def _mine(entry: os.DirEntry[str], uid: int) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False) and entry.stat(
            follow_symlinks=False).st_uid == uid
    except OSError:
        return False


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or a name we cannot read as a PID
    return True
