"""FAISS IVF item index at 1M items: recall vs exact, latency, throughput, build time, memory.

Why: the candidate service must answer top-100 over a catalogue of ~1M items in
milliseconds with recall close to exact search. This builds the index exactly as
the service does (``cloud_recsys.index.ItemIndex`` + ``IndexConfig``), picks the
smallest ``nprobe`` whose recall@100 against brute force reaches the target, and
times single and batched queries at that setting.

    nice -n 10 python bench/bench_index.py --items 1000000 --threads 2
"""

from __future__ import annotations

import argparse
import gc
import resource
import time

import numpy as np
import torch  # noqa: F401  (import order: torch before faiss)
import faiss

from cloud_recsys.index import IndexConfig, ItemIndex


def rss_mb() -> float:
    """Current resident set size (MB) from /proc (Linux)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def clustered(n: int, dim: int, clusters: int, seed: int, spread: float = 0.5) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres (item embeddings are clustered by taste)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    step = 200_000
    for s in range(0, n, step):
        m = min(step, n - s)
        out[s : s + m] = centres[rng.integers(0, clusters, m)] + spread * rng.standard_normal((m, dim)).astype(np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean |found & truth| / |truth| per query."""
    return float(np.mean([len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth)]))


def time_queries(ix: ItemIndex, q: np.ndarray, batch: int, k: int, repeats: int) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, queries/s) of ``search`` with ``batch`` queries per call."""
    lat = []
    for r in range(repeats):
        s = (r * batch) % (len(q) - batch + 1)
        t0 = time.perf_counter()
        ix.search(q[s : s + batch], k)
        lat.append(time.perf_counter() - t0)
    lat_ms = np.array(lat) * 1000
    return float(np.percentile(lat_ms, 50)), float(np.percentile(lat_ms, 99)), batch * len(lat) / float(np.sum(lat))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--nlist", type=int, default=4096)
    ap.add_argument("--train-sample", type=int, default=262_144, help="IVF k-means training vectors")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--nprobes", default="8,16,32,48,64,96,128,192,256")
    ap.add_argument("--threads", type=int, default=2, help="faiss OpenMP threads (set explicitly)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    faiss.omp_set_num_threads(a.threads)
    torch.set_num_threads(1)

    t0 = time.perf_counter()
    vecs = clustered(a.items, a.dim, a.clusters, a.seed)
    ids = np.arange(a.items, dtype=np.int64) * 3 + 11  # sparse raw ids, as in real catalogues
    rng = np.random.default_rng(a.seed + 1)
    q = vecs[rng.integers(0, a.items, a.queries)] + 0.3 * rng.standard_normal((a.queries, a.dim)).astype(np.float32)
    q = np.ascontiguousarray(q / np.linalg.norm(q, axis=1, keepdims=True), dtype=np.float32)
    gen_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    _, truth_rows = faiss.knn(q, vecs, a.k, metric=faiss.METRIC_INNER_PRODUCT)  # brute force
    truth = ids[truth_rows]
    exact_s = time.perf_counter() - t0

    gc.collect()
    rss0 = rss_mb()
    cfg = IndexConfig(kind="ivf", nlist=a.nlist, nprobe=8, threads=a.threads, train_sample=a.train_sample)
    t0 = time.perf_counter()
    ix = ItemIndex(a.dim, cfg)
    ix.build(ids, vecs)
    build_s = time.perf_counter() - t0
    rss_index = rss_mb() - rss0
    faiss_mb = faiss.extract_index_ivf(ix._index).invlists.compute_ntotal() * (a.dim * 4 + 8) / 2**20

    sweep = []
    chosen = None
    for p in [int(x) for x in a.nprobes.split(",")]:
        ix.set_nprobe(p)
        t0 = time.perf_counter()
        _, found = ix.search(q, a.k)
        dt = time.perf_counter() - t0
        r = recall(found, truth)
        sweep.append((p, r, a.queries / dt))
        print(f"nprobe {p:4d}: recall@{a.k} {r:.4f}  ({a.queries / dt:,.0f} q/s at batch {a.queries})", flush=True)
        if r >= a.target_recall:
            chosen = p
            break
    if chosen is None:
        raise SystemExit(f"no nprobe in {a.nprobes} reached recall {a.target_recall}")
    ix.set_nprobe(chosen)
    _, found = ix.search(q, a.k)
    rec = recall(found, truth)

    rows = []
    for batch, repeats in ((1, 500), (256, 20)):
        p50, p99, qps = time_queries(ix, q, batch, a.k, repeats)
        rows.append((batch, p50, p99, qps))
    # exact search through the same service path, for scale
    ex_t0 = time.perf_counter()
    faiss.knn(q[:256], vecs, a.k, metric=faiss.METRIC_INNER_PRODUCT)
    exact256_ms = (time.perf_counter() - ex_t0) * 1000

    print()
    print(f"FAISS IVF{ix._nlist(a.items) if cfg.nlist is None else cfg.nlist},Flat (inner product), {a.items:,} items x {a.dim}d, "
          f"{a.clusters} clusters, {a.queries} queries, k={a.k}, faiss threads={a.threads}")  # fmt: skip
    print("| figure | value |")
    print("|---|---|")
    print(f"| build (train on {min(a.train_sample, a.items):,} + add {a.items:,}) | {build_s:.1f} s |")
    print(f"| nprobe chosen (smallest with recall >= {a.target_recall}) | {chosen} |")
    print(f"| recall@{a.k} ANN vs exact | {rec:.4f} |")
    for batch, p50, p99, qps in rows:
        print(f"| batch {batch}: p50 / p99 latency | {p50:.2f} ms / {p99:.2f} ms |")
        print(f"| batch {batch}: throughput | {qps:,.0f} queries/s |")
    print(f"| exact brute force, batch 256 | {exact256_ms:.0f} ms ({256 / exact256_ms * 1000:,.0f} queries/s) |")
    print(f"| memory: FAISS inverted lists | {faiss_mb:.0f} MB |")
    print(f"| memory: RSS growth for the index (FAISS + id/vector store) | {rss_index:.0f} MB |")
    print(f"| (data generation {gen_s:.1f} s, ground truth {exact_s:.1f} s) | |")


if __name__ == "__main__":
    main()
