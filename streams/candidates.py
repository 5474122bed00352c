"""What the cloud sends a device: top-K candidates with compact features.

A contract between the cloud (producer) and the devices (consumer), so it lives below both
packages (``cloud_recsys`` and ``device_rerank`` never import each other), with no heavy
imports; ``top_indices`` is how either side cuts a scored list, and ``candidates_to_json`` /
``candidates_from_json`` are its JSON wire form (the candidate HTTP API of every cloud engine).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Candidates:
    """Top-K candidates for one user, best first.

    Args:
        user_id: raw user id the list was computed for.
        item_ids: raw item ids (int64), best first.
        scores: cloud retrieval scores (float32), same order.
        emb_q: item embeddings quantized to int8, shape (k, d).
        emb_scale: per-row dequantization scale (float32, shape (k,)): ``emb_q * emb_scale[:, None]``.
        model_version: version of the cloud model that produced the list.
        computed_at_ms: log time the list was computed at (for staleness).
        fallback: None for a personalized list, or why it is not (e.g. "popular" for an unknown user).
    """

    user_id: int
    item_ids: np.ndarray
    scores: np.ndarray
    emb_q: np.ndarray
    emb_scale: np.ndarray
    model_version: int
    computed_at_ms: int = 0
    fallback: str | None = None

    def __len__(self) -> int:
        return len(self.item_ids)

    def embeddings(self) -> np.ndarray:
        """Dequantized float32 item embeddings, shape (k, d)."""
        return self.emb_q.astype(np.float32) * self.emb_scale[:, None]

    @property
    def nbytes(self) -> int:
        """Bytes on the wire for the payload (ids, scores, features)."""
        return int(self.item_ids.nbytes + self.scores.nbytes + self.emb_q.nbytes + self.emb_scale.nbytes)


def quantize_rows(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 quantization: returns (int8 rows, float32 scales)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    scale = np.abs(vectors).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(vectors / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest of a 1-D ``scores``, best first (ties: lower index first)."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    idx = np.argpartition(-scores, k - 1)[:k]
    return idx[np.argsort(-scores[idx], kind="stable")]


def candidates_to_json(c: Candidates) -> dict[str, Any]:
    """JSON body of one candidate list (int8 features base64-encoded, row-major (k, dim))."""
    return {
        "user_id": int(c.user_id),
        "item_ids": [int(i) for i in c.item_ids],
        "scores": [float(s) for s in c.scores],
        "dim": int(c.emb_q.shape[1]) if c.emb_q.ndim == 2 else 0,
        "emb_q_b64": base64.b64encode(np.ascontiguousarray(c.emb_q, dtype=np.int8).tobytes()).decode(),
        "emb_scale": [float(s) for s in c.emb_scale],
        "model_version": int(c.model_version),
        "computed_at_ms": int(c.computed_at_ms),
        "fallback": c.fallback,
    }


def candidates_from_json(d: dict[str, Any]) -> Candidates:
    """Inverse of ``candidates_to_json`` (used by device-side HTTP clients)."""
    k = len(d["item_ids"])
    dim = int(d.get("dim", 0))
    raw = base64.b64decode(d["emb_q_b64"])
    emb = np.frombuffer(raw, dtype=np.int8).reshape(k, dim) if dim else np.zeros((k, 0), np.int8)
    return Candidates(
        user_id=int(d["user_id"]),
        item_ids=np.asarray(d["item_ids"], dtype=np.int64),
        scores=np.asarray(d["scores"], dtype=np.float32),
        emb_q=emb,
        emb_scale=np.asarray(d["emb_scale"], dtype=np.float32),
        model_version=int(d["model_version"]),
        computed_at_ms=int(d.get("computed_at_ms", 0)),
        fallback=d.get("fallback"),
    )
