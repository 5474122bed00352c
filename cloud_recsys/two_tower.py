"""The cloud retrieval model: a TorchRec two-tower with in-batch sampled softmax.

Sparse features live in one ``EmbeddingBagCollection`` (tables ``t_user``,
``t_item``, ``t_category``); the user's recent-item history is a mean-pooled
jagged bag over the *item* table, so users and items share item knowledge. Both
towers end L2-normalised, and the score is ``dot / temperature`` - the FAISS
index uses inner product to match (unlike TorchRec's example, which uses L2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from cloud_recsys.config import TwoTowerConfig


def mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int) -> nn.Sequential:
    """ReLU MLP ending in a linear layer of ``out_dim``."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


def embedding_tables(config: TwoTowerConfig) -> list[EmbeddingBagConfig]:
    """Table configs; each has the id map's capacity + 1 shared overflow row."""
    d = config.embedding_dim
    return [
        EmbeddingBagConfig(name="t_user", embedding_dim=d, num_embeddings=config.num_users + 1, feature_names=["user_id"], pooling=PoolingType.SUM),
        EmbeddingBagConfig(name="t_item", embedding_dim=d, num_embeddings=config.num_items + 1, feature_names=["item_id", "history"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="t_category", embedding_dim=d, num_embeddings=config.num_categories + 1, feature_names=["category"], pooling=PoolingType.SUM),
    ]  # fmt: skip


class TwoTower(nn.Module):
    """User tower (user id + history bag) and item tower (item id + category).

    Args:
        config: sizes (see ``TwoTowerConfig``).
        device: where the tables are allocated ("meta" for DMP sharding).
        sparse_grad: row-sparse embedding gradients (False for DMP, which fuses the optimizer).
    """

    def __init__(self, config: TwoTowerConfig, device: torch.device | None = None, sparse_grad: bool = True) -> None:
        super().__init__()
        self.config = config
        self.ebc = EmbeddingBagCollection(tables=embedding_tables(config), device=device or torch.device("cpu"))
        if sparse_grad:
            # Row-sparse gradients: backward and Adagrad touch only the rows in the batch,
            # not the whole table (the unsharded CPU path; DMP uses fused kernels instead).
            for bag in self.ebc.embedding_bags.values():
                bag.sparse = True
        d = config.embedding_dim
        self.user_mlp = mlp(2 * d, config.user_hidden, config.out_dim)
        self.item_mlp = mlp(2 * d, config.item_hidden, config.out_dim)

    def _pooled(self, features: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        return self.ebc(features).to_dict()

    def user_tower(self, features: KeyedJaggedTensor, user_id_keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, out_dim) unit user vectors; ``user_id_keep`` (B, 1) masks the id embedding (dropout)."""
        p = self._pooled(features)
        uid = p["user_id"] if user_id_keep is None else p["user_id"] * user_id_keep
        return F.normalize(self.user_mlp(torch.cat([uid, p["history"]], dim=1)), dim=1)

    def item_tower(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """(B, out_dim) unit item vectors."""
        p = self._pooled(features)
        return F.normalize(self.item_mlp(torch.cat([p["item_id"], p["category"]], dim=1)), dim=1)

    def forward(self, features: KeyedJaggedTensor, user_id_keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Both towers from one KJT carrying user and item features of B examples."""
        p = self._pooled(features)
        uid = p["user_id"] if user_id_keep is None else p["user_id"] * user_id_keep
        u = F.normalize(self.user_mlp(torch.cat([uid, p["history"]], dim=1)), dim=1)
        v = F.normalize(self.item_mlp(torch.cat([p["item_id"], p["category"]], dim=1)), dim=1)
        return u, v


def in_batch_logits(
    user: torch.Tensor,
    item: torch.Tensor,
    item_rows: torch.Tensor,
    temperature: float,
    log_q: torch.Tensor | None = None,
    mask_accidental_hits: bool = True,
) -> torch.Tensor:
    """(B, B) logits of every user against every in-batch item (diagonal = positives).

    Args:
        user / item: unit vectors (B, d).
        item_rows: (B,) item rows, to find accidental hits (same item elsewhere in batch).
        log_q: (B,) log sampling probability of each in-batch item; subtracted (logQ
            correction, Yi et al. 2019) so popular items are not over-penalised as negatives.
        mask_accidental_hits: set off-diagonal copies of the positive item to -inf.
    """
    logits = user @ item.T / temperature
    if log_q is not None:
        logits = logits - log_q[None, :]
    if mask_accidental_hits:
        same = item_rows[:, None] == item_rows[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    return logits


def sampled_softmax_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the diagonal as the target class."""
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))
