"""Real-time features computed on the device, from what only the device knows.

The device keeps three small structures, each bounded:

* ``ItemCache``: int8 embeddings of items it received (LRU), so the behaviour
  sequence and on-device recall have vectors without a cloud call;
* ``BehaviourHistory``: the last N engagements (item, time, dwell, kind, embedding);
* ``ItemStats``: per-item counters (engagements, last time, last dwell,
  impressions, skips/deletes).

``build_inputs`` turns them into the reranker's input arrays.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

import numpy as np
import torch

from device_rerank.config import CTX_FEATURES, SEQ_FEATURES, DeviceConfig
from streams.schema import EventKind

_LOG_DWELL_NORM: Final[float] = float(np.log1p(3600.0))


class DeviceAction(enum.IntEnum):
    """Device-local actions with no wire ``EventKind`` (codes above every EventKind)."""

    SKIP = 100
    DELETE = 101


_LIVE_ENTER: Final[int] = int(EventKind.LIVE_ENTER)
_LIVE_LEAVE: Final[int] = int(EventKind.LIVE_LEAVE)


@dataclass(frozen=True)
class RerankInputs:
    """Reranker inputs for one user (unbatched numpy; ``tensors()`` adds the batch axis)."""

    cand_emb: np.ndarray  # (K, d) float32
    cloud_z: np.ndarray  # (K,) float32
    ctx: np.ndarray  # (K, c) float32
    seq_emb: np.ndarray  # (L, d) float32
    seq_feat: np.ndarray  # (L, s) float32
    seq_mask: np.ndarray  # (L,) float32

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(
            torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
            for x in (self.cand_emb, self.cloud_z, self.ctx, self.seq_emb, self.seq_feat, self.seq_mask)
        )

    def take(self, index: np.ndarray) -> "RerankInputs":
        """Candidates subset (the sequence is shared)."""
        return RerankInputs(self.cand_emb[index], self.cloud_z[index], self.ctx[index], self.seq_emb, self.seq_feat, self.seq_mask)


class ItemStats:
    """Per-item counters on the device (``__slots__``: thousands per device in simulation)."""

    __slots__ = ("count", "last_ts", "last_dwell", "impressions", "neg")

    def __init__(self) -> None:
        self.count = 0
        self.last_ts = -1
        self.last_dwell = 0.0
        self.impressions = 0
        self.neg = 0


class ItemCache:
    """LRU cache of int8 item embeddings, stored compactly in preallocated arrays.

    Args:
        capacity: most items kept.
        dim: embedding width.
    """

    def __init__(self, capacity: int, dim: int) -> None:
        self.capacity = capacity
        self.dim = dim
        self._slot: dict[int, int] = {}
        self._ids = np.full(capacity, -1, dtype=np.int64)
        self._q = np.zeros((capacity, dim), dtype=np.int8)
        self._scale = np.zeros(capacity, dtype=np.float32)
        self._used = np.zeros(capacity, dtype=np.int64)
        self._clock = 0

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, item_id: int) -> bool:
        return item_id in self._slot

    def put(self, item_ids: np.ndarray, emb_q: np.ndarray, emb_scale: np.ndarray) -> None:
        """Insert or refresh rows, evicting the least recently used.

        Evictions for all new items are chosen at once (one stable sort), never among the rows
        this put refreshes: a per-item ``argmin`` over every slot made a fetch of 100 new items
        cost 100 full scans once the cache was full.
        """
        self._clock += 1
        ids = np.asarray(item_ids, dtype=np.int64).tolist()
        slots = np.empty(len(ids), dtype=np.int64)
        new: list[int] = []
        first: dict[int, int] = {}
        for i, item in enumerate(ids):
            slot = self._slot.get(item)
            if slot is None:
                j = first.get(item)
                if j is None:
                    first[item] = i
                    new.append(i)
                    slots[i] = -1
                else:
                    slots[i] = -(j + 2)  # duplicate of a new item in this put
            else:
                slots[i] = slot
                self._used[slot] = self._clock
        if new:
            free = self.capacity - len(self._slot)
            take = list(range(len(self._slot), len(self._slot) + min(free, len(new))))
            need = len(new) - len(take)
            if need > 0:
                used = self._used.copy()
                used[slots[slots >= 0]] = np.iinfo(np.int64).max  # refreshed by this put
                used[take] = np.iinfo(np.int64).max  # free slots already handed out
                evictable = int((used != np.iinfo(np.int64).max).sum())
                victims = np.argsort(used, kind="stable")[: min(need, evictable)]
                for v in victims.tolist():
                    del self._slot[int(self._ids[v])]
                take += victims.tolist()
            for i, slot in zip(new, take):
                self._slot[ids[i]] = slot
                self._ids[slot] = ids[i]
                slots[i] = slot
                self._used[slot] = self._clock
            for i in new[len(take) :]:  # more new items than capacity: the tail is not cached
                slots[i] = -1
        dup = slots < -1
        if dup.any():
            slots[dup] = slots[-(slots[dup] + 2)]
        ok = slots >= 0
        self._q[slots[ok]] = np.asarray(emb_q)[ok]
        self._scale[slots[ok]] = np.asarray(emb_scale)[ok]

    def get(self, item_id: int) -> np.ndarray | None:
        """Dequantized float32 embedding, or None when not cached."""
        slot = self._slot.get(item_id)
        if slot is None:
            return None
        self._clock += 1
        self._used[slot] = self._clock
        return self._q[slot].astype(np.float32) * self._scale[slot]


class BehaviourHistory:
    """Ring of the last ``capacity`` engagements with their embeddings."""

    def __init__(self, capacity: int, dim: int) -> None:
        self.capacity = capacity
        self.item = np.full(capacity, -1, dtype=np.int64)
        self.ts = np.zeros(capacity, dtype=np.int64)
        self.dwell = np.zeros(capacity, dtype=np.float32)
        self.kind = np.zeros(capacity, dtype=np.int16)
        self.emb = np.zeros((capacity, dim), dtype=np.float32)
        self.has_emb = np.zeros(capacity, dtype=bool)
        self.n = 0  # total appended
        self.version = 0  # bumped by every change (``append``, ``set_dwell``): keys derived values
        self._seq_key: tuple | None = None
        self._seq: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return min(self.n, self.capacity)

    def append(self, item_id: int, ts_ms: int, dwell: float, kind: int, emb: np.ndarray | None) -> None:
        j = self.n % self.capacity
        self.item[j], self.ts[j], self.dwell[j], self.kind[j] = item_id, ts_ms, dwell, kind
        if emb is None:
            self.emb[j] = 0.0
            self.has_emb[j] = False
        else:
            self.emb[j] = emb
            self.has_emb[j] = True
        self.n += 1
        self.version += 1

    def set_dwell(self, j: int, dwell: float) -> None:
        """The dwell of ring step ``j`` (a watch that completes an engagement)."""
        self.dwell[j] = dwell
        self.version += 1

    def last_index_of(self, item_id: int, within: int = 3) -> int | None:
        """Ring index of the newest step with this item among the last ``within`` steps."""
        for back in range(1, min(within, len(self)) + 1):
            j = (self.n - back) % self.capacity
            if self.item[j] == item_id:
                return j
        return None

    def order(self) -> np.ndarray:
        """Ring indices, oldest first."""
        m = len(self)
        return (np.arange(self.n - m, self.n) % self.capacity).astype(np.int64)

    def recent_items(self, limit: int) -> list[int]:
        """Distinct recently engaged items, newest first."""
        seen: list[int] = []
        for j in self.order()[::-1].tolist():
            it = int(self.item[j])
            if it not in seen:
                seen.append(it)
                if len(seen) >= limit:
                    break
        return seen

    def sequence(self, at_ms: int, seq_len: int, horizon_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(seq_emb (L,d), seq_feat (L,s), seq_mask (L,)) of the newest L steps, right-aligned.

        A device asks for the same sequence twice per engagement (its ranking, then the
        example it records); the last one is kept until the history changes (copies are returned).
        """
        key = (self.version, at_ms, seq_len, horizon_s)
        if key != self._seq_key or self._seq is None:
            self._seq, self._seq_key = self._sequence(at_ms, seq_len, horizon_s), key
        emb, feat, mask = self._seq
        return emb.copy(), feat.copy(), mask.copy()

    def _sequence(self, at_ms: int, seq_len: int, horizon_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        d = self.emb.shape[1]
        emb = np.zeros((seq_len, d), dtype=np.float32)
        feat = np.zeros((seq_len, len(SEQ_FEATURES)), dtype=np.float32)
        mask = np.zeros(seq_len, dtype=np.float32)
        idx = self.order()[-seq_len:]
        if len(idx):
            idx = idx[self.has_emb[idx]]
        m = len(idx)
        if m:
            emb[seq_len - m :] = self.emb[idx]
            age_s = np.maximum(at_ms - self.ts[idx], 0) / 1000.0
            feat[seq_len - m :, 0] = np.log1p(self.dwell[idx]) / _LOG_DWELL_NORM
            feat[seq_len - m :, 1] = np.minimum(np.log1p(age_s) / np.log1p(horizon_s), 1.0)
            kind = self.kind[idx]
            feat[seq_len - m :, 2] = (kind == _LIVE_ENTER) | (kind == _LIVE_LEAVE)  # a live kind (np.isin cost 10x more)
            mask[seq_len - m :] = 1.0
        return emb, feat, mask


def standardize(scores: np.ndarray) -> np.ndarray:
    """Cloud scores as z-scores within the list (their raw scale is the cloud model's business)."""
    s = np.asarray(scores, dtype=np.float32)
    if len(s) < 2:
        return np.zeros_like(s)
    sd = float(s.std())
    return ((s - s.mean()) / (sd if sd > 1e-6 else 1.0)).astype(np.float32)


def candidate_features(
    item_ids: np.ndarray,
    rank_frac: np.ndarray,
    stats: dict[int, ItemStats],
    live: set[int] | None,
    at_ms: int,
    config: DeviceConfig,
) -> np.ndarray:
    """Context features (K, len(CTX_FEATURES)) in ``CTX_FEATURES`` order."""
    k = len(item_ids)
    ctx = np.zeros((k, len(CTX_FEATURES)), dtype=np.float32)
    ctx[:, 5] = rank_frac
    ctx[:, 4] = 1.0
    ids = item_ids.tolist()
    if live is not None:
        ctx[:, 4] = [1.0 if i in live else 0.0 for i in ids]
    # gather raw counters in Python (dict lookups), then transform vectorized
    rows, count, last_ts, dwell, impr, neg = [], [], [], [], [], []
    get = stats.get
    for i, item in enumerate(ids):
        st = get(item)
        if st is not None:
            rows.append(i)
            count.append(st.count)
            last_ts.append(st.last_ts)
            dwell.append(st.last_dwell)
            impr.append(st.impressions)
            neg.append(st.neg)
    if rows:
        r = np.asarray(rows)
        c = np.asarray(count, dtype=np.float32)
        engaged = (c > 0).astype(np.float32)
        age_s = np.maximum(at_ms - np.asarray(last_ts, dtype=np.float64), 0.0) / 1000.0
        fresh = np.maximum(0.0, 1.0 - np.log1p(age_s) / np.log1p(config.recency_horizon_s))
        ctx[r, 0] = engaged
        ctx[r, 1] = np.log1p(c)
        ctx[r, 2] = fresh * engaged
        ctx[r, 3] = np.log1p(np.asarray(dwell, dtype=np.float32)) / _LOG_DWELL_NORM * engaged
        ctx[r, 6] = np.log1p(np.asarray(impr, dtype=np.float32))
        ctx[r, 7] = np.log1p(np.asarray(neg, dtype=np.float32))
    return ctx
