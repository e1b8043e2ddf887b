"""Connect, send echoes, print which process answered: ``python client.py URL [N]``."""

from __future__ import annotations

import json
import sys

import socketio


def main() -> None:
    url = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    client = socketio.Client(reconnection=False)
    client.connect(url, wait_timeout=10)
    answers = [client.call("echo", f"hello {i}", timeout=10) for i in range(count)]
    print(json.dumps({"pids": sorted({a["pid"] for a in answers}),
                      "echoes": answers[-1]["echoes"], "transport": client.transport()}))
    client.disconnect()


if __name__ == "__main__":
    main()
