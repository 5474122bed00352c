"""The per-user patch learns a synthetic user's known taste from the device's own feedback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from device_rerank.config import DeviceConfig, PersonalizeConfig
from device_rerank.device import Device
from device_rerank.envelope import Keyring
from device_rerank.fleet import VectorCandidateSource
from device_rerank.reranker import Reranker
from streams.schema import EventKind

torch.set_num_threads(1)

D = 32


def ndcg_at(k: int, ranking: np.ndarray, gains: dict[int, float]) -> float:
    g = np.array([gains.get(int(i), 0.0) for i in ranking[:k]])
    disc = 1.0 / np.log2(np.arange(2, len(g) + 2))
    ideal = np.sort(np.array(list(gains.values())))[::-1][:k]
    idcg = float((ideal * disc[: len(ideal)]).sum())
    return float((g * disc).sum()) / idcg if idcg > 0 else 0.0


def test_ndcg_hand_checked() -> None:
    # ranking [a, b] with gains a=0, b=1: DCG = 1/log2(3); IDCG = 1
    assert ndcg_at(2, np.array([1, 2]), {1: 0.0, 2: 1.0}) == pytest.approx(1 / np.log2(3))


def synthetic_user(seed: int = 0):
    """Items with random embeddings; the user's taste is a hidden vector the cloud does not know."""
    rng = np.random.default_rng(seed)
    n_items = 3000
    items = rng.normal(size=(n_items, D)).astype(np.float32) / np.sqrt(D)
    taste = rng.normal(size=D).astype(np.float32)
    taste /= np.linalg.norm(taste)
    # the cloud knows popularity-ish noise only: a random "user vector" unrelated to taste
    cloud_user = rng.normal(size=D).astype(np.float32)
    source = VectorCandidateSource(np.arange(n_items), items, {1: cloud_user}, noise=1.0, seed=seed)
    return rng, items, taste, source


def test_patch_improves_held_out_ranking() -> None:
    rng, items, taste, source = synthetic_user(0)
    model = Reranker()
    cfg = DeviceConfig(personalize=PersonalizeConfig(lr=0.1, max_steps_per_session=200), example_buffer=64)
    dev = Device(1, model, cfg, key=Keyring(b"k" * 32).key_for(1))
    t = 0
    # training sessions: the user engages with items drawn from a softmax over taste
    for _ in range(12):
        t += 60_000
        dev.fetch(source, 100, t)
        ids = dev.ranking(t)[:30]
        for i in ids:
            dev.observe(t, int(i), EventKind.IMPRESSION)
        logits = 8.0 * (items[ids] @ taste)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        for i in rng.choice(ids, size=4, replace=False, p=p):
            t += 1000
            dev.observe(t, int(i), EventKind.CLICK)
            dev.observe(t + 500, int(i), EventKind.WATCH, 30.0)
    assert len(dev.buffer) >= 40
    engaged = set(int(x) for x in dev.history.item[dev.history.order()])

    def held_out_ndcg() -> float:
        scores = []
        for s in range(20):
            dev.fetch(source, 100, t + 10_000 + s)
            ids = [i for i in dev.ranking(t + 10_000 + s) if int(i) not in engaged]
            rel = items[ids] @ taste
            top = np.argsort(-rel)[:10]
            gains = {int(ids[j]): float(10 - r) for r, j in enumerate(top)}
            scores.append(ndcg_at(10, np.asarray(ids), gains))
        return float(np.mean(scores))

    source.rng = np.random.default_rng(99)
    before = held_out_ndcg()
    loss = dev.personalize(150)
    assert np.isfinite(loss)
    assert dev.session_steps == 150
    source.rng = np.random.default_rng(99)
    after = held_out_ndcg()
    print(f"held-out NDCG@10 before={before:.3f} after={after:.3f}")
    assert after > before + 0.05, (before, after)
    # the learned taste part of the patch points toward the true taste
    learned = dev.patch[model.config.attn_dim :].numpy()
    cos = float(learned @ taste / (np.linalg.norm(learned) * np.linalg.norm(taste)))
    assert cos > 0.5, cos
    # shared weights untouched
    assert all(p.grad is None for p in model.parameters())


def test_step_budget_is_bounded_per_session() -> None:
    _, items, taste, source = synthetic_user(1)
    cfg = DeviceConfig(personalize=PersonalizeConfig(max_steps_per_session=10))
    dev = Device(1, Reranker(), cfg)
    dev.fetch(source, 50, 0)
    ids = dev.ranking(0)
    for j in range(5):
        dev.observe(1000 * j, int(ids[j * 3]), EventKind.CLICK)
    dev.personalize(8)
    assert dev.session_steps == 8
    dev.personalize(8)
    assert dev.session_steps == 10
    assert np.isnan(dev.personalize(5))  # budget spent
    # a new session (gap > session_gap_ms) resets the budget
    dev.observe(10_000 + cfg.session_gap_ms + 1, int(ids[40]), EventKind.IMPRESSION)
    assert dev.session_steps == 0
    dev.personalize(3)
    assert dev.session_steps == 3
    assert float(dev.patch.norm()) <= cfg.personalize.max_norm + 1e-5


def test_parameter_update_descends_the_local_loss() -> None:
    """The decoded parameter delta (no noise, no sparsification) lowers the device's own loss."""
    import copy

    from device_rerank.config import ParameterEncoderConfig
    from device_rerank.envelope import UpdateVerifier
    from device_rerank.personalize import listwise_loss

    rng, items, taste, source = synthetic_user(2)
    model = Reranker()
    n = model.num_parameters()
    cfg = DeviceConfig(parameter=ParameterEncoderConfig(clip_norm=1.0, top_k=n, max_rows=0, local_lr=1.0))
    keyring = Keyring(b"k" * 32)
    dev = Device(1, model, cfg, key=keyring.key_for(1))
    t = 0
    for _ in range(4):
        t += 60_000
        dev.fetch(source, 100, t)
        ids = dev.ranking(t)[:20]
        for i in ids[np.argsort(-(items[ids] @ taste))[:3]]:
            t += 1000
            dev.observe(t, int(i), EventKind.CLICK)
    env = dev.make_update("parameter")
    out = UpdateVerifier(keyring, current_model_version=1, n_params=n, emb_dim=D).verify(env.encode())
    delta = out.params.model.to_dense()
    assert 0 < np.linalg.norm(delta) <= 1.0 + 1e-4

    def loss(m: Reranker) -> float:
        cand, cz, ctx, seq, sf, sm, slot, _ = dev.buffer.batch()
        with torch.no_grad():
            return float(listwise_loss(m(cand, cz, ctx, seq, sf, sm, dev.patch), slot))

    stepped = copy.deepcopy(model)
    stepped.apply_delta(delta, scale=0.1)
    assert loss(stepped) < loss(model)


def _buffer_with_taste(taste_old: np.ndarray, taste_new: np.ndarray, n_old: int, n_new: int, seed: int = 0):
    """Groups whose positive follows ``taste_old`` for the oldest ``n_old``, then ``taste_new``."""
    from device_rerank.personalize import ExampleBuffer, ExampleGroup

    rng = np.random.default_rng(seed)
    buf = ExampleBuffer(n_old + n_new)
    c = Reranker().config.ctx_dim
    L, s = Reranker().config.seq_len, Reranker().config.seq_feat_dim
    for j in range(n_old + n_new):
        taste = taste_old if j < n_old else taste_new
        emb = rng.normal(size=(12, D)).astype(np.float32) / np.sqrt(D)
        order = np.argsort(-(emb @ taste))  # positive (slot 0) = the item the taste likes most
        emb = emb[order]
        buf.add(ExampleGroup(
            item_ids=np.arange(12, dtype=np.int64) + 100 * j, cand_emb=emb.astype(np.float16),
            cloud_z=np.zeros(12, np.float32), ctx=np.zeros((12, c), np.float32),
            seq_emb=np.zeros((L, D), np.float16), seq_feat=np.zeros((L, s), np.float32),
            seq_mask=np.zeros(L, np.float32), ts_ms=j,
        ))  # fmt: skip
    return buf


@pytest.mark.parametrize("shift", [False, True])
def test_holdout_gate_keeps_a_patch_only_if_the_newest_feedback_improves(shift: bool) -> None:
    """Trained on old feedback; if the user's taste flipped in the newest groups, the new patch is refused."""
    from device_rerank.personalize import fine_tune_patch

    rng = np.random.default_rng(1)
    taste = rng.normal(size=D).astype(np.float32)
    taste /= np.linalg.norm(taste)
    buf = _buffer_with_taste(taste, -taste if shift else taste, n_old=40, n_new=8)
    model = Reranker()
    start = torch.zeros(model.config.patch_dim)
    gated = PersonalizeConfig(lr=0.1, max_norm=5.0, holdout_groups=8)
    patch, _ = fine_tune_patch(model, buf, start, gated, 30, rng)
    ungated, _ = fine_tune_patch(model, buf, start, PersonalizeConfig(lr=0.1, max_norm=5.0), 30, np.random.default_rng(1))
    assert float(ungated.norm()) > 0  # without the gate the patch always moves
    if shift:
        assert torch.equal(patch, start)
    else:
        assert float(patch.norm()) > 0


def test_patch_adam_matches_torch_adam_bit_for_bit():
    """fine_tune_patch's PatchAdam is torch's Adam (defaults) without the optimizer machinery."""
    from device_rerank.personalize import PatchAdam

    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        p0 = torch.randn(48, generator=gen)
        a, b = p0.clone().requires_grad_(True), p0.clone().requires_grad_(True)
        ref, mine = torch.optim.Adam([a], lr=0.01), PatchAdam(b, lr=0.01)
        for _ in range(30):
            g = torch.randn(48, generator=gen) * 10.0 ** float(torch.randint(-6, 2, (1,), generator=gen))
            a.grad = g.clone()
            ref.step()
            mine.step(g.clone())
        assert torch.equal(a.detach(), b.detach())


def test_fine_tune_patches_batched_equals_one_device_at_a_time() -> None:
    """Batched personalization gives every device exactly its own fine_tune_patch result."""
    import copy

    from device_rerank.personalize import PatchJob, fine_tune_patch, fine_tune_patches

    model = Reranker()
    with torch.no_grad():
        model.mlp_out.weight.normal_(0, 0.3)
    jobs = []
    for seed in range(6):
        rng, items, taste, source = synthetic_user(seed)
        cfg = DeviceConfig(personalize=PersonalizeConfig(lr=0.05, max_norm=1.0, holdout_groups=2 if seed % 2 else 0, batch_groups=8))
        dev = Device(1, model, cfg, key=Keyring(b"k" * 32).key_for(1))
        t = 0
        for _ in range(3 + seed):  # buffers of different sizes, some above batch_groups (random batches)
            t += 60_000
            dev.fetch(source, 100, t)
            ids = dev.ranking(t)[:20]
            for i in ids:
                dev.observe(t, int(i), EventKind.IMPRESSION)
            for i in ids[np.argsort(-(items[ids] @ taste))[:2]]:
                dev.observe(t, int(i), EventKind.CLICK)
        patch = torch.randn(model.config.patch_dim) * 0.1 if seed % 3 else torch.zeros(model.config.patch_dim)
        jobs.append(PatchJob(model, dev.buffer, patch, cfg.personalize, 3 + seed % 4, dev.rng))
    alone = [fine_tune_patch(j.model, j.buffer, j.patch, j.config, j.steps, copy.deepcopy(j.rng)) for j in jobs]
    together = fine_tune_patches(jobs)
    assert any(len(j.buffer) > j.config.batch_groups + j.config.holdout_groups for j in jobs)
    for (p1, l1), (p2, l2), j in zip(alone, together, jobs):
        assert torch.equal(p1, p2)
        assert (np.isnan(l1) and np.isnan(l2)) or l1 == l2
        assert (p1 is j.patch) == (p2 is j.patch)
