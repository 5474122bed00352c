"""Candidate generation: user vector -> FAISS top-k -> ``Candidates`` payload for devices.

Unknown users get the time-decayed popularity list, flagged ``fallback="popular"``
(or ``UnknownUser`` in strict mode). Availability (streams going live/offline)
is kept as per-item transitions, so a query ``at_ms`` in the past sees what was
live then; items never mentioned by availability events are always available
(feeds, movies).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Sequence

import numpy as np

from cloud_recsys.availability import Availability
from streams.candidates import Candidates, quantize_rows
from cloud_recsys.index import IndexConfig, ItemIndex
from cloud_recsys.popularity import Popularity
from cloud_recsys.recall import merge_channels
from cloud_recsys.trainer import OnlineTrainer
from streams.batch import EventBatch
from streams.schema import MAX_ID, MAX_TS_MS

log = logging.getLogger(__name__)

#: Largest k a request may ask for.
MAX_K: int = 1000


class UnknownUser(KeyError):
    """A strict request for a user the model has never seen."""


class CandidateService:
    """Serves top-k candidates from the trainer's towers through a hot-swappable index.

    Args:
        trainer: the online two-tower trainer (user vectors at query time, item vectors at refresh).
        index_config: FAISS index kind and search knobs.
        k: default candidates per request.
        exclude_seen: drop items in the user's recent history (standard for MovieLens; off for
            feeds where re-engagement is normal).
        popularity: fallback ranking (default: the trainer's, fed by the same stream).
    """

    def __init__(
        self,
        trainer: OnlineTrainer,
        index_config: IndexConfig | None = None,
        k: int = 100,
        exclude_seen: bool = False,
        popularity: Popularity | None = None,
    ) -> None:
        self.trainer = trainer
        self.index = ItemIndex(trainer.config.out_dim, index_config)
        self.default_k = self.check_k(k)
        self.exclude_seen = exclude_seen
        self.popularity = popularity if popularity is not None else trainer.popularity
        self.availability = Availability()
        self.model_version = 0
        self.stats: dict[str, int] = {"requests": 0, "users_served": 0, "fallbacks": 0, "unknown_strict": 0, "refreshes": 0}
        self.latency_s: deque[float] = deque(maxlen=2048)
        self._stats_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        if len(trainer.items):
            self.refresh()

    # -- model refresh -----------------------------------------------------------------
    def refresh(self) -> int:
        """Re-export item vectors, build a new index off the hot path and swap it in.

        Bumps ``trainer.version``; returns the new model version.
        """
        with self._refresh_lock:
            ids, vecs = self.trainer.item_vectors()
            fresh = ItemIndex(self.index.dim, self.index.config)
            if len(ids):
                fresh.build(ids, vecs)
            self.index.swap(fresh)
            self.trainer.version += 1
            self.model_version = self.trainer.version
            with self._stats_lock:
                self.stats["refreshes"] += 1
            log.info("refreshed candidate index: %d items, model version %d", len(ids), self.model_version)
            return self.model_version

    # -- availability ------------------------------------------------------------------
    def set_live(self, item_ids: Sequence[int] | np.ndarray, live: bool, ts_ms: int | None = None) -> None:
        """Mark items live/offline (from ``ts_ms``; default now)."""
        self.availability.set(item_ids, live, ts_ms)

    def apply_availability(self, batch: EventBatch) -> int:
        """Apply STREAM_LIVE/STREAM_OFFLINE rows of ``batch`` at their timestamps; returns rows applied."""
        return self.availability.apply(batch)

    # -- requests ----------------------------------------------------------------------
    @staticmethod
    def check_k(k: Any) -> int:
        """Validate a requested k (``ValueError`` with the reason)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise ValueError(f"k must be an integer, got {k!r}")
        if not 0 < int(k) <= MAX_K:
            raise ValueError(f"k must be in 1..{MAX_K}, got {k}")
        return int(k)

    @staticmethod
    def _check_user(user_id: Any) -> int:
        """A user id in 0..MAX_ID (``ValueError`` otherwise: ids >= 2^63 would overflow int64)."""
        if isinstance(user_id, bool) or not isinstance(user_id, (int, np.integer)) or not 0 <= int(user_id) <= MAX_ID:
            raise ValueError(f"user_id must be an integer in 0..{MAX_ID}, got {user_id!r}")
        return int(user_id)

    def candidates(self, user_id: int, k: int | None = None, at_ms: int | None = None, strict: bool = False) -> Candidates:
        """Top-``k`` live candidates for one user, best first.

        Raises:
            ValueError: bad ``user_id`` or ``k``.
            UnknownUser: ``strict`` and the user is unknown (otherwise: popularity, flagged).
        """
        return self.candidates_batch([user_id], k, at_ms, strict)[0]

    def candidates_batch(
        self, user_ids: Sequence[int] | np.ndarray, k: int | None = None, at_ms: int | None = None, strict: bool = False
    ) -> list[Candidates]:
        """``candidates`` for many users with one tower pass and one index search."""
        t0 = time.perf_counter()
        k = self.default_k if k is None else self.check_k(k)
        users = np.array([self._check_user(u) for u in user_ids], dtype=np.int64)
        if at_ms is not None and (
            isinstance(at_ms, bool) or not isinstance(at_ms, (int, np.integer)) or not 0 <= int(at_ms) <= MAX_TS_MS
        ):
            raise ValueError(f"at_ms must be an integer in 0..{MAX_TS_MS}, got {at_ms!r}")
        known = self.trainer.known_users(users) if len(users) else np.zeros(0, bool)
        if strict and not known.all():
            with self._stats_lock:
                self.stats["unknown_strict"] += 1
            raise UnknownUser(f"unknown user(s): {users[~known][:10].tolist()}")
        blocked = self.availability.offline(at_ms)
        out: list[Candidates | None] = [None] * len(users)
        idx_known = np.flatnonzero(known)
        if len(idx_known) and len(self.index):
            q = self.trainer.user_vectors(users[idx_known], at_ms)
            seen: list[np.ndarray] = [np.empty(0, np.int64)] * len(idx_known)
            extra = 0
            if self.exclude_seen:
                rows = self.trainer.users.lookup(users[idx_known])
                seen = [self.trainer.items.to_raw(self.trainer.history.read(np.array([r]))[0]) for r in rows.tolist()]
                extra = max(len(s) for s in seen)
            scores, ids = self.index.search(q, k + extra, blocked=blocked)
            interest = self.trainer.interest_vectors(users[idx_known])
            alt_ids = np.zeros((0, 0), np.int64)
            if interest:
                _, alt_ids = self.index.search(np.stack(list(interest.values())), k + extra, blocked=blocked)
            alt_row = {j: r for r, j in enumerate(interest)}
            for j, pos in enumerate(idx_known.tolist()):
                keep = (ids[j] >= 0) & ~np.isin(ids[j], seen[j])
                top, top_s = ids[j][keep][:k], scores[j][keep][:k]
                vecs = None
                r = alt_row.get(j)
                if r is not None:
                    alt = alt_ids[r][(alt_ids[r] >= 0) & ~np.isin(alt_ids[r], seen[j])]
                    top = merge_channels(ids[j][keep], alt, k, self.trainer.interest_share)
                    vecs, _ = self.index.vectors(top)
                    top_s = (vecs @ q[j]).astype(np.float32)  # the main model's score for every candidate
                    order = np.argsort(-top_s, kind="stable")
                    top, top_s, vecs = top[order], top_s[order], vecs[order]
                out[pos] = self._pack(int(users[pos]), top, top_s, at_ms, None, vecs)
        for pos in range(len(users)):
            if out[pos] is None:
                pid, psc = self.popularity.top(k, exclude=blocked)
                out[pos] = self._pack(int(users[pos]), pid, psc, at_ms, "popular")
        dt = time.perf_counter() - t0
        with self._stats_lock:
            self.stats["requests"] += 1
            self.stats["users_served"] += len(users)
            self.stats["fallbacks"] += sum(1 for c in out if c is not None and c.fallback)
            self.latency_s.append(dt)
        return out  # type: ignore[return-value]

    def _pack(
        self, user_id: int, ids: np.ndarray, scores: np.ndarray, at_ms: int | None, fallback: str | None, vecs: np.ndarray | None = None
    ) -> Candidates:
        """The payload for ``ids``; ``vecs`` are their index vectors when the caller already fetched them."""
        if vecs is None:
            vecs, _ = self.index.vectors(ids)
        q, scale = quantize_rows(vecs) if len(ids) else (np.zeros((0, self.index.dim), np.int8), np.zeros(0, np.float32))
        return Candidates(
            user_id=user_id,
            item_ids=np.asarray(ids, dtype=np.int64),
            scores=np.asarray(scores, dtype=np.float32),
            emb_q=q,
            emb_scale=scale,
            model_version=self.model_version,
            computed_at_ms=int(at_ms) if at_ms is not None else int(time.time() * 1000),
            fallback=fallback,
        )

    def metrics(self) -> dict[str, Any]:
        """Counters, latency percentiles and model state (for /metrics)."""
        with self._stats_lock:
            lat = np.array(self.latency_s) * 1000.0
            stats = dict(self.stats)
        return {
            **stats,
            "latency_ms_p50": float(np.percentile(lat, 50)) if len(lat) else None,
            "latency_ms_p99": float(np.percentile(lat, 99)) if len(lat) else None,
            "model_version": self.model_version,
            "items_indexed": len(self.index),
            "index_kind": self.index.kind,
            "events_trained": self.trainer.events_trained,
            "known_users": len(self.trainer.users),
            "offline_items": int(len(self.availability.offline())),
        }
