"""The simple recommenders every strategy must beat, scored on the same points.

They see the user's own history at once (as a device does); what needs other users
(co-occurrence, popularity) is counted once per cloud mini-batch, like the cloud.
Each is one channel of ``cloud_recsys.recommender`` used alone, so nothing is written twice:

* ``popularity``: all-time counts.
* ``trending``: time-decayed popularity; the half-life (1 h, 1 day, 7 days, 30 days) is
  chosen online, at each point the one with the best NDCG@10 on the points before it
  (tuned honestly, on the past only).
* ``item-to-item``: co-occurrence after the user's last 3 items (``ItemToItem``), then trending.
* repeat domains only: ``repeat-last`` (the user's most recent items, newest first; LiveRec's
  recency), ``rep`` (LiveRec's REP: how often the item is in the user's last 16, ties by
  recency) and ``repeat+i2i`` (repeat-last, then item-to-item, then trending).

Lists are filtered as any client would: only live items on livestreams, no consumed item
in feeds without repeats, and not the item the user is on right now (the protocol never
scores a positive that continues the previous one, so the cloud's ranking stage learns
the same from its own training lists).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from cloud_recsys.cooccurrence import ItemToItem
from cloud_recsys.popularity import Popularity

HALF_LIVES_MS: tuple[int, ...] = (3_600_000, 86_400_000, 7 * 86_400_000, 30 * 86_400_000)

DESCRIPTIONS: dict[str, str] = {
    "popularity": "all-time most consumed items",
    "trending": "time-decayed popularity, half-life chosen online on past points",
    "item-to-item": "items consumed right after the user's last 3 items (co-occurrence), then trending",
    "repeat-last": "the user's own most recent items, newest first, then trending",
    "rep": "LiveRec's REP: frequency in the user's last 16 items (ties: most recent), then trending",
    "repeat+i2i": "repeat-last, then item-to-item, then trending",
}


def baseline_names(repeat_domain: bool) -> tuple[str, ...]:
    base = ("popularity", "trending", "item-to-item")
    return base + ("repeat-last", "rep", "repeat+i2i") if repeat_domain else base


def _dedup(parts: list[np.ndarray], k: int, allowed: set[int] | None, exclude: set[int] | None) -> np.ndarray:
    out: list[int] = []
    taken: set[int] = set()
    for p in parts:
        for i in p.tolist():
            if i in taken or (allowed is not None and i not in allowed) or (exclude is not None and i in exclude):
                continue
            taken.add(i)
            out.append(i)
            if len(out) >= k:
                return np.asarray(out, np.int64)
    return np.asarray(out, np.int64)


class Baselines:
    """Every simple baseline, fed by the loop (see module docstring).

    Args:
        repeat_domain: add the repeat baselines.
        k: list length.
        session_gap_ms: co-occurrence pairs positives within a session only.
    """

    def __init__(self, repeat_domain: bool, k: int = 100, session_gap_ms: int = 30 * 60_000) -> None:
        self.names = baseline_names(repeat_domain)
        self.k = k
        self.all_time = Popularity(None)
        self.decayed = [Popularity(h) for h in HALF_LIVES_MS]
        self.decayed_gain = np.zeros(len(HALF_LIVES_MS))
        self.i2i = ItemToItem(3, session_gap_ms)
        self.recent: dict[int, deque[int]] = {}
        self.last: dict[int, tuple[int, int]] = {}
        self.session_gap_ms = session_gap_ms
        self._tops: list[np.ndarray] = []
        self._all_top = np.zeros(0, np.int64)
        self._window_cache = {}

    def ingest(self, users: np.ndarray, items: np.ndarray, ts_ms: np.ndarray) -> None:
        """Count a mini-batch of positives (other users' behaviour reaches baselines per batch)."""
        self.all_time.update(items, ts_ms)
        for p in self.decayed:
            p.update(items, ts_ms)
        self.i2i.update(users, items, ts_ms)

    def start_window(self, depth: int) -> None:
        """Cache each popularity's top ``depth`` for the coming window of points."""
        self._all_top = self.all_time.top(depth)[0]
        self._tops = [p.top(depth)[0] for p in self.decayed]
        self._window_cache: dict[int, list[np.ndarray]] = {}

    def rankings(self, user: int, at_ms: int, allowed: set[int] | None, exclude: set[int] | None) -> dict[str, np.ndarray]:
        """Every baseline's list for ``user`` at ``at_ms``."""
        k = self.k
        last = self.last.get(int(user))
        if last is not None and at_ms - last[1] <= self.session_gap_ms:
            exclude = {last[0]} | (exclude or set())
        out: dict[str, np.ndarray] = {}
        small = exclude is None or len(exclude) <= 1
        key = id(allowed)
        lists = self._window_cache.get(key) if small else None
        if lists is None:  # the popularity lists depend only on what is live (cached per live set within a window)
            lists = [_dedup([t], k + 1, allowed, None if small else exclude) for t in [self._all_top, *self._tops]]
            if small:
                self._window_cache[key] = lists
        if small and exclude:
            lists = [t[~np.isin(t, list(exclude))] for t in lists]
        lists = [t[:k] for t in lists]
        out["popularity"] = lists[0]
        ranked_decays = lists[1:]
        best = int(np.argmax(self.decayed_gain))
        trending = ranked_decays[best]
        out["trending"] = trending
        self._last_decays = ranked_decays
        mine = self.recent.get(int(user))
        hist = np.asarray(list(mine), np.int64) if mine else np.zeros(0, np.int64)
        i2i_ids, _ = self.i2i.top(hist, k * 2) if len(hist) else (np.zeros(0, np.int64), None)
        out["item-to-item"] = _dedup([i2i_ids, trending], k, allowed, exclude)
        if "repeat-last" in self.names:
            newest = _dedup([hist[::-1]], k, allowed, exclude)
            out["repeat-last"] = _dedup([newest, trending], k, allowed, exclude)
            last16 = hist[-16:]
            if len(last16):
                uniq, cnt = np.unique(last16, return_counts=True)
                last_pos = {int(i): j for j, i in enumerate(last16.tolist())}
                order = sorted(uniq.tolist(), key=lambda i: (-cnt[np.searchsorted(uniq, i)], -last_pos[i]))
                rep = np.asarray(order, np.int64)
            else:
                rep = np.zeros(0, np.int64)
            out["rep"] = _dedup([rep, newest, trending], k, allowed, exclude)
            out["repeat+i2i"] = _dedup([newest, i2i_ids, trending], k, allowed, exclude)
        return out

    def learn(self, user: int, item: int, at_ms: int) -> None:
        """After a point: credit each half-life (online choice) and remember the user's item."""
        for j, lst in enumerate(self._last_decays):
            hit = np.flatnonzero(lst[:10] == item)
            if len(hit):
                self.decayed_gain[j] += 1.0 / np.log2(hit[0] + 2.0)
        self.observe(user, item, at_ms)

    def observe(self, user: int, item: int, at_ms: int) -> None:
        d = self.recent.get(int(user))
        if d is None:
            d = self.recent[int(user)] = deque(maxlen=100)
        d.append(int(item))
        self.last[int(user)] = (int(item), int(at_ms))
