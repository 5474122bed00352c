"""Availability: live/offline transitions answered at any time, one implementation for both engines."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cloud_recsys.availability import Availability
from streams.batch import EventBatch
from streams.schema import EventKind


def _transitions() -> EventBatch:
    rows = [  # item 1: live 100..300, item 2: offline from 200, item 3 live from 250; item 9 never mentioned
        (0, 100, -1, 1, 0.0, int(EventKind.STREAM_LIVE)),
        (1, 300, -1, 1, 0.0, int(EventKind.STREAM_OFFLINE)),
        (2, 200, -1, 2, 0.0, int(EventKind.STREAM_OFFLINE)),
        (3, 250, -1, 3, 0.0, int(EventKind.STREAM_LIVE)),
        (4, 260, 7, 3, 0.0, int(EventKind.LIVE_ENTER)),  # not a transition
    ]
    return EventBatch.from_frame(pd.DataFrame(rows, columns=["event_id", "ts_ms", "user_id", "item_id", "value", "kind"]))


def test_apply_counts_transitions_and_answers_the_past() -> None:
    a = Availability()
    assert a.apply(_transitions()) == 4
    items = np.array([1, 2, 3, 9])
    assert a.live_mask(items, 50).tolist() == [False, True, False, True]  # before a first transition: its opposite
    assert a.live_mask(items, 150).tolist() == [True, True, False, True]
    assert a.live_mask(items, 275).tolist() == [True, False, True, True]
    assert a.live_mask(items).tolist() == [False, False, True, True]  # latest state
    for t in (50, 150, 275, 400):
        expected = ~np.isin(items, a.offline(t))
        assert a.live_mask(items, t).tolist() == expected.tolist()


def test_state_dict_round_trip() -> None:
    a = Availability()
    a.apply(_transitions())
    b = Availability()
    b.set([5], False, 10)  # replaced by the load
    b.load_state_dict(a.state_dict())
    for t in (None, 50, 150, 275, 400):
        assert sorted(b.offline(t).tolist()) == sorted(a.offline(t).tolist())
    assert "5" not in b.state_dict() and "1" in b.state_dict()


def test_items_offline_longest_are_compacted_past_max_items() -> None:
    a = Availability(max_items=8, max_gone=16)
    for i in range(40):  # item i: live at 10*i, offline at 10*i + 5
        a.set([i], True, 10 * i)
        a.set([i], False, 10 * i + 5)
    a.set([100], True, 1000)  # live now: never compacted
    assert len(a._ts) <= 8 and 0 < len(a._gone_ids) <= 16 and len(a) <= 24
    assert 30 in a._gone_ids.tolist() and a.live_mask([0], 6).tolist() == [True]  # 0: forgotten, as never mentioned
    recent = np.array([39, 38, 100])
    assert a.live_mask(recent, 391).tolist() == [True, False, False]  # 100 goes live at 1000
    assert a.live_mask(recent, 1001).tolist() == [False, False, True]
    assert a.live_mask(recent).tolist() == [False, False, True]
    assert a.live_mask([30], 301).tolist() == [True] and a.live_mask([30], 306).tolist() == [False]  # compacted: last transition kept
    assert 30 in a.live(301).tolist() and 30 not in a.live(306).tolist() and 30 in a.offline().tolist()
    a.set([30], True, 2000)  # a compacted item comes back
    assert a.live_mask([30]).tolist() == [True] and a.live_mask([30], 306).tolist() == [False]
    b = Availability(max_items=8, max_gone=16)
    b.load_state_dict(a.state_dict())
    for t in (None, 301, 306, 396):
        assert sorted(b.offline(t).tolist()) == sorted(a.offline(t).tolist())
