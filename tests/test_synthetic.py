"""The synthetic livestream world: determinism, exact sizes, consistency with availability, ground truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from streams.batch import COLUMNS, EventBatch
from streams.datasets.synthetic import SyntheticConfig, generate
from streams.datasets.twitch import availability_stats
from streams.schema import EventKind


@pytest.fixture(scope="module")
def world():
    return generate(SyntheticConfig(events=60_000, seed=7))


def test_same_config_same_frame() -> None:
    cfg = SyntheticConfig(events=5_000, seed=11, impressions=3)
    a, b = generate(cfg), generate(cfg)
    pd.testing.assert_frame_equal(a.events, b.events)
    pd.testing.assert_frame_equal(a.availability, b.availability)
    np.testing.assert_array_equal(a.meta["user_taste"], b.meta["user_taste"])
    c = generate(SyntheticConfig(events=5_000, seed=12, impressions=3))
    assert not a.events[["user_id", "item_id"]].equals(c.events[["user_id", "item_id"]])


@pytest.mark.parametrize("events", [1, 1_000, 7_777, 100_000])
def test_exact_sizes_and_canonical_table(events: int) -> None:
    log = generate(SyntheticConfig(events=events, seed=1))
    ev = log.events
    assert len(ev) == events
    assert list(ev.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert all(ev[c].dtype == dt for c, dt in COLUMNS.items())
    assert (np.diff(ev.ts_ms.to_numpy()) >= 0).all()
    assert ev.event_id.to_numpy().tolist() == list(range(events))
    _, bad = EventBatch.from_frame(ev).validate()
    assert bad == []


def test_every_event_has_its_stream_live(world) -> None:
    assert availability_stats(world)["events_item_live"] == 1.0
    a = world.availability
    assert (a.end_ms > a.start_ms).all()
    # intervals are merged: no overlap within a streamer
    a = a.sort_values(["item_id", "start_ms"])
    same = a.item_id.to_numpy()[1:] == a.item_id.to_numpy()[:-1]
    assert (a.start_ms.to_numpy()[1:][same] > a.end_ms.to_numpy()[:-1][same]).all()
    # streams come and go: the live set changes over the day
    day = 86_400_000
    counts = [len(world.live_at(t)) for t in range(day * 3, day * 4, day // 12)]
    assert max(counts) > min(counts)


def test_enter_then_watch_per_user(world) -> None:
    ev = world.events
    kinds = ev.kind.to_numpy()
    assert set(np.unique(kinds)) == {int(EventKind.LIVE_ENTER), int(EventKind.WATCH)}
    for _, g in ev.groupby("user_id"):
        k = g.kind.to_numpy()
        full = k[: len(k) - len(k) % 2]
        assert (full[0::2] == int(EventKind.LIVE_ENTER)).all() and (full[1::2] == int(EventKind.WATCH)).all()
        assert (g.item_id.to_numpy()[0:-1:2] == g.item_id.to_numpy()[1::2]).all()
    dwell = ev.value[ev.kind == int(EventKind.WATCH)]
    assert (dwell >= 0).all() and dwell.median() > 60


def test_impressions_and_click() -> None:
    log = generate(SyntheticConfig(events=6_000, seed=2, impressions=4))
    k = log.events.kind.value_counts().to_dict()
    # 7 events per action; the log is cut to exactly 6,000 events, inside the last action
    assert abs(k[int(EventKind.IMPRESSION)] - 4 * k[int(EventKind.CLICK)]) <= 4
    assert k[int(EventKind.CLICK)] - 1 <= k[int(EventKind.WATCH)] <= k[int(EventKind.LIVE_ENTER)] <= k[int(EventKind.CLICK)]
    imp = log.events[log.events.kind == int(EventKind.IMPRESSION)]
    assert set(imp.value.unique()) == {0.0, 1.0, 2.0, 3.0}


def test_ground_truth_and_habits(world) -> None:
    m = world.meta
    cfg = SyntheticConfig(events=60_000, seed=7)
    assert m["user_taste"].shape == (cfg.n_users(), cfg.dim)
    assert m["item_vectors"].shape == (cfg.n_items(), cfg.dim)
    assert (world.items.category.to_numpy() == m["item_category"]).all()
    assert m["popularity_daily"].shape[0] == cfg.n_items()
    enters = world.events[world.events.kind == int(EventKind.LIVE_ENTER)]
    # repeat consumption (Twitch shows ~2.8 visits per user-streamer pair)
    assert len(enters) / len(enters.drop_duplicates(["user_id", "item_id"])) > 1.5
    # taste drives choice: users pick their favourite category far above chance
    fav = m["user_category"][enters.user_id.to_numpy()]
    cat = m["item_category"][enters.item_id.to_numpy()]
    before = enters.ts_ms.to_numpy() < m["shift"]["ts_ms"]
    assert (fav == cat)[before].mean() > 3.0 / cfg.categories


def test_taste_shift_is_in_the_log(world) -> None:
    shift = world.meta["shift"]
    cfg = SyntheticConfig(events=60_000, seed=7)
    assert len(shift["users"]) == round(cfg.shift_fraction * cfg.n_users())
    assert (shift["old_category"] != shift["new_category"]).all()
    enters = world.events[world.events.kind == int(EventKind.LIVE_ENTER)]
    moved = enters[np.isin(enters.user_id, shift["users"])]
    new_cat = dict(zip(shift["users"].tolist(), shift["new_category"].tolist()))
    in_new = world.meta["item_category"][moved.item_id.to_numpy()] == moved.user_id.map(new_cat).to_numpy()
    after = moved.ts_ms.to_numpy() >= shift["ts_ms"]
    assert in_new[after].mean() > in_new[~after].mean() + 0.1


def test_bad_configs() -> None:
    with pytest.raises(ValueError, match="events"):
        generate(SyntheticConfig(events=0))
    with pytest.raises(ValueError, match="shift_fraction"):
        generate(SyntheticConfig(shift_fraction=1.5))
    with pytest.raises(ValueError, match="impressions"):
        generate(SyntheticConfig(impressions=30, candidates=5))


@pytest.mark.slow
def test_one_million_events_is_quick() -> None:
    import time

    t = time.perf_counter()
    log = generate(SyntheticConfig(events=1_000_000, seed=0))
    assert len(log) == 1_000_000
    assert time.perf_counter() - t < 30
