"""Where aggregated device updates enter the cloud model, and when the index is refreshed.

The device/aggregation side (tandem/strategies/aggregate.py, tandem/strategies) calls
one ``RefreshHook`` per cloud model:

* parameter family -> ``apply_embedding_deltas({raw id: delta}, table="item"|"user", space=...)``:
  ``space="table"`` deltas (``embedding_dim``) go into the sparse table rows;
  ``space="output"`` deltas (``out_dim``: the item features devices receive in
  ``Candidates``) are output-space residuals. ``apply_item_deltas`` (the aggregator's
  entry) is always output space; "auto" picks by width and refuses when the widths match.
* feature family -> ``apply_user_vectors({raw user id: vector}, share)``: uploaded
  interest vectors become a second recall channel for the user (``cloud_recsys.recall``;
  the query of a user the model has not seen) at once - no index refresh needed.
* data family -> ``add_training_examples(EventBatch)``: consented examples trained on
  like stream events.

Item-side changes reach serving only when the index is rebuilt: ``observe`` counts
events and refreshes when the ``RefreshSchedule`` says so; ``refresh`` forces it.
The ``apply_item_deltas`` / ``set_user_vectors`` aliases make the hook an
``AggregationTarget`` for those two families.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from cloud_recsys.service import CandidateService
from streams.batch import EventBatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefreshSchedule:
    """Refresh after ``every_events`` applied events or ``every_ms`` of (log or wall) time, whichever first.

    Both None: never automatically (call ``RefreshHook.refresh``).
    """

    every_events: int | None = None
    every_ms: int | None = None

    def __post_init__(self) -> None:
        for name in ("every_events", "every_ms"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"RefreshSchedule.{name} must be positive or None, got {v}")

    def due(self, events_since: int, ms_since: int) -> bool:
        return (self.every_events is not None and events_since >= self.every_events) or (
            self.every_ms is not None and ms_since >= self.every_ms
        )


class RefreshHook:
    """Applies device contributions to the cloud model and refreshes the serving index.

    Args:
        service: the candidate service whose trainer and index are updated.
        schedule: when ``observe`` triggers a refresh.
    """

    def __init__(self, service: CandidateService, schedule: RefreshSchedule | None = None) -> None:
        self.service = service
        self.trainer = service.trainer
        self.schedule = schedule or RefreshSchedule(every_events=5000)
        self._events_since = 0
        self._last_ms: int | None = None
        self._pending_item_changes = 0
        self._lock = threading.Lock()

    # -- the three update families -------------------------------------------------------
    def apply_embedding_deltas(self, deltas: dict[int, np.ndarray], table: str = "item", space: str = "auto") -> int:
        """Add aggregated deltas to embedding rows (raw id -> delta); returns rows changed.

        Additive, so not idempotent: replayed envelopes are rejected upstream
        (``UpdateVerifier`` "replayed"). Item rows count towards the refresh schedule
        (serving sees them only after the index is rebuilt); user rows do not (user
        vectors are computed at query time).
        """
        n = self.trainer.apply_embedding_deltas(table, deltas, space)
        if table == "item":
            with self._lock:
                self._pending_item_changes += n
        return n

    def apply_user_vectors(self, vectors: dict[int, np.ndarray], share: float | None = None) -> int:
        """Uploaded user-interest vectors (raw user id -> (out_dim,)); used at query time at once.

        Idempotent: a vector replaces the user's previous upload (channels are merged at
        query time), so applying the same update twice changes nothing.
        """
        return self.trainer.set_user_vectors(vectors, share)

    def add_training_examples(self, batch: EventBatch) -> dict[str, float]:
        """Train on consented device examples (positives of ``batch``) like stream events."""
        m = self.trainer.train_batch(batch)
        self.observe(int(m.get("n", 0)), int(batch.ts_ms.max()) if len(batch) else None)
        return m

    # AggregationTarget-compatible names (tandem/strategies/aggregate.py)
    def apply_item_deltas(self, deltas: dict[int, np.ndarray]) -> None:
        """Aggregated device item-row deltas: devices hold the candidate features, i.e. output space."""
        self.apply_embedding_deltas(deltas, table="item", space="output")

    def set_user_vectors(self, vectors: dict[int, np.ndarray]) -> None:
        self.apply_user_vectors(vectors)

    # -- scheduling ------------------------------------------------------------------------
    def observe(self, n_events: int, now_ms: int | None = None) -> int | None:
        """Count applied events; refresh when the schedule is due. Returns the new version or None.

        Args:
            n_events: events just trained on.
            now_ms: log time of the latest event (wall-clock time when None).
        """
        now = int(time.time() * 1000) if now_ms is None else int(now_ms)
        with self._lock:
            if self._last_ms is None:
                self._last_ms = now
            self._events_since += int(n_events)
            due = self.schedule.due(self._events_since + self._pending_item_changes, now - self._last_ms)
        return self.refresh(now) if due else None

    def refresh(self, now_ms: int | None = None) -> int:
        """Re-export item vectors and hot-swap the index now; returns the new model version."""
        version = self.service.refresh()
        with self._lock:
            self._events_since = 0
            self._pending_item_changes = 0
            self._last_ms = int(time.time() * 1000) if now_ms is None else int(now_ms)
        return version
