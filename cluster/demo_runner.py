"""``cluster demo``: three instances of the demo app on this host, balancing.

The quick start's main job: no database to install (the embedded store), nothing to
configure. Each instance is a real ``cluster serve`` child process; Ctrl-C stops
them all, and each deregisters on its way out. While it runs, a gentle stream of
requests (a few a second, without cookies, so they spread) keeps the dashboard moving.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time

import requests

from cluster.config import Settings, host_port


def run_demo(settings: Settings, instances: int = 3) -> int:
    host, first_port = settings.bind_address
    ports = [first_port + n for n in range(instances)]
    children: list[subprocess.Popen[bytes]] = []
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    base = [sys.executable, "-m", "cluster", "serve", "--service", settings.service or "web",
            "--app", settings.app or "cluster.demo:app",
            "--ping-interval", str(settings.ping_interval)]
    if settings.discovery_url:
        base += ["--discovery-url", settings.discovery_url]
    try:
        for port in ports:
            children.append(subprocess.Popen([*base, "--bind", host_port(host, port)],
                                             stdin=subprocess.DEVNULL))
        urls = [f"http://{host_port(host, port)}" for port in ports]
        if not _wait_for(urls, children, stopping):
            return 130  # Ctrl-C (or SIGTERM) before the instances were up
        print(f"\n{instances} instances of the demo app, each one a balancer:")
        for url in urls:
            print(f"  {url}/")
        answers = [requests.get(urls[0] + "/whoami", timeout=5).json()["instance"]
                   for _ in range(9)]
        print(f"\nnine requests to {urls[0]} without a cookie were served by:")
        for answer in answers:
            print(f"  {answer}")
        print(f"\ndashboard: {urls[0]}{settings.admin_prefix}/  (live; any instance has one)")
        print(f"metrics:   {urls[0]}{settings.admin_prefix}/metrics")
        print("\na few demo requests a second keep it moving; `cluster status --watch` shows "
              "them too.\nCtrl-C stops them all.\n", flush=True)
        threading.Thread(target=_demo_traffic, args=(urls, stopping), daemon=True).start()
        while not stopping.is_set():
            if any(child.poll() is not None for child in children):
                return 1
            stopping.wait(0.5)
        return 0
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()


#: seconds between demo requests (about four a second)
TRAFFIC_INTERVAL = 0.25


def _demo_traffic(urls: list[str], stopping: threading.Event) -> None:
    """A few requests a second to random instances, without cookies, so they spread."""
    paths = ["/", "/whoami", "/demo/page", "/whoami"]
    while not stopping.wait(TRAFFIC_INTERVAL * random.uniform(0.5, 1.5)):
        try:
            requests.get(random.choice(urls) + random.choice(paths), timeout=5).close()
        except requests.RequestException:
            pass  # an instance stopping; the next request goes elsewhere


def _wait_for(urls: list[str], children: list[subprocess.Popen[bytes]],
              stopping: threading.Event) -> bool:
    """True once every instance sees them all; False if asked to stop meanwhile (Ctrl-C
    reaches the instances too: their exits are then no failure to report)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if stopping.is_set():
            return False
        if any(child.poll() is not None for child in children):
            if stopping.wait(0.2):  # the signal that stopped the child, not yet handled here
                return False
            raise SystemExit("an instance exited at start; see its message above")
        try:
            views = [requests.get(u + "/_cluster/status", timeout=2).json() for u in urls]
            if all(len(v["endpoints"]) == len(urls) for v in views):
                return True
        except requests.RequestException:
            pass
        stopping.wait(0.2)
    raise SystemExit("the instances did not find each other within 30 s")
