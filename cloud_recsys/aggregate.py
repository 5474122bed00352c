"""Cloud-side aggregation of verified device updates, one round at a time.

Input: ``DecodedUpdate``s (device_rerank/envelope.py) that passed the verifier.
Output: changes applied to an ``AggregationTarget`` (the cloud state a strategy
owns) and a ``RoundSummary``.

* parameter family: the shared reranker delta (flat ``SparseDelta``) and touched
  item-embedding rows (``row id -> delta``) are combined with one rule:
  ``fedavg`` (weighted by ``num_examples``, McMahan et al. 2017), coordinate-wise
  ``trimmed_mean`` (drop the ``trim_fraction`` largest and smallest per
  coordinate, Yin et al. 2018) or coordinate-wise ``median``. The robust rules
  resist a few poisoned updates that FedAvg averages in. Model coordinates a
  device did not send count as 0 (its error-feedback residual keeps them for
  later); rows are aggregated per row over the devices that sent that row.
* feature family: the latest interest vector per user (by ``created_ms``, then
  ``seq``) replaces the previous one; the target uses it in retrieval.
* data family: consented hard examples are handed to the target's training.

Idempotent: the ids ``(device_id, seq)`` of applied updates are kept; an update
seen again (at-least-once delivery, replays) changes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Final, Protocol, Sequence

import numpy as np

from device_rerank.encoders import HardExamples
from device_rerank.envelope import DecodedUpdate

logger = logging.getLogger(__name__)

RULES: Final[tuple[str, ...]] = ("fedavg", "trimmed_mean", "median")


# -- aggregation rules (rows = updates, columns = coordinates) ----------------
def fedavg(deltas: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted mean of the rows of ``deltas`` (weights = examples behind each update)."""
    deltas = np.asarray(deltas, dtype=np.float64)
    if len(deltas) == 0:
        raise ValueError("no updates to aggregate")
    w = np.ones(len(deltas)) if weights is None else np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        w = np.ones(len(deltas))
    return (w[:, None] * deltas).sum(axis=0) / w.sum()


def trimmed_mean(deltas: np.ndarray, trim_fraction: float = 0.1) -> np.ndarray:
    """Coordinate-wise mean after dropping ``floor(trim_fraction * n)`` lowest and highest values."""
    deltas = np.asarray(deltas, dtype=np.float64)
    n = len(deltas)
    if n == 0:
        raise ValueError("no updates to aggregate")
    if not 0 <= trim_fraction < 0.5:
        raise ValueError("trim_fraction must be in [0, 0.5)")
    t = int(np.floor(trim_fraction * n))
    if t == 0:
        return deltas.mean(axis=0)
    s = np.sort(deltas, axis=0)
    return s[t : n - t].mean(axis=0)


def coordinate_median(deltas: np.ndarray) -> np.ndarray:
    """Coordinate-wise median (breakdown point 1/2)."""
    deltas = np.asarray(deltas, dtype=np.float64)
    if len(deltas) == 0:
        raise ValueError("no updates to aggregate")
    return np.median(deltas, axis=0)


def combine(deltas: np.ndarray, weights: np.ndarray, rule: str, trim_fraction: float = 0.1) -> np.ndarray:
    """Apply the named rule (``RULES``)."""
    if rule == "fedavg":
        return fedavg(deltas, weights)
    if rule == "trimmed_mean":
        return trimmed_mean(deltas, trim_fraction)
    if rule == "median":
        return coordinate_median(deltas)
    raise ValueError(f"unknown aggregation rule {rule!r}; expected one of {RULES}")


# -- what aggregation writes to -----------------------------------------------
class AggregationTarget(Protocol):
    """The cloud state one strategy owns (implemented by the evaluation loop and the cloud service)."""

    def apply_model_delta(self, flat_delta: np.ndarray) -> None:
        """Add a delta to the shared reranker weights (``Reranker.param_layout`` order)."""

    def apply_item_deltas(self, deltas: dict[int, np.ndarray]) -> None:
        """Add deltas to item embedding rows (raw item id -> (d,))."""

    def set_user_vectors(self, vectors: dict[int, np.ndarray]) -> None:
        """Latest on-device interest vector per user (raw user id -> (d,)), used in retrieval."""

    def add_examples(self, examples: Sequence[tuple[int, HardExamples]]) -> None:
        """Consented hard examples, (device id, examples), to add to training."""


@dataclass(frozen=True)
class AggregatorConfig:
    """How updates are combined.

    Args:
        rule: "fedavg" | "trimmed_mean" | "median" for parameter updates.
        trim_fraction: per-side fraction dropped by ``trimmed_mean``.
        server_lr: the aggregated model delta is scaled by this before it is applied.
        row_server_lr: the same for item-embedding rows (0 keeps rows out of the cloud).
        min_updates: parameter rounds with fewer updates are deferred (kept pending).
    """

    rule: str = "fedavg"
    trim_fraction: float = 0.1
    server_lr: float = 1.0
    row_server_lr: float = 1.0
    min_updates: int = 1


@dataclass
class RoundSummary:
    """What one round did."""

    round: int
    received: int = 0
    applied: int = 0
    duplicates: int = 0
    by_family: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    model_delta_norm: float = 0.0
    rows_touched: int = 0
    user_vectors: int = 0
    examples: int = 0
    deferred: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class Aggregator:
    """Combines one round of verified updates and applies them; remembers what it applied.

    Args:
        config: rule and scaling.
    """

    def __init__(self, config: AggregatorConfig | None = None) -> None:
        self.config = config or AggregatorConfig()
        if self.config.rule not in RULES:
            raise ValueError(f"unknown aggregation rule {self.config.rule!r}")
        self.applied: set[tuple[int, int]] = set()
        self.pending: list[DecodedUpdate] = []
        self.rounds = 0

    def aggregate_round(self, round: int, updates: Sequence[DecodedUpdate], target: AggregationTarget) -> RoundSummary:
        """Apply the new updates of this round (duplicates and already-applied ids are skipped)."""
        s = RoundSummary(round=round, received=len(updates))
        fresh: list[DecodedUpdate] = []
        seen_now: set[tuple[int, int]] = set()
        for u in list(self.pending) + list(updates):
            uid = (int(u.device_id), int(u.seq))
            if uid in self.applied or uid in seen_now:
                s.duplicates += 1
                continue
            seen_now.add(uid)
            fresh.append(u)
        self.pending = []
        params = [u for u in fresh if u.family == "parameter" and u.params is not None]
        feats = [u for u in fresh if u.family == "feature" and u.user_vector is not None]
        data = [u for u in fresh if u.family == "data" and u.examples is not None]
        done: list[DecodedUpdate] = []
        if params:
            if len(params) < self.config.min_updates:
                self.pending.extend(params)
                s.deferred = len(params)
            else:
                self._apply_params(params, target, s)
                done.extend(params)
        if feats:
            latest: dict[int, DecodedUpdate] = {}
            for u in feats:
                cur = latest.get(u.device_id)
                if cur is None or (u.created_ms, u.seq) > (cur.created_ms, cur.seq):
                    latest[u.device_id] = u
            target.set_user_vectors({d: np.asarray(u.user_vector, dtype=np.float32) for d, u in latest.items()})
            s.user_vectors = len(latest)
            done.extend(feats)
        if data:
            target.add_examples([(u.device_id, u.examples) for u in data])  # type: ignore[misc]
            s.examples = int(sum(len(u.examples) for u in data))  # type: ignore[arg-type]
            done.extend(data)
        for u in done:
            self.applied.add((int(u.device_id), int(u.seq)))
            s.by_family[u.family] = s.by_family.get(u.family, 0) + 1
            s.bytes += int(u.nbytes)
        s.applied = len(done)
        self.rounds += 1
        logger.debug("round %d: %s", round, s)
        return s

    def _apply_params(self, params: list[DecodedUpdate], target: AggregationTarget, s: RoundSummary) -> None:
        cfg = self.config
        w = np.array([max(int(u.num_examples), 0) for u in params], dtype=np.float64)
        dense = np.stack([u.params.model.to_dense() for u in params])  # type: ignore[union-attr]
        agg = combine(dense, w, cfg.rule, cfg.trim_fraction) * cfg.server_lr
        if np.any(agg != 0):
            target.apply_model_delta(agg.astype(np.float32))
        s.model_delta_norm = float(np.linalg.norm(agg))
        by_row: dict[int, list[tuple[np.ndarray, float]]] = {}
        for u, wi in zip(params, w):
            for item, delta in u.params.rows.items():  # type: ignore[union-attr]
                by_row.setdefault(int(item), []).append((delta, wi))
        if by_row and cfg.row_server_lr != 0:
            out: dict[int, np.ndarray] = {}
            for item, lst in by_row.items():
                d = np.stack([x for x, _ in lst])
                out[item] = (combine(d, np.array([x for _, x in lst]), cfg.rule, cfg.trim_fraction) * cfg.row_server_lr).astype(np.float32)
            target.apply_item_deltas(out)
            s.rows_touched = len(out)
