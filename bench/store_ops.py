"""Store CPU per single-document operation, against collection size, on FerretDB.

Which operations cost the same with 100 or 3,000 records decides what discovery may do
per heartbeat and per refresh (see docs/benchmarks.md, "Discovery at scale"). Each
operation addresses a record near the end of the collection (a lookup that stops at the
first match costs nothing on a record near the start, even when the store scans), and
runs ``--repeat`` times; the figure is the store's CPU (FerretDB's, plus PostgreSQL's
with that backend) per operation.

    python bench/store_ops.py --backend sqlite
    python bench/store_ops.py --backend postgresql   # needs Debian's postgresql
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import pymongo  # noqa: E402

from mongo_server import MongoServer  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def store_cpu(server: MongoServer) -> float:
    total = 0
    for pid in server.store_pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])
    return total / TICK


def record(i: int) -> dict[str, Any]:
    url = f"http://10.0.{i // 256}.{i % 256}:8000"
    return {"_id": f"web@{url}", "serviceName": "web", "endpoint": url,
            "endpointHash": "0" * 40, "balancer": None, "pingInterval": 5000,
            "timestamp": dt.datetime.now(dt.timezone.utc)}


def operations(collection: Any, small: Any, n: int) -> dict[str, Callable[[int], Any]]:
    """The operations timed, on a collection of n records and one of one document."""
    last = record(n - 3)
    key, selector = last["_id"], {"serviceName": "web", "endpoint": last["endpoint"]}

    def now() -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)

    return {
        "find_one by _id": lambda i: collection.find_one({"_id": key}),
        "find_one by _id, missing": lambda i: collection.find_one({"_id": "none"}),
        "find_one by serviceName+endpoint": lambda i: collection.find_one(selector),
        "replace_one by _id (changed)": lambda i: collection.replace_one(
            {"_id": key}, {**last, "timestamp": now()}),
        "update_one by _id ($set)": lambda i: collection.update_one(
            {"_id": key}, {"$set": {"timestamp": now()}}),
        "update_one by serviceName+endpoint": lambda i: collection.update_one(
            selector, {"$set": {"timestamp": now()}}),
        "insert_one": lambda i: collection.insert_one({"_id": f"x{i}", "n": i}),
        "delete_one by _id": lambda i: collection.delete_one({"_id": f"x{i}"}),
        "replace_one in a 1-document collection":
            lambda i: small.replace_one({"_id": "one"}, {"_id": "one", "n": i}),
        "find({}) of the whole collection": lambda i: list(collection.find({})),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--sizes", default="100,1000,3000")
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    with MongoServer.launch(use_env=False, backend=args.backend) as server:
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            server.database_url("store_ops"))
        database = client.get_default_database()
        rows: dict[str, list[float]] = {}
        for n in sizes:
            collection, small = database[f"records_{n}"], database[f"one_{n}"]
            collection.insert_many([record(i) for i in range(n)])
            small.insert_one({"_id": "one", "n": 0})
            for name, operation in operations(collection, small, n).items():
                repeat = args.repeat if "find({})" not in name else max(5, args.repeat // 20)
                before = store_cpu(server)
                for i in range(repeat):
                    operation(i)
                rows.setdefault(name, []).append((store_cpu(server) - before) / repeat * 1e3)
        client.close()
    print(f"FerretDB ({args.backend} backend): ms of store CPU per operation\n")
    print("| operation | " + " | ".join(f"{n:,} records" for n in sizes) + " |")
    print("| --- | " + " | ".join("---:" for _ in sizes) + " |")
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
