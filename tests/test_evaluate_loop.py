"""The prequential loop on a small synthetic world where the truth (a taste shift) is known."""

from __future__ import annotations

import numpy as np
import pytest

from streams.datasets.synthetic import SyntheticConfig, generate
from tandem.evaluation.metrics import ndcg_at_k
from tandem.evaluation.prequential import EvalConfig, run_prequential
from tandem.strategies import make_strategies


@pytest.fixture(scope="module")
def world():  # type: ignore[no-untyped-def]
    return generate(SyntheticConfig(events=8000, users=80, items=120, days=6.0, shift_fraction=0.3, shift_at=0.5, seed=3))


@pytest.fixture(scope="module")
def result(world):  # type: ignore[no-untyped-def]
    # fetches at session start and every 30 min only: between fetches the device's context is all that is fresh
    cfg = EvalConfig(refresh_every=1000, batch_size=200, n_boot=200, seed=0, refetch_every=0)
    return run_prequential(world, make_strategies("cloud-only,device-rerank,feature,federated"), cfg)


def test_same_prediction_points_for_every_strategy(result) -> None:  # type: ignore[no-untyped-def]
    pts = [r.points for r in result.results]
    assert all(p is not None and len(p.rank) == result.n_points for p in pts)
    for p in pts[1:]:
        assert np.array_equal(p.user, pts[0].user) and np.array_equal(p.ts_ms, pts[0].ts_ms)
    labels = result.labels()
    assert {"cloud-only", "device-rerank", "feature", "federated", "popularity", "trending", "item-to-item", "repeat-last", "rep"} <= set(labels)


def test_collaboration_recovers_the_taste_shift(world, result) -> None:  # type: ignore[no-untyped-def]
    """After the shift, on shifted users, device-side strategies beat the cloud alone."""
    shift = world.meta["shift"]
    shifted = set(np.asarray(shift["users"]).tolist())
    # synthetic user ids may be offset from the generator's row index; map through the log
    def after_shift(label: str) -> float:
        p = result.get(label).points
        mask = (p.ts_ms >= shift["ts_ms"]) & np.isin(p.user, list(shifted))
        assert mask.sum() > 50
        return float(ndcg_at_k(p.rank[mask], 10).mean())

    cloud = after_shift("cloud-only")
    for label in ("device-rerank", "feature"):
        assert after_shift(label) > cloud, (label, after_shift(label), cloud)


def test_summaries_are_consistent(result) -> None:  # type: ignore[no-untyped-def]
    cloud = result.get("cloud-only")
    feat = result.get("feature")
    fed = result.get("federated")
    assert cloud.bytes_up == 0 and cloud.uploads == 0
    assert feat.uploads > 0 and feat.bytes_up > 0
    assert fed.rounds >= 1 and fed.bytes_up > 0
    for r in result.results:
        m = r.metrics["NDCG@10"]
        assert m.lo <= m.mean <= m.hi
        assert 0.0 <= m.mean <= 1.0
        assert r.metrics["HR@50"].mean >= r.metrics["HR@10"].mean >= r.metrics["HR@1"].mean
    assert "NDCG@10" in result.get("device-rerank").vs_reference
    assert result.get("device-rerank").latency["p50_ms"] > 0


def test_no_future_leakage(world) -> None:  # type: ignore[no-untyped-def]
    """Scrambling what happens after event 1500 cannot change any prediction made before it."""
    import pandas as pd

    cut = 1500
    cfg = EvalConfig(refresh_every=500, batch_size=100, n_boot=20, max_events=3000)
    a = run_prequential(world, make_strategies("cloud-only,device-rerank"), cfg)
    ev = world.events
    tail = ev.iloc[cut:].copy()
    tail["item_id"] = np.random.default_rng(0).permutation(tail["item_id"].to_numpy())
    world2 = type(world)(name=world.name, events=pd.concat([ev.iloc[:cut], tail]), items=world.items, availability=world.availability, step_ms=world.step_ms)
    b = run_prequential(world2, make_strategies("cloud-only,device-rerank"), cfg)
    t_cut = int(ev.ts_ms.iloc[cut])
    for label in ("cloud-only", "device-rerank"):
        pa, pb = a.get(label).points, b.get(label).points
        ra, rb = pa.rank[pa.ts_ms < t_cut], pb.rank[pb.ts_ms < t_cut]
        assert len(ra) > 300
        assert np.array_equal(ra, rb)
        assert not np.array_equal(pa.rank[pa.ts_ms >= t_cut][:50], pb.rank[pb.ts_ms >= t_cut][:50])  # the tail does change later ones


def test_the_loop_drives_the_production_cloud() -> None:
    """The loop's cloud is cloud_recsys' recommender (TorchRec two-tower inside), trained and refreshed."""
    from cloud_recsys.recommender import CloudRecommender

    world = generate(SyntheticConfig(events=1200, users=20, items=40, days=1.0, seed=2))
    made: list[CloudRecommender] = []

    def factory(log, cfg, exclude, allowed_at):  # type: ignore[no-untyped-def]
        from tandem.evaluation.clouds import recommender_for

        c = recommender_for(log, cfg, exclude, allowed_at)
        made.append(c)
        return c

    res = run_prequential(world, make_strategies("cloud-only,device-rerank"), EvalConfig(refresh_every=300, batch_size=100, n_boot=20), cloud_factory=factory)
    cloud = made[0]
    assert res.config["cloud"] == "CloudRecommender" and set(res.config["fusion_weights"]) >= {"two_tower_z", "i2i_after", "rep16"}
    assert cloud.trainer.steps > 0 and cloud.fusion.steps > 0 and cloud.version >= 4 and cloud.trainer.version == cloud.version
    ids, vecs = cloud.item_vectors()
    assert vecs.shape == (len(ids), cloud.dim) and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    for label in ("cloud-only", "device-rerank"):
        r = res.get(label)
        assert len(r.points.rank) == res.n_points and np.isfinite(r.metrics["NDCG@10"].mean)
    assert res.get("cloud-only").metrics["HR@50"].mean > 0.5 * res.get("popularity").metrics["HR@50"].mean
    assert res.get("cloud-only").bytes_request_per_device_day > 0


def test_feed_domain_never_shows_consumed_items_and_repeat_domain_scores_repeats() -> None:
    """feed: no list holds an item the user consumed before (cloud-only included); repeat: repeat points can hit."""
    world = generate(SyntheticConfig(events=1500, users=25, items=40, days=1.0, seed=5))
    for domain in ("feed", "repeat"):
        res = run_prequential(world, make_strategies("cloud-only,device-rerank"), EvalConfig(refresh_every=300, batch_size=100, n_boot=20, domain=domain))
        assert res.config["repeat_domain"] == (domain == "repeat")
        for label in ("cloud-only", "device-rerank", "item-to-item"):
            r = res.get(label)
            rep_hits = (r.points.rank[r.points.repeat] > 0).mean() if r.points.repeat.any() else 0.0
            if domain == "feed":
                assert rep_hits == 0.0, label
            else:
                assert rep_hits > 0.2, (label, rep_hits)
    with pytest.raises(ValueError, match="domain"):
        run_prequential(world, make_strategies("cloud-only"), EvalConfig(domain="both", max_events=200, n_boot=10))


def test_parallel_workers_give_the_same_results() -> None:
    """Splitting strategies over forked workers changes nothing but wall time."""
    world = generate(SyntheticConfig(events=1500, users=30, items=40, days=1.0, seed=4))
    cfg = EvalConfig(refresh_every=300, batch_size=100, n_boot=20)
    a = run_prequential(world, make_strategies("cloud-only,device-rerank,feature"), cfg)
    b = run_prequential(world, make_strategies("cloud-only,device-rerank,feature"), cfg, workers=2)
    assert a.labels() == b.labels()
    for r in a.results:
        rb = b.get(r.label)
        assert np.array_equal(r.points.rank, rb.points.rank) and r.bytes_up == rb.bytes_up
        assert r.metrics["NDCG@10"] == rb.metrics["NDCG@10"] and r.vs_reference.keys() == rb.vs_reference.keys()
    assert b.config["workers"] == 2


def test_progress_covers_every_worker() -> None:
    """With two workers the one progress callback counts both: it ends at events x 2, never going back."""
    from tandem.evaluation.protocol import replayed_events

    world = generate(SyntheticConfig(events=800, users=20, items=30, days=1.0, seed=5))
    cfg = EvalConfig(refresh_every=300, batch_size=100, n_boot=10)
    calls: list[tuple[int, int]] = []
    run_prequential(world, make_strategies("cloud-only,device-rerank"), cfg, progress=lambda i, n: calls.append((i, n)), workers=2)
    total = 2 * replayed_events(world, cfg)
    assert calls and all(n == total for _, n in calls)
    done = [i for i, _ in calls]
    assert done == sorted(done) and done[-1] == total
