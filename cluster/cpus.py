"""How much CPU this process may use: the host's cores, or fewer under a CPU quota.

A container's ``--cpus`` or a Kubernetes CPU limit is a CFS quota on its cgroup, which
``os.cpu_count()`` does not see: it counts the host's cores. The settings that scale
with cores (``--busy-poll auto``, ``--workers-count auto``) would then plan for a host
the process cannot use. For polling: every microsecond spent polling is charged to the
quota, and a cgroup that has spent it is throttled (stopped) for the rest of each
100 ms period with requests waiting. Polling only pays on a core that is otherwise
idle, which a quota of a core or less never promises; in two runs at half a core
(bench/busy_poll_quota.py, docs/benchmarks.md) the polling balancer spent longer
throttled and its p99 was no better. ``auto`` keeps its rule (poll only with a core
to spare), counted in the quota's cores.

The quota is read the way the Go runtime and the JVM read it: the cgroup of this
process (``/proc/self/cgroup``), found under the cgroup mounts (``/proc/self/mountinfo``),
v2 (``cpu.max``) or v1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), and the tightest
limit of that cgroup and every parent up to the mount. Anything unreadable counts as no
limit. CPU affinity (``taskset``, a cpuset) is not counted: it decides where the
process runs, not how much, and a core it shares with another process is
:mod:`cluster.busypoll`'s own concern.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple


class CpuLimit(NamedTuple):
    """A CPU quota: ``cores`` worth of CPU time (0.5: half of one core), set in
    ``where`` (a cgroup directory)."""

    cores: float
    where: str


class _Mount(NamedTuple):
    root: str  # the cgroup path that appears at the mount point
    point: str
    version: int  # 1 or 2


def usable_cores() -> float:
    """Cores' worth of CPU this process may use: ``os.cpu_count()``, or the CPU quota
    of its cgroup when that is less."""
    cores = float(os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    return min(cores, limit.cores) if limit is not None else cores


def cgroup_cpu_limit(proc_self: str = "/proc/self") -> CpuLimit | None:
    """The tightest CPU quota over this process's cgroups and their parents, or None
    (no quota, no cgroups, or nothing readable). ``proc_self``: where to read
    ``cgroup`` and ``mountinfo`` from (tests point it at a tree of their own)."""
    try:
        membership = Path(proc_self, "cgroup").read_text()
        mountinfo = Path(proc_self, "mountinfo").read_text()
    except OSError:
        return None
    paths: dict[int, str] = {}  # version -> this process's cgroup path
    for line in membership.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        number, controllers, path = parts
        if number == "0" and not controllers:
            paths[2] = path
        elif "cpu" in controllers.split(","):
            paths[1] = path
    best: CpuLimit | None = None
    for mount in _cgroup_mounts(mountinfo):
        own = paths.get(mount.version)
        if own is None:
            continue
        for directory in _up_to_mount(mount, own):
            cores = _quota(directory, mount.version)
            if cores is not None and (best is None or cores < best.cores):
                best = CpuLimit(cores, str(directory))
    return best


def _cgroup_mounts(mountinfo: str) -> list[_Mount]:
    """The cgroup2 mounts and the v1 mounts of the ``cpu`` controller."""
    mounts = []
    for line in mountinfo.splitlines():
        ours, sep, theirs = line.partition(" - ")
        fields, tail = ours.split(), theirs.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        root, point = _unescape(fields[3]), _unescape(fields[4])
        if tail[0] == "cgroup2":
            mounts.append(_Mount(root, point, 2))
        elif tail[0] == "cgroup" and "cpu" in tail[2].split(","):
            mounts.append(_Mount(root, point, 1))
    return mounts


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _up_to_mount(mount: _Mount, path: str) -> list[Path]:
    """The directory of cgroup ``path`` under ``mount``, then each parent up to the
    mount point. A path outside the mount's root (another cgroup namespace) or one
    that is not there gives the mount point alone: it is what a container sees as
    its own cgroup."""
    top = Path(mount.point)
    root = mount.root.rstrip("/")
    if path == root or path.startswith(root + "/"):
        relative = path[len(root):].strip("/")
    else:
        relative = ""
    start = top / relative if relative else top
    if not start.is_dir():
        start = top
    chain = [start]
    while chain[-1] != top and top in chain[-1].parents:
        chain.append(chain[-1].parent)
    return chain


def _quota(directory: Path, version: int) -> float | None:
    """The quota set in one cgroup directory, in cores, or None."""
    try:
        if version == 2:
            quota, _, period = (directory / "cpu.max").read_text().strip().partition(" ")
            if quota == "max":
                return None
            value, per = int(quota), int(period or "100000")
        else:
            value = int((directory / "cpu.cfs_quota_us").read_text())
            per = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    if value <= 0 or per <= 0:
        return None
    return value / per
