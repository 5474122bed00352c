"""FAISS item index: exact vs IVF, add/remove, availability filters, hot swap under concurrent queries."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch  # noqa: F401  (torch before faiss)
import faiss

from cloud_recsys.index import IndexConfig, ItemIndex

faiss.omp_set_num_threads(1)
torch.set_num_threads(1)
DIM = 16


def clustered(n: int, seed: int = 0, clusters: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, DIM))
    v = centers[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, DIM))
    v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    return np.arange(n, dtype=np.int64) * 7 + 3, v  # non-dense raw ids


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_search_matches_exact(kind: str) -> None:
    ids, v = clustered(4000)
    ix = ItemIndex(DIM, IndexConfig(kind=kind, nlist=32, nprobe=8))
    ix.build(ids, v)
    assert ix.kind == kind and len(ix) == 4000
    q = v[:50]
    _, got = ix.search(q, 20)
    _, exact = ix.exact_search(q, 20)
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(got, exact)])
    assert recall >= (1.0 if kind == "flat" else 0.9)
    # inner product, not L2: scores are the dot products, best first
    s, i = ix.search(q[:1], 5)
    assert np.allclose(s[0], v[(i[0] - 3) // 7] @ q[0], atol=1e-5) and (np.diff(s[0]) <= 1e-6).all()


def test_auto_kind_by_corpus_size() -> None:
    ids, v = clustered(1000)
    small = ItemIndex(DIM, IndexConfig(kind="auto", auto_ivf_min=5000))
    small.build(ids, v)
    big = ItemIndex(DIM, IndexConfig(kind="auto", auto_ivf_min=800))
    big.build(ids, v)
    assert small.kind == "flat" and big.kind == "ivf"


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_add_remove_and_upsert(kind: str) -> None:
    ids, v = clustered(2000)
    ix = ItemIndex(DIM, IndexConfig(kind=kind, nlist=16, nprobe=16))
    ix.build(ids[:1500], v[:1500])
    assert ix.remove(ids[:10]) == 10 and len(ix) == 1490
    _, got = ix.search(v[:10], 5)
    assert not np.isin(got, ids[:10]).any()
    ix.add(ids[1500:], v[1500:])
    assert len(ix) == 1990
    _, got = ix.search(v[1500:1510], 1)
    assert (got[:, 0] == ids[1500:1510]).all()  # new items are found (each is its own best match)
    ix.add(ids[20:21], -v[20:21])  # upsert replaces, never duplicates
    assert len(ix) == 1990
    vec, found = ix.vectors(ids[20:21])
    assert found.all() and np.allclose(vec, -v[20:21])


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_availability_filters(kind: str) -> None:
    ids, v = clustered(3000)
    ix = ItemIndex(DIM, IndexConfig(kind=kind, nlist=16, nprobe=16, exact_filter_below=100))
    ix.build(ids, v)
    allowed_big = ids[::3]  # FAISS selector path
    allowed_small = ids[:50]  # exact path over the allowed rows
    for allowed in (allowed_big, allowed_small):
        s, got = ix.search(v[:20], 30, allowed=allowed)
        assert np.isin(got[got >= 0], allowed).all()
        assert (got >= 0).sum() > 0
    blocked = ids[:1000]
    _, got = ix.search(v[:20], 30, blocked=blocked)
    assert not np.isin(got, blocked).any()
    _, got = ix.search(v[:5], 10, allowed=ids[:60], blocked=ids[:30])
    assert np.isin(got[got >= 0], ids[30:60]).all()
    # fewer allowed than k: padded with -1 / -inf
    s, got = ix.search(v[:1], 10, allowed=ids[:3])
    assert sorted(got[0][:3].tolist()) == sorted(ids[:3].tolist()) and (got[0][3:] == -1).all() and np.isinf(s[0][3:]).all()


def test_concurrent_queries_during_add_remove_and_swap() -> None:
    ids, v = clustered(3000)
    ix = ItemIndex(DIM, IndexConfig(kind="ivf", nlist=16, nprobe=4))
    ix.build(ids[:2000], v[:2000])
    errors: list[BaseException] = []
    stop = threading.Event()
    counts = {"q": 0}

    def reader() -> None:
        try:
            while not stop.is_set():
                s, got = ix.search(v[:8], 10)
                assert got.shape == (8, 10) and ((got >= 0) | (got == -1)).all()
                assert np.isin(got[got >= 0], ids).all()  # only real ids, never garbage
                counts["q"] += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for r in range(6):
            ix.add(ids[2000 + 100 * r : 2100 + 100 * r], v[2000 + 100 * r : 2100 + 100 * r])
            ix.remove(ids[100 * r : 100 * r + 50])
            fresh = ItemIndex(DIM, IndexConfig(kind="flat" if r % 2 else "ivf", nlist=16))
            fresh.build(ids[r * 10 :], v[r * 10 :])  # built off the hot path ...
            ix.swap(fresh)  # ... swapped atomically
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert counts["q"] > 0 and ix.generation >= 7 and len(ix) == 3000 - 50


def test_serialize_roundtrip_and_bad_input() -> None:
    ids, v = clustered(1000)
    ix = ItemIndex(DIM, IndexConfig(kind="ivf", nlist=16, nprobe=16))
    ix.build(ids, v)
    ix2 = ItemIndex.from_bytes(ix.to_bytes(), ix.config)
    assert ix2.kind == "ivf" and len(ix2) == 1000
    assert (ix2.search(v[:5], 10)[1] == ix.search(v[:5], 10)[1]).all()
    with pytest.raises(ValueError):
        ix.search(np.zeros((1, DIM + 1), np.float32), 5)
    with pytest.raises(ValueError):
        ix.search(v[:1], 0)
    with pytest.raises(ValueError):
        ix.add(np.array([1, 1]), v[:2])
    with pytest.raises(ValueError):
        ix.add(np.array([1]), np.full((1, DIM), np.nan, np.float32))
    with pytest.raises(ValueError):
        IndexConfig(kind="lsh")
    empty = ItemIndex(DIM)
    s, got = empty.search(v[:2], 3)
    assert (got == -1).all()


def test_set_nprobe_trades_recall_without_rebuild_and_train_sample() -> None:
    ids, v = clustered(6000, seed=3)
    ix = ItemIndex(DIM, IndexConfig(kind="ivf", nlist=64, nprobe=1, train_sample=2500))
    ix.build(ids, v)
    assert len(ix) == 6000  # trained on a sample, every vector indexed
    gen = ix.generation
    q = v[:100] + 0.05
    _, exact = ix.exact_search(q, 50)

    def rec() -> float:
        _, got = ix.search(q, 50)
        return float(np.mean([len(set(a) & set(b)) / 50 for a, b in zip(got, exact)]))

    low = rec()
    ix.set_nprobe(64)  # every cell: exact
    assert rec() == 1.0 > low and ix.generation == gen and ix.config.nprobe == 64
    with pytest.raises(ValueError):
        ix.set_nprobe(0)
    with pytest.raises(ValueError, match="train_sample"):
        IndexConfig(train_sample=0)
