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
