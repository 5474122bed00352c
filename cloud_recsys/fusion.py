"""The ranking stage over merged recall channels: a small model on channel features, trained online.

Why learned and not fixed weights: how much the two-tower, item-to-item, trending and
repeat signals are worth differs by log (livestreams are mostly repeats, click sessions
mostly next-item, feeds mostly taste), and weights tuned on one log would be tuned to it.
The fusion model learns them from the stream itself, test-then-train: every ingested
mini-batch contributes lists the cloud would have served just before each event, with
the consumed item as the label (listwise softmax over the merged candidates).

The score is a linear term (initialised to a sensible prior, so the first lists are
not random) plus a small MLP whose output layer starts at zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

#: Names of the per-candidate features (``cloud_recsys.recommender`` computes them).
FEATURES: tuple[str, ...] = (
    "two_tower_z",  # query . item, standardised over the request's candidates
    "i2i_after",  # log1p(50 * co-occurrence after the session's recent items)
    "i2i_before",  # the same, reversed direction
    "i2i_last",  # log1p(50 * co-occurrence after the session's last item alone)
    "i2i_rank",  # 1 / (1 + rank) in the item-to-item list
    "pop_day",  # log relative popularity, 1-day half-life
    "pop_week",  # 7-day half-life
    "pop_all",  # all-time counts
    "rep16",  # log1p(times in the session's last 16 items) (LiveRec's REP)
    "recency_10m",  # exp(-time since last consumed / 10 min), 0 when not in the session
    "recency_1h",
    "recency_1d",
    "is_last",  # the session's most recent item
    "interest",  # device interest vector . item (feature collaboration), standardised
    "sknn",  # log1p(50 * share of the session neighbours' votes) (V-SkNN)
)
N_FEATURES = len(FEATURES)
_PRIOR = {"two_tower_z": 0.5, "i2i_after": 1.0, "i2i_rank": 1.0, "i2i_before": 0.5, "sknn": 0.5, "pop_day": 0.3, "pop_week": 0.3, "rep16": 0.5, "recency_1h": 0.5}


@dataclass(frozen=True)
class FusionConfig:
    """Args:
    hidden: MLP width.
    lr: Adam learning rate.
    steps: optimizer steps per ingested mini-batch.
    seed: init seed.
    """

    hidden: int = 32
    lr: float = 0.01
    steps: int = 8
    seed: int = 0


class FusionRanker(nn.Module):
    """Scores merged candidates from their channel features (see module docstring)."""

    def __init__(self, config: FusionConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or FusionConfig()
        g = torch.Generator().manual_seed(cfg.seed)
        self.linear = nn.Linear(N_FEATURES, 1, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[_PRIOR.get(f, 0.0) for f in FEATURES]]))
        self.mlp = nn.Sequential(nn.Linear(N_FEATURES, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 1))
        with torch.no_grad():
            w = self.mlp[0].weight
            w.copy_(torch.randn(w.shape, generator=g) * (1.0 / np.sqrt(N_FEATURES)))
            self.mlp[2].weight.zero_()
            self.mlp[2].bias.zero_()
        self.opt = torch.optim.Adam(self.parameters(), lr=cfg.lr)
        self.steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., N_FEATURES) -> (...) scores."""
        return (self.linear(x) + self.mlp(x)).squeeze(-1)

    @torch.no_grad()
    def score(self, x: np.ndarray) -> np.ndarray:
        """Scores of a (m, N_FEATURES) float32 array."""
        if len(x) == 0:
            return np.zeros(0, np.float32)
        return self(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    def learn(self, lists: list[np.ndarray], targets: list[int]) -> float:
        """Listwise softmax steps: in each (m_i, F) list the row ``targets[i]`` was consumed."""
        if not lists:
            return float("nan")
        m = max(len(x) for x in lists)
        b = len(lists)
        x = np.zeros((b, m, N_FEATURES), np.float32)
        mask = np.zeros((b, m), bool)
        for j, f in enumerate(lists):
            x[j, : len(f)] = f
            mask[j, : len(f)] = True
        xt, mt = torch.from_numpy(x), torch.from_numpy(mask)
        y = torch.tensor(targets, dtype=torch.int64)
        loss_v = float("nan")
        for _ in range(self.config.steps):
            logits = self(xt).masked_fill(~mt, -1e9)
            loss = nn.functional.cross_entropy(logits, y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            loss_v = float(loss.detach())
            self.steps += 1
        return loss_v
