"""Endpoint records in the meteorhacks:cluster shape, and their validation.

A record is one document per endpoint in the ``clusterEndpoints`` collection::

    {serviceName, endpoint, endpointHash, balancer, timestamp, pingInterval}

``timestamp`` is the store's own clock at the last heartbeat and ``pingInterval`` is
in milliseconds, so Meteor instances and ours can read each other's records.

Our instances may add fields that meteorhacks ignores: ``draining`` (true while the
instance takes no new sessions before it stops), ``appVersion`` (the app version it
runs, for version-aware routing) and ``load`` (its load, for placement: cluster.load).
A record without them is a live, unversioned endpoint of unknown load.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlsplit

from cluster.load import Load, parse_load

COLLECTION = "clusterEndpoints"


def endpoint_hash(endpoint_url: str) -> str:
    """sha1 hex of the endpoint URL, as meteorhacks:cluster computes it."""
    return hashlib.sha1(endpoint_url.encode("utf-8")).hexdigest()


class MalformedRecord(ValueError):
    """A discovery document that does not have the meteorhacks shape."""


#: Limits on what another writer may put in the shared store (see check_url and
#: parse_record). A record outside them is skipped with one warning: a 2 MB URL, a
#: port out of range or a ping interval of 30,000 years must not reach routing or logs.
MAX_URL_LENGTH = 2048
MIN_PING_MS = 100
MAX_PING_MS = 3_600_000
#: a heartbeat stamped further ahead of the store's clock than this is not believed
MAX_FUTURE = dt.timedelta(hours=1)
SERVICE_NAME = re.compile(r"[A-Za-z0-9._:-]{1,128}")
#: one label of a host name (urlsplit lowercases the name); the IDNA codec that name
#: resolution uses refuses an empty label and one over 63 characters
_HOST_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
MAX_HOSTNAME_LENGTH = 253
#: ends the problem text of a record kept without one of its malformed optional fields
FIELD_IGNORED = "ignored, endpoint kept"
#: ends the problem text of a record kept without its malformed balancer
BALANCER_IGNORED = "balancer " + FIELD_IGNORED
#: an app version: what ``appVersion`` and ``--app-version`` may hold (cookie-safe, and
#: free of the ``=`` and ``,`` that ``--version-weights`` uses)
APP_VERSION = re.compile(r"[A-Za-z0-9._+~-]{1,64}")
#: ends the problem text of a record kept without its malformed load figures
LOAD_IGNORED = "load " + FIELD_IGNORED
#: how much of a hostile value a log line or a problem text shows
SHOWN_CHARS = 200


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``value`` safe for one log line: ASCII-escaped (no raw CR/LF) and truncated.

    A truncated text ends with its full length and a digest, so two long values that
    share a prefix still read (and deduplicate) as different.
    """
    try:
        text = ascii(value)
    except Exception as exc:  # noqa: BLE001 - a hostile object's __repr__ may raise anything
        return f"<unprintable {type(value).__name__}: {type(exc).__name__}>"
    if len(text) <= limit:
        return text
    digest = hashlib.sha1(text.encode("ascii")).hexdigest()[:12]
    return f"{text[:limit]}... ({len(text)} chars, sha1 {digest})"


def check_url(url: object, what: str = "URL", query: bool = False) -> str:
    """``url`` when it is a usable http(s) base URL; raises :class:`MalformedRecord`.

    Usable: a string of at most 2 KiB of printable ASCII (no whitespace or control
    characters), scheme http or https, a host name (see :func:`is_host_name`) or IP
    address, a port (explicit or implied by the scheme) in 1..65535, no credentials,
    and no query or fragment (unless ``query``: a URL to fetch, not a base URL).
    """
    if not isinstance(url, str):
        raise MalformedRecord(f"{what} {shown(url, 60)} is not a string")
    if len(url) > MAX_URL_LENGTH:
        raise MalformedRecord(f"{what} {shown(url, 60)} is longer than {MAX_URL_LENGTH} chars")
    if not all("!" <= c <= "~" for c in url):
        raise MalformedRecord(
            f"{what} {shown(url)} has whitespace, control or non-ASCII characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # a port out of range or not a number, a bad IPv6 literal
        raise MalformedRecord(f"{what} {shown(url)} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise MalformedRecord(f"{what} {shown(url)} is not an http(s) URL")
    if "@" in parts.netloc:
        raise MalformedRecord(f"{what} {shown(_redacted(url))} carries credentials")
    if not query and ("?" in url or "#" in url):
        raise MalformedRecord(f"{what} {shown(url)} has a query or a fragment")
    if port == 0 or parts.netloc.endswith(":"):
        raise MalformedRecord(f"{what} {shown(url)} has a port out of range")
    if not _valid_host(parts.hostname, parts.netloc):
        raise MalformedRecord(f"{what} {shown(url)} has no valid host")
    return url


_USERINFO = re.compile(r"//[^/?#]*@")


def _redacted(text: str) -> str:
    """``text`` with the credentials of any URL in it replaced: logs must not keep them."""
    return _USERINFO.sub("//***@", text)


def _valid_host(hostname: str | None, netloc: str) -> bool:
    if not hostname:
        return False
    if netloc.startswith("["):
        try:
            ipaddress.IPv6Address(hostname)
        except ValueError:
            return False
        return True
    return is_host_name(hostname)


def is_host_name(hostname: str) -> bool:
    """True for a DNS name (or IPv4 address) that resolvers accept: labels of 1-63 of
    ``a-z 0-9 _ -``, at most 253 characters in all, one trailing dot allowed."""
    name = hostname[:-1] if hostname.endswith(".") else hostname
    return (0 < len(name) <= MAX_HOSTNAME_LENGTH
            and all(_HOST_LABEL.fullmatch(label) for label in name.split(".")))


def is_http_url(url: object) -> bool:
    """True when :func:`check_url` accepts ``url``."""
    try:
        check_url(url)
    except MalformedRecord:
        return False
    return True


def check_version(version: object) -> str:
    """``version`` when it is a usable app version; raises :class:`MalformedRecord`."""
    if not isinstance(version, str) or APP_VERSION.fullmatch(version) is None:
        raise MalformedRecord(
            f"appVersion {shown(version, 60)} is not 1-64 of A-Z a-z 0-9 . _ + ~ -")
    return version


def check_service(name: object) -> str:
    """``name`` when it is a usable service name; raises :class:`MalformedRecord`."""
    if not isinstance(name, str) or SERVICE_NAME.fullmatch(name) is None:
        raise MalformedRecord(
            f"serviceName {shown(name, 60)} is not 1-128 of A-Z a-z 0-9 . _ : -")
    return name


@dataclass(frozen=True)
class Endpoint:
    """One live instance of a service as last seen in the discovery store."""

    service: str
    url: str
    hash: str
    balancer: str | None
    timestamp: dt.datetime
    ping_interval: float  # seconds
    #: takes no new sessions: it is about to stop (record field ``draining``)
    draining: bool = False
    #: the app version it runs, "" when it does not say (record field ``appVersion``)
    version: str = ""
    #: the load it published (cluster.load); None: unknown (none, or a malformed one)
    load: Load | None = None

    def age(self, now: dt.datetime) -> float:
        """Seconds since the last heartbeat, by the store's clock."""
        return (now - self.timestamp).total_seconds()

    def is_healthy(self, now: dt.datetime, grace: float) -> bool:
        return self.age(now) < self.ping_interval + grace


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def parse_record(doc: Mapping[str, Any], now: dt.datetime | None = None) -> Endpoint:
    """Turn a store document into an :class:`Endpoint`; a bad ``balancer`` is dropped.

    Raises :class:`MalformedRecord` naming the first problem found; extra fields are
    ignored so other writers may add their own. See :func:`check_record`.
    """
    return check_record(doc, now)[0]


def check_record(
    doc: Mapping[str, Any], now: dt.datetime | None = None
) -> tuple[Endpoint, str | None]:
    """(endpoint, problems with its optional fields or None); raises :class:`MalformedRecord`.

    Policy for a bad ``balancer`` URL: the endpoint itself passed every check, and the
    balancer only names where browsers should open SockJS sessions, so the endpoint
    is kept and the balancer dropped (the service's other balancers, or this instance,
    stand in); the problem is returned so the caller warns once. A malformed
    ``draining``, ``appVersion`` or ``load`` (fields only our instances write) is
    dropped the same way: not draining, no version, load unknown. ``now`` is the
    store's clock: a heartbeat more than an hour ahead of it would never expire.
    """
    service = check_service(doc.get("serviceName"))
    url = check_url(doc.get("endpoint"), "endpoint")
    timestamp = doc.get("timestamp")
    if not isinstance(timestamp, dt.datetime):
        raise MalformedRecord("timestamp missing or not a date")
    timestamp = _aware(timestamp)
    if now is not None and timestamp > _aware(now) + MAX_FUTURE:
        raise MalformedRecord("timestamp is more than an hour ahead of the store's clock")
    ping = doc.get("pingInterval")
    if (isinstance(ping, bool) or not isinstance(ping, (int, float))
            or not MIN_PING_MS <= ping <= MAX_PING_MS):  # NaN fails this too
        raise MalformedRecord(
            f"pingInterval {shown(ping, 60)} is not {MIN_PING_MS}..{MAX_PING_MS} ms")
    balancer = doc.get("balancer")
    problems: list[str] = []
    if balancer is not None and balancer != "":  # meteorhacks writes null or nothing
        try:
            balancer = check_url(balancer, "balancer").rstrip("/")
        except MalformedRecord as exc:
            balancer = None
            problems.append(f"{exc}; {BALANCER_IGNORED}")
    draining = doc.get("draining", False)
    if not isinstance(draining, bool):
        problems.append(f"draining {shown(draining, 60)} is not true or false; draining "
                        f"{FIELD_IGNORED}")
        draining = False
    version = doc.get("appVersion")
    if version is None or version == "":
        version = ""
    else:
        try:
            version = check_version(version)
        except MalformedRecord as exc:
            version = ""
            problems.append(f"{exc}; appVersion {FIELD_IGNORED}")
    load = None
    if "load" in doc:
        try:
            load = parse_load(doc["load"])
        except ValueError as exc:
            # Load only steers placement: an endpoint with an unknown load is still a
            # live endpoint (placement treats it as average), so it is kept.
            problems.append(f"{exc} ({shown(doc['load'], 60)}); {LOAD_IGNORED}")
    # The hash is recomputed rather than trusted: routing by a hash that does not
    # match the URL would send sessions to the wrong place.
    endpoint = Endpoint(
        service=service,
        url=url.rstrip("/"),
        hash=endpoint_hash(url),
        balancer=balancer or None,
        timestamp=timestamp,
        ping_interval=float(ping) / 1000.0,
        draining=draining,
        version=version,
        load=load,
    )
    return endpoint, "; ".join(problems) or None


def record_identity(doc: Mapping[str, Any]) -> str:
    """How a warning names a record: its ``_id``, else service@endpoint; escaped."""
    ident = doc.get("_id")
    if ident is None:
        return shown(_redacted(f"{doc.get('serviceName')}@{doc.get('endpoint')}"))
    return shown(str(ident))


def make_record(
    service: str, endpoint_url: str, balancer_url: str | None, ping_interval: float,
    *, draining: bool = False, version: str = "", load: Load | None = None,
) -> dict[str, Any]:
    """The document an instance writes for itself (timestamp set by the store).

    ``draining``, ``appVersion`` and ``load`` are written only when set, so an instance
    that uses none of them writes exactly meteorhacks' record (which ignores them).
    """
    record: dict[str, Any] = {
        "serviceName": service,
        "endpoint": endpoint_url,
        "endpointHash": endpoint_hash(endpoint_url),
        "balancer": balancer_url,
        "pingInterval": int(round(ping_interval * 1000)),
    }
    if draining:
        record["draining"] = True
    if version:
        record["appVersion"] = version
    if load is not None:
        record["load"] = load.to_doc()
    return record
