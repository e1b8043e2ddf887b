"""Request-head parsing: the door's pure-Python parser against httptools (llhttp).

    python bench/parser_bench.py [--rounds 5] [--count 20000]

Issue 7 allows a C parser where it measurably beats pure Python. This times, in one
process, the two ways of turning a request head into what the door routes on:

- ``cluster.http1.parse_request_head``: the door's own parser (RFC 9112 checks, the
  limits, the framing decision, a ``RequestHead``);
- httptools 0.x (``pip install httptools``; skipped if missing): an
  ``HttpRequestParser`` fed the head, its callbacks collecting the URL and the header
  pairs, one parser reused across heads as on a keep-alive connection. This is *less*
  than the door needs: nothing checks the limits, builds a ``RequestHead`` or decides
  the framing from what it collected, so its figure is a lower bound for a door built
  on it.

Three heads: what wrk sends (2 headers), a browser's GET (12 headers, 0.7 KB with
cookies) and a POST with a body length. Figures: µs per head, the median of
``--rounds`` rounds of ``--count`` heads each; CPU only, no sockets.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.http1 import parse_request_head  # noqa: E402

HEADS = {
    "wrk GET": b"GET /100 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n",
    "browser GET": (
        b"GET /app/dashboard?tab=overview&range=7d HTTP/1.1\r\n"
        b"Host: app.example.com\r\n"
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 "
        b"Firefox/128.0\r\n"
        b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
        b"Accept-Language: en-US,en;q=0.5\r\n"
        b"Accept-Encoding: gzip, deflate, br, zstd\r\n"
        b"Referer: https://app.example.com/app/login\r\n"
        b"Connection: keep-alive\r\n"
        b"Cookie: session=8f14e45fceea167a5a36dedd4bea2543; cluster-web=6512bd43d9caa6e0"
        b"2c990b0a82652dca; theme=dark; _ga=GA1.1.1234567890.1700000000\r\n"
        b"Upgrade-Insecure-Requests: 1\r\n"
        b"Sec-Fetch-Dest: document\r\n"
        b"Sec-Fetch-Mode: navigate\r\n"
        b"Sec-Fetch-Site: same-origin\r\n"
    ),
    "POST with a body": (
        b"POST /api/items HTTP/1.1\r\nHost: app.example.com\r\n"
        b"Content-Type: application/json\r\nContent-Length: 27\r\n"
        b"Accept: application/json\r\nX-Request-Id: 3f2a9c1e\r\n"
    ),
}


def door(head: bytes) -> Callable[[], object]:
    body = head[:-2]  # what the door passes: up to, not including, the blank line
    return lambda: parse_request_head(body)


def httptools_parser(head: bytes) -> Callable[[], object] | None:
    try:
        import httptools
    except ImportError:
        return None

    class Collect:
        def __init__(self) -> None:
            self.url = b""
            self.headers: list[tuple[bytes, bytes]] = []
            self.done = False

        def on_url(self, url: bytes) -> None:
            self.url = url

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name, value))

        def on_headers_complete(self) -> None:
            self.done = True

    sink = Collect()
    parser = httptools.HttpRequestParser(sink)
    # A head with no body, so one parser takes head after head (keep-alive); the POST's
    # body goes with it, as the parser would otherwise wait for it.
    whole = head + b"\r\n" + (b"x" * 27 if head.startswith(b"POST") else b"")

    def parse() -> object:
        sink.headers = []
        parser.feed_data(whole)
        return parser.get_method(), sink.url, sink.headers

    parse()
    return parse


def per_head_us(fn: Callable[[], object], count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        fn()
    return (time.perf_counter() - start) * 1e6 / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=20000)
    args = parser.parse_args()
    rows = []
    for name, head in HEADS.items():
        ways = {"door (pure Python)": door(head), "httptools": httptools_parser(head)}
        figures = {}
        for way, fn in ways.items():
            if fn is None:
                continue
            fn()  # warm
            figures[way] = statistics.median(per_head_us(fn, args.count)
                                             for _ in range(args.rounds))
        rows.append((name, len(head) + 2, figures))
    print("| head | bytes | door (pure Python) µs | httptools µs (a lower bound) |")
    print("| --- | ---: | ---: | ---: |")
    for name, size, figures in rows:
        tools = figures.get("httptools")
        print(f"| {name} | {size} | {figures['door (pure Python)']:.2f} | "
              f"{f'{tools:.2f}' if tools is not None else 'not installed'} |")
    command = " ".join(["python bench/parser_bench.py", *sys.argv[1:]])
    print(f"\nMedians of {args.rounds} rounds of {args.count} heads.\n\ncommand: `{command}`")


if __name__ == "__main__":
    main()
