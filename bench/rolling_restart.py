"""Rolling restart under load, through a balancer-only front: how many requests fail?

    python bench/rolling_restart.py [--steps 4] [--pause 4] [--code DIR]

Two instances of the test backend (``cluster serve --service web``) behind a
``cluster serve --ui-service web`` front, discovery in a temp SQLite file, ping 1 s,
grace 1 s, default --eject-seconds. wrk -t1 -c20 sends GET /whoami to the front the whole
time while, at each step, one instance gets SIGTERM, is started again on the same port
one second later, and the next step follows ``--pause`` seconds after that (the setup
of issue 8). Prints wrk's request count and its non-2xx/3xx and socket error counts.
``--code`` runs another checkout's ``cluster`` (to compare with an older commit).
Every process is started here and stopped by PID; the temp dir is removed at the end.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from bed import ROOT, Bed, free_port, wrk, wrk_result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--pause", type=float, default=4.0)
    parser.add_argument("--code", type=Path, default=ROOT)
    args = parser.parse_args()
    bed = Bed(code=args.code, prefix="rolling-")
    try:
        ports = [free_port(), free_port()]
        members = [bed.member(p, f"m{n}") for n, p in enumerate(ports)]
        front_port = free_port()
        bed.front(front_port)
        time.sleep(2)  # every table complete
        duration = int(args.steps * (1 + args.pause) + 4)
        load = wrk(f"http://127.0.0.1:{front_port}/whoami", 20, duration)
        time.sleep(2)
        for step in range(args.steps):
            n = step % len(members)
            members[n].send_signal(signal.SIGTERM)
            time.sleep(1.0)
            members[n] = bed.member(ports[n], f"m{n}")
            time.sleep(args.pause)
        result = wrk_result(load, timeout=duration + 30)
        print(f"code={args.code} steps={args.steps} pause={args.pause}s "
              f"requests={result.requests} non-2xx={result.non2xx} "
              f"socket-errors={result.errors_text()}")
        return 0
    finally:
        bed.close()


if __name__ == "__main__":
    sys.exit(main())
