"""Two-tower model pieces: id maps, histories (no leakage), logQ, training, popularity, metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cloud_recsys.config import TwoTowerConfig
from cloud_recsys.features import UserHistory, build_kjt
from cloud_recsys.ids import IdMap, IdMapFull
from cloud_recsys.popularity import Popularity
from cloud_recsys.retrieval_eval import ndcg_at_k, recall_at_k
from cloud_recsys.trainer import OnlineTrainer
from cloud_recsys.two_tower import TwoTower, in_batch_logits, sampled_softmax_loss
from streams.batch import EventBatch
from streams.schema import EventKind

torch.set_num_threads(1)

TINY = TwoTowerConfig(num_users=64, num_items=128, num_categories=8, embedding_dim=8, out_dim=8,
                      user_hidden=(16,), item_hidden=(16,), history_len=4, batch_size=32, seed=0)  # fmt: skip


def clustered_stream(n: int = 1536, users: int = 40, items: int = 80, seed: int = 0) -> EventBatch:
    """Users in 4 taste groups, each engaging with its own quarter of the items."""
    rng = np.random.default_rng(seed)
    u = rng.integers(0, users, n)
    group = u % 4
    it = group * (items // 4) + rng.integers(0, items // 4, n)
    return EventBatch.from_columns(event_id=np.arange(n), ts_ms=np.arange(n) * 1000, user_id=u + 1000,
                                   item_id=it * 10, value=np.ones(n), kind=np.full(n, int(EventKind.CLICK)))  # fmt: skip


# -- ids ---------------------------------------------------------------------------
def test_idmap_grows_online_and_reports_unknown() -> None:
    m = IdMap(capacity=4)
    assert m.lookup(np.array([10, 20])).tolist() == [-1, -1]
    assert m.lookup(np.array([20, 10, 20]), add=True).tolist() == [0, 1, 0]  # first-sight order
    assert m.lookup(np.array([10, 99])).tolist() == [1, -1]
    assert m.to_raw(np.array([0, 1, 7])).tolist() == [20, 10, -1]


def test_idmap_overflow_shared_or_raise() -> None:
    m = IdMap(capacity=2)
    rows = m.lookup(np.array([1, 2, 3, 4]), add=True)
    assert rows.tolist() == [0, 1, 2, 2] and m.overflow_row == 2 and m.num_rows == 3 and m.overflowed == 2
    strict = IdMap(capacity=1, overflow="raise")
    strict.lookup(np.array([5]), add=True)
    with pytest.raises(IdMapFull):
        strict.lookup(np.array([6]), add=True)
    with pytest.raises(ValueError):
        IdMap(0)


def test_idmap_state_roundtrip() -> None:
    m = IdMap(10)
    m.lookup(np.array([7, 3, 9]), add=True)
    m2 = IdMap(1)
    m2.load_state_dict(m.state_dict())
    assert m2.lookup(np.array([9, 7, 3, 4])).tolist() == [2, 0, 1, -1]


# -- histories ---------------------------------------------------------------------
def test_history_has_no_leakage_within_a_batch() -> None:
    h = UserHistory(num_rows=4, history_len=3)
    h.push(np.array([0]), np.array([100]), np.array([1]))
    users = np.array([0, 1, 0, 0, 0])
    items = np.array([101, 200, 102, 103, 104])
    vals, lens = h.read_before_push(users, items, np.arange(2, 7))
    per = np.split(vals, np.cumsum(lens)[:-1])
    assert [p.tolist() for p in per] == [[100], [], [100, 101], [100, 101, 102], [101, 102, 103]]
    assert h.read(np.array([0]))[0].tolist() == [102, 103, 104]
    # at_ms: only items strictly before the time
    assert h.read(np.array([0]), at_ms=6)[0].tolist() == [102, 103]


def test_trainer_examples_never_see_their_own_item() -> None:
    t = OnlineTrainer(TINY)
    seen: list[tuple[int, list[int]]] = []
    orig = t.history.read_before_push

    def spy(u: np.ndarray, i: np.ndarray, ts: np.ndarray):  # type: ignore[no-untyped-def]
        vals, lens = orig(u, i, ts)
        for item, h in zip(i.tolist(), np.split(vals, np.cumsum(lens)[:-1])):
            seen.append((item, h.tolist()))
        return vals, lens

    t.history.read_before_push = spy  # type: ignore[method-assign]
    # one user re-engages with distinct items in order: each history must be exactly the earlier ones
    b = EventBatch.from_columns(event_id=np.arange(6), ts_ms=np.arange(6), user_id=np.full(6, 5), item_id=np.arange(6) + 50,
                                value=np.ones(6), kind=np.full(6, int(EventKind.LIKE)))  # fmt: skip
    t.train_batch(b)
    for j, (item, hist) in enumerate(seen):
        assert item not in hist
        assert hist == list(range(max(0, j - TINY.history_len), j))  # rows of earlier items only


def test_build_kjt_shapes_and_empty_bags() -> None:
    kjt = build_kjt(3, user_rows=np.array([0, 1, 2]), history=(np.array([4, 5]), np.array([2, 0, 0])))
    model = TwoTower(TINY)
    u = model.user_tower(kjt)
    assert u.shape == (3, TINY.out_dim)
    assert torch.allclose(u.norm(dim=1), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError):
        build_kjt(2, user_rows=np.array([0, 1, 2]))


# -- loss ----------------------------------------------------------------------------
def test_logq_correction_subtracts_log_probability() -> None:
    torch.manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    v = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    rows = torch.arange(4)
    raw = in_batch_logits(u, v, rows, 0.1)
    log_q = torch.log(torch.tensor([0.7, 0.1, 0.1, 0.1]))
    corr = in_batch_logits(u, v, rows, 0.1, log_q)
    assert torch.allclose(corr, raw - log_q[None, :])
    # a uniform q is a constant shift: the softmax loss is unchanged
    uni = in_batch_logits(u, v, rows, 0.1, torch.full((4,), -3.0))
    assert torch.allclose(sampled_softmax_loss(uni), sampled_softmax_loss(raw))
    # a popular in-batch negative is penalised less -> rows where it is a negative get lower loss
    assert not torch.allclose(sampled_softmax_loss(corr), sampled_softmax_loss(raw))
    per_row_raw = torch.nn.functional.cross_entropy(raw, rows, reduction="none")
    per_row_corr = torch.nn.functional.cross_entropy(corr, rows, reduction="none")
    assert (per_row_corr[1:] < per_row_raw[1:]).all()  # item 0 (popular) is their negative


def test_accidental_hits_are_masked() -> None:
    u = torch.eye(3)
    v = torch.eye(3)
    logits = in_batch_logits(u, v, torch.tensor([7, 7, 8]), 1.0)
    assert torch.isinf(logits[0, 1]) and torch.isinf(logits[1, 0])
    assert torch.isfinite(logits.diagonal()).all() and torch.isfinite(logits[0, 2])


def test_logq_flag_changes_training_loss() -> None:
    b = clustered_stream(256)
    losses = []
    for flag in (True, False):
        t = OnlineTrainer(TwoTowerConfig(**{**TINY.__dict__, "logq_correction": flag, "batch_size": 256}))
        losses.append(t.train_batch(b)["loss"])
    assert losses[0] != pytest.approx(losses[1])


# -- training -------------------------------------------------------------------------
def test_train_loss_decreases_and_vectors_have_shapes() -> None:
    t = OnlineTrainer(TINY, item_categories={i * 10: (i // 20) for i in range(80)})
    b = clustered_stream()
    first = t.train_batch(b.take(np.arange(0, 256)))
    for _ in range(6):
        for s in range(0, len(b), 256):
            last = t.train_batch(b.take(np.arange(s, s + 256)))
    assert last["loss"] < first["loss"] - 0.3
    assert last["inbatch_recall@10"] > first["inbatch_recall@10"]
    ids, vecs = t.item_vectors()
    assert vecs.shape == (80, TINY.out_dim) and len(ids) == 80
    uv = t.user_vectors(np.array([1000, 1001, 424242]))
    assert uv.shape == (3, TINY.out_dim) and not uv[2].any()  # unknown user: zeros
    assert t.known_users(np.array([1000, 424242])).tolist() == [True, False]
    # the model learned the taste groups: user 1000 (group 0) prefers group-0 items
    s = uv[0] @ vecs.T
    grp = (ids // 10) // 20
    assert s[grp == 0].mean() > s[grp != 0].mean()


def test_score_batch_changes_nothing_and_skips_non_positives() -> None:
    t = OnlineTrainer(TINY)
    b = clustered_stream(128)
    t.train_batch(b)
    before = (t.events_trained, t.history.count.copy(), [p.detach().clone() for p in t.model.parameters()])
    m = t.score_batch(b)
    assert m["n"] == 128 and 0 <= m["inbatch_recall@10"] <= 1
    assert t.events_trained == before[0] and (t.history.count == before[1]).all()
    assert all(torch.equal(p, q) for p, q in zip(t.model.parameters(), before[2]))
    imp = EventBatch.from_columns(event_id=[1], ts_ms=[1], user_id=[1], item_id=[1], value=[0], kind=[int(EventKind.IMPRESSION)])
    assert t.train_batch(imp) == {"n": 0}


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        TwoTowerConfig(num_items=0)
    with pytest.raises(ValueError):
        TwoTowerConfig(temperature=0)


# -- popularity and metrics ----------------------------------------------------------------
def test_popularity_decays_and_filters() -> None:
    day = 86_400_000
    p = Popularity(half_life_ms=day)
    p.update(np.array([1, 1, 1, 2, 2]), np.array([0, 0, 0, 5 * day, 5 * day]))
    ids, sc = p.top(2)
    assert ids.tolist() == [2, 1] and sc[0] == 1.0  # 2 recent events beat 3 old ones
    assert p.top(5, exclude=np.array([2]))[0].tolist() == [1]
    assert p.top(5, allowed=np.array([1]))[0].tolist() == [1]
    plain = Popularity(None)
    plain.update(np.array([1, 1, 1, 2, 2]), np.array([0, 0, 0, 5 * day, 5 * day]))
    assert plain.top(2)[0].tolist() == [1, 2]
    p2 = Popularity(1.0)
    p2.load_state_dict(p.state_dict())
    assert p2.top(2)[0].tolist() == [2, 1]


def test_recall_and_ndcg_match_hand_computed_values() -> None:
    ranked = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    truth = [{2, 4, 9}, {5}]
    assert recall_at_k(ranked, truth, 2) == pytest.approx((1 / 3 + 1) / 2)
    assert recall_at_k(ranked, truth, 4) == pytest.approx((2 / 3 + 1) / 2)
    # user 1: hits at ranks 2 and 4 -> (1/log2(3) + 1/log2(5)) / (1 + 1/log2(3) + 1/log2(4))
    u1 = (1 / np.log2(3) + 1 / np.log2(5)) / (1 + 1 / np.log2(3) + 1 / np.log2(4))
    assert ndcg_at_k(ranked, truth, 4) == pytest.approx((u1 + 1.0) / 2)


def test_popularity_prior_folds_into_inner_products() -> None:
    from cloud_recsys.retrieval_eval import with_popularity_prior

    rng = np.random.default_rng(0)
    q, v = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((5, 4)).astype(np.float32)
    counts = np.array([10.0, 1.0, 0.0, 5.0, 4.0])
    q2, v2 = with_popularity_prior(q, v, counts, temperature=0.05, beta=2.0)
    logq = np.log(np.maximum(counts, 0.5) / counts.sum())
    assert q2.shape == (3, 5) and v2.shape == (5, 5)
    assert np.allclose(q2 @ v2.T, q @ v.T + 2.0 * 0.05 * logq[None, :], atol=1e-5)
