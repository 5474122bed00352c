"""The report: results.json, Markdown and a self-contained HTML page with plots, all parseable."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from device_rerank.policy import DriftTriggered
from streams.datasets.synthetic import SyntheticConfig, generate
from tandem.commands.evaluate import build_strategies, frontier
from tandem.evaluation.prequential import EvalConfig, run_prequential
from tandem.evaluation.report import table_rows, write_report

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def result():  # type: ignore[no-untyped-def]
    world = generate(SyntheticConfig(events=2000, users=30, items=50, days=2.0, seed=2))
    strats = build_strategies("cloud-only,device-rerank,feature", "feature", [0.2])
    res = run_prequential(world, strats, EvalConfig(refresh_every=500, batch_size=100, n_boot=50))
    res.frontier = frontier(res, "feature")
    return res


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.tables = 0

    def handle_starttag(self, tag, attrs):  # type: ignore[no-untyped-def]
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        if tag == "table":
            self.tables += 1


def test_report_files_written_and_parseable(result, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths = write_report(result, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["source"] == "synthetic"
    labels = [r["label"] for r in data["results"]]
    assert {"cloud-only", "device-rerank", "feature", "feature[drift=0.2]", "popularity"} <= set(labels)
    nd = data["results"][0]["metrics"]["NDCG@10"]
    assert nd["lo"] <= nd["mean"] <= nd["hi"]
    assert len(data["frontier"]) == 2 and data["frontier"][0]["policy"] == "always"
    for name in ("ndcg_over_time.png", "bytes_vs_ndcg.png", "latency.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    md = paths["markdown"].read_text()
    assert "| strategy |" in md and "cloud-only" in md and "![bytes_vs_ndcg.png](bytes_vs_ndcg.png)" in md
    p = _Collect()
    p.feed(paths["html"].read_text())
    assert p.tables >= 3 and len(p.imgs) == 3
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG


def test_table_rows_have_cis_and_reference(result) -> None:  # type: ignore[no-untyped-def]
    rows = {r["strategy"]: r for r in table_rows(result)}
    assert rows["cloud-only"]["vs cloud-only"] == "ref"
    assert "[" in rows["device-rerank"]["NDCG@10 [95% CI]"]
    assert rows["device-rerank"]["vs cloud-only"].endswith("]")


def test_drift_policy_sends_less(result) -> None:  # type: ignore[no-untyped-def]
    assert isinstance(build_strategies("feature", "feature", [0.3])[1].policy, DriftTriggered)
    always, drift = result.get("feature"), result.get("feature[drift=0.2]")
    assert drift.bytes_up < always.bytes_up


def test_cli_evaluate_synthetic(tmp_path: Path) -> None:
    from tandem.cli import app

    out = tmp_path / "run"
    res = CliRunner().invoke(
        app, ["evaluate", "--source", "synthetic", "--events", "1500", "--strategies", "cloud-only,device-rerank", "--sweep", "", "--out", str(out), "--n-boot", "50"]
    )
    assert res.exit_code == 0, res.output
    assert "cloud-only" in res.output and (out / "report.html").is_file() and (out / "results.json").is_file()


def test_cli_evaluate_rejects_a_bad_domain_in_one_line(tmp_path: Path) -> None:
    from tandem.cli import app

    res = CliRunner().invoke(app, ["evaluate", "--source", "synthetic", "--events", "500", "--domain", "both", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--domain" in res.output and "Traceback" not in res.output
