"""Bootstrap confidence intervals over users (cluster bootstrap).

Why over users: prediction points of one user are correlated (same taste, same
session), so resampling points would make intervals far too narrow. We resample
users with replacement and recompute the point-weighted mean, i.e. the same
statistic the tables report (micro average over prediction points).

Vectorized: per-user sums and counts, then one ``(B, U)`` matrix of multinomial
resampling counts: ``mean_b = (W_b @ sums) / (W_b @ counts)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CI:
    """A point estimate with its percentile-bootstrap interval."""

    mean: float
    lo: float
    hi: float

    def overlaps(self, other: "CI") -> bool:
        return not (self.hi < other.lo or other.hi < self.lo)

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi}


def _per_user(values: np.ndarray, users: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    uniq, inv = np.unique(np.asarray(users), return_inverse=True)
    sums = np.bincount(inv, weights=np.asarray(values, dtype=np.float64), minlength=len(uniq))
    counts = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
    return uniq, sums, counts


def resampling_weights(n_users: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_users) counts: how often each user is drawn in each replicate."""
    rng = np.random.default_rng(seed)
    if n_users == 0:
        return np.zeros((n_boot, 0))
    return rng.multinomial(n_users, np.full(n_users, 1.0 / n_users), size=n_boot).astype(np.float64)


def bootstrap_mean(values: np.ndarray, users: np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> CI:
    """Point-weighted mean of ``values`` with a (1-alpha) interval from resampling users."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return CI(float("nan"), float("nan"), float("nan"))
    _, sums, counts = _per_user(values, users)
    w = resampling_weights(len(sums), n_boot, seed)
    denom = w @ counts
    reps = (w @ sums) / np.where(denom > 0, denom, 1.0)
    lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return CI(float(values.mean()), float(lo), float(hi))


def bootstrap_many(
    metrics: dict[str, np.ndarray], users: np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> dict[str, CI]:
    """``bootstrap_mean`` for several metrics sharing the same resampled users (consistent intervals)."""
    if len(users) == 0:
        return {k: CI(float("nan"), float("nan"), float("nan")) for k in metrics}
    uniq, inv = np.unique(np.asarray(users), return_inverse=True)
    counts = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
    w = resampling_weights(len(uniq), n_boot, seed)
    denom = w @ counts
    denom = np.where(denom > 0, denom, 1.0)
    out: dict[str, CI] = {}
    for name, vals in metrics.items():
        sums = np.bincount(inv, weights=np.asarray(vals, dtype=np.float64), minlength=len(uniq))
        reps = (w @ sums) / denom
        lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
        out[name] = CI(float(np.mean(vals)), float(lo), float(hi))
    return out


def paired_relative_diff(
    a: np.ndarray, b: np.ndarray, users: np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> CI:
    """Interval of ``mean(a)/mean(b) - 1`` where a and b are scored on the same points (paired).

    Resampling the same users for both sides removes the between-user variance the two
    strategies share, so this is the right test of "a beats b", tighter than comparing
    two marginal intervals.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if len(a) != len(b) or len(a) == 0:
        raise ValueError("paired values must have the same, non-zero length")
    uniq, inv = np.unique(np.asarray(users), return_inverse=True)
    sa = np.bincount(inv, weights=a, minlength=len(uniq))
    sb = np.bincount(inv, weights=b, minlength=len(uniq))
    w = resampling_weights(len(uniq), n_boot, seed)
    ra, rb = w @ sa, w @ sb
    reps = ra / np.where(rb != 0, rb, np.nan) - 1.0
    reps = reps[np.isfinite(reps)]
    point = a.sum() / b.sum() - 1.0 if b.sum() != 0 else float("nan")
    if len(reps) == 0:
        return CI(float(point), float("nan"), float("nan"))
    lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return CI(float(point), float(lo), float(hi))
