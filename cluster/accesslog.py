"""``--access-log combined|json``: one line per request, without debug logging.

Each line carries, besides the usual combined fields, where the request went (the
endpoint URL, ``local`` for this instance's app, ``-`` when cluster answered itself),
the upstream time (sending to the endpoint until its response head), the total time
and how many other endpoints were tried first. A WebSocket's line has status 101 and
``websocket=1``; one tunnelled to another endpoint is logged once the tunnel is set up
(its total time is the handshake's), one served by the local app when it ends.

Lines are written with one ``os.write`` to a descriptor opened with ``O_APPEND``, so
the workers of one server can share a file without interleaving their lines. The
equivalent nginx setting: ``log_format`` with ``$upstream_addr
$upstream_response_time $request_time``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Callable

from cluster.config import Settings
from cluster.errors import ConfigError
from cluster.observe import Observer, RequestRecord, without_admin_token

#: nginx's escaping: controls, DEL and every byte above ASCII as \xHH. The fields are
#: bytes read as latin-1, one character each; a C1 control (NEL, CSI) written raw would
#: end a line or move a terminal for whoever reads the log
log = logging.getLogger(__name__)

_ESCAPES = {i: f"\\x{i:02x}" for i in (*range(0x20), *range(0x7F, 0x100))}
_ESCAPES.update({ord('"'): '\\"', ord("\\"): "\\\\"})


def quoted(text: str) -> str:
    """A header value for inside double quotes, escaped as nginx does ("-" if empty)."""
    if not text:
        return "-"
    text = text.translate(_ESCAPES)
    return text if text.isascii() else text.encode("ascii", "backslashreplace").decode()


class _Clock:
    """``[29/Nov/2026:08:16:41 +0000]``, formatted once per second, not per request."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(second))
        return self._text


def combined_line(record: RequestRecord, stamp: str) -> str:
    """The combined log format plus upstream, upstream time, total time and retries."""
    # (a refused request line may lack a target or a version: no spaces for them)
    request = quoted(" ".join(p for p in (record.method, record.target, record.version) if p))
    sent = record.sent if record.sent else "-"
    return (
        f'{record.remote or "-"} - - [{stamp}] "{request}" {record.status} {sent} '
        f'"{quoted(record.referer)}" "{quoted(record.user_agent)}" '
        f"upstream={record.endpoint or '-'} upstream_time={record.upstream_seconds:.3f} "
        f"total_time={record.total_seconds:.3f} retries={record.retries}"
        f"{' websocket=1' if record.websocket else ''}\n"
    )


def json_line(record: RequestRecord, now: float) -> str:
    """The same fields as one JSON object."""
    return json.dumps({
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)),
        "remote": record.remote, "method": record.method, "target": record.target,
        "version": record.version, "status": record.status, "bytes": record.sent,
        "referer": record.referer, "user_agent": record.user_agent,
        "service": record.service, "upstream": record.endpoint,
        "upstream_time": round(record.upstream_seconds, 6),
        "total_time": round(record.total_seconds, 6), "retries": record.retries,
        "websocket": record.websocket,
    }, separators=(",", ":")) + "\n"


class AccessLogObserver(Observer):
    """Writes one line per finished request (and per ended WebSocket)."""

    def __init__(self, style: str, path: str | None = None,
                 admin_prefix: str | None = None) -> None:
        """``style`` is ``combined`` or ``json``; raises ConfigError if ``path`` cannot
        be opened. Under ``admin_prefix`` a ``token`` query field is logged as ``-``."""
        self.style = style
        self.path = path
        #: the last write failed (logged once until one succeeds)
        self.failing = False
        self.admin_prefix = admin_prefix
        if path:
            try:
                self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as exc:
                raise ConfigError("--access-log-file (CLUSTER_ACCESS_LOG_FILE)",
                                  f"cannot open {path}: {exc.strerror or exc}") from None
            self._own_fd = True
        else:
            self.fd = sys.stdout.fileno()
            self._own_fd = False
        clock = _Clock()
        self._format: Callable[[RequestRecord, float], str]
        if style == "json":
            self._format = json_line
        else:
            self._format = lambda record, now: combined_line(record, clock(now))

    def __repr__(self) -> str:
        return f"<AccessLogObserver {self.style} to {self.path or 'stdout'}>"

    def request_done(self, record: RequestRecord) -> None:
        if self.admin_prefix and "?" in record.target:
            # the record is this request's own; nothing after the log reads its target
            record._target = without_admin_token(record.target, self.admin_prefix)
        line = self._format(record, time.time()).encode("utf-8", "replace")
        try:
            os.write(self.fd, line)
        except OSError as exc:  # a full disk or a closed pipe must not fail the request
            if not self.failing:  # but the operator must hear that lines are lost
                self.failing = True
                log.warning("cannot write the access log to %s (%s): its lines are lost "
                            "until it can", self.path or "standard output",
                            exc.strerror or exc)
            return
        if self.failing:
            self.failing = False
            log.info("writing the access log to %s again", self.path or "standard output")

    def reopen(self) -> None:
        """Open ``--access-log-file`` again (SIGUSR1, after logrotate moved it away),
        as nginx does; lines written meanwhile went to the moved file. Standard output
        is left as it is. A file that cannot be opened now keeps the old one."""
        if not self._own_fd or not self.path:
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            log.warning("could not reopen the access log %s (still writing to the "
                        "old file): %s", self.path, exc.strerror or exc)
            return
        old, self.fd = self.fd, fd
        os.close(old)

    def close(self) -> None:
        if self._own_fd:
            os.close(self.fd)
            self._own_fd = False


def from_settings(settings: Settings) -> AccessLogObserver | None:
    """The access log the settings ask for, or None (``--access-log off``)."""
    if settings.access_log == "off":
        return None
    return AccessLogObserver(settings.access_log, settings.access_log_file,
                             settings.admin_prefix)
