"""Which items are live when: per-item live/offline transitions, answerable at any time.

Why transitions and not a live set: replays and late consumers ask about the past
(``at_ms``), and availability may be consumed ahead of the interactions it applies to.
Items never mentioned by a transition are always available (feeds, movies).
"""

from __future__ import annotations

import bisect
import threading
from typing import Any, Sequence

import numpy as np

from streams.batch import EventBatch
from streams.schema import EventKind


class Availability:
    """Live/offline transitions per item, answerable at any time."""

    def __init__(self, max_transitions: int = 64) -> None:
        self.max_transitions = max_transitions
        self._ts: dict[int, list[int]] = {}
        self._live: dict[int, list[bool]] = {}
        self._offline_now: set[int] = set()
        self._lock = threading.Lock()

    def set(self, item_ids: Sequence[int] | np.ndarray, live: bool, ts_ms: int | Sequence[int] | np.ndarray | None = None) -> None:
        """Record that items went live/offline at ``ts_ms`` (default: now, i.e. after every transition)."""
        ids = np.asarray(item_ids, dtype=np.int64).ravel()
        ts = np.broadcast_to(np.asarray(2**62 - 1 if ts_ms is None else ts_ms, dtype=np.int64), ids.shape)
        with self._lock:
            for item, t in zip(ids.tolist(), ts.tolist()):
                tss, lv = self._ts.setdefault(item, []), self._live.setdefault(item, [])
                pos = bisect.bisect_right(tss, t)
                tss.insert(pos, t)
                lv.insert(pos, bool(live))
                if len(tss) > self.max_transitions:
                    del tss[0], lv[0]
                if lv[-1]:
                    self._offline_now.discard(item)
                else:
                    self._offline_now.add(item)

    def apply(self, batch: EventBatch) -> int:
        """Apply the STREAM_LIVE/STREAM_OFFLINE rows of ``batch`` at their timestamps; returns rows applied."""
        n = 0
        for kind, live in ((EventKind.STREAM_LIVE, True), (EventKind.STREAM_OFFLINE, False)):
            m = batch.kind == int(kind)
            if m.any():
                self.set(batch.item_id[m], live, batch.ts_ms[m])
                n += int(m.sum())
        return n

    def _live_at(self, item: int, at_ms: int) -> bool:
        tss = self._ts[item]
        pos = bisect.bisect_right(tss, at_ms)
        lv = self._live[item]
        return (not lv[0]) if pos == 0 else lv[pos - 1]  # before the first transition: its opposite

    def offline(self, at_ms: int | None = None) -> np.ndarray:
        """Ids not available at ``at_ms`` (None: the latest state)."""
        with self._lock:
            if at_ms is None:
                return np.fromiter(self._offline_now, dtype=np.int64, count=len(self._offline_now))
            return np.asarray([item for item in self._ts if not self._live_at(item, at_ms)], dtype=np.int64)

    def live(self, at_ms: int) -> np.ndarray:
        """Ids (among items with transitions) available at ``at_ms``, sorted."""
        with self._lock:
            return np.asarray(sorted(item for item in self._ts if self._live_at(item, at_ms)), dtype=np.int64)

    def live_mask(self, item_ids: Sequence[int] | np.ndarray, at_ms: int | None = None) -> np.ndarray:
        """Which of ``item_ids`` are available at ``at_ms`` (None: the latest state).

        Items never seen in a transition are available (feeds). Costs one lookup per given
        item, where ``offline(at_ms)`` visits every item with transitions.
        """
        ids = np.asarray(item_ids, dtype=np.int64).ravel()
        with self._lock:
            if at_ms is None:
                if not self._offline_now:
                    return np.ones(len(ids), dtype=bool)
                return ~np.isin(ids, np.fromiter(self._offline_now, dtype=np.int64, count=len(self._offline_now)))
            return np.fromiter((item not in self._ts or self._live_at(item, at_ms) for item in ids.tolist()), dtype=bool, count=len(ids))

    def state_dict(self) -> dict[str, list[list[Any]]]:
        """``{item: [transition times, live flags]}`` (JSON-ready)."""
        with self._lock:
            return {str(i): [[int(t) for t in self._ts[i]], [bool(x) for x in self._live[i]]] for i in self._ts}

    def load_state_dict(self, state: dict[str, list[list[Any]]]) -> None:
        """Replace the transitions with ``state`` (from ``state_dict``)."""
        with self._lock:
            self._ts, self._live, self._offline_now = {}, {}, set()
        for item, (tss, lives) in state.items():
            for t, live in zip(tss, lives):
                self.set([int(item)], bool(live), int(t))

    def __len__(self) -> int:
        return len(self._ts)
