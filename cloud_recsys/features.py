"""Sparse features of the two towers, built as TorchRec ``KeyedJaggedTensor``s.

``UserHistory`` keeps, per user row, a ring buffer of the last ``history_len``
positive item rows with their timestamps. A training example's history is read
*before* its own event is pushed, so no example ever sees its own item or any
later one (no leakage); ``at_ms`` queries only see items with ``ts < at_ms``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

#: Feature keys; one KJT carries all of them (TorchRec's EBC needs every key).
USER_KEYS: tuple[str, ...] = ("user_id", "history")
ITEM_KEYS: tuple[str, ...] = ("item_id", "category")
ALL_KEYS: tuple[str, ...] = USER_KEYS + ITEM_KEYS


class UserHistory:
    """Per-user ring buffers of recent positive item rows (vectorized reads).

    Args:
        num_rows: user rows (``IdMap.num_rows``).
        history_len: items kept per user.
    """

    def __init__(self, num_rows: int, history_len: int) -> None:
        self.num_rows = int(num_rows)
        self.history_len = int(history_len)
        self.items = np.full((self.num_rows, self.history_len), -1, dtype=np.int64)
        self.ts = np.zeros((self.num_rows, self.history_len), dtype=np.int64)
        self.count = np.zeros(self.num_rows, dtype=np.int64)  # total pushes (ring head = count % L)

    def reset(self) -> None:
        self.items.fill(-1)
        self.ts.fill(0)
        self.count.fill(0)

    def push(self, user_rows: np.ndarray, item_rows: np.ndarray, ts_ms: np.ndarray) -> None:
        """Append events in order (a user appearing twice gets both, in order)."""
        items, ts, count, L = self.items, self.ts, self.count, self.history_len
        for u, i, t in zip(np.asarray(user_rows).tolist(), np.asarray(item_rows).tolist(), np.asarray(ts_ms).tolist()):
            c = int(count[u])
            items[u, c % L] = i
            ts[u, c % L] = t
            count[u] = c + 1

    def read(self, user_rows: np.ndarray, at_ms: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(values, lengths) of the users' histories, oldest first; only ``ts < at_ms`` when given."""
        user_rows = np.asarray(user_rows, dtype=np.int64)
        items = self.items[user_rows]
        ts = self.ts[user_rows]
        n = np.minimum(self.count[user_rows], self.history_len)
        head = self.count[user_rows] % self.history_len
        # roll each row so that the oldest valid entry is first
        idx = (head[:, None] + np.arange(self.history_len)[None, :]) % self.history_len
        full = (self.count[user_rows] >= self.history_len)[:, None]
        idx = np.where(full, idx, np.arange(self.history_len)[None, :])
        items = np.take_along_axis(items, idx, axis=1)
        ts = np.take_along_axis(ts, idx, axis=1)
        valid = np.arange(self.history_len)[None, :] < n[:, None]
        if at_ms is not None:
            valid &= ts < int(at_ms)
        return items[valid], valid.sum(axis=1)

    def read_before_push(
        self, user_rows: np.ndarray, item_rows: np.ndarray, ts_ms: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Histories for a time-ordered batch of examples, each read before its own event, then push.

        Why not one vectorized read: a user with two events in one batch must see the first
        in the second's history, and never the second in the first's. The buffers are read
        once per distinct user; in-batch predecessors are appended per example.
        """
        users = np.asarray(user_rows, dtype=np.int64)
        uniq = np.unique(users)
        vals, lens = self.read(uniq)
        splits = np.split(vals, np.cumsum(lens)[:-1]) if len(uniq) else []
        hist: dict[int, list[int]] = {u: s.tolist() for u, s in zip(uniq.tolist(), splits)}
        L = self.history_len
        out: list[int] = []
        lengths = np.zeros(len(users), dtype=np.int64)
        for j, (u, i) in enumerate(zip(users.tolist(), np.asarray(item_rows).tolist())):
            h = hist[u]
            if len(h) > L:
                del h[: len(h) - L]
            out.extend(h)
            lengths[j] = len(h)
            h.append(i)
        self.push(users, item_rows, ts_ms)
        return np.asarray(out, dtype=np.int64), lengths

    def state_dict(self) -> dict[str, Any]:
        return {"items": self.items.copy(), "ts": self.ts.copy(), "count": self.count.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.items = np.asarray(state["items"], dtype=np.int64).copy()
        self.ts = np.asarray(state["ts"], dtype=np.int64).copy()
        self.count = np.asarray(state["count"], dtype=np.int64).copy()
        self.num_rows, self.history_len = self.items.shape


def _bag(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(ids, dtype=np.int64)
    return ids, np.ones(len(ids), dtype=np.int64)


def build_kjt(
    n: int,
    user_rows: np.ndarray | None = None,
    history: tuple[np.ndarray, np.ndarray] | None = None,
    item_rows: np.ndarray | None = None,
    category_rows: np.ndarray | None = None,
) -> KeyedJaggedTensor:
    """One KJT over ``ALL_KEYS`` for ``n`` examples; absent features are empty bags.

    Args:
        n: batch size (stride).
        user_rows: (n,) user rows, one per example.
        history: (values, lengths) jagged item rows of the users' histories.
        item_rows / category_rows: (n,) item and category rows.
    """
    empty = (np.empty(0, dtype=np.int64), np.zeros(n, dtype=np.int64))
    parts = {
        "user_id": _bag(user_rows) if user_rows is not None else empty,
        "history": (np.asarray(history[0], np.int64), np.asarray(history[1], np.int64)) if history is not None else empty,
        "item_id": _bag(item_rows) if item_rows is not None else empty,
        "category": _bag(category_rows) if category_rows is not None else empty,
    }
    for key, (_, lengths) in parts.items():
        if len(lengths) != n:
            raise ValueError(f"feature {key} has {len(lengths)} bags, expected {n}")
    values = np.concatenate([parts[k][0] for k in ALL_KEYS])
    lengths = np.concatenate([parts[k][1] for k in ALL_KEYS])
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(ALL_KEYS), values=torch.from_numpy(values), lengths=torch.from_numpy(lengths)
    )
