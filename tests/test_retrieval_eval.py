"""The offline retrieval evaluation: temporal split, seed ensembles, exact vs FAISS rows."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from cloud_recsys.config import TwoTowerConfig
from cloud_recsys.retrieval_eval import RetrievalEvalConfig, evaluate, fit_towers, temporal_split
from streams.datasets.synthetic import SyntheticConfig, generate

MODEL = TwoTowerConfig(embedding_dim=8, out_dim=8, user_hidden=(16,), item_hidden=(16,), history_len=10, batch_size=128)


@pytest.fixture(scope="module")
def world():  # type: ignore[no-untyped-def]
    return generate(SyntheticConfig(events=3000, users=40, items=80, days=4.0, seed=5))


def _sized(world) -> TwoTowerConfig:  # type: ignore[no-untyped-def]
    ev = world.events
    return replace(MODEL, num_users=int(ev.user_id.nunique()) + 1, num_items=int(ev.item_id.nunique()) + 1, num_categories=64)


def test_ensemble_scores_are_the_mean_of_its_members(world) -> None:  # type: ignore[no-untyped-def]
    train, _, split = temporal_split(world, 0.8)
    users = np.unique(train.events.user_id.to_numpy())[:10]
    cfg = _sized(world)
    ids, q, v, counts, _ = fit_towers(train, users, split, cfg, members=2, epochs=1)
    assert q.shape == (10, 16) and v.shape == (len(ids), 16) and len(counts) == len(ids)
    ids0, q0, v0, _, _ = fit_towers(train, users, split, cfg, members=1, epochs=1)
    ids1, q1, v1, _, _ = fit_towers(train, users, split, replace(cfg, seed=cfg.seed + 1), members=1, epochs=1)
    pos = {int(x): j for j, x in enumerate(ids.tolist())}
    r0 = [pos[int(x)] for x in ids0.tolist()]
    r1 = [pos[int(x)] for x in ids1.tolist()]
    mean = np.zeros((10, len(ids)), np.float32)
    mean[:, r0] += 0.5 * (q0 @ v0.T)
    mean[:, r1] += 0.5 * (q1 @ v1.T)
    np.testing.assert_allclose(q @ v.T, mean, atol=1e-5)


def test_evaluate_rows_and_bounds(world) -> None:  # type: ignore[no-untyped-def]
    cfg = RetrievalEvalConfig(epochs=1, ensemble=2, popularity_prior=1.0, model=MODEL)
    rows = evaluate(world, cfg)
    assert {"popularity", "popularity-recent", "two-tower (exact)", "_info"} <= set(rows)
    faiss = [m for m in rows if m.startswith("two-tower (faiss")]
    assert len(faiss) == 1
    for m in ("popularity", "two-tower (exact)", faiss[0]):
        assert set(rows[m]) == {"Recall@50", "Recall@100", "NDCG@10"}
        assert all(0.0 <= x <= 1.0 for x in rows[m].values())
        assert rows[m]["Recall@100"] >= rows[m]["Recall@50"]
    assert rows["_info"]["test_users"] > 0


def test_bad_ensemble_is_rejected() -> None:
    with pytest.raises(ValueError, match="ensemble"):
        RetrievalEvalConfig(ensemble=0)
