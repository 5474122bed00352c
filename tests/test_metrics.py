"""Hand-written ranking metrics and the user bootstrap, checked against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tandem.evaluation.bootstrap import bootstrap_mean, bootstrap_many, paired_relative_diff
from tandem.evaluation.metrics import (
    PredictionLog,
    device_days,
    hit_at_k,
    latency_summary,
    ndcg_at_k,
    ndcg_multi,
    rank_of,
    recall_at_k,
    reciprocal_rank,
    time_series,
)


def test_rank_of() -> None:
    assert rank_of([7, 3, 9], 3) == 2
    assert rank_of([7, 3, 9], 7) == 1
    assert rank_of([7, 3, 9], 4) == 0
    assert rank_of([], 4) == 0


def test_hit_ndcg_mrr_by_hand() -> None:
    ranks = np.array([1, 2, 3, 6, 0])
    # HR@5: ranks 1,2,3 are inside -> 3/5
    assert hit_at_k(ranks, 5).mean() == pytest.approx(3 / 5)
    assert hit_at_k(ranks, 1).tolist() == [1, 0, 0, 0, 0]
    # NDCG@5 per point: 1, 1/log2(3)=0.6309, 1/log2(4)=0.5, 0 (rank 6 > 5), 0
    nd = ndcg_at_k(ranks, 5)
    assert nd == pytest.approx([1.0, 0.6309297535714575, 0.5, 0.0, 0.0])
    assert nd.mean() == pytest.approx((1 + 0.6309297535714575 + 0.5) / 5)
    # NDCG@10 includes rank 6: 1/log2(7) = 0.35620718710802
    assert ndcg_at_k(ranks, 10)[3] == pytest.approx(0.35620718710802)
    # MRR: (1 + 1/2 + 1/3 + 1/6 + 0) / 5 = 0.4
    assert reciprocal_rank(ranks).mean() == pytest.approx(0.4)
    assert reciprocal_rank(ranks, k=2).tolist() == [1.0, 0.5, 0.0, 0.0, 0.0]


def test_recall_and_multi_ndcg_by_hand() -> None:
    ranking = [10, 20, 30, 40, 50]
    # relevant {20, 50, 99}: top-2 holds 20 -> 1/3; top-5 holds 20, 50 -> 2/3
    assert recall_at_k(ranking, {20, 50, 99}, 2) == pytest.approx(1 / 3)
    assert recall_at_k(ranking, {20, 50, 99}, 5) == pytest.approx(2 / 3)
    assert recall_at_k(ranking, set(), 5) == 0.0
    # binary NDCG@5 with relevant {20, 50}: DCG = 1/log2(3) + 1/log2(6); IDCG = 1 + 1/log2(3)
    dcg = 1 / math.log2(3) + 1 / math.log2(6)
    idcg = 1 + 1 / math.log2(3)
    assert ndcg_multi(ranking, {20, 50}, 5) == pytest.approx(dcg / idcg)
    # one relevant item: equals the single-target form
    assert ndcg_multi(ranking, {30}, 5) == pytest.approx(float(ndcg_at_k(3, 5)))


def test_prediction_log_values() -> None:
    log = PredictionLog(ks=(1, 5))
    assert log.add(1, 0, np.array([5, 6, 7]), 6, repeat=False, relevant={6, 7}) == 2
    assert log.add(2, 1, np.array([5, 6, 7]), 9, repeat=True) == 0
    v = log.values()
    assert v["HR@1"].tolist() == [0.0, 0.0]
    assert v["HR@5"].tolist() == [1.0, 0.0]
    assert v["Recall@5"].tolist() == [1.0, 0.0]  # both 6 and 7 in the top 5
    assert v["Recall@1"].tolist() == [0.0, 0.0]
    assert v["MRR"].tolist() == [0.5, 0.0]
    assert log.repeat.tolist() == [False, True]


def test_traffic_latency_timeseries_helpers() -> None:
    day = 86_400_000
    assert device_days(np.array([1, 1, 1, 2]), np.array([0, 10, day + 5, 0])) == 3
    lat = latency_summary(np.array([0.001, 0.002, 0.003]))
    assert lat["p50_ms"] == pytest.approx(2.0) and lat["n"] == 3
    ends, means = time_series(np.arange(10), np.arange(10, dtype=float), n_bins=2)
    assert ends.tolist() == [4, 9] and means.tolist() == [2.0, 7.0]


def test_bootstrap_over_users() -> None:
    # two users: user 0 always hits, user 1 never; the point-weighted mean is 0.75
    values = np.array([1, 1, 1, 0], dtype=float)
    users = np.array([0, 0, 0, 1])
    ci = bootstrap_mean(values, users, n_boot=2000, seed=1)
    assert ci.mean == pytest.approx(0.75)
    assert 0.0 <= ci.lo <= 0.75 <= ci.hi <= 1.0
    # identical users -> a degenerate interval
    same = bootstrap_mean(np.array([0.5, 0.5, 0.5]), np.array([0, 1, 2]), n_boot=200)
    assert same.lo == pytest.approx(0.5) and same.hi == pytest.approx(0.5)
    many = bootstrap_many({"a": values, "b": 1 - values}, users, n_boot=500, seed=3)
    assert many["a"].mean + many["b"].mean == pytest.approx(1.0)


def test_paired_difference_detects_a_consistent_gain() -> None:
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(200), 5)
    b = rng.random(len(users))
    a = b * 1.2
    ci = paired_relative_diff(a, b, users, n_boot=500)
    assert ci.mean == pytest.approx(0.2)
    assert ci.lo == pytest.approx(0.2) and ci.hi == pytest.approx(0.2)
    noisy = paired_relative_diff(b + rng.normal(0, 0.01, len(b)), b, users, n_boot=500)
    assert noisy.lo < 0 < noisy.hi
