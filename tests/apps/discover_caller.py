"""A Python service that calls another through cluster.discover(), as users would.

Reads commands on stdin ("call", "where", "quit") and answers one JSON line each, so
a test can drive it while it kills endpoints.
"""

from __future__ import annotations

import json
import sys

import cluster


def main() -> None:
    client = cluster.discover(sys.argv[1])
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        try:
            if command == "call":
                response = client.get("/whoami", timeout=5)
                answer = {"status": response.status_code, "body": response.text,
                          "base_url": client.base_url}
            else:
                answer = {"base_url": client.base_url}
        except cluster.ClusterError as exc:
            answer = {"error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - report anything to the test, keep going
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
