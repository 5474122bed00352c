"""Which items are live when: per-item live/offline transitions, answerable at any time.

Why transitions and not a live set: replays and late consumers ask about the past
(``at_ms``), and availability may be consumed ahead of the interactions it applies to.
Items never mentioned by a transition are always available (feeds, movies).

Bounded memory: at most ``max_items`` items keep their transition lists. Beyond that, the
items offline the longest are compacted to their last transition (two int64 in numpy
arrays: offline from then on, live before it, the same answer a one-transition history
gives), and at most ``max_gone`` compacted items are kept; past that the oldest are
forgotten and count as never mentioned. Live and recently offline items are never
compacted, so answers about them are exact.
"""

from __future__ import annotations

import bisect
import threading
from typing import Any, Sequence

import numpy as np

from streams.batch import EventBatch
from streams.schema import EventKind


class Availability:
    """Live/offline transitions per item, answerable at any time.

    Args:
        max_transitions: transitions kept per item (the oldest are dropped).
        max_items: items with full transition lists (see the module's bounded memory note).
        max_gone: items compacted to their last offline time.
    """

    def __init__(self, max_transitions: int = 64, max_items: int = 1_000_000, max_gone: int = 4_000_000) -> None:
        self.max_transitions = max_transitions
        self.max_items = int(max_items)
        self.max_gone = int(max_gone)
        self._ts: dict[int, list[int]] = {}
        self._live: dict[int, list[bool]] = {}
        self._offline_now: set[int] = set()
        self._gone_ids = np.empty(0, np.int64)  # sorted; offline from _gone_ts on
        self._gone_ts = np.empty(0, np.int64)
        self._lock = threading.Lock()

    def _compact(self) -> None:
        """Move the items offline the longest to the gone arrays until ``max_items`` remain."""
        if len(self._ts) <= self.max_items:
            return
        extra = len(self._ts) - self.max_items * 7 // 8  # some slack: compaction sorts, so not every call
        oldest = sorted(self._offline_now, key=lambda i: self._ts[i][-1])[:extra]
        if not oldest:
            return  # all live: nothing is safe to compact
        ids = np.asarray(oldest, np.int64)
        ts = np.asarray([self._ts[i][-1] for i in oldest], np.int64)
        for i in oldest:
            del self._ts[i], self._live[i]
            self._offline_now.discard(i)
        all_ids, all_ts = np.concatenate([self._gone_ids, ids]), np.concatenate([self._gone_ts, ts])
        if len(all_ids) > self.max_gone:  # forget the longest gone
            keep = np.argsort(all_ts, kind="stable")[-self.max_gone :]
            all_ids, all_ts = all_ids[keep], all_ts[keep]
        order = np.argsort(all_ids, kind="stable")
        self._gone_ids, self._gone_ts = all_ids[order], all_ts[order]

    def _gone_at(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mask of ``ids`` that are compacted, their offline-from times)."""
        if not len(self._gone_ids) or not len(ids):
            return np.zeros(len(ids), bool), np.zeros(len(ids), np.int64)
        pos = np.minimum(np.searchsorted(self._gone_ids, ids), len(self._gone_ids) - 1)
        hit = self._gone_ids[pos] == ids
        return hit, np.where(hit, self._gone_ts[pos], 0)

    def _revive(self, item: int) -> None:
        """Give a compacted item its one-transition history back (it has a new transition)."""
        hit, ts = self._gone_at(np.array([item], np.int64))
        if hit[0]:
            keep = self._gone_ids != item
            self._gone_ids, self._gone_ts = self._gone_ids[keep], self._gone_ts[keep]
            self._ts[item], self._live[item] = [int(ts[0])], [False]

    def set(self, item_ids: Sequence[int] | np.ndarray, live: bool, ts_ms: int | Sequence[int] | np.ndarray | None = None) -> None:
        """Record that items went live/offline at ``ts_ms`` (default: now, i.e. after every transition)."""
        ids = np.asarray(item_ids, dtype=np.int64).ravel()
        ts = np.broadcast_to(np.asarray(2**62 - 1 if ts_ms is None else ts_ms, dtype=np.int64), ids.shape)
        with self._lock:
            for item, t in zip(ids.tolist(), ts.tolist()):
                if item not in self._ts and len(self._gone_ids):
                    self._revive(item)
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
            self._compact()

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
                now = np.fromiter(self._offline_now, dtype=np.int64, count=len(self._offline_now))
                return np.concatenate([now, self._gone_ids])
            tracked = np.asarray([item for item in self._ts if not self._live_at(item, at_ms)], dtype=np.int64)
            return np.concatenate([tracked, self._gone_ids[self._gone_ts <= at_ms]])

    def live(self, at_ms: int) -> np.ndarray:
        """Ids (among items with transitions) available at ``at_ms``, sorted."""
        with self._lock:
            tracked = np.asarray(sorted(item for item in self._ts if self._live_at(item, at_ms)), dtype=np.int64)
            if not len(self._gone_ids):
                return tracked
            return np.union1d(tracked, self._gone_ids[self._gone_ts > at_ms])

    def live_mask(self, item_ids: Sequence[int] | np.ndarray, at_ms: int | None = None) -> np.ndarray:
        """Which of ``item_ids`` are available at ``at_ms`` (None: the latest state).

        Items never seen in a transition are available (feeds). Costs one lookup per given
        item, where ``offline(at_ms)`` visits every item with transitions.
        """
        ids = np.asarray(item_ids, dtype=np.int64).ravel()
        with self._lock:
            gone, gone_ts = self._gone_at(ids)
            if at_ms is None:
                if not self._offline_now:
                    return ~gone
                return ~np.isin(ids, np.fromiter(self._offline_now, dtype=np.int64, count=len(self._offline_now))) & ~gone
            live = np.fromiter((item not in self._ts or self._live_at(item, at_ms) for item in ids.tolist()), dtype=bool, count=len(ids))
            return live & ~(gone & (gone_ts <= at_ms))

    def state_dict(self) -> dict[str, list[list[Any]]]:
        """``{item: [transition times, live flags]}`` (JSON-ready); compacted items under ``"gone"``."""
        with self._lock:
            state = {str(i): [[int(t) for t in self._ts[i]], [bool(x) for x in self._live[i]]] for i in self._ts}
            if len(self._gone_ids):
                state["gone"] = [self._gone_ids.tolist(), self._gone_ts.tolist()]
            return state

    def load_state_dict(self, state: dict[str, list[list[Any]]]) -> None:
        """Replace the transitions with ``state`` (from ``state_dict``)."""
        with self._lock:
            self._ts, self._live, self._offline_now = {}, {}, set()
            gone = state.get("gone", [[], []])
            self._gone_ids, self._gone_ts = np.asarray(gone[0], np.int64), np.asarray(gone[1], np.int64)
        for item, (tss, lives) in state.items():
            if item == "gone":
                continue
            for t, live in zip(tss, lives):
                self.set([int(item)], bool(live), int(t))

    def __len__(self) -> int:
        """Items with transitions (compacted ones included)."""
        return len(self._ts) + len(self._gone_ids)
