"""A catalogue of bad inputs, faults and attacks, each with the clean outcome it must get.

Why: issue 14 measured how many hostile inputs Tandem handles cleanly (a clear error, a
4xx, or a dead letter/rejection with a reason). Each case here feeds one such input to
the real entry point and returns a short description of the clean outcome; a crash, a
silent pass or a silent loss raises ``Dirty``. bench/bench_robust_aggregation.py prints
the fraction; tests/test_adversarial.py runs every case.

Scope: the parts of the system in the hardening issue's streams/, aggregation, gate, key
and candidate-API layers. CLI flag checks and loaders are wired elsewhere (see
docs/services.md).
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path
from typing import Callable

import lz4.frame
import numpy as np

Case = Callable[[], str]
_MASTER = "adversarial-catalogue-master-key-0123456789"
_D = 32  # the fleet's embedding width


class Dirty(AssertionError):
    """The input was not handled cleanly."""


# -- helpers ---------------------------------------------------------------------
def _gate():  # type: ignore[no-untyped-def]
    from tandem.services.devices import UpdateGate

    return UpdateGate(_MASTER, dev_mode=False, previous_keys="")


def _feature_payload(vec: np.ndarray | None = None, scale: float | None = None, q: np.ndarray | None = None) -> bytes:
    from device_rerank.encoders import FeatureEncoder

    if scale is None:
        return FeatureEncoder.encode(vec)  # type: ignore[arg-type]
    return np.float32(scale).tobytes() + np.asarray(q, dtype=np.int8).tobytes()


def _param_payload(n_params: int, dim: int, idx: np.ndarray, q: np.ndarray, scale: float) -> bytes:
    from device_rerank.encoders import _param_enc, _ParamWire

    itype = np.uint16 if n_params <= 65536 else np.dtype("<i4")
    return _param_enc.encode(
        _ParamWire(n_params, dim, np.asarray(idx, dtype=itype).tobytes(), np.asarray(q, dtype=np.int8).tobytes(), float(scale),
                   b"", b"", b"")  # fmt: skip
    )


def _signed(gate, family: str, payload: bytes, num_examples: int = 3, device: int = 7, seq: int = 1, key: str = _MASTER) -> bytes:  # type: ignore[no-untyped-def]
    from tandem.services.devices import sign_update

    return sign_update(key, dev_mode=False, device_id=device, model_version=gate.verifier.current_model_version, seq=seq,
                       family=family, created_ms=1, num_examples=num_examples, payload=payload)  # fmt: skip


def _rejected(raw: bytes, reason: str, gate=None) -> str:  # type: ignore[no-untyped-def]
    from tandem.services.cloud_service import Rejected

    gate = gate or _gate()
    try:
        gate.verify(raw)
    except Rejected as exc:
        got = str(exc).split(":")[0]
        if got != reason:
            raise Dirty(f"rejected as {got!r}, expected {reason!r}") from None
        if gate.rejected.get(reason, 0) != 1:
            raise Dirty(f"rejection not counted under {reason!r}: {gate.rejected}")
        return f"rejected: {exc}"
    raise Dirty("accepted")


def _schema_error(fn: Callable[[], object], contains: str = "") -> str:
    from streams.schema import SchemaError

    try:
        fn()
    except SchemaError as exc:
        if contains and contains not in exc.reason:
            raise Dirty(f"SchemaError without {contains!r}: {exc.reason}") from None
        return f"SchemaError: {exc.reason}"
    raise Dirty("accepted")


def _row_rejected(reason_part: str, **overrides: object) -> str:
    from streams.batch import EventBatch
    from streams.schema import EventKind

    cols: dict[str, object] = dict(event_id=[1], ts_ms=[1_600_000_000_000], user_id=[3], item_id=[4], value=[0.0],
                                   kind=[int(EventKind.CLICK)])  # fmt: skip
    cols.update(overrides)
    try:
        batch = EventBatch.from_columns(**cols)  # type: ignore[arg-type]
    except Exception as exc:
        from streams.schema import SchemaError

        if isinstance(exc, SchemaError):
            return f"SchemaError: {exc.reason}"
        raise
    good, bad = batch.validate()
    if len(good) or not bad:
        raise Dirty(f"row passed validation: {overrides}")
    if reason_part not in bad[0][1]:
        raise Dirty(f"reason {bad[0][1]!r} lacks {reason_part!r}")
    return f"dead letter: {bad[0][1]}"


# -- keys -----------------------------------------------------------------------------
def keys_missing() -> str:
    from tandem.services.devices import KeyConfigError, UpdateGate

    try:
        UpdateGate("", dev_mode=False)
    except KeyConfigError as exc:
        if "TANDEM_DEVICE_KEY" not in str(exc) or "\n" in str(exc):
            raise Dirty(f"unclear error: {exc}") from None
        return f"refused: {exc}"
    raise Dirty("started without a key")


def keys_published_default() -> str:
    from tandem.services.devices import KeyConfigError, master_key

    try:
        master_key("tandem-dev-master-key", dev_mode=False)
    except KeyConfigError as exc:
        return f"refused: {exc}"
    raise Dirty("accepted the published key")


def keys_short() -> str:
    from tandem.services.devices import KeyConfigError, master_key

    try:
        master_key("short", dev_mode=False)
    except KeyConfigError as exc:
        return f"refused: {exc}"
    raise Dirty("accepted a 5-byte key")


def keys_forged_other_device() -> str:
    from device_rerank.envelope import Keyring, sign
    from tandem.services.devices import master_key

    g = _gate()
    ring = Keyring(master_key(_MASTER, dev_mode=False))
    env = sign(ring.key_for(8), device_id=7, model_version=0, seq=1, family="feature", created_ms=1, num_examples=1,
               payload=_feature_payload(np.full(_D, 0.1, np.float32)))  # fmt: skip
    return _rejected(env.encode(), "bad_signature", g)


def keys_other_master() -> str:
    g = _gate()
    raw = _signed(g, "feature", _feature_payload(np.full(_D, 0.1, np.float32)), key="some-other-master-key-000000000")
    return _rejected(raw, "bad_signature", g)


def keys_retired_master_after_rotation() -> str:
    from tandem.services.devices import UpdateGate

    old = "old-master-key-rotated-away-000000"
    g = UpdateGate(_MASTER, dev_mode=False, previous_keys="")
    raw = _signed(g, "feature", _feature_payload(np.full(_D, 0.1, np.float32)), key=old)
    return _rejected(raw, "bad_signature", g)


# -- the update gate ---------------------------------------------------------------------
def gate_feature_scale_3e38() -> str:
    return _rejected(_signed(g := _gate(), "feature", _feature_payload(scale=3e38, q=np.full(_D, 127))), "non_finite", g)


def gate_feature_width_7() -> str:
    return _rejected(_signed(g := _gate(), "feature", _feature_payload(np.full(7, 0.1, np.float32))), "wrong_shape", g)


def gate_feature_width_124() -> str:
    return _rejected(_signed(g := _gate(), "feature", _feature_payload(np.full(124, 0.05, np.float32))), "wrong_shape", g)


def gate_feature_all_zero() -> str:
    return _rejected(_signed(g := _gate(), "feature", _feature_payload(scale=1.0, q=np.zeros(_D))), "zero_direction", g)


def gate_feature_huge_norm() -> str:
    return _rejected(_signed(g := _gate(), "feature", _feature_payload(np.full(_D, 1e3, np.float32))), "norm_exceeded", g)


def gate_param_inf() -> str:
    g = _gate()
    n = g.verifier.n_params
    raw = _signed(g, "parameter", _param_payload(n, _D, np.arange(4), np.full(4, 127), 3e38))
    return _rejected(raw, "non_finite", g)


def gate_param_norm_2e30() -> str:
    g = _gate()
    n = g.verifier.n_params
    raw = _signed(g, "parameter", _param_payload(n, _D, np.arange(4), np.full(4, 127), 1e28))
    return _rejected(raw, "norm_exceeded", g)


def gate_param_wrong_n_params() -> str:
    g = _gate()
    n = g.verifier.n_params
    raw = _signed(g, "parameter", _param_payload(n + 1, _D, np.arange(4), np.full(4, 1), 1e-3))
    return _rejected(raw, "wrong_shape", g)


def gate_param_wrong_dim() -> str:
    g = _gate()
    n = g.verifier.n_params
    raw = _signed(g, "parameter", _param_payload(n, _D + 1, np.arange(4), np.full(4, 1), 1e-3))
    return _rejected(raw, "wrong_shape", g)


def gate_num_examples_100k() -> str:
    g = _gate()
    raw = _signed(g, "feature", _feature_payload(np.full(_D, 0.1, np.float32)), num_examples=100_000)
    return _rejected(raw, "too_many_examples", g)


def gate_oversized() -> str:
    return _rejected(b"\x93" + b"x" * (70 * 1024), "oversized")


def gate_garbage() -> str:
    return _rejected(b"\x00\x01garbage", "malformed")


def gate_replayed_seq() -> str:
    g = _gate()
    ok = _signed(g, "feature", _feature_payload(np.full(_D, 0.1, np.float32)), seq=5)
    g.verify(ok)
    again = _signed(g, "feature", _feature_payload(np.full(_D, 0.2, np.float32)), seq=5)
    return _rejected(again, "replayed", g)


# -- wire records and events ------------------------------------------------------------
def wire_bomb_declared_size() -> str:
    from streams.batch import _HEADER, FLAG_LZ4, MAGIC, VERSION, decode_record

    body = lz4.frame.compress(b"\x00" * (32 << 20), store_size=True)
    return _schema_error(lambda: decode_record(_HEADER.pack(MAGIC, VERSION, FLAG_LZ4, 1) + body), "declares")


def wire_bomb_no_declared_size() -> str:
    from streams.batch import _HEADER, FLAG_LZ4, MAGIC, VERSION, decode_record

    body = lz4.frame.compress(b"\x00" * (32 << 20), store_size=False)
    return _schema_error(lambda: decode_record(_HEADER.pack(MAGIC, VERSION, FLAG_LZ4, 1) + body), "inflates")


def wire_truncated() -> str:
    from streams.batch import EventBatch, decode_record, encode_batch

    raw = encode_batch(EventBatch.from_columns(event_id=[1], ts_ms=[1], user_id=[1], item_id=[1], value=[0.0], kind=[1]))
    return _schema_error(lambda: decode_record(raw[:-3]))


def wire_unknown_flags() -> str:
    from streams.batch import _HEADER, MAGIC, VERSION, decode_record

    return _schema_error(lambda: decode_record(_HEADER.pack(MAGIC, VERSION, 0x80, 0)), "flags")


def event_ts_1e17_seconds() -> str:
    return _row_rejected("timestamp", ts_ms=[10**17])  # 1e17 s as ms (the loader multiplied 1e14 ms by 1000)


def event_ts_int64_max() -> str:
    return _row_rejected("timestamp", ts_ms=[np.iinfo(np.int64).max])


def event_ts_negative() -> str:
    return _row_rejected("negative timestamp", ts_ms=[-1000])


def event_id_1e20() -> str:
    return _row_rejected("item_id", item_id=np.array([1e20]))


def event_user_2_63() -> str:
    return _row_rejected("user_id", user_id=np.array([2**63], dtype=np.uint64))


def event_rating_inf() -> str:
    from streams.schema import EventKind

    return _row_rejected("non-finite", value=[np.inf], kind=[int(EventKind.RATE)])


def event_rating_1e30() -> str:
    from streams.schema import EventKind

    return _row_rejected("out of range", value=[1e30], kind=[int(EventKind.RATE)])


def event_rating_11() -> str:
    from streams.schema import EventKind

    return _row_rejected("rating", value=[11.0], kind=[int(EventKind.RATE)])


def event_json_ts_huge() -> str:
    from streams.schema import decode_event

    return _schema_error(lambda: decode_event(b'{"type":"click","event_id":1,"ts_ms":100000000000000000,"user_id":1,"item_id":2}'))


def ts_unit_ambiguous() -> str:
    from streams.schema import detect_ts_unit

    if detect_ts_unit([1_600_000_000]) != "s" or detect_ts_unit([1_600_000_000_000]) != "ms":
        raise Dirty("seconds/milliseconds not told apart")
    return _schema_error(lambda: detect_ts_unit([1e25]), "ts-unit")


# -- no silent loss ------------------------------------------------------------------------
def cross_source_same_local_ids() -> str:
    from streams.replay import namespaced_ids

    a = namespaced_ids("synthetic", np.arange(1000))
    b = namespaced_ids("movielens", np.arange(1000))
    if np.intersect1d(a, b).size:
        raise Dirty("ids of two sources collide")
    return "unique ids across sources"


def id_collision_other_content() -> str:
    from streams.batch import EventBatch, encode_batch
    from streams.delivery import DeadLetter, process_stream
    from streams.embedded_log import EmbeddedLog

    with tempfile.TemporaryDirectory() as d:
        t = EmbeddedLog(d)
        t.create_topic("x", 1)
        a = EventBatch.from_columns(event_id=[5, 6], ts_ms=[1, 2], user_id=[1, 1], item_id=[1, 2], value=[0, 0], kind=[1, 1])
        b = EventBatch.from_columns(event_id=[5, 7], ts_ms=[3, 4], user_id=[2, 2], item_id=[9, 9], value=[0, 0], kind=[1, 1])
        for batch in (a, a, b):  # a redelivered, then b reusing id 5 with other content
            t.produce("x", encode_batch(batch), partition=0)
        got: list[int] = []
        stats = process_stream(t.consumer("x", "g"), lambda bt: got.extend(bt.event_id.tolist()), DeadLetter(t),
                               max_records=3, poll_timeout_s=0.05)  # fmt: skip
        t.close()
    if sorted(got) != [5, 6, 7] or stats.duplicates != 2 or stats.collisions != 1:
        raise Dirty(f"got {got}, {stats}")
    return "redelivery dropped as duplicate, collision dead-lettered"


def log_flipped_length_byte() -> str:
    from streams.embedded_log import EmbeddedLog, salvage_partition
    from streams.transport import TransportError

    with tempfile.TemporaryDirectory() as d:
        t = EmbeddedLog(d)
        t.create_topic("x", 1)
        for i in range(20):
            t.produce("x", b"v%03d" % i, partition=0)
        t.close()
        p = Path(d) / "x" / "0.log"
        data = bytearray(p.read_bytes())
        pos = 0
        for _ in range(10):
            pos += 8 + struct.unpack_from("<I", data, pos)[0]
        data[pos + 3] ^= 0xFF
        p.write_bytes(bytes(data))
        try:
            EmbeddedLog(d).consumer("x", "g")
        except TransportError as exc:
            if "salvage" not in str(exc):
                raise Dirty(f"error names no salvage: {exc}") from None
        else:
            raise Dirty("opened a corrupt log (and would truncate acknowledged data)")
        if p.stat().st_size != len(data):
            raise Dirty("the log was truncated")
        rep = salvage_partition(p, replace=True)
        if rep.records != 19:
            raise Dirty(f"salvage kept {rep.records} of 19")
        c = EmbeddedLog(d).consumer("x", "g")
        n = len(c.poll(100, 0.05))
        if n != 19:
            raise Dirty(f"read {n} records after salvage")
    return "refused with the salvage command; salvage kept 19 of 20"


def log_zero_crc_mid_file() -> str:
    from streams.embedded_log import EmbeddedLog
    from streams.transport import TransportError

    with tempfile.TemporaryDirectory() as d:
        t = EmbeddedLog(d)
        t.create_topic("x", 1)
        for i in range(5):
            t.produce("x", b"value-%d" % i, partition=0)
        t.close()
        p = Path(d) / "x" / "0.log"
        data = bytearray(p.read_bytes())
        data[4:8] = b"\x00\x00\x00\x00"  # first frame's crc
        p.write_bytes(bytes(data))
        try:
            EmbeddedLog(d).consumer("x", "g")
        except TransportError as exc:
            return f"refused: {str(exc)[:60]}..."
    raise Dirty("opened")


# -- the candidate API ------------------------------------------------------------------------
_CLIENT: list = []


def _client():  # type: ignore[no-untyped-def]
    """The candidate HTTP API the services run (the recommender engine's app, tiny, untrained)."""
    if not _CLIENT:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from fastapi.testclient import TestClient

        from tandem.services.recommender_engine import RecommenderEngine
        from tandem.services.settings import CloudSettings

        s = CloudSettings(num_users=64, num_items=64, embedding_dim=8, k=5, device_key="x" * 32)
        _CLIENT.append(TestClient(RecommenderEngine(s, item_categories={}).http_app(), raise_server_exceptions=False))
    return _CLIENT[0]


def _status(resp, want: int) -> str:  # type: ignore[no-untyped-def]
    if resp.status_code != want:
        raise Dirty(f"status {resp.status_code}, expected {want}: {resp.text[:100]}")
    return f"{want}: {resp.json().get('detail')}"[:100]


def http_user_id_2_63() -> str:
    return _status(_client().get("/candidates", params={"user_id": str(2**63)}), 400)


def http_batch_user_id_2_63() -> str:
    return _status(_client().post("/candidates:batch", json={"user_ids": [2**63]}), 400)


def http_k_negative() -> str:
    return _status(_client().get("/candidates", params={"user_id": 1, "k": -3}), 400)


def http_body_10mb() -> str:
    body = b'{"user_ids": [' + b"1," * (5 << 20) + b"1]}"
    return _status(_client().post("/candidates:batch", content=body, headers={"content-type": "application/json"}), 413)


def http_session_item_2_63() -> str:
    return _status(_client().post("/candidates:batch", json={"requests": [{"user_id": 1, "session": {"item_ids": [2**63]}}]}), 400)


def http_session_ts_2_63() -> str:
    body = {"requests": [{"user_id": 1, "session": {"item_ids": [1], "ts_ms": [2**63]}}]}
    return _status(_client().post("/candidates:batch", json=body), 400)


def http_exclude_item_2_63() -> str:
    return _status(_client().post("/candidates:batch", json={"requests": [{"user_id": 1, "exclude": [2**63]}]}), 400)


def http_get_items_2_63() -> str:
    return _status(_client().get("/candidates", params={"user_id": 1, "items": str(2**63)}), 400)


# -- aggregation -------------------------------------------------------------------------------
def aggregate_non_finite_refused() -> str:
    from tandem.strategies.aggregate import combine

    x = np.ones((4, 3))
    x[0, 0] = np.inf
    try:
        combine(x, np.ones(4), "clipped_multi_krum")
    except ValueError as exc:
        return f"ValueError: {exc}"
    raise Dirty("aggregated inf")


def aggregate_unknown_rule() -> str:
    from tandem.strategies.aggregate import Aggregator, AggregatorConfig

    try:
        Aggregator(AggregatorConfig(rule="nope"))
    except ValueError as exc:
        return f"ValueError: {exc}"
    raise Dirty("accepted")


CASES: dict[str, Case] = {f.__name__: f for f in [
    keys_missing, keys_published_default, keys_short, keys_forged_other_device, keys_other_master,
    keys_retired_master_after_rotation,
    gate_feature_scale_3e38, gate_feature_width_7, gate_feature_width_124, gate_feature_all_zero, gate_feature_huge_norm,
    gate_param_inf, gate_param_norm_2e30, gate_param_wrong_n_params, gate_param_wrong_dim, gate_num_examples_100k,
    gate_oversized, gate_garbage, gate_replayed_seq,
    wire_bomb_declared_size, wire_bomb_no_declared_size, wire_truncated, wire_unknown_flags,
    event_ts_1e17_seconds, event_ts_int64_max, event_ts_negative, event_id_1e20, event_user_2_63, event_rating_inf,
    event_rating_1e30, event_rating_11, event_json_ts_huge, ts_unit_ambiguous,
    cross_source_same_local_ids, id_collision_other_content, log_flipped_length_byte, log_zero_crc_mid_file,
    http_user_id_2_63, http_batch_user_id_2_63, http_k_negative, http_body_10mb, http_session_item_2_63,
    http_session_ts_2_63, http_exclude_item_2_63, http_get_items_2_63,
    aggregate_non_finite_refused, aggregate_unknown_rule,
]}  # fmt: skip


def run_case(name: str) -> tuple[bool, str]:
    """(clean, what happened) for one case; any exception but a clean one counts as dirty."""
    try:
        return True, CASES[name]()
    except Dirty as exc:
        return False, str(exc)
    except Exception as exc:  # a crash is not a clean outcome
        return False, f"crash: {type(exc).__name__}: {exc}"


def run_catalogue() -> tuple[int, int, list[tuple[str, str]]]:
    """(clean, total, [(name, why) of dirty cases])."""
    dirty = []
    for name in CASES:
        ok, why = run_case(name)
        if not ok:
            dirty.append((name, why))
    return len(CASES) - len(dirty), len(CASES), dirty


if __name__ == "__main__":
    for name in CASES:
        ok, why = run_case(name)
        print(f"{'ok   ' if ok else 'DIRTY'} {name}: {why}")
