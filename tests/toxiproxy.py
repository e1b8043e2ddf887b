"""Shopify's toxiproxy for the multi-host tests: WAN-like links between bed hosts.

toxiproxy is a TCP proxy whose links take "toxics" (latency with jitter, reset peers,
stalled connections, slicing into small packets) through an HTTP API. This machine's
kernel has no netem qdisc, so this is how the tests get latency and resets between hosts.

The binary is built once with Go into ``${XDG_CACHE_HOME:-~/.cache}/cluster-toxiproxy/
v2.12.0/toxiproxy-server`` (``python tests/toxiproxy.py --build``; scripts/run-tests does
it), or taken from ``toxiproxy-server`` on PATH.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

VERSION = "v2.12.0"
PACKAGE = f"github.com/Shopify/toxiproxy/v2/cmd/server@{VERSION}"
API_PORT = 8474


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cluster-toxiproxy" / VERSION


def find_go() -> str | None:
    found = shutil.which("go")
    if found:
        return found
    return "/usr/local/go/bin/go" if os.access("/usr/local/go/bin/go", os.X_OK) else None


def build(timeout: float = 900.0) -> Path:
    """The toxiproxy server binary: on PATH, cached, or built now (lock-serialised)."""
    found = shutil.which("toxiproxy-server")
    if found:
        return Path(found)
    target = cache_dir() / "toxiproxy-server"
    if target.is_file():
        return target
    go = find_go()
    if go is None:
        raise RuntimeError("Go was not found, so toxiproxy cannot be built "
                           "(install Go, or put toxiproxy-server on PATH)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target
        work = Path(tempfile.mkdtemp(prefix="cluster-toxiproxy-build-"))
        try:
            env = dict(os.environ, GOBIN=str(work), GOFLAGS="-mod=mod", GOWORK="off")
            done = subprocess.run([go, "install", PACKAGE], env=env, cwd=str(work),
                                  capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"go install {PACKAGE} failed:\n{done.stderr[-3000:]}")
            os.replace(work / "server", target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


class Toxiproxy:
    """The HTTP API of a running server; ``call`` runs a request where it can reach it."""

    def __init__(self, api: str, call: Any) -> None:
        self.api = api.rstrip("/")
        self._call = call  # e.g. Host.call: the API lives in a bed namespace

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        import requests

        response = self._call(requests.request, method, f"{self.api}{path}", json=body,
                              timeout=5)
        if response.status_code >= 300:
            raise RuntimeError(f"toxiproxy {method} {path}: {response.status_code} "
                               f"{response.text}")
        return response.json() if response.content else None

    def proxy(self, name: str, listen: str, upstream: str) -> None:
        self._request("POST", "/proxies", {"name": name, "listen": listen,
                                          "upstream": upstream, "enabled": True})

    def toxic(self, proxy: str, kind: str, stream: str = "downstream",
              toxicity: float = 1.0, **attributes: Any) -> str:
        name = f"{kind}_{stream}"
        self._request("POST", f"/proxies/{proxy}/toxics",
                      {"name": name, "type": kind, "stream": stream,
                       "toxicity": toxicity, "attributes": attributes})
        return name

    def clear(self, proxy: str) -> None:
        for toxic in self._request("GET", f"/proxies/{proxy}/toxics"):
            self._request("DELETE", f"/proxies/{proxy}/toxics/{toxic['name']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", action="store_true", required=True,
                        help="build/cache toxiproxy and print the binary's path")
    parser.parse_args(argv)
    try:
        print(build())
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
