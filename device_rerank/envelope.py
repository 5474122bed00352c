"""Signed update envelopes and their verification on the cloud side.

One envelope carries one device update of any family. It is signed with
HMAC-SHA256 under a per-device key ``HMAC(master, device_id)`` (``Keyring``),
so the cloud holds one secret and a leaked device key exposes one device.

``UpdateVerifier.verify(raw)`` is the only way in for the aggregator: every
failure raises ``UpdateRejected(reason)`` (never another exception), with
``reason`` one of ``REASONS``. Checks run cheapest-first and nothing from the
envelope is trusted before the signature is checked: size (before decoding) ->
structure -> envelope version -> signature -> family -> staleness -> replay ->
payload -> norm bound. The replay state advances only for accepted envelopes.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from typing import Annotated, Final

import msgspec
import numpy as np

from device_rerank.encoders import (
    FAMILIES,
    DataEncoder,
    FeatureEncoder,
    HardExamples,
    ParameterEncoder,
    ParameterUpdate,
    PayloadError,
)

logger = logging.getLogger(__name__)

ENVELOPE_VERSION: Final[int] = 1
_SIGN_DOMAIN: Final[bytes] = b"tandem-envelope-v1"
_KEY_DOMAIN: Final[bytes] = b"tandem-device-key:"

#: Every reason ``UpdateRejected`` may carry.
REASONS: Final[frozenset[str]] = frozenset(
    {"oversized", "malformed", "unsupported_version", "bad_signature", "unknown_family", "stale", "replayed", "norm_exceeded"}
)

_U63 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class UpdateRejected(Exception):
    """An update the cloud will not aggregate; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Envelope(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """One signed device update (msgpack on the wire, fields in this order).

    Args:
        version: envelope format version (``ENVELOPE_VERSION``).
        device_id: sender; selects the HMAC key.
        model_version: cloud model version the update was computed against.
        seq: per-device sequence number, strictly increasing (replay protection).
        family: "feature" | "parameter" | "data".
        created_ms: device clock at creation.
        num_examples: local examples behind the update (aggregation weight).
        payload: family-specific bytes (device_rerank/encoders.py).
        signature: HMAC-SHA256 over every field above.
    """

    version: _U63
    device_id: _U63
    model_version: _U63
    seq: _U63
    family: Annotated[str, msgspec.Meta(max_length=32)]
    created_ms: _U63
    num_examples: _U63
    payload: bytes
    signature: bytes = b""

    def signing_bytes(self) -> bytes:
        fields = [self.version, self.device_id, self.model_version, self.seq, self.family, self.created_ms, self.num_examples, self.payload]
        return _SIGN_DOMAIN + _encoder.encode(fields)

    def encode(self) -> bytes:
        """Wire bytes (msgpack array)."""
        return _encoder.encode(self)

    @property
    def nbytes(self) -> int:
        return len(self.encode())


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Envelope)


class Keyring:
    """Per-device HMAC keys derived from one master secret.

    ``key = HMAC-SHA256(master, b"tandem-device-key:" + device_id as 8 bytes big-endian)``;
    the prefix separates this use of the master from any other.
    """

    def __init__(self, master: bytes) -> None:
        if len(master) < 16:
            raise ValueError("master secret must be at least 16 bytes")
        self._master = master

    def key_for(self, device_id: int) -> bytes:
        return hmac.new(self._master, _KEY_DOMAIN + int(device_id).to_bytes(8, "big"), hashlib.sha256).digest()


def sign(
    key: bytes,
    *,
    device_id: int,
    model_version: int,
    seq: int,
    family: str,
    created_ms: int,
    num_examples: int,
    payload: bytes,
) -> Envelope:
    """Build and sign an envelope with the device's key."""
    env = Envelope(ENVELOPE_VERSION, device_id, model_version, seq, family, created_ms, num_examples, payload)
    env.signature = hmac.new(key, env.signing_bytes(), hashlib.sha256).digest()
    return env


@dataclass(frozen=True)
class DecodedUpdate:
    """A verified update, ready for aggregation.

    Exactly one of the content fields is set, by ``family``:

    * "feature": ``user_vector`` float32 (d,), the user's interest vector (dwell/recency
      weighted mean of engaged item embeddings);
    * "parameter": ``params`` (``ParameterUpdate``): ``params.model`` is a ``SparseDelta`` of the
      flat shared reranker weights (``Reranker.param_layout`` order; ``to_dense()`` then
      ``Reranker.unflatten``), ``params.rows`` maps raw item id -> (d,) delta of that item's
      embedding. Deltas are ``-local_lr * gradient`` (add them, weighted by ``num_examples``),
      already clipped, noised (local DP) and sparsified;
    * "data": ``examples`` (``HardExamples``): item ids, 0/1 labels, float features
      (``config.CTX_FEATURES`` + cloud z + device score).
    """

    device_id: int
    seq: int
    family: str
    model_version: int
    num_examples: int
    created_ms: int
    nbytes: int
    user_vector: np.ndarray | None = None
    params: ParameterUpdate | None = None
    examples: HardExamples | None = None


class UpdateVerifier:
    """Checks envelopes and remembers the last accepted seq per device.

    Args:
        keyring: derives each device's key.
        max_bytes: raw envelopes larger than this are refused before decoding.
        max_staleness_versions: accept ``model_version >= current - max_staleness_versions``.
        current_model_version: the aggregator's model version (update it on refresh).
        param_norm_bound: L2 bound for parameter updates (``ParameterEncoder.send_bound()``); None skips.
        n_params: expected flat size of parameter updates (None: any).
        emb_dim: expected embedding width (None: any).
        families: accepted families.
        max_num_examples: larger claimed ``num_examples`` (the aggregation weight) is ``malformed``.
    """

    def __init__(
        self,
        keyring: Keyring,
        max_bytes: int = 64 * 1024,
        max_staleness_versions: int = 2,
        current_model_version: int = 0,
        param_norm_bound: float | None = None,
        n_params: int | None = None,
        emb_dim: int | None = None,
        families: tuple[str, ...] = FAMILIES,
        max_num_examples: int = 100_000,
    ) -> None:
        self.keyring = keyring
        self.max_bytes = max_bytes
        self.max_staleness_versions = max_staleness_versions
        self.current_model_version = current_model_version
        self.param_norm_bound = param_norm_bound
        self.n_params = n_params
        self.emb_dim = emb_dim
        self.families = frozenset(families)
        self.max_num_examples = max_num_examples
        self.last_seq: dict[int, int] = {}
        self.rejected: dict[str, int] = {r: 0 for r in REASONS}

    def _reject(self, reason: str, detail: str = "") -> UpdateRejected:
        self.rejected[reason] += 1
        logger.info("update rejected: %s %s", reason, detail)
        return UpdateRejected(reason, detail)

    def verify(self, raw: bytes) -> DecodedUpdate:
        """Decode and check one envelope; raises ``UpdateRejected(reason)``."""
        if not isinstance(raw, (bytes, bytearray, memoryview)):
            raise self._reject("malformed", "not bytes")
        if len(raw) > self.max_bytes:
            raise self._reject("oversized", f"{len(raw)} > {self.max_bytes} bytes")
        try:
            env = _decoder.decode(raw)
        except Exception as exc:  # msgspec errors, and UnicodeDecodeError on forged strings
            raise self._reject("malformed", f"{type(exc).__name__}: {exc}") from None
        if env.version != ENVELOPE_VERSION:
            raise self._reject("unsupported_version", str(env.version))
        key = self.keyring.key_for(env.device_id)
        expected = hmac.new(key, env.signing_bytes(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, env.signature):
            raise self._reject("bad_signature", f"device {env.device_id}")
        if env.family not in self.families:
            raise self._reject("unknown_family", env.family)
        if env.model_version < self.current_model_version - self.max_staleness_versions:
            raise self._reject("stale", f"model {env.model_version} < {self.current_model_version} - {self.max_staleness_versions}")
        if env.model_version > self.current_model_version:
            raise self._reject("stale", f"model {env.model_version} is ahead of {self.current_model_version}")
        if env.num_examples > self.max_num_examples:
            raise self._reject("malformed", f"num_examples {env.num_examples} > {self.max_num_examples}")
        last = self.last_seq.get(env.device_id)
        if last is not None and env.seq <= last:
            raise self._reject("replayed", f"seq {env.seq} <= {last}")
        try:
            out = self._content(env, len(raw))
        except PayloadError as exc:
            raise self._reject("malformed", str(exc)) from None
        except Exception as exc:  # a forged payload must never crash the aggregator
            raise self._reject("malformed", f"{type(exc).__name__}: {exc}") from None
        if out.params is not None and self.param_norm_bound is not None:
            n = out.params.norm()
            if not np.isfinite(n) or n > self.param_norm_bound * (1 + 1e-4):
                raise self._reject("norm_exceeded", f"{n:.4g} > {self.param_norm_bound:.4g}")
        self.last_seq[env.device_id] = env.seq
        return out

    def _content(self, env: Envelope, nbytes: int) -> DecodedUpdate:
        base = dict(
            device_id=env.device_id,
            seq=env.seq,
            family=env.family,
            model_version=env.model_version,
            num_examples=env.num_examples,
            created_ms=env.created_ms,
            nbytes=nbytes,
        )
        if env.family == "feature":
            vec = FeatureEncoder.decode(env.payload)
            if self.emb_dim is not None and len(vec) != self.emb_dim:
                raise PayloadError(f"user vector width {len(vec)} != {self.emb_dim}")
            return DecodedUpdate(**base, user_vector=vec)
        if env.family == "parameter":
            return DecodedUpdate(**base, params=ParameterEncoder.decode(env.payload, self.n_params, self.emb_dim))
        return DecodedUpdate(**base, examples=DataEncoder.decode(env.payload))


def verify(envelope_bytes: bytes, verifier: UpdateVerifier) -> DecodedUpdate:
    """Function form of ``UpdateVerifier.verify`` (architecture.md's ``verify``)."""
    return verifier.verify(envelope_bytes)
