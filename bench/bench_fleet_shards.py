"""Scaling curve of the fleet shards: events/s of the prequential loop with one replay's devices
split by user over 0 (in process), 1, 2, 4 Ray actors (``run_prequential(..., fleet_shards=N)``).

Replays the first N events once per shard count for the device strategy (hybrid by default),
plus cloud-only in process for the ratio, and prints per run: the wall, events/s of the loop
(wall less the shards' start: Ray is started once up front and reused, each run still starts
its actors), the speed-up vs shards=0, the device time (driver wall of the device phase), the
busiest shard's device work summed over windows, every shard's work summed (all_shards_s: about
busiest_s x shards when the split is even and the cores free; on fewer free cores than shards the
shards' work stretches as they wait for a core), the wire (split, transfer, merge: device
phase less the busiest shard), and NDCG@10, which must be identical for every shard count.

    python bench/bench_fleet_shards.py [--source twitch|synthetic] [--events 12000] [--shards 0,1,2,4] [--strategies hybrid]

Measured at 580d99d (twitch, first 12,000 events; a 2-core machine shared with other jobs,
load 1.4 at the start; also in the README under --fleet-shards):

    source=twitch events=12,000 strategies=hybrid cores=2 load1=1.87
    cloud-only in process: 1,604 events/s
    shards   wall_s  start_s  events/s  speed-up  vs cloud  devices_s  busiest_s  all_shards_s   wire_s  NDCG@10
         0     21.0      0.0       571     1.00x     0.36x       11.6       11.5          11.5      0.0  0.409193
         1     19.4      1.6       674     1.18x     0.42x        8.5       12.1          12.1      0.3  0.409193
         2     17.0      1.6       781     1.37x     0.49x        5.8        9.4          17.4      0.4  0.409193
         4     18.9      3.3       767     1.34x     0.48x        6.1        9.8          33.6      0.6  0.409193
    NDCG@10 identical across shard counts

Two cores cap any gain near 2x. One shard gains by overlapping the device phase with the cloud's
training; two put the devices on the second core; four only add start-up and contention. The
wire costs the driver about 10 ms per window (256 events). Run again while another job held one
core: 533, 480, 473, 425 events/s at 0, 1, 2, 4 shards (no free core, no gain).
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="twitch", help="twitch (default; synthetic when ../shared is absent) or synthetic")
    ap.add_argument("--events", type=int, default=12_000)
    ap.add_argument("--strategies", default="hybrid", help="device strategies to shard (comma list); cloud-only runs beside them")
    ap.add_argument("--shards", default="0,1,2,4", help="shard counts (0: in process)")
    a = ap.parse_args()

    from streams.datasets import SHARED_FOLDERS, data_root, load_source
    from tandem.evaluation.prequential import EvalConfig, run_prequential
    from tandem.evaluation.shards import connect
    from tandem.strategies import make_strategies

    shard_counts = [int(x) for x in a.shards.split(",") if x.strip()]
    source = a.source if a.source != "twitch" or (data_root() / SHARED_FOLDERS["twitch"]).is_dir() else "synthetic"
    log = load_source(source, events=a.events) if source == "synthetic" else load_source(source)
    cfg = EvalConfig(max_events=a.events, n_boot=10)
    n = min(a.events, len(log))
    ray, started = connect() if any(shard_counts) else (None, False)

    t0 = time.perf_counter()
    run_prequential(log, make_strategies("cloud-only"), cfg)
    cloud_eps = n / (time.perf_counter() - t0)

    rows = []
    for s in shard_counts:
        strategies = make_strategies(a.strategies)
        t0 = time.perf_counter()
        res = run_prequential(log, strategies, cfg, fleet_shards=s)
        wall = time.perf_counter() - t0
        t = res.timings
        loop = wall - t.get("shards_start_s", 0.0)
        ndcg = tuple(round(res.get(st.label).metrics["NDCG@10"].mean, 12) for st in strategies)
        rows.append((s, wall, n / loop, t, ndcg))
    if started:
        ray.shutdown()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"source={source} events={n:,} strategies={a.strategies} cores={os.cpu_count()} load1={load:.2f}")
    print(f"cloud-only in process: {cloud_eps:,.0f} events/s")
    base = rows[0][2] if rows and rows[0][0] == 0 else None
    head = f"{'shards':>6}{'wall_s':>9}{'start_s':>9}{'events/s':>10}{'speed-up':>10}{'vs cloud':>10}{'devices_s':>11}{'busiest_s':>11}{'all_shards_s':>14}{'wire_s':>9}  NDCG@10"
    print(head)
    for s, wall, eps, t, ndcg in rows:
        up = f"{eps / base:.2f}x" if base else "-"
        print(
            f"{s:>6}{wall:>9.1f}{t.get('shards_start_s', 0.0):>9.1f}{eps:>10,.0f}{up:>10}{eps / cloud_eps:>9.2f}x"
            f"{t.get('devices_s', 0.0):>11.1f}{t.get('devices_busy_s', 0.0):>11.1f}{t.get('shards_work_s', t.get('devices_busy_s', 0.0)):>14.1f}{t.get('shards_wire_s', 0.0):>9.1f}  "
            + ",".join(f"{x:.6f}" for x in ndcg)
        )
    same = len({r[4] for r in rows}) <= 1
    print("NDCG@10 identical across shard counts" if same else "NDCG@10 DIFFERS across shard counts")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
