"""Time-decayed item popularity: the cold-start fallback and the baseline to beat.

Each positive event adds ``2 ** ((ts - t_ref) / half_life)`` to its item, so the
score at any time is proportional to the exponentially decayed count without
touching every item on every event; ``t_ref`` is moved forward (and the scores
rescaled) before the weights overflow. ``half_life_ms=None`` keeps plain counts.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

_MAX_EXP = 60.0  # rescale once weights reach 2**60


def decay_weights(ts_ms: np.ndarray, half_life_ms: float | None, t_ref: int | None) -> tuple[np.ndarray, int | None, float]:
    """Weights ``2 ** ((ts - t_ref) / half_life)`` of events at ``ts_ms`` (ones without decay).

    Returns (weights, the reference time to keep, the factor existing scores must be
    multiplied by): when the weights would pass ``2 ** _MAX_EXP`` the reference moves to the
    newest event and the old scores shrink by the same factor, so ratios are unchanged.
    Shared by ``Popularity`` (scores by raw id) and the recommender's dense counts.
    """
    ts = np.asarray(ts_ms, dtype=np.int64)
    if half_life_ms is None:
        return np.ones(len(ts)), t_ref, 1.0
    if t_ref is None:
        t_ref = int(ts.min())
    factor = 1.0
    exps = (ts - t_ref) / half_life_ms
    if exps.max() > _MAX_EXP:
        new = int(ts.max())
        factor = math.pow(2.0, -(new - t_ref) / half_life_ms)
        t_ref = new
        exps = (ts - t_ref) / half_life_ms
    return np.exp2(exps), t_ref, factor


class Popularity:
    """Decayed positive counts per raw item id.

    Args:
        half_life_ms: popularity halves every this many ms of log time; None: no decay.
    """

    def __init__(self, half_life_ms: float | None = 7 * 24 * 3600 * 1000.0) -> None:
        if half_life_ms is not None and half_life_ms <= 0:
            raise ValueError(f"half_life_ms must be positive or None, got {half_life_ms}")
        self.half_life_ms = half_life_ms
        self.t_ref: int | None = None
        self._scores: dict[int, float] = {}
        self._cache: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self._scores)

    def update(self, item_ids: np.ndarray, ts_ms: np.ndarray) -> None:
        """Count positive events (item ids with their times)."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        if len(item_ids) == 0:
            return
        w, self.t_ref, factor = decay_weights(ts_ms, self.half_life_ms, self.t_ref)
        if factor != 1.0:
            self._scores = {i: s * factor for i, s in self._scores.items()}
        uniq, inv = np.unique(item_ids, return_inverse=True)
        sums = np.bincount(inv, weights=w)
        for item, s in zip(uniq.tolist(), sums.tolist()):
            self._scores[item] = self._scores.get(item, 0.0) + s
        self._cache = None

    def scores(self) -> tuple[np.ndarray, np.ndarray]:
        """(item ids, relative scores), most popular first."""
        if self._cache is None:
            ids = np.fromiter(self._scores.keys(), dtype=np.int64, count=len(self._scores))
            sc = np.fromiter(self._scores.values(), dtype=np.float64, count=len(self._scores))
            order = np.lexsort((ids, -sc))
            self._cache = (ids[order], sc[order])
        return self._cache

    def top(
        self, k: int, allowed: np.ndarray | None = None, exclude: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (item ids, float32 scores normalised to the top item), filtered."""
        ids, sc = self.scores()
        keep = np.ones(len(ids), dtype=bool)
        if allowed is not None:
            keep &= np.isin(ids, allowed)
        if exclude is not None and len(exclude):
            keep &= ~np.isin(ids, exclude)
        ids, sc = ids[keep][:k], sc[keep][:k]
        top = sc[0] if len(sc) and sc[0] > 0 else 1.0
        return ids, (sc / top).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        ids, sc = self.scores()
        return {"half_life_ms": self.half_life_ms, "t_ref": self.t_ref, "ids": ids.copy(), "scores": sc.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.half_life_ms = state["half_life_ms"]
        self.t_ref = state["t_ref"]
        self._scores = dict(zip(np.asarray(state["ids"]).tolist(), np.asarray(state["scores"]).tolist()))
        self._cache = None
