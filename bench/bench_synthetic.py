"""Synthetic generator benchmark: generation time and peak memory per size (and, with --replay,
replay throughput into an embedded log).

Each size runs in its own process so the peak RSS is that size's alone.

    python3 bench/bench_synthetic.py                       # 1k, 100k, 1M, 10M
    python3 bench/bench_synthetic.py --sizes 1000 100000 --replay
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def one(events: int, seed: int, do_replay: bool) -> dict:
    """Generate (and optionally replay) one size in this process; returns the figures."""
    from streams.datasets.synthetic import SyntheticConfig, generate

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    log = generate(SyntheticConfig(events=events, seed=seed))
    seconds = time.perf_counter() - t
    out = {
        "events": len(log),
        "users": log.n_users,
        "streamers": log.n_items,
        "live_intervals": len(log.availability),
        "seconds": round(seconds, 3),
        "events_per_s": round(len(log) / seconds),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "rss_before_mb": round(rss0 / 1024),
        "frame_mb": round(log.events.memory_usage(deep=True).sum() / 1e6),
    }
    if do_replay:
        from streams.embedded_log import EmbeddedLog
        from streams.replay import replay

        with tempfile.TemporaryDirectory() as tmp, EmbeddedLog(tmp) as tr:
            s = replay(log, tr, progress=False)
            out["replay_seconds"] = round(s.seconds, 3)
            out["replay_events_per_s"] = round(s.events_per_s)
            out["replay_bytes_per_event"] = round(s.bytes / max(1, s.events + s.availability_events), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000, 1_000_000, 10_000_000])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replay", action="store_true", help="also replay into a temporary EmbeddedLog")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.seed, args.replay)))
        return
    header = f"{'events':>11} {'users':>8} {'streams':>8} {'gen s':>8} {'events/s':>11} {'peak MB':>8}"
    if args.replay:
        header += f" {'replay s':>9} {'replay ev/s':>12} {'B/event':>8}"
    print(header)
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--one", str(n), "--seed", str(args.seed)] + (["--replay"] if args.replay else [])
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        line = (
            f"{r['events']:>11,} {r['users']:>8,} {r['streamers']:>8,} {r['seconds']:>8.2f} "
            f"{r['events_per_s']:>11,} {r['peak_rss_mb']:>8,}"
        )
        if args.replay:
            line += f" {r['replay_seconds']:>9.2f} {r['replay_events_per_s']:>12,} {r['replay_bytes_per_event']:>8}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
