"""The README runs as written: its Python API block and every `tandem` command in its bash blocks
(plus the Makefile's demo job), each at a small size the way a new user would type it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


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


# -- every command in the README --------------------------------------------------------------
def readme_commands() -> list[str]:
    """The `tandem ...` lines of the README's bash blocks (comments and a .venv/bin/ prefix dropped)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            cmd = line.split("#", 1)[0].strip().removeprefix(".venv/bin/")
            if cmd.startswith("tandem "):
                out.append(cmd.removeprefix("tandem "))
            elif cmd == "tandem":
                out.append("")
    return out


def makefile_demo() -> str:
    """The command `make demo` runs (the README's first screen), without the venv prefix."""
    recipe = (ROOT / "Makefile").read_text().split("\ndemo:", 1)[1].splitlines()[1].strip()
    assert recipe.startswith("$(BIN)/tandem "), recipe
    return recipe.removeprefix("$(BIN)/tandem ")


_EVAL = ["--n-boot", "20"]
_DEMO = ["--events", "400", "--limit", "400", "--duration", "60", "--port", "0", "--speed", "max", "--exit-when-done"]
#: README command -> flags appended to run it small (a later flag wins), and what it needs:
#: "data" = the real logs (skips without them, like every shared-data test), "kafka" = the test
#: broker (its address replaces 127.0.0.1:9092), "slow" = a whole demo topology.
SMALL: dict[str, tuple[list[str], set[str]]] = {
    "replay twitch --transport embedded:runs/log": (["--limit", "400"], {"data"}),
    "evaluate --source twitch --strategies all --out runs/twitch": (["--limit", "400", *_EVAL], {"data"}),
    "demo": (_DEMO, {"slow"}),
    "replay synthetic --events 1000000 --transport embedded:runs/log": (["--events", "400"], set()),
    # MovieLens' first events span weeks: at 3600x even 300 take minutes, so the test replays at max
    "replay movielens --transport kafka://127.0.0.1:9092 --speed 3600x": (["--limit", "300", "--speed", "max"], {"data", "kafka"}),
    "replay events.parquet --transport embedded:runs/log": ([], set()),
    "evaluate --source movielens --strategies cloud-only,feature,hybrid --out runs/ml": (["--limit", "400", *_EVAL], {"data"}),
    "evaluate synthetic --events 20000 --strategies cloud-only,feature --save-model runs/models": (["--events", "400", *_EVAL], set()),
    "demo --kafka": (_DEMO, {"slow", "kafka"}),
}
MAKE_DEMO = (["--events", "400", *_EVAL], set())


def test_every_readme_command_is_covered() -> None:
    """A command added to the README must be added to SMALL (and so be run by the test below)."""
    assert sorted(set(readme_commands())) == sorted(SMALL)
    assert makefile_demo().startswith("evaluate ")


def _params() -> list[object]:
    out = [pytest.param(makefile_demo(), *MAKE_DEMO, id="make demo")]
    for cmd, (extra, needs) in SMALL.items():
        marks = [pytest.mark.slow] if "slow" in needs else []
        out.append(pytest.param(cmd, extra, needs, marks=marks, id=cmd or "tandem"))
    return out


def _events_parquet(path: Path) -> None:
    """The generic loader's example file: user_id, item_id, timestamp (seconds)."""
    import pandas as pd

    n = 300
    pd.DataFrame({"user_id": [i % 17 for i in range(n)], "item_id": [i % 23 for i in range(n)], "timestamp": [1_700_000_000 + 60 * i for i in range(n)]}).to_parquet(path)


@pytest.mark.parametrize("cmd, extra, needs", _params())
def test_readme_command_runs(cmd: str, extra: list[str], needs: set[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """Run it from a fresh folder, as typed, plus SMALL's size flags: exit 0 and the outputs it promises."""
    import shlex

    from typer.testing import CliRunner

    from tandem.cli import app

    if "data" in needs:
        monkeypatch.setenv("TANDEM_DATA", str(request.getfixturevalue("shared_data")))
    if "kafka" in needs and "--kafka" not in cmd:
        cmd = cmd.replace("127.0.0.1:9092", request.getfixturevalue("kafka_bootstrap"))
    monkeypatch.chdir(tmp_path)
    _events_parquet(tmp_path / "events.parquet")
    args = shlex.split(cmd) + extra
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, f"tandem {shlex.join(args)}\n{res.output}"
    assert "Traceback" not in res.output
    if args[0] == "evaluate":
        out = tmp_path / args[args.index("--out") + 1] if "--out" in args else tmp_path / "runs" / "evaluate"
        assert (out / "report.html").is_file() and (out / "results.json").is_file()
        assert res.stdout.startswith("Verdict: ")
        if "--save-model" in args:
            from tandem.evaluation.saved import load_saved

            assert set(load_saved(tmp_path / args[args.index("--save-model") + 1]).strategies) >= {"cloud-only", "feature"}
    elif args[0] == "replay":
        assert re.search(r"\d[\d,]* events", res.output), res.output
        if "embedded:runs/log" in cmd:
            assert (tmp_path / "runs" / "log").is_dir()
    elif args[0] == "demo":
        assert "curl 'http://" in res.output and re.search(r"events_applied: 400\b", res.output), res.output
