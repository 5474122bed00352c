"""Fleet shards over Ray (tandem/evaluation/shards.py) change nothing but where devices run."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from streams.datasets import load_source
from tandem.cli import app
from tandem.commands.evaluate import build_strategies
from tandem.evaluation.prequential import EvalConfig, run_prequential

ray = pytest.importorskip("ray")

#: every strategy shape: no devices (cloud-only), rerank only, parameter, data, both (+ a
#: swept variant whose upload policy comes from a lambda, so it must travel by cloudpickle)
STRATEGIES = "cloud-only,device-rerank,federated,data,hybrid"
CFG = EvalConfig(refresh_every=500, batch_size=100, n_boot=10)


@pytest.fixture(scope="module")
def world():  # type: ignore[no-untyped-def]
    return load_source("synthetic", events=3000, seed=1)


def test_two_shards_give_the_same_results(world) -> None:  # type: ignore[no-untyped-def]
    a = run_prequential(world, build_strategies(STRATEGIES, "hybrid", [0.6]), CFG)
    b = run_prequential(world, build_strategies(STRATEGIES, "hybrid", [0.6]), CFG, fleet_shards=2)
    assert a.labels() == b.labels() and "hybrid[drift=0.6]" in a.labels()
    for r in a.results:
        rb = b.get(r.label)
        assert np.array_equal(r.points.rank, rb.points.rank), r.label
        assert (r.bytes_up, r.bytes_down, r.uploads) == (rb.bytes_up, rb.bytes_down, rb.uploads), r.label
        assert len(r.latency_samples_ms) == len(rb.latency_samples_ms), r.label
        assert r.staleness.get("update_to_effect_events") == pytest.approx(rb.staleness.get("update_to_effect_events"), nan_ok=True)
    assert a.get("hybrid").uploads > 0 and a.get("data").bytes_up > 0  # the rounds had something to merge
    assert not ray.is_initialized()  # the runner started Ray, so it shut it down


def test_bad_arguments_are_refused(world) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="fleet_shards"):
        run_prequential(world, build_strategies("cloud-only", None, []), CFG, fleet_shards=-1)
    with pytest.raises(ValueError, match="workers"):
        run_prequential(world, build_strategies("cloud-only,device-rerank", None, []), CFG, fleet_shards=2, workers=2)


def test_missing_ray_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from tandem.evaluation.shards import ShardsUnavailable, connect

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ShardsUnavailable, match="pip install ray") as info:
        connect()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--fleet-shards", "-1"], "--fleet-shards must be 0 or more"),
        (["--fleet-shards", "2", "--workers", "2"], "cannot be combined"),
    ],
)
def test_cli_bad_fleet_shards_exit_2_with_one_line(args: list[str], needle: str) -> None:
    res = CliRunner().invoke(app, ["evaluate", "synthetic", "--events", "500", *args])
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.output, res.stderr


def test_failed_ray_start_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from tandem.evaluation.shards import ShardsUnavailable, connect

    def broken(**_: object) -> None:
        raise RuntimeError("no room for the raylet\nsecond line of a long story")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", broken)
    with pytest.raises(ShardsUnavailable, match="could not start Ray for fleet shards: no room for the raylet$"):
        connect()
