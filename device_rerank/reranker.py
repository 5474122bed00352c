"""The small on-device reranker: target attention over the behaviour sequence.

Why this shape: the cloud already ranks well from long-term interest; the
device adds what the cloud cannot see in time - the last few actions. Each
candidate attends (DIN-style target attention) over the embeddings of the last
N engaged items, and a small MLP combines that interest with the cloud score
and real-time context features. A linear *prior* head starts as "cloud score
plus sensible nudges" so an untrained model is already a safe reranker, and
the MLP's last layer starts at zero so training learns corrections.

The per-user *patch* (``RerankerConfig.patch_dim`` floats) is an input, not a
parameter: an offset added to the attention query and a taste vector dotted
with the candidate embedding. Shared weights stay frozen on the device; only
the patch is fine-tuned there (``personalize.py``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from device_rerank.config import RerankerConfig

if TYPE_CHECKING:
    from device_rerank.features import RerankInputs

_MASK_NEG = -1e4


class Encoded(NamedTuple):
    """The patch-independent part of a forward pass (``Reranker.encode``)."""

    cand_emb: torch.Tensor  # (B, K, d)
    q0: torch.Tensor  # (B, K, a) query before the patch offset
    key_t: torch.Tensor  # (B, a, L)
    value: torch.Tensor  # (B, L, a)
    mask_add: torch.Tensor  # (B, 1, L)
    any_valid: torch.Tensor  # (B, 1, 1)
    side: torch.Tensor  # (B, K, ctx_dim + 2)
    prior: torch.Tensor  # (B, K) the prior head


class Reranker(nn.Module):
    """Scores K candidates for one user (or a batch of B users/snapshots).

    Args:
        config: sizes; ``config.prior`` initializes the linear prior head.
    """

    def __init__(self, config: RerankerConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or RerankerConfig()
        d, a, c, s = cfg.emb_dim, cfg.attn_dim, cfg.ctx_dim, cfg.seq_feat_dim
        self.query = nn.Linear(d, a)
        self.key = nn.Linear(d, a)
        self.key_feat = nn.Linear(s, a)
        self.value = nn.Linear(d, a)
        self.mlp_in = nn.Linear(3 * a + c + 2, cfg.hidden)
        self.mlp_out = nn.Linear(cfg.hidden, 1)
        self.prior = nn.Linear(c + 2, 1)
        if len(cfg.prior) != c + 2:
            raise ValueError(f"prior needs {c + 2} weights, got {len(cfg.prior)}")
        with torch.no_grad():
            nn.init.zeros_(self.mlp_out.weight)
            nn.init.zeros_(self.mlp_out.bias)
            self.prior.weight.copy_(torch.tensor(cfg.prior, dtype=torch.float32)[None, :])
            nn.init.zeros_(self.prior.bias)
        self._scale = 1.0 / math.sqrt(a)

    def forward(
        self,
        cand_emb: torch.Tensor,
        cloud_z: torch.Tensor,
        ctx: torch.Tensor,
        seq_emb: torch.Tensor,
        seq_feat: torch.Tensor,
        seq_mask: torch.Tensor,
        patch: torch.Tensor,
    ) -> torch.Tensor:
        """Scores, shape (B, K).

        Args:
            cand_emb: (B, K, d) dequantized cloud item embeddings.
            cloud_z: (B, K) cloud scores standardized within the list.
            ctx: (B, K, ctx_dim) real-time context features (``features.CTX_FEATURES``).
            seq_emb: (B, L, d) embeddings of the last L engaged items (zeros where absent).
            seq_feat: (B, L, seq_feat_dim) dwell/age/kind per step.
            seq_mask: (B, L) 1.0 for real steps, 0.0 for padding.
            patch: (patch_dim,) per-user patch; zeros means "shared model only".
        """
        return self.head(self.encode(cand_emb, cloud_z, ctx, seq_emb, seq_feat, seq_mask), patch)

    def encode(self, *inputs: torch.Tensor) -> Encoded:
        """Everything of ``forward`` that does not depend on the patch: ``forward``'s six inputs
        (``cand_emb, cloud_z, ctx, seq_emb, seq_feat, seq_mask``), no patch.

        On-device fine-tuning changes only the patch, so it encodes a fixed batch once and runs
        ``head`` per step: the same operations on the same values as ``forward`` each step.
        """
        cand_emb, cloud_z, ctx, seq_emb, seq_feat, seq_mask = inputs
        q0 = self.query(cand_emb)  # first: a gradient w.r.t. cand_emb sums its uses in forward's order
        k = self.key(seq_emb) + self.key_feat(seq_feat)
        v = self.value(seq_emb)
        mask_add = (seq_mask[:, None, :] - 1.0) * (-_MASK_NEG)
        any_valid = (seq_mask.sum(dim=1, keepdim=True) > 0).to(cand_emb.dtype)  # (B, 1)
        cn = F.normalize(cand_emb, dim=-1, eps=1e-6)
        sn = F.normalize(seq_emb, dim=-1, eps=1e-6)
        sims = torch.matmul(cn, sn.transpose(1, 2)) + (seq_mask[:, None, :] - 1.0) * 2.0
        max_sim = sims.max(dim=-1).values * any_valid
        side = torch.cat([ctx, cloud_z[..., None], max_sim[..., None]], dim=-1)
        return Encoded(cand_emb, q0, k.transpose(1, 2), v, mask_add, any_valid[:, :, None], side, self.prior(side).squeeze(-1))

    def head(self, e: Encoded, patch: torch.Tensor) -> torch.Tensor:
        """Scores (B, K) of encoded inputs under ``patch`` (``forward`` = ``head(encode(...), patch)``)."""
        a = self.config.attn_dim
        q = e.q0 + patch[:a]
        h = self._hidden(q, e)
        taste = torch.matmul(e.cand_emb, patch[a:])
        return self.mlp_out(h).squeeze(-1) + e.prior + taste

    def _hidden(self, q: torch.Tensor, e: Encoded) -> torch.Tensor:
        return self.hidden(q, e.key_t, e.value, e.mask_add, e.any_valid, e.side)

    def hidden(
        self, q: torch.Tensor, key_t: torch.Tensor, value: torch.Tensor, mask_add: torch.Tensor, any_valid: torch.Tensor, side: torch.Tensor
    ) -> torch.Tensor:
        """The MLP's hidden layer (B, K, hidden) for queries ``q`` (``Encoded`` supplies the rest).

        Row-wise in B and K, so rows of many users may be stacked (personalization batches
        devices this way); the one-output layers after it are not (see ``score_rows``).
        """
        logits = torch.matmul(q, key_t) * self._scale + mask_add
        w = torch.softmax(logits, dim=-1) * any_valid
        interest = torch.matmul(w, value)
        return torch.relu(self.mlp_in(torch.cat([q, interest, q * interest, side], dim=-1)))

    def score_rows(self, e: Encoded, patches: torch.Tensor, lengths: list[int] | None = None) -> list[torch.Tensor]:
        """Row ``b``'s scores under its own patch ``patches[b]``: exactly ``forward`` on that row alone.

        Everything but the two one-output layers and the taste product runs batched (``e.prior``
        is not used: it is recomputed per row); those
        run per row, because a one-output linear layer's rounding depends on where a row sits
        in the batch (measured: batched and single scores differ in the last bit), and a
        fleet's scores must not depend on which other devices re-scored at the same time.

        Args:
            e: ``encode`` of B rows with the same K (no padding: padding changes rounding too).
            patches: (B, patch_dim).
            lengths: unused rows beyond ``lengths[b]`` are dropped (default: all K).
        """
        a = self.config.attn_dim
        q = e.q0 + patches[:, None, :a]
        h = self._hidden(q, e)
        out = []
        for b in range(h.shape[0]):
            hb = h[b : b + 1]
            prior = self.prior(e.side[b : b + 1]).squeeze(-1)
            s = self.mlp_out(hb).squeeze(-1) + prior + torch.matmul(e.cand_emb[b : b + 1], patches[b, a:])
            out.append(s[0] if lengths is None else s[0, : lengths[b]])
        return out

    # -- sizes and flat views (for budgets, encoders and aggregation) ------
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def int8_nbytes(self) -> int:
        """Bytes of an int8 weight copy: one byte per weight plus a float32 scale per tensor."""
        return sum(p.numel() + 4 for p in self.parameters())

    def param_layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every shared parameter, in flat-vector order."""
        return [(n, tuple(p.shape)) for n, p in self.named_parameters()]

    def flat_parameters(self) -> np.ndarray:
        """All shared weights as one float32 vector (order of ``param_layout``)."""
        return torch.cat([p.detach().reshape(-1) for p in self.parameters()]).numpy().astype(np.float32)

    def unflatten(self, flat: np.ndarray) -> dict[str, torch.Tensor]:
        """A flat vector (e.g. an aggregated delta) as ``{name: tensor}`` like ``state_dict``."""
        out: dict[str, torch.Tensor] = {}
        off = 0
        for name, shape in self.param_layout():
            n = int(np.prod(shape)) if shape else 1
            out[name] = torch.as_tensor(np.asarray(flat[off : off + n], dtype=np.float32).reshape(shape))
            off += n
        if off != len(flat):
            raise ValueError(f"flat vector has {len(flat)} values, model has {off}")
        return out

    def apply_delta(self, flat_delta: np.ndarray, scale: float = 1.0) -> None:
        """Add ``scale * delta`` to the shared weights (cloud side, after aggregation)."""
        parts = self.unflatten(flat_delta)
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.add_(parts[name], alpha=scale)

    def score_numpy(self, inputs: RerankInputs, patch: torch.Tensor | None = None) -> np.ndarray:
        """Unbatched convenience: numpy inputs for one user -> float32 scores (K,)."""
        if patch is None:
            patch = torch.zeros(self.config.patch_dim)
        with torch.no_grad():
            t = inputs.tensors()
            return self(*t, patch)[0].numpy()


def quantize_dynamic_int8(model: Reranker) -> nn.Module:
    """Int8 dynamic quantization of the Linear layers (what a phone runtime would ship).

    Falls back to the float model (logged) where the quantized engine is
    unavailable on this build.
    """
    import logging

    try:
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    except Exception as exc:  # engine missing on some CPU builds
        logging.getLogger(__name__).warning("dynamic int8 quantization unavailable: %s", exc)
        return model
