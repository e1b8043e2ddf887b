"""Settings: one declaration each; flag > env > file > default; one-line errors."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from typing import Iterator

import pytest

from cluster import config
from cluster.config import Settings, parse_command_line
from cluster.errors import ConfigError
from helpers import ROOT


def run_cluster(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTER_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "cluster", *args], capture_output=True,
                          text=True, env=full_env, cwd=ROOT, timeout=30)


def test_precedence_flag_over_env_over_file_over_default(tmp_path, monkeypatch):
    conf = tmp_path / "c.conf"
    conf.write_text("service = from-file\nself-weight = 0.25\nping-interval = 7\n")
    monkeypatch.setenv("CLUSTER_SERVICE", "from-env")
    monkeypatch.setenv("CLUSTER_SELF_WEIGHT", "0.5")
    _, s, _ = parse_command_line(["serve", "-c", str(conf), "--self-weight", "0.75"])
    assert (s.service, s.self_weight, s.ping_interval, s.retries) == ("from-env", 0.75, 7.0, 2)


def test_meteorhacks_environment_names(monkeypatch):
    env = {
        "CLUSTER_DISCOVERY_URL": "mongodb://db.example.com/app",
        "CLUSTER_SERVICE": "web",
        "CLUSTER_ENDPOINT_URL": "http://10.0.0.1:3000",
        "CLUSTER_BALANCER_URL": "https://b1.example.com",
        "CLUSTER_UI_SERVICE": "ui",
        "CLUSTER_PUBLIC_SERVICES": "chat, search",
        "CLUSTER_SELF_WEIGHT": "0.3",
        "CLUSTER_WORKERS_COUNT": "auto",
    }
    s = Settings.load(env=env)
    assert s.discovery_url == "mongodb://db.example.com/app"
    assert (s.service, s.ui_service, s.own_ui_service) == ("web", "ui", "ui")
    assert s.own_endpoint_url == "http://10.0.0.1:3000"
    assert s.balancer_url == "https://b1.example.com"
    assert s.public_services == ("chat", "search")
    assert s.self_weight == 0.3 and s.workers_count >= 1


def test_library_overrides_beat_environment():
    s = Settings.load(env={"CLUSTER_SERVICE": "env"}, service="kw", public_services=["a"])
    assert s.service == "kw" and s.public_services == ("a",)
    with pytest.raises(ConfigError, match="self-weight"):
        Settings.load(env={}, self_weight="2")


def test_endpoint_url_defaults_from_bind():
    assert Settings(bind="0.0.0.0:4000").own_endpoint_url == "http://127.0.0.1:4000"
    assert Settings(bind="127.0.0.2:81").own_endpoint_url == "http://127.0.0.2:81"


@pytest.mark.parametrize("args, env, names", [
    (["--self-weight", "1.5"], {}, "--self-weight"),
    (["--endpoint-url", "localhost:3000"], {}, "--endpoint-url"),
    (["--endpoint-url", "http://"], {}, "--endpoint-url"),
    ([], {"CLUSTER_DISCOVERY_URL": "redis://x"}, "CLUSTER_DISCOVERY_URL"),
    ([], {"CLUSTER_DISCOVERY_URL": ""}, "leave it unset for the embedded store"),
    (["-c", "/nonexistent/cluster.conf"], {}, "/nonexistent/cluster.conf"),
    (["--ping-interval", "0"], {}, "--ping-interval"),
    (["--ping-interval", "7200"], {}, "--ping-interval"),
    (["--service", "web app"], {}, "--service"),
    (["--endpoint-url", "http://user:pw@10.0.0.1:80"], {}, "--endpoint-url"),
    (["--workers-count", "many"], {}, "--workers-count"),
    (["--bind", "nowhere"], {}, "--bind"),
    (["--log-level", "loud"], {}, "--log-level"),
    (["--busy-poll", "5000"], {}, "--busy-poll"),
    ([], {"CLUSTER_BUSY_POLL": "-1"}, "CLUSTER_BUSY_POLL"),
    (["--busy-poll", "often"], {}, "'often' is not a whole number (microseconds, or auto)"),
    (["--app", "no_colon"], {}, "--app"),
    (["--app", "no_such_module_xyz:app", "--service", "web", "--bind", "127.0.0.1:0"], {},
     "--app"),
    # inf and nan parse as floats: inf was a traceback, nan was accepted as a timeout
    (["--ping-interval", "inf"], {}, "--ping-interval"),
    ([], {"CLUSTER_HEADER_TIMEOUT": "nan"}, "CLUSTER_HEADER_TIMEOUT"),
    (["--connect-timeout", "inf"], {}, "--connect-timeout"),
    (["--drain-seconds", "inf"], {}, "--drain-seconds"),
    # a typo in an address was dropped silently (loopback then no longer trusted)
    (["--trusted-proxies", "999.1.1.1"], {}, "--trusted-proxies"),
    ([], {"CLUSTER_TRUSTED_PROXIES": "10.0.0.0/33"}, "CLUSTER_TRUSTED_PROXIES"),
    (["--max-websocket-message", "16M"], {}, "--max-websocket-message"),
    ([], {"CLUSTER_MAX_WEBSOCKET_MESSAGE": "100"}, "CLUSTER_MAX_WEBSOCKET_MESSAGE"),
    (["--cookie-samesite", "sometimes"], {}, "--cookie-samesite"),
    # 0 fields: every request (Host is one) was a 431, with no word at the start
    (["--max-header-count", "0"], {}, "--max-header-count"),
])
def test_bad_setting_is_one_line_and_exit_2(args, env, names):
    result = run_cluster("serve", *args, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert names in lines[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize("raw, attributes", [
    ("lax", "Path=/; HttpOnly; SameSite=Lax"),
    ("Strict", "Path=/; HttpOnly; SameSite=Strict"),
    ("NONE", "Path=/; HttpOnly; SameSite=None; Secure"),  # browsers require Secure
])
def test_cookie_samesite(raw, attributes, monkeypatch):
    from cluster.cookies import cookie_attributes

    monkeypatch.setenv("CLUSTER_COOKIE_SAMESITE", raw)
    _, s, _ = parse_command_line(["serve"])
    assert cookie_attributes(s.cookie_samesite) == attributes
    assert Settings().cookie_samesite == "lax"


def test_too_many_workers_is_refused_before_any_is_started(tmp_path):
    """A typo such as 100000 must not fork that many processes: it is one line, exit 2,
    from a config file too (the form a typo most likely lives in)."""
    conf = tmp_path / "c.conf"
    conf.write_text(f"workers-count = {8 * (os.cpu_count() or 1) + 1}\nbind = 127.0.0.1:0\n")
    result = run_cluster("serve", "-c", str(conf))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--workers-count" in lines[0], result.stderr
    # the cap itself is served: 8 per core starts
    assert config._workers(str(8 * (os.cpu_count() or 1))) == 8 * (os.cpu_count() or 1)


@pytest.mark.parametrize("url", ["sqlite://relative", "sqlite://", "sqlite:file.db"])
def test_a_sqlite_url_without_an_absolute_path_is_refused(url):
    """It used to open the default embedded store instead, silently: instances meant to
    share another file would each see only the default one's members."""
    result = run_cluster("status", "--discovery-url", url)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--discovery-url" in lines[0], result.stderr


def test_unknown_config_file_key_is_an_error(tmp_path):
    conf = tmp_path / "c.conf"
    conf.write_text("servce = typo\n")
    result = run_cluster("status", "-c", str(conf))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_help_lists_every_setting_with_its_environment_name():
    result = run_cluster("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for spec in config.fields():
        assert config.flag_of(spec.name) in text
        assert config.env_of(spec.name) in text.replace("CLUSTER_ ", "CLUSTER_")
    for command in config.COMMANDS:
        assert command in text


def test_help_describes_the_config_file_as_it_is_read(tmp_path):
    """--help said "Config file syntax allows: ... stuff=[a,b,c]" (configargparse's
    text, with a dead short link), and such a line stopped the program instead."""
    text = " ".join(run_cluster("serve", "--help").stdout.split())
    assert "stuff=[a,b,c]" not in text and "goo.gl" not in text, text
    assert "public-services = a,b" in text, text
    conf = tmp_path / "c.conf"
    conf.write_text("# as --help says\npublic-services = a,b\n")
    result = run_cluster("status", "--json", "-c", str(conf),
                         "--discovery-url", f"sqlite://{tmp_path / 'none.sqlite3'}")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("command", [None, "serve", "status"])
def test_version_prints_the_package_version(command):
    import cluster

    result = run_cluster(*([command] if command else []), "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"cluster {cluster.__version__}\n"
    assert cluster.__version__ == setup_version()


def setup_version() -> str:
    text = (ROOT / "setup.py").read_text()
    return text.split('version="', 1)[1].split('"', 1)[0]


def test_example_config_is_generated_from_the_settings_table():
    assert (ROOT / "conf" / "cluster.conf").read_text() == config.example_config()


def test_example_config_parses(monkeypatch):
    for key in [k for k in __import__("os").environ if k.startswith("CLUSTER_")]:
        monkeypatch.delenv(key)
    text = config.example_config()
    uncommented = "\n".join(
        line[2:] for line in text.splitlines() if line.startswith("# ") and " = " in line
        and not line.rstrip().endswith("=")
    )
    path = ROOT / "build" / "example-uncommented.conf"
    path.parent.mkdir(exist_ok=True)
    path.write_text(uncommented)
    _, s, _ = parse_command_line(["serve", "-c", str(path)])
    assert s == Settings(workers_count=s.workers_count)


def test_readme_settings_table_is_generated_from_the_settings_table():
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- settings:begin -->\n", "<!-- settings:end -->"
    section = readme[readme.index(begin) + len(begin):readme.index(end)]
    assert section == config.settings_markdown()


# --- the endpoint an instance registers, across hosts ---------------------------------


def test_wildcard_bind_with_a_remote_store_registers_the_route_address():
    # connect() on a UDP socket sends nothing: this only asks the kernel for the route.
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 27017))
        expected = probe.getsockname()[0]
    choice = Settings(bind="0.0.0.0:4000",
                      discovery_url="mongodb://user:pw@192.0.2.1:27017,192.0.2.9/db").endpoint_choice()
    assert choice.url == f"http://{expected}:4000"
    assert "192.0.2.1" in choice.reason


@contextlib.contextmanager
def srv_records(records: dict[str, list[str]]) -> Iterator[None]:
    """A DNS server on 127.0.0.1 answering SRV questions from ``records`` (owner name ->
    SRV rdata texts) and NXDOMAIN to anything else: a thread reading real queries and
    writing real answers (dnspython's messages). dnspython's default resolver, the one
    pymongo reads SRV records with, asks it and nothing else while the block runs."""
    import dns.message
    import dns.rcode
    import dns.rdatatype
    import dns.resolver
    import dns.rrset

    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(0.1)
    stop = threading.Event()

    def answer() -> None:
        while not stop.is_set():
            try:
                data, peer = server.recvfrom(4096)
            except (TimeoutError, socket.timeout):
                continue
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            question = query.question[0]
            name = question.name.to_text()
            if question.rdtype == dns.rdatatype.SRV and name in records:
                response.answer.append(dns.rrset.from_text_list(name, 60, "IN", "SRV",
                                                                records[name]))
            else:
                response.set_rcode(dns.rcode.NXDOMAIN)
            server.sendto(response.to_wire(), peer)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = server.getsockname()[1]
    saved = dns.resolver.default_resolver
    dns.resolver.default_resolver = resolver
    try:
        yield
    finally:
        dns.resolver.default_resolver = saved
        stop.set()
        thread.join(5)
        server.close()


#: Names whose first label starts with a hyphen: the C library refuses to look up their
#: address without asking any DNS server, so the old way (taking the SRV name for a host)
#: fails here as it does anywhere for a name that has no address, with nothing sent
#: off the loopback.
SRV_RECORDS = {
    "_mongodb._tcp.-cluster0.example.test.": ["1 0 27018 192.0.2.9.", "0 0 27017 192.0.2.1."],
    "_custom._tcp.-cluster0.example.test.": ["0 0 27017 192.0.2.77."],
    "_mongodb._tcp.-closed.example.test.": ["0 0 0 ."],  # RFC 2782: not offered here
}


@pytest.mark.parametrize("options, first", [("", "192.0.2.1"),
                                            ("&srvServiceName=custom", "192.0.2.77")])
def test_a_mongodb_srv_name_stands_for_the_hosts_of_its_srv_records(options, first):
    """A mongodb+srv:// name (MongoDB Atlas's URLs) is a DNS service, not a host: the
    route to the store is the route to the best target of its SRV records, as pymongo
    reads them. It was looked up as a host, and a wildcard bind without --endpoint-url
    was refused ("no route to the discovery store host") when it had no address."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((first, 27017))  # sends nothing: asks the kernel for the route
        expected = probe.getsockname()[0]
    url = f"mongodb+srv://user:pw@-cluster0.example.test/db?tls=false{options}"
    with srv_records(SRV_RECORDS):
        choice = Settings(bind="0.0.0.0:4000", discovery_url=url).endpoint_choice()
        assert choice.url == f"http://{expected}:4000"
        assert first in choice.reason
        # no records for the name, or only a "." target: the store host it names, in one
        # line, as before
        for name in ("-nothing.example.test", "-closed.example.test"):
            with pytest.raises(ConfigError, match=r"no route to the discovery store host "
                                                  + re.escape(name)):
                Settings(bind="0.0.0.0:4000",
                         discovery_url=f"mongodb+srv://{name}/db").endpoint_choice()


@pytest.mark.parametrize("url", [
    None, "sqlite:///tmp/x.sqlite3", "mongodb://127.0.0.1:27017/db",
    "mongodb://localhost/db?replicaSet=rs0", "mongodb://[::1]:27017,10.0.0.1/db",
])
def test_a_store_on_this_host_keeps_the_loopback_default(url):
    assert Settings(bind="0.0.0.0:4000", discovery_url=url).own_endpoint_url == \
        "http://127.0.0.1:4000"
    assert Settings(bind="127.0.0.1:4000", discovery_url=url).own_endpoint_url == \
        "http://127.0.0.1:4000"


def test_loopback_endpoint_with_a_remote_store_is_refused_unless_explicit():
    remote = "mongodb://192.0.2.1:27017/db"
    with pytest.raises(ConfigError, match=r"--endpoint-url .*loopback.*192\.0\.2\.1"):
        Settings(bind="127.0.0.1:4000", discovery_url=remote).endpoint_choice()
    explicit = Settings(bind="127.0.0.1:4000", discovery_url=remote,
                        endpoint_url="http://127.0.0.1:4000")
    assert explicit.own_endpoint_url == "http://127.0.0.1:4000"
    # an observer registers nothing, so it is not refused
    assert Settings(bind="127.0.0.1:4000", discovery_url=remote).endpoint_choice(
        strict=False).url == "http://127.0.0.1:4000"


def test_cluster_serve_refuses_a_loopback_endpoint_with_a_remote_store_in_one_line():
    from helpers import cluster_argv

    result = subprocess.run(
        cluster_argv("serve", "--service", "web", "--app", "backend:app",
                     "--bind", "127.0.0.1:0", "--discovery-url", "mongodb://192.0.2.1/db"),
        capture_output=True, text=True, timeout=60, cwd=str(ROOT),
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests' / 'apps'}"},
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--endpoint-url" in lines[0] and "loopback" in lines[0], lines


@pytest.mark.parametrize("args", [
    ["serve", "--endpoint-url", "http://a..b:80"],
    ["serve", "--balancer-url", f"http://{'a' * 64}.example"],
    ["drain", "--url", "http://a..b:8000"],
    ["register", "--health-url", "http://.x:80/health"],
])
def test_a_url_whose_host_resolvers_refuse_is_one_line_and_exit_2(args):
    """An empty or over-long DNS label used to pass, and ended in a traceback (drain,
    register) or a record no instance could connect to (serve)."""
    result = run_cluster(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no valid host" in lines[0], result.stderr
    assert args[-2] in lines[0]


def test_a_health_url_may_have_a_query():
    _, _, namespace = parse_command_line(["register", "--health-url", "http://127.0.0.1:9/h?x=1"])
    assert namespace.health_url == "http://127.0.0.1:9/h?x=1"


@pytest.mark.parametrize("content", [
    b"service = w\xe9b\n\xff\xfe\n",                # Latin-1, binary
    "service = web\n".encode("utf-16"),            # UTF-16 with its BOM
])
@pytest.mark.parametrize("command", [["status"], ["cluster-instance"]])
def test_a_config_file_that_is_not_utf8_is_one_line_and_exit_2(tmp_path, content, command):
    conf = tmp_path / "c.conf"
    conf.write_bytes(content)
    if command == ["cluster-instance"]:
        result = subprocess.run([sys.executable, str(ROOT / "scripts" / "cluster-instance"),
                                 "-c", str(conf)], capture_output=True, text=True, cwd=ROOT,
                                timeout=30)
    else:
        result = run_cluster(*command, "-c", str(conf))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(conf) in lines[0] and "not UTF-8" in lines[0], lines


def test_a_config_file_with_a_utf8_bom_is_read(tmp_path):
    conf = tmp_path / "c.conf"
    conf.write_bytes("\ufeffservice = web\n".encode())
    _, s, _ = parse_command_line(["status", "-c", str(conf)])
    assert s.service == "web"


@pytest.mark.parametrize("path", ["/dev/zero", "directory"])
def test_a_config_path_that_is_not_a_regular_file_is_refused(tmp_path, path):
    """/dev/zero was read for ever."""
    path = str(tmp_path) if path == "directory" else path
    result = run_cluster("status", "-c", path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and path in lines[0] and "not a regular file" in lines[0]


@pytest.mark.parametrize("text, problem", [
    ("service = web\nping-interval = 5\nservice = api\n",
     "line 3: 'service' is set twice (first on line 1)"),
    ("service = web\n--service = api\n", "'service' is set twice"),
    ("[production]\nservice = web\n[staging]\nservice = api\n",
     "[staging] follows [production] (line 1)"),
])
def test_a_key_set_twice_or_a_second_section_is_one_line_and_exit_2(tmp_path, text, problem):
    """The last value used to win silently, and two sections were merged."""
    conf = tmp_path / "c.conf"
    conf.write_text(text)
    result = run_cluster("status", "-c", str(conf))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(conf) in lines[0] and problem in lines[0], lines


def test_one_section_header_is_still_a_comment(tmp_path):
    conf = tmp_path / "c.conf"
    conf.write_text("[cluster]\nservice = web\n# service = api\n")
    _, s, _ = parse_command_line(["status", "-c", str(conf)])
    assert s.service == "web"


@pytest.mark.parametrize("url", [
    "mongodb://127.0.0.1:1/db?tls=true&tlsCAFile=/nonexistent/ca.pem",
    "mongodb://127.0.0.1:1/a%00b",
    # values pymongo only warned about (two lines of Python warning) and then ignored:
    # tls=maybe connected without TLS
    "mongodb://127.0.0.1:1/db?tls=maybe",
    "mongodb://u:pw@127.0.0.1:1/db?authMechanism=SCRAM-SHA1",
    "mongodb://127.0.0.1:1/db?readPreference=nearestish",
])
def test_a_discovery_url_pymongo_refuses_is_one_line_and_exit_2(url):
    result = run_cluster("status", "--discovery-url", url)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--discovery-url" in lines[0], result.stderr


@pytest.mark.parametrize("as_json", [False, True])
def test_status_of_a_store_that_does_not_exist_says_so_and_creates_nothing(tmp_path,
                                                                           as_json):
    """`cluster status` on a mistyped sqlite path left a new store, directories and
    all, behind, and said only "no live endpoints". Still an empty view (a script may
    poll before the first instance registers), with one line on stderr."""
    missing = tmp_path / "typo" / "dir" / "x.sqlite3"
    result = run_cluster("status", *(["--json"] if as_json else []),
                         env={"CLUSTER_DISCOVERY_URL": f"sqlite://{missing}"})
    assert result.returncode == 0, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert f"no discovery store at sqlite://{missing} yet" in line
    if as_json:
        data = json.loads(result.stdout)
        assert data["endpoints"] == [] and data["exists"] is False
    else:
        assert "no live endpoints" in result.stdout
    assert not (tmp_path / "typo").exists()


def test_library_keywords_none_is_the_default_and_numbers_are_checked():
    """cluster.wrap(cookie_samesite=None) and =1 reached the request path unchecked and
    failed there with a traceback: None now means "not given", other values are
    checked as their text would be."""
    s = Settings.load(args=[], env={}, cookie_samesite=None, placement=None, ping_interval=2)
    assert (s.cookie_samesite, s.placement, s.ping_interval) == ("lax", "load", 2.0)
    with pytest.raises(ConfigError, match="--cookie-samesite"):
        Settings.load(args=[], env={}, cookie_samesite=1)
    with pytest.raises(ConfigError, match="--ping-interval"):
        Settings.load(args=[], env={}, ping_interval=-1)


def test_status_watch_into_a_reader_that_leaves_ends_without_a_traceback(tmp_path):
    """`cluster status --watch | head -1`: the pipe closes after one line, and the next
    redraw raised BrokenPipeError with a traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTER_")}
    env["CLUSTER_DISCOVERY_URL"] = f"sqlite://{tmp_path / 'd.sqlite3'}"
    watch = subprocess.Popen([sys.executable, "-m", "cluster", "status", "--watch"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        assert watch.stdout is not None and watch.stdout.readline()
        watch.stdout.close()  # as head does after its line
        assert watch.wait(15) == 141
        assert watch.stderr is not None and watch.stderr.read() == b""
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
        for stream in (watch.stdout, watch.stderr):
            if stream is not None:
                stream.close()


def test_a_balancer_only_instance_reachable_from_other_hosts_is_told_to_set_a_secret():
    """Without --secret it is no member by address (it registers nothing): endpoints on
    other hosts ignore its hop marker, route its requests again and set a second sticky
    cookie (found on a bed of network namespaces)."""
    from cluster.server import lone_balancer_warning

    def warned(bind: str, has_app: bool = False, **more: str) -> bool:
        return bool(lone_balancer_warning(
            Settings.load(args=[], env={}, bind=bind, **more), has_app))

    assert warned("0.0.0.0:8000") and warned("10.0.0.5:8000") and warned("[::]:8000")
    assert "--secret" in lone_balancer_warning(
        Settings.load(args=[], env={}, bind="0.0.0.0:8000"), False)
    assert not warned("0.0.0.0:8000", secret="s" * 16)
    assert not warned("0.0.0.0:8000", has_app=True)
    assert not warned("127.0.0.1:8000") and not warned("[::1]:8000")


def test_an_option_pymongo_does_not_know_is_one_warning_naming_it():
    """pymongo's own warning names no option ("Unknown option. Did you mean one of
    (timeoutms, ...)") and comes with a line of its source: one line naming it."""
    result = run_cluster("status", "--connect-timeout", "0.2", "--discovery-url",
                         "mongodb://127.0.0.1:1/db?replicaSet=rs0&bogusOption=1")
    lines = [line for line in result.stderr.splitlines() if "bogusOption" in line]
    assert len(lines) == 1 and "--discovery-url" in lines[0], result.stderr
    assert "UserWarning" not in result.stderr and "uri_parser" not in result.stderr, \
        result.stderr


@pytest.mark.parametrize("url, advice", [
    # pymongo's notes on the host, given as UserWarnings as a refused value is
    ("mongodb://db1.cluster-x.us-east-1.docdb.amazonaws.com:27017/cluster?tls=true"
     "&retryWrites=false", "DocumentDB"),
    ("mongodb://u:pw@app.mongo.cosmos.azure.com:10255/cluster?ssl=true", "CosmosDB"),
    # a URL shared with Meteor's Node driver, which has snappy: pymongo uses zlib
    ("mongodb://db1:27017/cluster?compressors=snappy,zlib", "snappy"),
    ("mongodb://db1:27017/cluster?readPreference=secondaryPreferred&w=majority"
     "&authSource=admin&appName=web&replicaSet=rs0&maxPoolSize=5", None),
])
def test_a_discovery_url_pymongo_takes_is_not_refused(url, advice, caplog):
    """Only the option validator's verdicts are errors: pymongo's advice while making
    the client (a DocumentDB or Cosmos DB host, a compressor this Python lacks) made
    AWS's and Azure's URLs a bad setting. It is one log line. Made with connect=False:
    nothing is looked up or connected."""
    from cluster.discovery.mongo import MongoStore

    caplog.set_level("WARNING", logger="cluster")
    store = MongoStore(url)
    store.close()
    said = [r.getMessage() for r in caplog.records]
    if advice is None:
        assert said == []
    else:
        (line,) = said
        assert advice in line and "--discovery-url" in line and "\n" not in line
        assert "pw" not in line


@pytest.mark.parametrize("url, says", [
    ("sqlite://alice:Pa55word-xyz@/tmp/x.sqlite3", "names no file"),
    ("//alice:Pa55word-xyz@db1:27017/cluster", "has no scheme"),
    ("alice:Pa55word-xyz@db1:27017/cluster", "has no scheme"),
    ("db1:27017/cluster", "has no scheme"),
    ("postgres://alice:Pa55word-xyz@db1/cluster", "unknown discovery scheme 'postgres://'"),
])
def test_a_bad_discovery_url_is_named_without_its_password(url, says):
    """The one line of a refused --discovery-url quoted it whole, password and all;
    a URL without a scheme (db1:27017/cluster) was "unknown discovery scheme 'db1://'"."""
    result = run_cluster("status", "--discovery-url", url)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert says in line and "Pa55word" not in line, line


@pytest.mark.parametrize("bind", ["１２７.0.0.1:8000", "127.0.0.1:８０００", "127.0.0.1:²",
                                  "exa mple:8000"])
def test_a_bind_address_no_reader_accepts_is_one_line(bind):
    """--bind １２７.0.0.1:8000 (full-width digits, which the resolver folds to
    127.0.0.1) bound, and registered http://１２７.0.0.1:8000, a record every instance
    (itself too) skipped as malformed; 127.0.0.1:² was int()'s message."""
    result = run_cluster("status", "--bind", bind)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "--bind" in line and "invalid literal" not in line, line
