"""One system: the services run the evaluation's cloud, fleet and strategies.

The same small log goes through both drivers: ``run_prequential`` in process, and the cloud
and fleet workers over topics (an in-memory transport with the broker's offset semantics),
paced window by window as the evaluation schedules them (availability, then the fleet acts
on the window, then the cloud ingests it and its updates; a refresh every
``refresh_every`` user actions). Stated tolerance: the same prediction points and uploads,
and NDCG@10 equal to 1e-6 (both drivers run the same deterministic objects).
"""

from __future__ import annotations

import numpy as np
import pytest

from streams.batch import EventBatch, encode_batch
from streams.datasets import load_source
from streams.replay import availability_batch
from tandem.evaluation.prequential import EvalConfig, run_prequential
from tandem.services.cloud_service import CloudWorker
from tandem.services.fleet_service import EngineClient, FleetWorker
from tandem.services.recommender_engine import RecommenderEngine
from tandem.services.settings import TOPIC_AVAILABILITY, TOPIC_INTERACTIONS, TOPIC_UPDATES, CloudSettings, FleetSettings
from tandem.strategies import STRATEGIES, make_strategies
from test_services import KEY, MemoryTransport, dlq

EVENTS = 3000
WINDOW = 256  # EvalConfig.batch_size
REFRESH = 1000  # EvalConfig.refresh_every


@pytest.fixture(scope="module")
def world():
    return load_source("synthetic", events=EVENTS)


@pytest.fixture(scope="module")
def evaluation(world):
    cfg = EvalConfig(n_boot=10, domain="repeat", batch_size=WINDOW, refresh_every=REFRESH)
    return {r.label: r for r in run_prequential(world, make_strategies("all"), cfg).results}


def run_services(log, strategy: str, **cloud_kw) -> tuple[CloudWorker, FleetWorker, MemoryTransport]:
    """Drive the cloud and fleet workers over topics, window by window, as the evaluation does."""
    ev = log.events
    t = MemoryTransport()
    settings = dict(
        transport="memory", engine="recommender", strategy=strategy, domain="repeat", device_key=KEY,
        refresh_every_events=REFRESH, refresh_when_idle=False, poll_records=10**6, partitions=1,
        aggregate_batch=10**9, aggregate_every_s=1e9, checkpoint_every_s=1e9, checkpoint_every_events=10**9,
        num_users=int(ev.user_id.nunique()) + 1, num_items=int(ev.item_id.nunique()) + 1,
    )  # fmt: skip
    s = CloudSettings(**{**settings, **cloud_kw})
    engine = RecommenderEngine(s, item_categories=log.item_categories())
    cloud = CloudWorker(s, t, engine).open()
    fleet = FleetWorker(FleetSettings(device_key=KEY, strategy=strategy, domain="repeat", poll_records=10**6), t, client=EngineClient(engine)).open()
    whole = EventBatch.from_frame(ev)
    transitions = availability_batch(log)
    lo = -1
    for w0 in range(0, len(whole), WINDOW):
        window = whole.take(np.arange(w0, min(len(whole), w0 + WINDOW)))
        hi = int(window.ts_ms.max()) + 1
        live = transitions.take(np.flatnonzero((transitions.ts_ms >= lo) & (transitions.ts_ms < hi)))
        lo = hi
        if len(live):
            t.produce(TOPIC_AVAILABILITY, encode_batch(live), partition=0)
            while cloud.step(timeout_s=0.0):
                pass
        t.produce(TOPIC_INTERACTIONS, encode_batch(window), partition=0)
        while fleet.step(timeout_s=0.0):
            pass
        while cloud.step(timeout_s=0.0):
            pass
    return cloud, fleet, t


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_services_equal_the_evaluation(world, evaluation, strategy: str) -> None:
    cloud, fleet, t = run_services(world, strategy)
    ref = evaluation[strategy]
    assert fleet.points == ref.n_points > 0
    assert fleet.updates_sent == ref.uploads, "the same upload policy fires at the same actions"
    assert fleet.ndcg_sum / fleet.points == pytest.approx(ref.metrics["NDCG@10"].mean, abs=1e-6)
    # nothing rejected; whatever is still buffered is aggregated at the next refresh
    assert dlq(t, TOPIC_UPDATES) == [] and not any(cloud.gate.rejected.values())
    cloud._flush_updates()
    assert cloud.state.updates_applied == fleet.updates_sent
    if strategy in ("federated", "data", "hybrid"):
        # learned strategies: the cloud put its changed rerankers on trial with the fleet, the
        # devices scored them (the ship gate), and both drivers reached the same verdicts
        assert fleet.metrics.snapshot().get("trials_received", 0) >= 1 and fleet.fleet.evaluations > 0
        cloud._refresh()  # the evaluation's last round, at the end of the log
        fleet.step(timeout_s=0.0)  # the fleet reads it
        decided = [s["trial"] for s in ref.round_summaries if "trial" in s]
        assert decided and decided == cloud.engine.server.trial_log
        assert fleet.fleet.model_version == cloud.engine.server.model_version
        assert fleet.fleet.trial_version == cloud.engine.server.trial_version


def test_an_update_the_strategy_cannot_apply_is_dead_lettered_and_the_worker_goes_on(world) -> None:
    """One bad update fails the aggregation round: it alone goes to the DLQ with the reason."""
    from tandem.services.settings import dlq_topic

    cloud, fleet, t = run_services(world.rows(0, 2500), "feature")  # uploads since the last refresh are pending
    assert fleet.updates_sent > 3 and cloud.pending_updates
    victim = next(iter(cloud.pending_updates.values()))[0].device_id
    original = cloud.engine.strategy.aggregate

    def fails_on_victim(round_no, updates, server):
        if any(u.device_id == victim for u in updates):
            raise ValueError("cannot apply this update")
        return original(round_no, updates, server)

    cloud.engine.strategy.aggregate = fails_on_victim
    n_pending, applied_before = len(cloud.pending_updates), cloud.state.updates_applied
    n_victim = sum(u.device_id == victim for u, _ in cloud.pending_updates.values())
    cloud._flush_updates()
    letters = dlq(t, TOPIC_UPDATES)
    assert len(letters) == n_victim
    assert all(d.reason.startswith("application failed: ValueError: cannot apply") for d in letters)
    assert cloud.state.updates_applied - applied_before == n_pending - n_victim
    assert len(t.values(dlq_topic(TOPIC_UPDATES))) == n_victim
    assert cloud.step(timeout_s=0.0) == 0 and cloud.error is None
