"""``tandem data fetch``: verified downloads land where ``load_source`` reads them (no network: file:// URLs)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from streams.datasets import SHARED_FOLDERS, load_source
from tandem.cli import app
from tandem.commands import data as data_cmd

RATINGS = "1,10,4.0,964982703\n1,20,3.5,964982800\n2,10,5.0,964983000\n2,30,2.0,964983100\n"


def _local(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sha: str | None = None) -> None:
    """Point the movielens entry at a tiny ratings.csv served from a file:// URL."""
    src = tmp_path / "upstream" / "ratings.csv"
    src.parent.mkdir()
    src.write_text(RATINGS)
    digest = sha or hashlib.sha256(RATINGS.encode()).hexdigest()
    ds = data_cmd.Dataset("movielens-latest-small", (data_cmd.Remote("ratings.csv", src.as_uri(), digest),), "test terms")
    monkeypatch.setitem(data_cmd.DATASETS, "movielens", ds)


def test_folders_match_the_loader() -> None:
    assert {k: d.folder for k, d in data_cmd.DATASETS.items()} == SHARED_FOLDERS


def test_fetch_writes_what_load_source_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _local(monkeypatch, tmp_path)
    dest = tmp_path / "data"
    res = CliRunner().invoke(app, ["data", "fetch", "movielens", "--dest", str(dest)])
    assert res.exit_code == 0, res.output
    assert "1 files verified" in res.stdout
    log = load_source("movielens", path=dest / "movielens-latest-small")
    assert len(log.events) == 4
    monkeypatch.setenv("TANDEM_DATA", str(dest))  # named source, read from the fetched root
    assert len(load_source("movielens").events) == 4
    again = CliRunner().invoke(app, ["data", "fetch", "movielens", "--dest", str(dest)])
    assert again.exit_code == 0 and "downloading" not in again.stderr  # verified copy is kept


def test_checksum_mismatch_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _local(monkeypatch, tmp_path, sha="0" * 64)
    dest = tmp_path / "data"
    res = CliRunner().invoke(app, ["data", "fetch", "movielens", "--dest", str(dest)])
    errors = [line for line in res.stderr.splitlines() if line.startswith("error")]
    assert res.exit_code == 2 and len(errors) == 1 and "checksum mismatch" in errors[0], res.output
    assert not (dest / "movielens-latest-small").exists()


def test_unknown_name_and_missing_data_name_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    res = CliRunner().invoke(app, ["data", "fetch", "twich"])
    assert res.exit_code == 2 and "did you mean 'twitch'" in res.stderr
    monkeypatch.setenv("TANDEM_DATA", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="tandem data fetch yoochoose"):
        load_source("yoochoose")


def test_unreachable_source_exits_2_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gone = data_cmd.Remote("twitch105k.csv", (tmp_path / "missing.csv").as_uri(), "0" * 64)
    monkeypatch.setitem(data_cmd.DATASETS, "twitch", data_cmd.Dataset("twitch-livestream-2000u", (gone,), "t"))
    res = CliRunner().invoke(app, ["data", "fetch", "twitch", "--dest", str(tmp_path / "data")])
    errors = [line for line in res.stderr.splitlines() if line.startswith("error")]
    assert res.exit_code == 2 and len(errors) == 1 and "cannot download" in errors[0], res.output
    assert not (tmp_path / "data" / "twitch-livestream-2000u").exists()
