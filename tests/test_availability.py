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
