"""Serving speed and recall of the cloud's two-tower channel: FAISS indexes vs exact search.

Why: ``CloudRecommender`` (what the evaluation and ``tandem serve cloud`` both run) takes its
two-tower candidates from a FAISS ``ItemIndex`` rebuilt at each refresh. This trains it on
the synthetic log (no data needed), then pads the snapshot with ``--extra-items`` unit vectors
(a catalogue at production size: clustered like a trained item tower's, 200 clusters around
the trained items' directions; ``--uniform``: uniform on the sphere, IVF's worst case), and
serves the same requests through each index kind, side by side with the exact search the
channel did before (a matmul over every item):

* refresh: building the index off the hot path (the swap itself is a pointer change);
* channel: the two-tower top-``two_tower_k`` for a batch of requests, p50 / p99;
* recommend: the whole ranked list (every channel, the features, the ranking stage);
* recall: the channel's hits against exact top-k, and the served top-``k`` against the list
  served with the exact (flat) index.

    nice -n 10 python bench/bench_retrieval.py --events 30000 --extra-items 100000
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch  # noqa: F401  (import order: torch before faiss)
import faiss


def pct(xs: list[float]) -> tuple[float, float]:
    a = np.array(xs) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def main() -> None:
    from cloud_recsys.index import IndexConfig
    from cloud_recsys.recommender import TWO_TOWER_INDEX, Request, _exact_top, build_recommender
    from streams.candidates import top_indices
    from streams.datasets.synthetic import SyntheticConfig, generate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=30_000, help="synthetic events the cloud trains on")
    ap.add_argument("--extra-items", type=int, default=100_000, help="unit item vectors added to the snapshot")
    ap.add_argument("--uniform", action="store_true", help="extra items uniform on the sphere (no cluster structure)")
    ap.add_argument("--k", type=int, default=100, help="served list length")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64, help="requests per recommend() call")
    ap.add_argument("--threads", type=int, default=1, help="torch and faiss threads (set explicitly)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    faiss.omp_set_num_threads(a.threads)

    log_ = generate(SyntheticConfig(events=a.events, seed=0))
    ev = log_.events
    rec = build_recommender(int(ev.user_id.nunique()) + 1, int(ev.item_id.nunique()) + 1, 32, num_categories=len(set(log_.item_categories().values())) + 2,
                            item_categories=log_.item_categories())  # fmt: skip
    t0 = time.perf_counter()
    for b in log_.batches(1000):
        rec.ingest(b)
    train_s = time.perf_counter() - t0
    rec.refresh()
    trained = int(rec.has_vector.sum())
    if a.extra_items:  # a production-size catalogue: fresh raw ids past the log's
        rng = np.random.default_rng(0)
        extra = rng.standard_normal((a.extra_items, rec.dim)).astype(np.float32)
        if not a.uniform:
            trained_vecs = rec.vectors[rec.has_vector]
            centers = trained_vecs[rng.integers(0, len(trained_vecs), 200)] + 0.3 * rng.standard_normal((200, rec.dim))
            centers /= np.linalg.norm(centers, axis=1, keepdims=True)
            extra = centers[rng.integers(0, 200, a.extra_items)] + (0.5 / np.sqrt(rec.dim)) * extra
        extra = (extra / np.linalg.norm(extra, axis=1, keepdims=True)).astype(np.float32)
        rec._rows(int(ev.item_id.max()) + 1 + np.arange(a.extra_items), add=True)
        rec.vectors = np.concatenate([rec.vectors, extra])
        rec.has_vector = np.concatenate([rec.has_vector, np.ones(a.extra_items, bool)])
    n_items = int(rec.has_vector.sum())

    users = ev.user_id.unique()
    pick = np.random.default_rng(1).choice(users, a.requests)
    at = int(ev.ts_ms.max())
    reqs = [Request(int(u), at, rec.session_of(int(u))) for u in pick.tolist()]
    batches = [reqs[s : s + a.batch] for s in range(0, len(reqs), a.batch)]
    qs = [rec.trainer.query_vectors(np.array([r.user_id for r in b], np.int64), [r.session.item_ids for r in b]) for b in batches]
    kt = rec.config.two_tower_k

    # the channel before: one matmul over every item, then a top-k per request
    before, exact_hits = [], []
    for q in qs:
        s = time.perf_counter()
        tt = rec.vectors @ q.T
        hits = [top_indices(np.where(rec.has_vector, tt[:, j], -np.inf), kt) for j in range(len(q))]
        before.append(time.perf_counter() - s)
        exact_hits += hits

    kinds = [("flat", IndexConfig(kind="flat")), ("auto (served)", TWO_TOWER_INDEX), ("ivf", dataclasses.replace(TWO_TOWER_INDEX, kind="ivf")),
             ("hnsw", dataclasses.replace(TWO_TOWER_INDEX, kind="hnsw"))]  # fmt: skip
    rows_out = []
    served_exact: list[np.ndarray] = []
    for name, cfg in kinds:
        rec.index_config = cfg
        s = time.perf_counter()
        rec.index = rec.index_for(rec.vectors, rec.has_vector)
        build_s = time.perf_counter() - s
        chan, hits = [], []
        for b, q in zip(batches, qs):
            s = time.perf_counter()
            found = rec._two_tower_search(b, q, rec.index, rec.n_rows, {})
            got = [_exact_top(found[j], rec.vectors, q[j], kt) for j in range(len(b))]
            chan.append(time.perf_counter() - s)
            hits += got
        full, served = [], []
        for b in batches:
            s = time.perf_counter()
            out = rec.recommend(b, a.k)
            full.append(time.perf_counter() - s)
            served += [r.item_ids for r in out]
        if not served_exact:
            served_exact = served
        recall = np.mean([len(set(h.tolist()) & set(e.tolist())) / max(1, len(e)) for h, e in zip(hits, exact_hits)])
        served_recall = np.mean([len(set(h.tolist()) & set(e.tolist())) / max(1, len(e)) for h, e in zip(served, served_exact)])
        rows_out.append((f"{name}: {rec.index.kind}", build_s, pct(chan), pct(full), recall, served_recall))

    print(f"synthetic log: {len(log_):,} events, {log_.n_users:,} users; cloud trained in {train_s:.1f} s; {n_items:,} items indexed "
          f"({trained:,} trained + {a.extra_items:,} {'uniform' if a.uniform else 'clustered'}), dim {rec.dim}, two_tower_k={kt}, k={a.k}, batches of {a.batch}, threads={a.threads}")  # fmt: skip
    print(f"| two-tower index | build | channel, {a.batch} requests: p50 / p99 | recommend(), {a.batch} requests: p50 / p99 | channel recall@{kt} vs exact | served recall@{a.k} vs flat |")
    print("|---|---|---|---|---|---|")
    p50, p99 = pct(before)
    print(f"| exact matmul (before) | - | {p50:.1f} / {p99:.1f} ms | - | 1.000 | - |")
    for name, build_s, (c50, c99), (r50, r99), recall, served_recall in rows_out:
        print(f"| {name} | {build_s * 1000:.0f} ms | {c50:.1f} / {c99:.1f} ms | {r50:.1f} / {r99:.1f} ms | {recall:.3f} | {served_recall:.3f} |")


if __name__ == "__main__":
    main()
