"""Reference recommenders and a compact stand-in cloud model.

* ``PopularityBaseline``: time-decayed engagement counts, filtered to what is live now.
* ``RepeatLastLive``: the user's most recently watched items that are live now, most
  recent first, then popular live items. On livestreams this is strong (people go back
  to the streamers they watch; Rappaz et al., RecSys 2021), so any device strategy
  must beat it, not only the cloud.
* ``StreamTwoTower``: a small two-tower model trained online from the stream
  (user embedding + mean of the last H item embeddings vs item embedding; in-batch
  and uniform sampled-softmax negatives). It implements the ``CloudModel`` protocol the
  loop needs (``train_batch``, ``user_vectors``, ``item_vectors``, ``version``) and is
  used when ``cloud_recsys``'s TorchRec ``OnlineTrainer`` is unavailable, and in tests
  (fast, deterministic).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from streams.batch import EventBatch
from streams.schema import POSITIVE_KINDS

logger = logging.getLogger(__name__)

POSITIVE_CODES = np.array(sorted(int(k) for k in POSITIVE_KINDS), dtype=np.uint8)


class PopularityBaseline:
    """Exponentially time-decayed counts of engagements the cloud has ingested.

    Args:
        half_life_ms: weight of an engagement halves every this many ms.
    """

    def __init__(self, half_life_ms: int = 7 * 86_400_000) -> None:
        self.half_life_ms = half_life_ms
        self.score: dict[int, float] = {}
        self.t0: int | None = None

    def observe(self, batch: EventBatch) -> None:
        pos = np.isin(batch.kind, POSITIVE_CODES) & (batch.user_id >= 0)
        if not pos.any():
            return
        ts = batch.ts_ms[pos]
        if self.t0 is None:
            self.t0 = int(ts[0])
        # log-domain growth avoided by a moving reference: weights grow as 2^(t/h) (fine over years at h=7d? no) -> renormalize
        w = np.exp2((ts - self.t0) / self.half_life_ms)
        items = batch.item_id[pos]
        for it, wi in zip(items.tolist(), w.tolist()):
            self.score[it] = self.score.get(it, 0.0) + wi
        if w.max() > 1e12:  # keep numbers finite: shift the reference time
            f = float(np.exp2(-(int(ts[-1]) - self.t0) / self.half_life_ms))
            self.score = {k: v * f for k, v in self.score.items()}
            self.t0 = int(ts[-1])

    def top(self, k: int, live: np.ndarray | None = None) -> np.ndarray:
        """The ``k`` most popular items (only live ones when ``live`` is given)."""
        if not self.score:
            return np.zeros(0, dtype=np.int64) if live is None else np.asarray(live, dtype=np.int64)[:k]
        ids = np.fromiter(self.score.keys(), dtype=np.int64, count=len(self.score))
        sc = np.fromiter(self.score.values(), dtype=np.float64, count=len(self.score))
        if live is not None:
            keep = np.isin(ids, live)
            ids, sc = ids[keep], sc[keep]
        order = np.argsort(-sc, kind="stable")[:k]
        return ids[order]


class RepeatLastLive:
    """Recently engaged items that are live now (most recent first), padded with popular live items.

    Only uses the user's own past engagements (observed after each prediction), so no leakage.
    """

    def __init__(self, popularity: PopularityBaseline, memory: int = 100) -> None:
        self.popularity = popularity
        self.memory = memory
        self.recent: dict[int, list[int]] = {}

    def observe(self, user: int, item: int) -> None:
        lst = self.recent.setdefault(int(user), [])
        if lst and lst[-1] == item:
            return
        if item in lst:
            lst.remove(item)
        lst.append(int(item))
        if len(lst) > self.memory:
            del lst[0]

    def ranking(self, user: int, k: int, live_set: set[int] | None, popular: np.ndarray) -> np.ndarray:
        mine = [i for i in reversed(self.recent.get(int(user), [])) if live_set is None or i in live_set]
        seen = set(mine)
        pad = [int(i) for i in popular.tolist() if int(i) not in seen]
        return np.asarray((mine + pad)[:k], dtype=np.int64)


# -- stand-in cloud model -----------------------------------------------------
@dataclass(frozen=True)
class StreamTwoTowerConfig:
    """Sizes and optimizer of the stand-in cloud model.

    Args:
        dim: embedding width (= the reranker's ``emb_dim``).
        history_len: last engaged items averaged into the user vector.
        negatives: uniform sampled negatives per step (shared by the batch).
        lr: Adagrad learning rate.
        steps_per_batch: optimizer steps per ingested mini-batch.
        temperature: softmax temperature.
        seed: init and sampling seed.
    """

    dim: int = 32
    history_len: int = 20
    negatives: int = 128
    lr: float = 0.05
    steps_per_batch: int = 2
    temperature: float = 0.2
    seed: int = 0


class StreamTwoTower:
    """Online two-tower trained test-then-train from the event stream (see module docstring).

    Args:
        n_users: user-table capacity (rows are assigned on first sight).
        n_items: item-table capacity.
        config: sizes.
    """

    def __init__(self, n_users: int, n_items: int, config: StreamTwoTowerConfig | None = None) -> None:
        self.config = cfg = config or StreamTwoTowerConfig()
        g = torch.Generator().manual_seed(cfg.seed)
        self.U = torch.nn.Parameter(torch.randn(max(n_users, 1), cfg.dim, generator=g) * 0.05)
        self.V = torch.nn.Parameter(torch.randn(max(n_items, 1), cfg.dim, generator=g) * 0.05)
        self.opt = torch.optim.Adagrad([self.U, self.V], lr=cfg.lr)
        self.user_row: dict[int, int] = {}
        self.item_row: dict[int, int] = {}
        self.item_ids: list[int] = []
        self.hist = np.full((max(n_users, 1), cfg.history_len), -1, dtype=np.int64)
        self.hist_n = np.zeros(max(n_users, 1), dtype=np.int64)
        self.rng = np.random.default_rng(cfg.seed)
        self.version = 0
        self.steps = 0

    @property
    def dim(self) -> int:
        return self.config.dim

    def _rows(self, raw: np.ndarray, table: dict[int, int], cap: int, ids: list[int] | None = None) -> np.ndarray:
        out = np.empty(len(raw), dtype=np.int64)
        for j, r in enumerate(raw.tolist()):
            row = table.get(r)
            if row is None:
                if len(table) >= cap:
                    out[j] = -1
                    continue
                row = table[r] = len(table)
                if ids is not None:
                    ids.append(r)
            out[j] = row
        return out

    def _query(self, urows: np.ndarray) -> torch.Tensor:
        h = torch.from_numpy(self.hist[urows])
        mask = (h >= 0).float()
        hv = self.V[h.clamp(min=0)] * mask[..., None]
        mean = hv.sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        return self.U[torch.from_numpy(urows)] + mean

    def train_batch(self, batch: EventBatch) -> dict:
        """One test-then-train step on the positives of ``batch``; returns {"loss", "n"}."""
        pos = np.isin(batch.kind, POSITIVE_CODES) & (batch.user_id >= 0)
        if not pos.any():
            return {"loss": float("nan"), "n": 0}
        u = self._rows(batch.user_id[pos], self.user_row, self.U.shape[0])
        i = self._rows(batch.item_id[pos], self.item_row, self.V.shape[0], self.item_ids)
        ok = (u >= 0) & (i >= 0)
        u, i = u[ok], i[ok]
        loss_v = float("nan")
        n_items = len(self.item_row)
        cfg = self.config
        for _ in range(cfg.steps_per_batch):
            q = self._query(u)
            neg = torch.from_numpy(self.rng.integers(0, n_items, size=min(cfg.negatives, n_items)))
            cand = torch.cat([torch.from_numpy(i), neg])
            logits = q @ self.V[cand].T / cfg.temperature
            # mask in-batch duplicates of the positive item (false negatives)
            same = torch.from_numpy(i)[:, None] == cand[None, :]
            same[torch.arange(len(i)), torch.arange(len(i))] = False
            logits = logits.masked_fill(same, -1e9)
            loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(i)))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            loss_v = float(loss.detach())
            self.steps += 1
        for uu, ii in zip(u.tolist(), i.tolist()):
            self.hist[uu, self.hist_n[uu] % cfg.history_len] = ii
            self.hist_n[uu] += 1
        return {"loss": loss_v, "n": int(len(i))}

    def knows_user(self, user_id: int) -> bool:
        return int(user_id) in self.user_row

    def user_vectors(self, user_ids: np.ndarray, at_ms: int | None = None) -> np.ndarray:
        """Query vectors (zeros for users never seen)."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        rows = np.array([self.user_row.get(int(x), -1) for x in user_ids.tolist()], dtype=np.int64)
        out = np.zeros((len(user_ids), self.dim), dtype=np.float32)
        known = rows >= 0
        if known.any():
            with torch.no_grad():
                out[known] = self._query(rows[known]).numpy()
        return out

    def item_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(raw item ids, vectors) of every item seen so far."""
        n = len(self.item_ids)
        with torch.no_grad():
            return np.asarray(self.item_ids, dtype=np.int64), self.V[:n].detach().numpy().copy()

    def refresh(self) -> int:
        self.version += 1
        return self.version
