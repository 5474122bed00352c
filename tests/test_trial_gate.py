"""The ship gate of learned strategies: a changed reranker is a trial until devices vouch for it.

Flower's evaluate round, asynchronous: the cloud puts a changed reranker on trial, devices
score it against the shipped one on feedback no update of theirs carried, and it ships only
when enough of them find it no worse (trimmed mean of their loss differences <= 0).
"""

from __future__ import annotations

import numpy as np
import pytest

from device_rerank.config import DeviceConfig, RerankerConfig
from device_rerank.device import Device
from device_rerank.encoders import EvaluationEncoder, PayloadError, TrialEvaluation
from device_rerank.envelope import Keyring, UpdateRejected, make_verifier, sign
from device_rerank.personalize import mean_group_losses
from device_rerank.reranker import Reranker
from streams.candidates import Candidates
from tandem.strategies.server import TRIAL_MAX_ROUNDS, TRIAL_MIN_DEVICES, TRIAL_TRIM, StrategyCloud

DIM = 8


class _FixedCloud:
    """The slice of ``CloudRecommender`` that ``StrategyCloud.refresh`` reads."""

    row_of: dict[int, int] = {}
    version = 0

    def item_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        return np.arange(4, dtype=np.int64), np.eye(4, DIM, dtype=np.float32)

    def index_for(self, vecs: np.ndarray) -> None:
        return None


def _cloud_with_trial(min_devices: int = 4, max_rounds: int = 3) -> tuple[StrategyCloud, np.ndarray]:
    sc = StrategyCloud(Reranker(RerankerConfig(emb_dim=DIM)), trust_radius=None, trial_min_devices=min_devices, trial_max_rounds=max_rounds)
    shipped = sc.reranker.flat_parameters().copy()
    sc.apply_model_delta(np.full(len(shipped), 0.01, np.float32))
    assert sc.refresh(_FixedCloud()) is False, "a change is a trial first, not shipped"
    assert sc.trial is not None and sc.trial_version == sc.version
    assert np.allclose(sc.reranker.flat_parameters(), shipped)
    return sc, shipped


def _verdicts(sc: StrategyCloud, diffs: list[float], version: int | None = None) -> None:
    v = sc.trial_version if version is None else version
    sc.add_evaluations([(d, TrialEvaluation(v, 3, 1.0, 1.0 + x)) for d, x in enumerate(diffs)])


def test_a_trial_the_devices_find_better_ships() -> None:
    sc, shipped = _cloud_with_trial()
    trial = sc.trial.flat_parameters().copy()
    _verdicts(sc, [-0.1, -0.2, 0.05, -0.1])
    assert sc.refresh(_FixedCloud()) is True
    assert np.allclose(sc.reranker.flat_parameters(), trial) and sc.trial is None
    assert sc.model_version == sc.version
    assert sc.trial_log[-1]["verdict"] == "shipped" and sc.trial_log[-1]["devices"] == 4


def test_a_trial_the_devices_find_worse_is_dropped_and_later_changes_go_on() -> None:
    sc, shipped = _cloud_with_trial()
    _verdicts(sc, [0.1, 0.2, -0.05, 0.1])
    assert sc.refresh(_FixedCloud()) is False
    assert np.allclose(sc.reranker.flat_parameters(), shipped) and sc.trial is None
    assert sc.trial_log[-1]["verdict"] == "worse"
    sc.apply_model_delta(np.full(len(shipped), -0.01, np.float32))  # the next change becomes the next trial
    sc.refresh(_FixedCloud())
    assert sc.trial is not None and np.allclose(sc.trial.flat_parameters(), shipped - 0.01, atol=1e-6)


def test_changes_wait_while_a_trial_is_scored_and_too_few_verdicts_drop_it() -> None:
    sc, shipped = _cloud_with_trial(min_devices=4, max_rounds=2)
    first = sc.trial
    _verdicts(sc, [-1.0, -1.0])  # two of the four needed
    sc.apply_model_delta(np.full(len(shipped), 0.5, np.float32))
    assert sc.refresh(_FixedCloud()) is False
    assert sc.trial is first, "the trial is still being scored; the new delta waits"
    assert sc.refresh(_FixedCloud()) is False  # the last round: still two verdicts
    assert sc.trial_log[-1]["verdict"] == "too_few_verdicts"
    assert np.allclose(sc.reranker.flat_parameters(), shipped)
    assert sc.trial is not None and sc.trial is not first  # the waiting delta is the next trial


def test_verdicts_on_another_trial_do_not_count_and_a_device_counts_once() -> None:
    sc, _ = _cloud_with_trial(min_devices=3, max_rounds=1)
    _verdicts(sc, [-1.0, -1.0, -1.0], version=sc.trial_version - 1)  # an older trial
    sc.add_evaluations([(9, TrialEvaluation(sc.trial_version, 3, 1.0, 0.5))] * 5)  # one device, five times
    assert sc.refresh(_FixedCloud()) is False
    assert sc.trial_log[-1] == {**sc.trial_log[-1], "devices": 1, "verdict": "too_few_verdicts"}


def test_a_few_lying_devices_cannot_ship_a_worse_trial() -> None:
    n = 20
    liars = int(TRIAL_TRIM * n)  # trimmed from each side
    sc, shipped = _cloud_with_trial(min_devices=n)
    _verdicts(sc, [0.05] * (n - liars) + [-15.0] * liars)
    assert sc.refresh(_FixedCloud()) is False
    assert sc.trial_log[-1]["verdict"] == "worse"


def test_no_gate_ships_at_once() -> None:
    sc = StrategyCloud(Reranker(RerankerConfig(emb_dim=DIM)), trust_radius=None, trial_min_devices=0)
    w = sc.reranker.flat_parameters()
    sc.apply_model_delta(np.full(len(w), 0.01, np.float32))
    assert sc.refresh(_FixedCloud()) is True and sc.trial is None
    assert np.allclose(sc.reranker.flat_parameters(), w + 0.01, atol=1e-6)


# -- the device side ---------------------------------------------------------------------
def test_evaluation_payload_round_trips_and_refuses_forgeries() -> None:
    ev = TrialEvaluation(7, 5, 1.25, 0.75)
    raw = EvaluationEncoder.encode(ev)
    assert len(raw) == 20 and EvaluationEncoder.decode(raw) == ev and ev.difference == -0.5
    bad = [
        raw[:-1],
        EvaluationEncoder.encode(TrialEvaluation(7, 0, 1.0, 1.0)),
        EvaluationEncoder.encode(TrialEvaluation(-1, 3, 1.0, 1.0)),
        EvaluationEncoder.encode(TrialEvaluation(7, 3, float("nan"), 1.0)),
        EvaluationEncoder.encode(TrialEvaluation(7, 3, 1.0, 1e6)),
        EvaluationEncoder.encode(TrialEvaluation(7, 3, -1.0, 1.0)),
    ]
    for b in bad:
        with pytest.raises(PayloadError):
            EvaluationEncoder.decode(b)


def test_the_verifier_checks_an_evaluation_against_the_cloud() -> None:
    ring = Keyring(b"k" * 16)
    model = Reranker(RerankerConfig(emb_dim=DIM))
    ver = make_verifier(ring, model.num_parameters(), DIM, current_model_version=4)

    def env(seq: int, ev: TrialEvaluation, n: int) -> bytes:
        payload = EvaluationEncoder.encode(ev)
        return sign(ring.key_for(1), device_id=1, model_version=4, seq=seq, family="evaluation", created_ms=0, num_examples=n, payload=payload).encode()

    ok = ver.verify(env(1, TrialEvaluation(4, 3, 1.0, 0.75), 3))
    assert ok.family == "evaluation" and ok.evaluation == TrialEvaluation(4, 3, 1.0, 0.75)
    with pytest.raises(UpdateRejected, match="stale"):
        ver.verify(env(2, TrialEvaluation(5, 3, 1.0, 0.9), 3))  # a trial the cloud never made
    with pytest.raises(UpdateRejected, match="malformed"):
        ver.verify(env(3, TrialEvaluation(4, 3, 1.0, 0.9), 40))  # weight claimed beyond its groups
    with pytest.raises(UpdateRejected, match="malformed"):
        ver.verify(env(4, TrialEvaluation(4, 3, float("inf"), 0.9), 3))


def _device_with_groups(n_engagements: int) -> Device:
    model = Reranker(RerankerConfig(emb_dim=DIM))
    dev = Device(1, model, DeviceConfig(seed=0), key=b"d" * 16)
    dev.record_trial_negatives = True
    rng = np.random.default_rng(0)
    ids = np.arange(100, 160, dtype=np.int64)
    emb = rng.normal(size=(len(ids), DIM)).astype(np.float32)
    q, scale = (np.clip(np.rint(emb * 20), -127, 127).astype(np.int8), np.full(len(ids), 0.05, np.float32))
    cands = Candidates(1, ids, np.linspace(1, 0, len(ids)).astype(np.float32), q, scale, 0, 0)
    dev.receive(cands, 0)
    for j in range(n_engagements):
        t = 60_000 * (j + 1)
        dev.ranking(t)
        dev.observe(t, int(ids[(7 * j + 3) % len(ids)]), 1, 30.0)
    return dev


def test_a_device_scores_a_trial_on_feedback_no_update_carried() -> None:
    dev = _device_with_groups(6)
    groups = list(dev.buffer.groups)
    assert len(groups) == 6
    assert all(len(g.item_ids) == 1 + DeviceConfig().negatives_per_group + DeviceConfig().trial_negatives_per_group for g in groups)
    # learning slots are unchanged by the uniform ones
    train = dev.buffer.batch()[0]
    assert train.shape[1] == 1 + DeviceConfig().negatives_per_group
    trial = Reranker(RerankerConfig(emb_dim=DIM))
    trial.apply_delta(np.full(trial.num_parameters(), 0.05, np.float32))
    env = dev.make_evaluation(trial, 3, at_ms=10**6)
    assert env is not None and env.family == "evaluation" and env.num_examples == 6
    ev = EvaluationEncoder.decode(env.payload)
    want = mean_group_losses((dev.model, trial), dev.buffer, range(6), dev.patch)
    assert ev.trial_version == 3 and ev.loss_shipped == pytest.approx(want[0], rel=1e-6) and ev.loss_trial == pytest.approx(want[1], rel=1e-6)
    # after a parameter update carried them, nothing is fresh: no verdict until new feedback
    assert dev.make_update("parameter", at_ms=10**6) is not None
    assert dev.make_evaluation(trial, 3, at_ms=10**6 + 1) is None
    t = 10**6 + 60_000
    dev.ranking(t)
    dev.observe(t, int(dev._cloud_ids[5]), 1, 30.0)
    later = dev.make_evaluation(trial, 4, at_ms=t + 1)
    assert later is not None and later.num_examples == 1


def test_the_fleet_sends_one_verdict_per_trial_and_counts_the_trial_download() -> None:
    from device_rerank.envelope import Keyring as Ring
    from tandem.strategies import make_strategies
    from tandem.strategies.fleet import StrategyFleet

    (strategy,) = make_strategies("federated")
    model = Reranker(RerankerConfig(emb_dim=DIM))
    fleet = StrategyFleet(strategy, model, 0, DeviceConfig(seed=0), Ring(b"f" * 16), min_new_engagements=100)
    dev = _device_with_groups(4)
    fleet.devices[1] = dev
    cands = dev.cands
    trial = Reranker(RerankerConfig(emb_dim=DIM))
    fleet.set_trial(trial, 2)
    down = fleet.bytes_down
    fleet.receive(1, 10**6, cands, sync=True)
    fleet.receive(1, 10**6 + 1, cands, sync=True)  # the same trial again: no second verdict
    sent = [raw for raw, _ in fleet.take_outbox()]
    assert len(sent) == 1 and fleet.evaluations == 1 and fleet.uploads == 1
    # two lists, the fleet's shared reranker (the device ran its own) and the trial, once
    assert fleet.bytes_down - down == 2 * cands.nbytes + model.int8_nbytes() + trial.int8_nbytes()
    fleet.set_trial(None)
    fleet.receive(1, 10**6 + 2, cands, sync=True)
    assert fleet.take_outbox() == []


def test_the_services_gate_like_the_evaluation() -> None:
    """The cloud service's defaults are the evaluation's (tests/test_one_system.py runs both)."""
    from tandem.evaluation.protocol import EvalConfig
    from tandem.services.settings import CloudSettings

    s, e = CloudSettings(), EvalConfig()
    assert (s.trial_min_devices, s.trial_max_rounds) == (e.trial_min_devices, e.trial_max_rounds) == (TRIAL_MIN_DEVICES, TRIAL_MAX_ROUNDS)
