"""Full evaluation on the two real logs: wall time and tables.

Runs ``tandem evaluate`` (all strategies + the DriftTriggered sweep) on
../shared/data/twitch-livestream-2000u and ../shared/data/movielens-latest-small,
writing reports under runs/bench-evaluate/<source>/. Target: each under 15 minutes
on a 2-core machine. Skips with a message when ../shared/data is absent.

    python bench/bench_evaluate.py [twitch] [movielens]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from streams.datasets import SHARED_DATA, SHARED_FOLDERS

TARGET_S = 15 * 60


def main(argv: list[str]) -> int:
    sources = argv or ["twitch", "movielens"]
    if not SHARED_DATA.is_dir():
        print(f"SKIP: real logs not found at {SHARED_DATA} (they live beside the project's CI checkout only)")
        return 0
    from typer.testing import CliRunner

    from tandem.cli import app

    rows = []
    for src in sources:
        if not (SHARED_DATA / SHARED_FOLDERS[src]).exists():
            print(f"SKIP {src}: {SHARED_DATA / SHARED_FOLDERS[src]} missing")
            continue
        out = Path("runs/bench-evaluate") / src
        t0 = time.perf_counter()
        res = CliRunner().invoke(app, ["evaluate", "--source", src, "--out", str(out)])
        wall = time.perf_counter() - t0
        print(res.output)
        if res.exit_code != 0:
            print(f"FAILED {src}: {res.exception!r}")
            return 1
        rows.append((src, wall))
    import json

    for src, wall in rows:
        verdict = "OK" if wall < TARGET_S else "OVER TARGET"
        print(f"{src:10s} wall {wall:7.1f} s  (target < {TARGET_S} s) {verdict}")
        res = json.loads((Path("runs/bench-evaluate") / src / "results.json").read_text())
        print("           loop timing: " + ", ".join(f"{k}={v:.0f}s" for k, v in res["timings"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
