"""The admin pages: who may read them, and what status, metrics and dashboard say."""

from __future__ import annotations

import json
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.accesslog import AccessLogObserver
from cluster.admin import Admin, dashboard_html
from cluster.config import Settings
from cluster.metrics import MetricsObserver
from cluster.node import Cluster
from cluster.observe import Observers, RequestRecord
from helpers import refused_port

TOKEN = "s3cret-token-0123456789"


@pytest.fixture
def node(sqlite_url):
    """A node in this process: it registers a URL but serves nothing there. The port is
    held (refusing) for the whole test, so no other process answers the prober that
    tries an ejected endpoint, and the ejection stays as the test made it."""
    with refused_port() as port:
        settings = Settings.load(args=[], env={}, discovery_url=sqlite_url, service="web",
                                 bind=f"127.0.0.1:{port}", ping_interval=1.0,
                                 trusted_proxies="127.0.0.1,10.1.0.0/16", admin_token=TOKEN)
        node = Cluster(settings).start(wait=5)
        yield node
        node.close()


def done(endpoint: str, status: int = 200) -> RequestRecord:
    return RequestRecord("127.0.0.1", "GET", "/", "HTTP/1.1", status, 10, endpoint, "web",
                         0.001 if endpoint != "local" else 0.0, 0.002, 0, "", "")


def test_trusted_addresses_networks_or_the_token(node):
    admin = Admin(node, node.settings, MetricsObserver())
    assert admin.allowed("127.0.0.1", "")
    assert admin.allowed("10.1.200.3", "")
    assert not admin.allowed("10.2.0.1", "")
    assert not admin.allowed("not-an-address", "")
    assert admin.allowed("192.0.2.1", f"token={TOKEN}")
    assert admin.allowed("192.0.2.1", "", f"Bearer {TOKEN}")
    assert admin.allowed("192.0.2.1", "", f"bearer {TOKEN}")
    assert not admin.allowed("192.0.2.1", "token=wrong")
    assert not admin.allowed("192.0.2.1", "", "Bearer " + TOKEN[:-1])
    assert not admin.allowed("192.0.2.1", "")
    no_token = Admin(node, node.settings.replace(admin_token=None), MetricsObserver())
    assert not no_token.allowed("192.0.2.1", f"token={TOKEN}")
    assert admin.handles("/_cluster") and admin.handles("/_cluster/metrics")
    assert not admin.handles("/_clusterx")


def test_status_has_table_health_and_traffic(node):
    metrics = MetricsObserver()
    admin = Admin(node, node.settings, Observers([AccessLogObserver("json", "/dev/null"),
                                                  metrics]))
    for _ in range(4):
        metrics.request_done(done("local"))
    metrics.request_done(done("local", 500))
    metrics.connection_opened()
    metrics.sample()
    status, content_type, body, _ = admin.respond("/_cluster/status", "")
    assert (status, content_type) == (200, "application/json")
    data = json.loads(body)
    assert data["endpoint"] == node.self_url and data["store_failing"] is False
    (row,) = data["endpoints"]
    assert row["self"] and row["endpoint"] == node.self_url and not row["ejected"]
    assert (row["traffic"]["requests"], row["traffic"]["errors"]) == (5, 1)
    assert data["served"]["requests"] == 5
    assert data["connections"] == 1
    assert data["discovery"]["refreshed_age"] < 5


def test_ejected_endpoints_say_why(node):
    metrics = MetricsObserver()
    admin = Admin(node, node.settings, metrics)
    me = node.table.endpoints[0]
    node.eject(me, 30)
    metrics.ejected(me.url, "connection refused")
    (row,) = json.loads(admin.respond("/_cluster/status", "")[2])["endpoints"]
    assert row["ejected"] and row["ejected_reason"] == "connection refused"


def test_metrics_page_is_prometheus_text(node):
    metrics = MetricsObserver()
    admin = Admin(node, node.settings, metrics)
    metrics.request_done(done("http://127.0.0.1:1"))
    status, content_type, body, _ = admin.respond("/_cluster/metrics", "")
    assert status == 200 and content_type.startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {"cluster_requests", "cluster_upstream_latency_seconds",
            "cluster_discovery_refresh_age_seconds", "cluster_open_connections"} <= names


def test_dashboard_is_self_contained_and_renders_from_inlined_status(node):
    admin = Admin(node, node.settings, MetricsObserver())
    for path in ("/_cluster/", "/_cluster"):
        status, content_type, body, _ = admin.respond(path, "")
        assert (status, content_type) == (200, "text/html; charset=utf-8")
    page = body.decode()
    assert not re.search(r"""(src|href)\s*=|@import|<link|url\(""", page, re.I)
    assert node.self_url in page  # the first status is inlined
    assert admin.respond("/_cluster/nothing", "")[0] == 404


def test_inlined_status_cannot_close_the_script():
    page = dashboard_html("/_cluster", {"service": "</script><script>alert(1)</script>"})
    assert page.decode().count("</script>") == 1


def test_a_record_cannot_blank_the_dashboard():
    """``<!--<script>`` in a value puts the HTML parser where the page's own
    ``</script>`` no longer ends the script: nothing would run. No ``<`` may reach it."""
    hostile = {"endpoint": "http://127.0.0.1:9/<!--<script>", "x": "a&b>c"}
    page = dashboard_html("/_cluster", hostile).decode()
    script = page[page.index("const INITIAL = "):page.index("let fetches")]
    assert "<" not in script and ">" not in script and "&" not in script
    assert json.loads(script[len("const INITIAL = "):].strip().rstrip(";")) == hostile


def test_a_request_forwarded_for_an_untrusted_client_is_judged_by_that_client(node):
    """A proxy on a trusted address (nginx on the loopback) forwards for everyone
    behind it: every address it forwarded for must be trusted too."""
    admin = Admin(node, node.settings.replace(admin_token=None), MetricsObserver())
    assert admin.allowed("127.0.0.1", "", forwarded_for=["10.1.0.7", "127.0.0.1"])
    for chain in (["203.0.113.9"], ["127.0.0.1", "203.0.113.9"], ["unknown"], ["_hidden"]):
        assert not admin.allowed("127.0.0.1", "", forwarded_for=chain), chain
        assert admin.answer("/_cluster/status", "127.0.0.1", "", forwarded_for=chain) is None
    with_token = Admin(node, node.settings, MetricsObserver())
    assert with_token.allowed("127.0.0.1", f"token={TOKEN}", forwarded_for=["203.0.113.9"])
    assert with_token.answer("/_cluster/status", "127.0.0.1", "",
                             forwarded_for=["203.0.113.9"]).status == 401


def test_forwarded_clients_reads_every_forwarding_field():
    from cluster.trust import forwarded_clients

    assert forwarded_clients("", "", "") == []
    assert forwarded_clients(" 1.2.3.4, 127.0.0.1:80 ,[::1]:5", "", "") == [
        "1.2.3.4", "127.0.0.1", "::1"]
    assert forwarded_clients("", 'for=192.0.2.60;proto=http, For="[2001:db8::1]:4711", '
                                 "for=unknown;by=x", "") == ["192.0.2.60", "2001:db8::1",
                                                             "unknown"]
    assert forwarded_clients("", "", "::ffff:10.0.0.1") == ["10.0.0.1"]


def test_an_ipv4_client_of_a_dual_stack_listener_is_matched_as_ipv4(node):
    from cluster.trust import peer_address

    assert peer_address("::ffff:127.0.0.1") == "127.0.0.1"
    assert peer_address("::ffff:7f00:1") == "::ffff:7f00:1"  # as written by no kernel
    assert peer_address("::1") == "::1" and peer_address("10.1.0.1") == "10.1.0.1"
    admin = Admin(node, node.settings, MetricsObserver())
    assert admin.allowed("::ffff:127.0.0.1", "") and admin.allowed("::ffff:10.1.2.3", "")
    assert not admin.allowed("::ffff:10.2.0.1", "")


def test_admin_answers_say_what_they_allow_and_how_to_authenticate(node):
    admin = Admin(node, node.settings, MetricsObserver())
    for path in ("/_cluster/", "/_cluster/status", "/_cluster/metrics"):
        for method in ("POST", "DELETE", "OPTIONS", "PUT"):
            page = admin.respond(path, "", method)
            assert (page.status, page.headers) == (405, (("Allow", "GET, HEAD"),)), path
        assert admin.respond(path, "", "HEAD").status == 200
    page = admin.respond("/_cluster/drain", "", "GET")
    assert (page.status, page.headers) == (405, (("Allow", "POST"),))
    page = admin.answer("/_cluster/status", "192.0.2.1", "")
    assert page.status == 401 and page.headers[0][0] == "WWW-Authenticate"
    assert page.headers[0][1].startswith("Bearer ")


def test_a_browser_page_cannot_drain_the_instance(node):
    """Browsers send Origin with every POST: a page from any site, open on a trusted
    host, could otherwise drain it (cross-site request forgery)."""
    admin = Admin(node, node.settings, MetricsObserver())
    drained = []
    admin.drain = lambda: drained.append(1) or True
    page = admin.respond("/_cluster/drain", "", "POST", origin="http://evil.example")
    assert page.status == 403 and not drained
    page = admin.respond("/_cluster/drain", "", "POST", origin="null")
    assert page.status == 403 and not drained
    assert admin.respond("/_cluster/drain", "", "POST").status == 202 and drained == [1]
