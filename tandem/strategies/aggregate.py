"""Cloud-side aggregation of verified device updates, one round at a time.

Input: ``DecodedUpdate``s (device_rerank/envelope.py) that passed the verifier.
Output: changes applied to an ``AggregationTarget`` (the cloud state a strategy
owns) and a ``RoundSummary``.

* parameter family: the shared reranker delta (flat ``SparseDelta``) and touched
  item-embedding rows (``row id -> delta``) are combined with one rule (pure
  functions below, modelled on Flower's ``flwr/server/strategy/aggregate.py``):

  - ``fedavg``: weighted by ``num_examples`` (McMahan et al. 2017); a coordinate a
    device did not send counts as 0 (its error-feedback residual keeps it for later);
  - ``trimmed_mean`` / ``median``: coordinate-wise (Yin et al. 2018) over the devices
    that *sent* each coordinate, then scaled by the fraction of devices that sent it,
    so with no poison they estimate the same thing as FedAvg on sparse top-k updates;
  - ``krum`` / ``multi_krum``: the update(s) closest to their ``n - f - 2`` nearest
    neighbours (Blanchard et al. 2017), multi-Krum averaging the ``n - f`` best;
  - ``clipped_*``: every update is first clipped to ``clip_factor`` x the round's median
    update norm (a huge-norm device then weighs no more than an honest one), then the rule.
    ``clipped_multi_krum`` is the default: with ``malicious_fraction`` 0.3 it stays within
    0.12 of the honest FedAvg at 10% and 30% huge-norm, sign-flipped or constant devices,
    and clipping caps the damage past 30%; coordinate-wise rules cannot do that on sparse
    updates, where attackers can be the majority of a coordinate's senders.
    bench/bench_robust_aggregation.py prints every rule.

  Rows are aggregated per row over the devices that sent that row.
* feature family: the latest interest vector per user (by ``created_ms``, then
  ``seq``) replaces the previous one; the target uses it in retrieval.
* data family: consented hard examples are handed to the target's training.
* evaluation family: devices' verdicts on the trial reranker are handed to the target's
  gate (``StrategyCloud``: the trial ships only if the devices' feedback says it is no worse).

Idempotent: the highest applied ``seq`` per device is kept (seqs only grow per device,
the verifier enforces it); an update at or below it (at-least-once delivery, replays)
changes nothing. Memory is one integer per device, at most ``max_devices``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Final, Protocol, Sequence

import numpy as np

from device_rerank.encoders import HardExamples, TrialEvaluation
from device_rerank.envelope import DecodedUpdate

logger = logging.getLogger(__name__)

RULES: Final[tuple[str, ...]] = (
    "fedavg", "trimmed_mean", "median", "krum", "multi_krum", "clipped_trimmed_mean", "clipped_median", "clipped_multi_krum",
)
#: The default rule: robust to huge-norm, sign-flipped and constant updates (see the bench).
DEFAULT_RULE: Final[str] = "clipped_multi_krum"


def _check(deltas: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    deltas = np.asarray(deltas, dtype=np.float64)
    if deltas.ndim != 2 or len(deltas) == 0:
        raise ValueError("no updates to aggregate")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != deltas.shape:
            raise ValueError(f"mask shape {mask.shape} != deltas shape {deltas.shape}")
    if not np.all(np.isfinite(deltas)):
        raise ValueError("non-finite update values (the verifier should have rejected them)")
    return deltas, mask


# -- aggregation rules (rows = updates, columns = coordinates) ----------------
def fedavg(deltas: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted mean of the rows of ``deltas`` (weights = examples behind each update)."""
    deltas = np.asarray(deltas, dtype=np.float64)
    if len(deltas) == 0:
        raise ValueError("no updates to aggregate")
    w = np.ones(len(deltas)) if weights is None else np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or not np.all(np.isfinite(w)) or w.sum() <= 0:
        w = np.ones(len(deltas))
    return (w[:, None] * deltas).sum(axis=0) / w.sum()


def trimmed_mean(deltas: np.ndarray, trim_fraction: float = 0.1, mask: np.ndarray | None = None) -> np.ndarray:
    """Coordinate-wise mean after dropping ``floor(trim_fraction * c)`` lowest and highest values.

    Args:
        deltas: (n, d) updates.
        trim_fraction: per-side fraction dropped, in [0, 0.5).
        mask: (n, d) True where a device sent the coordinate (sparse updates). Then ``c`` is
            the number of senders of each coordinate, the trimmed mean runs over them only,
            and the result is scaled by ``c / n`` (what FedAvg gives when nobody lies).
    """
    if not 0 <= trim_fraction < 0.5:
        raise ValueError("trim_fraction must be in [0, 0.5)")
    deltas, mask = _check(deltas, mask)
    n = len(deltas)
    if mask is None:
        t = int(np.floor(trim_fraction * n))
        if t == 0:
            return deltas.mean(axis=0)
        s = np.sort(deltas, axis=0)
        return s[t : n - t].mean(axis=0)
    c = mask.sum(axis=0)
    s = np.sort(np.where(mask, deltas, np.inf), axis=0)  # unsent sort last
    t = np.floor(trim_fraction * c).astype(np.int64)
    rank = np.arange(n)[:, None]
    keep = (rank >= t) & (rank < c - t)
    kept = keep.sum(axis=0)
    total = np.where(keep, s, 0.0).sum(axis=0)
    loc = np.divide(total, kept, out=np.zeros(deltas.shape[1]), where=kept > 0)
    return loc * (c / n)


def coordinate_median(deltas: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Coordinate-wise median (breakdown point 1/2); with ``mask`` over senders, scaled by ``c / n``."""
    deltas, mask = _check(deltas, mask)
    if mask is None:
        return np.median(deltas, axis=0)
    n = len(deltas)
    c = mask.sum(axis=0)
    out = np.zeros(deltas.shape[1])
    sent = c > 0
    if sent.any():
        with np.errstate(all="ignore"):
            out[sent] = np.nanmedian(np.where(mask[:, sent], deltas[:, sent], np.nan), axis=0)
    return out * (c / n)


def update_norms(deltas: np.ndarray) -> np.ndarray:
    """L2 norm of each update (row)."""
    return np.linalg.norm(np.asarray(deltas, dtype=np.float64), axis=1)


def clip_by_norm(deltas: np.ndarray, bound: float) -> np.ndarray:
    """Each row scaled down to L2 norm at most ``bound`` (rows inside stay as they are)."""
    if not np.isfinite(bound) or bound < 0:
        raise ValueError(f"clip bound must be finite and >= 0, got {bound}")
    deltas = np.asarray(deltas, dtype=np.float64)
    n = update_norms(deltas)
    scale = np.minimum(1.0, np.divide(bound, n, out=np.ones_like(n), where=n > 0))
    return deltas * scale[:, None]


def adaptive_clip_bound(deltas: np.ndarray, clip_factor: float = 2.0) -> float:
    """``clip_factor`` x the median update norm of the round (a majority of honest devices sets it)."""
    return float(clip_factor * np.median(update_norms(deltas)))


def _pairwise_sq_dist(x: np.ndarray) -> np.ndarray:
    sq = np.einsum("ij,ij->i", x, x)
    d = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    return np.maximum(d, 0.0)


def krum(deltas: np.ndarray, num_malicious: int, num_to_keep: int = 1, weights: np.ndarray | None = None) -> np.ndarray:
    """Krum / multi-Krum (Blanchard et al. 2017), as Flower's ``aggregate_krum``.

    Each update is scored by the sum of squared distances to its ``n - f - 2`` nearest
    neighbours; the ``num_to_keep`` lowest scores are averaged (weighted). ``num_to_keep=1``
    is Krum, ``n - f`` is multi-Krum. Needs ``n > 2f + 2`` for its guarantee; with fewer
    updates the neighbour count is clamped to at least 1.
    """
    deltas, _ = _check(deltas, None)
    n = len(deltas)
    if num_malicious < 0:
        raise ValueError("num_malicious must be >= 0")
    if n == 1:
        return deltas[0].copy()
    d = _pairwise_sq_dist(deltas)
    m = int(np.clip(n - num_malicious - 2, 1, n - 1))
    d_sorted = np.sort(d, axis=1)[:, 1 : m + 1]  # column 0 is the distance to itself
    scores = d_sorted.sum(axis=1)
    keep = np.argsort(scores, kind="stable")[: max(1, min(int(num_to_keep), n))]
    w = None if weights is None else np.asarray(weights, dtype=np.float64)[keep]
    return fedavg(deltas[keep], w)


def combine(
    deltas: np.ndarray,
    weights: np.ndarray,
    rule: str,
    trim_fraction: float = 0.1,
    mask: np.ndarray | None = None,
    clip_factor: float = 2.0,
    malicious_fraction: float = 0.3,
) -> np.ndarray:
    """Apply the named rule (``RULES``).

    Args:
        deltas: (n, d) updates; weights: (n,) examples behind each.
        rule: one of ``RULES``.
        trim_fraction: per-side trim of the trimmed-mean rules.
        mask: (n, d) sent coordinates for sparse updates (None: dense, everything sent).
        clip_factor: clipped rules clip to this multiple of the median update norm.
        malicious_fraction: ``f / n`` assumed by Krum.
    """
    deltas, mask = _check(deltas, mask)
    if rule == "fedavg":
        return fedavg(deltas, weights)
    if rule == "trimmed_mean":
        return trimmed_mean(deltas, trim_fraction, mask)
    if rule == "median":
        return coordinate_median(deltas, mask)
    if rule in ("krum", "multi_krum"):
        n = len(deltas)
        f = int(np.floor(malicious_fraction * n))
        return krum(deltas, f, 1 if rule == "krum" else max(1, n - f), weights)
    if rule in ("clipped_trimmed_mean", "clipped_median", "clipped_multi_krum"):
        clipped = clip_by_norm(deltas, adaptive_clip_bound(deltas, clip_factor))
        if rule == "clipped_median":
            return coordinate_median(clipped, mask)
        if rule == "clipped_multi_krum":
            n = len(deltas)
            f = int(np.floor(malicious_fraction * n))
            return krum(clipped, f, max(1, n - f), weights)
        return trimmed_mean(clipped, trim_fraction, mask)
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

    def add_evaluations(self, evaluations: Sequence[tuple[int, TrialEvaluation]]) -> None:
        """Devices' verdicts, (device id, evaluation), on the trial reranker (the ship gate)."""


@dataclass(frozen=True)
class AggregatorConfig:
    """How updates are combined.

    Args:
        rule: one of ``RULES`` for parameter updates (default ``DEFAULT_RULE``).
        trim_fraction: per-side fraction dropped by the trimmed-mean rules.
        server_lr: the aggregated model delta is scaled by this before it is applied.
        row_server_lr: the same for item-embedding rows (0 keeps rows out of the cloud).
        min_updates: parameter rounds with fewer updates are deferred (kept pending).
        clip_factor: clipped rules clip each update to this multiple of the round's median norm.
        malicious_fraction: fraction of devices Krum assumes may lie.
        max_devices: per-device dedup marks kept (least recently updated evicted; the
            verifier's replay check still guards an evicted device).
    """

    rule: str = DEFAULT_RULE
    trim_fraction: float = 0.1
    server_lr: float = 1.0
    row_server_lr: float = 1.0
    min_updates: int = 1
    clip_factor: float = 2.0
    malicious_fraction: float = 0.3
    max_devices: int = 1_000_000


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
    evaluations: int = 0
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
            raise ValueError(f"unknown aggregation rule {self.config.rule!r}; expected one of {RULES}")
        if self.config.max_devices < 1:
            raise ValueError("max_devices must be >= 1")
        #: highest applied seq per device (bounded LRU): the dedup state.
        self.applied_seq: OrderedDict[int, int] = OrderedDict()
        self.pending: list[DecodedUpdate] = []
        self.rounds = 0

    def is_applied(self, device_id: int, seq: int) -> bool:
        """True when ``(device_id, seq)`` is at or below that device's highest applied seq."""
        mark = self.applied_seq.get(int(device_id))
        return mark is not None and int(seq) <= mark

    def _mark(self, device_id: int, seq: int) -> None:
        d = int(device_id)
        self.applied_seq[d] = max(int(seq), self.applied_seq.get(d, -1))
        self.applied_seq.move_to_end(d)
        while len(self.applied_seq) > self.config.max_devices:
            self.applied_seq.popitem(last=False)

    def aggregate_round(self, round: int, updates: Sequence[DecodedUpdate], target: AggregationTarget) -> RoundSummary:
        """Apply the new updates of this round (duplicates and already-applied ids are skipped)."""
        s = RoundSummary(round=round, received=len(updates))
        fresh: list[DecodedUpdate] = list(self.pending)  # deduplicated when they first arrived
        seen_now: set[tuple[int, int]] = {(int(u.device_id), int(u.seq)) for u in self.pending}
        for u in updates:
            uid = (int(u.device_id), int(u.seq))
            if self.is_applied(*uid) or uid in seen_now:
                s.duplicates += 1
                continue
            seen_now.add(uid)
            fresh.append(u)
        self.pending = []
        params = [u for u in fresh if u.family == "parameter" and u.params is not None]
        feats = [u for u in fresh if u.family == "feature" and u.user_vector is not None]
        data = [u for u in fresh if u.family == "data" and u.examples is not None]
        evals = [u for u in fresh if u.family == "evaluation" and u.evaluation is not None]
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
        if evals:
            target.add_evaluations([(u.device_id, u.evaluation) for u in evals])  # type: ignore[misc]
            s.evaluations = len(evals)
            done.extend(evals)
        for u in done:
            self._mark(u.device_id, u.seq)
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
        mask = np.zeros(dense.shape, dtype=bool)
        for i, u in enumerate(params):
            mask[i, u.params.model.indices] = True  # type: ignore[union-attr]
        agg = combine(dense, w, cfg.rule, cfg.trim_fraction, mask, cfg.clip_factor, cfg.malicious_fraction) * cfg.server_lr
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
                rw = np.array([x for _, x in lst])
                out[item] = (combine(d, rw, cfg.rule, cfg.trim_fraction, None, cfg.clip_factor, cfg.malicious_fraction) * cfg.row_server_lr).astype(np.float32)
            target.apply_item_deltas(out)
            s.rows_touched = len(out)
