"""The README's Python API block runs as written (at a small size), so it cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_api_block() -> str:
    """The first ```python block under the README's "## Python API" heading."""
    text = README.read_text()
    section = text.split("## Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "no python block under ## Python API"
    return match.group(1)


def test_python_api_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tandem.evaluation.results import EvaluationResult

    code = python_api_block()
    small = code.replace("events=20_000", "events=2000").replace("n_boot=200", "n_boot=20")
    assert small.count("events=2000") == 1 and "n_boot=20)" in small, "the README block changed: update this test's sizes"
    monkeypatch.chdir(tmp_path)  # the block writes runs/api/results.json
    ns: dict[str, object] = {}
    exec(compile(small, str(README), "exec"), ns)  # noqa: S102 - our own README
    result, df = ns["result"], ns["df"]
    assert isinstance(result, EvaluationResult)
    assert result.labels()[:2] == ["cloud-only", "feature"] and "popularity" in result.labels()
    ndcg = result.get("feature").metrics["NDCG@10"]
    assert ndcg.lo <= ndcg.mean <= ndcg.hi
    assert list(df.index) == result.labels() and df.loc["feature", "NDCG@10"] == pytest.approx(ndcg.mean)
    back = EvaluationResult.from_json(tmp_path / "runs" / "api" / "results.json")
    assert back.get("feature").metrics["NDCG@10"].mean == pytest.approx(ndcg.mean)


def test_first_screen_says_what_and_how() -> None:
    """The first screen: what Tandem is, make demo / make test, and the demo's verdict line."""
    first = "\n".join(README.read_text().splitlines()[:30])
    assert "make demo" in first and "make test" in first
    assert re.search(r"^Verdict: \S+ is the best strategy, NDCG@10 \d\.\d{4}, ", first, re.M), "paste the demo's real verdict line"
