"""Events per second of the prequential loop, per strategy, side by side in one run.

Replays the first N events of a log once per strategy (one process, one core for torch)
and prints each strategy's events/s and its ratio to cloud-only, plus where the time went
(cloud training, retrieval, devices, aggregation rounds). Issue 13's target: hybrid at
3,000 events/s or more on one core.

    python bench/bench_loop_speed.py [--source twitch|synthetic|PATH] [--events 20000] [--strategies cloud-only,hybrid]
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
    a = ap.parse_args()

    from streams.datasets import SHARED_DATA, load_source
    from tandem.evaluation.prequential import EvalConfig, run_prequential
    from tandem.strategies import make_strategies

    source = a.source if a.source != "twitch" or SHARED_DATA.is_dir() else "synthetic"
    log = load_source(source, events=a.events) if source == "synthetic" else load_source(source)
    cfg = EvalConfig(max_events=a.events, n_boot=10)
    n = min(a.events, len(log))
    rows: list[tuple[str, float, dict[str, float]]] = []
    for strategy in make_strategies(a.strategies):
        t0 = time.perf_counter()
        res = run_prequential(log, [strategy], cfg, workers=1)
        wall = time.perf_counter() - t0
        rows.append((strategy.label, n / wall, res.timings))
    base = next((eps for label, eps, _ in rows if label == "cloud-only"), None)
    print(f"source={source} events={n:,} (one process, torch on one thread)")
    print(f"{'strategy':<16}{'events/s':>10}{'vs cloud-only':>15}{'cloud_train_s':>15}{'retrieval_s':>13}{'devices_s':>11}{'rounds_s':>10}")
    for label, eps, t in rows:
        ratio = f"{eps / base:.2f}x" if base else "-"
        print(f"{label:<16}{eps:>10,.0f}{ratio:>15}{t.get('cloud_train_s', 0):>15.1f}{t.get('retrieval_s', 0):>13.1f}{t.get('devices_s', 0):>11.1f}{t.get('rounds_s', 0):>10.1f}")
    hybrid = next((eps for label, eps, _ in rows if label == "hybrid"), None)
    if hybrid is not None:
        verdict = "meets" if hybrid >= TARGET_HYBRID_EVENTS_PER_S else "misses"
        print(f"hybrid {hybrid:,.0f} events/s {verdict} the {TARGET_HYBRID_EVENTS_PER_S:,} events/s target")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
