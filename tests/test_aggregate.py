"""Aggregation: rules by hand, robustness to poisoned updates, idempotency, all three families."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.strategies.aggregate import Aggregator, AggregatorConfig, coordinate_median, fedavg, trimmed_mean
from device_rerank.encoders import HardExamples, ParameterUpdate, SparseDelta
from device_rerank.envelope import DecodedUpdate


class Target:
    """Records what aggregation applied (an ``AggregationTarget``)."""

    def __init__(self, n: int, d: int) -> None:
        self.model = np.zeros(n, dtype=np.float32)
        self.rows: dict[int, np.ndarray] = {}
        self.users: dict[int, np.ndarray] = {}
        self.examples: list[tuple[int, HardExamples]] = []

    def apply_model_delta(self, flat_delta: np.ndarray) -> None:
        self.model = self.model + flat_delta

    def apply_item_deltas(self, deltas: dict[int, np.ndarray]) -> None:
        for k, v in deltas.items():
            self.rows[k] = self.rows.get(k, 0) + v

    def set_user_vectors(self, vectors: dict[int, np.ndarray]) -> None:
        self.users.update(vectors)

    def add_examples(self, examples) -> None:  # type: ignore[no-untyped-def]
        self.examples.extend(examples)


def param(device: int, seq: int, values: np.ndarray, rows: dict[int, np.ndarray] | None = None, n_ex: int = 1) -> DecodedUpdate:
    idx = np.flatnonzero(values != 0)
    return DecodedUpdate(
        device_id=device, seq=seq, family="parameter", model_version=0, num_examples=n_ex, created_ms=seq, nbytes=100,
        params=ParameterUpdate(SparseDelta(idx.astype(np.int64), values[idx].astype(np.float32), len(values)), rows or {}),
    )  # fmt: skip


def test_rules_by_hand() -> None:
    x = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [100.0, -100.0]])
    assert fedavg(x[:3], np.array([1, 1, 2])).tolist() == pytest.approx([(1 + 2 + 6) / 4, (10 + 20 + 60) / 4])
    assert coordinate_median(x).tolist() == pytest.approx([2.5, 15.0])
    # trim 25% of 4 = 1 per side: column 0 keeps [2, 3] -> 2.5; column 1 keeps [10, 20] -> 15
    assert trimmed_mean(x, 0.25).tolist() == pytest.approx([2.5, 15.0])
    assert trimmed_mean(x, 0.0).tolist() == pytest.approx(x.mean(axis=0).tolist())
    with pytest.raises(ValueError):
        trimmed_mean(x, 0.6)


@pytest.mark.parametrize("rule", ["trimmed_mean", "median"])
def test_robust_rules_resist_poisoned_updates(rule: str) -> None:
    rng = np.random.default_rng(0)
    n_params, honest_mean = 50, np.full(50, 0.1, dtype=np.float32)
    honest = [param(d, 1, (honest_mean + rng.normal(0, 0.01, n_params)).astype(np.float32), {7: np.full(4, 0.1, np.float32)}) for d in range(18)]
    poisoned = [param(100 + d, 1, np.full(n_params, -50.0, dtype=np.float32), {7: np.full(4, 50.0, np.float32)}, n_ex=50) for d in range(2)]
    ups = honest + poisoned
    robust, plain = Target(n_params, 4), Target(n_params, 4)
    Aggregator(AggregatorConfig(rule=rule, trim_fraction=0.15)).aggregate_round(1, ups, robust)
    Aggregator(AggregatorConfig(rule="fedavg")).aggregate_round(1, ups, plain)
    assert np.abs(robust.model - honest_mean).max() < 0.02
    assert np.abs(robust.rows[7] - 0.1).max() < 0.02
    assert np.abs(plain.model - honest_mean).min() > 10  # FedAvg is dragged far away
    assert np.abs(plain.rows[7] - 0.1).min() > 10


def test_idempotent_and_families() -> None:
    t = Target(4, 3)
    agg = Aggregator()
    p = param(1, 1, np.array([1.0, 0, 0, 2.0], dtype=np.float32), {5: np.ones(3, np.float32)}, n_ex=3)
    f_old = DecodedUpdate(device_id=2, seq=1, family="feature", model_version=0, num_examples=1, created_ms=10, nbytes=40, user_vector=np.zeros(3, np.float32))
    f_new = DecodedUpdate(device_id=2, seq=2, family="feature", model_version=0, num_examples=1, created_ms=20, nbytes=40, user_vector=np.ones(3, np.float32))
    ex = HardExamples(np.array([5, 6]), np.array([1, 0], np.uint8), np.zeros((2, 10), np.float32))
    d = DecodedUpdate(device_id=3, seq=1, family="data", model_version=0, num_examples=2, created_ms=5, nbytes=60, examples=ex)
    s = agg.aggregate_round(1, [p, f_new, f_old, d, p], t)
    assert s.applied == 4 and s.duplicates == 1
    assert s.by_family == {"parameter": 1, "feature": 2, "data": 1}
    assert t.model.tolist() == [1.0, 0.0, 0.0, 2.0]
    assert t.rows[5].tolist() == [1.0, 1.0, 1.0]
    assert t.users[2].tolist() == [1.0, 1.0, 1.0]  # latest by created_ms wins
    assert len(t.examples) == 1 and s.examples == 2
    before = (t.model.copy(), {k: v.copy() for k, v in t.rows.items()}, len(t.examples))
    s2 = agg.aggregate_round(2, [p, f_new, d], t)  # redelivered: nothing changes
    assert s2.applied == 0 and s2.duplicates == 3
    assert np.array_equal(t.model, before[0]) and np.array_equal(t.rows[5], before[1][5]) and len(t.examples) == before[2]


def test_min_updates_defers_small_rounds() -> None:
    t = Target(2, 2)
    agg = Aggregator(AggregatorConfig(min_updates=2))
    s1 = agg.aggregate_round(1, [param(1, 1, np.array([1.0, 1.0], np.float32))], t)
    assert s1.deferred == 1 and t.model.tolist() == [0.0, 0.0]
    s2 = agg.aggregate_round(2, [param(2, 1, np.array([3.0, 3.0], np.float32))], t)
    assert s2.applied == 2 and t.model.tolist() == [2.0, 2.0]
