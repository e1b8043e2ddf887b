"""An endpoint that misbehaves on purpose, for tests/test_trust_e2e.py.

Answers every request on a connection with the script named by its path, and logs
one line per event to stdout (``accepted N``, ``closed-by-peer N``) so a test can see
what the proxy did with its connections::

    python tests/apps/bad_endpoint.py --port 9000   # --certfile C --keyfile K: https

Scripts (by request path):
  /extra     a complete response, then (0.2 s later) a second, unrequested one carrying
             a Set-Cookie: bytes a careless pool would hand to the next client
  /glued     the head of a response, then (0.05 s later) its body and that unrequested
             second response in one write: over TLS, one record
  /nocontent a 204, then (0.2 s later) a body
  /garbage   not HTTP at all
  /ok        a plain 200
  /ws        a 101 (a WebSocket upgrade taken), logged as ``upgrade on N`` (the
             connection's number); then the connection stays open until the peer closes
  /late      a plain 200, 0.6 s late
  /hold      no answer (a long poll), logged as ``holding N``; the connection stays
             open until the peer closes
  /hold-body the head and 10 of 100 body bytes, logged as ``holding N``; then as /hold
"""

from __future__ import annotations

import argparse
import socket
import ssl
import sys
import threading
import time

from portfile import add_port_arguments, report_port

STOLEN = b"HTTP/1.1 200 OK\r\nSet-Cookie: stolen=1\r\nContent-Length: 6\r\n\r\nstolen"
# Sent a moment after the script, so they sit unread in a pooled connection.
LATE = {b"/extra": STOLEN, b"/nocontent": b"stolen"}
SCRIPTS = {
    b"/extra": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"/nocontent": b"HTTP/1.1 204 No Content\r\n\r\n",
    b"/garbage": b"SSH-2.0-not-http\r\n\r\n",
    b"/ok": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
}

HOLD = {b"/hold": b"",
        b"/hold-body": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"}


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def serve(conn: socket.socket, number: int) -> None:
    buf = b""
    try:
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    say(f"closed-by-peer {number}")
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].split(b"?")[0]
            if path in HOLD:
                conn.sendall(HOLD[path])
                say(f"holding {number}")
                while conn.recv(65536):
                    pass
                say(f"closed-by-peer {number}")
                return
            if path == b"/ws":
                say(f"upgrade on {number}")
                conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\n\r\n")
                while conn.recv(65536):
                    pass
                say(f"closed-by-peer {number}")
                return
            if path == b"/late":
                time.sleep(0.6)
            if path == b"/glued":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
                time.sleep(0.05)
                conn.sendall(b"ok" + STOLEN)
                continue
            conn.sendall(SCRIPTS.get(path, SCRIPTS[b"/ok"]))
            if path in LATE:
                time.sleep(0.2)
                conn.sendall(LATE[path])
    except OSError:
        say(f"closed-by-peer {number}")
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_port_arguments(parser)
    parser.add_argument("--certfile", help="serve https with this certificate")
    parser.add_argument("--keyfile")
    args = parser.parse_args()
    listener = socket.create_server(("127.0.0.1", args.port))
    tls = None
    if args.certfile:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(args.certfile, args.keyfile)
    report_port(listener.getsockname(), args.port_file)
    say("listening")
    number = 0
    while True:
        conn, _ = listener.accept()
        number += 1
        say(f"accepted {number}")
        threading.Thread(target=handshake_and_serve, args=(conn, number, tls),
                         daemon=True).start()


def handshake_and_serve(conn: socket.socket, number: int, tls: ssl.SSLContext | None) -> None:
    """serve(), over TLS when ``tls`` is given (the handshake in this thread: a probe
    that never completes one holds up nobody else)."""
    if tls is not None:
        try:
            conn = tls.wrap_socket(conn, server_side=True)
        except OSError:  # ssl.SSLError included
            say(f"closed-by-peer {number}")
            conn.close()
            return
    serve(conn, number)


if __name__ == "__main__":
    main()
