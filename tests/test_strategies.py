"""Strategy registry and interface: selectable by name, pluggable without touching the loop."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from device_rerank.config import DeviceConfig, RerankerConfig
from device_rerank.encoders import HardExamples
from device_rerank.reranker import Reranker
from device_rerank.policy import AlwaysUpload, DriftTriggered
from streams.datasets.synthetic import SyntheticConfig, generate
from tandem.evaluation.prequential import EvalConfig, run_prequential
from tandem.strategies import STRATEGIES, Strategy, make_strategies, register
from tandem.strategies.base import Strategy as BaseStrategy
from tandem.strategies.server import StrategyCloud


def test_registry_names() -> None:
    assert set(STRATEGIES) == {"cloud-only", "device-rerank", "feature", "federated", "data", "hybrid"}
    assert [s.name for s in make_strategies("all")] == list(STRATEGIES)
    assert [s.name for s in make_strategies("cloud-only, feature")] == ["cloud-only", "feature"]
    with pytest.raises(KeyError):
        make_strategies("cloud-only,nope")


def test_what_each_device_runs_and_sends() -> None:
    s = {k: v() for k, v in STRATEGIES.items()}
    assert not s["cloud-only"].rerank and s["cloud-only"].families == ()
    assert s["device-rerank"].rerank and s["device-rerank"].families == ()
    assert s["feature"].families_for("engagement") == ("feature",) and s["feature"].families_for("fetch") == ()
    assert s["federated"].families_for("fetch") == ("parameter",)
    assert s["data"].families_for("fetch") == ("data",)
    assert s["data"].device_config(DeviceConfig()).data.consent is True
    assert s["data"].device_config(DeviceConfig()).data.sample_rate < 1.0  # near-uniform sample, not hardest-only
    assert STRATEGIES["data"](example_sample_rate=1.0).device_config(DeviceConfig()).data.sample_rate == 1.0
    assert s["hybrid"].device_config(DeviceConfig()).personalize.max_norm < DeviceConfig().personalize.max_norm
    assert s["feature"].device_config(DeviceConfig()).data.consent is False
    assert s["hybrid"].families_for("engagement") == ("feature",) and s["hybrid"].families_for("fetch") == ("parameter",)
    assert s["hybrid"].personalize_steps > 0
    assert isinstance(s["feature"].policy, AlwaysUpload)
    drift = STRATEGIES["feature"](policy_factory=lambda: DriftTriggered(0.2), label="feature[drift=0.2]")
    assert isinstance(drift.policy, DriftTriggered) and drift.label == "feature[drift=0.2]"
    drift.reset()
    assert isinstance(drift.policy, DriftTriggered)


def test_a_new_strategy_plugs_in_without_touching_the_loop() -> None:
    class Periodic(BaseStrategy):
        name = "test-periodic-feature"
        families = ("feature",)
        upload_on = "fetch"

        calls = 0

        def aggregate(self, round, updates, cloud):  # type: ignore[no-untyped-def]
            type(self).calls += 1
            return super().aggregate(round, updates, cloud)

    register(Periodic)
    try:
        assert issubclass(STRATEGIES["test-periodic-feature"], Strategy)
        world = generate(SyntheticConfig(events=1500, users=30, items=40, days=2.0, seed=1))
        res = run_prequential(world, make_strategies("cloud-only,test-periodic-feature"), EvalConfig(refresh_every=300, batch_size=100, n_boot=20))
        r = res.get("test-periodic-feature")
        assert r.uploads > 0 and Periodic.calls >= 4
        assert len(r.points.rank) == len(res.get("cloud-only").points.rank)
    finally:
        STRATEGIES.pop("test-periodic-feature", None)
    with pytest.raises(TypeError):
        register(int)  # type: ignore[arg-type]


def test_labels_must_be_unique() -> None:
    world = generate(SyntheticConfig(events=200, users=10, items=20, days=1.0, seed=1))
    with pytest.raises(ValueError):
        run_prequential(world, [STRATEGIES["feature"](), STRATEGIES["feature"]()], EvalConfig(n_boot=10))
    assert np.isfinite(run_prequential(world, make_strategies("cloud-only"), EvalConfig(n_boot=10)).get("cloud-only").metrics["HR@50"].mean)


def test_split_by_cost_balances_and_covers() -> None:
    from tandem.evaluation.parallel import split_by_cost

    strats = make_strategies("all")
    groups = split_by_cost(strats, 2)
    assert sorted(i for g in groups for i in g) == list(range(len(strats))) and len(groups) == 2
    assert split_by_cost(strats[:1], 4) == [[0]]
    from tandem.evaluation.parallel import _BASELINES_COST, _COST

    load = [sum(_COST[strats[i].name] for i in g) for g in groups]
    load[0] += _BASELINES_COST
    assert abs(load[0] - load[1]) <= min(_COST.values()) + 0.2  # the best two-way split of these six


class _FixedCloud:
    """The two calls ``StrategyCloud.refresh`` makes of a cloud model."""

    version = 0

    def item_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        return np.arange(4, dtype=np.int64), np.eye(4, 32, dtype=np.float32)


@pytest.mark.parametrize("radius", [None, 0.5])
def test_trust_region_bounds_the_shipped_reranker(radius: float | None) -> None:
    """Learned updates move the shipped reranker at most ``trust_radius`` from the start; small ones pass unchanged."""
    from device_rerank.reranker import Reranker, RerankerConfig
    from tandem.strategies.server import StrategyCloud

    base = Reranker(RerankerConfig(emb_dim=32))
    w0 = base.flat_parameters()
    sc = StrategyCloud(base, trust_radius=radius, trial_min_devices=0)  # no ship gate (tests/test_trial_gate.py)
    big = np.random.default_rng(0).normal(size=len(w0)).astype(np.float32)  # norm ~ 60
    sc.apply_model_delta(big)
    assert sc.refresh(_FixedCloud())
    drift = sc.reranker.flat_parameters() - w0
    if radius is None:
        assert np.allclose(drift, big, atol=1e-5)
    else:
        assert np.linalg.norm(drift) == pytest.approx(radius, rel=1e-4)
        assert np.allclose(drift / np.linalg.norm(drift), big / np.linalg.norm(big), atol=1e-4)  # same direction
    small = big * (0.1 / np.linalg.norm(big))
    sc2 = StrategyCloud(Reranker(RerankerConfig(emb_dim=32)), trust_radius=0.5, trial_min_devices=0)
    start = sc2.reranker.flat_parameters()
    sc2.apply_model_delta(small)
    sc2.refresh(_FixedCloud())
    assert np.allclose(sc2.reranker.flat_parameters() - start, small, atol=1e-5)
    assert np.allclose(base.flat_parameters(), w0)  # the fleet's starting model is never mutated


def test_trust_region_bounds_accumulated_item_deltas() -> None:
    """Device item-row deltas add up, but an item's total never leaves the trust radius."""
    from device_rerank.reranker import Reranker, RerankerConfig
    from tandem.strategies.server import StrategyCloud

    sc = StrategyCloud(Reranker(RerankerConfig(emb_dim=4)), trust_radius=0.5)
    step = np.array([0.2, 0.0, 0.0, 0.0], np.float32)
    sc.apply_item_deltas({7: step})
    assert np.allclose(sc.item_delta[7], step)  # inside the radius: unchanged
    for _ in range(10):
        sc.apply_item_deltas({7: step, 8: -step})
    assert np.linalg.norm(sc.item_delta[7]) == pytest.approx(0.5) and np.linalg.norm(sc.item_delta[8]) == pytest.approx(0.5)
    free = StrategyCloud(Reranker(RerankerConfig(emb_dim=4)), trust_radius=None)
    for _ in range(10):
        free.apply_item_deltas({7: step})
    assert np.linalg.norm(free.item_delta[7]) == pytest.approx(2.0)


def _examples(n: int, sign: float, seed: int) -> HardExamples:
    """Hard examples whose label follows ``sign`` times the cloud z feature (device score 0)."""
    from device_rerank.config import CTX_FEATURES

    rng = np.random.default_rng(seed)
    c = len(CTX_FEATURES)
    x = np.zeros((n, c + 2), np.float32)
    x[:, CTX_FEATURES.index("rank_frac")] = rng.uniform(0, 0.9, n)  # in the cached list
    z = rng.normal(size=n).astype(np.float32)
    x[:, c] = z
    y = (sign * z > 0).astype(np.uint8)
    return HardExamples(np.arange(n, dtype=np.int64), y, x)


@pytest.mark.parametrize(("held_sign", "shipped"), [(1.0, True), (-1.0, False)])
def test_data_fit_ships_only_what_the_held_out_batches_confirm(held_sign: float, shipped: bool) -> None:
    """Every 5th device batch is held out: a fit that raises their loss is not shipped."""
    from tandem.strategies.server import HOLDOUT_EVERY

    sc = StrategyCloud(Reranker(RerankerConfig(emb_dim=8)), data_fit_steps=30, data_fit_lr=0.05, data_fit_l2=0.0)
    before = sc.reranker.flat_parameters().copy()
    batches = [(i, _examples(40, held_sign if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 else 1.0, i)) for i in range(10)]
    sc.add_examples(batches)
    model = copy.deepcopy(sc.reranker)
    assert sc._fit_on_examples(model) is shipped
    assert len(sc.gate_log) == 1 and sc.gate_log[0]["shipped"] is shipped
    assert sc.gate_log[0]["held_out"] == 2 * 40
    changed = not np.allclose(model.flat_parameters(), before)
    assert changed is shipped
