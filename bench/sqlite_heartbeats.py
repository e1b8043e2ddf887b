"""How long heartbeats wait on the embedded store while the disk is busy with other work.

Several processes share one SQLite file in WAL mode, as the instances of one host do,
and each upserts its record every ``--interval`` seconds; meanwhile ``dd`` writes and
fsyncs 300 MB at a time to the same file system, over and over. Reported per
``PRAGMA synchronous`` mode, one run after the other: the median, p99 and longest time
one upsert took (waiting for the write lock included). At FULL every commit syncs the
log while holding the file's one write lock, so one slow sync holds back every writer.

    python bench/sqlite_heartbeats.py [--seconds 30] [--writers 4]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path


def writer(path: str, mode: str, name: str, seconds: float, interval: float,
           out: multiprocessing.Queue) -> None:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    conn.execute(f"PRAGMA synchronous={mode}")
    waits = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        began = time.monotonic()
        conn.execute("INSERT INTO beats VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE"
                     " SET document = excluded.document, stamp = excluded.stamp",
                     (name, "x" * 300, time.time()))
        waits.append(time.monotonic() - began)
        time.sleep(max(0.0, interval - (time.monotonic() - began)))
    out.put(waits)


def run(mode: str, folder: Path, args: argparse.Namespace) -> list[float]:
    path = str(folder / f"{mode}.sqlite3")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS beats (name TEXT PRIMARY KEY, document TEXT,"
                 " stamp REAL)")
    out: multiprocessing.Queue = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=writer, args=(path, mode, f"w{n}", args.seconds,
                                                          args.interval, out))
             for n in range(args.writers)]
    for proc in procs:
        proc.start()
    waits = [w for _ in procs for w in out.get()]
    for proc in procs:
        proc.join()
    conn.close()
    return sorted(waits)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--interval", type=float, default=0.05,
                        help="seconds between one writer's upserts (default 0.05)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sqlite-beats-") as tmp:
        folder = Path(tmp)
        load = subprocess.Popen(
            ["sh", "-c", f"while :; do dd if=/dev/zero of={folder / 'load'} bs=1M count=300"
             " conv=fsync 2>/dev/null; done"], start_new_session=True)
        try:
            time.sleep(2)  # the disk busy before the first run
            print(f"{args.writers} writers, one upsert each per {args.interval:g} s, "
                  f"{args.seconds:g} s per run, dd writing and syncing 300 MB meanwhile")
            print("| synchronous | upserts | median | p99 | longest |")
            print("| --- | --- | --- | --- | --- |")
            for mode in ("FULL", "NORMAL", "FULL", "NORMAL"):
                waits = run(mode, folder, args)
                print(f"| {mode} | {len(waits):,} | {waits[len(waits) // 2] * 1e3:.2f} ms "
                      f"| {waits[int(len(waits) * 0.99)] * 1e3:.1f} ms "
                      f"| {waits[-1] * 1e3:.0f} ms |", flush=True)
        finally:
            os.killpg(load.pid, 15)
            load.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
