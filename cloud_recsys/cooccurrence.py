"""Item-to-item co-occurrence: which items people consume right after (and before) an item.

The simple recommender practitioners reach for first, and a strong one (Ludewig and
Jannach's session-kNN family; in Transformers4Rec's own table V-SkNN is within 2% of
GRU4Rec). Counts are kept in both directions: ``forward[a][b]`` is how often ``b`` came
within ``window`` positives after ``a`` in the same session (weighted 1/distance),
``backward`` the same reversed. A query is the recent items of a session, most recent
weighted most; every score is a conditional frequency ``count(a -> b) / count(a -> *)``, so
a popular item does not win by volume alone.

Neighbour lists are cached per item and rebuilt lazily when its counts change, so a
query touches at most ``neighbours`` entries per session item.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Sequence

import numpy as np


class ItemToItem:
    """Online directional co-occurrence counts between raw item ids.

    Args:
        window: how many of a user's previous positives each new positive is paired with.
        session_gap_ms: previous positives older than this (before the new one) are not paired.
        neighbours: per item, the best this-many neighbours kept for queries.
        max_users: most users whose last items are remembered (oldest forgotten first).
    """

    def __init__(self, window: int = 3, session_gap_ms: int = 30 * 60_000, neighbours: int = 100, max_users: int = 1_000_000) -> None:
        if window < 1 or neighbours < 1 or max_users < 1:
            raise ValueError("window, neighbours and max_users must be positive")
        self.window = int(window)
        self.session_gap_ms = int(session_gap_ms)
        self.neighbours = int(neighbours)
        self.max_users = int(max_users)
        self.forward: dict[int, dict[int, float]] = {}
        self.backward: dict[int, dict[int, float]] = {}
        self._last: dict[int, deque[tuple[int, int]]] = {}
        self._cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.forward)

    def update(self, users: np.ndarray, items: np.ndarray, ts_ms: np.ndarray) -> None:
        """Count time-ordered positives (user, item, time)."""
        for u, i, t in zip(np.asarray(users).tolist(), np.asarray(items).tolist(), np.asarray(ts_ms).tolist()):
            last = self._last.get(u)
            if last is None:
                if len(self._last) >= self.max_users:
                    self._last.pop(next(iter(self._last)))
                last = self._last[u] = deque(maxlen=self.window)
            elif last and t - last[-1][1] > self.session_gap_ms:
                last.clear()
            for d, (p, _) in enumerate(reversed(last), start=1):
                if p == i:
                    continue
                w = 1.0 / d
                row = self.forward.setdefault(p, {})
                row[i] = row.get(i, 0.0) + w
                col = self.backward.setdefault(i, {})
                col[p] = col.get(p, 0.0) + w
                self._cache.pop((0, p), None)
                self._cache.pop((1, i), None)
            last.append((i, t))

    def neighbours_of(self, item: int, direction: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(item ids, conditional frequencies) of ``item``'s best neighbours; 0 = after, 1 = before."""
        key = (direction, int(item))
        hit = self._cache.get(key)
        if hit is None:
            row = (self.forward if direction == 0 else self.backward).get(int(item))
            if not row:
                hit = (np.zeros(0, np.int64), np.zeros(0, np.float64))
            else:
                ids = np.fromiter(row.keys(), dtype=np.int64, count=len(row))
                sc = np.fromiter(row.values(), dtype=np.float64, count=len(row))
                sc = sc / sc.sum()
                if len(ids) > self.neighbours:
                    top = np.argpartition(-sc, self.neighbours - 1)[: self.neighbours]
                    ids, sc = ids[top], sc[top]
                order = np.argsort(ids)  # by id: a one-item query is its own sorted result
                hit = (ids[order], sc[order])
            self._cache[key] = hit
        return hit

    def scores(self, recent: np.ndarray, direction: int = 0, query_len: int = 3) -> tuple[np.ndarray, np.ndarray]:
        """(item ids, scores) for a session (item ids, oldest first): the last ``query_len``
        distinct items' neighbour frequencies, the r-th most recent weighted 1/r, summed per item."""
        ids, sc, _ = self.scores_flat([recent], direction, query_len)
        return ids, sc

    def scores_many(self, sessions: Sequence[np.ndarray], direction: int = 0, query_len: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
        """``scores`` for many sessions at once, bit for bit: one sort and one ``bincount``
        for the batch (each (session, item) bin sums its terms in the order ``scores`` does)."""
        ids, sc, bounds = self.scores_flat(sessions, direction, query_len)
        return [(ids[a:b], sc[a:b]) if b > a else _EMPTY for a, b in zip(bounds[:-1], bounds[1:])]

    def scores_flat(
        self, sessions: Sequence[np.ndarray], direction: int = 0, query_len: int = 3, distinct: list[list[int]] | None = None
    ) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """``scores_many`` as one (ids, scores) pair, session j's at ``bounds[j]:bounds[j + 1]``.

        ``distinct``: ``recent_distinct(sessions, n)`` with n >= ``query_len``, if already at hand."""
        if distinct is None:
            distinct = recent_distinct(sessions, query_len)
        req: list[int] = []
        parts_i: list[np.ndarray] = []
        rank: list[int] = []
        for j, items in enumerate(distinct):
            for r, it in enumerate(items[:query_len], start=1):
                ids, sc = self.neighbours_of(it, direction)
                if len(ids):
                    parts_i.append(ids)
                    parts_i.append(sc)
                    rank.append(r)
                    req.append(j)
        ids_p, sc_p = parts_i[0::2], parts_i[1::2]
        if sc_p:  # the r-th most recent item's frequencies / r, as scores does (one division for all)
            sc_p = [np.concatenate(sc_p) / np.repeat(np.asarray(rank, np.float64), [len(x) for x in ids_p])]
        return _group_sum_flat(len(sessions), req, ids_p, sc_p)

    def top(self, recent: np.ndarray, k: int, query_len: int = 3) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best (ids, scores) after the session's recent items (forward direction), best first."""
        ids, sc = self.scores(recent, 0, query_len)
        order = np.lexsort((ids, -sc))[:k]
        return ids[order], sc[order]

    def state_dict(self) -> dict[str, Any]:
        return {"forward": self.forward, "backward": self.backward, "last": {u: list(d) for u, d in self._last.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.forward = {int(a): {int(b): float(c) for b, c in row.items()} for a, row in state["forward"].items()}
        self.backward = {int(a): {int(b): float(c) for b, c in row.items()} for a, row in state["backward"].items()}
        self._last = {int(u): deque([(int(i), int(t)) for i, t in v], maxlen=self.window) for u, v in state["last"].items()}
        self._cache = {}


_EMPTY = (np.zeros(0, np.int64), np.zeros(0, np.float64))


def recent_distinct(sessions: Sequence[np.ndarray], n: int) -> list[list[int]]:
    """Per session (item ids, oldest first): its ``n`` most recent distinct items, most recent first."""
    out = []
    for recent in sessions:
        q: list[int] = []
        for it in reversed(np.asarray(recent, dtype=np.int64).tolist()):
            if it not in q:
                q.append(it)
                if len(q) >= n:
                    break
        out.append(q)
    return out


def _group_sum_flat(
    n: int, req: Sequence[int] | np.ndarray, parts_i: list[np.ndarray], parts_s: list[np.ndarray], flat: bool = False
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Per group j < n: (sorted unique ids, summed values) of the parts whose ``req`` is j, as one
    (ids, values) pair, group j at ``bounds[j]:bounds[j + 1]``.

    Equals ``np.unique`` + ``np.bincount`` per group: the terms of one (group, id) bin are
    added in the order of the parts, as there. Parts must be in non-decreasing group order.
    ``flat``: ``req`` already gives the group of every id (not of every part)."""
    ids = np.concatenate(parts_i) if parts_i else _EMPTY[0]
    if len(ids) == 0:
        return _EMPTY[0], _EMPTY[1], [0] * (n + 1)
    sc = np.concatenate(parts_s)
    grp = np.asarray(req, np.int64) if flat else np.repeat(np.asarray(req, np.int64), [len(p) for p in parts_i])
    span = int(ids.max()) + 1
    if ids.min() < 0 or n * span >= 2**62:  # keys would not fit: one group at a time
        out_i, out_s, bounds = [], [], [0]
        for j in range(n):
            sel = grp == j
            if sel.any():
                u, inv = np.unique(ids[sel], return_inverse=True)
                out_i.append(u)
                out_s.append(np.bincount(inv, weights=sc[sel]))
            bounds.append(bounds[-1] + (len(out_i[-1]) if sel.any() else 0))
        return np.concatenate(out_i), np.concatenate(out_s), bounds
    uniq, inv = np.unique(grp * span + ids, return_inverse=True)
    total = np.bincount(inv, weights=sc)
    g = uniq // span
    return uniq - g * span, total, np.searchsorted(g, np.arange(n + 1)).tolist()
