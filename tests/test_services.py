"""Unit tests of the services' delivery logic (in-memory transport, popularity engine: fast).

The broker-backed fault tests are in tests/test_faults.py.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Mapping

import numpy as np
from fastapi.testclient import TestClient

from streams.batch import EventBatch, encode_batch
from streams.delivery import DeadLetterRecord, decode_dead_letter
from streams.schema import EventKind
from streams.transport import Consumer, Record, Transport, TransportError, partition_for
from tandem.services.cloud_service import CloudWorker, DeliveryState, IdSet
from streams.candidates import candidates_from_json, candidates_to_json
from tandem.services.engines import PopularityEngine
from tandem.services.metrics import Registry, add_metrics_routes
from tandem.services.settings import (
    TOPIC_INTERACTIONS,
    TOPIC_UPDATES,
    CloudSettings,
    FleetSettings,
    ReplayerSettings,
    dlq_topic,
    env_names,
    from_env,
)

KEY = "unit-test-master-key"


# -- an in-memory transport (same offsets/commit semantics as the real ones) ------------
class MemoryTransport(Transport):
    """Topics as lists of records; consumers of a group resume from its commits."""

    def __init__(self) -> None:
        self.topics: dict[str, list[list[Record]]] = {}
        self.commits: dict[tuple[str, str], dict[int, int]] = {}
        self.lock = threading.RLock()

    def create_topic(self, topic: str, partitions: int = 1) -> None:
        with self.lock:
            self.topics.setdefault(topic, [[] for _ in range(partitions)])

    def partitions(self, topic: str) -> int:
        if topic not in self.topics:
            raise TransportError(f"no topic {topic}")
        return len(self.topics[topic])

    def produce(self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None) -> None:
        with self.lock:
            parts = self.topics.setdefault(topic, [[]])
            if partition is None:
                partition = partition_for(key, len(parts)) if key is not None else 0
            log = parts[partition]
            log.append(Record(topic, partition, len(log), key, bytes(value), int(time.time() * 1000)))

    def flush(self) -> None:
        pass

    def consumer(self, topic: str, group: str, partitions: list[int] | None = None) -> Consumer:
        self.create_topic(topic)
        return MemoryConsumer(self, topic, group, partitions)

    def close(self) -> None:
        pass

    def values(self, topic: str) -> list[bytes]:
        return [r.value for part in self.topics.get(topic, []) for r in part]


class MemoryConsumer(Consumer):
    def __init__(self, t: MemoryTransport, topic: str, group: str, partitions: list[int] | None) -> None:
        self.t, self.topic, self.group = t, topic, group
        self.parts = partitions if partitions is not None else list(range(t.partitions(topic)))
        committed = t.commits.get((topic, group), {})
        self.pos = {p: committed.get(p, 0) for p in self.parts}

    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Record]:
        out: list[Record] = []
        with self.t.lock:
            for p in self.parts:
                take = self.t.topics[self.topic][p][self.pos[p] : self.pos[p] + max_records - len(out)]
                out += take
                self.pos[p] += len(take)
        return out

    def commit(self, offsets: Mapping[int, int] | None = None) -> None:
        self.t.commits.setdefault((self.topic, self.group), {}).update(dict(offsets if offsets is not None else self.pos))

    def committed(self) -> dict[int, int]:
        return dict(self.t.commits.get((self.topic, self.group), {}))

    def positions(self) -> dict[int, int]:
        return dict(self.pos)

    def seek(self, partition: int, offset: int) -> None:
        self.pos[partition] = offset

    def seek_to_beginning(self) -> None:
        self.pos = {p: 0 for p in self.parts}

    def end_offsets(self) -> dict[int, int]:
        return {p: len(self.t.topics[self.topic][p]) for p in self.parts}

    def close(self) -> None:
        pass


# -- helpers -------------------------------------------------------------------------
def tiny_log(n: int = 600, users: int = 30, items: int = 40, seed: int = 0) -> EventBatch:
    rng = np.random.default_rng(seed)
    kinds = rng.choice([EventKind.CLICK, EventKind.WATCH, EventKind.IMPRESSION, EventKind.LIKE], size=n)
    return EventBatch.from_columns(
        event_id=np.arange(n),
        ts_ms=np.arange(n) * 1000,
        user_id=rng.integers(0, users, n),
        item_id=rng.zipf(1.5, n) % items,
        value=np.where(kinds == EventKind.WATCH, 12.0, 0.0),
        kind=kinds,
    )


def produce_log(t: Transport, log: EventBatch, batch: int = 50) -> None:
    for i in range(0, len(log), batch):
        part = log.take(np.arange(i, min(i + batch, len(log))))
        t.produce(TOPIC_INTERACTIONS, encode_batch(part), key=int(part.user_id[0]).to_bytes(8, "little", signed=True))


def make_worker(t: Transport, tmp_path=None, **kw) -> CloudWorker:
    s = CloudSettings(
        transport="memory",
        engine="popular",
        device_key=KEY,
        checkpoint_dir=str(tmp_path) if tmp_path else "",
        checkpoint_every_s=1e9,
        checkpoint_every_events=10**9,
        refresh_every_events=200,
        poll_records=7,
        partitions=2,
        **kw,
    )
    return CloudWorker(s, t, PopularityEngine(s), Registry("cloud")).open()


def drain(w: CloudWorker, max_steps: int = 2000) -> None:
    for _ in range(max_steps):
        if w.step(timeout_s=0.0) == 0:
            return
    raise AssertionError("worker did not drain")


def dlq(t: MemoryTransport, topic: str) -> list[DeadLetterRecord]:
    return [decode_dead_letter(v) for v in t.values(dlq_topic(topic))]


# -- settings / metrics ----------------------------------------------------------------
def test_settings_env_and_overrides() -> None:
    env = {"TANDEM_PORT": "9000", "TANDEM_CHECKPOINT_EVERY_S": "2.5", "TANDEM_ENGINE": "popular", "OTHER": "x"}
    s = from_env(CloudSettings, env=env, port=None, group="g2")
    assert (s.port, s.checkpoint_every_s, s.engine, s.group) == (9000, 2.5, "popular", "g2")
    r = from_env(ReplayerSettings, env={"TANDEM_EXIT_WHEN_DONE": "true", "TANDEM_SPEED": "0"})
    assert r.exit_when_done is True and r.speed == 0.0
    assert "TANDEM_CLOUD_URL" in env_names(FleetSettings)


def test_idset() -> None:
    s = IdSet(merge_every=4, capacity=5)
    s.add(np.array([5, 1, 9], dtype=np.uint64))
    s.add(np.array([2, 9], dtype=np.uint64))
    s.add(np.array([100], dtype=np.uint64))
    assert s.contains(np.array([1, 2, 3, 9, 100, 0], dtype=np.uint64)).tolist() == [True, True, False, True, True, False]
    assert len(s) == 5
    st = DeliveryState(seen_events=s)
    back = DeliveryState.from_json(json.loads(json.dumps(st.to_json())))
    assert back.seen_events.to_array().tolist() == [1, 2, 5, 9, 100]


def test_idset_is_bounded_by_a_watermark() -> None:
    s = IdSet(merge_every=2, capacity=3)
    for i in range(1, 11):
        s.add(np.array([i], dtype=np.uint64))
    assert s.to_array().tolist() == [8, 9, 10] and s.floor == 8
    assert s.contains(np.array([3, 9, 11], dtype=np.uint64)).tolist() == [True, True, False]
    back = DeliveryState.from_json(json.loads(json.dumps(DeliveryState(seen_events=s).to_json())))
    assert back.seen_events.floor == 8 and back.seen_events.contains(np.array([2], dtype=np.uint64)).all()


def test_idset_matches_a_python_set_when_partitions_interleave() -> None:
    """Batches from several partitions arrive out of id order (and repeat): the merged set
    must hold exactly the ids added, sorted, whatever the order of the merges."""
    rng = np.random.default_rng(7)
    s, ref = IdSet(merge_every=64, capacity=10**6), set()
    for _ in range(300):
        ids = rng.integers(0, 5_000, rng.integers(1, 40)).astype(np.uint64)
        probe = rng.integers(0, 5_000, 50).astype(np.uint64)
        assert s.contains(probe).tolist() == [int(x) in ref for x in probe]
        s.add(ids)
        ref.update(int(x) for x in ids)
    assert s.to_array().tolist() == sorted(ref)


def test_metrics_endpoints() -> None:
    reg = Registry("unit")
    reg.inc("events_applied", 3, help="events")
    reg.set("model_version", 7)
    for v in (0.001, 0.002, 0.003):
        reg.observe("rerank_latency_seconds", v)
    from fastapi import FastAPI

    client = TestClient(add_metrics_routes(FastAPI(), reg))
    assert client.get("/healthz").json()["status"] == "ok"
    text = client.get("/metrics").text
    assert 'tandem_events_applied_total{service="unit"} 3.0' in text
    assert 'tandem_model_version{service="unit"} 7.0' in text
    assert 'tandem_rerank_latency_seconds{service="unit",quantile="0.5"} 0.002' in text
    snap = client.get("/metrics.json").json()
    assert snap["rerank_latency_seconds_count"] == 3 and snap["process_rss_bytes"] > 0


# -- cloud worker ----------------------------------------------------------------------
def test_each_event_applied_once_and_bad_inputs_dead_lettered() -> None:
    t = MemoryTransport()
    log = tiny_log()
    w = make_worker(t)
    produce_log(t, log)
    produce_log(t, log.take(np.arange(100, 250)))  # redelivered duplicates
    t.produce(TOPIC_INTERACTIONS, b"\x00not a record")
    src = tiny_log(5, seed=3)
    cols = {c: getattr(src, c) for c in ("ts_ms", "user_id", "item_id", "value")}
    bad = EventBatch.from_columns(**cols, kind=np.array([1, 1, 99, 1, 1]), event_id=np.arange(10_000, 10_005))
    t.produce(TOPIC_INTERACTIONS, encode_batch(bad))
    drain(w)
    assert w.state.events_applied == len(log) + 4
    assert w.state.event_id_sum == int(log.event_id.sum()) + sum(10_000 + i for i in (0, 1, 3, 4))
    assert w.metrics.counter("events_duplicate") == 150
    letters = dlq(t, TOPIC_INTERACTIONS)
    assert len(letters) == 2 and {d.row for d in letters} == {None, 2}
    assert {d.reason.split(":")[0] for d in letters} == {"out of schema", "unknown event kind"}
    assert w.metrics.labeled("dead_letters_by_reason") == {f"{TOPIC_INTERACTIONS}: out of schema": 1, f"{TOPIC_INTERACTIONS}: unknown event kind": 1}
    row = next(d for d in letters if d.row == 2)
    from streams.batch import decode_record

    assert decode_record(row.payload).kind.tolist() == [99]
    assert w.engine.version >= 1
    assert t.values("model-refresh"), "refreshes are published"


def test_crash_and_restore_from_checkpoint(tmp_path) -> None:
    t = MemoryTransport()
    log = tiny_log(800)
    produce_log(t, log.take(np.arange(0, 400)))
    t.produce(TOPIC_INTERACTIONS, b"{broken json")
    w = make_worker(t, tmp_path)
    drain(w)
    w.checkpoint()
    produce_log(t, log.take(np.arange(400, 800)))
    t.produce(TOPIC_INTERACTIONS, b"{broken json 2")
    w.step(timeout_s=0.0)  # part of the rest (7 records of 50 events), then "crash": no checkpoint, no close
    assert 400 < w.state.events_applied < 800
    w2 = make_worker(t, tmp_path)
    assert w2.state.events_applied == 400
    drain(w2)
    assert w2.state.events_applied == 800
    assert w2.state.event_id_sum == int(log.event_id.sum())
    assert len(dlq(t, TOPIC_INTERACTIONS)) == 2, "a reprocessed bad input is dead-lettered once"
    committed = w2.consumers[TOPIC_INTERACTIONS].committed()
    assert committed  # offsets reach the broker at checkpoints
    w2.close()
    w3 = make_worker(t, tmp_path)
    assert w3.state.events_applied == 800 and w3.step(timeout_s=0.0) == 0


def _signed(device_id: int, seq: int, version: int, vec=None) -> bytes:
    from device_rerank.encoders import FeatureEncoder
    from tandem.services.devices import sign_update

    vec = np.full(32, 1 / 8, np.float32) if vec is None else vec  # the gate checks width (32) and norm
    return sign_update(
        KEY, device_id=device_id, model_version=version, seq=seq, family="feature", created_ms=1, num_examples=3,
        payload=FeatureEncoder.encode(vec),
    )


def test_updates_verified_deduplicated_and_dead_lettered() -> None:
    t = MemoryTransport()
    w = make_worker(t)
    produce_log(t, tiny_log(300))
    drain(w)
    v = w.engine.version
    good = [_signed(d, 1, v) for d in range(5)]
    for raw in good + good[:2]:  # two redeliveries
        t.produce(TOPIC_UPDATES, raw, key=b"d")
    forged = bytearray(_signed(9, 1, v))
    forged[-1] ^= 0xFF
    t.produce(TOPIC_UPDATES, bytes(forged))
    t.produce(TOPIC_UPDATES, b"\x93" + b"x" * (70 * 1024))  # oversized
    t.produce(TOPIC_UPDATES, _signed(3, 1, v))  # same seq, other bytes? identical -> duplicate
    t.produce(TOPIC_UPDATES, _signed(4, 1, v, np.full(32, 2 / 8, np.float32)))  # reused seq, new content -> replayed
    drain(w)
    assert w.state.updates_applied == 5
    assert w.metrics.counter("updates_duplicate") == 3
    reasons = sorted(d.reason.split(":")[0] for d in dlq(t, TOPIC_UPDATES))
    assert reasons == ["bad_signature", "oversized", "replayed"]
    by_reason = w.metrics.labeled("dead_letters_by_reason")
    assert by_reason == {f"{TOPIC_UPDATES}: {r}": 1 for r in reasons}
    assert f'reason="{TOPIC_UPDATES}: oversized"' in w.metrics.prometheus()


def test_update_backpressure() -> None:
    t = MemoryTransport()
    w = make_worker(t, max_pending_updates=3)
    for d in range(10):
        t.produce(TOPIC_UPDATES, _signed(d, 1, 0))
    seen = []
    for _ in range(50):
        with w.lock:
            room = w.settings.max_pending_updates - len(w.pending_updates)
        assert room >= 0
        n = w.step(timeout_s=0.0)
        seen.append(len(w.pending_updates))
        if n == 0:
            break
    assert max(seen) <= 3
    assert w.state.updates_applied == 10


def test_cloud_http_api() -> None:
    t = MemoryTransport()
    w = make_worker(t)
    produce_log(t, tiny_log(200))
    drain(w)
    app = add_metrics_routes(w.engine.http_app(), w.metrics, health=w.health)
    client = TestClient(app)
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["events_applied"] == 200
    c = candidates_from_json(client.get("/candidates", params={"user_id": 3, "k": 5}).json())
    assert len(c) == 5 and c.emb_q.dtype == np.int8 and c.model_version == w.engine.version
    assert candidates_to_json(c) == client.get("/candidates", params={"user_id": 3, "k": 5}).json()
    b = client.post("/candidates:batch", json={"user_ids": [1, 2], "k": 3}).json()["results"]
    assert [x["user_id"] for x in b] == [1, 2]
    assert "tandem_events_applied" in client.get("/metrics").text


# -- fleet worker ----------------------------------------------------------------------
def test_fleet_sends_verifiable_updates() -> None:
    from tandem.services.fleet_service import EngineClient, FleetWorker

    t = MemoryTransport()
    w = make_worker(t)
    log = tiny_log(400, users=8)
    produce_log(t, log)
    drain(w)
    fleet = FleetWorker(FleetSettings(device_key=KEY, strategy="feature"), t, client=EngineClient(w.engine)).open()
    for _ in range(200):
        if fleet.step(timeout_s=0.0) == 0:
            break
    assert fleet.events_observed == len(log)
    assert fleet.updates_sent > 0
    snap = fleet.metrics.snapshot()
    assert snap["update_bytes"] > 0 and snap["rerank_latency_seconds_count"] == fleet.points > 0
    drain(w)
    assert w.state.updates_applied == fleet.updates_sent
    assert dlq(t, TOPIC_UPDATES) == []
    # a restarted worker (fresh devices) re-reads nothing it committed, and never reuses a seq
    fleet2 = FleetWorker(FleetSettings(device_key=KEY, strategy="feature"), t, client=EngineClient(w.engine)).open()
    assert fleet2.step(timeout_s=0.0) == 0


def test_recommender_engine_checkpoint_roundtrip(tmp_path) -> None:
    """The default engine (the evaluation's cloud) behind the same worker: train, serve, checkpoint, restore."""
    from tandem.services.engines import make_engine

    t = MemoryTransport()
    s = CloudSettings(
        transport="memory", engine="recommender", device_key=KEY, checkpoint_dir=str(tmp_path), checkpoint_every_s=1e9,
        checkpoint_every_events=10**9, refresh_every_events=250, poll_records=4, num_users=200, num_items=200,
        embedding_dim=16, eval_sample=8,
    )
    w = CloudWorker(s, t, make_engine("recommender", s), Registry("cloud")).open()
    log = tiny_log(600)
    produce_log(t, log)
    drain(w)
    assert w.state.events_applied == 600 and w.engine.version >= 2
    client = TestClient(add_metrics_routes(w.engine.http_app(), w.metrics, health=w.health))
    c = candidates_from_json(client.get("/candidates", params={"user_id": int(log.user_id[0]), "k": 5}).json())
    assert len(c) == 5 and c.emb_q.shape == (5, 16)
    assert client.get("/healthz").json()["events_applied"] == 600
    w.checkpoint()
    version = w.engine.version
    w2 = CloudWorker(s, t, make_engine("recommender", s), Registry("cloud")).open()
    assert w2.state.events_applied == 600 and w2.engine.version == version
    assert np.array_equal(w2.engine.topk(int(log.user_id[0]), 5, 0), w.engine.topk(int(log.user_id[0]), 5, 0))


def test_replayer_sends_each_availability_event_exactly_once() -> None:
    """Chunked replay: every transition once, ids disjoint from user events, every event sent."""
    from streams.batch import decode_record
    from streams.replay import availability_batch
    from tandem.services.replayer_service import Replayer, load_log

    t = MemoryTransport()
    event_log = load_log("synthetic", 1500, seed=3)
    expected = availability_batch(event_log)
    assert len(expected) > 0, "the synthetic world has live streams"
    r = Replayer(ReplayerSettings(transport="memory", partitions=2, batch_size=64), t, chunk=200)
    assert r.run(event_log) == len(event_log)

    def sent(topic: str) -> EventBatch:
        return EventBatch.concat([decode_record(v) for v in t.values(topic)])

    av = sent("availability")
    users = sent(TOPIC_INTERACTIONS)
    assert len(users) == len(event_log)
    assert len(av) == len(expected), "each transition once, not once per chunk"
    assert len(np.unique(av.event_id)) == len(av)
    assert not np.isin(av.event_id, users.event_id).any(), "availability ids must not shadow user events"
    assert np.array_equal(np.sort(av.event_id), np.sort(expected.event_id))
    assert r.availability_sent == len(expected)
    # and the cloud applies all of them: nothing lost to id dedup
    w = make_worker(t)
    drain(w)
    assert w.state.events_applied == len(event_log) + len(expected)
    assert w.state.availability_applied == len(expected)
