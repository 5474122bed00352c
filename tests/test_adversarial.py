"""Adversarial cases of the hardening issue (#14), one named test per bullet, each asserting
the clean outcome: a clear error, a 4xx, or a rejection/dead letter with its reason.

The catalogue in bench/adversarial_catalogue.py is also run case by case here, so the
fraction the bench prints (must be 100%) is a test result, not a claim.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

from tandem.strategies.aggregate import DEFAULT_RULE, Aggregator, AggregatorConfig, clip_by_norm, combine, coordinate_median, fedavg, krum, trimmed_mean
from device_rerank.encoders import FeatureEncoder
from device_rerank.envelope import Keyring, UpdateVerifier, hkdf_sha256, make_verifier, sign
from streams.batch import EventBatch
from streams.delivery import SeenIds
from streams.replay import replay, source_tag
from streams.schema import MAX_TS_MS, detect_ts_unit, to_ms, SchemaError
from tandem.services.devices import KeyConfigError, UpdateGate, master_key
from tandem.services.settings import CloudSettings, DashboardSettings, FleetSettings, ReplayerSettings, as_dict

_BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, _BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


catalogue = _load("adversarial_catalogue")
bench = _load("bench_robust_aggregation")
D = 32


# -- 1. keys ----------------------------------------------------------------------------
def test_keys_no_key_in_code_service_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TANDEM_DEV_MODE", raising=False)
    assert CloudSettings().device_key == "" and FleetSettings().device_key == ""
    with pytest.raises(KeyConfigError, match="TANDEM_DEVICE_KEY is not set"):
        UpdateGate(CloudSettings().device_key)
    with pytest.raises(KeyConfigError, match="published default"):
        master_key("tandem-dev-master-key")


def test_keys_dev_mode_is_explicit_and_announced(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("TANDEM_DEV_MODE", "1")
    with caplog.at_level(logging.WARNING):
        key = master_key("")
    assert len(key) == 32 and any("DEV MODE" in m for m in caplog.messages)


def test_keys_hkdf_matches_rfc5869_test_case_1() -> None:
    okm = hkdf_sha256(bytes([0x0B] * 22), bytes(range(13)), bytes(range(0xF0, 0xFA)), 42)
    assert okm.hex() == "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"


def test_keys_per_device_keys_differ_and_do_not_sign_for_another_device() -> None:
    ring = Keyring(b"m" * 32)
    assert len({ring.key_for(d) for d in range(100)}) == 100
    assert catalogue.run_case("keys_forged_other_device")[0]


def test_keys_rotation_accepts_two_masters_during_the_switch() -> None:
    old, new = "old-master-secret-000000000000", "new-master-secret-111111111111"
    vec = FeatureEncoder.encode(np.full(D, 0.1, np.float32))
    during = UpdateGate(new, previous_keys=old, dev_mode=False)
    from tandem.services.devices import sign_update

    def env(key: str, device: int) -> bytes:
        return sign_update(key, dev_mode=False, device_id=device, model_version=0, seq=1, family="feature", created_ms=1,
                           num_examples=2, payload=vec)  # fmt: skip

    during.verify(env(old, 1))  # a device not yet moved
    during.verify(env(new, 2))
    assert during.verifier.accepted_previous_key == 1
    after = UpdateGate(new, previous_keys="", dev_mode=False)
    assert catalogue._rejected(env(old, 3), "bad_signature", after)


def test_keys_services_bind_localhost_and_mask_secrets() -> None:
    for cls in (CloudSettings, FleetSettings, ReplayerSettings, DashboardSettings):
        assert cls().host == "127.0.0.1"
    shown = as_dict(CloudSettings(device_key="secret-secret-secret", device_key_previous="older-older-older"))
    assert shown["device_key"] == "***" and shown["device_key_previous"] == "***"


# -- 2. the gate enforces the contract ----------------------------------------------------------
@pytest.mark.parametrize("case", [
    "gate_feature_scale_3e38", "gate_feature_width_7", "gate_feature_width_124", "gate_feature_all_zero",
    "gate_feature_huge_norm", "gate_param_inf", "gate_param_norm_2e30", "gate_param_wrong_n_params",
    "gate_param_wrong_dim", "gate_num_examples_100k",
])  # fmt: skip
def test_gate_rejects_contract_violations_with_a_counted_reason(case: str) -> None:
    ok, what = catalogue.run_case(case)
    assert ok, what
    assert what.startswith("rejected: ")


def test_gate_accepts_honest_updates() -> None:
    from device_rerank.config import DeviceConfig
    from device_rerank.encoders import ParameterEncoder

    g = UpdateGate("honest-master-key-0123456789", dev_mode=False, previous_keys="")
    n = g.verifier.n_params
    rng = np.random.default_rng(0)
    vec = rng.normal(size=(20, D))
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    interest = vec.mean(axis=0).astype(np.float32)  # a mean of normalized item embeddings
    enc = ParameterEncoder(DeviceConfig().parameter, n, D)
    payload, _ = enc.encode(rng.normal(size=n).astype(np.float32) * 5, {3: rng.normal(size=D).astype(np.float32)}, rng)
    from tandem.services.devices import sign_update

    for seq, (family, p, ne) in enumerate([("feature", FeatureEncoder.encode(interest), 50), ("parameter", payload, 64)], 1):
        out = g.verifier.verify(sign_update("honest-master-key-0123456789", dev_mode=False, device_id=1, model_version=0,
                                            seq=seq, family=family, created_ms=1, num_examples=ne, payload=p))  # fmt: skip
        assert out.family == family
    assert sum(g.rejected.values()) == 0


def test_make_verifier_is_the_one_contract() -> None:
    v = make_verifier(Keyring(b"k" * 32), n_params=100, emb_dim=16, max_staleness_versions=1)
    assert isinstance(v, UpdateVerifier)
    assert (v.n_params, v.emb_dim, v.max_staleness_versions) == (100, 16, 1)
    assert v.param_norm_bound is not None and v.feature_norm_bound is not None and v.max_num_examples <= 1000


# -- 3. robust aggregation on sparse updates --------------------------------------------------------
def test_sparse_robust_rules_match_fedavg_without_poison() -> None:
    """On main, with 50 of 500 coordinates sent and no poison, the median returned zeros."""
    rng = np.random.default_rng(1)
    x, mask, w = bench.honest_round(rng, 100, 500, 50)
    ref = fedavg(x, w)
    for agg in (coordinate_median(x, mask), trimmed_mean(x, 0.1, mask), combine(x, w, DEFAULT_RULE, mask=mask)):
        assert np.linalg.norm(agg - ref) / np.linalg.norm(ref) < 0.2
    # random supports (each device sends 50 of 500 coordinates): the unsent zeros outvote the senders
    g = rng.normal(size=500)
    mask = np.zeros((100, 500), dtype=bool)
    for i in range(100):
        mask[i, rng.choice(500, 50, replace=False)] = True
    x = np.where(mask, g + rng.normal(scale=0.3, size=(100, 500)), 0.0)
    ref = fedavg(x)
    assert not np.any(coordinate_median(x)), "counting unsent coordinates as 0 returns zeros"
    assert np.linalg.norm(trimmed_mean(x, 0.1) - ref) / np.linalg.norm(ref) > 0.5, "and loses most of the trimmed mean"
    for agg in (coordinate_median(x, mask), trimmed_mean(x, 0.1, mask)):
        assert np.linalg.norm(agg - ref) / np.linalg.norm(ref) < 0.2


@pytest.mark.parametrize("attack", ["huge-norm", "sign-flip", "constant"])
def test_default_rule_within_half_of_honest_at_10_percent(attack: str) -> None:
    assert bench.deviation(DEFAULT_RULE, attack, 0.1, 100, 500, 50, seeds=3) <= 0.5
    assert bench.deviation("fedavg", attack, 0.1, 100, 500, 50, seeds=3) > 1.0, "the attack must hurt FedAvg"


@pytest.mark.parametrize("attack", ["huge-norm", "sign-flip", "constant"])
def test_default_rule_within_half_of_honest_at_30_percent(attack: str) -> None:
    assert bench.deviation(DEFAULT_RULE, attack, 0.3, 100, 500, 50, seeds=3) <= 0.5


def test_krum_picks_an_honest_update_and_clipping_bounds_norms() -> None:
    rng = np.random.default_rng(2)
    honest = rng.normal(size=(8, 10)) * 0.1 + 1.0
    bad = np.full((2, 10), 1e6)
    x = np.vstack([bad, honest])
    assert np.abs(krum(x, 2) - 1.0).max() < 0.5
    assert np.all(np.linalg.norm(clip_by_norm(x, 3.0), axis=1) <= 3.0 + 1e-9)
    assert AggregatorConfig().rule == DEFAULT_RULE


# -- 4. no silent loss -----------------------------------------------------------------------------
def test_event_ids_unique_across_sources_replayed_into_one_topic(tmp_path: Path) -> None:
    """On main, the synthetic world then MovieLens in one topic dropped 23,346 acknowledged ratings."""
    from streams.datasets.base import EventLog, finalize_events
    from streams.delivery import DeadLetter, process_stream
    from streams.embedded_log import EmbeddedLog
    import pandas as pd

    def log(name: str, seed: int) -> EventLog:
        r = np.random.default_rng(seed)
        ev = pd.DataFrame({"ts_ms": np.sort(r.integers(0, 10**6, 300)), "user_id": r.integers(0, 20, 300),
                           "item_id": r.integers(0, 50, 300), "value": 4.0, "kind": 9})  # fmt: skip
        return EventLog(name=name, events=finalize_events(ev))

    a, b = log("synthetic", 0), log("movielens", 1)
    assert set(a.events.event_id) & set(b.events.event_id), "the loaders' ids overlap"
    t = EmbeddedLog(tmp_path)
    for lg in (a, b):
        replay(lg, t, availability_topic=None, progress=False, partitions=2)
    got: list[int] = []
    c = t.consumer("interactions", "cloud")
    stats = process_stream(c, lambda bt: got.extend(bt.event_id.tolist()), DeadLetter(t), idle_timeout_s=0.2, poll_timeout_s=0.05)
    t.close()
    assert len(got) == len(set(got)) == 600 and stats.duplicates == 0 and stats.collisions == 0
    assert source_tag("synthetic") != source_tag("movielens")


def test_id_collision_with_other_content_goes_to_the_dead_letters() -> None:
    ok, what = catalogue.run_case("id_collision_other_content")
    assert ok, what


def test_embedded_log_never_truncates_past_a_valid_frame_and_salvages() -> None:
    ok, what = catalogue.run_case("log_flipped_length_byte")
    assert ok, what


# -- 5. bounds everywhere ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", [
    "event_ts_1e17_seconds", "event_ts_int64_max", "event_id_1e20", "event_user_2_63", "event_rating_inf",
    "event_rating_1e30", "event_rating_11", "event_json_ts_huge",
])  # fmt: skip
def test_events_out_of_bounds_are_refused_with_a_reason(case: str) -> None:
    ok, what = catalogue.run_case(case)
    assert ok, what


def test_timestamp_unit_is_detected_or_demanded() -> None:
    assert [detect_ts_unit([1.6e9]), detect_ts_unit([1.6e12]), detect_ts_unit([1.6e15]), detect_ts_unit([1.6e18])] == ["s", "ms", "us", "ns"]
    assert to_ms(np.array([1_600_000_000]), "s").tolist() == [1_600_000_000_000]
    with pytest.raises(SchemaError):
        to_ms(np.array([1.6e12]), "s")  # milliseconds declared as seconds: the year 52,000
    assert MAX_TS_MS == 10**13


@pytest.mark.parametrize("case", ["wire_bomb_declared_size", "wire_bomb_no_declared_size", "wire_truncated", "wire_unknown_flags"])
def test_wire_records_check_their_size_before_decompressing(case: str) -> None:
    ok, what = catalogue.run_case(case)
    assert ok, what


@pytest.mark.parametrize("case", ["http_user_id_2_63", "http_batch_user_id_2_63", "http_k_negative", "http_body_10mb", "http_session_item_2_63",
                                  "http_session_ts_2_63", "http_exclude_item_2_63", "http_get_items_2_63"])
def test_http_bounds(case: str) -> None:
    ok, what = catalogue.run_case(case)
    assert ok, what


_BAD_GETS = [{"k": -3}, {"k": 0}, {"k": 10**9}, {"user_id": 2**64}, {"user_id": -1}, {"at_ms": -5}, {"k": "ten"}]
_BAD_POSTS = [{"user_ids": [1], "k": -3}, {"user_ids": [1], "k": 0}, {"user_ids": [1], "k": 10**9}, {"user_ids": [2**64]},
              {"user_ids": [-1]}, {"requests": [{"user_id": 1, "at_ms": -1}]}, {"user_ids": list(range(1001))}, {"k": 5}]  # fmt: skip


@pytest.fixture(scope="module")
def engine_clients() -> dict[str, object]:
    import warnings

    from tandem.services.engines import PopularityEngine
    from tandem.services.recommender_engine import RecommenderEngine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    s = CloudSettings(num_users=64, num_items=64, embedding_dim=8, k=5, device_key="x" * 32)
    pop = PopularityEngine(s)
    pop.train(EventBatch.from_columns(event_id=np.arange(47), ts_ms=np.arange(47), user_id=np.zeros(47, np.int64),
                                      item_id=np.arange(47), value=np.ones(47), kind=np.full(47, 9)))  # fmt: skip
    return {"popular": TestClient(pop.http_app()), "recommender": TestClient(RecommenderEngine(s, item_categories={}).http_app())}


@pytest.mark.parametrize("engine", ["popular", "recommender"])
def test_both_engines_refuse_the_same_bad_requests_with_one_line(engine_clients, engine: str) -> None:  # type: ignore[no-untyped-def]
    c = engine_clients[engine]
    for params in _BAD_GETS:
        r = c.get("/candidates", params={"user_id": 1, **params})
        assert r.status_code == 400 and isinstance(r.json()["detail"], str) and "\n" not in r.json()["detail"], (params, r.text)
        assert next(iter(params)) in r.json()["detail"], (params, r.text)
    for body in _BAD_POSTS:
        r = c.post("/candidates:batch", json=body)
        assert r.status_code == 400 and isinstance(r.json()["detail"], str), (body, r.text)
    big = b'{"user_ids": [' + b"1," * (40 << 10) + b"1]}"
    assert c.post("/candidates:batch", content=big, headers={"content-type": "application/json"}).status_code == 413
    ok = c.get("/candidates", params={"user_id": 1, "k": 3})
    assert ok.status_code == 200 and len(ok.json()["item_ids"]) == (3 if engine == "popular" else len(ok.json()["item_ids"])) <= 3
    assert c.post("/candidates:batch", json={"user_ids": [1, 2], "k": 2}).status_code == 200


def test_valid_events_still_pass() -> None:
    b = EventBatch.from_columns(event_id=[1, 2], ts_ms=[1_600_000_000_000, 0], user_id=[3, -1], item_id=[4, 5],
                                value=[4.5, 0.0], kind=[9, 7])  # fmt: skip
    good, bad = b.validate()
    assert len(good) == 2 and bad == []


# -- 6. bounded memory ----------------------------------------------------------------------------------
def test_verifier_replay_state_is_pruned_once_staleness_covers_it() -> None:
    ring = Keyring(b"p" * 32)
    v = make_verifier(ring, n_params=10, emb_dim=D, max_staleness_versions=2)
    for d in range(50):
        v.verify(sign(ring.key_for(d), device_id=d, model_version=0, seq=1, family="feature", created_ms=1, num_examples=1,
                      payload=FeatureEncoder.encode(np.full(D, 0.1, np.float32))).encode())  # fmt: skip
    assert len(v.last_seq) == 50
    v.current_model_version = 3
    assert len(v.last_seq) == 50, "still inside the staleness window"
    v.current_model_version = 4
    assert len(v.last_seq) == 0 and len(v.last_version) == 0
    old = sign(ring.key_for(0), device_id=0, model_version=0, seq=1, family="feature", created_ms=1, num_examples=1,
               payload=FeatureEncoder.encode(np.full(D, 0.1, np.float32)))  # fmt: skip
    with pytest.raises(Exception, match="stale"):  # the pruned device cannot replay: its update is stale
        v.verify(old.encode())


def test_gate_tells_redelivery_from_replay_with_bounded_memory() -> None:
    from tandem.services.devices import RECENT_PER_DEVICE, sign_update

    key = "gate-dedup-master-key-000000000"
    g = UpdateGate(key, dev_mode=False, previous_keys="", max_staleness_versions=1)

    def env(device: int, seq: int, x: float = 0.1) -> bytes:
        return sign_update(key, dev_mode=False, device_id=device, model_version=g.verifier.current_model_version, seq=seq,
                           family="feature", created_ms=1, num_examples=1, payload=FeatureEncoder.encode(np.full(D, x, np.float32)))  # fmt: skip

    first = env(1, 1)
    assert not g.is_duplicate(first)
    g.verify(first)
    assert g.is_duplicate(first), "an exact redelivery is a duplicate"
    assert not g.is_duplicate(env(1, 1, 0.2)), "same seq, other content is a replay (verify rejects it)"
    for seq in range(2, 2 + 2 * RECENT_PER_DEVICE):
        g.verify(env(1, seq))
    assert len(g.recent[1]) == RECENT_PER_DEVICE
    restored = UpdateGate(key, dev_mode=False, previous_keys="")
    restored.load_state(g.state())
    assert restored.is_duplicate(env(1, 1 + 2 * RECENT_PER_DEVICE))
    g.set_model_version(3)  # device 1's last update (version 0) is now beyond staleness
    assert g.recent == {} and g.verifier.last_seq == {}


def test_aggregator_dedup_keeps_one_seq_per_device_bounded() -> None:
    from device_rerank.envelope import DecodedUpdate

    agg = Aggregator(AggregatorConfig(max_devices=10))

    class T:
        def set_user_vectors(self, v):  # type: ignore[no-untyped-def]
            pass

    ups = [DecodedUpdate(device_id=d, seq=s, family="feature", model_version=0, num_examples=1, created_ms=s, nbytes=1,
                         user_vector=np.ones(D, np.float32)) for d in range(30) for s in (1, 2)]  # fmt: skip
    s1 = agg.aggregate_round(1, ups, T())  # type: ignore[arg-type]
    assert s1.applied == 60 and len(agg.applied_seq) == 10
    s2 = agg.aggregate_round(2, ups[-4:], T())  # type: ignore[arg-type]
    assert s2.duplicates == 4 and s2.applied == 0


def test_seen_ids_bounded_with_digests() -> None:
    s = SeenIds(capacity=5)
    s.add(np.arange(20), np.arange(20) + 100)
    assert len(s) == 5 and 19 in s and 0 not in s
    back = SeenIds.from_bytes(s.to_bytes())
    assert back.conflict_mask([19], [999]).tolist() == [True] and back.conflict_mask([19], [119]).tolist() == [False]


# -- 7. deterministic CI ----------------------------------------------------------------------------------
def test_hypothesis_profile_is_derandomized_without_a_database() -> None:
    assert settings.default.derandomize is True and settings.default.database is None


# -- the whole catalogue: 100% clean ------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(catalogue.CASES))
def test_catalogue_case_is_handled_cleanly(case: str) -> None:
    ok, what = catalogue.run_case(case)
    assert ok, f"{case}: {what}"


def test_trainer_user_overrides_keep_the_latest_uploads_up_to_the_user_table_size() -> None:
    from cloud_recsys.trainer import OnlineTrainer
    from cloud_recsys.config import TwoTowerConfig

    t = OnlineTrainer(TwoTowerConfig(num_users=16, num_items=16, num_categories=2, embedding_dim=8, out_dim=8))
    for u in range(100):
        t.set_user_vectors({u: np.full(8, 1.0 + u, np.float32)})
    t.set_user_vectors({90: np.ones(8, np.float32)})  # a fresh upload makes 90 the newest
    t.set_user_vectors({200: np.ones(8, np.float32)})
    assert len(t.user_overrides) == 16 and 90 in t.user_overrides and 84 not in t.user_overrides
    assert t.known_users(np.array([99, 200, 0])).tolist() == [True, True, False]
    np.testing.assert_allclose(t.user_overrides[99], np.full(8, 8**-0.5), rtol=1e-6)
    again = OnlineTrainer(t.config)
    again.load_state_dict(t.state_dict())
    assert list(again.user_overrides) == list(t.user_overrides)


def test_popularity_counts_stay_within_four_catalogues_and_keep_the_popular() -> None:
    from tandem.services.engines import PopularityEngine

    pop = PopularityEngine(CloudSettings(num_users=8, num_items=16, k=5, device_key="x" * 32))
    hot = EventBatch.from_columns(event_id=np.arange(50), ts_ms=np.arange(50), user_id=np.zeros(50, np.int64),
                                  item_id=np.full(50, 7), value=np.ones(50), kind=np.full(50, 9))  # fmt: skip
    pop.train(hot)
    for start in range(1000, 3000, 100):  # 2000 one-off items: past 4 * num_items many times
        ids = np.arange(start, start + 100)
        pop.train(EventBatch.from_columns(event_id=ids, ts_ms=ids, user_id=np.zeros(100, np.int64), item_id=ids,
                                          value=np.ones(100), kind=np.full(100, 9)))  # fmt: skip
        assert len(pop.counts) <= 4 * 16
    pop.refresh()
    assert pop.topk(0, 1, 0).tolist() == [7]


# -- loaders: one check for ids, times and values -----------------------------------------------------
_ML = "userId,movieId,rating,timestamp\n1,2,4.0,1600000000\n{row}\n"
_YC = "SessionId\tItemId\tTime\n1\t2\t1600000000.5\n{row}\n"
_TW = "user,streamer,start,stop\n1,2,3,4\n{row}\n"
_GT = "user_id,item_id,timestamp,value\n1,2,1600000000,0.5\n{row}\n"


@pytest.mark.parametrize("fmt,row,column", [
    ("movielens", f"{2**64},2,4.0,1600000000", "userId"), ("movielens", "-1,2,4.0,1600000000", "userId"),
    ("movielens", "1,2.5,4.0,1600000000", "movieId"), ("movielens", "1,2,inf,1600000000", "rating"),
    ("movielens", "1,2,4.0,1e30", "timestamp"), ("movielens", "1,2,4.0,-5", "timestamp"),
    ("yoochoose", f"1\t{2**63}\t1.0", "ItemId"), ("yoochoose", "1\t2\tnan", "Time"), ("yoochoose", "1\t2\t1e17", "Time"),
    ("twitch", f"{2**63},2,3,4", "user"), ("twitch", f"1,2,{2**62},{2**62}", "start"), ("twitch", f"1,{2**64},3,4", "streamer"),
    ("table", f"{2**64},2,1600000000,1", "user_id"), ("table", "1,2,1e30,1", "timestamp"), ("table", "1,2,-1,1", "timestamp"),
    ("table", "1,2,1600000000,inf", "value"), ("table", "1,2,1600000000,1e300", "value"),
])  # fmt: skip
def test_every_loader_refuses_bad_ids_times_and_values_naming_file_and_column(tmp_path: Path, fmt: str, row: str, column: str) -> None:
    from streams.datasets.generic import ColumnMapping, load_table
    from streams.datasets.movielens import load_movielens
    from streams.datasets.twitch import load_twitch
    from streams.datasets.yoochoose import load_yoochoose

    text, name, load = {
        "movielens": (_ML, "ratings.csv", load_movielens),
        "yoochoose": (_YC, "clicks.txt", load_yoochoose),
        "twitch": (_TW, "watch.csv", load_twitch),
        "table": (_GT, "log.csv", lambda p: load_table(p, ColumnMapping(value="value"))),
    }[fmt]
    path = tmp_path / name
    path.write_text(text.format(row=row))
    with pytest.raises(ValueError) as err:
        load(path)
    msg = str(err.value)
    assert "\n" not in msg and name in msg and f"column {column}" in msg, msg
    path.write_text(text.format(row=text.splitlines()[1]))  # the same file with a good row loads
    assert len(load(path)) >= 2


def test_loaders_convert_times_with_the_given_unit() -> None:
    from streams.datasets.checks import check_columns

    out = check_columns("x.csv", {"t": ["1600000000.5", "1600000001"]}, ts="t", unit="s")
    assert out["t"].tolist() == [1_600_000_000_500, 1_600_000_001_000]
    assert check_columns("x.csv", {"t": [1.6e15]}, ts="t")["t"].tolist() == [1_600_000_000_000]  # detected: us
    assert check_columns("x.csv", {"t": [3]}, ts="t", unit="step", step_ms=600_000)["t"].tolist() == [1_800_000]
    with pytest.raises(ValueError, match="x.csv: column t: timestamps outside"):
        check_columns("x.csv", {"t": [1.6e12]}, ts="t", unit="s")
