"""The two-tower engine: cloud_recsys' OnlineTrainer, CandidateService, RefreshHook, Aggregator.

Kept apart from engines.py so the popularity engine imports no torch/faiss.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from streams.batch import EventBatch
from tandem.services.settings import CloudSettings

log = logging.getLogger(__name__)


class TwoTowerGlue:
    """Owns the trainer, the candidate service (FAISS index), the refresh hook and the aggregator.

    Args:
        settings: ``num_users``/``num_items`` (id-map capacities), ``embedding_dim`` (tables and
            tower outputs: the width devices receive), ``k`` (default candidates).
    """

    def __init__(self, settings: CloudSettings) -> None:
        import faiss  # noqa: F401  (torch then faiss: one import order, see STYLE.md)

        from cloud_recsys.aggregate import Aggregator
        from cloud_recsys.config import TwoTowerConfig
        from cloud_recsys.refresh import RefreshHook, RefreshSchedule
        from cloud_recsys.service import CandidateService
        from cloud_recsys.trainer import OnlineTrainer

        self.settings = settings
        config = TwoTowerConfig(
            num_users=settings.num_users,
            num_items=settings.num_items,
            embedding_dim=settings.embedding_dim,
            out_dim=settings.embedding_dim,
        )
        self.trainer = OnlineTrainer(config)
        self.service = CandidateService(self.trainer, k=settings.k)
        # The worker decides when to refresh (RefreshHook.refresh); the hook's own schedule is unused.
        self.hook = RefreshHook(self.service, RefreshSchedule(every_events=10**12))
        self.aggregator = Aggregator()
        self.rounds = 0

    @property
    def version(self) -> int:
        return int(self.service.model_version)

    def train(self, batch: EventBatch) -> None:
        self.trainer.train_batch(batch)

    def apply_availability(self, batch: EventBatch) -> None:
        self.service.apply_availability(batch)

    def apply_updates(self, updates: list[Any]) -> None:
        self.rounds += 1
        summary = self.aggregator.aggregate_round(self.rounds, updates, self.hook)
        log.debug("aggregated round %d: %s", self.rounds, summary)

    def refresh(self) -> int:
        return int(self.hook.refresh())

    def topk(self, user_id: int, k: int, at_ms: int) -> np.ndarray:
        return self.service.candidates(int(user_id), k, at_ms or None).item_ids

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.trainer.save(path / "trainer")
        (path / "serving.json").write_text(json.dumps({"model_version": self.version, "availability": self._availability_state()}))

    def load(self, path: Path) -> None:
        self.trainer.load(path / "trainer")
        serving = json.loads((path / "serving.json").read_text())
        self._load_availability(serving.get("availability"))
        self.trainer.version = int(serving["model_version"]) - 1
        self.service.refresh()  # rebuild the index from the restored towers (same version as saved)

    def _availability_state(self) -> dict[str, Any]:
        return self.service.availability.state_dict()

    def _load_availability(self, state: dict[str, Any] | None) -> None:
        if state:
            self.service.availability.load_state_dict(state)

    def http_app(self) -> Any:
        from cloud_recsys.http import create_app

        return create_app(self.service)
