"""Every setting declared once.

Each field of :class:`Settings` is one setting: its name gives the flag
(``--self-weight``), the environment name (``CLUSTER_SELF_WEIGHT``) and the config
file key (``self-weight``); its metadata gives the help text and the parser. The
command line, ``--help``, ``conf/cluster.conf`` and the README table are all made from
this list, so they cannot drift apart. Precedence: flag > environment > file > default.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import ipaddress
import math
import os
import re
import socket
import stat
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, NoReturn, Sequence
from urllib.parse import parse_qsl, urlsplit

import configargparse

from cluster import __version__
from cluster.cookies import SAMESITE
from cluster.cpus import usable_cores
from cluster.errors import ConfigError
from cluster.records import (
    MAX_PING_MS,
    MIN_PING_MS,
    MalformedRecord,
    check_service,
    check_url,
    check_version,
)
from cluster.trust import check_entry

DISCOVERY_SCHEMES = ("mongodb", "mongodb+srv", "sqlite")
LOG_LEVELS = ("debug", "info", "warning", "error")
ACCESS_LOG_FORMATS = ("off", "combined", "json")
PLACEMENTS = ("load", "random")
_SWITCH = {"on": True, "true": True, "yes": True, "1": True,
           "off": False, "false": False, "no": False, "0": False}
COMMANDS = {
    "serve": "run an instance: register, heartbeat, watch, serve and balance",
    "status": "print services, endpoints, balancers and heartbeat ages",
    "register": "register and heartbeat an endpoint served by another program",
    "demo": "run three instances of the demo app on this host and show them balancing",
    "drain": "tell a running instance to drain: no new sessions, then close its "
             "WebSockets with 1001 and stop",
}
#: where the app version comes from when --app-version is unset
APP_VERSION_ENV = "APP_VERSION"


# --- value parsers: each takes the raw string and raises ValueError(problem) -----


def _text(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def _service_name(raw: str) -> str:
    # the rules every watcher applies to records (cluster.records): a name they would
    # skip must be refused here, not registered
    value = _text(raw)
    try:
        return check_service(value)
    except MalformedRecord:
        raise ValueError(f"{value!r} must be 1-128 of A-Z a-z 0-9 . _ : -") from None


def _http_url(raw: str) -> str:
    value = raw.strip()
    try:
        check_url(value)
    except MalformedRecord as exc:
        raise ValueError(str(exc)) from None
    return value.rstrip("/")


def _url_option(query: bool = False) -> Callable[[str], str]:
    """An argparse ``type`` for a command's own URL option (``--url``, ``--health-url``):
    held to the rules of endpoint URLs, so a bad one is one line, exit status 2."""

    def parse(raw: str) -> str:
        value = raw.strip()
        try:
            return check_url(value, query=query)
        except MalformedRecord as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _ping_seconds(raw: str) -> float:
    value = _positive_seconds(raw)
    if not MIN_PING_MS <= round(value * 1000) <= MAX_PING_MS:
        raise ValueError(f"{raw} is outside {MIN_PING_MS / 1000:g}..{MAX_PING_MS // 1000} seconds")
    return value


def _discovery_url(raw: str) -> str:
    value = raw.strip()
    if not value:  # said "unknown discovery scheme ''" (an uncommented `discovery-url =`)
        raise ValueError("is empty: leave it unset for the embedded store of this host, "
                         "or give mongodb://… or sqlite:///path")
    # (the URL in these messages without its credentials: they end up in logs)
    if "://" not in value:
        # db1:27017/cluster was "unknown discovery scheme 'db1://'"
        raise ValueError(f"{_redacted(value)!r} has no scheme (expected mongodb://host/db, "
                         "mongodb+srv://name/db or sqlite:///path)")
    scheme = urlsplit(value).scheme
    if scheme not in DISCOVERY_SCHEMES:
        raise ValueError(
            f"unknown discovery scheme {scheme + '://' if scheme else _redacted(value)!r}"
            " (expected mongodb://, mongodb+srv:// or sqlite:///path)"
        )
    if scheme == "sqlite":
        # sqlite://name has a host and no path: it used to fall back silently to the
        # default file, so instances meant to share another store never met
        parts = urlsplit(value)
        if parts.netloc or not parts.path.startswith("/") or parts.path.endswith("/"):
            raise ValueError(f"{_redacted(value)!r} names no file: "
                             "sqlite:///absolute/path/to/file (three slashes)")
    return value


def _redacted(url: str) -> str:
    """``url`` without credentials: ``scheme://***@host...`` (also user:pw@host)."""
    head, sep, rest = url.partition("://")
    if not sep:
        head, sep, rest = "", "//" if url.startswith("//") else "", url.removeprefix("//")
    authority, slash, tail = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    return f"{head}{sep}{authority}{slash}{tail}"


def _service_list(raw: str) -> tuple[str, ...]:
    return tuple(_service_name(part) for part in raw.split(",") if part.strip())


def _trusted_list(raw: str) -> tuple[str, ...]:
    return tuple(check_entry(p) for p in raw.split(",") if p.strip())


def _fraction(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{raw!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{raw} is outside 0..1")
    return value


def _seconds(raw: str) -> float:
    """A finite number of seconds: inf and nan parse as floats but are no time to wait
    (nan passed every range check, inf crashed --ping-interval's with a traceback)."""
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{raw!r} is not a number of seconds") from None
    if not math.isfinite(value):
        raise ValueError(f"{raw.strip()} is not a finite number of seconds")
    return value


def _positive_seconds(raw: str) -> float:
    value = _seconds(raw)
    if value <= 0:
        raise ValueError(f"{raw} must be more than 0 seconds")
    return value


def _count(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{raw!r} is not a whole number") from None
    if value < 0:
        raise ValueError(f"{raw} must not be negative")
    return value


def _non_negative_seconds(raw: str) -> float:
    value = _seconds(raw)
    if value < 0:
        raise ValueError(f"{raw} must not be negative")
    return value


def _version(raw: str) -> str:
    value = raw.strip()
    try:
        return check_version(value)
    except MalformedRecord:
        raise ValueError(f"{value!r} must be 1-64 of A-Z a-z 0-9 . _ + ~ -") from None


def _version_list(raw: str) -> tuple[str, ...]:
    listed = tuple(_version(part) for part in raw.split(",") if part.strip())
    if len(set(listed)) != len(listed):
        raise ValueError("lists a version twice")
    return listed


def _version_weights(raw: str) -> tuple[tuple[str, float], ...]:
    pairs: list[tuple[str, float]] = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        version, sep, weight = part.partition("=")
        if not sep:
            raise ValueError(f"{part!r} is not VERSION=WEIGHT")
        try:
            value = float(weight)
        except ValueError:
            raise ValueError(f"weight {weight.strip()!r} of {version.strip()!r} is not a "
                             "number") from None
        if not 0 <= value < float("inf"):
            raise ValueError(f"weight {weight.strip()} of {version.strip()!r} must be 0 or more")
        pairs.append((_version(version), value))
    if len({v for v, _ in pairs}) != len(pairs):
        raise ValueError("weighs a version twice")
    if pairs and not any(w > 0 for _, w in pairs):
        raise ValueError("every weight is 0")
    return tuple(pairs)


#: most worker processes per core: the supervisor forks every one at start, so a typo
#: (100000) would exhaust the host's memory and process table instead of failing
MAX_WORKERS_PER_CORE = 8


def _workers(raw: str) -> int:
    cores = os.cpu_count() or 1
    if raw.strip().lower() == "auto":
        # One per core this instance may use: under a CPU quota of 2 cores on a
        # 64-core host, 64 workers would cost 64 times the memory for no more CPU.
        return max(1, math.ceil(usable_cores()))
    value = _count(raw)
    if value < 1:
        raise ValueError("must be at least 1 or 'auto'")
    if value > MAX_WORKERS_PER_CORE * cores:
        raise ValueError(f"{value} is more than {MAX_WORKERS_PER_CORE} per core "
                         f"({MAX_WORKERS_PER_CORE * cores} on this host; 'auto' is one per core)")
    return value


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets (``[::1]:80``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind(raw: str) -> str:
    host, sep, port = raw.strip().rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ValueError(f"{raw!r} is not host:port")
    host = host.strip("[]") or "0.0.0.0"
    try:
        # The bound host is the endpoint URL's by default: one that no reader accepts
        # in a record (１２７.0.0.1, which the resolver folds to 127.0.0.1, bound and
        # registered an endpoint every instance skipped as malformed) is refused here.
        check_url(f"http://{host_port(host, 1)}")
    except MalformedRecord:
        raise ValueError(f"{raw!r}: {host!r} is not an IP address or an ASCII host "
                         "name") from None
    return host_port(host, int(port))


def _size(raw: str) -> int:
    value = _count(raw)
    if value < 256:
        raise ValueError(f"{raw} is below the smallest sensible limit (256 bytes)")
    return value


def _header_count(raw: str) -> int:
    value = _count(raw)
    if value < 1:
        raise ValueError(f"{raw} would refuse every request (Host is a field): at least 1")
    return value


def _max_connections(raw: str) -> int:
    """0 or 'auto': from the descriptor limit (see Settings.connection_cap)."""
    if raw.strip().lower() == "auto":
        return 0
    return _count(raw)


#: the window of --busy-poll auto, when it polls (microseconds)
AUTO_BUSY_POLL_US = 50


def _busy_poll(raw: str) -> int | str:
    if raw.strip().lower() == "auto":
        return "auto"
    try:
        value = _count(raw)
    except ValueError as exc:
        raise ValueError(f"{exc} (microseconds, or auto)") from None
    if value > 1000:
        raise ValueError(f"{raw} is more than 1000 microseconds (the window is to bridge "
                         "the gaps between messages, not to keep a core busy)")
    return value


def _secret(raw: str) -> str:
    value = raw.strip()
    if len(value) < 16:
        raise ValueError("must be at least 16 characters (it signs the hop marker)")
    return value


def _file_path(raw: str) -> str:
    return _text(raw)


def _directory(raw: str) -> str:
    """An existing folder, made absolute (workers start elsewhere)."""
    value = os.path.abspath(os.path.expanduser(_text(raw)))
    if not os.path.isdir(value):
        raise ValueError(f"{raw.strip()!r} is not a folder")
    return value


def _path_list(raw: str) -> tuple[str, ...]:
    """Comma list of folders, made absolute from the folder cluster was started in."""
    return tuple(os.path.abspath(os.path.expanduser(p.strip()))
                 for p in raw.split(",") if p.strip())


def _access_log(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ACCESS_LOG_FORMATS:
        raise ValueError(f"{raw!r} is not one of {', '.join(ACCESS_LOG_FORMATS)}")
    return value


def _token(raw: str) -> str:
    value = raw.strip()
    if len(value) < 16:
        raise ValueError("must be at least 16 characters (it opens the admin pages)")
    return value


def _placement(raw: str) -> str:
    value = raw.strip().lower()
    if value not in PLACEMENTS:
        raise ValueError(f"{raw!r} is not one of {', '.join(PLACEMENTS)}")
    return value


def _samesite(raw: str) -> str:
    value = raw.strip().lower()
    if value not in SAMESITE:
        raise ValueError(f"{raw!r} is not one of {', '.join(SAMESITE)}")
    return value


def _switch(raw: str) -> bool:
    value = _SWITCH.get(raw.strip().lower())
    if value is None:
        raise ValueError(f"{raw!r} is not on or off")
    return value


def _margin(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{raw!r} is not a number") from None
    if not 1.0 < value <= 100.0:  # NaN fails this too
        raise ValueError(f"{raw} is outside 1..100 (more than 1: a share above the mean)")
    return value


def _rate(raw: str) -> float:
    value = _positive_seconds(raw.strip()) if raw.strip() else 0.0
    if value > 100_000:
        raise ValueError(f"{raw} is more than 100000 per second")
    return value


def _log_level(raw: str) -> str:
    value = raw.strip().lower()
    if value not in LOG_LEVELS:
        raise ValueError(f"{raw!r} is not one of {', '.join(LOG_LEVELS)}")
    return value


def _path_prefix(raw: str) -> str:
    value = "/" + raw.strip().strip("/")
    if value == "/":
        raise ValueError("must name a path such as /sockjs")
    return value


def _module_callable(raw: str) -> str:
    module, sep, attr = raw.strip().partition(":")
    if not module or not sep or not attr:
        raise ValueError(f"{raw!r} is not module:callable")
    return raw.strip()


@dataclass(frozen=True)
class EndpointChoice:
    """This instance's endpoint URL and, for the start-up log, how it was chosen."""

    url: str
    reason: str


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


#: how long the DNS SRV lookup of a mongodb+srv:// name may take at start
SRV_LOOKUP_SECONDS = 5.0


def store_host(discovery_url: str | None) -> tuple[str, int] | None:
    """(host, port) of the first host of a MongoDB URL, or None for a store on this host.

    The embedded store, and a MongoDB whose first host is a loopback address, are local.
    A host name is resolved; one that resolves only to loopback addresses is local too.
    A mongodb+srv:// name stands for the hosts of its DNS SRV records (see srv_seed).
    """
    if not discovery_url or not discovery_url.startswith(("mongodb://", "mongodb+srv://")):
        return None
    rest = discovery_url.split("://", 1)[1]
    authority = re.split(r"[/?]", rest, maxsplit=1)[0].rpartition("@")[2]
    first = authority.split(",")[0]
    if first.startswith("["):
        host, _, tail = first[1:].partition("]")
        port_text = tail.lstrip(":")
    else:
        host, _, port_text = first.partition(":")
    port = int(port_text) if port_text.isdigit() else 27017
    if discovery_url.startswith("mongodb+srv://") and host:
        query = rest.partition("?")[2].partition("#")[0]
        options = {key.lower(): value for key, value in parse_qsl(query)}
        seed = srv_seed(host, options.get("srvservicename") or "mongodb")
        if seed is not None:
            host, port = seed
    if not host or _is_loopback(host):
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:  # a name: local when every address it has is loopback
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            return (host, port)  # unresolvable now: route_address reports it
        if infos and all(_is_loopback(str(info[4][0])) for info in infos):
            return None
    return (host, port)


def srv_seed(name: str, service: str = "mongodb") -> tuple[str, int] | None:
    """The first host of the seed list a mongodb+srv:// ``name`` stands for: the target
    of its best ``_<service>._tcp.<name>`` SRV record, read as pymongo reads it (with
    dnspython). None when they cannot be read (pymongo then says why). The name itself
    is a service, not a host: it need not have an address, and taking it for a host
    refused a wildcard bind ("no route to the discovery store host") whenever it had
    none."""
    try:
        import dns.resolver

        answers = dns.resolver.resolve(f"_{service}._tcp.{name}", "SRV",
                                       lifetime=SRV_LOOKUP_SECONDS)
    except Exception:  # noqa: BLE001 - no dnspython, NXDOMAIN, a timeout: not found
        return None
    # (a target of "." says the service is not offered there, RFC 2782)
    records = sorted((record for record in answers if str(record.target) != "."),
                     key=lambda record: (record.priority, -record.weight))
    if not records:
        return None
    best = records[0]
    return str(best.target).rstrip("."), int(best.port)


def route_address(host: str, port: int) -> str:
    """This host's address on the route toward ``host``: the local address of a UDP
    socket connect()ed there (connecting a datagram socket sends no packet).
    Raises OSError when the name does not resolve or there is no route."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, kind, proto) as sock:
        sock.connect(address)
        return str(sock.getsockname()[0])


def setting(
    default: Any,
    parse: Callable[[str], Any],
    help: str,
    metavar: str = "",
    secret: bool = False,
) -> Any:
    return field(
        default=default,
        repr=not secret,  # never printed: a URL's password, the cluster secret
        metadata={"parse": parse, "help": help, "metavar": metavar, "secret": secret},
    )


@dataclass(frozen=True)
class Settings:
    """The resolved configuration of one instance (see the module docstring)."""

    discovery_url: str | None = setting(
        None,
        _discovery_url,
        "where instances find each other: mongodb://…/db (production, ideally a "
        "replica set) or sqlite:///path; unset: the embedded store of this host",
        "URL",
        secret=True,
    )
    service: str | None = setting(
        None, _service_name, "name of the service this instance belongs to", "NAME"
    )
    endpoint_url: str | None = setting(
        None,
        _http_url,
        "URL other instances use to reach this one directly; default: from --bind",
        "URL",
    )
    balancer_url: str | None = setting(
        None,
        _http_url,
        "public URL of this instance when browsers may reach it directly as a balancer",
        "URL",
    )
    ui_service: str | None = setting(
        None,
        _service_name,
        "service whose UI this instance serves (by proxying); default: --service",
        "NAME",
    )
    public_services: tuple[str, ...] = setting(
        (),
        _service_list,
        "comma list of services outside clients may reach through this instance",
        "A,B",
    )
    self_weight: float = setting(
        1.0,
        _fraction,
        "share of requests this instance serves itself, 0..1 (1: a fair share, "
        "0: proxy everything)",
        "W",
    )
    placement: str = setting(
        "load",
        _placement,
        "how a new session (no sticky cookie) picks its endpoint: load (the less loaded "
        "of two random endpoints, by the load each publishes plus this balancer's own "
        "recent placements) or random (uniform, as meteorhacks:cluster)",
        "load|random",
    )
    rebalance: bool = setting(
        False,
        _switch,
        "close some of this instance's WebSockets with 1001 while it holds more than "
        "--rebalance-margin times its service's mean (after a newcomer joins), so their "
        "clients reconnect to less loaded instances",
        "on|off",
    )
    rebalance_margin: float = setting(
        1.25,
        _margin,
        "rebalancing starts above this many times the mean WebSockets per instance of "
        "the service, and stops at the mean",
        "X",
    )
    rebalance_rate: float = setting(
        10.0,
        _rate,
        "most WebSockets closed per second while rebalancing",
        "N",
    )
    app_version: str | None = setting(
        None,
        _version,
        f"app version this instance advertises in its record, for version-aware routing "
        f"(unset: ${APP_VERSION_ENV}, else none)",
        "VERSION",
    )
    version_order: tuple[str, ...] = setting(
        (),
        _version_list,
        "comma list of app versions, oldest first: new sessions go to the newest with live "
        "endpoints (unset, and for unlisted versions: version sort)",
        "V1,V2",
    )
    version_weights: tuple[tuple[str, float], ...] = setting(
        (),
        _version_weights,
        "canary split of new sessions by app version, e.g. 1.2.0=90,1.3.0=10 (unset: all "
        "to the newest version)",
        "V=W,V=W",
    )
    drain_seconds: float = setting(
        30.0,
        _non_negative_seconds,
        "seconds a draining instance (cluster drain, SIGUSR2) keeps serving the sessions it "
        "has before it closes its WebSockets with 1001 and stops",
        "SECONDS",
    )
    drain_close_seconds: float = setting(
        5.0,
        _non_negative_seconds,
        "seconds over which a draining instance spreads the 1001 closes of its WebSockets, "
        "so their clients do not all reconnect at once",
        "SECONDS",
    )
    graceful_timeout: float = setting(
        10.0,
        _non_negative_seconds,
        "seconds a stop (SIGTERM, Ctrl-C) lets the requests in flight finish; then their "
        "connections are closed unanswered (under gunicorn: gunicorn's --graceful-timeout)",
        "SECONDS",
    )
    workers_count: int = setting(
        1, _workers,
        "worker processes of `cluster serve` (N, at most 8 per core, or auto: one per "
        "core, or per core of a CPU quota on its cgroup)",
        "N",
    )
    ping_interval: float = setting(
        5.0, _ping_seconds, "seconds between heartbeats", "SECONDS"
    )
    expiry_grace: float = setting(
        5.0,
        _positive_seconds,
        "an endpoint whose heartbeat is older than its ping interval plus this is dead",
        "SECONDS",
    )
    bind: str = setting("127.0.0.1:8000", _bind, "host:port to listen on ([::1]:8000 for IPv6)",
                        "HOST:PORT")
    app: str | None = setting(
        None,
        _module_callable,
        "the local WSGI app as module:callable; unset: balancer only",
        "MODULE:CALLABLE",
    )
    chdir: str | None = setting(
        None,
        _directory,
        "change to this folder before importing --app (as gunicorn's --chdir); the "
        "current folder is always searched first",
        "DIR",
    )
    pythonpath: tuple[str, ...] = setting(
        (),
        _path_list,
        "comma list of folders put in front of the module search path before importing "
        "--app (as gunicorn's --pythonpath)",
        "DIR,DIR",
    )
    connect_timeout: float = setting(
        5.0, _positive_seconds, "seconds to connect to an endpoint", "SECONDS"
    )
    read_timeout: float = setting(
        300.0,
        _positive_seconds,
        "seconds an endpoint may stay silent (long enough for long polls)",
        "SECONDS",
    )
    retries: int = setting(
        2, _count, "other endpoints to try when one refuses a connection", "N"
    )
    eject_seconds: float = setting(
        10.0,
        _positive_seconds,
        "longest time a refusing endpoint is left out of this instance's picks (ejections "
        "start at 1 s and double; one that closes connections unanswered stays out while "
        "probes see it do so)",
        "SECONDS",
    )
    sockjs_prefix: str = setting(
        "/sockjs", _path_prefix, "path prefix of the session protocol (SockJS/DDP)", "PATH"
    )
    cookie_samesite: str = setting(
        "lax",
        _samesite,
        "SameSite of the sticky cookies (cluster-endpoint::, cluster-version::): lax, "
        "strict, or none for browser clients on another site that send credentials "
        "(cross-site Socket.IO with withCredentials); none adds Secure, so browsers then "
        "keep the cookie only over https",
        "lax|strict|none",
    )
    trusted_proxies: tuple[str, ...] = setting(
        ("127.0.0.1", "::1"),
        _trusted_list,
        "addresses or networks (10.0.0.0/8) whose X-Forwarded-*, hop marker and admin "
        "page requests are believed",
        "ADDR,ADDR",
    )
    secret: str | None = setting(
        None,
        _secret,
        "shared secret of the cluster, at least 16 characters: signs the hop marker "
        "between instances (unset: the "
        "marker is honoured only from live endpoints' addresses and --trusted-proxies)",
        "TEXT",
        secret=True,
    )
    port_file: str | None = setting(
        None,
        _file_path,
        "write the bound host:port to this file once listening (for --bind HOST:0)",
        "PATH",
    )
    pid_file: str | None = setting(
        None,
        _file_path,
        "write this process's PID to this file once listening (cluster drain reads it)",
        "PATH",
    )
    header_timeout: float = setting(
        10.0,
        _positive_seconds,
        "seconds a client may take to send a whole request head",
        "SECONDS",
    )
    keepalive_timeout: float = setting(
        60.0,
        _positive_seconds,
        "seconds an idle keep-alive client connection stays open",
        "SECONDS",
    )
    write_timeout: float = setting(
        60.0,
        _positive_seconds,
        "seconds a client may refuse to read, or stay silent in the middle of a request "
        "body or a WebSocket frame, before its connection is closed",
        "SECONDS",
    )
    max_connections: int = setting(
        0,
        _max_connections,
        "concurrent client connections per process, WebSockets included; past it a "
        "short 503 (auto: from the descriptor limit)",
        "N",
    )
    busy_poll: int | str = setting(
        "auto",
        _busy_poll,
        "longest the event loop polls, instead of sleeping, after I/O, in microseconds: "
        "saves waking a halted core per message; the window adapts to the gaps between "
        "events, so an idle or lightly loaded instance does not poll, nor one whose core "
        "another process keeps busy (0: never, at most "
        f"1000; auto: {AUTO_BUSY_POLL_US} when this instance's worker processes leave "
        "a core free, of the host's or of a CPU quota on its cgroup, else 0; see "
        "docs/benchmarks.md)",
        "MICROSECONDS",
    )
    max_request_line: int = setting(
        8192, _size, "longest request line in bytes (longer: 414)", "BYTES"
    )
    max_header_line: int = setting(
        8192, _size, "longest request header line in bytes (longer: 431)", "BYTES"
    )
    max_head_size: int = setting(
        65536, _size, "largest request head in bytes (larger: 431)", "BYTES"
    )
    max_header_count: int = setting(
        100, _header_count, "most request header fields (more: 431)", "N"
    )
    max_websocket_message: int = setting(
        16 * 1024 * 1024, _size,
        "largest WebSocket message a local app receives, in bytes (larger: the socket "
        "is closed with 1009 before the message is read)", "BYTES"
    )
    admin_prefix: str = setting(
        "/_cluster",
        _path_prefix,
        "path prefix of the dashboard, status and metrics pages (answered only to "
        "--trusted-proxies or with --admin-token)",
        "PATH",
    )
    admin_token: str | None = setting(
        None,
        _token,
        "token, at least 16 characters, that opens the admin pages from any address "
        "(?token=… or Authorization: Bearer …)",
        "TEXT",
        secret=True,
    )
    access_log: str = setting(
        "off", _access_log, "one line per request: off, combined or json", "FORMAT"
    )
    access_log_file: str | None = setting(
        None,
        _file_path,
        "file the access log is appended to (default: standard output)",
        "PATH",
    )
    log_level: str = setting("info", _log_level, "debug, info, warning or error", "LEVEL")

    # --- derived values -------------------------------------------------------

    @property
    def bind_address(self) -> tuple[str, int]:
        host, _, port = self.bind.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def own_endpoint_url(self) -> str:
        """The URL this instance registers (see :meth:`endpoint_choice`)."""
        return self.endpoint_choice().url

    def endpoint_choice(self, strict: bool = True) -> EndpointChoice:
        """The configured endpoint URL, or one made from --bind and the store's place.

        With a store on another host and no --endpoint-url, a wildcard bind registers
        the local address of the route toward the store (other hosts reach us the way
        we reach it), and a loopback bind is refused: every other host would proxy to
        its *own* loopback port. ``strict=False`` (observers, which register nothing)
        falls back to 127.0.0.1 instead of raising :class:`ConfigError`.
        """
        if self.endpoint_url:
            return EndpointChoice(self.endpoint_url, "set by --endpoint-url")
        host, port = self.bind_address
        store = store_host(self.discovery_url)
        if host in ("0.0.0.0", "::", ""):
            if store is None:
                host, why = "127.0.0.1", "from --bind, the store is on this host"
            else:
                try:
                    host = route_address(*store)
                    why = f"the local address of the route to the store host {store[0]}"
                except OSError as exc:
                    if strict:
                        raise ConfigError(
                            "--endpoint-url (CLUSTER_ENDPOINT_URL)",
                            f"not set, and no route to the discovery store host {store[0]} "
                            f"to take this host's address from ({exc.strerror or exc})",
                        ) from None
                    host, why = "127.0.0.1", "from --bind (no route to the store)"
        else:
            why = "from --bind"
            if strict and store is not None and _is_loopback(host):
                raise ConfigError(
                    "--endpoint-url (CLUSTER_ENDPOINT_URL)",
                    f"not set, and --bind {self.bind} would register a loopback endpoint "
                    f"while the discovery store {store[0]} is on another host; bind "
                    "0.0.0.0 or a routable address, or set --endpoint-url",
                )
        return EndpointChoice(f"http://{host_port(host, port)}", why)

    @property
    def connection_cap(self) -> int:
        """--max-connections, or with 'auto' as many as the descriptor limit allows:
        a proxied connection holds two descriptors (client and endpoint), and 64 are
        kept for the store, the listener, logs, new upstream connects and the pipes
        large answers are spliced through (at most 16: cluster.proxy.pipes)."""
        if self.max_connections:
            return self.max_connections
        try:
            import resource

            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        except (ImportError, OSError, ValueError):
            return 1000
        if soft == resource.RLIM_INFINITY:
            return 100_000
        return max(16, (soft - 64) // 2)

    def busy_poll_microseconds(self, processes: int | None = None) -> int:
        """--busy-poll for a process of an instance of ``processes`` worker processes
        (default: --workers-count). 'auto' polls only when they leave a core free:
        where they fill every core, a process polling in its gaps takes CPU from its
        siblings (and the load generator beside them) that they would have used. The
        cores are those of a CPU quota when there is one (cluster.cpus): polling
        there would spend the quota and get the instance throttled."""
        if self.busy_poll != "auto":
            return int(self.busy_poll)
        processes = self.workers_count if processes is None else processes
        return AUTO_BUSY_POLL_US if processes < usable_cores() else 0

    @property
    def own_ui_service(self) -> str | None:
        return self.ui_service or self.service

    @property
    def own_app_version(self) -> str:
        """--app-version, else $APP_VERSION when it is a valid version, else none."""
        if self.app_version:
            return self.app_version
        try:
            return check_version(os.environ.get(APP_VERSION_ENV, "").strip())
        except MalformedRecord:
            return ""

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    # --- construction -----------------------------------------------------------

    @classmethod
    def load(
        cls,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> Settings:
        """Settings for library use: keyword overrides > ``args`` > env > defaults.

        Raises :class:`ConfigError` for a bad value. A keyword given None is left out
        (its value then comes from ``args``, env or the default); a number or a bool is
        checked as its text would be (``cookie_samesite=None`` or ``=1`` reached the
        request path unchecked, and failed there with a traceback).
        """
        parser = build_parser(None, raise_errors=True)
        namespace, _ = parser.parse_known_args(
            list(args), env_vars=os.environ if env is None else env
        )
        settings = settings_from_namespace(namespace)
        parsed: dict[str, Any] = {}
        for name, value in overrides.items():
            spec = _field(name)
            if value is None:
                continue
            if isinstance(value, (list, tuple)):
                value = tuple(value)
            else:
                value = _parse_one(spec, value if isinstance(value, str) else _raw(value))
            parsed[name] = value
        return settings.replace(**parsed)


def to_environment(settings: Settings) -> dict[str, str]:
    """``CLUSTER_*`` variables that make :meth:`Settings.load` give ``settings`` back."""
    env: dict[str, str] = {}
    for spec in fields():
        value = getattr(settings, spec.name)
        if value is None:
            continue
        env[env_of(spec.name)] = _raw(value)
    return env


def _raw(value: Any) -> str:
    """A setting's value as the text its parser reads back."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(f"{v[0]}={v[1]:g}" if isinstance(v, tuple) else str(v) for v in value)
    return str(value)


def fields() -> Iterator[dataclasses.Field[Any]]:
    yield from dataclasses.fields(Settings)


def _field(name: str) -> dataclasses.Field[Any]:
    for spec in fields():
        if spec.name == name:
            return spec
    raise TypeError(f"unknown setting {name!r}")


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_of(name: str) -> str:
    return "CLUSTER_" + name.upper()


def _parse_one(spec: dataclasses.Field[Any], raw: str) -> Any:
    try:
        return spec.metadata["parse"](raw)
    except ValueError as exc:
        raise ConfigError(f"{flag_of(spec.name)} ({env_of(spec.name)})", str(exc)) from None


def settings_from_namespace(namespace: Any) -> Settings:
    """Parse the raw strings configargparse collected; raises :class:`ConfigError`."""
    values: dict[str, Any] = {}
    for spec in fields():
        raw = getattr(namespace, spec.name, None)
        if raw is not None:
            values[spec.name] = _parse_one(spec, raw)
    return Settings(**values)


class _Parser(configargparse.ArgParser):  # type: ignore[misc]
    """ArgParser whose errors are one line, or an exception for library callers."""

    raise_errors = False

    def error(self, message: str) -> NoReturn:
        if self.raise_errors:
            raise ConfigError("arguments", message)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


#: a config file is a few dozen lines; a larger one is refused rather than read whole
MAX_CONFIG_BYTES = 1 << 20
_CONFIG_KEY = re.compile(r"[^:=;#\s]+")


def _open_config_file(path: str) -> io.StringIO:
    """The text of the config file at ``path``; raises ValueError (configargparse makes
    it one line naming the file, exit status 2). Only a regular file of UTF-8 text:
    reading /dev/zero or a FIFO would never end, and a binary or UTF-16 file used to
    end in a UnicodeDecodeError traceback."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError("not a regular file")
    with open(path, "rb") as found:
        data = found.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"larger than {MAX_CONFIG_BYTES // 1024} KiB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte {exc.start})") from None
    stream = io.StringIO(text)
    stream.name = path
    return stream


class _ConfigFileParser(configargparse.DefaultConfigFileParser):  # type: ignore[misc]
    """configargparse's ``key = value`` lines, stricter where it is silent: a key set
    twice (the last one won) and a second ``[section]`` (sections are comments to it,
    so two of them merged) are errors naming the key or section, the line and file."""

    def get_syntax_description(self) -> str:
        # configargparse's own ("stuff=[a,b,c]", a shortened link) promised lists,
        # which no setting here takes: a comma list is one value (a,b)
        return ("Config file syntax: one 'key = value' per line, the key a flag without "
                "'--' (bind = 0.0.0.0:8000), lists as commas (public-services = a,b), "
                "'#' comments, each key at most once.")

    def parse(self, stream: Any) -> Any:
        name = getattr(stream, "name", "config file")
        lines = list(stream)
        first_line: dict[str, int] = {}
        section: tuple[int, str] | None = None
        for number, line in enumerate(lines, 1):
            text = line.strip()
            if text.startswith("["):
                if section is not None:
                    raise configargparse.ConfigFileParserException(
                        f"{name}: line {number}: {text} follows {section[1]} (line "
                        f"{section[0]}); sections are not supported, so keep one "
                        f"settings block per file")
                section = (number, text)
                continue
            key = _CONFIG_KEY.match(text)
            if not key or text[0] in "#;" or text.startswith("---"):
                continue
            setting = key.group().lstrip("-")
            if setting in first_line:
                raise configargparse.ConfigFileParserException(
                    f"{name}: line {number}: {setting!r} is set twice (first on line "
                    f"{first_line[setting]})")
            first_line[setting] = number
        return super().parse(io.StringIO("".join(lines)))


def build_parser(
    command: str | None,
    raise_errors: bool = False,
) -> configargparse.ArgParser:
    """The parser for ``cluster COMMAND``; every setting is an option of each."""
    prog = "cluster" if command is None else f"cluster {command}"
    description = (
        "Service discovery and load balancing for Python web apps on gevent."
        if command is None
        else COMMANDS[command]
    )
    commands = "\n".join(f"  {name:9} {text}" for name, text in COMMANDS.items())
    parser = _Parser(
        prog=prog,
        description=description,
        epilog=("commands:\n" + commands) if command is None else None,
        formatter_class=configargparse.RawDescriptionHelpFormatter,
        default_config_files=[],
        auto_env_var_prefix=None,
        args_for_setting_config_path=["-c", "--config"],
        config_file_open_func=_open_config_file,
        config_file_parser_class=_ConfigFileParser,
        config_arg_help_message="config file (key = value lines, see conf/cluster.conf)",
        config_arg_is_required=False,
        ignore_unknown_config_file_keys=False,
    )
    parser.raise_errors = raise_errors
    # Explicit, or argparse would read --version as an ambiguous prefix of --version-order.
    parser.add_argument("--version", action="version", version=f"cluster {__version__}",
                        help="print the version and exit")
    for spec in fields():
        default = spec.default
        shown = default if default in (None, "", ()) else _raw(default)
        parser.add_argument(
            flag_of(spec.name),
            env_var=env_of(spec.name),
            dest=spec.name,
            default=None,
            metavar=spec.metadata["metavar"] or None,
            help=spec.metadata["help"]
            + (f" (default: {shown})" if shown not in (None, "", ()) else ""),
        )
    if command == "status":
        parser.add_argument("--json", action="store_true", help="print JSON, not a table")
        parser.add_argument(
            "--all", action="store_true", help="also list records that have expired"
        )
        parser.add_argument(
            "--watch", action="store_true",
            help="redraw the table every second, with each endpoint's requests/s, until Ctrl-C"
        )
    if command == "demo":
        parser.add_argument(
            "--instances", type=int, default=3, help="how many instances to start (default 3)"
        )
    if command == "drain":
        parser.add_argument("--pid", type=int, metavar="PID",
                            help="the instance's process (SIGUSR2); default: --pid-file")
        parser.add_argument(
            "--url", metavar="URL", type=_url_option(),
            help="the instance's URL: POST URL/_cluster/drain (from --trusted-proxies, "
                 "or with --admin-token) instead of a signal")
        parser.add_argument(
            "--wait", action="store_true",
            help="return only once the instance has stopped (its process exited, or with "
                 "--url its record left the table)")
    if command == "register":
        parser.add_argument(
            "--health-url",
            metavar="URL",
            type=_url_option(query=True),
            help="keep the record only while this URL answers below 500",
        )
    return parser


def parse_command_line(argv: Sequence[str]) -> tuple[str | None, Settings, Any]:
    """``cluster [COMMAND] [options]`` → (command, settings, namespace).

    Exits with status 2 and one line on stderr for a bad setting.
    """
    argv = list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    rest = argv[1:] if command else argv
    parser = build_parser(command)
    if command is None and rest and not rest[0].startswith("-"):
        parser.error(f"unknown command {rest[0]!r} (choose from {', '.join(COMMANDS)})")
    namespace = parser.parse_args(rest)
    try:
        settings = settings_from_namespace(namespace)
    except ConfigError as exc:
        parser.error(str(exc))
    return command, settings, namespace


def example_config() -> str:
    """The text of conf/cluster.conf, generated from the settings table."""
    lines = [
        "# Example configuration for `cluster serve -c conf/cluster.conf`.",
        "# Every setting is listed, commented out, with its default. Each one can also",
        "# be given as a flag (--name) or an environment variable (CLUSTER_NAME);",
        "# precedence: flag > environment > this file > default.",
        "",
    ]
    for spec in fields():
        default = spec.default
        shown = default if default in (None, "", ()) else _raw(default)
        lines.append(f"# {spec.metadata['help']}  [{env_of(spec.name)}]")
        key = spec.name.replace("_", "-")
        lines.append(f"# {key} = {'' if shown in (None, ()) else shown}")
        lines.append("")
    return "\n".join(lines)


def settings_markdown() -> str:
    """The settings table of the README, generated from the settings table."""
    rows = ["| flag | environment | default | meaning |", "| --- | --- | --- | --- |"]
    for spec in fields():
        default = spec.default
        shown = default if default in (None, "", ()) else _raw(default)
        shown = "" if shown in (None, "", ()) else f"`{shown}`"
        rows.append(f"| `{flag_of(spec.name)}` | `{env_of(spec.name)}` | {shown} | "
                    f"{spec.metadata['help']} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # pragma: no cover - regenerates conf/cluster.conf
    sys.stdout.write(example_config())
