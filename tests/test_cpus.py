"""The CPU quota of a container (cluster.cpus), and the `auto` settings that count it.

What a user relies on: in a container limited to half a core on a many-core host,
`--busy-poll auto` does not poll (polling would spend the quota and get the instance
throttled for the rest of each period) and `--workers-count auto` starts one worker
per core of the quota, not of the host. The end-to-end tests put a real `cluster
serve` in a real cgroup with a CFS quota (v1 `cpu` controller or v2 `cpu.max`,
whichever this machine lets root write); the others read trees laid out as
/proc/self and the cgroup mounts are in Docker, Kubernetes and systemd.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from cluster.config import Settings
from cluster.cpus import CpuLimit, cgroup_cpu_limit
from helpers import get, start_serve, wait_until


def fake_proc(tmp: Path, cgroup: str, mounts: list[tuple[str, Path, str, str]]) -> str:
    """A /proc/self with ``cgroup`` as its cgroup file and ``mounts`` (root, mount
    point, fstype, super options) in its mountinfo; returns its path."""
    proc = tmp / "proc-self"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    lines = ["22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw"]
    for n, (root, point, fstype, options) in enumerate(mounts):
        escaped = str(point).replace(" ", "\\040")
        lines.append(f"{30 + n} 22 0:{28 + n} {root} {escaped} rw,nosuid shared:9 - "
                     f"{fstype} cgroup {options}")
    (proc / "mountinfo").write_text("\n".join(lines) + "\n")
    return str(proc)


def write(directory: Path, **files: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("_", ".", 1)).write_text(text + "\n")


def test_a_v2_quota_is_the_tightest_of_the_cgroup_and_its_parents(tmp_path: Path) -> None:
    """Kubernetes puts the pod's limit on the pod's cgroup and none on the container's
    own: the parent's counts."""
    mount = tmp_path / "cgroup"
    write(mount / "kubepods", cpu_max="max 100000")
    write(mount / "kubepods" / "pod1", cpu_max="150000 100000")
    write(mount / "kubepods" / "pod1" / "ctr", cpu_max="max 100000")
    proc = fake_proc(tmp_path, "0::/kubepods/pod1/ctr\n",
                     [("/", mount, "cgroup2", "rw,nsdelegate")])
    assert cgroup_cpu_limit(proc) == CpuLimit(1.5, str(mount / "kubepods" / "pod1"))
    write(mount / "kubepods" / "pod1" / "ctr", cpu_max="50000 100000")
    assert cgroup_cpu_limit(proc) == CpuLimit(0.5, str(mount / "kubepods" / "pod1" / "ctr"))


def test_a_container_in_its_own_cgroup_namespace_reads_its_mount_point(tmp_path: Path) -> None:
    """Docker with cgroup v2: the container sees itself as "/" and its cgroup mounted at
    /sys/fs/cgroup; `--cpus 2.5` is cpu.max 250000 100000 there."""
    mount = tmp_path / "sys fs cgroup"  # a space: mountinfo writes it as \\040
    write(mount, cpu_max="250000 100000")
    proc = fake_proc(tmp_path, "0::/\n", [("/", mount, "cgroup2", "rw")])
    assert cgroup_cpu_limit(proc) == CpuLimit(2.5, str(mount))


def test_a_v1_cpu_controller_mounted_at_the_containers_cgroup(tmp_path: Path) -> None:
    """cgroup v1 without a cgroup namespace: /proc/self/cgroup names the host's path,
    which is the root of the mount the container sees."""
    mount = tmp_path / "cpu,cpuacct"
    write(mount, cpu_cfs_quota_us="200000", cpu_cfs_period_us="100000")
    cgroup = ("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n"
              "1:name=systemd:/docker/abc\n0::/system.slice/docker-abc.scope\n")
    proc = fake_proc(tmp_path, cgroup, [
        ("/docker/abc", tmp_path / "memory", "cgroup", "rw,memory"),
        ("/docker/abc", mount, "cgroup", "rw,cpu,cpuacct"),
    ])
    assert cgroup_cpu_limit(proc) == CpuLimit(2.0, str(mount))


def test_no_quota_and_unreadable_files_are_no_limit(tmp_path: Path) -> None:
    mount = tmp_path / "cpu"
    write(mount / "app", cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    write(mount, cpu_cfs_quota_us="garbage", cpu_cfs_period_us="100000")
    proc = fake_proc(tmp_path, "3:cpu:/app\n", [("/", mount, "cgroup", "rw,cpu")])
    assert cgroup_cpu_limit(proc) is None
    # A cgroup2 mount with no cpu.max anywhere (the cpu controller is elsewhere), a v1
    # mount of another controller, and a membership line of no known shape.
    other = tmp_path / "other"
    (other / "x").mkdir(parents=True)
    write(other / "pids", cpu_cfs_quota_us="10000", cpu_cfs_period_us="100000")
    proc2 = tmp_path / "second"
    proc2.mkdir()
    fake = fake_proc(proc2, "0::/x\n5:pids:/pids\nnot a line\n",
                     [("/", other, "cgroup2", "rw"), ("/", other, "cgroup", "rw,pids")])
    assert cgroup_cpu_limit(fake) is None
    assert cgroup_cpu_limit(str(tmp_path / "no-such-proc")) is None


def test_a_cgroup_that_is_not_there_falls_back_to_the_mount_point(tmp_path: Path) -> None:
    """/proc/self/cgroup names a path outside what the mount shows (another cgroup
    namespace): what is at the mount point is the container's own cgroup."""
    mount = tmp_path / "cg"
    write(mount, cpu_max="100000 100000")
    proc = fake_proc(tmp_path, "0::/../elsewhere/ctr\n", [("/", mount, "cgroup2", "rw")])
    assert cgroup_cpu_limit(proc) == CpuLimit(1.0, str(mount))


# -- a real cgroup ----------------------------------------------------------------------

def _cpu_cgroup_parent() -> tuple[Path, int] | None:
    """A cgroup directory root can make children with a CPU quota in: (it, version)."""
    v1 = Path("/sys/fs/cgroup/cpu")
    if (v1 / "cpu.cfs_quota_us").exists() and os.access(v1, os.W_OK):
        return v1, 1
    v2 = Path("/sys/fs/cgroup")
    with_cpu = v2 / "cgroup.subtree_control"
    if with_cpu.exists() and "cpu" in with_cpu.read_text().split() and \
            os.access(v2, os.W_OK):
        return v2, 2
    return None


@pytest.fixture
def quota_cgroup() -> Iterator[Callable[[float], Path]]:
    """Makes cgroups with a CPU quota (``make(cores)`` -> directory); each is removed
    at the end, once the processes the test put in it have been stopped."""
    found = _cpu_cgroup_parent()
    if found is None:
        pytest.skip("no cgroup with a cpu controller that this user can write")
    parent, version = found
    made: list[Path] = []

    def make(cores: float) -> Path:
        group = parent / f"cluster-test-{uuid.uuid4().hex[:12]}"
        group.mkdir()
        made.append(group)
        quota = int(cores * 100000)
        if version == 1:
            (group / "cpu.cfs_period_us").write_text("100000")
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (group / "cpu.max").write_text(f"{quota} 100000")
        return group

    yield make
    for group in made:
        wait_until(lambda g=group: not (g / "cgroup.procs").read_text().strip(),
                   timeout=10, what=f"{group} empty")
        group.rmdir()


def in_cgroup(group: Path) -> tuple[str, ...]:
    """A wrapper: the command joins ``group`` before it execs."""
    return ("sh", "-c", f'echo $$ > "{group}/cgroup.procs" && exec "$@"', "sh")


def test_under_half_a_core_serve_neither_polls_nor_forks_a_worker_per_host_core(
        quota_cgroup, tmp_path: Path) -> None:
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 cores: auto would poll on them without a quota")
    env = {"CLUSTER_DISCOVERY_URL": f"sqlite:///{tmp_path / 'd.sqlite3'}"}
    group = quota_cgroup(0.5)
    boxed, port = start_serve("--service", "web", "--workers-count", "1", env=env,
                              wrapper=in_cgroup(group), name="boxed")
    try:
        assert get(f"http://127.0.0.1:{port}/_cluster/status").status_code == 200
        wait_until(lambda: "busy polling:" in boxed.output(), what="the polling line")
        out = boxed.output()
        assert f"busy polling: off (a CPU quota of 0.50 cores, {group})" in out, out
        assert str(boxed.pid) in (group / "cgroup.procs").read_text().split()
    finally:
        boxed.stop()
    boxed, port = start_serve("--service", "web", "--workers-count", "auto", env=env,
                              wrapper=in_cgroup(group), name="boxed-auto")
    try:
        assert get(f"http://127.0.0.1:{port}/_cluster/status").status_code == 200
        wait_until(lambda: "busy polling:" in boxed.output(), what="the polling line")
        assert "workers share" not in boxed.output()  # auto: one process, half a core
    finally:
        boxed.stop()
    # The same command with no quota: one process polls, and auto forks one per core.
    free, port = start_serve("--service", "web", "--workers-count", "1", env=env,
                             name="free")
    try:
        wait_until(lambda: "busy polling:" in free.output(), what="the polling line")
        assert "busy polling: up to 50 µs after I/O" in free.output()
    finally:
        free.stop()
    many, port = start_serve("--service", "web", "--workers-count", "auto", env=env,
                             name="many")
    try:
        wait_until(lambda: "workers share" in many.output(), what="the workers")
        assert f"{os.cpu_count()} workers share" in many.output()
    finally:
        many.stop()


def test_auto_counts_the_cores_of_a_quota_of_one_and_a_half(quota_cgroup) -> None:
    """In a cgroup of 1.5 cores: --workers-count auto is 2 (the quota rounded up), and
    two processes on 1.5 cores do not poll (there is no core to spare)."""
    group = quota_cgroup(1.5)
    code = ("from cluster.config import Settings; s = Settings.load(args=['--workers-count',"
            " 'auto']); print(s.workers_count, s.busy_poll_microseconds(),"
            " s.busy_poll_microseconds(1))")
    done = subprocess.run([*in_cgroup(group), sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # 2 workers; 2 processes on 1.5 cores: off; 1 process: it leaves half a core
    # free, and polls.
    assert done.stdout.split() == ["2", "0", "50"]


def test_settings_without_a_quota_count_the_hosts_cores() -> None:
    """Here, outside any quota (the suite is not run inside one): auto is the host's."""
    if cgroup_cpu_limit() is not None:
        pytest.skip("this test process runs under a CPU quota")
    settings = Settings.load(args=["--workers-count", "auto"])
    assert settings.workers_count == os.cpu_count()
