"""Session-based kNN (V-SkNN, Ludewig and Jannach 2018): items of past sessions that look like this one.

Why beside item-to-item: co-occurrence looks at the last few items only and at what came
right after them; V-SkNN compares the whole recent session (the most recent items weighted
most) with recent past sessions of other users that share an item, then scores each item by
the summed similarity of the neighbour sessions it appears in. In the session-rec
benchmarks it is among the strongest simple methods (within a few percent of GRU4Rec).

Sessions are split per user by inactivity (``session_gap_ms``). Each item keeps the ids of
the last ``sample_size`` sessions that contained it (V-SkNN's recency sample), so a query
touches a bounded number of sessions whatever the log's size; the oldest sessions are
forgotten past ``max_sessions``. A user's own sessions are never its neighbours: its own
items are the repeat channel's job.
"""

from __future__ import annotations

from collections import deque
from itertools import chain
from typing import Any, Sequence

import numpy as np

from cloud_recsys.cooccurrence import _EMPTY, _group_sum_flat, recent_distinct

#: A user id no session has: a query from nobody in particular skips no neighbour.
_NO_USER = int(np.iinfo(np.int64).min)


class SessionKNN:
    """Online V-SkNN over raw item ids.

    Args:
        k: neighbour sessions that vote for items.
        sample_size: most recent sessions remembered per item.
        query_len: distinct most recent items of the query session compared (linear decay).
        session_gap_ms: inactivity that starts a new session for a user.
        max_session_len: distinct items kept per session (the most recent).
        max_sessions: sessions remembered in all (oldest forgotten first).
    """

    def __init__(
        self,
        k: int = 100,
        sample_size: int = 200,
        query_len: int = 10,
        session_gap_ms: int = 30 * 60_000,
        max_session_len: int = 50,
        max_sessions: int = 500_000,
    ) -> None:
        if min(k, sample_size, query_len, max_session_len, max_sessions) < 1:
            raise ValueError("k, sample_size, query_len, max_session_len and max_sessions must be positive")
        self.k = int(k)
        self.sample_size = int(sample_size)
        self.query_len = int(query_len)
        self.session_gap_ms = int(session_gap_ms)
        self.max_session_len = int(max_session_len)
        self.max_sessions = int(max_sessions)
        self.items_of: dict[int, list[int]] = {}
        self.sessions_with: dict[int, deque[int]] = {}
        self._user_of = np.zeros(0, np.int64)
        self._open: dict[int, tuple[int, int]] = {}
        self._order: deque[int] = deque()
        self._next = 0
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.items_of)

    def update(self, users: np.ndarray, items: np.ndarray, ts_ms: np.ndarray) -> None:
        """Add time-ordered positives (user, item, time) to their users' sessions."""
        for u, i, t in zip(np.asarray(users).tolist(), np.asarray(items).tolist(), np.asarray(ts_ms).tolist()):
            cur = self._open.get(u)
            if cur is None or t - cur[1] > self.session_gap_ms or cur[0] not in self.items_of:
                sid = self._new_session(u)
            else:
                sid = cur[0]
            self._open[u] = (sid, t)
            lst = self.items_of[sid]
            if i in lst:
                continue
            lst.append(i)
            if len(lst) > self.max_session_len:
                lst.pop(0)
            dq = self.sessions_with.get(i)
            if dq is None:
                dq = self.sessions_with[i] = deque(maxlen=self.sample_size)
            dq.append(sid)
            self._cache.pop(i, None)

    def _new_session(self, user: int) -> int:
        sid = self._next
        self._next += 1
        if sid >= len(self._user_of):
            self._user_of = np.concatenate([self._user_of, np.full(max(1024, len(self._user_of)), -1, np.int64)])
        self._user_of[sid] = user
        self.items_of[sid] = []
        self._order.append(sid)
        while len(self._order) > self.max_sessions:
            old = self._order.popleft()
            self.items_of.pop(old, None)
        if len(self._open) > 4 * self.max_sessions:  # users long gone: their open sessions are forgotten
            for u in [u for u, (s, _) in self._open.items() if s not in self.items_of]:
                del self._open[u]
        return sid

    def _sessions_with(self, item: int) -> np.ndarray:
        hit = self._cache.get(item)
        if hit is None:
            dq = self.sessions_with.get(item)
            hit = np.fromiter(dq, np.int64, len(dq)) if dq else np.zeros(0, np.int64)
            self._cache[item] = hit
        return hit

    def scores(self, recent: np.ndarray, user_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(item ids sorted, scores) for a session (item ids, oldest first): each item's summed
        similarity over the ``k`` most similar past sessions of other users; scores sum to 1.
        The session's last ``query_len`` distinct items count, the most recent with weight 1, then
        decaying linearly; ties between sessions go to the more recent one."""
        ids, sc, _ = self.scores_flat([recent], [_NO_USER if user_id is None else int(user_id)])
        return ids, sc

    def scores_many(self, sessions: Sequence[np.ndarray], user_ids: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """``scores(sessions[j], user_ids[j])`` for every j, bit for bit, with one sort and one
        ``bincount`` per stage for the whole batch instead of two per session."""
        ids, sc, bounds = self.scores_flat(sessions, user_ids)
        return [(ids[a:b], sc[a:b]) if b > a else _EMPTY for a, b in zip(bounds[:-1], bounds[1:])]

    def scores_flat(
        self, sessions: Sequence[np.ndarray], user_ids: Sequence[int], distinct: list[list[int]] | None = None
    ) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """``scores_many`` as one (ids, scores) pair, session j's at ``bounds[j]:bounds[j + 1]``.

        ``distinct``: ``recent_distinct(sessions, n)`` with n >= ``query_len``, if already at hand."""
        n = len(sessions)
        if distinct is None:
            distinct = recent_distinct(sessions, self.query_len)
        req: list[int] = []
        sids: list[np.ndarray] = []
        w: list[float] = []
        for j, items in enumerate(distinct):
            q = items[: self.query_len]
            m = len(q)
            for r, it in enumerate(q):
                s = self._sessions_with(it)
                if len(s):
                    sids.append(s)
                    w.append((m - r) / m)
                    req.append(j)
        lens = [len(s) for s in sids]
        uniq, sim, b1 = _group_sum_flat(n, req, sids, [np.repeat(np.asarray(w, np.float64), lens)] if sids else [])
        if len(uniq) == 0:
            return _EMPTY[0], _EMPTY[1], [0] * (n + 1)
        # the neighbour sessions of every request: not too old, not the user's own; by request
        grp = np.repeat(np.arange(n, dtype=np.int64), np.diff(b1))
        oldest = self._order[0] if self._order else self._next
        ok = (uniq >= oldest) & (self._user_of[uniq] != np.asarray(user_ids, np.int64)[grp])
        uniq, sim, grp = uniq[ok], sim[ok], grp[ok]
        cnt = np.bincount(grp, minlength=n)
        big = cnt > self.k
        if big.any():  # more than k: the k most similar, ties to the more recent session, in that order
            order = np.lexsort((-uniq, -sim, grp))
            rank = np.arange(len(order)) - (np.cumsum(cnt) - cnt)[grp[order]]
            sel = np.concatenate([order[big[grp[order]] & (rank < self.k)], np.flatnonzero(~big[grp])])
            sel = sel[np.argsort(grp[sel], kind="stable")]
            uniq, sim, grp = uniq[sel], sim[sel], grp[sel]
        lists = [self.items_of[s] for s in uniq.tolist()]
        lens = [len(x) for x in lists]
        items = [np.fromiter(chain.from_iterable(lists), np.int64)]
        votes = [np.repeat(sim, lens)]
        req2 = np.repeat(grp, lens)
        ids, sc, bounds = _group_sum_flat(n, req2, items, votes, flat=True)
        if len(ids):
            total = [float(sc[a:b].sum()) if b > a else 1.0 for a, b in zip(bounds[:-1], bounds[1:])]
            total = [t if t > 0 else 1.0 for t in total]  # x / 1.0 == x: a zero sum leaves the scores as they are
            sc = sc / np.repeat(np.asarray(total, np.float64), np.diff(bounds))
        return ids, sc, bounds

    def state_dict(self) -> dict[str, Any]:
        return {
            "items_of": {s: list(v) for s, v in self.items_of.items()},
            "sessions_with": {i: list(d) for i, d in self.sessions_with.items()},
            "user_of": self._user_of[: self._next].tolist(),
            "open": dict(self._open),
            "order": list(self._order),
            "next": self._next,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.items_of = {int(s): [int(i) for i in v] for s, v in state["items_of"].items()}
        self.sessions_with = {int(i): deque((int(s) for s in d), maxlen=self.sample_size) for i, d in state["sessions_with"].items()}
        self._next = int(state["next"])
        self._user_of = np.full(max(1024, self._next), -1, np.int64)
        self._user_of[: self._next] = np.asarray(state["user_of"], np.int64)
        self._open = {int(u): (int(s), int(t)) for u, (s, t) in state["open"].items()}
        self._order = deque(int(s) for s in state["order"])
        self._cache = {}
