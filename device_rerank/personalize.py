"""Local learning on the device: the per-user patch and the shared-model gradient.

Why a patch: the shared reranker is the same on every phone (downloaded,
frozen, int8); what differs per user is a ``patch_dim``-float vector (query
offset + taste vector, see reranker.py). Fine-tuning only the patch is cheap
(tens of Adam steps on a few dozen examples), cannot break the shared model,
and is bounded (step budget per session, L2 pull to zero, norm projection).

Training data is the device's own feedback, stored as *groups* when an
engagement happens: the engaged item (positive, slot 0) plus items shown or
cached but not engaged (negatives), with the features and behaviour sequence
*as they were just before* the engagement (no leakage of the engagement
itself into its own features). The loss is a listwise softmax over each group.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from device_rerank.config import PersonalizeConfig
from device_rerank.encoders import HardExamples
from device_rerank.reranker import Encoded, Reranker

logger = logging.getLogger(__name__)

_PAD_LOGIT = -1e4


@dataclass(frozen=True)
class ExampleGroup:
    """One engagement: slot 0 is the engaged item, slots 1 .. ``n_train - 1`` shown-not-engaged
    items (what learning uses), and any further slots items drawn uniformly from the list
    (what scoring a trial reranker uses: shown items are the top of the device's own
    ranking, so a loss over them rewards demoting what was shown, not ranking the list)."""

    item_ids: np.ndarray  # (G,) int64
    cand_emb: np.ndarray  # (G, d) float16
    cloud_z: np.ndarray  # (G,) float32
    ctx: np.ndarray  # (G, c) float32
    seq_emb: np.ndarray  # (L, d) float16
    seq_feat: np.ndarray  # (L, s) float32
    seq_mask: np.ndarray  # (L,) float32
    ts_ms: int
    n_train: int = -1  # -1: every slot is a learning slot

    def slots(self, part: str) -> np.ndarray | slice:
        """Slot selection of ``part``: "train" (positive + shown negatives) or "eval" (positive + uniform ones)."""
        n = len(self.item_ids) if self.n_train < 0 else self.n_train
        if part == "train":
            return slice(0, n)
        return np.r_[0, n : len(self.item_ids)]


class ExampleBuffer:
    """Bounded FIFO of example groups (the device's own recent feedback)."""

    def __init__(self, capacity: int) -> None:
        self.groups: deque[ExampleGroup] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.groups)

    def add(self, group: ExampleGroup) -> None:
        self.groups.append(group)

    def batch(self, index: list[int] | np.ndarray | None = None, part: str = "train") -> tuple[torch.Tensor, ...]:
        """Padded tensors (cand_emb, cloud_z, ctx, seq_emb, seq_feat, seq_mask, slot_mask, item_ids)
        of the groups' ``part`` slots (``ExampleGroup.slots``)."""
        gs = list(self.groups) if index is None else [self.groups[int(i)] for i in index]
        sel = [g.slots(part) for g in gs]
        g_max = max(len(g.item_ids[s]) for g, s in zip(gs, sel))
        b = len(gs)
        d = gs[0].cand_emb.shape[1]
        c = gs[0].ctx.shape[1]
        cand = np.zeros((b, g_max, d), dtype=np.float32)
        cz = np.zeros((b, g_max), dtype=np.float32)
        ctx = np.zeros((b, g_max, c), dtype=np.float32)
        slot = np.zeros((b, g_max), dtype=np.float32)
        ids = np.full((b, g_max), -1, dtype=np.int64)
        for i, (g, s) in enumerate(zip(gs, sel)):
            n = len(g.item_ids[s])
            cand[i, :n], cz[i, :n], ctx[i, :n], slot[i, :n], ids[i, :n] = g.cand_emb[s], g.cloud_z[s], g.ctx[s], 1.0, g.item_ids[s]
        seq = np.stack([g.seq_emb for g in gs]).astype(np.float32)
        sf = np.stack([g.seq_feat for g in gs])
        sm = np.stack([g.seq_mask for g in gs])
        t = [torch.from_numpy(x) for x in (cand, cz, ctx, seq, sf, sm, slot)]
        return (*t, torch.from_numpy(ids))


class PatchAdam:
    """``torch.optim.Adam`` (default settings) for the one patch tensor, without the optimizer
    machinery: the same operations as torch's single-tensor Adam, so the same bits
    (tests/test_personalize.py checks it against ``torch.optim.Adam``), at a fraction of the
    per-step overhead that dominates a 48-float update.
    """

    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.param, self.lr, self.beta1, self.beta2, self.eps = param, float(lr), betas[0], betas[1], eps
        self.exp_avg = torch.zeros_like(param, memory_format=torch.preserve_format)
        self.exp_avg_sq = torch.zeros_like(param, memory_format=torch.preserve_format)
        self.step_t = torch.tensor(0.0)

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        self.step_t += 1
        step = self.step_t.item()
        self.exp_avg.lerp_(grad, 1 - self.beta1)
        self.exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        step_size = self.lr / (1 - self.beta1**step)
        denom = (self.exp_avg_sq.sqrt() / (1 - self.beta2**step) ** 0.5).add_(self.eps)
        self.param.addcdiv_(self.exp_avg, denom, value=-step_size)


def listwise_loss(scores: torch.Tensor, slot_mask: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy with the positive in slot 0 (padding slots masked)."""
    logits = scores + (1.0 - slot_mask) * _PAD_LOGIT
    return -torch.log_softmax(logits, dim=-1)[:, 0].mean()


def fine_tune_patch(
    model: Reranker,
    buffer: ExampleBuffer,
    patch: torch.Tensor,
    config: PersonalizeConfig,
    steps: int,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, float]:
    """Adam on the patch only; returns (new patch, last loss). Shared weights get no gradient.

    With ``config.holdout_groups`` > 0 the newest groups are held out and the new patch is kept
    only if it lowers their loss (else the old patch is returned): a device should not adopt a
    change that makes its own latest feedback rank worse.
    """
    return fine_tune_patches([PatchJob(model, buffer, patch, config, steps, rng)])[0]


@dataclass(frozen=True)
class PatchJob:
    """One device's ``fine_tune_patch`` call (its own buffer, patch, config and rng)."""

    model: Reranker
    buffer: ExampleBuffer
    patch: torch.Tensor
    config: PersonalizeConfig
    steps: int
    rng: np.random.Generator


@dataclass
class _Tuning:
    job: PatchJob
    index: int
    p: torch.Tensor
    opt: "PatchAdam"
    fixed: tuple[Encoded, torch.Tensor] | None
    n_train: int
    loss: float = float("nan")


#: A device whose batch has fewer (groups x slots) rows than this trains alone: with a
#: row or two the linear layers take another kernel, whose rounding differs.
_MIN_STACK_ROWS = 4


def fine_tune_patches(jobs: Sequence[PatchJob]) -> list[tuple[torch.Tensor, float]]:
    """``fine_tune_patch`` for many devices at once, each with exactly its own result.

    Each step runs one forward and one backward pass for all devices still training: their
    groups are stacked through the reranker's row-wise hidden layer (``Reranker.hidden``)
    and everything else - the one-output layers, the taste term, the loss, Adam, the norm
    bound, the holdout check - stays per device, in the order ``fine_tune_patch`` runs it.
    The devices' patches are independent (a device's loss depends on its patch only), and
    tests/test_personalize.py checks the results bit for bit against one device at a time.
    """
    out: list[tuple[torch.Tensor, float]] = [(j.patch, float("nan")) for j in jobs]
    runs: list[_Tuning] = []
    for i, job in enumerate(jobs):
        if len(job.buffer) == 0 or job.steps <= 0:
            continue
        h = int(job.config.holdout_groups)
        if h > 0 and len(job.buffer) <= h:
            continue  # not enough feedback to both train and check
        n_train = len(job.buffer) - h
        p = job.patch.detach().clone().requires_grad_(True)
        fixed = _encoded(job.model, job.buffer, np.arange(n_train)) if n_train <= job.config.batch_groups else None
        runs.append(_Tuning(job, i, p, PatchAdam(p, lr=job.config.lr), fixed, n_train))
    stacked: dict[tuple[int, ...], tuple[torch.Tensor, ...]] = {}  # fixed batches' stacked inputs, per member set
    for step in range(max((r.job.steps for r in runs), default=0)):
        act = [r for r in runs if r.job.steps > step]
        batches = [
            r.fixed
            if r.fixed is not None
            else _encoded(r.job.model, r.job.buffer, r.job.rng.choice(r.n_train, size=r.job.config.batch_groups, replace=False))
            for r in act
        ]
        losses = _losses(act, batches, stacked)
        grads = torch.autograd.grad(losses, [r.p for r in act])
        for r, loss, grad in zip(act, losses, grads):
            r.opt.step(grad)
            with torch.no_grad():
                n = float(r.p.norm())
                if n > r.job.config.max_norm:
                    r.p.mul_(r.job.config.max_norm / n)
            r.loss = float(loss.detach())
    for r in runs:
        job, new = r.job, r.p.detach()
        out[r.index] = (new, r.loss)
        if int(job.config.holdout_groups) > 0:
            enc, slot = _encoded(job.model, job.buffer, np.arange(r.n_train, len(job.buffer)))
            with torch.no_grad():
                before = float(listwise_loss(job.model.head(enc, job.patch), slot))
                after = float(listwise_loss(job.model.head(enc, new), slot))
            if not after < before:
                out[r.index] = (job.patch, r.loss)
    return out


def _losses(
    act: list[_Tuning], batches: list[tuple[Encoded, torch.Tensor]], stacked: dict[tuple[int, ...], tuple[torch.Tensor, ...]]
) -> list[torch.Tensor]:
    """Each device's training loss (listwise + L2 on its patch), the hidden layer stacked
    over devices that share a model and batch shape."""
    groups: dict[tuple, list[int]] = {}
    for i, (r, (enc, _)) in enumerate(zip(act, batches)):
        b, k = enc.q0.shape[0], enc.q0.shape[1]
        key = (id(r.job.model), k, enc.key_t.shape[2]) if b * k >= _MIN_STACK_ROWS else ("alone", i)
        groups.setdefault(key, []).append(i)
    losses: list[torch.Tensor | None] = [None] * len(act)
    for members in groups.values():
        model = act[members[0]].job.model
        a = model.config.attn_dim
        qs = [batches[i][0].q0 + act[i].p[:a] for i in members]
        if len(members) == 1:
            hs: Sequence[torch.Tensor] = [model._hidden(qs[0], batches[members[0]][0])]
        else:
            fixed = all(act[i].fixed is not None for i in members)
            key = tuple(id(act[i]) for i in members)
            ctx = stacked.get(key) if fixed else None
            if ctx is None:
                encs = [batches[i][0] for i in members]
                ctx = tuple(torch.cat([getattr(e, f) for e in encs]) for f in ("key_t", "value", "mask_add", "any_valid", "side"))
                if fixed:
                    stacked[key] = ctx
            hs = torch.split(model.hidden(torch.cat(qs), *ctx), [q.shape[0] for q in qs])
        for i, hi in zip(members, hs):
            r, (enc, slot) = act[i], batches[i]
            taste = torch.matmul(enc.cand_emb, r.p[a:])
            scores = model.mlp_out(hi).squeeze(-1) + enc.prior + taste
            losses[i] = listwise_loss(scores, slot) + r.job.config.l2 * (r.p * r.p).sum()
    return losses  # type: ignore[return-value]


def _encoded(model: Reranker, buffer: ExampleBuffer, index: np.ndarray) -> tuple[Encoded, torch.Tensor]:
    """The patch-independent part of the forward pass over buffered groups, and their slot mask.

    Only the patch is trained, so everything else is computed once per batch, without a graph.
    """
    cand, cz, ctx, seq, sf, sm, slot, _ = buffer.batch(index)
    with torch.no_grad():
        return model.encode(cand, cz, ctx, seq, sf, sm), slot


def mean_group_losses(models: Sequence[Reranker], buffer: ExampleBuffer, index: Sequence[int], patch: torch.Tensor) -> list[float]:
    """Mean listwise loss of each model on the buffered groups at ``index`` (their "eval" slots:
    the positive against items drawn uniformly from the list, a sampled softmax over the whole
    list), under one patch: a device comparing the reranker it runs with a trial one."""
    cand, cz, ctx, seq, sf, sm, slot, _ = buffer.batch(list(index), part="eval")
    with torch.inference_mode():
        return [float(listwise_loss(m(cand, cz, ctx, seq, sf, sm, patch), slot)) for m in models]


def shared_gradient(
    model: Reranker, buffer: ExampleBuffer, patch: torch.Tensor
) -> tuple[np.ndarray, dict[int, np.ndarray], float]:
    """Gradient of the local loss w.r.t. the shared weights (flat) and each touched item embedding.

    Uses ``torch.autograd.grad`` so nothing accumulates in the shared model's ``.grad``
    (many simulated devices share one model object).
    """
    cand, cz, ctx, seq, sf, sm, slot, ids = buffer.batch()
    cand = cand.requires_grad_(True)
    loss = listwise_loss(model(cand, cz, ctx, seq, sf, sm, patch.detach()), slot)
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params + [cand], allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads[:-1], params)])
    g_cand = grads[-1].numpy()
    rows: dict[int, np.ndarray] = {}
    ids_np = ids.numpy()
    for item in np.unique(ids_np[ids_np >= 0]).tolist():
        rows[int(item)] = g_cand[ids_np == item].sum(axis=0).astype(np.float32)
    return flat.numpy().astype(np.float32), rows, float(loss.detach())


def buffer_examples(model: Reranker, buffer: ExampleBuffer, patch: torch.Tensor) -> tuple[HardExamples, np.ndarray]:
    """All buffered (item, label, features) rows and the device model's scores for them."""
    cand, cz, ctx, seq, sf, sm, slot, ids = buffer.batch()
    with torch.no_grad():
        scores = model(cand, cz, ctx, seq, sf, sm, patch).numpy()
    keep = slot.numpy() > 0
    labels = np.zeros_like(keep, dtype=np.uint8)
    labels[:, 0] = 1
    feats = np.concatenate([ctx.numpy(), cz.numpy()[..., None], scores[..., None]], axis=-1)
    ex = HardExamples(ids.numpy()[keep], labels[keep], feats[keep].astype(np.float32))
    return ex, scores[keep]
