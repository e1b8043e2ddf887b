"""``cluster demo``: three instances of the demo app on this host, balancing.

The quick start's main job: no database to install (the embedded store), nothing to
configure. Each instance is a real ``cluster serve`` child process; Ctrl-C stops
them all, and each deregisters on its way out.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import requests

from cluster.config import Settings


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
            children.append(subprocess.Popen([*base, "--bind", f"{host}:{port}"],
                                             stdin=subprocess.DEVNULL))
        urls = [f"http://{host}:{port}" for port in ports]
        _wait_for(urls, children)
        print(f"\n{instances} instances of the demo app, each one a balancer:")
        for url in urls:
            print(f"  {url}/")
        answers = [requests.get(urls[0] + "/whoami", timeout=5).json()["instance"]
                   for _ in range(9)]
        print(f"\nnine requests to {urls[0]} without a cookie were served by:")
        for answer in answers:
            print(f"  {answer}")
        print("\n`cluster status` lists them; Ctrl-C stops them all.\n", flush=True)
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


def _wait_for(urls: list[str], children: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(child.poll() is not None for child in children):
            raise SystemExit("an instance exited at start; see its message above")
        try:
            views = [requests.get(u + "/_cluster/status", timeout=2).json() for u in urls]
            if all(len(v["endpoints"]) == len(urls) for v in views):
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise SystemExit("the instances did not find each other within 30 s")
