"""Events per second of the prequential loop, per strategy, side by side in one run.

Replays the first N events of a log once per strategy (one process, one core for torch)
and prints each strategy's events/s and its ratio to cloud-only, plus where the time went
(cloud training, retrieval, devices, aggregation rounds, baselines), the device time per
event and NDCG@10 (so a speed change that moves a result shows up here). Issue 13's
target: hybrid at 3,000 events/s or more on one core.

    python bench/bench_loop_speed.py [--source twitch|synthetic|PATH] [--events 20000] [--strategies cloud-only,hybrid]
    python bench/bench_loop_speed.py --source synthetic --world-events 3000000 --users 100000 --events 100000

The second form builds the synthetic world of a 3M-event livestream log with 100k users (the
size of the Twitch 100k-user log, which cannot be fetched here), replays its first N events and
prints the projected time of the whole log for cloud-only + hybrid on 2 cores (one replay
worker each, as ``tandem evaluate --workers 2`` runs them): the slower strategy's rate over the
whole log. A projection from the first N events, not a measured 3M run.
"""

from __future__ import annotations

import argparse
import time

TARGET_HYBRID_EVENTS_PER_S = 3_000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="twitch", help="a log source (default twitch; synthetic when ../shared is absent)")
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--strategies", default="cloud-only,hybrid")
    ap.add_argument("--world-events", type=int, default=0, help="synthetic only: size the world for this many events (default: --events)")
    ap.add_argument("--users", type=int, default=0, help="synthetic only: users in the world (default: scaled from its size)")
    a = ap.parse_args()

    from streams.datasets import SHARED_FOLDERS, data_root, load_source
    from tandem.evaluation.prequential import EvalConfig, run_prequential
    from tandem.strategies import make_strategies

    source = a.source if a.source != "twitch" or (data_root() / SHARED_FOLDERS["twitch"]).is_dir() else "synthetic"
    world = max(a.world_events, a.events)
    opts = {"events": world, **({"users": a.users} if a.users else {})}
    log = load_source(source, **opts) if source == "synthetic" else load_source(source)
    cfg = EvalConfig(max_events=a.events, n_boot=10)
    n = min(a.events, len(log))
    rows: list[tuple[str, float, dict[str, float], float]] = []
    for strategy in make_strategies(a.strategies):
        t0 = time.perf_counter()
        res = run_prequential(log, [strategy], cfg, workers=1)
        wall = time.perf_counter() - t0
        ndcg = next(r.metrics["NDCG@10"].mean for r in res.results if r.label == strategy.label)
        rows.append((strategy.label, n / wall, res.timings, ndcg))
    base = next((eps for label, eps, _, _ in rows if label == "cloud-only"), None)
    print(f"source={source} events={n:,} of a {len(log):,}-event log, {log.n_users:,} users (one process, torch on one thread)")
    cols = ("cloud_train_s", "retrieval_s", "devices_s", "rounds_s", "baselines_s")
    print(f"{'strategy':<16}{'events/s':>10}{'vs cloud-only':>15}" + "".join(f"{c:>14}" for c in cols) + f"{'device_ms/ev':>14}{'NDCG@10':>10}")
    for label, eps, t, ndcg in rows:
        ratio = f"{eps / base:.2f}x" if base else "-"
        per_ev = 1e3 * t.get("devices_s", 0) / max(n, 1)
        print(f"{label:<16}{eps:>10,.0f}{ratio:>15}" + "".join(f"{t.get(c, 0):>14.1f}" for c in cols) + f"{per_ev:>14.3f}{ndcg:>10.6f}")
    hybrid = next((eps for label, eps, _, _ in rows if label == "hybrid"), None)
    if hybrid is not None:
        verdict = "meets" if hybrid >= TARGET_HYBRID_EVENTS_PER_S else "misses"
        print(f"hybrid {hybrid:,.0f} events/s {verdict} the {TARGET_HYBRID_EVENTS_PER_S:,} events/s target")
    if world > n and rows:
        slowest = min(eps for _, eps, _, _ in rows)
        print(f"projected whole log ({len(log):,} events), {', '.join(r[0] for r in rows)} on {len(rows)} cores: "
              f"{len(log) / slowest / 60:,.0f} min (the slowest strategy's rate over the first {n:,} events)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
