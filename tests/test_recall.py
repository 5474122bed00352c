"""Multi-channel recall: the merge rule and its use for uploaded interest vectors."""

from __future__ import annotations

import numpy as np
import pytest

from cloud_recsys.recall import merge_channels
from device_rerank.reranker import Reranker
from tandem.evaluation.prequential import LiveIndex, StrategyCloud, _candidates_for


def test_share_zero_is_the_primary_channel() -> None:
    primary = np.array([5, 3, 9, 1, 7])
    assert merge_channels(primary, np.array([8, 6]), 4, 0.0).tolist() == [5, 3, 9, 1]


def test_secondary_fills_its_share_without_duplicates() -> None:
    primary = np.array([1, 2, 3, 4, 5, 6])
    secondary = np.array([2, 9, 8, 1, 7])
    out = merge_channels(primary, secondary, 6, 0.5)
    # the primary keeps its top 3; the secondary adds its best 3 not already taken (2 is)
    assert out.tolist() == [1, 2, 3, 9, 8, 7]


def test_short_secondary_is_topped_up_from_the_primary() -> None:
    out = merge_channels(np.array([1, 2, 3, 4, 5]), np.array([1, 9]), 5, 0.8)
    assert out.tolist() == [1, 9, 2, 3, 4]
    assert len(set(out.tolist())) == len(out)


def test_short_lists_and_bad_share() -> None:
    assert merge_channels(np.array([1]), np.array([2]), 5, 0.5).tolist() == [1, 2]
    assert merge_channels(np.array([1]), np.array([2]), 0, 0.5).tolist() == []
    with pytest.raises(ValueError, match="share"):
        merge_channels(np.array([1]), np.array([2]), 2, 1.5)



def _cloud(share: float) -> StrategyCloud:
    rng = np.random.default_rng(0)
    sc = StrategyCloud(Reranker(), interest_share=share)
    sc.item_ids = np.arange(100, 140, dtype=np.int64)
    vecs = rng.normal(size=(40, 32)).astype(np.float32)
    sc.item_vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    sc.pos = {int(x): j for j, x in enumerate(sc.item_ids.tolist())}
    sc.emb_q = np.zeros((40, 32), np.int8)
    sc.emb_scale = np.ones(40, np.float32)
    return sc


def test_interest_vector_adds_candidates_scored_by_the_cloud_model() -> None:
    sc = _cloud(0.5)
    q = sc.item_vecs[[0]].copy()  # the user's cloud query points at item 100
    users, ts, known = np.array([7]), np.array([0]), np.array([True])
    live = LiveIndex.__new__(LiveIndex)
    live.enabled = False
    before = _candidates_for(sc, users, ts, q, known, live, np.zeros(0, np.int64), None, 10)[0]
    far = int(np.argmin(sc.item_vecs @ q[0]))  # the item the cloud likes least
    sc.set_user_vectors({7: sc.item_vecs[far]})
    after = _candidates_for(sc, users, ts, q, known, live, np.zeros(0, np.int64), None, 10)[0]
    assert int(sc.item_ids[far]) not in before.item_ids.tolist()
    assert int(sc.item_ids[far]) in after.item_ids.tolist()
    assert len(after) == 10 and set(before.item_ids[:5].tolist()) <= set(after.item_ids.tolist())
    # scores stay the main model's, best first, so the device sees the same cloud opinion
    rows = np.array([sc.pos[int(i)] for i in after.item_ids])
    np.testing.assert_allclose(after.scores, sc.item_vecs[rows] @ q[0], rtol=1e-5)
    assert (np.diff(after.scores) <= 1e-6).all()
    # share 0 switches the channel off
    off = _cloud(0.0)
    off.set_user_vectors({7: off.item_vecs[far]})
    assert np.array_equal(_candidates_for(off, users, ts, q, known, live, np.zeros(0, np.int64), None, 10)[0].item_ids, before.item_ids)
