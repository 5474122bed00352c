"""Encoders round-trip within their stated bounds; clipping, noise and the RDP accountant."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from device_rerank.config import DataEncoderConfig, ParameterEncoderConfig, PrivacyConfig
from device_rerank.encoders import (
    DataEncoder,
    FeatureEncoder,
    HardExamples,
    ParameterEncoder,
    PayloadError,
    add_gaussian_noise,
    clip_l2,
    interest_vector,
)
from device_rerank.privacy import PrivacyAccountant, rdp_gaussian, rdp_subsampled_gaussian, rdp_to_epsilon

floats = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=32)


# -- feature family -----------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(arrays(np.float32, st.integers(1, 124), elements=floats))
def test_feature_round_trip_within_bound(vec: np.ndarray) -> None:
    payload = FeatureEncoder.encode(vec)
    assert len(payload) == 4 + len(vec) <= 128
    out = FeatureEncoder.decode(payload)
    assert np.all(np.abs(out - vec) <= FeatureEncoder.error_bound(vec) * (1 + 1e-5))


def test_feature_bytes_vs_dense() -> None:
    assert len(FeatureEncoder.encode(np.ones(32))) == 36 < FeatureEncoder.dense_nbytes(32) == 128
    with pytest.raises(PayloadError):
        FeatureEncoder.decode(b"\x00\x00\x80\x7f" + b"\x01" * 32)  # inf scale


def test_interest_vector_weights_dwell_and_recency() -> None:
    emb = np.eye(3, dtype=np.float32)
    v = interest_vector(emb, np.array([0.0, 100.0, 0.0]), np.array([0.0, 0.0, 1e9]), half_life_s=3600.0)
    assert v[1] > v[0] > v[2] >= 0 and v.sum() == pytest.approx(1.0)


def test_interest_vector_of_a_user_back_after_months_is_not_zero() -> None:
    """Weights are relative: a history that is all old must not underflow to a zero vector."""
    emb = np.eye(3, dtype=np.float32)
    dwell = np.array([10.0, 0.0, 0.0])
    months = 90 * 86_400.0
    v_old = interest_vector(emb, dwell, np.array([months, months + 60, months + 120]), half_life_s=3600.0)
    v_new = interest_vector(emb, dwell, np.array([0.0, 60.0, 120.0]), half_life_s=3600.0)
    assert np.allclose(v_old, v_new) and v_old.sum() == pytest.approx(1.0)


def test_tiny_vector_encodes_to_a_valid_payload() -> None:
    """A vector whose int8 scale underflows float32 is sent as zeros, not as a payload the cloud rejects."""
    vec = np.full(32, 1e-44, dtype=np.float32)
    out = FeatureEncoder.decode(FeatureEncoder.encode(vec))
    assert np.all(np.abs(out - vec) <= 1e-43)


# -- parameter family ---------------------------------------------------------
def test_parameter_round_trip_dense_no_noise() -> None:
    rng = np.random.default_rng(0)
    n, d = 500, 8
    cfg = ParameterEncoderConfig(clip_norm=1e9, noise_multiplier=0.0, top_k=n, max_rows=10)
    enc = ParameterEncoder(cfg, n, d)
    x = rng.normal(size=n).astype(np.float32)
    rows = {int(i): rng.normal(size=d).astype(np.float32) for i in rng.choice(10_000, 6, replace=False)}
    payload, stats = enc.encode(x, rows, rng)
    out = ParameterEncoder.decode(payload, n, d)
    scale = np.abs(x).max() / 127
    assert np.all(np.abs(out.model.to_dense() - x) <= scale / 2 * (1 + 1e-5))
    assert set(out.rows) == set(rows)
    for i, r in rows.items():
        assert np.all(np.abs(out.rows[i] - r) <= np.abs(r).max() / 254 * (1 + 1e-5))
    assert stats.nbytes < stats.dense_nbytes


def test_parameter_top_k_error_feedback_identity() -> None:
    rng = np.random.default_rng(1)
    n = 1000
    cfg = ParameterEncoderConfig(clip_norm=1e9, top_k=50, max_rows=0, residual_max_norm=1e9)
    enc = ParameterEncoder(cfg, n, 4)
    total_in = np.zeros(n, dtype=np.float64)
    total_sent = np.zeros(n, dtype=np.float64)
    for _ in range(5):
        x = rng.normal(size=n).astype(np.float32)
        old = enc.residual.copy()
        payload, stats = enc.encode(x, {}, rng)
        sent = ParameterEncoder.decode(payload, n, 4).model
        assert len(sent.indices) == 50
        # sent + new residual == update + old residual
        np.testing.assert_allclose(sent.to_dense() + enc.residual, x + old, atol=1e-5)
        total_in += x
        total_sent += sent.to_dense()
    # nothing is lost, only delayed
    np.testing.assert_allclose(total_sent + enc.residual, total_in, atol=1e-4)
    assert stats.nbytes < 4 * n / 5


@settings(max_examples=100, deadline=None)
@given(arrays(np.float32, st.integers(1, 300), elements=floats), st.floats(0.01, 100))
def test_clip_bound_holds(x: np.ndarray, bound: float) -> None:
    y = clip_l2(x, bound)
    assert float(np.linalg.norm(y)) <= bound * (1 + 1e-5)
    # Compare in float64 as clip_l2 does: a float32 norm against a Python float compares in
    # float32 under NumPy 2 (NEP 50), which rounds the bound and disagrees within one ulp.
    if float(np.linalg.norm(x)) <= bound:
        assert np.array_equal(x, y)


def test_clip_bound_one_ulp_case() -> None:
    """The case that failed on a fresh clone: a norm one float32 ulp around the bound."""
    x = np.array([1.5530283], dtype=np.float32)
    bound = 1.5530282923152754
    y = clip_l2(x, bound)
    assert float(np.linalg.norm(y)) <= bound * (1 + 1e-5)
    assert float(np.linalg.norm(x)) > bound and not np.array_equal(x, y)


def test_sent_norm_bound_holds_with_noise_and_residual() -> None:
    rng = np.random.default_rng(2)
    n, d = 2000, 8
    cfg = ParameterEncoderConfig(clip_norm=0.5, noise_multiplier=1.0, top_k=100, max_rows=4)
    enc = ParameterEncoder(cfg, n, d)
    bound = enc.send_bound()
    for _ in range(10):
        x = rng.normal(size=n).astype(np.float32) * 10
        rows = {i: rng.normal(size=d).astype(np.float32) * 10 for i in range(6)}
        payload, stats = enc.encode(x, rows, rng)
        assert stats.pre_clip_norm > cfg.clip_norm
        assert ParameterEncoder.decode(payload, n, d).norm() <= bound


def test_noise_std_matches_sigma() -> None:
    rng = np.random.default_rng(3)
    n = 20_000
    cfg = ParameterEncoderConfig(clip_norm=2.0, noise_multiplier=1.5)
    enc = ParameterEncoder(cfg, n, 4)
    x = np.zeros(n, dtype=np.float32)
    x[0] = 100.0  # clipped to norm 2
    m, _, pre = enc.privatize(x, {}, rng)
    assert pre == pytest.approx(100.0)
    sigma = 1.5 * 2.0
    noise = m[1:]
    # sample std of 20k normals: relative standard error ~ 1/sqrt(2n) = 0.5%
    assert np.std(noise) == pytest.approx(sigma, rel=0.03)
    assert abs(np.mean(noise)) < 4 * sigma / math.sqrt(n)
    assert m[0] == pytest.approx(2.0, abs=5 * sigma)
    assert np.array_equal(add_gaussian_noise(x, 0.0, rng), x)


def test_parameter_decode_rejects_forgeries() -> None:
    with pytest.raises(PayloadError):
        ParameterEncoder.decode(b"\x93\x01\x02\x03")
    rng = np.random.default_rng(4)
    enc = ParameterEncoder(ParameterEncoderConfig(top_k=5), 100, 4)
    payload, _ = enc.encode(rng.normal(size=100).astype(np.float32), {}, rng)
    with pytest.raises(PayloadError):
        ParameterEncoder.decode(payload, expect_n_params=99)


# -- data family --------------------------------------------------------------
def test_data_round_trip_consent_and_cap() -> None:
    rng = np.random.default_rng(5)
    ex = HardExamples(
        np.arange(40, dtype=np.int64) * 1_000_003,
        (rng.random(40) < 0.3).astype(np.uint8),
        rng.normal(size=(40, 10)).astype(np.float32) * 5,
    )
    scores = rng.normal(size=40)
    assert DataEncoder(DataEncoderConfig(consent=False)).select(ex, scores, rng) is None
    enc = DataEncoder(DataEncoderConfig(consent=True, max_examples=12))
    chosen = enc.select(ex, scores, rng)
    assert chosen is not None and len(chosen) == 12
    payload = enc.encode(chosen)
    out = DataEncoder.decode(payload)
    assert np.array_equal(out.item_ids, chosen.item_ids) and np.array_equal(out.labels, chosen.labels)
    assert np.all(np.abs(out.features - chosen.features) <= DataEncoder.error_bound(chosen.features))
    assert len(payload) < DataEncoder.dense_nbytes(12, 10)
    # the hardest are kept: positives with the lowest scores / negatives with the highest
    p = 1 / (1 + np.exp(-scores))
    hard = np.where(ex.labels == 1, 1 - p, p)
    assert hard[np.isin(ex.item_ids, chosen.item_ids)].min() >= np.sort(hard)[::-1][11] - 1e-12


# -- privacy accountant -------------------------------------------------------
def test_rdp_of_gaussian_hand_checked() -> None:
    # RDP_alpha = alpha / (2 z^2): z = 2, alpha = 8 -> 1.0
    assert rdp_gaussian(2.0, np.array([8.0]))[0] == pytest.approx(1.0)
    # subsampling at rate 1 is the plain mechanism
    orders = np.array([2.0, 5.0, 32.0])
    np.testing.assert_allclose(rdp_subsampled_gaussian(1.0, 1.3, orders), rdp_gaussian(1.3, orders))
    # integer alpha=2, q, z=1: log(1 - q + q e^{1})... exact: A_2 = (1-q)^2 + 2q(1-q) + q^2 e^{1/z^2}
    q, z = 0.1, 1.0
    a2 = (1 - q) ** 2 + 2 * q * (1 - q) + q**2 * math.exp(1 / z**2)
    assert rdp_subsampled_gaussian(q, z, np.array([2.0]))[0] == pytest.approx(math.log(a2))
    # subsampling amplifies privacy
    assert np.all(rdp_subsampled_gaussian(0.01, 1.0, orders) < rdp_gaussian(1.0, orders))


def test_epsilon_hand_checked() -> None:
    # T releases of the Gaussian mechanism, Mironov conversion, continuous optimum:
    # eps = T/(2 z^2) + sqrt(2 T log(1/delta)) / z
    for t, z in ((1, 1.0), (10, 2.0), (100, 5.0)):
        acc = PrivacyAccountant(PrivacyConfig(delta=1e-5, max_epsilon=None))
        acc.spend(z, steps=t)
        expected = t / (2 * z * z) + math.sqrt(2 * t * math.log(1e5)) / z
        assert acc.epsilon() == pytest.approx(expected, rel=2e-3)
        assert acc.epsilon() >= expected - 1e-9  # a grid can only be looser
    eps, order = rdp_to_epsilon(rdp_gaussian(1.0), 1e-5)
    assert order == pytest.approx(1 + math.sqrt(2 * math.log(1e5)), abs=0.01)


def test_budget_refusal() -> None:
    acc = PrivacyAccountant(PrivacyConfig(delta=1e-5, max_epsilon=6.0))
    assert acc.epsilon() == 0.0
    assert acc.can_release(1.0)
    acc.spend(1.0)
    assert not acc.can_release(1.0)  # a second z=1 release would reach ~7.9
    assert acc.can_release(10.0)
    assert not acc.can_release(0.0)  # no noise: infinite epsilon
