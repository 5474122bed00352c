"""Envelope signing and verification: every bad update is rejected with the right reason."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_rerank.config import ParameterEncoderConfig
from device_rerank.encoders import FeatureEncoder, ParameterEncoder
from device_rerank.envelope import REASONS, Envelope, Keyring, UpdateRejected, UpdateVerifier, sign, verify

KEYRING = Keyring(b"master-secret-for-tests-000000")
N_PARAMS, DIM = 300, 8


def feature_env(device_id: int = 5, seq: int = 1, model_version: int = 10, family: str = "feature", key: bytes | None = None) -> Envelope:
    payload = FeatureEncoder.encode(np.linspace(-1, 1, DIM))
    return sign(
        key or KEYRING.key_for(device_id),
        device_id=device_id,
        model_version=model_version,
        seq=seq,
        family=family,
        created_ms=1_000,
        num_examples=3,
        payload=payload,
    )


def verifier(**kw) -> UpdateVerifier:
    args = dict(max_bytes=16 * 1024, max_staleness_versions=2, current_model_version=10, n_params=N_PARAMS, emb_dim=DIM, param_norm_bound=1.0)
    args.update(kw)
    return UpdateVerifier(KEYRING, **args)


def rejected(v: UpdateVerifier, raw: bytes) -> str:
    with pytest.raises(UpdateRejected) as info:
        v.verify(raw)
    assert info.value.reason in REASONS
    return info.value.reason


def test_valid_feature_update_decodes() -> None:
    v = verifier()
    out = verify(feature_env().encode(), v)
    assert (out.device_id, out.seq, out.family, out.model_version, out.num_examples) == (5, 1, "feature", 10, 3)
    np.testing.assert_allclose(out.user_vector, np.linspace(-1, 1, DIM), atol=1 / 254 + 1e-6)
    assert out.params is None and out.examples is None


def test_forged_with_another_key() -> None:
    forged = feature_env(key=KEYRING.key_for(6))  # device 6's key, claims device 5
    assert rejected(verifier(), forged.encode()) == "bad_signature"
    other_master = Keyring(b"another-master-secret-99999999")
    assert rejected(verifier(), feature_env(key=other_master.key_for(5)).encode()) == "bad_signature"


def test_tampered_fields_and_payload() -> None:
    env = feature_env()
    for change in (dict(num_examples=1000), dict(seq=99), dict(payload=env.payload[:-1] + bytes([env.payload[-1] ^ 1])), dict(device_id=6)):
        fields = {f: getattr(env, f) for f in env.__struct_fields__}
        fields.update(change)
        assert rejected(verifier(), Envelope(**fields).encode()) == "bad_signature"
    raw = bytearray(env.encode())
    raw[-40] ^= 0x01  # a flipped bit inside the payload or signature
    assert rejected(verifier(), bytes(raw)) in {"bad_signature", "malformed"}


def test_replayed() -> None:
    v = verifier()
    raw = feature_env(seq=3).encode()
    v.verify(raw)
    assert rejected(v, raw) == "replayed"
    assert rejected(v, feature_env(seq=2).encode()) == "replayed"
    v.verify(feature_env(seq=4).encode())
    v.verify(feature_env(device_id=9, seq=1).encode())  # seqs are per device


def test_rejected_update_does_not_advance_seq() -> None:
    v = verifier()
    bad = feature_env(seq=50, model_version=1)  # stale, well signed
    assert rejected(v, bad.encode()) == "stale"
    v.verify(feature_env(seq=2).encode())


def test_stale_and_future_versions() -> None:
    v = verifier()
    assert rejected(v, feature_env(model_version=7).encode()) == "stale"
    assert rejected(v, feature_env(model_version=11).encode()) == "stale"
    v.verify(feature_env(model_version=8).encode())


def test_oversized_checked_before_decoding() -> None:
    v = verifier(max_bytes=100)
    assert rejected(v, b"\xff" * 101) == "oversized"  # garbage, but refused on size alone
    big = sign(KEYRING.key_for(5), device_id=5, model_version=10, seq=1, family="data", created_ms=0, num_examples=1, payload=b"x" * 200)
    assert rejected(v, big.encode()) == "oversized"


def test_unknown_family() -> None:
    assert rejected(verifier(), feature_env(family="gossip").encode()) == "unknown_family"


def test_malformed() -> None:
    v = verifier()
    for raw in (b"", b"\x00", b"not msgpack at all", Envelope(1, 5, 10, 1, "feature", 0, 1, b"", b"").encode()[:-3]):
        assert rejected(v, raw) == "malformed"
    # well signed, but the payload is not a feature vector
    bad = sign(KEYRING.key_for(5), device_id=5, model_version=10, seq=1, family="feature", created_ms=0, num_examples=1, payload=b"\x00")
    assert rejected(v, bad.encode()) == "malformed"
    # negative ids are out of schema
    assert rejected(v, Envelope(1, 5, 10, 1, "feature", 0, 1, b"").encode().replace(b"\x05", b"\xff", 1)) in {"malformed", "bad_signature"}


def test_unsupported_version() -> None:
    env = feature_env()
    env.version = 2
    assert rejected(verifier(), env.encode()) == "unsupported_version"


def test_parameter_norm_bound() -> None:
    rng = np.random.default_rng(0)
    good = ParameterEncoder(ParameterEncoderConfig(clip_norm=1.0, top_k=50, max_rows=2), N_PARAMS, DIM)
    payload, _ = good.encode(rng.normal(size=N_PARAMS).astype(np.float32) * 5, {1: np.ones(DIM, np.float32)}, rng)
    v = verifier(param_norm_bound=good.send_bound())
    env = sign(KEYRING.key_for(5), device_id=5, model_version=10, seq=1, family="parameter", created_ms=0, num_examples=4, payload=payload)
    out = v.verify(env.encode())
    assert out.params is not None and out.params.norm() <= good.send_bound() + 1e-6
    # a (well-signed) device that skips clipping is refused
    loose = ParameterEncoder(ParameterEncoderConfig(clip_norm=1e6, top_k=50, max_rows=2), N_PARAMS, DIM)
    payload, _ = loose.encode(rng.normal(size=N_PARAMS).astype(np.float32) * 5, {}, rng)
    env = sign(KEYRING.key_for(5), device_id=5, model_version=10, seq=2, family="parameter", created_ms=0, num_examples=4, payload=payload)
    assert rejected(v, env.encode()) == "norm_exceeded"
    assert v.rejected["norm_exceeded"] == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_never_crashes(raw: bytes) -> None:
    try:
        verifier().verify(raw)
    except UpdateRejected as exc:
        assert exc.reason in REASONS


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**6), st.integers(0, 255))
def test_bit_flips_never_accepted(pos: int, mask: int) -> None:
    raw = bytearray(feature_env().encode())
    i = pos % len(raw)
    if mask == 0:
        mask = 1
    raw[i] ^= mask
    try:
        out = verifier().verify(bytes(raw))
    except UpdateRejected:
        return
    # msgpack can re-encode the same values differently only in ways that keep the signed content
    assert out.device_id == 5 and out.seq == 1


def test_inflated_weight_is_rejected() -> None:
    env = sign(KEYRING.key_for(5), device_id=5, model_version=10, seq=1, family="feature", created_ms=0, num_examples=10**9,
               payload=FeatureEncoder.encode(np.ones(DIM)))
    assert rejected(verifier(), env.encode()) == "too_many_examples"
