"""Signed update envelopes and their verification on the cloud side.

One envelope carries one device update of any family. It is signed with
HMAC-SHA256 under a per-device key derived by HKDF-SHA256 (RFC 5869) from the
master secret and the device id (``Keyring``), so the cloud holds one secret and
a leaked device key exposes one device. During a key rotation the verifier
accepts the new and the previous master (``previous=``).

``UpdateVerifier.verify(raw)`` is the only way in for the aggregator: every
failure raises ``UpdateRejected(reason)`` (never another exception), with
``reason`` one of ``REASONS``. Checks run cheapest-first and nothing from the
envelope is trusted before the signature is checked: size (before decoding) ->
structure -> envelope version -> signature -> family -> staleness -> replay ->
payload -> contract (width, ``n_params``, finite values, norm bound, non-zero
direction). The replay state advances only for accepted envelopes.

Build verifiers with ``make_verifier`` so the evaluation and the services enforce
the same contract.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Final

import msgspec
import numpy as np

from device_rerank.encoders import (
    FAMILIES,
    DataEncoder,
    EvaluationEncoder,
    FeatureEncoder,
    HardExamples,
    ParameterEncoder,
    ParameterUpdate,
    PayloadError,
    TrialEvaluation,
)

if TYPE_CHECKING:
    from device_rerank.config import DeviceConfig

logger = logging.getLogger(__name__)

ENVELOPE_VERSION: Final[int] = 1
_SIGN_DOMAIN: Final[bytes] = b"tandem-envelope-v1"
_KEY_DOMAIN: Final[bytes] = b"tandem-device-key:"

#: Every reason ``UpdateRejected`` may carry.
REASONS: Final[frozenset[str]] = frozenset(
    {
        "oversized", "malformed", "unsupported_version", "bad_signature", "unknown_family", "stale", "replayed",
        "norm_exceeded", "non_finite", "wrong_shape", "zero_direction", "too_many_examples",
    }
)
#: HKDF salt of per-device keys (RFC 5869 "extract" step); versioned so a scheme change is explicit.
_HKDF_SALT: Final[bytes] = b"tandem-device-key-v2"
#: Verifier state is pruned for devices whose last update is staler than this many versions.
_PRUNE_SLACK_VERSIONS: Final[int] = 1

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
        family: "feature" | "parameter" | "data" | "evaluation".
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


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869): extract with ``salt``, expand with ``info`` to ``length`` bytes."""
    if not 0 < length <= 255 * 32:
        raise ValueError("HKDF length out of range")
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
        i += 1
    return out[:length]


class Keyring:
    """Per-device HMAC keys derived from one master secret.

    ``key = HKDF-SHA256(ikm=master, salt=b"tandem-device-key-v2",
    info=b"tandem-device-key:" + device_id as 8 bytes big-endian, L=32)``. A device holds
    only its own key; the cloud derives any device's key from the master on demand.
    """

    def __init__(self, master: bytes) -> None:
        if len(master) < 16:
            raise ValueError("master secret must be at least 16 bytes")
        self._master = bytes(master)

    def key_for(self, device_id: int) -> bytes:
        return hkdf_sha256(self._master, _HKDF_SALT, _KEY_DOMAIN + int(device_id).to_bytes(8, "big"))


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
      (``config.CTX_FEATURES`` + cloud z + device score);
    * "evaluation": ``evaluation`` (``TrialEvaluation``): the device's losses under the shipped
      and a trial reranker, on feedback no update of its carried yet.
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
    evaluation: TrialEvaluation | None = None


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
        max_num_examples: a larger claimed ``num_examples`` (the aggregation weight) is
            ``too_many_examples``.
        feature_norm_bound: L2 bound for feature (interest) vectors; None skips.
        previous: keyrings of earlier masters still accepted (key rotation window).
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
        feature_norm_bound: float | None = None,
        previous: tuple[Keyring, ...] = (),
    ) -> None:
        self.keyring = keyring
        self.max_bytes = max_bytes
        self.max_staleness_versions = max_staleness_versions
        self.last_seq: dict[int, int] = {}
        #: model version of each device's last accepted update, oldest acceptance first (prunes ``last_seq``).
        self.last_version: dict[int, int] = {}
        self._version = int(current_model_version)
        self.param_norm_bound = param_norm_bound
        self.n_params = n_params
        self.emb_dim = emb_dim
        self.families = frozenset(families)
        self.max_num_examples = max_num_examples
        self.feature_norm_bound = feature_norm_bound
        self.previous = tuple(previous)
        self.rejected: dict[str, int] = {r: 0 for r in REASONS}
        self.accepted_previous_key = 0

    @property
    def current_model_version(self) -> int:
        return self._version

    @current_model_version.setter
    def current_model_version(self, version: int) -> None:
        """Move to a new model version and forget devices that can no longer replay."""
        self._version = int(version)
        self.prune()

    def prune(self) -> int:
        """Drop per-device replay state that staleness already covers; returns how many.

        A device whose last accepted update was computed against a version older than
        ``current - max_staleness - 1`` cannot replay it (or anything older: versions do not
        decrease on a device), since the staleness check rejects it first. This keeps
        ``last_seq`` bounded by the devices active in the staleness window. ``last_version``
        is kept in acceptance order, so pruning stops at the first recent entry (amortized O(1)).
        """
        floor = self._version - self.max_staleness_versions - _PRUNE_SLACK_VERSIONS
        n = 0
        while self.last_version:
            d, v = next(iter(self.last_version.items()))
            if v >= floor:
                break
            del self.last_version[d]
            self.last_seq.pop(d, None)
            n += 1
        return n

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
        if not self._signed(env):
            raise self._reject("bad_signature", f"device {env.device_id}")
        if env.family not in self.families:
            raise self._reject("unknown_family", env.family)
        if env.model_version < self.current_model_version - self.max_staleness_versions:
            raise self._reject("stale", f"model {env.model_version} < {self.current_model_version} - {self.max_staleness_versions}")
        if env.model_version > self.current_model_version:
            raise self._reject("stale", f"model {env.model_version} is ahead of {self.current_model_version}")
        if env.num_examples > self.max_num_examples:
            raise self._reject("too_many_examples", f"num_examples {env.num_examples} > {self.max_num_examples}")
        last = self.last_seq.get(env.device_id)
        if last is not None and env.seq <= last:
            raise self._reject("replayed", f"seq {env.seq} <= {last}")
        try:
            out = self._content(env, len(raw))
        except UpdateRejected as exc:
            raise self._reject(exc.reason, exc.detail) from None
        except PayloadError as exc:
            raise self._reject("malformed", str(exc)) from None
        except Exception as exc:  # a forged payload must never crash the aggregator
            raise self._reject("malformed", f"{type(exc).__name__}: {exc}") from None
        self._check_contract(out)
        self.last_seq[env.device_id] = env.seq
        self.last_version.pop(env.device_id, None)  # re-insert at the end: acceptance order
        self.last_version[env.device_id] = env.model_version
        return out

    def _signed(self, env: Envelope) -> bool:
        """HMAC check under the current master, then under each previous one (rotation)."""
        data = env.signing_bytes()
        for i, ring in enumerate((self.keyring, *self.previous)):
            expected = hmac.new(ring.key_for(env.device_id), data, hashlib.sha256).digest()
            if hmac.compare_digest(expected, env.signature):
                if i:
                    self.accepted_previous_key += 1
                return True
        return False

    def _check_contract(self, out: DecodedUpdate) -> None:
        """Finite values, a norm within bound, and a direction (feature vectors) for what decoded."""
        if out.user_vector is not None:
            vec = np.asarray(out.user_vector, dtype=np.float64)
            if not np.all(np.isfinite(vec)):
                raise self._reject("non_finite", "feature vector has inf/nan")
            n = float(np.linalg.norm(vec))
            if not np.isfinite(n):
                raise self._reject("non_finite", "feature vector norm overflows")
            if n == 0.0:
                raise self._reject("zero_direction", "feature vector is all zeros")
            if self.feature_norm_bound is not None and n > self.feature_norm_bound * (1 + 1e-4):
                raise self._reject("norm_exceeded", f"feature {n:.4g} > {self.feature_norm_bound:.4g}")
        if out.params is not None:
            p = out.params
            finite = bool(np.all(np.isfinite(p.model.values))) and all(bool(np.all(np.isfinite(v))) for v in p.rows.values())
            if not finite:
                raise self._reject("non_finite", "parameter update has inf/nan")
            n = p.norm()
            if not np.isfinite(n):
                raise self._reject("non_finite", "parameter norm overflows")
            if self.param_norm_bound is not None and n > self.param_norm_bound * (1 + 1e-4):
                raise self._reject("norm_exceeded", f"{n:.4g} > {self.param_norm_bound:.4g}")

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
            with np.errstate(over="ignore", invalid="ignore"):  # a huge scale gives inf: rejected below
                vec = FeatureEncoder.decode(env.payload)
            if self.emb_dim is not None and len(vec) != self.emb_dim:
                raise UpdateRejected("wrong_shape", f"user vector width {len(vec)} != {self.emb_dim}")
            return DecodedUpdate(**base, user_vector=vec)
        if env.family == "parameter":
            try:
                with np.errstate(over="ignore", invalid="ignore"):
                    params = ParameterEncoder.decode(env.payload, self.n_params, self.emb_dim)
            except PayloadError as exc:
                if exc.args and str(exc.args[0]).startswith(("n_params ", "dim ")):
                    raise UpdateRejected("wrong_shape", str(exc)) from None
                raise
            return DecodedUpdate(**base, params=params)
        if env.family == "evaluation":
            ev = EvaluationEncoder.decode(env.payload)
            if ev.trial_version > self.current_model_version:
                raise UpdateRejected("stale", f"trial {ev.trial_version} is ahead of {self.current_model_version}")
            if ev.groups != env.num_examples:
                raise UpdateRejected("malformed", f"evaluation of {ev.groups} groups claims {env.num_examples} examples")
            return DecodedUpdate(**base, evaluation=ev)
        return DecodedUpdate(**base, examples=DataEncoder.decode(env.payload))


#: Norm of an honest interest vector: a weighted mean of L2-normalized item embeddings has
#: norm <= 1; the default bound leaves room for embeddings that are not normalized.
FEATURE_NORM_FLOOR: Final[float] = 4.0


def make_verifier(
    keyring: Keyring,
    n_params: int,
    emb_dim: int,
    device_config: "DeviceConfig | None" = None,
    *,
    max_staleness_versions: int = 2,
    current_model_version: int = 0,
    previous: tuple[Keyring, ...] = (),
    max_bytes: int = 64 * 1024,
    families: tuple[str, ...] = FAMILIES,
) -> UpdateVerifier:
    """The one way the evaluation and the services build a verifier: with the full contract.

    The bounds come from the devices' own configuration, so an honest update always passes
    and anything outside what an honest device can send is rejected:

    * parameter norm: ``device_config.parameter.send_bound(n_params, emb_dim)`` (clip + noise tail);
    * feature norm: ``max(FEATURE_NORM_FLOOR, clip_norm)`` plus the noise tail when features are noised;
    * ``num_examples``: at most what a device can hold (history, example buffer, data cap);
    * widths: ``n_params`` and ``emb_dim`` exactly.

    Args:
        keyring: the current master's keyring.
        n_params: flat size of the shared reranker (``Reranker.num_parameters()``).
        emb_dim: embedding width the cloud serves.
        device_config: the devices' configuration (default ``DeviceConfig()``).
        max_staleness_versions: accepted lag of an update's model version.
        current_model_version: the cloud's model version now.
        previous: keyrings of earlier masters accepted during a rotation.
        max_bytes: envelope size limit.
        families: accepted families.
    """
    from device_rerank.config import DeviceConfig

    cfg = device_config or DeviceConfig()
    fc = cfg.feature
    sigma = fc.noise_multiplier * fc.clip_norm
    feature_bound = max(FEATURE_NORM_FLOOR, fc.clip_norm) + sigma * (emb_dim**0.5 + cfg.parameter.tail_sigmas)
    max_examples = max(cfg.history_len, cfg.example_buffer, cfg.data.max_examples, 1)
    return UpdateVerifier(
        keyring,
        max_bytes=max_bytes,
        max_staleness_versions=max_staleness_versions,
        current_model_version=current_model_version,
        param_norm_bound=cfg.parameter.send_bound(n_params, emb_dim),
        n_params=n_params,
        emb_dim=emb_dim,
        families=families,
        max_num_examples=max_examples,
        feature_norm_bound=feature_bound,
        previous=previous,
    )


def verify(envelope_bytes: bytes, verifier: UpdateVerifier) -> DecodedUpdate:
    """Function form of ``UpdateVerifier.verify`` (architecture.md's ``verify``)."""
    return verifier.verify(envelope_bytes)
