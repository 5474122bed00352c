"""The two-tower recall channel served from FAISS: exact on a flat index, filtered per request,
recall@k >= 0.9 on IVF/HNSW, one index per strategy overlay, and checkpoints that pickle."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from cloud_recsys.config import TwoTowerConfig
from cloud_recsys.index import IndexConfig
from cloud_recsys.recommender import TWO_TOWER_INDEX, CloudRecommender, RecommenderConfig, Request, Session
from streams.batch import EventBatch
from streams.candidates import top_indices
from streams.schema import EventKind


def _rec(dim: int = 16, index_config: IndexConfig | None = None, **kw: int) -> CloudRecommender:
    tt = TwoTowerConfig(num_users=64, num_items=64, embedding_dim=dim, out_dim=dim, user_hidden=(16,), item_hidden=(16,), batch_size=32)
    return CloudRecommender(RecommenderConfig(two_tower=tt, **kw), index_config=index_config)  # type: ignore[arg-type]


def _trained(rec: CloudRecommender, n_sessions: int) -> CloudRecommender:
    """``rec`` after sessions that walk chains a -> a+1 -> a+2 over items 0..59, then a refresh."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 20, n_sessions)[:, None] * 3 + np.arange(3)
    items = a.ravel()
    users = np.repeat(np.arange(n_sessions), 3)
    ts = np.arange(len(items), dtype=np.int64) * 1000 + np.repeat(np.arange(n_sessions), 3) * 3_600_000
    n = len(items)
    rec.ingest(EventBatch.from_columns(event_id=np.arange(n), ts_ms=ts, user_id=users, item_id=items, value=np.ones(n), kind=np.full(n, int(EventKind.CLICK))))
    rec.refresh()
    return rec


def _catalogue(rec: CloudRecommender, n: int, seed: int = 0, missing: int = 0) -> np.ndarray:
    """Put ``n`` clustered unit item vectors (raw ids 1000 + row) into ``rec``'s snapshot and
    index, the last ``missing`` rows without a vector (as refresh would); returns the vectors."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((40, rec.dim))
    v = centers[rng.integers(0, 40, n)] + 0.5 * rng.standard_normal((n, rec.dim))
    v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    rec._rows(np.arange(1000, 1000 + n), add=True)
    rec.has_vector = np.ones(n, bool)
    if missing:
        v[-missing:] = 0.0
        rec.has_vector[-missing:] = False
    rec.vectors = v
    rec.index.swap(rec.index_for(rec.vectors, rec.has_vector))
    return v


def _queries(rec: CloudRecommender, n: int, seed: int = 1) -> np.ndarray:
    q = np.random.default_rng(seed).standard_normal((n, rec.dim)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def _channel(rec: CloudRecommender, reqs: list[Request], qs: np.ndarray) -> list[np.ndarray]:
    """The two-tower channel's rows per request, as ``_candidates`` takes them."""
    from cloud_recsys.recommender import _exact_top

    n = rec.n_rows
    masks: dict[int, np.ndarray] = {}
    hits = rec._two_tower_search(reqs, qs, rec.index, n, masks)
    out = []
    for j, r in enumerate(reqs):
        ok = masks[id(r.allowed)].copy() if r.allowed is not None else np.ones(n, bool)
        if r.exclude:
            er = rec._rows(np.fromiter(r.exclude, np.int64))
            ok[er[er >= 0]] = False
        out.append(_exact_top(hits[j][ok[hits[j]]], rec.vectors, qs[j], rec.config.two_tower_k))
    return out


def _exact(rec: CloudRecommender, q: np.ndarray, ok: np.ndarray) -> np.ndarray:
    s = np.where(ok & rec.has_vector, rec.vectors @ q, -np.inf)
    return top_indices(s, min(rec.config.two_tower_k, int(np.isfinite(s).sum())))


def test_flat_index_equals_exact_top_k_and_respects_allowed_and_excluded() -> None:
    rec = _rec(index_config=IndexConfig(kind="flat"))
    _catalogue(rec, 3000, missing=50)
    assert rec.index.kind == "flat" and len(rec.index) == 2950
    qs = _queries(rec, 12)
    rng = np.random.default_rng(2)
    live = 1000 + rng.choice(3000, 700, replace=False)  # one shared "live now" set, as a time's availability
    big_exclude = set((1000 + rng.choice(3000, 1500, replace=False)).tolist())  # searched alone, blocked
    reqs = []
    for j in range(12):
        allowed = live if j % 3 == 1 else None
        exclude = big_exclude if j == 5 else (set((1000 + rng.choice(3000, 40, replace=False)).tolist()) if j % 2 else None)
        reqs.append(Request(j, 0, Session.empty(), allowed=allowed, exclude=exclude))
    got = _channel(rec, reqs, qs)
    for j, r in enumerate(reqs):
        ok = np.ones(rec.n_rows, bool)
        if r.allowed is not None:
            ok[:] = False
            ok[r.allowed - 1000] = True
        if r.exclude:
            ok[np.fromiter(r.exclude, np.int64) - 1000] = False
        want = _exact(rec, qs[j], ok)
        assert len(got[j]) == rec.config.two_tower_k
        assert sorted(got[j].tolist()) == sorted(want.tolist()), j
        raw = set(rec.raw_ids(got[j]).tolist())
        if r.allowed is not None:
            assert raw <= set(r.allowed.tolist())
        assert not raw & (r.exclude or set())
        assert rec.has_vector[got[j]].all()


def test_ties_go_to_the_lower_row() -> None:
    rec = _rec(dim=4, index_config=IndexConfig(kind="flat"))
    _catalogue(rec, 300)
    rec.vectors[:] = rec.vectors[0]  # every item scores the same
    rec.index.swap(rec.index_for(rec.vectors, rec.has_vector))
    got = _channel(rec, [Request(0, 0, Session.empty())], _queries(rec, 1))[0]
    assert got.tolist() == list(range(rec.config.two_tower_k))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_keeps_recall_at_k(kind: str) -> None:
    rec = _rec(index_config=dataclasses.replace(TWO_TOWER_INDEX, kind=kind))  # the served breadths, forced kind
    _catalogue(rec, 20_000)
    assert rec.index.kind == kind
    qs = _queries(rec, 50)
    got = _channel(rec, [Request(j, 0, Session.empty()) for j in range(50)], qs)
    all_ok = np.ones(rec.n_rows, bool)
    recall = np.mean([len(set(g.tolist()) & set(_exact(rec, q, all_ok).tolist())) / rec.config.two_tower_k for g, q in zip(got, qs)])
    assert recall >= 0.9, recall


def test_refresh_rebuilds_the_index_over_the_rows_with_vectors(tmp_path: Path) -> None:
    from tandem.evaluation.saved import load_cloud, save_cloud

    rec = _rec()
    assert len(rec.index) == 0
    gen = rec.index.generation
    _trained(rec, 40)
    assert rec.index.generation == gen + 1 and rec.index.kind == "flat"
    assert sorted(rec.index.ids().tolist()) == np.flatnonzero(rec.has_vector).tolist()
    vecs, found = rec.index.vectors(np.flatnonzero(rec.has_vector))
    assert found.all() and np.array_equal(vecs, rec.vectors[rec.has_vector])
    back = load_cloud(save_cloud(tmp_path, rec))  # the evaluation's checkpoint pickles the cloud, index included
    assert back.index.kind == "flat" and len(back.index) == len(rec.index)
    req = Request(3, 10**9, Session(np.array([3]), np.array([10**9 - 1])))
    a, b = rec.recommend([req], 10)[0], back.recommend([req], 10)[0]
    assert a.item_ids.tolist() == b.item_ids.tolist() and np.array_equal(a.scores, b.scores)


def test_strategy_overlay_is_served_from_its_own_index() -> None:
    from device_rerank.reranker import Reranker, RerankerConfig
    from tandem.strategies.server import StrategyCloud, serve_candidates
    rec = _trained(_rec(two_tower_k=5, i2i_k=0, sknn_k=0, trending_k=0), 60)  # two-tower + the session only
    sc = StrategyCloud(Reranker(RerankerConfig(emb_dim=rec.dim)))
    sc.refresh(rec)
    assert sc.index is None  # no deltas: the snapshot's own index serves
    q = rec.trainer.query_vectors(np.array([7]), [np.array([30])])[0]
    far = int(rec.raw_ids(np.argsort(np.where(rec.has_vector, rec.vectors @ q, np.inf))[:1])[0])  # liked least
    req = Request(7, 10**9, Session(np.array([30]), np.array([10**9 - 1])))
    assert far not in rec.recommend([req], rec.n_rows)[0].item_ids.tolist()
    sc.apply_item_deltas({far: 3.0 * q})
    sc.refresh(rec)
    assert sc.index is not None and len(sc.index) == int(rec.has_vector.sum())
    served = serve_candidates(sc, rec, [req], k=rec.n_rows)[0]
    assert far in served.item_ids.tolist()  # moved into the two-tower top-k by the delta
    once = rec.recommend([req], rec.n_rows, vectors=sc.item_vecs)[0]  # an index built for this call
    assert served.item_ids.tolist() == once.item_ids.tolist()
    assert far not in rec.recommend([req], rec.n_rows)[0].item_ids.tolist()  # the snapshot is unchanged
