"""Reranker budgets, patch semantics, prior behaviour and ONNX parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from device_rerank.config import RerankerConfig
from device_rerank.export import OrtReranker, example_inputs, export_onnx
from device_rerank.reranker import Reranker

torch.set_num_threads(1)


def trained_like(seed: int = 0) -> Reranker:
    """A reranker with non-trivial weights everywhere (the MLP head starts at zero)."""
    torch.manual_seed(seed)
    m = Reranker()
    with torch.no_grad():
        m.mlp_out.weight.normal_(0, 0.3)
        m.mlp_out.bias.fill_(0.1)
    return m


def test_budgets() -> None:
    m = Reranker()
    assert m.num_parameters() <= 50_000
    assert m.int8_nbytes() <= 64 * 1024
    assert len(m.flat_parameters()) == m.num_parameters()


def test_shapes_and_empty_history() -> None:
    m = trained_like()
    x = example_inputs(m, k=17)
    assert m.score_numpy(x).shape == (17,)
    empty = type(x)(x.cand_emb, x.cloud_z, x.ctx, np.zeros_like(x.seq_emb), np.zeros_like(x.seq_feat), np.zeros_like(x.seq_mask))
    s = m.score_numpy(empty)
    assert np.all(np.isfinite(s))


def test_untrained_model_keeps_cloud_order_without_context() -> None:
    m = Reranker()
    x = example_inputs(m, k=50)
    cz = np.sort(x.cloud_z)[::-1].copy()
    ctx = np.zeros_like(x.ctx)
    ctx[:, 4] = 1.0  # live
    no_hist = type(x)(x.cand_emb, cz, ctx, x.seq_emb, x.seq_feat, np.zeros_like(x.seq_mask))
    assert np.array_equal(np.argsort(-m.score_numpy(no_hist)), np.arange(50))


def test_patch_zero_is_shared_model_and_taste_shifts_scores() -> None:
    m = trained_like()
    x = example_inputs(m, k=20)
    base = m.score_numpy(x)
    assert np.allclose(base, m.score_numpy(x, torch.zeros(m.config.patch_dim)))
    patch = torch.zeros(m.config.patch_dim)
    taste = torch.randn(m.config.emb_dim)
    patch[m.config.attn_dim :] = taste
    shifted = m.score_numpy(x, patch)
    assert np.allclose(shifted - base, x.cand_emb @ taste.numpy(), atol=1e-4)


def test_flat_round_trip_and_apply_delta() -> None:
    m = trained_like()
    flat = m.flat_parameters()
    parts = m.unflatten(flat)
    for name, p in m.named_parameters():
        assert torch.equal(parts[name], p.detach())
    before = flat.copy()
    m.apply_delta(np.ones_like(flat), scale=0.5)
    assert np.allclose(m.flat_parameters(), before + 0.5)
    with pytest.raises(ValueError):
        m.unflatten(flat[:-1])


def test_bad_prior_length_rejected() -> None:
    with pytest.raises(ValueError):
        Reranker(RerankerConfig(prior=(1.0, 2.0)))


def test_onnx_parity(tmp_path: Path) -> None:
    m = trained_like(3)
    path = export_onnx(m, tmp_path / "reranker.onnx")
    ort = OrtReranker(path)
    rng = np.random.default_rng(0)
    for k in (1, 9, 100, 250):  # dynamic candidate count
        x = example_inputs(m, k=k, seed=k)
        patch = rng.normal(size=m.config.patch_dim).astype(np.float32)
        ref = m.score_numpy(x, torch.from_numpy(patch))
        got = ort.score(x, patch)
        assert got.shape == (k,)
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def _reference_forward(m: Reranker, cand_emb, cloud_z, ctx, seq_emb, seq_feat, seq_mask, patch):
    """The forward pass as one function (before encode/head split it): the order of
    operations every faster path must keep, since a gradient sums its terms in that order."""
    import torch.nn.functional as F

    a = m.config.attn_dim
    q = m.query(cand_emb) + patch[:a]
    k = m.key(seq_emb) + m.key_feat(seq_feat)
    v = m.value(seq_emb)
    logits = torch.matmul(q, k.transpose(1, 2)) * m._scale + (seq_mask[:, None, :] - 1.0) * 1e4
    any_valid = (seq_mask.sum(dim=1, keepdim=True) > 0).to(q.dtype)
    w = torch.softmax(logits, dim=-1) * any_valid[:, :, None]
    interest = torch.matmul(w, v)
    cn = F.normalize(cand_emb, dim=-1, eps=1e-6)
    sn = F.normalize(seq_emb, dim=-1, eps=1e-6)
    sims = torch.matmul(cn, sn.transpose(1, 2)) + (seq_mask[:, None, :] - 1.0) * 2.0
    max_sim = sims.max(dim=-1).values * any_valid
    side = torch.cat([ctx, cloud_z[..., None], max_sim[..., None]], dim=-1)
    h = torch.relu(m.mlp_in(torch.cat([q, interest, q * interest, side], dim=-1)))
    taste = torch.matmul(cand_emb, patch[a:])
    return m.mlp_out(h).squeeze(-1) + m.prior(side).squeeze(-1) + taste


def _random_inputs(gen: torch.Generator, b: int, k: int, m: Reranker) -> list[torch.Tensor]:
    c = m.config
    mask = (torch.rand(b, c.seq_len, generator=gen) > 0.3).float()
    mask[0] = 0.0  # a user without history
    return [
        torch.randn(b, k, c.emb_dim, generator=gen),
        torch.randn(b, k, generator=gen),
        torch.randn(b, k, c.ctx_dim, generator=gen),
        torch.randn(b, c.seq_len, c.emb_dim, generator=gen),
        torch.randn(b, c.seq_len, c.seq_feat_dim, generator=gen),
        mask,
    ]


def test_forward_and_its_gradients_match_the_reference_bit_for_bit() -> None:
    m = trained_like(3)
    gen = torch.Generator().manual_seed(0)
    for b, k in ((1, 100), (16, 5), (3, 2), (1, 1)):
        x = _random_inputs(gen, b, k, m)
        patch = torch.randn(m.config.patch_dim, generator=gen)
        outs, grads = [], []
        for fn in (m.forward, lambda *a: _reference_forward(m, *a)):
            cand, pp = x[0].clone().requires_grad_(True), patch.clone().requires_grad_(True)
            o = fn(cand, *x[1:], pp)
            outs.append(o)
            grads.append(torch.autograd.grad(o.square().sum(), [*m.parameters(), cand, pp]))
        assert torch.equal(outs[0], outs[1])
        assert all(torch.equal(g0, g1) for g0, g1 in zip(*grads))


def test_score_rows_is_forward_row_by_row_bit_for_bit() -> None:
    """A device's scores must not depend on which other devices were scored with it."""
    m = trained_like(1)
    gen = torch.Generator().manual_seed(1)
    for b, k in ((1, 100), (7, 100), (40, 97), (5, 4), (3, 13)):
        x = _random_inputs(gen, b, k, m)
        patches = torch.randn(b, m.config.patch_dim, generator=gen)
        patches[::2] = 0.0
        with torch.inference_mode():
            rows = m.score_rows(m.encode(*x), patches)
            for i in range(b):
                alone = m(*(t[i : i + 1] for t in x), patches[i])[0]
                assert torch.equal(rows[i], alone)
