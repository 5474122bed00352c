"""Loaders on small hand-made fixtures (tmp_path), plus the real logs in ../shared/data when present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from streams.batch import COLUMNS
from streams.datasets import detect_format, load_source
from streams.datasets.base import EventLog
from streams.datasets.generic import ColumnMapping, load_table
from streams.datasets.movielens import GENRES, load_movielens
from streams.datasets.twitch import STEP_MS, availability_stats, live_intervals, load_twitch
from streams.datasets.yoochoose import load_yoochoose
from streams.schema import POSITIVE_KINDS, EventKind


def _check_canonical(log: EventLog) -> None:
    ev = log.events
    assert list(ev.columns[: len(COLUMNS)]) == list(COLUMNS)
    for name, dt in COLUMNS.items():
        assert ev[name].dtype == dt, name
    assert (np.diff(ev.ts_ms.to_numpy()) >= 0).all()
    assert ev.event_id.is_unique


# -- MovieLens ---------------------------------------------------------------------------------

RATINGS = [(1, 10, 4.0, 1000), (1, 20, 3.5, 900), (2, 10, 5.0, 950), (2, 30, 1.0, 2000)]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _expect_ratings(log: EventLog) -> None:
    _check_canonical(log)
    ev = log.events
    assert len(ev) == 4
    assert ev.ts_ms.tolist() == [900_000, 950_000, 1_000_000, 2_000_000]
    assert ev.user_id.tolist() == [1, 2, 1, 2]
    assert ev.item_id.tolist() == [20, 10, 10, 30]
    assert ev.value.tolist() == [3.5, 5.0, 4.0, 1.0]
    assert (ev.kind == int(EventKind.RATE)).all()
    assert log.availability is None and log.step_ms == 1000
    assert "licence" in log.meta


@pytest.mark.parametrize("header", [True, False])
def test_movielens_csv_with_and_without_header(tmp_path: Path, header: bool) -> None:
    lines = ["userId,movieId,rating,timestamp"] if header else []
    lines += [f"{u},{i},{r},{t}" for u, i, r, t in RATINGS]
    _write(tmp_path / "ratings.csv", "\n".join(lines) + "\n")
    movies = ["movieId,title,genres"] if header else []
    movies += ['10,"Film, The (1999)",Drama|Comedy', "20,Toons (2001),Animation", "30,Nothing (2002),(no genres listed)"]
    _write(tmp_path / "movies.csv", "\n".join(movies) + "\n")
    log = load_movielens(tmp_path)
    _expect_ratings(log)
    items = log.items.set_index("item_id")
    assert items.loc[10, "category"] == GENRES.index("Drama") + 1
    assert items.loc[20, "category"] == GENRES.index("Animation") + 1
    assert items.loc[30, "category"] == 0
    assert items.loc[10, "title"] == "Film, The (1999)"


def test_movielens_dat_double_colon(tmp_path: Path) -> None:
    _write(tmp_path / "ratings.dat", "".join(f"{u}::{i}::{int(r) if r.is_integer() else r}::{t}\n" for u, i, r, t in RATINGS))
    _write(tmp_path / "movies.dat", "10::Film (1999)::Comedy|Drama\n20::Toons (2001)::Animation\n")
    log = load_movielens(tmp_path / "ratings.dat")
    _expect_ratings(log)
    items = log.items.set_index("item_id")
    assert items.loc[10, "category"] == GENRES.index("Comedy") + 1
    assert items.loc[30, "category"] == 0  # rated but not in movies.dat


def test_movielens_100k_tab_and_u_item(tmp_path: Path) -> None:
    _write(tmp_path / "u.data", "".join(f"{u}\t{i}\t{int(r)}\t{t}\n" for u, i, r, t in [(1, 10, 4, 1000), (2, 20, 3, 5)]))
    flags = ["0"] * 19
    flags[5] = "1"  # Comedy in u.item's genre order
    _write(tmp_path / "u.item", "10|Film (1999)|01-Jan-1999||http://x|" + "|".join(flags) + "\n")
    log = load_movielens(tmp_path)
    _check_canonical(log)
    assert log.events.item_id.tolist() == [20, 10]
    assert log.items.set_index("item_id").loc[10, "category"] == GENRES.index("Comedy") + 1


def test_movielens_bad_files(tmp_path: Path) -> None:
    _write(tmp_path / "a" / "ratings.csv", "1,10,4.0,1000\n1,20,four,1001\n")
    with pytest.raises(ValueError, match=r"ratings.csv: line 2, column rating: 'four'"):
        load_movielens(tmp_path / "a")
    _write(tmp_path / "b" / "ratings.csv", "1,10,4.0\n")
    with pytest.raises(ValueError, match="line 1 has 3 fields"):
        load_movielens(tmp_path / "b" / "ratings.csv")
    _write(tmp_path / "c" / "ratings.csv", "")
    with pytest.raises(ValueError, match="empty"):
        load_movielens(tmp_path / "c")
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="no MovieLens ratings file"):
        load_movielens(tmp_path / "d")
    _write(tmp_path / "e" / "ratings.csv", "1,10,4.0,1000\n-1,20,3.0,1001\n")
    with pytest.raises(ValueError, match="line 2, column userId"):
        load_movielens(tmp_path / "e")


# -- Twitch ---------------------------------------------------------------------------------------

TWITCH_SUBSET = """,user_id,streamer_name,start_time,community
7,1,0,10,3
8,1,1,12,4
3,2,0,14,3
4,2,0,30,3
1,3,1,12,4
"""


def test_twitch_subset_order_events_and_availability(tmp_path: Path) -> None:
    path = _write(tmp_path / "tw.csv", TWITCH_SUBSET)
    log = load_twitch(path, live_window_steps=1)
    _check_canonical(log)
    ev = log.events
    # sorted by (start_time, original row index): the two step-12 rows are rows 1 then 8
    assert ev.ts_ms.tolist() == [10 * STEP_MS, 12 * STEP_MS, 12 * STEP_MS, 14 * STEP_MS, 30 * STEP_MS]
    assert ev.user_id.tolist() == [1, 3, 1, 2, 2]
    assert (ev.kind == int(EventKind.LIVE_ENTER)).all()
    assert log.step_ms == STEP_MS
    assert log.items.set_index("item_id").category.to_dict() == {0: 3, 1: 4}
    assert log.meta["live_window"] == "past"
    # past-only (default), streamer 0 watched at 10, 14, 30 with w=1: [10,12), [14,16), [30,32)
    a = log.availability
    got = sorted(zip(a.item_id, a.start_ms // STEP_MS, a.end_ms // STEP_MS))
    assert got == [(0, 10, 12), (0, 14, 16), (0, 30, 32), (1, 12, 14)]
    assert availability_stats(log)["events_item_live"] == 1.0
    # w=3: [10,14) and [14,18) touch and merge; never earlier than the watch at 10
    a3 = load_twitch(path, live_window_steps=3).availability
    assert sorted(zip(a3.item_id, a3.start_ms // STEP_MS, a3.end_ms // STEP_MS)) == [(0, 10, 18), (0, 30, 34), (1, 12, 16)]
    # the centered window (looks ahead) is still there for comparison: w=1 gives [9,12), [13,16), [29,32)
    c = load_twitch(path, live_window_steps=1, live_window="centered")
    got = sorted(zip(c.availability.item_id, c.availability.start_ms // STEP_MS, c.availability.end_ms // STEP_MS))
    assert got == [(0, 9, 12), (0, 13, 16), (0, 29, 32), (1, 11, 14)]
    assert availability_stats(c)["events_item_live"] == 1.0 and c.meta["live_window"] == "centered"
    c2 = load_twitch(path, live_window_steps=2, live_window="centered").availability
    assert sorted(zip(c2.item_id, c2.start_ms // STEP_MS, c2.end_ms // STEP_MS))[:2] == [(0, 8, 17), (0, 28, 33)]


def _assert_past_only(log: EventLog, w: int) -> None:
    """Live at t <=> someone started watching within the last w steps (brute force over every step)."""
    ev = log.events
    starts = ev[ev.kind == int(EventKind.LIVE_ENTER)]
    first = starts.groupby("item_id").ts_ms.min()
    a = log.availability
    assert (a.start_ms.to_numpy() >= first.reindex(a.item_id).to_numpy()).all(), "an item live before its first watch"
    step_of = {int(i): set((g.ts_ms // STEP_MS).tolist()) for i, g in starts.groupby("item_id")}
    t_max = int(ev.ts_ms.max() // STEP_MS) + w + 2
    for t in range(t_max):
        live = set(log.live_at(t * STEP_MS).tolist())
        expected = {i for i, steps in step_of.items() if any(t - w <= s <= t for s in steps)}
        assert live == expected, t


@pytest.mark.parametrize("w", [0, 1, 3])
def test_twitch_past_window_never_looks_ahead(tmp_path: Path, w: int) -> None:
    rng = np.random.default_rng(w)
    n = 60
    rows = [f"{r},{rng.integers(5)},{rng.integers(6)},{rng.integers(40)},0" for r in range(n)]
    path = _write(tmp_path / "tw.csv", ",user_id,streamer_name,start_time,community\n" + "\n".join(rows) + "\n")
    log = load_twitch(path, live_window_steps=w)
    _assert_past_only(log, w)
    assert availability_stats(log)["events_item_live"] == 1.0
    if w:  # the centered window does look ahead: some streamer is live before its first watch
        c = load_twitch(path, live_window_steps=w, live_window="centered")
        first = c.events.groupby("item_id").ts_ms.min()
        assert (c.availability.start_ms.to_numpy() < first.reindex(c.availability.item_id).to_numpy()).any()


def test_live_intervals_merges_touching_and_nested() -> None:
    out = live_intervals(np.array([5, 5, 5, 5, 6]), np.array([0, 2, 3, 20, 0]), np.array([4, 2, 9, 20, 0]), 0)
    assert list(zip(out.item_id, out.start_step, out.end_step)) == [(5, 0, 10), (5, 20, 21), (6, 0, 1)]
    assert len(live_intervals(np.array([], int), np.array([], int), np.array([], int), 2)) == 0


def test_twitch_100k_layout_with_stops_and_names(tmp_path: Path) -> None:
    path = _write(tmp_path / "100k_a.csv", "1,900,alice,5,8\n1,901,bob,8,9\n2,902,alice,6,7\n")
    log = load_twitch(path, live_window_steps=0)
    _check_canonical(log)
    ev = log.events
    kinds = ev.kind.tolist()
    assert kinds.count(int(EventKind.LIVE_ENTER)) == 3 and kinds.count(int(EventKind.LIVE_LEAVE)) == 3
    # at step 8 user 1 leaves alice before entering bob
    at8 = ev[ev.ts_ms == 8 * STEP_MS]
    assert at8.kind.tolist() == [int(EventKind.LIVE_LEAVE), int(EventKind.LIVE_ENTER)]
    leave = ev[(ev.kind == int(EventKind.LIVE_LEAVE)) & (ev.user_id == 1) & (ev.ts_ms == 8 * STEP_MS)]
    assert float(leave.value.iloc[0]) == 3 * 600.0
    names = log.items.set_index("item_id")["name"].to_dict()
    assert names == {0: "alice", 1: "bob"}
    a = log.availability
    assert sorted(zip(a.item_id, a.start_ms // STEP_MS, a.end_ms // STEP_MS)) == [(0, 5, 9), (1, 8, 10)]
    assert availability_stats(log)["events_item_live"] == 1.0
    # with stops, past-only w=1 runs from the start to one step after the stop
    a1 = load_twitch(path, live_window_steps=1).availability
    assert sorted(zip(a1.item_id, a1.start_ms // STEP_MS, a1.end_ms // STEP_MS)) == [(0, 5, 10), (1, 8, 11)]


def test_twitch_bad_files(tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.csv", ",user_id,streamer_name,start_time,community\n0,1,2,x,3\n")
    with pytest.raises(ValueError, match=r"bad.csv: line 2, column start"):
        load_twitch(bad)
    with pytest.raises(ValueError, match="missing column"):
        load_twitch(_write(tmp_path / "m.csv", "user_id,community\n1,2\n"))
    with pytest.raises(ValueError, match="stop 4 < start"):
        load_twitch(_write(tmp_path / "s.csv", "1,900,a,5,4\n"))
    with pytest.raises(ValueError, match="expected a header"):
        load_twitch(_write(tmp_path / "f.csv", "1,2,3\n"))
    with pytest.raises(ValueError, match="live_window_steps"):
        load_twitch(tmp_path / "m.csv", live_window_steps=-1)
    with pytest.raises(ValueError, match="live_window must be one of"):
        load_twitch(tmp_path / "m.csv", live_window="future")  # type: ignore[arg-type]


# -- YOOCHOOSE --------------------------------------------------------------------------------------

YOOCHOOSE_TRAIN = """SessionId\tItemId\tTime
3\t214716935\t1396437466.94
3\t214832672\t1396438212.318
5\t214716935\t1396413533.104
5\t643078800\t1396413545.8
"""
YOOCHOOSE_TEST = "SessionId\tItemId\tTime\n9\t214536502\t1396860669.277\n"


def test_yoochoose_file_sessions_items_and_ms(tmp_path: Path) -> None:
    path = _write(tmp_path / "clicks_train_full.txt", YOOCHOOSE_TRAIN)
    log = load_yoochoose(path)
    _check_canonical(log)
    ev = log.events
    assert ev.ts_ms.tolist() == [1396413533104, 1396413545800, 1396437466940, 1396438212318]
    assert ev.user_id.tolist() == [5, 5, 3, 3]
    assert ev.item_id.tolist() == [214716935, 643078800, 214716935, 214832672]
    assert (ev.kind == int(EventKind.CLICK)).all() and EventKind.CLICK in POSITIVE_KINDS
    assert log.n_users == 2 and log.n_items == 3 and log.availability is None
    assert log.items.item_id.tolist() == [214716935, 214832672, 643078800]
    assert detect_format(path) == "yoochoose"
    assert load_source(path).name == "yoochoose"


def test_yoochoose_folder_reads_train_full_and_test(tmp_path: Path) -> None:
    folder = tmp_path / "yc"
    _write(folder / "clicks_test.txt", YOOCHOOSE_TEST)
    _write(folder / "clicks_train_full.txt", YOOCHOOSE_TRAIN)
    _write(folder / "clicks_train_tr.txt", YOOCHOOSE_TRAIN)  # a split of train_full: not read twice
    _write(folder / "SOURCE.txt", "where it came from\n")
    assert detect_format(folder) == "yoochoose"
    log = load_source(folder)
    _check_canonical(log)
    assert len(log) == 5 and log.events.user_id.tolist()[-1] == 9  # the test day comes last
    assert log.meta["files"] == ["clicks_train_full.txt", "clicks_test.txt"]
    assert load_source("yoochoose", path=folder).n_users == 3


def test_yoochoose_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"bad.txt: line 3, column Time: 'soon'"):
        load_yoochoose(_write(tmp_path / "bad.txt", "SessionId\tItemId\tTime\n1\t2\t3.5\n1\t2\tsoon\n"))
    with pytest.raises(ValueError, match="line 2, column ItemId"):
        load_yoochoose(_write(tmp_path / "neg.txt", "SessionId\tItemId\tTime\n1\t-2\t3.5\n"))
    with pytest.raises(ValueError, match="not the tab-separated header"):
        load_yoochoose(_write(tmp_path / "h.txt", "SessionId,ItemId,Time\n1,2,3\n"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="_train_full.txt"):
        load_yoochoose(tmp_path / "empty")


# -- generic tables -------------------------------------------------------------------------------


def _table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "uid": [3, 1, 2, 1],
            "vid": [100, 101, 100, 102],
            "t": [2000, 1000, 1000, 3000],
            "action": ["Click", "WATCH", " watch", "view"],
            "secs": [0.0, 12.5, 3.0, 7.0],
            "cat": [1, 2, 1, 3],
        }
    )


def test_generic_csv_and_parquet(tmp_path: Path) -> None:
    frame = _table()
    frame.to_csv(tmp_path / "log.csv", index=False)
    frame.to_parquet(tmp_path / "log.parquet")
    mapping = ColumnMapping(
        user="uid", item="vid", timestamp="t", unit="ms", event_type="action", value="secs", category="cat",
        kind_aliases={"view": "watch"},
    )  # fmt: skip
    for path in (tmp_path / "log.csv", tmp_path / "log.parquet"):
        log = load_table(path, mapping)
        _check_canonical(log)
        ev = log.events
        assert ev.ts_ms.tolist() == [1000, 1000, 2000, 3000]
        assert ev.user_id.tolist() == [1, 2, 3, 1]  # stable: file order breaks the tie at 1000
        assert ev.kind.tolist() == [int(EventKind.WATCH), int(EventKind.WATCH), int(EventKind.CLICK), int(EventKind.WATCH)]
        assert ev.value.tolist() == [12.5, 3.0, 0.0, 7.0]
        assert log.items.set_index("item_id").category.to_dict() == {100: 1, 101: 2, 102: 3}


def test_generic_units_default_kind_and_factorize(tmp_path: Path) -> None:
    pd.DataFrame({"user_id": [1, 2], "item_id": [5, 6], "timestamp": [3, 1]}).to_csv(tmp_path / "s.csv", index=False)
    log = load_table(tmp_path / "s.csv", ColumnMapping(unit="step", step_ms=600_000, default_kind="like"))
    assert log.events.ts_ms.tolist() == [600_000, 1_800_000]
    assert (log.events.kind == int(EventKind.LIKE)).all() and log.step_ms == 600_000
    assert load_table(tmp_path / "s.csv").events.ts_ms.tolist() == [1000, 3000]
    pd.DataFrame({"u": ["ann", "bo"], "i": ["x", "y"], "when": ["2024-01-01T00:00:01Z", "2024-01-01T00:00:00Z"]}).to_csv(
        tmp_path / "d.csv", index=False
    )
    m = ColumnMapping(user="u", item="i", timestamp="when", unit="datetime", factorize_ids=True)
    log = load_table(tmp_path / "d.csv", m)
    assert log.events.ts_ms.tolist() == [1704067200000, 1704067201000]
    assert log.events.user_id.tolist() == [1, 0]
    assert list(log.meta["u_vocabulary"]) == ["ann", "bo"]
    with pytest.raises(ValueError, match="not an integer id .*factorize_ids"):
        load_table(tmp_path / "d.csv", ColumnMapping(user="u", item="i", timestamp="when", unit="datetime"))


def test_generic_bad_tables(tmp_path: Path) -> None:
    frame = _table()
    frame.to_csv(tmp_path / "log.csv", index=False)
    with pytest.raises(ValueError, match=r"unknown event type\(s\) \['view'\]"):
        load_table(tmp_path / "log.csv", ColumnMapping(user="uid", item="vid", timestamp="t", event_type="action"))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['user_id'\]"):
        load_table(tmp_path / "log.csv", ColumnMapping(item="vid", timestamp="t"))
    frame.assign(t=["1", "2", "soon", "4"]).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ValueError, match=r"row 2, column t: 'soon'"):
        load_table(tmp_path / "t.csv", ColumnMapping(user="uid", item="vid", timestamp="t"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="broken.parquet"):
        load_table(tmp_path / "broken.parquet", ColumnMapping())
    with pytest.raises(ValueError, match="unknown event kind"):
        load_table(tmp_path / "log.csv", ColumnMapping(user="uid", item="vid", timestamp="t", default_kind="poke"))
    with pytest.raises(ValueError, match="no such file"):
        load_table(tmp_path / "nope.csv")


# -- load_source ----------------------------------------------------------------------------------


def test_load_source_detects_formats(tmp_path: Path) -> None:
    _write(tmp_path / "ml" / "ratings.csv", "1,10,4.0,1000\n")
    _write(tmp_path / "tw.csv", TWITCH_SUBSET)
    _table().to_parquet(tmp_path / "t.parquet")
    assert detect_format(tmp_path / "ml") == "movielens"
    assert detect_format(tmp_path / "tw.csv") == "twitch"
    assert detect_format(tmp_path / "t.parquet") == "table"
    assert load_source(str(tmp_path / "ml")).name == "movielens"
    assert load_source(tmp_path / "tw.csv", live_window_steps=0).name == "twitch"
    log = load_source(str(tmp_path / "t.parquet"), mapping=ColumnMapping(user="uid", item="vid", timestamp="t"))
    assert len(log) == 4
    syn = load_source("synthetic", events=500, seed=3)
    assert len(syn) == 500 and syn.name == "synthetic"
    with pytest.raises(ValueError, match="unknown source 'nonsense'"):
        load_source("nonsense")
    with pytest.raises(ValueError, match="unknown synthetic option"):
        load_source("synthetic", evnts=5)
    assert load_source("movielens", path=tmp_path / "ml").n_users == 1


# -- the real logs (../shared/data) -----------------------------------------------------------------


@pytest.mark.shared_data
def test_shared_movielens(shared_data: Path) -> None:
    log = load_source("movielens", path=shared_data / "movielens-latest-small")
    _check_canonical(log)
    assert len(log) == 100_023
    assert log.n_users == 706
    assert log.n_items == 8_552
    assert log.events.value.between(0.5, 5.0).all()
    assert (log.items.category > 0).mean() > 0.99


@pytest.mark.shared_data
def test_shared_twitch(shared_data: Path) -> None:
    log = load_source("twitch", path=shared_data / "twitch-livestream-2000u")
    _check_canonical(log)
    assert len(log) == 105_745
    assert log.n_users == 2_000
    assert log.n_items == 1_742
    stats = availability_stats(log)
    assert stats["events_item_live"] == 1.0
    assert 10 < stats["mean_live_per_step"] < 500
    assert log.events.ts_ms.max() == 6147 * STEP_MS
    assert (log.availability.start_ms >= 0).all()
    assert log.meta["live_window"] == "past"
    enter = log.events[log.events.kind == int(EventKind.LIVE_ENTER)]
    first = enter.groupby("item_id").ts_ms.min().reindex(log.availability.item_id).to_numpy()
    assert (log.availability.start_ms.to_numpy() >= first).all()  # no streamer live before anyone watched it


@pytest.mark.shared_data
def test_shared_yoochoose(shared_data: Path) -> None:
    folder = shared_data / "yoochoose-clicks-100k"
    assert detect_format(folder) == "yoochoose"
    log = load_source("yoochoose", path=folder)
    _check_canonical(log)
    assert len(log) == 83_846
    assert log.n_users == 21_210
    assert log.meta["rows_per_file"] == {"yoochoose-clicks-100k_train_full.txt": 70_278, "yoochoose-clicks-100k_test.txt": 13_568}
    assert (log.events.kind == int(EventKind.CLICK)).all()
    assert log.events.item_id.min() > 2 * 10**8
    test = load_source(folder / "yoochoose-clicks-100k_test.txt")
    assert len(test) == 13_568 and test.events.ts_ms.min() >= log.events.ts_ms.iloc[70_278 - 1]
