"""Offline retrieval evaluation on a temporal split: popularity vs two-tower (exact and FAISS).

Protocol: events sorted by time; the first ``train_fraction`` of the *events* (by
time) train the model, the rest are the test period. Test users are those with
positives in both periods; each user's query is built from history before the
split (``at_ms = split``), items the user already engaged with in training are
excluded (standard for MovieLens), and the truth is the set of items the user
engaged with in the test period. Metrics: Recall@K = |top-K & truth| / |truth|,
NDCG@K with binary relevance, averaged over users.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import pandas as pd

from cloud_recsys.config import TwoTowerConfig
from cloud_recsys.index import IndexConfig, ItemIndex
from cloud_recsys.popularity import Popularity
from cloud_recsys.trainer import OnlineTrainer, positives
from streams.batch import EventBatch
from streams.datasets.base import EventLog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrievalEvalConfig:
    """Split, model and index settings of ``evaluate``.

    Args:
        train_fraction: share of events (by time) used for training.
        epochs: warm-start passes over the training period.
        ks: recall cut-offs.
        ndcg_k: NDCG cut-off.
        exclude_seen: drop items the user engaged with in training from every ranking.
        recent_half_life_days: half-life of the decayed popularity baseline.
        model: two-tower settings (capacities are set from the log).
        index: FAISS settings for the approximate row.
        popularity_prior: weight ``beta`` of a log-popularity prior added to the two-tower score,
            ``u.v / T + beta * log q(i)`` (q: training frequency). It is folded into the vectors
            (items get an extra coordinate ``T * log q(i)``, queries ``beta``), so exact search and
            the FAISS inner-product index rank the same augmented embeddings. 0 disables it. Why:
            the logQ-corrected in-batch softmax removes the sampling bias but on small, popularity-
            dominated logs (MovieLens) the unit-norm towers under-represent popularity.
        ensemble: two-towers trained with seeds ``model.seed + i``; their scores are averaged.
            Still one inner-product index: queries and items are the members' vectors
            concatenated (queries scaled by ``1 / ensemble``), so ``q . v`` is the mean score.
    """

    train_fraction: float = 0.8
    epochs: int = 10
    ks: tuple[int, ...] = (50, 100)
    ndcg_k: int = 10
    exclude_seen: bool = True
    recent_half_life_days: float = 30.0
    model: TwoTowerConfig = field(default_factory=lambda: TwoTowerConfig(
        embedding_dim=64, out_dim=64, user_hidden=(128,), item_hidden=(128,), history_len=50,
        temperature=0.05, lr_sparse=0.05, lr_dense=1e-3, batch_size=256, user_id_dropout=0.5))  # fmt: skip
    index: IndexConfig = field(default_factory=lambda: IndexConfig(kind="ivf", nprobe=32))
    popularity_prior: float = 0.0
    ensemble: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {self.train_fraction}")
        if self.epochs <= 0 or not self.ks or min(self.ks) <= 0 or self.ndcg_k <= 0 or self.ensemble <= 0:
            raise ValueError("epochs, ks, ndcg_k and ensemble must be positive")


def temporal_split(log_: EventLog, train_fraction: float) -> tuple[EventLog, pd.DataFrame, int]:
    """(training log, test events, split time): train = events before the ``train_fraction`` time quantile."""
    ev = log_.events
    split_ms = int(np.quantile(ev.ts_ms.to_numpy(), train_fraction))
    train = ev[ev.ts_ms < split_ms].reset_index(drop=True)
    test = ev[ev.ts_ms >= split_ms].reset_index(drop=True)
    return EventLog(name=log_.name, events=train, items=log_.items, step_ms=log_.step_ms, meta=log_.meta), test, split_ms


def recall_at_k(ranked: np.ndarray, truth: Sequence[set[int]], k: int) -> float:
    """Mean over users of |top-k & truth| / |truth| (users with empty truth are skipped)."""
    vals = [len(set(r[:k].tolist()) & t) / len(t) for r, t in zip(ranked, truth) if t]
    return float(np.mean(vals)) if vals else float("nan")


def ndcg_at_k(ranked: np.ndarray, truth: Sequence[set[int]], k: int) -> float:
    """Mean binary-relevance NDCG@k: sum of 1/log2(rank+2) over hits, over the ideal."""
    disc = 1.0 / np.log2(np.arange(k) + 2.0)
    vals = []
    for r, t in zip(ranked, truth):
        if not t:
            continue
        hits = np.array([int(x) in t for x in r[:k].tolist()] + [False] * (k - min(k, len(r))), dtype=float)
        vals.append(float((hits * disc).sum() / disc[: min(len(t), k)].sum()))
    return float(np.mean(vals)) if vals else float("nan")


def _topk_masked(scores: np.ndarray, ids: np.ndarray, seen: list[np.ndarray], k: int) -> np.ndarray:
    """Top-k ids per row of a dense (users, items) score matrix after masking seen items."""
    scores = scores.copy()
    pos = pd.Index(ids)
    for j, s in enumerate(seen):
        if len(s):
            cols = pos.get_indexer(s)
            scores[j, cols[cols >= 0]] = -np.inf
    kk = min(k, scores.shape[1])
    part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return ids[np.take_along_axis(part, order, axis=1)]


def with_popularity_prior(
    queries: np.ndarray, items: np.ndarray, counts: np.ndarray, temperature: float, beta: float
) -> tuple[np.ndarray, np.ndarray]:
    """Append one coordinate so that ``q' . v' = q . v + beta * T * log q(i)`` (see ``popularity_prior``)."""
    logq = np.log(np.maximum(counts, 0.5) / max(float(counts.sum()), 1.0)).astype(np.float32)
    q2 = np.hstack([queries, np.full((len(queries), 1), beta, np.float32)])
    v2 = np.hstack([items, (temperature * logq)[:, None]])
    return np.ascontiguousarray(q2, np.float32), np.ascontiguousarray(v2, np.float32)


def _metrics(ranked: np.ndarray, truth: list[set[int]], cfg: RetrievalEvalConfig) -> dict[str, float]:
    out = {f"Recall@{k}": recall_at_k(ranked, truth, k) for k in cfg.ks}
    out[f"NDCG@{cfg.ndcg_k}"] = ndcg_at_k(ranked, truth, cfg.ndcg_k)
    return out


def fit_towers(
    train_log: EventLog, users: np.ndarray, at_ms: int, model: TwoTowerConfig, members: int, epochs: int, progress: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
    """Train ``members`` two-towers (seeds ``model.seed + i``) and stack them into one inner-product space.

    Returns (item ids, queries (n_users, members*d), item vectors (n_items, members*d), item
    training counts, last member's fit summary); ``queries @ items.T`` is the members' mean score.
    """
    qs, vs = [], []
    fit: dict = {}
    for member in range(members):
        trainer = OnlineTrainer(replace(model, seed=model.seed + member))
        fit = trainer.fit(train_log, epochs=epochs, progress=progress)
        qs.append(trainer.user_vectors(users, at_ms=at_ms) / members)
        member_ids, v = trainer.item_vectors()
        if member == 0:
            ids, counts = member_ids, trainer.item_counts[: len(member_ids)]
        else:  # align rows by raw id (row order follows each member's training order)
            rows = pd.Index(member_ids).get_indexer(ids)
            if (rows < 0).any():
                raise ValueError(f"ensemble member {member} has no vector for {int((rows < 0).sum())} items of member 0")
            v = v[rows]
        vs.append(v)
    return ids, np.hstack(qs), np.hstack(vs), counts, fit


def evaluate(log_: EventLog, config: RetrievalEvalConfig | None = None, progress: bool = False) -> dict[str, dict[str, float]]:
    """Rows ``{method: {metric: value}}`` plus ``"_info"`` (split sizes, timings)."""
    cfg = config or RetrievalEvalConfig()
    train_log, test_ev, split_ms = temporal_split(log_, cfg.train_fraction)
    train_pos = positives(EventBatch.from_frame(train_log.events)).to_frame()
    test_pos = positives(EventBatch.from_frame(test_ev)).to_frame()
    seen_by_user = train_pos.groupby("user_id").item_id.unique()
    truth_by_user = test_pos.groupby("user_id").item_id.agg(lambda s: set(s.tolist()))
    users = np.array(sorted(set(seen_by_user.index) & set(truth_by_user.index)), dtype=np.int64)
    if len(users) == 0:
        raise ValueError("no user has positives on both sides of the split")
    truth = [truth_by_user[u] for u in users.tolist()]
    seen = [np.asarray(seen_by_user[u], dtype=np.int64) if cfg.exclude_seen else np.empty(0, np.int64) for u in users.tolist()]
    kmax = max(max(cfg.ks), cfg.ndcg_k)
    rows: dict[str, dict[str, float]] = {}

    # popularity baselines (all-time counts, and recency-decayed)
    for name, half_life in (("popularity", None), ("popularity-recent", cfg.recent_half_life_days * 86_400_000.0)):
        pop = Popularity(half_life)
        pop.update(train_pos.item_id.to_numpy(), train_pos.ts_ms.to_numpy())
        pid, psc = pop.scores()
        rows[name] = _metrics(_topk_masked(np.tile(psc, (len(users), 1)), pid, seen, kmax), truth, cfg)

    # two-tower
    model_cfg = replace(
        cfg.model,
        num_users=int(log_.events.user_id.nunique()) + 1,
        num_items=int(log_.events.item_id.nunique()) + 1,
        num_categories=int(log_.items.category.nunique()) + 1 if log_.items is not None and "category" in log_.items else 1,
    )
    t0 = time.perf_counter()
    ids, q, vecs, counts, fit = fit_towers(train_log, users, split_ms, model_cfg, cfg.ensemble, cfg.epochs, progress)
    fit_s = time.perf_counter() - t0
    if cfg.popularity_prior:
        q, vecs = with_popularity_prior(q, vecs, counts, model_cfg.temperature, cfg.popularity_prior)
    t0 = time.perf_counter()
    rows["two-tower (exact)"] = _metrics(_topk_masked(q @ vecs.T, ids, seen, kmax), truth, cfg)
    exact_s = time.perf_counter() - t0

    index = ItemIndex(vecs.shape[1], cfg.index)
    index.build(ids, vecs)
    extra = max(len(s) for s in seen)
    t0 = time.perf_counter()
    _, found = index.search(q, min(kmax + extra, len(ids)))
    ranked = np.full((len(users), kmax), -1, dtype=np.int64)
    for j, (row, s) in enumerate(zip(found, seen)):
        row = row[(row >= 0) & ~np.isin(row, s)][:kmax]
        ranked[j, : len(row)] = row
    rows[f"two-tower (faiss {index.kind})"] = _metrics(ranked, truth, cfg)
    faiss_s = time.perf_counter() - t0
    rows["_info"] = {
        "train_events": float(len(train_pos)), "test_events": float(len(test_pos)), "test_users": float(len(users)),
        "items": float(len(ids)), "fit_seconds": fit_s, "final_loss": fit.get("loss", float("nan")),
        "exact_seconds": exact_s, "faiss_seconds": faiss_s, "split_ms": float(split_ms),
    }  # fmt: skip
    log.info("retrieval eval: %s", rows["_info"])
    return rows


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table of the method rows (``_info`` left out)."""
    methods = [m for m in rows if not m.startswith("_")]
    cols = list(rows[methods[0]])
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{rows[m][c]:.4f}" for c in cols) + " |")
    return "\n".join(lines)


#: Settings chosen on MovieLens validation slices inside the training period only (cuts at
#: 70/80/90% of the first 80% of events, metrics averaged; the test period was never used):
#: 32-d towers, a log-popularity prior (beta 2) and an ensemble of 3 seeds. Rule: beat
#: popularity on all three averaged validation metrics with the widest smallest margin.
#: Validation (popularity R@50 0.104, R@100 0.162, NDCG@10 0.199): one model, beta 2:
#: 0.125 / 0.174 / 0.213 (margin +0.013); 3 seeds, beta 2: 0.125 / 0.179 / 0.218 (margin
#: +0.017, the widest of ensembles 1/3/5 x beta 1/2/3). Used by ``tandem retrieval``.
TUNED = RetrievalEvalConfig(
    epochs=10,
    popularity_prior=2.0,
    ensemble=3,
    model=replace(RetrievalEvalConfig().model, embedding_dim=32, out_dim=32, user_id_dropout=0.5),
)
