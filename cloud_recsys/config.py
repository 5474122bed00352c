"""Typed configuration of the cloud two-tower model and its trainer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TwoTowerConfig:
    """Sizes and training knobs of the cloud two-tower retrieval model.

    Args:
        num_users / num_items / num_categories: id-map capacities (tables get one extra
            shared overflow row, see ``cloud_recsys.ids.IdMap``).
        embedding_dim: width of every sparse embedding table.
        history_len: recent positive items per user (mean-pooled bag over the item table).
        user_hidden / item_hidden: MLP hidden widths of each tower.
        out_dim: width of the L2-normalised tower outputs (what the index stores).
        temperature: logits are ``dot / temperature``.
        lr_sparse: Adagrad learning rate of the embedding tables.
        lr_dense: Adam learning rate of the MLPs.
        weight_decay: Adam weight decay of the MLPs.
        batch_size: training mini-batch (in-batch negatives: larger is harder).
        logq_correction: subtract log sampling probability of each in-batch negative.
        mask_accidental_hits: drop in-batch "negatives" that are the positive item itself.
        user_id_dropout: probability of zeroing the user-id embedding in training, so the
            history bag carries the signal (helps users with few events).
        seed: parameter init and any sampling.
    """

    num_users: int = 10_000
    num_items: int = 10_000
    num_categories: int = 64
    embedding_dim: int = 64
    history_len: int = 20
    user_hidden: tuple[int, ...] = (128,)
    item_hidden: tuple[int, ...] = (128,)
    out_dim: int = 64
    temperature: float = 0.05
    lr_sparse: float = 0.05
    lr_dense: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 256
    logq_correction: bool = True
    mask_accidental_hits: bool = True
    user_id_dropout: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_users", "num_items", "num_categories", "embedding_dim", "history_len", "out_dim", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TwoTowerConfig.{name} must be positive, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.user_id_dropout < 1.0:
            raise ValueError(f"user_id_dropout must be in [0, 1), got {self.user_id_dropout}")
