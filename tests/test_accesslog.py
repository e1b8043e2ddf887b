"""Access-log lines: the combined format plus upstream, times and retries; JSON."""

from __future__ import annotations

import json
import re

import pytest

from cluster.accesslog import AccessLogObserver, combined_line, from_settings, json_line
from cluster.config import Settings
from cluster.errors import ConfigError
from cluster.observe import RequestRecord

COMBINED = re.compile(
    r'^(?P<remote>\S+) - - \[(?P<time>[^\]]+)\] "(?P<request>(?:[^"\\]|\\.)*)" '
    r'(?P<status>\d+) (?P<sent>\d+|-) "(?P<referer>(?:[^"\\]|\\.)*)" '
    r'"(?P<agent>(?:[^"\\]|\\.)*)" upstream=(?P<upstream>\S+) '
    r'upstream_time=(?P<upstream_time>\d+\.\d{3}) total_time=(?P<total_time>\d+\.\d{3}) '
    r'retries=(?P<retries>\d+)(?P<ws> websocket=1)?$'
)


def proxied(**changes) -> RequestRecord:
    fields = dict(remote="10.0.0.9", method="GET", target="/a?b=1", version="HTTP/1.1",
                  status=200, sent=345, endpoint="http://127.0.0.1:8001", service="web",
                  upstream_seconds=0.0123, total_seconds=0.0150, retries=1,
                  referer="http://x/", user_agent='agent "quoted"')
    fields.update(changes)
    return RequestRecord(**fields)


def test_combined_line_carries_upstream_times_and_retries():
    line = combined_line(proxied(), "29/Nov/2026:08:16:41 +0000")
    match = COMBINED.match(line.rstrip("\n"))
    assert match, line
    assert match["request"] == "GET /a?b=1 HTTP/1.1"
    assert (match["status"], match["sent"], match["upstream"]) == (
        "200", "345", "http://127.0.0.1:8001")
    assert (match["upstream_time"], match["total_time"], match["retries"]) == (
        "0.012", "0.015", "1")
    assert match["agent"] == 'agent \\"quoted\\"'
    assert match["ws"] is None


def test_control_characters_cannot_forge_a_line():
    line = combined_line(proxied(target="/x\r\nfake 200", user_agent=""), "t")
    assert line.count("\n") == 1
    assert "\\x0d\\x0a" in line and '"-"' in line


def test_bytes_above_ascii_are_escaped_as_nginx_does():
    """The fields are bytes read as latin-1: written as UTF-8 they were mojibake, and
    C1 controls (NEL ends a line for str.splitlines, CSI moves a terminal) went raw."""
    raw = "/caf\xc3\xa9\x85x\x9b[2J\x7f"  # /café in UTF-8 bytes, NEL, CSI, DEL
    line = combined_line(proxied(target=raw, user_agent="\xff"), "t")
    assert line.isascii() and len(line.splitlines()) == 1
    assert "/caf\\xc3\\xa9\\x85x\\x9b[2J\\x7f" in line and '"\\xff"' in line


def test_the_admin_token_is_not_logged_in_any_spelling():
    """The door percent-decodes the path and parse_qs the field name: each spelling
    that opens the pages must be hidden."""
    from cluster.observe import without_admin_token as hide

    token = "S3CRETTOKEN0123456789"
    for target in (f"/_cluster/status?token={token}", f"/%5Fcluster/status?token={token}",
                   f"/_cluster/status?tok%65n={token}&a=1", f"/_cluster?a=1&token={token}",
                   f"/%5f%63luster/?t%6Fken={token}"):
        assert token not in hide(target, "/_cluster"), target
    assert hide("/_cluster/status?a=1", "/_cluster") == "/_cluster/status?a=1"
    assert hide(f"/app?token={token}", "/_cluster") == f"/app?token={token}"


def test_the_debug_access_log_hides_the_admin_token_too(caplog):
    from cluster.observe import DebugAccessLog

    log = DebugAccessLog("/_cluster")
    with caplog.at_level("DEBUG", logger="cluster.access"):
        log.request_done(proxied(target="/_cluster/status?token=S3CRETTOKEN0123456789"))
        log.request_done(proxied(target="/app?token=mine"))
    assert "S3CRET" not in caplog.text and "/_cluster/status?token=-" in caplog.text
    assert "/app?token=mine" in caplog.text


def test_json_line_has_every_field():
    data = json.loads(json_line(proxied(websocket=True, status=101, sent=0), 0.0))
    assert data["upstream"] == "http://127.0.0.1:8001"
    assert (data["status"], data["retries"], data["websocket"]) == (101, 1, True)
    assert data["upstream_time"] == pytest.approx(0.0123)
    assert data["total_time"] == pytest.approx(0.015)


def test_a_record_of_a_parsed_head_reads_the_same_as_one_given_its_fields():
    # The door's records decode the request line, Referer and User-Agent from the head
    # only when a log asks for them: the lines must not change.
    from cluster.http1 import parse_request_head

    head = parse_request_head(b"GET /a?b=1 HTTP/1.1\r\nHost: h\r\nreferer:  http://x/ \r\n"
                              b"User-Agent: agent \"quoted\"\r\nReferer: http://second/")
    lazy = RequestRecord.of_head(head, "10.0.0.9", 200, 345, "http://127.0.0.1:8001", "web",
                                 0.0123, 0.0150, 1)
    assert combined_line(lazy, "t") == combined_line(proxied(), "t")
    assert json_line(lazy, 0.0) == json_line(proxied(), 0.0)
    bare = RequestRecord.of_head(parse_request_head(b"GET / HTTP/1.0"), "", 0, 0, "-", "",
                                 0.0, 0.0, 0)
    assert (bare.referer, bare.user_agent, bare.version) == ("", "", "HTTP/1.0")


def test_lines_are_appended_to_the_file(tmp_path):
    path = tmp_path / "access.log"
    path.write_text("earlier line\n")
    settings = Settings.load(args=[], env={}, access_log="combined",
                             access_log_file=str(path))
    observer = from_settings(settings)
    assert observer is not None
    observer.request_done(proxied())
    observer.request_done(proxied(endpoint="local", upstream_seconds=0.0, retries=0))
    observer.close()
    lines = path.read_text().splitlines()
    assert lines[0] == "earlier line"
    assert [COMBINED.match(x)["upstream"] for x in lines[1:]] == [
        "http://127.0.0.1:8001", "local"]
    assert from_settings(Settings.load(args=[], env={})) is None


def test_unwritable_file_is_a_setting_error(tmp_path):
    with pytest.raises(ConfigError, match="--access-log-file"):
        AccessLogObserver("json", str(tmp_path / "missing" / "access.log"))


def test_bad_format_is_a_setting_error():
    with pytest.raises(ConfigError, match="--access-log"):
        Settings.load(args=[], env={}, access_log="apache")
