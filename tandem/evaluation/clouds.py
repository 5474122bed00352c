"""Cloud models the prequential loop can drive, selected by name (``tandem evaluate --cloud``).

* ``stream``: ``StreamTwoTower`` (tandem/evaluation/baselines.py), a compact numpy-id,
  plain-torch two-tower with in-batch + uniform sampled negatives, two optimizer steps
  per ingested mini-batch.
* ``torchrec``: the production model, ``cloud_recsys.trainer.OnlineTrainer`` (TorchRec
  ``EmbeddingBagCollection`` over ``KeyedJaggedTensor``, logQ-corrected in-batch
  softmax), wrapped by ``TorchRecCloud`` so it satisfies the loop's ``CloudModel``
  protocol. The adapter only sizes the model for the log, forwards the calls and
  counts refreshes; training, histories and vectors are the trainer's own.

Both are sized from the log (capacity only: ids are still assigned online, in stream
order, so nothing about the future leaks into the model).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

import numpy as np

from streams.batch import EventBatch
from streams.datasets.base import EventLog

if TYPE_CHECKING:
    from cloud_recsys.trainer import OnlineTrainer
    from tandem.evaluation.prequential import CloudModel, EvalConfig

logger = logging.getLogger(__name__)

#: Names accepted by ``make_cloud_factory`` / ``tandem evaluate --cloud``.
CLOUDS: tuple[str, ...] = ("stream", "torchrec")


class TorchRecCloud:
    """``cloud_recsys.OnlineTrainer`` as the loop's cloud (``CloudModel`` protocol).

    Args:
        trainer: the online trainer to drive.

    ``version`` counts ``refresh`` calls (the loop refreshes the served snapshot every
    ``EvalConfig.refresh_every`` events); the trainer's own ``version`` is kept in step.
    """

    def __init__(self, trainer: "OnlineTrainer") -> None:
        self.trainer = trainer
        self.version = 0

    @property
    def dim(self) -> int:
        return int(self.trainer.config.out_dim)

    def train_batch(self, batch: EventBatch) -> dict:
        return self.trainer.train_batch(batch)

    def user_vectors(self, user_ids: np.ndarray, at_ms: int | None = None) -> np.ndarray:
        return self.trainer.user_vectors(np.asarray(user_ids, dtype=np.int64), at_ms)

    def item_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        ids, vecs = self.trainer.item_vectors()
        return np.asarray(ids, dtype=np.int64), np.asarray(vecs, dtype=np.float32)

    def refresh(self) -> int:
        self.version += 1
        self.trainer.version = self.version
        return self.version


def torchrec_cloud(log: EventLog, config: "EvalConfig", batch_size: int = 64, hidden: int = 64) -> TorchRecCloud:
    """A ``TorchRecCloud`` sized for ``log``: tables hold every user/item/category of the log.

    Args:
        log: the replayed log (sizes and the item -> category side feature only).
        config: the loop's config (``cloud_dim`` = tower output width = the reranker's ``emb_dim``).
        batch_size: trainer chunk size: a loop mini-batch of ``config.batch_size`` events
            becomes ``ceil(positives / batch_size)`` optimizer steps (in-batch negatives).
        hidden: MLP hidden width of each tower.
    """
    from cloud_recsys.config import TwoTowerConfig
    from cloud_recsys.trainer import OnlineTrainer

    ev = log.events
    cats: dict[int, int] = {}
    if log.items is not None and "category" in log.items.columns:
        cats = dict(zip(log.items.item_id.astype("int64").tolist(), log.items.category.astype("int64").tolist()))
    n_cat = len(set(cats.values())) + 2
    tcfg = TwoTowerConfig(
        num_users=int(ev.user_id.nunique()) + 1,
        num_items=int(ev.item_id.nunique()) + 1,
        num_categories=n_cat,
        embedding_dim=config.cloud_dim,
        out_dim=config.cloud_dim,
        user_hidden=(hidden,),
        item_hidden=(hidden,),
        batch_size=batch_size,
        seed=config.seed,
    )
    trainer = OnlineTrainer(tcfg, item_categories=cats)
    return TorchRecCloud(trainer)


def make_cloud_factory(name: str) -> Callable[[EventLog, "EvalConfig"], "CloudModel"]:
    """Factory for ``run_prequential(cloud_factory=...)`` by name (``CLOUDS``)."""
    if name == "stream":
        from tandem.evaluation.prequential import default_cloud  # the stand-in StreamTwoTower

        return default_cloud
    if name == "torchrec":
        return torchrec_cloud
    raise ValueError(f"unknown cloud {name!r}; expected one of {CLOUDS}")


__all__ = ["CLOUDS", "TorchRecCloud", "make_cloud_factory", "torchrec_cloud"]
