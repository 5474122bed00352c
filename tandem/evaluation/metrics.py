"""Ranking metrics for next-interaction prediction, plus traffic and latency summaries.

Every positive interaction is one *prediction point*: the system shows a ranked
list, the user then engages with ``target``. With one target per point the
ideal DCG is 1, so ``NDCG@K = 1 / log2(rank + 1)`` when ``rank <= K`` else 0.
``Recall@K`` uses a wider relevant set (the distinct items the user engages
with from this point to the end of the session), so it rewards lists that
anticipate the rest of the session, not only the very next click.

Ranks are 1-based; 0 means "not in the list" (a miss at every K).
Everything here is plain numpy and checked against hand-computed values in
tests/test_metrics.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Final, Iterable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

#: Cut-offs reported everywhere.
KS: Final[tuple[int, ...]] = (1, 5, 10, 50)
DAY_MS: Final[int] = 86_400_000


# -- single-list primitives ---------------------------------------------------
def rank_of(ranking: np.ndarray | Sequence[int], target: int) -> int:
    """1-based position of ``target`` in ``ranking`` (0 when absent)."""
    arr = np.asarray(ranking)
    hit = np.flatnonzero(arr == target)
    return int(hit[0]) + 1 if len(hit) else 0


def hit_at_k(ranks: np.ndarray | int, k: int) -> np.ndarray:
    """1.0 where the target is in the top ``k`` (rank in 1..k)."""
    r = np.asarray(ranks)
    return ((r >= 1) & (r <= k)).astype(np.float64)


def ndcg_at_k(ranks: np.ndarray | int, k: int) -> np.ndarray:
    """Single-target NDCG@k: ``1/log2(rank+1)`` inside the top k, else 0 (IDCG = 1)."""
    r = np.asarray(ranks, dtype=np.float64)
    inside = (r >= 1) & (r <= k)
    out = np.zeros_like(r)
    np.divide(1.0, np.log2(r + 1.0, where=inside, out=np.ones_like(r)), out=out, where=inside)
    return out


def reciprocal_rank(ranks: np.ndarray | int, k: int | None = None) -> np.ndarray:
    """``1/rank`` (0 for a miss, or beyond ``k`` when given); its mean is MRR."""
    r = np.asarray(ranks, dtype=np.float64)
    ok = r >= 1
    if k is not None:
        ok &= r <= k
    out = np.zeros_like(r)
    np.divide(1.0, r, out=out, where=ok)
    return out


def recall_at_k(ranking: np.ndarray | Sequence[int], relevant: Iterable[int], k: int) -> float:
    """``|top-k ∩ relevant| / |relevant|`` (0 for an empty relevant set)."""
    rel = set(int(x) for x in relevant)
    if not rel:
        return 0.0
    top = np.asarray(ranking)[:k].tolist()
    return len(rel.intersection(int(x) for x in top)) / len(rel)


def ndcg_multi(ranking: np.ndarray | Sequence[int], relevant: Iterable[int], k: int) -> float:
    """Binary-gain NDCG@k with several relevant items (equals ``ndcg_at_k`` for one)."""
    rel = set(int(x) for x in relevant)
    if not rel:
        return 0.0
    top = np.asarray(ranking)[:k].tolist()
    dcg = sum(1.0 / np.log2(i + 2.0) for i, x in enumerate(top) if int(x) in rel)
    idcg = sum(1.0 / np.log2(i + 2.0) for i in range(min(len(rel), k)))
    return float(dcg / idcg)


# -- per-prediction log -------------------------------------------------------
@dataclass
class PredictionLog:
    """Growable columnar record of one strategy's prediction points.

    Columns: ``user``, ``ts_ms``, ``rank`` (0 = miss), ``repeat`` (target engaged by this
    user before), and ``recall`` (n, len(ks)).
    """

    ks: tuple[int, ...] = KS
    _user: list[int] = field(default_factory=list)
    _ts: list[int] = field(default_factory=list)
    _rank: list[int] = field(default_factory=list)
    _repeat: list[bool] = field(default_factory=list)
    _recall: list[tuple[float, ...]] = field(default_factory=list)

    def add(self, user: int, ts_ms: int, ranking: np.ndarray, target: int, repeat: bool, relevant: set[int] | None = None) -> int:
        """Score one prediction point; returns the target's rank (0 = miss)."""
        top = np.asarray(ranking)[: max(self.ks)].tolist() if len(self.ks) else []
        pos: dict[int, int] = {}
        for i, x in enumerate(top):
            pos.setdefault(int(x), i)
        r = pos.get(int(target), -1) + 1
        if r == 0 and len(ranking) > len(top):
            r = rank_of(ranking, target)
        rel = relevant if relevant else {int(target)}
        hits = sorted(pos[i] for i in rel if i in pos)
        n_rel = len(rel)
        self._user.append(int(user))
        self._ts.append(int(ts_ms))
        self._rank.append(r)
        self._repeat.append(bool(repeat))
        # |top-k ∩ relevant| / |relevant| for every k (= recall_at_k, one pass over the list)
        self._recall.append(tuple(sum(1 for h in hits if h < k) / n_rel for k in self.ks))
        return r

    def __len__(self) -> int:
        return len(self._rank)

    @property
    def user(self) -> np.ndarray:
        return np.asarray(self._user, dtype=np.int64)

    @property
    def ts_ms(self) -> np.ndarray:
        return np.asarray(self._ts, dtype=np.int64)

    @property
    def rank(self) -> np.ndarray:
        return np.asarray(self._rank, dtype=np.int64)

    @property
    def repeat(self) -> np.ndarray:
        return np.asarray(self._repeat, dtype=bool)

    @property
    def recall(self) -> np.ndarray:
        return np.asarray(self._recall, dtype=np.float64).reshape(len(self), len(self.ks))

    def values(self) -> dict[str, np.ndarray]:
        """Per-prediction metric values, keyed ``HR@K``, ``Recall@K``, ``NDCG@K``, ``MRR``."""
        return per_point_values(self.rank, self.recall, self.ks)


def per_point_values(rank: np.ndarray, recall: np.ndarray, ks: Sequence[int] = KS) -> dict[str, np.ndarray]:
    """Metric value of every prediction point (the unit the bootstrap resamples by user)."""
    out: dict[str, np.ndarray] = {}
    for j, k in enumerate(ks):
        out[f"HR@{k}"] = hit_at_k(rank, k)
        out[f"Recall@{k}"] = recall[:, j] if len(recall) else np.zeros(0)
        out[f"NDCG@{k}"] = ndcg_at_k(rank, k)
    out["MRR"] = reciprocal_rank(rank)
    return out


def metric_names(ks: Sequence[int] = KS) -> list[str]:
    """Metric keys in report order."""
    names = [f"{m}@{k}" for m in ("HR", "Recall", "NDCG") for k in ks]
    return names + ["MRR"]


def time_series(ts_ms: np.ndarray, values: np.ndarray, n_bins: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``values`` in ``n_bins`` equal-count time bins: (bin end ts, mean)."""
    n = len(values)
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    edges = np.linspace(0, n, min(n_bins, n) + 1).astype(int)
    order = np.argsort(ts_ms, kind="stable")
    v, t = values[order], ts_ms[order]
    means = np.array([v[a:b].mean() for a, b in zip(edges[:-1], edges[1:])])
    ends = np.array([t[b - 1] for b in edges[1:]], dtype=np.int64)
    return ends, means


# -- traffic and latency ------------------------------------------------------
def device_days(user: np.ndarray, ts_ms: np.ndarray) -> int:
    """Number of distinct (user, day) pairs with activity: the denominator of per-device-day traffic."""
    if len(user) == 0:
        return 0
    day = np.asarray(ts_ms, dtype=np.int64) // DAY_MS
    return int(len(np.unique(np.stack([np.asarray(user, dtype=np.int64), day], axis=1), axis=0)))


def latency_summary(latencies_s: np.ndarray) -> dict[str, float]:
    """p50 / p95 / p99 / mean of per-ranking latencies, in milliseconds."""
    lat = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    if len(lat) == 0:
        return {"p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0, "mean_ms": 0.0, "n": 0}
    p50, p95, p99 = np.percentile(lat, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99), "mean_ms": float(lat.mean()), "n": int(len(lat))}
