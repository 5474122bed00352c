"""``--save-model``: the trained cloud and each strategy's shared reranker, saved and loaded back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from cloud_recsys.recommender import CloudRecommender, Request
from device_rerank.config import RerankerConfig
from device_rerank.reranker import Reranker
from streams.datasets.synthetic import SyntheticConfig, generate
from tandem.evaluation.clouds import recommender_for
from tandem.evaluation.prequential import EvalConfig, run_prequential
from tandem.evaluation.saved import load_saved, load_strategy, save_strategy
from tandem.strategies import make_strategies
from tandem.strategies.server import StrategyCloud, serve_candidates

STRATEGIES = "cloud-only,feature,federated"
CFG = EvalConfig(refresh_every=300, batch_size=100, n_boot=10)


@pytest.fixture(scope="module")
def world():  # type: ignore[no-untyped-def]
    return generate(SyntheticConfig(events=1200, users=25, items=40, days=1.0, seed=6))


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):  # type: ignore[no-untyped-def]
    """A one-process run that keeps its cloud in memory (to compare the saved copy with)."""
    kept: list[CloudRecommender] = []

    def factory(*args: Any) -> CloudRecommender:
        kept.append(recommender_for(*args))
        return kept[-1]

    out = tmp_path_factory.mktemp("saved1")
    run_prequential(world, make_strategies(STRATEGIES), CFG, cloud_factory=factory, save_to=out)
    return kept[0], out


def _requests(world, cloud: CloudRecommender) -> list[Request]:  # type: ignore[no-untyped-def]
    ev = world.events
    t_end = int(ev.ts_ms.max())
    users = [int(u) for u in ev.user_id.drop_duplicates().head(6)]
    return [Request(u, t_end, cloud.session_of(u)) for u in users]


def _same_rankings(a: CloudRecommender, b: CloudRecommender, reqs: list[Request]) -> None:
    ra, rb = a.recommend(reqs, 20), b.recommend(reqs, 20)
    assert any(len(r.item_ids) for r in ra), "nothing ranked: the comparison would be empty"
    for x, y in zip(ra, rb):
        assert np.array_equal(x.item_ids, y.item_ids)
        np.testing.assert_allclose(x.scores, y.scores, rtol=1e-6)


def test_reranker_and_overlays_round_trip(tmp_path: Path) -> None:
    model = Reranker(RerankerConfig(emb_dim=8))
    model.apply_delta(np.random.default_rng(0).normal(size=model.num_parameters()).astype(np.float32))
    sc = StrategyCloud(model)
    sc.model_version = 5
    sc.item_delta = {3: np.full(8, 0.25, np.float32)}
    sc.user_vec = {7: np.arange(8, dtype=np.float32)}
    back = load_strategy(save_strategy(tmp_path, "feature[drift=0.2]", sc), "feature")
    assert back.label == "feature[drift=0.2]" and back.name == "feature" and back.model_version == 5
    assert np.array_equal(back.reranker.flat_parameters(), model.flat_parameters())
    assert back.reranker.flat_parameters().std() > 0.5, "the perturbed weights, not a fresh model"
    assert np.array_equal(back.item_delta[3], sc.item_delta[3]) and np.array_equal(back.user_vec[7], sc.user_vec[7])


def test_saved_cloud_ranks_like_the_trained_one(world, trained) -> None:  # type: ignore[no-untyped-def]
    cloud, out = trained
    saved = load_saved(out)
    assert saved.manifest["source"] == "synthetic" and saved.manifest["n_events"] > 0
    assert list(saved.strategies) == STRATEGIES.split(",")
    assert saved.cloud.version == cloud.version and saved.cloud.version > 1
    reqs = _requests(world, cloud)
    _same_rankings(cloud, saved.cloud, reqs)
    # a strategy's server side over the loaded cloud serves what the trained cloud ranks
    lists = serve_candidates(saved.strategies["cloud-only"].server(saved.cloud), saved.cloud, reqs, 10)
    for served, ranked in zip(lists, cloud.recommend(reqs, 10)):
        assert np.array_equal(served.item_ids, ranked.item_ids)


def test_models_come_back_from_every_worker(world, trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two replay workers save what they trained; the result equals the one-process run's."""
    cloud, one = trained
    run_prequential(world, make_strategies(STRATEGIES), CFG, workers=2, save_to=tmp_path)
    a, b = load_saved(one), load_saved(tmp_path)
    assert list(b.strategies) == list(a.strategies)
    for label in a.strategies:
        assert np.array_equal(a.strategies[label].reranker.flat_parameters(), b.strategies[label].reranker.flat_parameters()), label
        assert a.strategies[label].model_version == b.strategies[label].model_version
    _same_rankings(cloud, b.cloud, _requests(world, cloud))


def test_load_saved_refuses_a_folder_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="manifest"):
        load_saved(tmp_path)


def test_cli_save_model(tmp_path: Path) -> None:
    from tandem.cli import app

    models = tmp_path / "models"
    res = CliRunner().invoke(
        app,
        ["evaluate", "synthetic", "--events", "600", "--strategies", "cloud-only,feature", "--sweep", "", "--n-boot", "10",
         "--workers", "1", "--out", str(tmp_path / "run"), "--save-model", str(models)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert set(load_saved(models).strategies) == {"cloud-only", "feature"}
    assert str(models) in res.output.replace("\n", "")


def test_cli_save_model_into_a_file_is_one_line_exit_2(tmp_path: Path) -> None:
    from tandem.cli import app

    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = CliRunner().invoke(app, ["evaluate", "synthetic", "--events", "300", "--out", str(tmp_path / "run"), "--save-model", str(blocker)])
    assert res.exit_code == 2 and "--save-model" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
