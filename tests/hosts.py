"""A multi-host test bed in network namespaces: one namespace per simulated host.

Every host gets an ``eth0`` (a veth pair) plugged into one bridge that lives in a
namespace of its own, and an address from the benchmarking range 198.18.0.0/15. Nothing
is added to the root namespace, so traffic stays inside the bed (and each host's
loopback), and beds of concurrent test runs cannot collide: every name carries the PID of
the process that made it (``clh<pid>x<n>-<host>``).

Processes run in a host with ``ip netns exec NS argv`` (which execs in place, so the PID we
hold is the program's own and we stop it by that PID). The test process itself stays in
the root namespace; :meth:`Host.call` runs a function on a thread that entered the
host's namespace (``setns(2)``), so sockets made there (``requests``, raw sockets) are the
host's: that is how a test is a client on a given host.

Removal happens in ``finally`` blocks (:meth:`Bed.close`, also at interpreter exit), and
each new bed first removes leftovers of beds whose process is gone (a killed run):
their processes by PID (``ip netns pids``), then their namespaces, which takes their
links and the bridge with them.

Needs root and iproute2. ``python -m tests.hosts run balance|partition`` builds a bed,
runs a scenario that prints what happens, and removes everything; ``cleanup`` removes
leftovers only.
"""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures
import contextlib
import ctypes
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # `python -m tests.hosts` from the checkout
    sys.path.insert(0, str(TESTS))

import requests  # noqa: E402

from helpers import Proc, cluster_argv, python  # noqa: E402

T = TypeVar("T")

PREFIX = "clh"
_NAME = re.compile(rf"^{PREFIX}(\d+)x\d+-")
SUBNET = "198.18.0"  # a /24 of 198.18.0.0/15, private to each bed's bridge
STORE_PORT = 27017
INSTANCE_PORT = 8000
_CLONE_NEWNET = 0x40000000
_serial = itertools.count(1)
_LIVE: set[Bed] = set()


class BedError(RuntimeError):
    """The bed could not be built (not root, no iproute2, ...): the message says why."""


def ip(*args: str, check: bool = True) -> str:
    """Run ``ip ARGS``; raise BedError with its stderr when it fails and ``check``."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise BedError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def nft(host: Host, ruleset: str, *args: str) -> str:
    """Run ``nft ARGS`` in ``host`` (``nft -f -`` reading ``ruleset`` when no ARGS)."""
    done = subprocess.run(host.argv(["nft", *(args or ("-f", "-"))]), input=ruleset,
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise BedError(f"nft in {host.name}: {done.stderr.strip()}")
    return done.stdout


def check_environment() -> None:
    """Raise BedError unless we can make namespaces (root and iproute2)."""
    if shutil.which("ip") is None:
        raise BedError("the multi-host bed needs iproute2 (`ip`); "
                       "scripts/run-tests installs it")
    if os.geteuid() != 0:
        raise BedError("the multi-host bed needs root (network namespaces)")


def _setns(path: str) -> None:
    """Move the calling thread into the network namespace at ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "setns"):  # Python 3.12+
            os.setns(fd, _CLONE_NEWNET)
            return
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace_processes(ns: str) -> None:
    """SIGKILL, by PID, whatever still runs in ``ns`` (leftovers of a failed run)."""
    for line in ip("netns", "pids", ns, check=False).split():
        if line.isdigit() and int(line) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line), signal.SIGKILL)


def _delete_namespace(ns: str) -> None:
    _kill_namespace_processes(ns)
    ip("netns", "del", ns, check=False)


def cleanup_leftovers(all_beds: bool = False) -> list[str]:
    """Remove namespaces of beds whose process is gone (all of ours with ``all_beds``)."""
    removed = []
    for line in ip("netns", "list", check=False).splitlines():
        ns = line.split()[0] if line.strip() else ""
        match = _NAME.match(ns)
        if not match:
            continue
        owner = int(match.group(1))
        if all_beds or not _pid_alive(owner):
            _delete_namespace(ns)
            removed.append(ns)
    return removed


class Host:
    """One simulated host: a namespace with ``eth0`` on the bed's bridge."""

    def __init__(self, bed: Bed, name: str, address: str, port: str) -> None:
        self.bed = bed
        self.name = name
        self.address = address
        self.ns = f"{bed.tag}-{name}"
        self.port = port  # the bridge's port (in the bridge namespace) for this host
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        #: processes started on this host, oldest first (the bed stops them)
        self.procs: list[Proc] = []

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.address} ns={self.ns}>"

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def start(self, argv: Sequence[str], env: dict[str, str] | None = None,
              name: str = "") -> Proc:
        """Start a process on this host; the bed stops it by PID at the end."""
        proc = Proc(self.argv(argv), env=env, name=name or f"{self.name}-{Path(argv[0]).name}")
        self.bed.procs.append(proc)
        self.procs.append(proc)
        return proc

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on a thread inside this host's namespace and return its result."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=4, thread_name_prefix=self.ns, initializer=_setns,
                initargs=(f"/run/netns/{self.ns}",))
        return self._pool.submit(fn, *args, **kwargs).result()

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        """An HTTP GET made from this host (a fresh connection each time)."""
        kwargs.setdefault("timeout", 10)
        return self.call(requests.get, url, **kwargs)

    def connect(self, address: tuple[str, int], timeout: float = 5.0) -> socket.socket:
        """A TCP connection made from this host; usable from any thread afterwards."""
        return self.call(socket.create_connection, address, timeout)

    def can_connect(self, address: tuple[str, int]) -> bool:
        try:
            self.connect(address, timeout=0.5).close()
        except OSError:
            return False
        return True

    def wait_listening(self, port: int, proc: Proc | None = None, timeout: float = 30.0,
                       address: str = "127.0.0.1") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{proc} exited with {proc.returncode}:\n{proc.output()}")
            if self.can_connect((address, port)):
                return
            time.sleep(0.1)
        raise TimeoutError(f"nothing listens on {address}:{port} in {self}")

    def link(self, up: bool) -> None:
        """Plug or unplug this host's cable: its port on the bridge goes up or down."""
        ip("-n", self.bed.switch, "link", "set", self.port, "up" if up else "down")

    def lose(self, percent: int) -> None:
        """Drop ``percent`` % of the packets this host sends and receives on its cable, at
        random (0: none again). An nftables rule in the host's namespace: this machine's
        kernel has no netem qdisc, but nftables' ``numgen random`` drops real packets, so
        TCP retransmits as it would over a lossy link."""
        if shutil.which("nft") is None:
            raise BedError("packet loss on the bed needs nftables (`nft`); "
                           "scripts/run-tests installs it")
        nft(self, "delete table inet cluster_loss" if percent == 0 else
            "table inet cluster_loss {\n"
            f" chain inbound {{ type filter hook input priority 0; policy accept;"
            f' iifname "eth0" numgen random mod 100 < {percent} counter drop; }}\n'
            f" chain outbound {{ type filter hook output priority 0; policy accept;"
            f' oifname "eth0" numgen random mod 100 < {percent} counter drop; }}\n'
            "}\n")

    def dropped(self) -> int:
        """Packets dropped by :meth:`lose` so far, both ways."""
        listing = json.loads(nft(self, "", "--json", "list", "table", "inet", "cluster_loss"))
        return sum(expr["counter"]["packets"]
                   for item in listing["nftables"] if "rule" in item
                   for expr in item["rule"]["expr"] if "counter" in expr)

    def status(self, port: int = INSTANCE_PORT) -> dict[str, Any]:
        """The instance's own view (/_cluster/status), asked over this host's loopback."""
        response = self.get(f"http://127.0.0.1:{port}/_cluster/status", timeout=5)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class Bed:
    """Hosts on one bridge, the processes started on them, and their removal.

    ``with Bed(["store", "h1", "h2"]) as bed:`` builds it; leaving the block (or
    :meth:`close`) stops every process by PID and deletes every namespace.
    """

    def __init__(self, names: Sequence[str]) -> None:
        check_environment()
        self.tag = f"{PREFIX}{os.getpid()}x{next(_serial)}"
        self.switch = f"{self.tag}-switch"
        self.hosts: dict[str, Host] = {}
        self.procs: list[Proc] = []
        self._names = list(names)
        self._built: list[str] = []
        #: run after the processes stop (FerretDB's data directory)
        self._cleanups: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        return f"<Bed {self.tag} [{', '.join(self.hosts)} | {len(self.procs)} processes]>"

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __enter__(self) -> Bed:
        self.build()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def build(self) -> None:
        cleanup_leftovers()
        _LIVE.add(self)
        try:
            self._add_namespace(self.switch)
            ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            ip("-n", self.switch, "link", "set", "br0", "up")
            for index, name in enumerate(self._names, start=1):
                host = Host(self, name, f"{SUBNET}.{index + 1}", f"p{index}")
                self._add_namespace(host.ns)
                ip("-n", host.ns, "link", "set", "lo", "up")
                ip("-n", host.ns, "link", "add", "eth0", "type", "veth",
                   "peer", "name", host.port, "netns", self.switch)
                ip("-n", host.ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
                ip("-n", host.ns, "link", "set", "eth0", "up")
                ip("-n", self.switch, "link", "set", host.port, "master", "br0", "up")
                self.hosts[name] = host
        except BaseException:
            self.close()
            raise

    def _add_namespace(self, ns: str) -> None:
        ip("netns", "add", ns)
        self._built.append(ns)

    def close(self) -> None:
        """Stop every process by PID, then delete every namespace (links go with them)."""
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop(timeout=5)
        self.procs.clear()
        for host in self.hosts.values():
            host.close()
        for ns in reversed(self._built):
            _delete_namespace(ns)
        self._built.clear()
        for fn in self._cleanups:
            with contextlib.suppress(Exception):
                fn()
        self._cleanups.clear()
        _LIVE.discard(self)

    # --- the cluster on the bed -----------------------------------------------------

    def start_store(self, host: str = "store") -> str:
        """FerretDB listening on ``host``'s address; returns its mongodb:// base URL."""
        from mongo_server import build_ferretdb

        where = self.hosts[host]
        binary = shutil.which("ferretdb") or str(build_ferretdb())
        state = Path(f"/tmp/{self.tag}-ferretdb")
        (state / "db").mkdir(parents=True, exist_ok=True)
        proc = where.start([
            binary, "--handler=sqlite", f"--sqlite-url=file:{state}/db/",
            f"--state-dir={state}", f"--listen-addr={where.address}:{STORE_PORT}",
            "--debug-addr=-", "--telemetry=disable", "--log-level=warn",
        ], name=f"{host}-ferretdb")
        self._cleanups.append(lambda: shutil.rmtree(state, ignore_errors=True))
        where.wait_listening(STORE_PORT, proc, address=where.address)
        return f"mongodb://{where.address}:{STORE_PORT}"

    def serve(self, host: str, discovery_url: str, *extra: str, port: int = INSTANCE_PORT,
              name: str = "", wait: bool = True, env: dict[str, str] | None = None) -> Proc:
        """``cluster serve`` of the test backend on ``host``, bound to 0.0.0.0:port."""
        where = self.hosts[host]
        argv = cluster_argv(
            "serve", "--service", "web", "--app", "backend:app",
            "--bind", f"0.0.0.0:{port}", "--ping-interval", "1", "--expiry-grace", "1",
            "--connect-timeout", "1", *extra)
        full_env = {"CLUSTER_DISCOVERY_URL": discovery_url, "BACKEND_NAME": name or host}
        full_env.update(env or {})
        proc = where.start(argv, env=full_env, name=f"{host}-cluster")
        if wait:
            where.wait_listening(port, proc)
        return proc


@atexit.register
def _close_live_beds() -> None:
    """Backstop for aborted runs: never leave a bed behind when Python exits."""
    for bed in list(_LIVE):
        bed.close()


@contextlib.contextmanager
def bed(names: Sequence[str]) -> Iterator[Bed]:
    """Build a bed with hosts ``names``; remove it all on the way out, failing or not."""
    made = Bed(names)
    try:
        made.build()
        yield made
    finally:
        made.close()


@contextlib.contextmanager
def bed_or_fail(names: Sequence[str]) -> Iterator[Bed]:
    """:func:`bed` for a test fixture: a machine that cannot build one (not root, no
    iproute2) fails the test with how to get what is missing, never skips it."""
    import pytest

    try:
        with bed(names) as made:
            yield made
    except BedError as exc:
        pytest.fail(str(exc))


def wait_for(predicate: Callable[[], T], timeout: float, what: str,
             interval: float = 0.2) -> T:
    """Poll ``predicate`` until truthy; return it, or raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (OSError, requests.RequestException, ValueError) as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise TimeoutError(f"after {timeout}s still waiting for {what}: {last!r}")


def endpoints_seen(host: Host) -> set[str]:
    """Endpoint URLs in the table of the instance on ``host``."""
    return {row["endpoint"] for row in host.status()["endpoints"]}


# --- scenarios for `python -m tests.hosts run NAME` --------------------------------------


def _three_hosts(the_bed: Bed) -> tuple[str, list[str]]:
    store = the_bed.start_store()
    url = f"{store}/demo"
    names = ["h1", "h2", "h3"]
    for name in names:
        the_bed.serve(name, url)
    want = {f"http://{the_bed[n].address}:{INSTANCE_PORT}" for n in names}
    for name in names:
        wait_for(lambda n=name: endpoints_seen(the_bed[n]) == want, 20, f"{name}'s table")
    return url, names


def scenario_balance(the_bed: Bed) -> None:
    _, names = _three_hosts(the_bed)
    print("tables agree:", json.dumps(sorted(endpoints_seen(the_bed["h1"]))))
    client = the_bed["client"]
    counts: dict[str, int] = {}
    for i in range(30):
        entry = the_bed[names[i % 3]].address
        served = client.get(f"http://{entry}:{INSTANCE_PORT}/whoami").text
        counts[served] = counts.get(served, 0) + 1
    print("30 requests from the client host, entering in turn at h1, h2, h3:", counts)


def scenario_partition(the_bed: Bed) -> None:
    _, names = _three_hosts(the_bed)
    cut = the_bed["h3"]
    gone = f"http://{cut.address}:{INSTANCE_PORT}"
    cut.link(False)
    started = time.monotonic()
    wait_for(lambda: gone not in endpoints_seen(the_bed["h1"]), 10, "h1 to expire h3")
    print(f"h3 unplugged; h1 expired it after {time.monotonic() - started:.1f}s")
    print("h3 still sees:", sorted(endpoints_seen(cut)))
    cut.link(True)
    started = time.monotonic()
    wait_for(lambda: all(len(endpoints_seen(the_bed[n])) == 3 for n in names), 20,
             "every host to see three endpoints")
    print(f"h3 plugged back; all agree after {time.monotonic() - started:.1f}s")


SCENARIOS = {"balance": scenario_balance, "partition": scenario_partition}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.hosts",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="build a bed, run a scenario, remove everything")
    run.add_argument("scenario", choices=sorted(SCENARIOS))
    sub.add_parser("cleanup", help="remove every bed left behind by this user's runs")
    args = parser.parse_args(argv)
    try:
        if args.command == "cleanup":
            print("removed:", cleanup_leftovers(all_beds=True) or "nothing")
            return 0
        with bed(["store", "h1", "h2", "h3", "client"]) as made:
            print(made)
            SCENARIOS[args.scenario](made)
    except BedError as exc:
        print(f"hosts: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Bed", "BedError", "Host", "bed", "cleanup_leftovers", "endpoints_seen",
           "python", "wait_for"]
