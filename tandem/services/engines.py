"""Model sides the cloud worker can drive.

* ``RecommenderEngine`` (default, recommender_engine.py): the evaluation's cloud
  (``CloudRecommender``) and the strategy's server side (``StrategyCloud``), served.
* ``PopularityEngine``: time-decayed item popularity with live-stream filtering. Cheap
  (no torch), so the load benchmark and fault tests measure delivery, not training, on
  shared CPUs; it serves the same candidate HTTP API.

Device updates are verified by ``device_rerank`` (HMAC envelopes) in both engines.
"""

from __future__ import annotations

import json
import logging
import threading
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
from fastapi import FastAPI

from streams.candidates import Candidates, candidates_to_json, quantize_rows
from cloud_recsys.availability import Availability
from streams.batch import EventBatch
from streams.schema import POSITIVE_KINDS
from tandem.services.candidate_api import BatchBody, guard, parse_query
from tandem.services.settings import CloudSettings

log = logging.getLogger(__name__)

_POS = np.array(sorted(int(k) for k in POSITIVE_KINDS), dtype=np.uint8)


# The candidate wire format (JSON) is the contract's own (streams.candidates): one definition for every engine.


def item_features(item_ids: np.ndarray, dim: int) -> np.ndarray:
    """Fixed pseudo-random unit vectors per item id (the popularity engine's item features)."""
    out = np.empty((len(item_ids), dim), dtype=np.float32)
    for row, item in enumerate(item_ids):
        rng = np.random.default_rng(zlib.crc32(int(item).to_bytes(8, "little", signed=True)))
        v = rng.standard_normal(dim).astype(np.float32)
        out[row] = v / max(1e-6, float(np.linalg.norm(v)))
    return out


class PopularityEngine:
    """Time-decayed item popularity, filtered by live availability.

    Args:
        settings: cloud settings (``embedding_dim`` sizes the item features sent to devices).
        half_life_events: popularity halves every this many positive events.
    """

    def __init__(self, settings: CloudSettings, half_life_events: float = 20_000.0) -> None:
        self.settings = settings
        self.decay = 0.5 ** (1.0 / half_life_events)
        self.version = 0
        self.counts: dict[int, float] = {}
        self.availability = Availability(max_transitions=32)
        self.updates_seen = 0
        self._weight = 1.0  # global multiplier instead of decaying every count
        self._served: tuple[np.ndarray, np.ndarray] = (np.empty(0, np.int64), np.empty(0, np.float32))
        self._lock = threading.Lock()

    def train(self, batch: EventBatch) -> None:
        pos = np.isin(batch.kind, _POS)
        if not pos.any():
            return
        items, n = np.unique(batch.item_id[pos], return_counts=True)
        with self._lock:
            self._weight /= self.decay ** int(pos.sum())
            for item, c in zip(items.tolist(), n.tolist()):
                self.counts[item] = self.counts.get(item, 0.0) + c * self._weight
            if self._weight > 1e12:  # renormalize before float overflow
                self.counts = {i: v / self._weight for i, v in self.counts.items()}
                self._weight = 1.0
            if len(self.counts) > 4 * self.settings.num_items:  # bounded memory: keep the most popular
                keep = sorted(self.counts.items(), key=lambda kv: -kv[1])[: self.settings.num_items]
                self.counts = dict(keep)
        if self.version == 0:
            self.refresh()

    def apply_availability(self, batch: EventBatch) -> None:
        """Record live/offline transitions (kept per item, so queries at a past time are right
        even when availability is consumed ahead of the interactions)."""
        self.availability.apply(batch)

    def apply_updates(self, updates: list[Any]) -> None:
        with self._lock:
            self.updates_seen += len(updates)

    def resume_versions_after(self, version: int) -> None:
        """Continue numbering after ``version`` (one announced before a restart)."""
        with self._lock:
            self.version = max(self.version, int(version))

    def refresh(self) -> int:
        with self._lock:
            items = np.fromiter(self.counts.keys(), dtype=np.int64, count=len(self.counts))
            scores = np.fromiter(self.counts.values(), dtype=np.float64, count=len(self.counts)) / self._weight
            order = np.argsort(-scores, kind="stable")[: max(self.settings.k, 100) * 4]
            self._served = (items[order], scores[order].astype(np.float32))
            self.version += 1
            return self.version

    def _available(self, k: int, at_ms: int) -> tuple[np.ndarray, np.ndarray]:
        items, scores = self._served
        keep = self.availability.live_mask(items, at_ms if at_ms > 0 else None)
        return items[keep][:k], scores[keep][:k]

    def topk(self, user_id: int, k: int, at_ms: int) -> np.ndarray:
        return self._available(k, at_ms)[0]

    def candidates(self, user_id: int, k: int, at_ms: int = 0) -> Candidates:
        items, scores = self._available(k, at_ms)
        q, scale = quantize_rows(item_features(items, self.settings.embedding_dim)) if len(items) else (
            np.zeros((0, self.settings.embedding_dim), np.int8),
            np.zeros(0, np.float32),
        )
        return Candidates(user_id, items, scores, q, scale, self.version, at_ms, fallback="popular")

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        with self._lock:
            state = {
                "version": self.version,
                "weight": self._weight,
                "counts": [[k, v] for k, v in self.counts.items()],
                "availability": self.availability.state_dict(),
                "updates_seen": self.updates_seen,
            }
        (path / "popularity.json").write_text(json.dumps(state))

    def load(self, path: Path) -> None:
        state = json.loads((path / "popularity.json").read_text())
        with self._lock:
            self.counts = {int(k): float(v) for k, v in state["counts"]}
            self._weight = float(state["weight"])
            avail = state.get("availability")
            if avail is None:  # checkpoints written before the shared Availability: [[item, [[ts, live], ...]], ...]
                avail = {str(i): [[int(t) for t, _ in h], [bool(v) for _, v in h]] for i, h in state.get("transitions", [])}
            self.availability.load_state_dict(avail)
            self.updates_seen = int(state["updates_seen"])
        self.refresh()
        self.version = int(state["version"])

    def http_app(self) -> FastAPI:
        """GET /candidates?user_id=&k=&at_ms= and POST /candidates:batch (JSON)."""
        app = guard(FastAPI(title="tandem cloud (popularity)"))

        @app.get("/candidates")
        def get_candidates(user_id: str | None = None, k: str | None = None, at_ms: str | None = None) -> dict[str, Any]:
            q = parse_query(user_id, k, at_ms)
            return candidates_to_json(self.candidates(q.user_id, q.k or self.settings.k, q.at_ms or 0))

        def post_batch(body: BatchBody) -> dict[str, Any]:
            k, at = body.k or self.settings.k, body.at_ms or 0  # sessions are unused here
            out = [self.candidates(r.user_id, k, r.at_ms if r.at_ms is not None else at) for r in body.as_requests()]
            return {"results": [candidates_to_json(c) for c in out], "model_version": self.version}

        app.post("/candidates:batch")(post_batch)
        app.post("/candidates/batch")(post_batch)

        return app


def _recommender_engine(settings: CloudSettings) -> Any:
    from tandem.services.recommender_engine import RecommenderEngine  # torch + faiss only when chosen

    return RecommenderEngine(settings)


ENGINES: dict[str, Callable[[CloudSettings], Any]] = {"recommender": _recommender_engine, "popular": PopularityEngine}


def make_engine(name: str, settings: CloudSettings) -> Any:
    """An engine by name: ``recommender`` (default) or ``popular``."""
    try:
        return ENGINES[name](settings)
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; choose one of {sorted(ENGINES)}") from None
