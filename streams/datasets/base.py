"""The one output every loader produces: a time-sorted event table.

Loaders differ in what they read; they agree on what they give: an
``EventLog`` whose ``events`` frame has the canonical columns of the wire
format (streams/batch.py ``COLUMNS``), sorted by time (stable, so the log's
own order breaks ties), plus optional item side features and livestream
availability.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from streams.batch import COLUMNS, EventBatch

EVENT_COLUMNS: tuple[str, ...] = tuple(COLUMNS)


@dataclass
class EventLog:
    """A replayable interaction log.

    Args:
        name: short source name ("movielens", "twitch", "synthetic", ...).
        events: canonical columns ``event_id, ts_ms, user_id, item_id, value, kind``,
            sorted by ``ts_ms`` (stable). ``event_id`` is unique within the log.
        items: optional item side table with at least ``item_id`` and ``category`` (int).
        availability: optional live intervals ``item_id, start_ms, end_ms`` (end exclusive);
            None means every item is always available (feeds, movies).
        step_ms: the log's time resolution (600_000 for Twitch's 10-minute steps, 1000 for seconds).
        meta: free-form facts about the source (licence, ground truth for synthetic logs, ...).
    """

    name: str
    events: pd.DataFrame
    items: pd.DataFrame | None = None
    availability: pd.DataFrame | None = None
    step_ms: int = 1000
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [c for c in EVENT_COLUMNS if c not in self.events.columns]
        if missing:
            raise ValueError(f"event table lacks columns {missing}")

    def __len__(self) -> int:
        return len(self.events)

    def item_categories(self) -> dict[int, int]:
        """``{item_id: category}`` from the item side table (empty when the log has none):
        the catalogue a cloud may know before any event, in the evaluation and the services."""
        if self.items is None or "category" not in self.items.columns:
            return {}
        return dict(zip(self.items.item_id.astype("int64").tolist(), self.items.category.astype("int64").tolist()))

    @property
    def n_users(self) -> int:
        return int(self.events.loc[self.events.user_id >= 0, "user_id"].nunique())

    @property
    def n_items(self) -> int:
        return int(self.events.item_id.nunique())

    def rows(self, start: int, stop: int) -> "EventLog":
        """Events ``start:stop`` with the same side tables (a slice to replay or a cut log)."""
        return replace(self, events=self.events.iloc[start:stop].reset_index(drop=True))

    def batches(self, size: int) -> "list[EventBatch]":
        """The log as wire batches of at most ``size`` events, in order."""
        whole = EventBatch.from_frame(self.events)
        return [whole.take(np.arange(i, min(i + size, len(whole)))) for i in range(0, len(whole), size)]

    def live_at(self, ts_ms: int) -> np.ndarray:
        """Item ids live at ``ts_ms`` (all items when availability is unknown)."""
        if self.availability is None:
            return np.unique(self.events.item_id.to_numpy())
        a = self.availability
        mask = (a.start_ms.to_numpy() <= ts_ms) & (ts_ms < a.end_ms.to_numpy())
        return np.unique(a.item_id.to_numpy()[mask])


def finalize_events(frame: pd.DataFrame) -> pd.DataFrame:
    """Cast to canonical dtypes, sort stably by time, assign event ids if absent.

    Every loader ends with this, so all logs look the same downstream.
    """
    out = frame.copy()
    if "event_id" not in out.columns:
        out["event_id"] = np.arange(len(out), dtype=np.uint64)
    for name, dt in COLUMNS.items():
        out[name] = out[name].to_numpy().astype(dt, copy=False)
    out = out.sort_values("ts_ms", kind="stable").reset_index(drop=True)
    return out[list(EVENT_COLUMNS) + [c for c in out.columns if c not in EVENT_COLUMNS]]
