"""Refresh hook: schedules, the three device update families, version bumps and idempotence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cloud_recsys.config import TwoTowerConfig
from cloud_recsys.index import IndexConfig
from cloud_recsys.refresh import RefreshHook, RefreshSchedule
from cloud_recsys.service import CandidateService
from cloud_recsys.trainer import OnlineTrainer
from streams.batch import EventBatch
from streams.schema import EventKind

torch.set_num_threads(1)

CFG = TwoTowerConfig(num_users=64, num_items=128, num_categories=4, embedding_dim=8, out_dim=8,
                     user_hidden=(16,), item_hidden=(16,), history_len=4, batch_size=32, seed=0)  # fmt: skip


def clicks(users: np.ndarray, items: np.ndarray, t0: int = 0) -> EventBatch:
    n = len(users)
    return EventBatch.from_columns(event_id=np.arange(n) + t0, ts_ms=t0 + np.arange(n) * 1000, user_id=users,
                                   item_id=items, value=np.ones(n), kind=np.full(n, int(EventKind.CLICK)))  # fmt: skip


def stream(n: int = 768, seed: int = 0) -> EventBatch:
    rng = np.random.default_rng(seed)
    u = rng.integers(0, 20, n)
    return clicks(u + 100, ((u % 2) * 20 + rng.integers(0, 20, n)) * 3)


@pytest.fixture()
def service() -> CandidateService:
    trainer = OnlineTrainer(CFG)
    trainer.train_batch(stream())
    return CandidateService(trainer, IndexConfig(kind="flat"), k=10)


def test_schedule_validates_and_decides() -> None:
    with pytest.raises(ValueError, match="every_events"):
        RefreshSchedule(every_events=0)
    with pytest.raises(ValueError, match="every_ms"):
        RefreshSchedule(every_ms=-1)
    s = RefreshSchedule(every_events=100, every_ms=60_000)
    assert not s.due(99, 59_999) and s.due(100, 0) and s.due(0, 60_000)
    assert not RefreshSchedule().due(10**9, 10**12)  # neither: manual only


def test_refresh_by_event_count(service: CandidateService) -> None:
    hook = RefreshHook(service, RefreshSchedule(every_events=100))
    v0 = service.model_version
    assert hook.observe(60, now_ms=0) is None and service.model_version == v0
    assert hook.observe(39, now_ms=1) is None
    assert hook.observe(1, now_ms=2) == v0 + 1 == service.model_version == service.trainer.version
    assert hook.observe(99, now_ms=3) is None  # the counter restarted at the refresh
    assert hook.observe(1, now_ms=4) == v0 + 2


def test_refresh_by_log_time(service: CandidateService) -> None:
    hook = RefreshHook(service, RefreshSchedule(every_ms=10_000))
    v0 = service.model_version
    assert hook.observe(1, now_ms=1_000) is None  # starts the clock
    assert hook.observe(1, now_ms=10_999) is None
    assert hook.observe(1, now_ms=11_000) == v0 + 1
    assert hook.observe(1, now_ms=20_999) is None and hook.observe(0, now_ms=21_000) == v0 + 2


def test_manual_schedule_never_refreshes_by_itself(service: CandidateService) -> None:
    hook = RefreshHook(service, RefreshSchedule())
    v0 = service.model_version
    assert hook.observe(10**6, now_ms=10**12) is None and service.model_version == v0
    assert hook.refresh() == v0 + 1


def _outside_top(service: CandidateService, user: int, k: int = 10) -> int:
    """An indexed item that is not in ``user``'s current top-k."""
    top = service.candidates(user, k=k).item_ids
    ids = service.index.ids()
    return int(ids[~np.isin(ids, top)][0])


def test_item_output_delta_reaches_retrieval_only_after_refresh(service: CandidateService) -> None:
    hook = RefreshHook(service, RefreshSchedule())
    user = 100
    target = _outside_top(service, user)
    q = service.trainer.user_vectors(np.array([user]))[0]
    before = service.candidates(user, k=10)
    v0 = service.model_version
    hook.apply_item_deltas({target: 10.0 * q})  # the aggregator's entry: output space (what devices hold)
    assert set(service.trainer.item_residuals) == {target}
    stale = service.candidates(user, k=10)
    assert np.array_equal(stale.item_ids, before.item_ids) and stale.model_version == v0  # index not rebuilt yet
    assert hook.refresh() == v0 + 1
    after = service.candidates(user, k=10)
    assert after.item_ids[0] == target and after.model_version == v0 + 1
    # the device features in the payload are the refreshed vector (close to the user's query)
    assert after.embeddings()[0] @ q > 0.95


def test_item_table_delta_changes_the_exported_vector(service: CandidateService) -> None:
    hook = RefreshHook(service, RefreshSchedule())
    item = int(service.index.ids()[0])
    old = service.index.vectors(np.array([item]))[0][0].copy()
    other = service.index.vectors(np.array([int(service.index.ids()[1])]))[0][0].copy()
    delta = {item: np.full(CFG.embedding_dim, 2.0, np.float32)}
    with pytest.raises(ValueError, match="space"):  # embedding_dim == out_dim: the width cannot tell
        hook.apply_embedding_deltas(delta, table="item")
    assert hook.apply_embedding_deltas(delta, table="item", space="table") == 1
    assert not service.trainer.item_residuals
    hook.refresh()
    new = service.index.vectors(np.array([item]))[0][0]
    assert not np.allclose(new, old, atol=1e-3)
    assert np.allclose(service.index.vectors(np.array([int(service.index.ids()[1])]))[0][0], other, atol=1e-6)


def test_bad_deltas_are_skipped(service: CandidateService) -> None:
    hook = RefreshHook(service)
    known = int(service.index.ids()[0])
    assert hook.apply_embedding_deltas({123456789: np.ones(CFG.embedding_dim)}, space="table") == 0  # unknown id
    assert hook.apply_embedding_deltas({known: np.ones(3)}, space="output") == 0  # wrong width
    assert hook.apply_embedding_deltas({known: np.full(CFG.embedding_dim, np.nan)}, space="table") == 0
    with pytest.raises(ValueError, match="table"):
        hook.apply_embedding_deltas({known: np.ones(CFG.embedding_dim)}, table="category")
    with pytest.raises(ValueError, match="only for items"):
        hook.apply_embedding_deltas({100: np.ones(CFG.out_dim)}, table="user", space="output")


def test_item_deltas_count_towards_the_schedule_but_user_deltas_do_not(service: CandidateService) -> None:
    hook = RefreshHook(service, RefreshSchedule(every_events=2))
    v0 = service.model_version
    hook.apply_embedding_deltas({100: np.ones(CFG.embedding_dim), 101: np.ones(CFG.embedding_dim)}, table="user")
    assert hook.observe(0, now_ms=0) is None  # user rows are read at query time: no index refresh needed
    items = service.index.ids()[:2]
    hook.apply_embedding_deltas({int(i): np.ones(CFG.embedding_dim) for i in items}, table="item", space="table")
    assert hook.observe(0, now_ms=1) == v0 + 1


def test_user_vectors_apply_at_once_and_twice_is_idempotent(service: CandidateService) -> None:
    hook = RefreshHook(service, RefreshSchedule())
    user = 100
    target = _outside_top(service, user)
    vec = service.index.vectors(np.array([target]))[0][0]
    v0 = service.model_version
    base = service.candidates(user, k=10)
    assert hook.apply_user_vectors({user: vec}) == 1
    once = service.candidates(user, k=10)
    assert target in once.item_ids and service.model_version == v0  # a second recall channel, no refresh needed
    assert set(base.item_ids[:5].tolist()) <= set(once.item_ids.tolist())  # the model keeps half the slots
    q = service.trainer.user_vectors(np.array([user]))[0]
    vecs, _ = service.index.vectors(once.item_ids)
    assert np.allclose(once.scores, vecs @ q, atol=1e-5) and (np.diff(once.scores) <= 1e-6).all()  # the model's scores
    hook.apply_user_vectors({user: vec})
    twice = service.candidates(user, k=10)
    assert np.array_equal(once.item_ids, twice.item_ids) and np.allclose(once.scores, twice.scores)
    # an unknown user with an uploaded vector is personalised, not a popularity fallback
    assert service.candidates(777, k=5).fallback == "popular"
    hook.apply_user_vectors({777: vec})
    c = service.candidates(777, k=5)
    assert c.fallback is None and c.item_ids[0] == target
    assert hook.apply_user_vectors({778: np.ones(3)}) == 0  # wrong width is ignored
    assert hook.apply_user_vectors({779: np.zeros_like(vec)}) == 0  # no direction: ignored
    assert service.candidates(779, k=5).fallback == "popular"


def test_item_deltas_are_additive_not_idempotent(service: CandidateService) -> None:
    """Replays are rejected upstream (UpdateVerifier 'replayed'); the hook itself adds every delta."""
    hook = RefreshHook(service, RefreshSchedule())
    item = int(service.index.ids()[0])
    d = np.full(CFG.out_dim, 0.01, np.float32)
    hook.apply_item_deltas({item: d})
    hook.apply_item_deltas({item: d})
    assert np.allclose(service.trainer.item_residuals[item], 2 * d)


def test_training_examples_train_add_items_and_trigger_refresh(service: CandidateService) -> None:
    hook = RefreshHook(service, RefreshSchedule(every_events=64))
    v0, n_items = service.model_version, len(service.index)
    new_user, new_items = 555, np.array([9001, 9002, 9003, 9004])
    assert service.candidates(new_user, k=5).fallback == "popular"
    batch = clicks(np.full(64, new_user), np.tile(new_items, 16), t0=10**7)
    m = hook.add_training_examples(batch)
    assert m["n"] == 64 and service.model_version == v0 + 1  # 64 events: schedule due
    assert len(service.index) == n_items + 4 and np.isin(new_items, service.index.ids()).all()
    c = service.candidates(new_user, k=10)
    assert c.fallback is None and c.model_version == v0 + 1
    hist = service.trainer.items.to_raw(service.trainer.history.read(service.trainer.users.lookup(np.array([new_user])))[0])
    assert set(hist.tolist()) == set(new_items.tolist())  # its query is built from the consented examples
    # non-positive rows train nothing and do not count towards the schedule
    imp = EventBatch.from_columns(event_id=np.arange(100), ts_ms=np.full(100, 10**8), user_id=np.full(100, 100),
                                  item_id=np.full(100, 3), value=np.zeros(100), kind=np.zeros(100))  # fmt: skip
    assert hook.add_training_examples(imp)["n"] == 0 and service.model_version == v0 + 1
