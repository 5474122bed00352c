"""Device runtime: on-device reactions without cloud calls, live filtering, recall injection, updates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from device_rerank.config import DataEncoderConfig, DeviceConfig
from device_rerank.device import Device
from device_rerank.envelope import Keyring, UpdateVerifier
from device_rerank.features import DeviceAction
from device_rerank.fleet import VectorCandidateSource
from device_rerank.reranker import Reranker
from streams.schema import EventKind

torch.set_num_threads(1)
KEYRING = Keyring(b"test-master-secret-0123456789")


@pytest.fixture()
def world():
    rng = np.random.default_rng(0)
    items = rng.normal(size=(500, 32)).astype(np.float32) / np.sqrt(32)
    source = VectorCandidateSource(np.arange(1000, 1500), items, {7: rng.normal(size=32).astype(np.float32)}, seed=0)
    dev = Device(7, Reranker(), DeviceConfig(k_exposures=3), key=KEYRING.key_for(7))
    dev.fetch(source, 100, 0)
    return source, dev, items


def pos(ranking: np.ndarray, item: int) -> int:
    return int(np.flatnonzero(ranking == item)[0])


def test_click_moves_item_and_similar_items_without_cloud_call(world) -> None:
    source, dev, items = world
    calls, dev_calls = source.calls, dev.cloud_calls
    r0 = dev.ranking(1_000)
    clicked = int(r0[60])
    # the cached candidate most similar to the clicked one (excluding itself)
    emb = {int(i): items[int(i) - 1000] for i in r0}
    sims = {i: float(emb[i] @ emb[clicked] / np.linalg.norm(emb[i]) / np.linalg.norm(emb[clicked])) for i in r0 if i != clicked}
    similar = max(sims, key=sims.get)
    assert dev.observe(2_000, clicked, EventKind.CLICK) is True
    r1 = dev.ranking(2_000)
    assert pos(r1, clicked) < pos(r0, clicked)
    assert pos(r1, similar) < pos(r0, similar)
    assert source.calls == calls and dev.cloud_calls == dev_calls


def test_delete_hides_and_skip_demotes(world) -> None:
    source, dev, _ = world
    calls = source.calls
    r0 = dev.ranking(1_000)
    dev.observe(2_000, int(r0[0]), DeviceAction.DELETE)
    r1 = dev.ranking(2_000)
    assert int(r0[0]) not in set(r1.tolist())
    dev.observe(3_000, int(r1[0]), DeviceAction.SKIP)
    r2 = dev.ranking(3_000)
    assert pos(r2, int(r1[0])) > 0
    # a too-short watch counts as a skip too
    dev.observe(4_000, int(r2[0]), EventKind.WATCH, 0.5)
    assert pos(dev.ranking(4_000), int(r2[0])) > 0
    assert source.calls == calls


def test_k_exposures_without_click_trigger_rescore(world) -> None:
    _, dev, _ = world
    r0 = dev.ranking(1_000)
    before = dev.scores()[int(r0[0])]
    n = dev.rescores
    assert dev.observe(1_100, int(r0[0]), EventKind.IMPRESSION) is False
    assert dev.observe(1_200, int(r0[1]), EventKind.IMPRESSION) is False
    assert dev.observe(1_300, int(r0[2]), EventKind.IMPRESSION) is True
    assert dev.rescores == n  # re-scored lazily: nothing was looked at yet
    dev.ranking(1_300)
    dev.ranking(1_300)
    assert dev.rescores == n + 1  # one forward for the trigger, none for an unchanged list
    # shown-not-clicked items sink
    assert dev.scores()[int(r0[0])] < before


def test_live_filter_and_on_device_recall(world) -> None:
    source, dev, items = world
    r0 = dev.ranking(0)
    watched = int(r0[3])
    dev.observe(1_000, watched, EventKind.LIVE_ENTER)
    dev.observe(60_000, watched, EventKind.LIVE_LEAVE, 600.0)
    # the next cloud list does not contain the watched stream
    other = VectorCandidateSource(np.arange(1000, 1500), items, {7: -items[watched - 1000] * 5}, seed=1)
    dev.fetch(other, 50, 70_000)
    assert watched not in set(dev.cands.item_ids.tolist())
    live = set(dev.cands.item_ids[::2].tolist()) | {watched}
    calls = other.calls
    r = dev.ranking(80_000, live=live)
    assert set(r.tolist()) <= live
    assert watched in set(r.tolist())  # injected: engaged before, live now, absent from the cloud list
    assert other.calls == calls
    # without availability info nothing is injected
    assert watched not in set(dev.ranking(80_000).tolist())
    dev2 = Device(8, dev.model, DeviceConfig(inject_live_recall=False))
    dev2.receive(dev.cands, 0)
    dev2.cache.put(np.array([watched]), source.emb_q[[watched - 1000]], source.emb_scale[[watched - 1000]])
    dev2.observe(1_000, watched, EventKind.LIVE_ENTER)
    assert watched not in set(dev2.ranking(2_000, live=live).tolist())


def test_recall_injects_a_live_favourite_that_was_never_in_a_cloud_list(world) -> None:
    """A stream watched while it was offline in every fetched list has no cached vector; it is
    still re-injected when it goes live (its similarity terms are 0, its cloud score neutral)."""
    _, dev, _ = world
    fresh = Device(9, dev.model, DeviceConfig())
    fresh.receive(dev.cands, 0)
    never = 999_999
    assert never not in set(dev.cands.item_ids.tolist()) and fresh.cache.get(never) is None
    fresh.observe(1_000, never, EventKind.LIVE_ENTER)
    live = set(dev.cands.item_ids.tolist()) | {never}
    assert never in set(fresh.ranking(2_000, live=live).tolist())
    assert never not in set(fresh.ranking(2_000, live=live - {never}).tolist())


def test_history_is_bounded_and_dwell_attaches_to_engagement(world) -> None:
    _, dev, _ = world
    r = dev.ranking(0)
    dev.observe(10, int(r[0]), EventKind.CLICK)
    dev.observe(20, int(r[0]), EventKind.WATCH, 42.0)
    assert len(dev.history) == 1 and dev.history.dwell[0] == 42.0
    for j in range(80):
        dev.observe(100 + j, int(r[j % 100]), EventKind.LIKE)
    assert len(dev.history) == dev.config.history_len


def test_updates_verify_and_seq_increases(world) -> None:
    _, dev, _ = world
    r = dev.ranking(0)
    for j in range(6):
        dev.observe(1_000 * (j + 1), int(r[j * 7]), EventKind.CLICK)
    verifier = UpdateVerifier(
        KEYRING,
        current_model_version=1,
        n_params=dev.model.num_parameters(),
        emb_dim=32,
        param_norm_bound=dev.param_encoder.send_bound(),
    )
    for fam in ("feature", "parameter"):
        env = dev.make_update(fam)
        assert env is not None
        out = verifier.verify(env.encode())
        assert out.family == fam and out.device_id == 7
    assert dev.seq == 2
    assert dev.make_update("data") is None  # no consent
    with pytest.raises(ValueError):
        dev.make_update("gossip")


def test_data_update_needs_consent_and_is_capped() -> None:
    rng = np.random.default_rng(1)
    items = rng.normal(size=(300, 32)).astype(np.float32)
    source = VectorCandidateSource(np.arange(300), items, {3: items[0]})
    cfg = DeviceConfig(data=DataEncoderConfig(consent=True, max_examples=5))
    dev = Device(3, Reranker(), cfg, key=KEYRING.key_for(3))
    dev.fetch(source, 60, 0)
    r = dev.ranking(0)
    for j in range(4):
        dev.observe(1_000 * (j + 1), int(r[j * 5]), EventKind.CLICK)
    env = dev.make_update("data")
    assert env is not None and env.num_examples == 5
    out = UpdateVerifier(KEYRING, current_model_version=1).verify(env.encode())
    assert len(out.examples) == 5 and set(out.examples.labels.tolist()) <= {0, 1}


def test_privacy_budget_refuses_noisy_updates() -> None:
    from device_rerank.config import ParameterEncoderConfig, PrivacyConfig

    rng = np.random.default_rng(2)
    items = rng.normal(size=(200, 32)).astype(np.float32)
    source = VectorCandidateSource(np.arange(200), items, {4: items[1]})
    cfg = DeviceConfig(parameter=ParameterEncoderConfig(noise_multiplier=1.0), privacy=PrivacyConfig(max_epsilon=8.0))
    dev = Device(4, Reranker(), cfg, key=KEYRING.key_for(4))
    dev.fetch(source, 50, 0)
    r = dev.ranking(0)
    dev.observe(1_000, int(r[5]), EventKind.CLICK)
    sent = 0
    while dev.make_update("parameter") is not None:
        sent += 1
        assert sent < 10
    # z=1: eps(1 release) ~5.3, eps(2) ~7.9, eps(3) ~10.2 at delta 1e-5
    assert sent == 2
    assert dev.accountant.epsilon() <= 8.0


def test_receive_rejects_wrong_embedding_width_and_handles_empty_list() -> None:
    from streams.candidates import Candidates

    dev = Device(1, Reranker(), DeviceConfig())
    bad = Candidates(1, np.arange(3), np.zeros(3, np.float32), np.zeros((3, 16), np.int8), np.ones(3, np.float32), 1)
    with pytest.raises(ValueError):
        dev.receive(bad)
    empty = Candidates(1, np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros((0, 32), np.int8), np.zeros(0, np.float32), 1)
    dev.receive(empty, 0)
    assert len(dev.ranking(0)) == 0
    dev.observe(10, 5, EventKind.CLICK)
    assert len(dev.ranking(10)) == 0


def test_noisy_feature_updates_are_clipped_noised_and_accounted() -> None:
    from device_rerank.config import FeatureEncoderConfig, PrivacyConfig

    rng = np.random.default_rng(5)
    items = rng.normal(size=(100, 32)).astype(np.float32) * 3
    source = VectorCandidateSource(np.arange(100), items, {2: items[0]})
    cfg = DeviceConfig(feature=FeatureEncoderConfig(noise_multiplier=2.0, clip_norm=1.0), privacy=PrivacyConfig(max_epsilon=5.0))
    dev = Device(2, Reranker(), cfg, key=KEYRING.key_for(2))
    dev.fetch(source, 30, 0)
    dev.observe(10, int(dev.ranking(0)[0]), EventKind.CLICK)
    exact = dev.interest()
    env = dev.make_update("feature")
    assert env is not None and dev.accountant.releases == 1
    sent = UpdateVerifier(KEYRING, current_model_version=1).verify(env.encode()).user_vector
    assert not np.allclose(sent, exact, atol=0.5)  # noise std 2 per coordinate
    n = 1
    while dev.make_update("feature") is not None:
        n += 1
    assert dev.accountant.epsilon() <= 5.0 and n == dev.accountant.releases


def test_item_stats_stay_bounded() -> None:
    rng = np.random.default_rng(6)
    items = rng.normal(size=(100, 32)).astype(np.float32)
    source = VectorCandidateSource(np.arange(100), items, {2: items[0]})
    dev = Device(2, Reranker(), DeviceConfig(cache_items=16, history_len=10))
    dev.fetch(source, 20, 0)
    for j in range(500):
        dev.observe(j, 10_000 + j, EventKind.IMPRESSION)
    dev.observe(1_000, 99_999, EventKind.CLICK)
    assert len(dev.stats) <= 4 * 16 and dev.stats[99_999].count == 1


class _ReferenceLRU:
    """Per-item LRU (one argmin per new item): what ``ItemCache`` must keep, done the slow way."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.used, self.clock = capacity, {}, 0

    def put(self, ids: np.ndarray) -> None:
        self.clock += 1
        for it in ids.tolist():
            self.used[it] = self.clock  # refreshed rows are never evicted by their own put
        while len(self.used) > self.capacity:
            del self.used[min(self.used, key=lambda k: (self.used[k], k in ids.tolist()))]

    def get(self, it: int) -> None:
        if it in self.used:
            self.clock += 1
            self.used[it] = self.clock


def test_item_cache_is_lru_with_batched_eviction() -> None:
    """``ItemCache`` keeps the same items as a per-item LRU and returns the right vectors."""
    from device_rerank.features import ItemCache

    rng = np.random.default_rng(0)
    ref, cache = _ReferenceLRU(16), ItemCache(16, 4)
    for step in range(60):
        ids = rng.choice(40, size=int(rng.integers(1, 12)), replace=False).astype(np.int64)
        q = rng.integers(-127, 127, size=(len(ids), 4)).astype(np.int8)
        sc = rng.random(len(ids)).astype(np.float32)
        ref.put(ids)
        cache.put(ids, q, sc)
        assert len(cache) <= 16 and set(ids.tolist()) <= set(cache._slot)
        for i, it in enumerate(ids.tolist()):
            assert np.allclose(cache.get(it), q[i].astype(np.float32) * sc[i])
            ref.get(it)
        if step % 7 == 0:  # reads refresh recency
            for it in ids[:2].tolist():
                cache.get(it), ref.get(it)
        assert set(cache._slot) == set(ref.used)


def test_item_cache_put_larger_than_capacity_keeps_distinct_slots() -> None:
    from device_rerank.features import ItemCache

    cache = ItemCache(8, 2)
    cache.put(np.arange(5, dtype=np.int64), np.ones((5, 2), np.int8), np.ones(5, np.float32))
    ids = np.arange(100, 120, dtype=np.int64)
    cache.put(ids, np.arange(40, dtype=np.int8).reshape(20, 2), np.ones(20, np.float32))
    assert len(cache) == 8 and len(set(cache._slot.values())) == 8
    for it, slot in cache._slot.items():
        assert cache._ids[slot] == it
        assert np.allclose(cache.get(it), np.arange(40).reshape(20, 2)[it - 100])
