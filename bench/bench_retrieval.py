"""Candidate service speed: training throughput, then top-k latency in-process and over HTTP.

Why: a device calls the cloud once per session for ~100 candidates with int8 features;
that call must stay in the low milliseconds, and the trainer must keep up with the stream.
Uses the synthetic log (no data needed) and the service exactly as deployed
(``CandidateService`` + ``create_app``; HTTP through FastAPI's in-process test client,
so network cost is excluded).

    nice -n 10 python bench/bench_retrieval.py --events 200000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch  # noqa: F401  (import order: torch before faiss)
import faiss


def pct(xs: list[float]) -> tuple[float, float]:
    a = np.array(xs) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def main() -> None:
    from fastapi.testclient import TestClient

    from cloud_recsys.config import TwoTowerConfig
    from cloud_recsys.http import create_app
    from cloud_recsys.index import IndexConfig
    from cloud_recsys.service import CandidateService
    from cloud_recsys.trainer import OnlineTrainer
    from streams.datasets.synthetic import SyntheticConfig, generate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1, help="torch and faiss threads (set explicitly)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    faiss.omp_set_num_threads(a.threads)

    log_ = generate(SyntheticConfig(events=a.events, seed=0))
    cfg = TwoTowerConfig(num_users=log_.n_users + 1, num_items=log_.n_items + 1, num_categories=256, history_len=20)
    trainer = OnlineTrainer(cfg)
    t0 = time.perf_counter()
    fit = trainer.fit(log_, epochs=1)
    fit_s = time.perf_counter() - t0
    svc = CandidateService(trainer, IndexConfig(kind="auto", threads=a.threads), k=a.k)
    t0 = time.perf_counter()
    svc.refresh()
    refresh_s = time.perf_counter() - t0
    users = log_.events.user_id.unique()
    rng = np.random.default_rng(0)
    pick = rng.choice(users, a.requests)
    at = int(log_.events.ts_ms.max())

    single = []
    for u in pick.tolist():
        s = time.perf_counter()
        svc.candidates(int(u), a.k, at)
        single.append(time.perf_counter() - s)
    batch = []
    for s0 in range(0, 64 * 20, 64):
        s = time.perf_counter()
        svc.candidates_batch(pick[s0 % len(pick) : s0 % len(pick) + 64].tolist(), a.k, at)
        batch.append(time.perf_counter() - s)
    client = TestClient(create_app(svc))
    http = []
    size = 0
    for u in pick.tolist():
        s = time.perf_counter()
        r = client.get("/candidates", params={"user_id": int(u), "k": a.k, "at_ms": at})
        http.append(time.perf_counter() - s)
        size = len(r.content)
    one = svc.candidates(int(pick[0]), a.k, at)

    print(f"synthetic log: {len(log_):,} events, {log_.n_users:,} users, {svc.metrics()['items_indexed']:,} items "
          f"indexed ({svc.index.kind}), k={a.k}, threads={a.threads}")  # fmt: skip
    print("| figure | value |")
    print("|---|---|")
    print(f"| fit, 1 epoch | {fit_s:.1f} s ({trainer.events_trained / fit_s:,.0f} positives/s, loss {fit['loss']:.3f}) |")
    print(f"| refresh (export item vectors + rebuild index + swap) | {refresh_s * 1000:.0f} ms |")
    p50, p99 = pct(single)
    print(f"| candidates(user), in-process: p50 / p99 | {p50:.2f} / {p99:.2f} ms |")
    p50, p99 = pct(batch)
    print(f"| candidates_batch(64 users): p50 / p99 | {p50:.2f} / {p99:.2f} ms ({64 / np.mean(batch):,.0f} users/s) |")
    p50, p99 = pct(http)
    print(f"| GET /candidates (in-process HTTP): p50 / p99 | {p50:.2f} / {p99:.2f} ms |")
    print(f"| payload: binary / JSON | {one.nbytes:,} B / {size:,} B |")


if __name__ == "__main__":
    main()
