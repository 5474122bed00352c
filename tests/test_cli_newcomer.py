"""A newcomer's mistakes exit 2 with one line; the terminal table fits 120 columns (issue 15)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tandem.cli import app


@pytest.mark.parametrize(
    "args, needle",
    [
        (["evaluate", "twich"], "did you mean 'twitch'"),
        (["evaluate", "--strategies", "hybird"], "did you mean 'hybrid'"),
        (["evaluate", "--batch-size", "0"], "--batch-size"),
        (["evaluate", "--n-boot", "0"], "--n-boot"),
        (["evaluate", "--limit", "0"], "--limit"),
        (["evaluate", "movielens", "--events", "10"], "--limit"),
        (["replay", "synthetic", "--speed", "nan"], "--speed"),
        (["replay", "synthetic", "-t", "kafka://127.0.0.1:1"], "no Kafka broker"),
        (["serve", "cloud", "--transport", "kafka://127.0.0.1:1"], "no Kafka broker"),
        (["demo", "--speed", "nan"], "--speed"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(args: list[str], needle: str) -> None:
    res = CliRunner().invoke(app, args)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.output, res.stderr


def test_unwritable_out_is_refused_before_work(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = CliRunner().invoke(app, ["evaluate", "synthetic", "--events", "500", "--out", str(blocker / "run")])
    assert res.exit_code == 2 and "--out" in res.stderr and "loaded" not in res.output


def test_version() -> None:
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.startswith("tandem ")


def test_evaluate_verdict_first_and_table_fits_120_columns(tmp_path: Path) -> None:
    from tandem.commands.evaluate import render_table
    from tandem.evaluation.results import EvaluationResult

    out = tmp_path / "run"
    res = CliRunner().invoke(
        app, ["evaluate", "synthetic", "--events", "1500", "--strategies", "cloud-only,feature", "--sweep", "0.2",
              "--sweep-strategy", "feature", "--n-boot", "30", "--workers", "1", "--out", str(out)],
        env={"COLUMNS": "120"},
    )
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[0].startswith("Verdict: ")
    result = EvaluationResult.from_json(out / "results.json")
    assert result.provenance["seed"] == 0 and "evaluate" in result.provenance["command"] or result.provenance["command"]
    text = render_table(result, 120)
    assert max(len(line) for line in text.splitlines()) <= 120
    assert "feature[drift=0.2]" in text  # a label with brackets is not read as markup
    html = (out / "report.html").read_text()
    assert html.index("id='verdict'") < html.index("<table")
    assert (out / "run.log").read_text().count("Verdict:") == 1


def test_any_table_loads_from_the_command_line(tmp_path: Path) -> None:
    f = tmp_path / "clicks.csv"
    f.write_text("SessionId;ItemId;Time\na;x;1396860669277\na;y;1396860689277\nb;x;1396860699277\n")
    res = CliRunner().invoke(app, ["replay", str(f), "--columns", "user=SessionId,item=ItemId,ts=Time", "-t", f"embedded:{tmp_path / 'log'}"])
    assert res.exit_code == 0, res.output
    assert "3 events, 2 users, 2 items" in res.output
