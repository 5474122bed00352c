"""Runs every benchmark in bench/ one after the other and prints each one's figures.

Benchmarks print figures (speed, memory, bytes); tests check correctness. Each runs in
its own process so one's memory and threads do not colour the next. ``--quick`` uses
small sizes (a smoke run of every script in a few minutes); the default sizes are the
ones quoted in the README and the issues' closing notes.

    python bench/run_all.py [--quick] [--only transport device ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent

# name -> (script, full-size args, quick args)
SUITE: dict[str, tuple[str, list[str], list[str]]] = {
    "transport": ("bench_transport.py", [], ["--events", "200000", "--json-events", "10000"]),
    "synthetic": ("bench_synthetic.py", [], ["--sizes", "1000", "100000", "--replay"]),
    "device": ("bench_device.py", [], ["--fleet-users", "200", "--fleet-events", "10000"]),
    "index": ("bench_index.py", [], ["--items", "100000"]),
    "retrieval": ("bench_retrieval.py", [], ["--events", "10000", "--extra-items", "20000"]),
    "load": ("bench_load.py", ["--seconds", "600", "--every", "30"], ["--seconds", "20"]),
    "evaluate": ("bench_evaluate.py", [], ["movielens"]),
    "loop-speed": ("bench_loop_speed.py", ["--events", "20000"], ["--events", "5000"]),
    "fleet-shards": ("bench_fleet_shards.py", [], ["--source", "synthetic", "--events", "3000", "--shards", "0,2"]),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every benchmark")
    ap.add_argument("--only", nargs="+", choices=sorted(SUITE), help="run only these")
    args = ap.parse_args(argv)
    failed: list[str] = []
    for name in args.only or list(SUITE):
        script, full, quick = SUITE[name]
        path = BENCH / script
        if not path.exists():
            print(f"== {name}: {script} missing", flush=True)
            failed.append(name)
            continue
        cmd = [sys.executable, str(path), *(quick if args.quick else full)]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"== {name}: exit {rc} in {time.perf_counter() - t0:.1f}s", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
