"""Real processes on loopback for the end-to-end tests.

Every process a test starts goes through :class:`Proc`, which remembers its PID and
is stopped (SIGTERM, then SIGKILL) by the fixture or ``with`` block that made it.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def accept_forever(listener: socket.socket, serve: Callable[[socket.socket], None]) -> None:
    """Serve each connection ``listener`` accepts on a thread of its own, until it is
    closed (a scripted endpoint's accept loop; run it on a daemon thread)."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc} exited with {proc.returncode}:\n{proc.output()}")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.1, what: str = ""):
    """Poll ``predicate`` until it returns a truthy value; return that value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}: {last!r}")


_LOG_DIR: Path | None = None


def _log_dir() -> Path:
    """One temp directory per test process for the output of its Procs, removed when
    that process exits (each run of the suite used to leave thousands in /tmp)."""
    global _LOG_DIR
    if _LOG_DIR is None:
        _LOG_DIR = Path(tempfile.mkdtemp(prefix="cluster-test-logs-"))
        owner, made = os.getpid(), _LOG_DIR

        def remove() -> None:
            if os.getpid() == owner:  # not in a forked child that inherited the hook
                shutil.rmtree(made, ignore_errors=True)

        atexit.register(remove)
    return _LOG_DIR


class Proc:
    """A child process with its output in a temp file, stopped by PID."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None,
                 cwd: Path | None = None, name: str = "") -> None:
        self.name = name or Path(argv[0]).name
        self.log = tempfile.NamedTemporaryFile(prefix=f"{self.name}-", suffix=".log",
                                               dir=_log_dir(), delete=False)
        full_env = dict(os.environ)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), str(TESTS / "apps"), full_env.get("PYTHONPATH", "")]
        )
        if env:
            full_env.update(env)
        self.popen = subprocess.Popen(
            list(argv), env=full_env, cwd=str(cwd or ROOT), stdout=self.log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        self.pid = self.popen.pid

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.pid}>"

    def poll(self) -> int | None:
        return self.popen.poll()

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float = 15.0) -> int:
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait, then SIGKILL: never leaves the process behind."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        self.log.close()
        return self.popen.returncode

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait(5)


@contextlib.contextmanager
def running(argv: Sequence[str], port: int | None = None, **kwargs) -> Iterator[Proc]:
    proc = Proc(argv, **kwargs)
    try:
        if port is not None:
            wait_port(port, proc=proc)
        yield proc
    finally:
        proc.stop()


def self_signed(where: Path, san: bool = True) -> tuple[Path, Path]:
    """A self-signed certificate for localhost in ``where``: (cert, key). ``san``: with
    subjectAltName DNS:localhost, which verification by host name needs."""
    cert, key = where / "cert.pem", where / "key.pem"
    names = ["-addext", "subjectAltName=DNS:localhost"] if san else []
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", *names, "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def backend(port: int, name: str = "backend") -> list[str]:
    """argv of the test backend app (tests/apps/backend.py) on 127.0.0.1:port."""
    return python(str(TESTS / "apps" / "backend.py"), "--port", str(port), "--name", name)


def get(url: str, **kwargs) -> requests.Response:
    kwargs.setdefault("timeout", 10)
    return requests.get(url, **kwargs)


def cluster_argv(*args: str) -> list[str]:
    """argv of the `cluster` command, run as `python -m cluster` from this checkout."""
    return python("-m", "cluster", *args)


def instance(discovery_url: str, port: int, name: str, *extra: str,
             env: dict[str, str] | None = None) -> Proc:
    """Start `cluster serve` with the test backend as its local app (not yet waited for)."""
    argv = cluster_argv(
        "serve", "--service", "web", "--app", "backend:app", "--bind", f"127.0.0.1:{port}",
        "--ping-interval", "1", "--expiry-grace", "1", *extra,
    )
    full_env = {"CLUSTER_DISCOVERY_URL": discovery_url, "BACKEND_NAME": name}
    full_env.update(env or {})
    return Proc(argv, env=full_env, name=name)


def status_json(discovery_url: str, *extra: str) -> dict:
    """`cluster status --json` as data (a real subprocess, as an operator runs it)."""
    import json

    result = subprocess.run(
        cluster_argv("status", "--json", "--expiry-grace", "1", *extra),
        env={**os.environ, "CLUSTER_DISCOVERY_URL": discovery_url, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=30, cwd=str(ROOT),
    )
    if result.returncode != 0:
        raise RuntimeError(f"cluster status failed: {result.stderr}")
    return json.loads(result.stdout)


def live_endpoints(discovery_url: str) -> set[str]:
    return {row["endpoint"] for row in status_json(discovery_url)["endpoints"] if row["healthy"]}


# --- race-free ports: --bind 127.0.0.1:0 --port-file F ------------------------------


def read_port_file(path: Path, proc: Proc | None = None, timeout: float = 20.0) -> int:
    """Wait until ``path`` holds ``HOST:PORT\\n`` (written once the server listens).

    Raises RuntimeError with the process output when ``proc`` exits first.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc} exited with {proc.returncode}:\n{proc.output()}")
        with contextlib.suppress(FileNotFoundError):
            text = path.read_text()
            if text.endswith("\n"):  # complete: the newline is written last
                _host, _, port = text.strip().rpartition(":")
                return int(port)
        time.sleep(0.02)
    raise TimeoutError(f"{path} not written after {timeout}s"
                       + (f"; output:\n{proc.output()}" if proc is not None else ""))


def start_reporting(argv_with_port_file: Callable[[Path], Sequence[str]], *,
                    env: dict[str, str] | None = None, name: str = "proc",
                    timeout: float = 20.0) -> tuple[Proc, int]:
    """Start a process that binds a port the OS picks and writes it to a port file.

    ``argv_with_port_file(path)`` gives the argv that writes ``HOST:PORT\\n`` to ``path``.
    No other process can take the port between choosing and binding, which
    ``free_port()`` cannot promise. Returns the process and its port.
    """
    folder = Path(tempfile.mkdtemp(prefix="cluster-port-"))
    port_file = folder / "port"
    proc = Proc(argv_with_port_file(port_file), env=env, name=name)
    try:
        port = read_port_file(port_file, proc, timeout)
    except BaseException:
        proc.stop()
        raise
    finally:
        with contextlib.suppress(OSError):
            port_file.unlink()
        with contextlib.suppress(OSError):
            folder.rmdir()
    return proc, port


def start_serve(*args: str, env: dict[str, str] | None = None, name: str = "serve",
                wrapper: Sequence[str] = (), timeout: float = 20.0) -> tuple[Proc, int]:
    """Start ``cluster serve --bind 127.0.0.1:0 --port-file F *args``; return it and its port.

    ``wrapper`` goes before the command (e.g. ``("prlimit", "--nofile=256")``).
    """
    return start_reporting(
        lambda port_file: [*wrapper, *cluster_argv("serve", "--bind", "127.0.0.1:0",
                                                   "--port-file", str(port_file), *args)],
        env=env, name=name, timeout=timeout)


def start_library_app(env: dict[str, str], *app: str,
                      name: str = "library") -> tuple[Proc, int]:
    """tests/apps/library_app.py: cluster.wrap() under a plain gevent WSGIServer (its
    own ``hello``, or the ``MODULE:APP`` given), on a port the OS picks; CLUSTER_*
    settings in ``env``."""
    return start_reporting(
        lambda port_file: python(str(TESTS / "apps" / "library_app.py"), str(port_file), *app),
        env=env, name=name)


def start_balancers(store: str, ui_service: str, env: dict[str, str],
                    procs: list[Proc]) -> tuple[int, int]:
    """The two kinds of balancer for ``ui_service``: a balancer-only `cluster serve`
    and a cluster.wrap() app of service ``lib``; both appended to ``procs`` (which the
    caller stops), their ports returned (door, library)."""
    door, door_port = start_serve("--ui-service", ui_service,
                                  env={"CLUSTER_DISCOVERY_URL": store, **env}, name="door")
    procs.append(door)
    library, library_port = start_library_app({"CLUSTER_DISCOVERY_URL": store,
                                               "CLUSTER_SERVICE": "lib",
                                               "CLUSTER_UI_SERVICE": ui_service, **env})
    procs.append(library)
    return door_port, library_port


def start_app(script: str, *args: str, env: dict[str, str] | None = None,
              name: str = "", timeout: float = 20.0) -> tuple[Proc, int]:
    """Start a test app of tests/apps (``backend.py``, ``ws_echo.py``...) on a port the
    OS picks (``--port 0 --port-file F``); return it and its port."""
    return start_reporting(
        lambda port_file: python(str(TESTS / "apps" / script), *args, "--port", "0",
                                 "--port-file", str(port_file)),
        env=env, name=name or Path(script).stem, timeout=timeout)


@contextlib.contextmanager
def app_running(script: str, *args: str, name: str = "") -> Iterator[tuple[Proc, int]]:
    """:func:`start_app` as a ``with`` block that stops the process by PID."""
    proc, port = start_app(script, *args, name=name)
    try:
        yield proc, port
    finally:
        proc.stop()


def start_backend(name: str = "backend", env: dict[str, str] | None = None) -> tuple[Proc, int]:
    """tests/apps/backend.py on its own (plain pywsgi) on a port the OS picks."""
    return start_app("backend.py", "--name", name, env=env, name=name)


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A port on 127.0.0.1 where every connection is refused for the whole block.

    The socket is bound but never listens: the kernel answers a connect with RST, and
    no other process can take the port meanwhile (a closed ``free_port()`` can be).
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@contextlib.contextmanager
def blackholed_port() -> Iterator[int]:
    """A port on 127.0.0.1 where a connect neither succeeds nor is refused: it times out.

    A listener with a backlog of 0 that never accepts, its queue filled by the first
    connection: the kernel drops every further SYN, as a firewall that drops packets
    (a blackholed host) does.
    """
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        fillers: list[socket.socket] = []
        try:
            for _ in range(3):
                filler = socket.socket()
                filler.setblocking(False)
                fillers.append(filler)
                filler.connect_ex(("127.0.0.1", port))
            yield port
        finally:
            for filler in fillers:
                filler.close()


def connecting_to(pid: int, port: int) -> bool:
    """Has process ``pid`` a TCP socket in SYN-SENT toward 127.0.0.1:``port`` (a connect
    in progress)? Read from /proc: the process's socket inodes and /proc/net/tcp."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                inodes.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    wanted = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[2] == wanted and fields[3] == "02" and f"socket:[{fields[9]}]" in inodes:
            return True
    return False


@contextlib.contextmanager
def serving(*args: str, env: dict[str, str] | None = None, name: str = "serve",
            wrapper: Sequence[str] = ()) -> Iterator[tuple[Proc, int]]:
    """:func:`start_serve` as a ``with`` block that stops the process by PID."""
    proc, port = start_serve(*args, env=env, name=name, wrapper=wrapper)
    try:
        yield proc, port
    finally:
        proc.stop()


def start_instance(discovery_url: str, name: str, *extra: str, service: str = "web",
                   env: dict[str, str] | None = None) -> tuple[Proc, int]:
    """:func:`instance` on a port the OS picks: `cluster serve --app backend:app`."""
    full_env = {"CLUSTER_DISCOVERY_URL": discovery_url, "BACKEND_NAME": name}
    full_env.update(env or {})
    return start_serve("--service", service, "--app", "backend:app", "--ping-interval", "1",
                       "--expiry-grace", "1", *extra, env=full_env, name=name)


#: gunicorn's line once it listens: ``Listening at: http://127.0.0.1:PORT (PID)``
GUNICORN_LISTENING = re.compile(r"Listening at: http://127\.0\.0\.1:(\d+) ")


def gunicorn_port(proc: Proc, timeout: float = 20.0) -> int:
    """The port a gunicorn started with ``-b 127.0.0.1:0`` bound, read from its log.

    gunicorn itself writes no port file (cluster.gunicorn writes CLUSTER_PORT_FILE), but
    it logs the address it listens on (before forking its workers; connections queue
    until one accepts). Raises RuntimeError
    with the output when gunicorn exits first; the caller still stops ``proc``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = GUNICORN_LISTENING.search(proc.output())
        if found:
            return int(found.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"{proc} exited with {proc.returncode}:\n{proc.output()}")
        time.sleep(0.05)
    raise TimeoutError(f"{proc} logged no 'Listening at' after {timeout}s:\n{proc.output()}")


# --- raw HTTP/1.1 on a socket: exactly the bytes a test means -------------------------


class RawResponse:
    """One parsed response: status, headers (names lower-cased, in order), body."""

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]],
                 body: bytes) -> None:
        self.status, self.reason, self.headers, self.body = status, reason, headers, body

    def header(self, name: str) -> str | None:
        found = [v for k, v in self.headers if k == name.lower()]
        return found[-1] if found else None

    def __repr__(self) -> str:
        return f"<RawResponse {self.status} {self.reason!r} body={self.body[:80]!r}>"


def parse_responses(data: bytes, head_requests: int = 0) -> tuple[list[RawResponse], bytes]:
    """Split ``data`` into complete responses; returns them and the unparsed rest.

    Bodies are framed by Content-Length, chunked, or (without either) the end of data;
    1xx, 204 and 304 responses and the first ``head_requests`` answers have no body.
    """
    out: list[RawResponse] = []
    while data:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            break
        lines = data[:end].decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise ValueError(f"not an HTTP/1 status line: {lines[0]!r}")
        headers = []
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers.append((key.strip().lower(), value.strip()))
        status = int(code)
        rest_data = data[end + 4:]
        hdrs = dict(headers)
        if status < 200 or status in (204, 304) or len(out) < head_requests:
            body, data = b"", rest_data
        elif "chunked" in hdrs.get("transfer-encoding", "").lower():
            body, pos = b"", 0
            while True:
                line_end = rest_data.find(b"\r\n", pos)
                if line_end < 0:
                    return out, data
                size = int(rest_data[pos:line_end].split(b";")[0], 16)
                if size == 0:  # then trailer fields, up to an empty line
                    trailer_end = rest_data.find(b"\r\n\r\n", line_end)
                    if trailer_end < 0:
                        return out, data
                    data = rest_data[trailer_end + 4:]
                    break
                if len(rest_data) < line_end + 2 + size + 2:
                    return out, data
                body += rest_data[line_end + 2:line_end + 2 + size]
                pos = line_end + 2 + size + 2
        elif "content-length" in hdrs:
            length = int(hdrs["content-length"])
            if len(rest_data) < length:
                break
            body, data = rest_data[:length], rest_data[length:]
        else:
            body, data = rest_data, b""
        if status >= 200:  # interim responses (100 Continue) are skipped
            out.append(RawResponse(status, reason, headers, body))
    return out, data


def exchange(port: int, data: bytes, timeout: float = 5.0,
             head_requests: int = 0) -> tuple[list[RawResponse], bool]:
    """Send ``data`` on a new connection, read until the server closes or ``timeout``.

    Returns the responses and whether the server closed the connection (EOF or reset)
    within ``timeout``. A send that fails because the server already answered and
    closed is not an error: what it answered is what counts.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
        raw, closed = read_until_close(sock, timeout)
    responses, _rest = parse_responses(raw, head_requests)
    return responses, closed


def read_until_close(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the peer sends until it closes (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return b"".join(chunks), False
        except ConnectionResetError:
            return b"".join(chunks), True
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)


def read_response(sock: socket.socket, timeout: float = 5.0,
                  head_request: bool = False) -> RawResponse:
    """Read exactly one response from a keep-alive connection."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        responses, _rest = parse_responses(data, 1 if head_request else 0)
        if responses and (responses[0].header("content-length") is not None
                          or "chunked" in (responses[0].header("transfer-encoding") or "")
                          or head_request or responses[0].status in (204, 304)):
            return responses[0]
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete response after {timeout}s: {data[:200]!r}")
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            if responses:
                return responses[0]
            raise ConnectionError(f"closed before a complete response: {data[:200]!r}")
        data += chunk


def request_bytes(method: str = "GET", target: str = "/whoami",
                  headers: Sequence[tuple[str, str]] = (), body: bytes = b"",
                  version: str = "HTTP/1.1", host: str = "127.0.0.1") -> bytes:
    """A well-formed request head (Host first) followed by ``body`` as given."""
    lines = [f"{method} {target} {version}", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# --- request corpora: tests/request_corpus/{valid,invalid}/NAME.http + NAME.json -------------

REQUESTS = TESTS / "request_corpus"
_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|[rnt0\\])")


def decode_http(text: bytes) -> bytes:
    r"""The bytes a corpus ``.http`` file stands for.

    Real newlines in the file are layout only and are dropped; ``\r``, ``\n``, ``\t``,
    ``\0``, ``\xHH`` and ``\\`` are the bytes they name. So a bare LF or CR, a NUL or
    a byte above 127 is visible in the file instead of hidden in an editor.
    """
    table = {b"r": b"\r", b"n": b"\n", b"t": b"\t", b"0": b"\0", b"\\": b"\\"}

    def one(match: re.Match[bytes]) -> bytes:
        code = match.group(1)
        return bytes([int(code[1:], 16)]) if code[:1] == b"x" else table[code]

    return _ESCAPE.sub(one, text.replace(b"\n", b""))


class CorpusCase:
    """One request of a corpus: its bytes and what a strict HTTP/1.1 server does with it."""

    def __init__(self, kind: str, name: str, raw: bytes, expect: dict) -> None:
        self.kind, self.name, self.raw, self.expect = kind, name, raw, expect

    def __repr__(self) -> str:
        return f"<CorpusCase {self.kind}/{self.name}>"


def load_corpus(kind: str) -> list[CorpusCase]:
    """Every case under tests/request_corpus/<kind>/ (``valid`` or ``invalid``), sorted by name."""
    import json

    folder = REQUESTS / kind
    cases = []
    for path in sorted(folder.glob("*.http")):
        expect = json.loads(path.with_suffix(".json").read_text())
        cases.append(CorpusCase(kind, path.stem, decode_http(path.read_bytes()), expect))
    if not cases:
        raise FileNotFoundError(f"no *.http files under {folder}")
    return cases


def raw_websocket(port: int, path: str = "/ws", timeout: float = 5.0
                  ) -> tuple[socket.socket, bytes]:
    """A WebSocket handshake on a raw socket: the socket (the caller closes it) and the
    status line of the answer (b"" when the connection ended first)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 f"Sec-WebSocket-Version: 13\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            piece = sock.recv(4096)
        except OSError:
            piece = b""
        if not piece:
            break
        data += piece
    return sock, data.split(b"\r\n", 1)[0]


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The server's (unmasked) WebSocket frames in ``data`` as (opcode, payload); a
    frame cut short by the end of ``data`` comes last, with what arrived of it."""
    frames = []
    while len(data) >= 2:
        size, at = data[1] & 0x7F, 2
        if size == 126:
            size, at = struct.unpack("!H", data[2:4])[0], 4
        elif size == 127:
            size, at = struct.unpack("!Q", data[2:10])[0], 10
        frames.append((data[0] & 0x0F, data[at:at + size]))
        data = data[at + size:]
    return frames


def read_request_head(conn: socket.socket) -> bytes:
    """What a raw test endpoint reads of a request: up to its blank line (and whatever
    came with it), or b"" when the connection ended first."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return b""
        buf += data
    return buf


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


#: scripts/run-tests turns IPv6 on for the loopback when it is off, so CI runs these
needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this host")
