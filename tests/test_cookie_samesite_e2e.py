"""--cookie-samesite sets the SameSite of the sticky cookies, in every way of answering.

Browsers send a SameSite=Lax cookie on no cross-site XHR, so a Socket.IO client on
another site (``withCredentials: true``) lost its session's stickiness; with
``--cookie-samesite none`` the cookies are ``SameSite=None; Secure``. Checked on an
answer of the local app and a proxied one (front door) and a proxied one in library
mode (``cluster.wrap()``), and the default, Lax.
"""

from __future__ import annotations

import requests

from helpers import (
    start_balancers,
    start_instance,
    start_serve,
    wait_until,
)

COMMON = {"CLUSTER_PING_INTERVAL": "1", "CLUSTER_EXPIRY_GRACE": "1"}


def table(base: str) -> set[str]:
    status = requests.get(base + "/_cluster/status", timeout=5).json()
    return {e["endpoint"] for e in status["endpoints"] if e["service"] == "web"}


def sticky_cookies(base: str) -> list[str]:
    """The Set-Cookie fields naming a sticky cookie, of a first visit."""
    response = requests.get(base + "/whoami", timeout=5)
    assert response.status_code == 200, response.text
    fields = response.raw.headers.getlist("Set-Cookie")
    return [f for f in fields if f.startswith(("cluster-endpoint::", "cluster-version::"))]


def test_cookie_samesite_none_in_door_and_library_mode(sqlite_url):
    none = {"CLUSTER_COOKIE_SAMESITE": "none", **COMMON}
    procs = []
    try:
        web, web_port = start_instance(sqlite_url, "web1", "--app-version", "1.0",
                                       env=none)
        procs.append(web)
        door_port, lib_port = start_balancers(sqlite_url, "web", none, procs)
        plain, plain_port = start_serve("--ui-service", "web",
                                        env={"CLUSTER_DISCOVERY_URL": sqlite_url, **COMMON},
                                        name="plain")
        procs.append(plain)
        bases = {name: f"http://127.0.0.1:{port}" for name, port in
                 (("local", web_port), ("door", door_port), ("library", lib_port),
                  ("plain", plain_port))}
        wait_until(lambda: all(table(b) for b in bases.values()), timeout=30,
                   what="every instance sees the web endpoint")
        for name in ("local", "door", "library"):
            cookies = sticky_cookies(bases[name])
            assert {c.split("=", 1)[0] for c in cookies} == \
                {"cluster-endpoint::web", "cluster-version::web"}, (name, cookies)
            for cookie in cookies:
                assert cookie.endswith("; Path=/; HttpOnly; SameSite=None; Secure"), \
                    (name, cookie)
        for cookie in sticky_cookies(bases["plain"]):  # the default
            assert cookie.endswith("; Path=/; HttpOnly; SameSite=Lax"), cookie
    finally:
        for proc in reversed(procs):
            proc.stop()
