"""Update encoders, one per collaboration family, all carried by the same Envelope.

Each encoder states its error bound (what ``decode(encode(x))`` may differ by)
and the bytes of the dense float32 update it replaces, so strategies can trade
traffic for fidelity knowingly.

* ``FeatureEncoder`` ("feature"): a user-interest vector, int8 + float32 scale
  (4 + d bytes). Bound: ``|x_i - x'_i| <= max|x| / 254`` per coordinate.
* ``ParameterEncoder`` ("parameter"): FedSGD-style delta of the shared reranker
  weights plus the embedding rows the user touched (submodel: row id -> delta).
  Pipeline: clip the joint L2 norm to C -> Gaussian noise ``z*C`` (local DP,
  accounted in privacy.py) -> add the error-feedback residual -> top-k
  coordinates / top rows -> int8 -> hard clip of the *sent* norm to
  ``send_bound`` (post-processing, keeps DP). What is not sent stays in the
  residual. Bound per sent coordinate: ``scale / 2``; identity
  ``sent + new_residual == clipped_noisy + old_residual`` (before the residual cap).
  Note: the set of touched row ids is itself revealed; DP covers the values only.
* ``DataEncoder`` ("data"): hard examples (item id, label, features in float16),
  only with consent, capped. Bound: float16 rounding, ``|x - x'| <= |x| * 2**-11``.
* ``EvaluationEncoder`` ("evaluation"): a device's verdict on a trial reranker (Flower's
  ``evaluate`` round): its mean listwise loss under the shipped and the trial model on its
  own feedback that no update has carried yet. 20 bytes, exact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Final

import msgspec
import numpy as np

from device_rerank.config import DataEncoderConfig, ParameterEncoderConfig

logger = logging.getLogger(__name__)

FAMILIES: Final[tuple[str, ...]] = ("feature", "parameter", "data", "evaluation")
#: Largest embedding width / payload counts accepted when decoding (forged payloads).
MAX_DIM: Final[int] = 124  # 4 + 124 = 128 bytes for the feature payload
MAX_SENT_COORDS: Final[int] = 1 << 20
MAX_ROWS: Final[int] = 4096
MAX_EXAMPLES: Final[int] = 4096


class PayloadError(ValueError):
    """A payload that does not decode; the verifier maps it to ``malformed``."""


# -- shared helpers -----------------------------------------------------------
def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Symmetric int8 with one scale: returns (q, scale); dequantize as ``q * scale``."""
    x = np.asarray(x, dtype=np.float32)
    m = float(np.abs(x).max()) if x.size else 0.0
    # A scale that would underflow float32 (on the wire) means the vector is zero for int8.
    scale = m / 127.0 if np.float32(m / 127.0) > 0 else 1.0
    return np.clip(np.rint(x / scale), -127, 127).astype(np.int8), scale


def clip_l2(x: np.ndarray, bound: float) -> np.ndarray:
    """``x`` scaled down so its L2 norm is at most ``bound`` (unchanged when already inside)."""
    n = float(np.linalg.norm(x))
    return x if n <= bound or n == 0 else (x * (bound / n)).astype(x.dtype)


def add_gaussian_noise(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``x + N(0, sigma^2)`` per coordinate (no-op for sigma 0)."""
    if sigma <= 0:
        return x
    return (x + rng.normal(0.0, sigma, size=x.shape)).astype(np.float32)


def _finite(x: float) -> bool:
    return bool(np.isfinite(x))


# -- feature family -----------------------------------------------------------
def interest_vector(emb: np.ndarray, dwell_s: np.ndarray, age_s: np.ndarray, half_life_s: float) -> np.ndarray:
    """Dwell- and recency-weighted mean of engaged item embeddings (zeros when none).

    Weight of a step: ``(1 + log1p(dwell)) * 0.5 ** (age / half_life)``.
    """
    if len(emb) == 0:
        return np.zeros(emb.shape[1] if emb.ndim == 2 else 0, dtype=np.float32)
    age = np.maximum(age_s, 0)
    # Only relative weights matter (it is a weighted mean): measure age from the newest step,
    # or a user back after months gets weights that all underflow to zero.
    age = age - age.min()
    w = (1.0 + np.log1p(np.maximum(dwell_s, 0))) * np.power(0.5, age / half_life_s)
    w = w / max(float(w.sum()), 1e-12)
    return (w[:, None] * emb).sum(axis=0).astype(np.float32)


class FeatureEncoder:
    """User-interest vector as int8 plus a float32 scale (``4 + d`` bytes, <= 128)."""

    family: Final[str] = "feature"

    @staticmethod
    def encode(vec: np.ndarray) -> bytes:
        vec = np.asarray(vec, dtype=np.float32).reshape(-1)
        if not 0 < len(vec) <= MAX_DIM:
            raise ValueError(f"interest vector width {len(vec)} outside 1..{MAX_DIM}")
        q, scale = quantize_int8(vec)
        return np.float32(scale).tobytes() + q.tobytes()

    @staticmethod
    def decode(payload: bytes) -> np.ndarray:
        if not 5 <= len(payload) <= 4 + MAX_DIM:
            raise PayloadError(f"feature payload of {len(payload)} bytes")
        scale = float(np.frombuffer(payload[:4], dtype="<f4")[0])
        if not _finite(scale) or scale <= 0:
            raise PayloadError("feature scale not positive and finite")
        return np.frombuffer(payload[4:], dtype=np.int8).astype(np.float32) * scale

    @staticmethod
    def error_bound(vec: np.ndarray) -> float:
        """Max per-coordinate error of the round trip."""
        return float(np.abs(vec).max()) / 254.0 + 1e-7

    @staticmethod
    def dense_nbytes(dim: int) -> int:
        return 4 * dim


# -- parameter family ---------------------------------------------------------
@dataclass(frozen=True)
class SparseDelta:
    """A sparse delta of the flat shared-weight vector (see ``Reranker.param_layout``)."""

    indices: np.ndarray  # int64, sorted, unique
    values: np.ndarray  # float32
    size: int

    def to_dense(self) -> np.ndarray:
        out = np.zeros(self.size, dtype=np.float32)
        out[self.indices] = self.values
        return out


@dataclass
class ParameterUpdate:
    """Decoded parameter-family content: model delta plus item-embedding row deltas."""

    model: SparseDelta
    rows: dict[int, np.ndarray] = field(default_factory=dict)  # raw item id -> (d,) float32

    def norm(self) -> float:
        sq = float(np.sum(self.model.values.astype(np.float64) ** 2))
        sq += sum(float(np.sum(v.astype(np.float64) ** 2)) for v in self.rows.values())
        return sq**0.5


class _ParamWire(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    n_params: int
    dim: int
    idx: bytes  # uint16 (n_params <= 65536) or int32 indices
    q: bytes  # int8 values
    scale: float
    row_ids: bytes  # int64
    row_q: bytes  # int8, rows * dim
    row_scale: bytes  # float32 per row


_param_enc = msgspec.msgpack.Encoder()
_param_dec = msgspec.msgpack.Decoder(_ParamWire)


@dataclass
class EncodeStats:
    """What an encode call produced, for traffic reports."""

    nbytes: int
    dense_nbytes: int
    sent_coords: int
    sent_rows: int
    pre_clip_norm: float
    sent_norm: float


class ParameterEncoder:
    """Clip -> noise -> error feedback -> top-k -> int8 -> sent-norm clip. Holds the residual.

    Args:
        config: clip norm, noise multiplier, top-k and row budget.
        n_params: length of the flat shared-weight vector.
        dim: embedding row width.
    """

    family: Final[str] = "parameter"

    def __init__(self, config: ParameterEncoderConfig, n_params: int, dim: int) -> None:
        self.config = config
        self.n_params = n_params
        self.dim = dim
        self.residual = np.zeros(n_params, dtype=np.float32)
        self.row_residual: dict[int, np.ndarray] = {}

    @property
    def sigma(self) -> float:
        return self.config.noise_multiplier * self.config.clip_norm

    def send_bound(self) -> float:
        return self.config.send_bound(self.n_params, self.dim)

    def privatize(
        self, model_delta: np.ndarray, rows: dict[int, np.ndarray], rng: np.random.Generator
    ) -> tuple[np.ndarray, dict[int, np.ndarray], float]:
        """Joint L2 clip to C, then Gaussian noise (std z*C) on every model coord and touched-row coord."""
        model_delta = np.asarray(model_delta, dtype=np.float32)
        ids = sorted(rows)
        flat = np.concatenate([model_delta] + [np.asarray(rows[i], dtype=np.float32) for i in ids]) if ids else model_delta
        pre = float(np.linalg.norm(flat))
        flat = add_gaussian_noise(clip_l2(flat, self.config.clip_norm), self.sigma, rng)
        m = flat[: self.n_params]
        r = {i: flat[self.n_params + j * self.dim : self.n_params + (j + 1) * self.dim] for j, i in enumerate(ids)}
        return m, r, pre

    def encode(
        self, model_delta: np.ndarray, rows: dict[int, np.ndarray], rng: np.random.Generator
    ) -> tuple[bytes, EncodeStats]:
        """Encode one update (mutates the error-feedback residual)."""
        cfg = self.config
        if len(model_delta) != self.n_params:
            raise ValueError(f"model delta has {len(model_delta)} values, expected {self.n_params}")
        m, r, pre = self.privatize(model_delta, rows, rng)
        e = self.residual + m
        e_rows = {i: v.copy() for i, v in self.row_residual.items()}
        for i, v in r.items():
            e_rows[i] = e_rows[i] + v if i in e_rows else v.copy()
        k = min(cfg.top_k, self.n_params)
        idx = np.sort(np.argpartition(-np.abs(e), k - 1)[:k]) if k > 0 else np.zeros(0, dtype=np.int64)
        q, scale = quantize_int8(e[idx])
        row_ids = sorted(e_rows, key=lambda i: -float(np.linalg.norm(e_rows[i])))[: cfg.max_rows]
        row_ids.sort()
        row_q = np.zeros((len(row_ids), self.dim), dtype=np.int8)
        row_scale = np.zeros(len(row_ids), dtype=np.float32)
        for j, i in enumerate(row_ids):
            row_q[j], row_scale[j] = quantize_int8(e_rows[i])
        # hard clip of what is sent: shrink the scales (exact on the decoded values)
        sent_sq = float(np.sum((q.astype(np.float64) * scale) ** 2))
        sent_sq += float(np.sum((row_q.astype(np.float64) * row_scale[:, None]) ** 2))
        bound = self.send_bound()
        shrink = min(1.0, bound / sent_sq**0.5) * (1 - 1e-6) if sent_sq > 0 else 1.0
        scale *= shrink
        row_scale = (row_scale * shrink).astype(np.float32)
        # error feedback: keep what was not sent
        sent = np.zeros(self.n_params, dtype=np.float32)
        sent[idx] = q.astype(np.float32) * np.float32(scale)
        self.residual = clip_l2((e - sent).astype(np.float32), cfg.residual_max_norm)
        for j, i in enumerate(row_ids):
            e_rows[i] = e_rows[i] - row_q[j].astype(np.float32) * row_scale[j]
        keep = sorted(e_rows, key=lambda i: -float(np.linalg.norm(e_rows[i])))[: 4 * cfg.max_rows]
        self.row_residual = {i: clip_l2(e_rows[i], cfg.residual_max_norm) for i in keep}
        idx_dtype = np.uint16 if self.n_params <= 65536 else np.int32
        wire = _ParamWire(
            n_params=self.n_params,
            dim=self.dim,
            idx=idx.astype(idx_dtype).tobytes(),
            q=q.tobytes(),
            scale=float(scale),
            row_ids=np.asarray(row_ids, dtype="<i8").tobytes(),
            row_q=row_q.tobytes(),
            row_scale=row_scale.astype("<f4").tobytes(),
        )
        payload = _param_enc.encode(wire)
        stats = EncodeStats(
            nbytes=len(payload),
            dense_nbytes=self.dense_nbytes(len(rows)),
            sent_coords=int(k),
            sent_rows=len(row_ids),
            pre_clip_norm=pre,
            sent_norm=float(sent_sq**0.5 * shrink),
        )
        return payload, stats

    def dense_nbytes(self, n_rows: int) -> int:
        """Dense float32 update replaced: all shared weights plus (row id, row) per touched row."""
        return 4 * self.n_params + n_rows * (8 + 4 * self.dim)

    @staticmethod
    def decode(payload: bytes, expect_n_params: int | None = None, expect_dim: int | None = None) -> ParameterUpdate:
        try:
            w = _param_dec.decode(payload)
        except Exception as exc:  # msgspec errors, UnicodeDecodeError, ...
            raise PayloadError(f"parameter payload: {exc}") from None
        if expect_n_params is not None and w.n_params != expect_n_params:
            raise PayloadError(f"n_params {w.n_params} != {expect_n_params}")
        if expect_dim is not None and w.dim != expect_dim:
            raise PayloadError(f"dim {w.dim} != {expect_dim}")
        if not (0 < w.n_params <= 1 << 26 and 0 < w.dim <= 4096):
            raise PayloadError("sizes out of range")
        idx_dtype = np.uint16 if w.n_params <= 65536 else np.dtype("<i4")
        isz = np.dtype(idx_dtype).itemsize
        if len(w.idx) % isz or len(w.idx) // isz != len(w.q) or len(w.q) > MAX_SENT_COORDS:
            raise PayloadError("index/value lengths disagree")
        idx = np.frombuffer(w.idx, dtype=idx_dtype).astype(np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= w.n_params or np.any(np.diff(idx) <= 0)):
            raise PayloadError("indices out of range or not strictly increasing")
        if not _finite(w.scale) or w.scale < 0:
            raise PayloadError("bad scale")
        values = np.frombuffer(w.q, dtype=np.int8).astype(np.float32) * np.float32(w.scale)
        if len(w.row_ids) % 8:
            raise PayloadError("row ids not int64")
        r = len(w.row_ids) // 8
        if r > MAX_ROWS or len(w.row_q) != r * w.dim or len(w.row_scale) != 4 * r:
            raise PayloadError("row block lengths disagree")
        row_ids = np.frombuffer(w.row_ids, dtype="<i8")
        if len(np.unique(row_ids)) != r:
            raise PayloadError("duplicate row ids")
        row_scale = np.frombuffer(w.row_scale, dtype="<f4")
        if not np.all(np.isfinite(row_scale)) or np.any(row_scale < 0):
            raise PayloadError("bad row scale")
        row_q = np.frombuffer(w.row_q, dtype=np.int8).reshape(r, w.dim).astype(np.float32) * row_scale[:, None]
        rows = {int(i): row_q[j] for j, i in enumerate(row_ids.tolist())}
        return ParameterUpdate(SparseDelta(idx, values, int(w.n_params)), rows)


# -- data family --------------------------------------------------------------
@dataclass(frozen=True)
class HardExamples:
    """Decoded data-family content: one row per example."""

    item_ids: np.ndarray  # int64 (n,)
    labels: np.ndarray  # uint8 (n,), 1 = engaged
    features: np.ndarray  # float32 (n, f): ctx features, cloud z, device model score

    def __len__(self) -> int:
        return len(self.item_ids)


class _DataWire(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    n: int
    f: int
    item_ids: bytes
    labels: bytes
    features: bytes  # float16


_data_enc = msgspec.msgpack.Encoder()
_data_dec = msgspec.msgpack.Decoder(_DataWire)


class DataEncoder:
    """Consented hard examples (float16 features), capped."""

    family: Final[str] = "data"

    def __init__(self, config: DataEncoderConfig) -> None:
        self.config = config

    def select(self, ex: HardExamples, scores: np.ndarray, rng: np.random.Generator) -> HardExamples | None:
        """The hardest examples (positives scored low, negatives scored high); None without consent."""
        if not self.config.consent or len(ex) == 0:
            return None
        keep = rng.random(len(ex)) < self.config.sample_rate
        p = 1.0 / (1.0 + np.exp(-scores))
        hardness = np.where(ex.labels == 1, 1.0 - p, p)
        hardness = np.where(keep, hardness, -1.0)
        order = np.argsort(-hardness, kind="stable")[: self.config.max_examples]
        order = order[hardness[order] >= 0]
        if len(order) == 0:
            return None
        return HardExamples(ex.item_ids[order], ex.labels[order], ex.features[order])

    @staticmethod
    def encode(ex: HardExamples) -> bytes:
        n, f = ex.features.shape
        return _data_enc.encode(
            _DataWire(
                n=n,
                f=f,
                item_ids=np.asarray(ex.item_ids, dtype="<i8").tobytes(),
                labels=np.asarray(ex.labels, dtype=np.uint8).tobytes(),
                features=np.asarray(ex.features, dtype="<f2").tobytes(),
            )
        )

    @staticmethod
    def decode(payload: bytes) -> HardExamples:
        try:
            w = _data_dec.decode(payload)
        except Exception as exc:  # msgspec errors, UnicodeDecodeError, ...
            raise PayloadError(f"data payload: {exc}") from None
        if not (0 <= w.n <= MAX_EXAMPLES and 0 < w.f <= 256):
            raise PayloadError("counts out of range")
        if len(w.item_ids) != 8 * w.n or len(w.labels) != w.n or len(w.features) != 2 * w.n * w.f:
            raise PayloadError("column lengths disagree")
        labels = np.frombuffer(w.labels, dtype=np.uint8)
        feats = np.frombuffer(w.features, dtype="<f2").reshape(w.n, w.f).astype(np.float32)
        if np.any(labels > 1) or not np.all(np.isfinite(feats)):
            raise PayloadError("labels not 0/1 or non-finite features")
        return HardExamples(np.frombuffer(w.item_ids, dtype="<i8").copy(), labels.copy(), feats)

    @staticmethod
    def error_bound(features: np.ndarray) -> np.ndarray:
        """Per-value bound of the float16 round trip (ids and labels are exact)."""
        return np.abs(features) * 2.0**-11 + 6e-8

    @staticmethod
    def dense_nbytes(n: int, f: int) -> int:
        """Float32 rows replaced: int64 id, float32 label, float32 features."""
        return n * (8 + 4 + 4 * f)


# -- evaluation family ---------------------------------------------------------
#: Largest mean listwise loss an honest device can report: log of the longest group it keeps.
MAX_EVAL_LOSS: Final[float] = 20.0


@dataclass(frozen=True)
class TrialEvaluation:
    """Decoded evaluation-family content: a trial reranker scored on a device's fresh groups."""

    trial_version: int
    groups: int  # example groups (engagements) scored
    loss_shipped: float  # mean listwise loss under the model the device runs
    loss_trial: float  # the same groups under the trial

    @property
    def difference(self) -> float:
        """Trial minus shipped (negative: the trial ranks this device's engagements higher)."""
        return self.loss_trial - self.loss_shipped


_EVAL_WIRE = np.dtype([("trial_version", "<i8"), ("groups", "<u4"), ("loss_shipped", "<f4"), ("loss_trial", "<f4")])


class EvaluationEncoder:
    """A ``TrialEvaluation`` as 20 little-endian bytes (int64, uint32, two float32)."""

    family: Final[str] = "evaluation"

    @staticmethod
    def encode(ev: TrialEvaluation) -> bytes:
        return np.array([(ev.trial_version, ev.groups, ev.loss_shipped, ev.loss_trial)], dtype=_EVAL_WIRE).tobytes()

    @staticmethod
    def decode(payload: bytes) -> TrialEvaluation:
        if len(payload) != _EVAL_WIRE.itemsize:
            raise PayloadError(f"evaluation payload of {len(payload)} bytes, expected {_EVAL_WIRE.itemsize}")
        r = np.frombuffer(payload, dtype=_EVAL_WIRE)[0]
        ev = TrialEvaluation(int(r["trial_version"]), int(r["groups"]), float(r["loss_shipped"]), float(r["loss_trial"]))
        if ev.groups < 1 or ev.trial_version < 0:
            raise PayloadError("evaluation with no groups or a negative trial version")
        if not all(_finite(x) and 0.0 <= x <= MAX_EVAL_LOSS for x in (ev.loss_shipped, ev.loss_trial)):
            raise PayloadError(f"evaluation losses outside [0, {MAX_EVAL_LOSS}]")
        return ev
