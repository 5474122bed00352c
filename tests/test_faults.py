"""Fault tests against a real Kafka-protocol broker (tansu on loopback).

Each test injects one fault, then checks the delivery guarantees:
processed event count equals the log, nothing applied twice (count and id sum of the
applied events match the log), and the dead-letter topics hold exactly the bad inputs.
The popularity engine keeps the model cheap, so the time goes to the faults themselves.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from streams.batch import EventBatch, decode_record, encode_batch
from streams.delivery import DeadLetterRecord, decode_dead_letter
from streams.kafka_transport import KafkaTransport
from streams.schema import EventKind
from tandem.services.cloud_service import CloudWorker
from tandem.services.engines import PopularityEngine
from tandem.services.metrics import Registry
from tandem.services.runtime import free_port
from tandem.services.settings import (
    TOPIC_AVAILABILITY,
    TOPIC_INTERACTIONS,
    TOPIC_REFRESH,
    TOPIC_UPDATES,
    CloudSettings,
    dlq_topic,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

KEY = "fault-test-master-key"
ROOT = Path(__file__).resolve().parents[1]
PARTS = 2


# -- helpers ---------------------------------------------------------------------------
def make_log(n: int, users: int = 40, items: int = 60, start_id: int = 0, seed: int = 0) -> EventBatch:
    rng = np.random.default_rng(seed)
    kinds = rng.choice([EventKind.CLICK, EventKind.WATCH, EventKind.IMPRESSION, EventKind.LIKE], size=n)
    return EventBatch.from_columns(
        event_id=np.arange(start_id, start_id + n),
        ts_ms=np.arange(n) * 1000,
        user_id=rng.integers(0, users, n),
        item_id=rng.zipf(1.5, n) % items,
        value=np.where(kinds == EventKind.WATCH, 12.0, 0.0),
        kind=kinds,
    )


def records(log: EventBatch, size: int = 50) -> list[tuple[bytes, bytes]]:
    """(key, value) wire records of ``size`` events, one user per record (keyed like the replayer)."""
    out = []
    for user in np.unique(log.user_id):
        rows = np.flatnonzero(log.user_id == user)
        for i in range(0, len(rows), size):
            out.append((int(user).to_bytes(8, "little", signed=True), encode_batch(log.take(rows[i : i + size]))))
    return out


def transport(bootstrap: str) -> KafkaTransport:
    return KafkaTransport(bootstrap, client_id="fault-test", request_timeout_ms=5000, max_block_ms=5000)


def create_topics(t: KafkaTransport) -> None:
    for topic in (TOPIC_INTERACTIONS, TOPIC_AVAILABILITY, TOPIC_UPDATES):
        t.create_topic(topic, PARTS)
        t.create_topic(dlq_topic(topic), 1)
    t.create_topic(TOPIC_REFRESH, 1)


def _drain(t: KafkaTransport, topic: str, timeout_s: float) -> tuple[list[bytes], dict[int, int]]:
    """Every record of ``topic`` and the end position of each partition (read from the start).

    Positions after a full read are the true log ends: tansu answers ListOffsets with the
    last batch's base offset + 1, so a fresh consumer's ``end_offsets()`` can fall short.
    """
    cons = t.consumer(topic, f"reader-{time.monotonic_ns()}", partitions=list(range(t.partitions(topic))))
    cons.seek_to_beginning()
    out: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            recs = cons.poll(1000, timeout_s=0.5)
            out += [r.value for r in recs]
            if not recs and all(cons.positions().get(p, 0) >= e for p, e in cons.end_offsets().items()):
                break
        return out, cons.positions()
    finally:
        cons.close()


def read_all(t: KafkaTransport, topic: str, timeout_s: float = 10.0) -> list[bytes]:
    """Every record of ``topic`` (fixed assignment, from the beginning)."""
    return _drain(t, topic, timeout_s)[0]


def end_offsets(t: KafkaTransport, topic: str, timeout_s: float = 10.0) -> dict[int, int]:
    """Next offset of each partition of ``topic``."""
    return _drain(t, topic, timeout_s)[1]


def committed(t: KafkaTransport, topic: str, group: str) -> dict[int, int]:
    """Offsets ``group`` has committed on ``topic`` (read with a fixed assignment: no group join)."""
    cons = t.consumer(topic, group, partitions=list(range(t.partitions(topic))))
    try:
        return {p: o for p, o in cons.committed().items()}
    finally:
        cons.close()


def dead_letters(t: KafkaTransport, topic: str) -> list[DeadLetterRecord]:
    return [decode_dead_letter(v) for v in read_all(t, dlq_topic(topic))]


def wait_for(cond, timeout_s: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


def wait_stable(value, for_s: float, timeout_s: float, what: str) -> Any:
    """Wait until ``value()`` has not changed for ``for_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    last, since = value(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = value()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= for_s:
            return now
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


def cloud_settings(bootstrap: str, tmp: Path | None, **kw: Any) -> CloudSettings:
    base: dict[str, Any] = dict(
        transport=f"kafka://{bootstrap}",
        engine="popular",
        device_key=KEY,
        partitions=PARTS,
        checkpoint_dir=str(tmp) if tmp else "",
        checkpoint_every_s=1.0,
        checkpoint_every_events=400,
        refresh_every_events=10**6,
        poll_records=5,
    )
    base.update(kw)
    return CloudSettings(**base)


def bad_inputs(t: KafkaTransport) -> int:
    """Produce two malformed records and a batch with one out-of-schema row; returns 3."""
    t.produce(TOPIC_INTERACTIONS, b"{not json", key=b"x")
    t.produce(TOPIC_INTERACTIONS, b"TDB\x01\x01\xff\xff\x00\x00garbage", key=b"y")
    bad = make_log(4, start_id=900_000, seed=9)
    cols = {c: getattr(bad, c) for c in ("event_id", "ts_ms", "user_id", "item_id", "value")}
    cols["value"] = np.array([1.0, 1.0, -5.0, 1.0], dtype=np.float32)
    t.produce(TOPIC_INTERACTIONS, encode_batch(EventBatch.from_columns(**cols, kind=np.full(4, EventKind.WATCH))), key=b"z")
    return 3


class CloudProcess:
    """``tandem serve cloud`` as a subprocess that can be SIGKILLed."""

    def __init__(self, bootstrap: str, ckpt: Path, log_path: Path, port: int | None = None, **env: str) -> None:
        self.port = port or free_port()
        self.env = {
            **os.environ,
            "TANDEM_TRANSPORT": f"kafka://{bootstrap}",
            "TANDEM_ENGINE": "popular",
            "TANDEM_DEVICE_KEY": KEY,
            "TANDEM_PARTITIONS": str(PARTS),
            "TANDEM_CHECKPOINT_DIR": str(ckpt),
            "TANDEM_CHECKPOINT_EVERY_S": "0.5",
            "TANDEM_CHECKPOINT_EVERY_EVENTS": "300",
            "TANDEM_POLL_RECORDS": "3",
            "TANDEM_HOST": "127.0.0.1",
            "TANDEM_PORT": str(self.port),
            "OMP_NUM_THREADS": "1",
            **env,
        }
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "CloudProcess":
        out = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tandem.cli import app; app()", "serve", "cloud"],
            env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )
        wait_for(self.healthy, 60, "cloud /healthz")
        return self

    def healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"cloud exited {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def metrics(self) -> dict[str, Any]:
        return httpx.get(f"http://127.0.0.1:{self.port}/metrics.json", timeout=2).json()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


# -- tests -----------------------------------------------------------------------------
def test_cloud_killed_mid_stream_and_restarted(broker_process, tmp_path: Path) -> None:
    t = transport(broker_process.bootstrap)
    create_topics(t)
    log = make_log(3000)
    recs = records(log, size=25)
    n_bad = bad_inputs(t)
    t.flush()
    cloud = CloudProcess(broker_process.bootstrap, tmp_path / "ckpt", tmp_path / "cloud.log").start()
    try:
        # a paced producer keeps the stream flowing while the cloud is killed and restarted
        def produce() -> None:
            for i, (k, v) in enumerate(recs):
                t.produce(TOPIC_INTERACTIONS, v, key=k)
                if i % 10 == 0:
                    t.flush()
                    time.sleep(0.05)
            t.flush()

        producer = threading.Thread(target=produce)
        producer.start()
        wait_for(lambda: cloud.metrics().get("events_applied", 0) >= 800, 60, "first events applied")
        wait_for(lambda: cloud.metrics().get("checkpoints", 0) >= 1, 30, "a checkpoint")
        before = cloud.metrics()["events_applied"]
        cloud.kill()  # SIGKILL: no final checkpoint, no commit
        assert before < len(log), "the kill must land mid-stream"
        cloud2 = CloudProcess(broker_process.bootstrap, tmp_path / "ckpt", tmp_path / "cloud2.log", port=cloud.port).start()
        assert cloud2.metrics().get("restores", 0) == 1
        producer.join(60)
        n_valid = len(log) + 3  # the 3 good rows of the batch with one bad row are applied too
        wait_for(lambda: cloud2.metrics()["events_applied"] >= n_valid, 60, "all events applied")
        time.sleep(1.0)  # nothing more may arrive: no double application
        m = cloud2.metrics()
        assert m["events_applied"] == n_valid
        assert m["event_id_sum"] == float(log.event_id.sum()) + sum(900_000 + i for i in (0, 1, 3))
        assert m.get("events_duplicate", 0) == 0, "the restored checkpoint rewinds the offsets with the model"
    finally:
        code = cloud2.stop() if "cloud2" in locals() else cloud.stop()
    assert code == 0
    letters = dead_letters(t, TOPIC_INTERACTIONS)
    keys = [(d.partition, d.offset, d.row) for d in letters]
    assert len(letters) == n_bad and len(set(keys)) == n_bad, letters
    assert sorted(d.reason.split(":")[0] for d in letters) == ["corrupt lz4 body", "dwell out of range", "malformed"]
    t.close()


def test_malformed_forged_and_oversized_updates(broker_process, tmp_path: Path) -> None:
    from device_rerank.encoders import FeatureEncoder

    from tandem.services.devices import sign_update

    t = transport(broker_process.bootstrap)
    create_topics(t)
    s = cloud_settings(broker_process.bootstrap, tmp_path)
    w = CloudWorker(s, t, PopularityEngine(s), Registry("cloud")).open()

    def env(device: int, seq: int, scale: float = 1.0) -> bytes:
        return sign_update(KEY, device_id=device, model_version=0, seq=seq, family="feature", created_ms=1,
                           num_examples=2, payload=FeatureEncoder.encode(np.full(32, scale / 8, np.float32)))  # the gate checks width 32 and norm

    good = [env(d, 1) for d in range(6)] + [env(0, 2)]
    for raw in good:
        t.produce(TOPIC_UPDATES, raw, key=b"d")
    for raw in good[:3]:
        t.produce(TOPIC_UPDATES, raw, key=b"d")  # redelivered: duplicates, not dead letters
    forged = bytearray(env(7, 1))
    forged[-3] ^= 0x55
    t.produce(TOPIC_UPDATES, bytes(forged), key=b"f")
    t.produce(TOPIC_UPDATES, env(8, 1)[:-40] + b"\x00" * 40, key=b"f")  # tampered payload/signature
    t.produce(TOPIC_UPDATES, b"\x98" + os.urandom(90_000), key=b"o")  # oversized
    t.produce(TOPIC_UPDATES, b"not msgpack", key=b"m")
    t.produce(TOPIC_UPDATES, env(0, 1, 2.0), key=b"r")  # replayed seq with new content
    t.produce(TOPIC_INTERACTIONS, b'{"type":"click","event_id":1}', key=b"e")  # incomplete event
    t.flush()
    wait_for(lambda: w.step(timeout_s=0.3) == 0 and w.state.updates_applied == len(good), 30, "updates applied", every=0)
    assert w.metrics.counter("updates_duplicate") == 3
    w.close()
    reasons = sorted(d.reason.split(":")[0] for d in dead_letters(t, TOPIC_UPDATES))
    assert reasons == ["bad_signature", "malformed", "malformed", "oversized", "replayed"]
    ev = dead_letters(t, TOPIC_INTERACTIONS)
    assert len(ev) == 1 and ev[0].reason.startswith("out of schema")
    # restart from the checkpoint: nothing is applied or dead-lettered again
    w2 = CloudWorker(s, transport(broker_process.bootstrap), PopularityEngine(s), Registry("cloud")).open()
    for p in range(PARTS):  # even a full re-read of the topic changes nothing
        w2.consumers[TOPIC_UPDATES].seek(p, 0)
    wait_for(lambda: w2.step(timeout_s=0.3) == 0, 20, "drain", every=0)
    assert w2.state.updates_applied == len(good)
    assert len(dead_letters(t, TOPIC_UPDATES)) == 5
    w2.close()
    t.close()


def test_broker_paused_and_resumed(broker_process, tmp_path: Path) -> None:
    """SIGSTOP the broker mid-stream (connections hang), then SIGCONT: nothing lost or doubled."""
    t = transport(broker_process.bootstrap)
    create_topics(t)
    log = make_log(2000, seed=4)
    recs = records(log, size=20)
    s = cloud_settings(broker_process.bootstrap, tmp_path, checkpoint_every_events=300)
    w = CloudWorker(s, transport(broker_process.bootstrap), PopularityEngine(s), Registry("cloud")).open()
    runner = threading.Thread(target=w.run, kwargs={"give_up_s": 90}, daemon=True)
    runner.start()
    half = len(recs) // 2
    for k, v in recs[:half]:
        t.produce(TOPIC_INTERACTIONS, v, key=k)
    t.flush()
    wait_for(lambda: w.state.events_applied > 0, 30, "processing started")
    pid = broker_process.proc.pid
    os.kill(pid, signal.SIGSTOP)

    def produce_rest() -> None:  # produced while the broker is frozen: buffered, acknowledged after
        for k, v in recs[half:]:
            t.produce(TOPIC_INTERACTIONS, v, key=k)
        t.flush()

    late = threading.Thread(target=produce_rest)
    try:
        late.start()
        time.sleep(6.0)  # longer than the client's request timeout (5 s): requests fail and are retried
        n_first = sum(len(decode_record(v)) for _, v in recs[:half])
        assert w.state.events_applied <= n_first, "nothing produced during the pause can have arrived"
    finally:
        os.kill(pid, signal.SIGCONT)
    late.join(60)
    wait_for(lambda: w.state.events_applied >= len(log), 60, "all events applied after the pause")
    time.sleep(1.0)
    w.stop()
    runner.join(30)
    assert w.error is None
    assert w.state.events_applied == len(log)
    assert w.state.event_id_sum == int(log.event_id.sum())
    assert dead_letters(t, TOPIC_INTERACTIONS) == []
    w.close()
    t.close()


class FleetProcess:
    """``tandem serve fleet`` as a subprocess."""

    def __init__(self, bootstrap: str, cloud_url: str, log_path: Path, **env: str) -> None:
        self.port = free_port()
        self.env = {
            **os.environ,
            "TANDEM_TRANSPORT": f"kafka://{bootstrap}",
            "TANDEM_CLOUD_URL": cloud_url,
            "TANDEM_DEVICE_KEY": KEY,
            "TANDEM_POLL_RECORDS": "2",
            "TANDEM_HOST": "127.0.0.1",
            "TANDEM_PORT": str(self.port),
            "TANDEM_KAFKA_SESSION_TIMEOUT_MS": "3000",
            "OMP_NUM_THREADS": "1",
            **env,
        }
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "FleetProcess":
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tandem.cli import app; app()", "serve", "fleet"],
            env=self.env, cwd=ROOT, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,
        )
        return self

    def metrics(self) -> dict[str, Any]:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"fleet exited {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/metrics.json", timeout=2).json()
        except httpx.HTTPError:
            return {}

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return 0
        self.proc.terminate()
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


def test_fleet_worker_restarted(broker_process, tmp_path: Path) -> None:
    """Kill a fleet worker mid-stream; its replacement resumes from the committed offsets.

    Devices of the new worker start with fresh, higher sequence numbers, so the cloud
    accepts every update once: nothing is dead-lettered as replayed, nothing applied twice.
    """
    from tandem.services.runtime import HttpServer
    from tandem.services.metrics import add_metrics_routes

    t = transport(broker_process.bootstrap)
    create_topics(t)
    log = make_log(1500, users=20, seed=7)
    recs = records(log, size=10)
    s = cloud_settings(broker_process.bootstrap, tmp_path, refresh_every_events=10**6)
    engine = PopularityEngine(s)
    w = CloudWorker(s, transport(broker_process.bootstrap), engine, Registry("cloud")).open()
    runner = threading.Thread(target=w.run, daemon=True)
    runner.start()
    server = HttpServer(add_metrics_routes(engine.http_app(), w.metrics, health=w.health)).start()
    fleet = FleetProcess(broker_process.bootstrap, server.url, tmp_path / "fleet1.log").start()
    try:
        for k, v in recs:
            t.produce(TOPIC_INTERACTIONS, v, key=k)
        t.flush()
        wait_for(lambda: fleet.metrics().get("events_observed", 0) >= 300, 60, "fleet observing")
        fleet.kill()
        fleet2 = FleetProcess(broker_process.bootstrap, server.url, tmp_path / "fleet2.log").start()
        wait_for(lambda: w.state.events_applied >= len(log), 60, "cloud applied the log")
        # The replacement gets the partitions once the dead member's session times out and
        # commits only after its updates are flushed: the group at the log end means every
        # update it will ever send is on the topic.
        ends = end_offsets(t, TOPIC_INTERACTIONS)
        wait_for(lambda: committed(t, TOPIC_INTERACTIONS, "fleet") == ends, 60, "replacement worker at the log end")
        assert fleet2.metrics().get("events_observed", 0) > 0, "the replacement took over the dead worker's partitions"
        n_sent = sum(end_offsets(t, TOPIC_UPDATES).values())
        # ... and the cloud has read all of them and aggregated its buffer.
        wait_for(lambda: sum(w.state.offsets.get(TOPIC_UPDATES, {}).values()) == n_sent and not w.pending_updates,
                 30, "cloud drained device-updates")
    finally:
        fleet.stop()
        if "fleet2" in locals():
            fleet2.stop()
        w.stop()
        runner.join(30)
        server.stop()
    envelopes = read_all(t, TOPIC_UPDATES)
    assert len(envelopes) == n_sent
    assert w.state.events_applied == len(log)
    assert w.state.updates_applied == len(set(envelopes)), "every distinct envelope applied exactly once"
    assert dead_letters(t, TOPIC_UPDATES) == [], "no update rejected as replayed after the restart"
    w.close()
    t.close()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("strategy", ["feature", "federated", "data"])
def test_each_update_family_survives_a_cloud_kill_and_a_fleet_restart(broker_process, tmp_path: Path, strategy: str) -> None:
    """The production cloud (recommender engine) and the strategy's fleet, as services on the
    broker: the cloud is SIGKILLed mid-stream and restarted from its checkpoint, then the fleet
    is killed and replaced. Every event is applied once, and every distinct device update
    envelope is applied once: nothing lost (none dead-lettered), nothing applied twice."""
    t = transport(broker_process.bootstrap)
    create_topics(t)
    log = make_log(2400, users=30, items=50, seed=11)
    recs = records(log, size=8)
    common = {"TANDEM_STRATEGY": strategy}
    model = {"TANDEM_ENGINE": "recommender", "TANDEM_NUM_USERS": "64", "TANDEM_NUM_ITEMS": "64", "TANDEM_REFRESH_EVERY_EVENTS": "300"}
    cloud = CloudProcess(broker_process.bootstrap, tmp_path / "ckpt", tmp_path / "cloud.log", **common, **model).start()
    fleet = FleetProcess(broker_process.bootstrap, f"http://127.0.0.1:{cloud.port}", tmp_path / "fleet1.log", **common).start()
    try:
        def produce(part: list[tuple[bytes, bytes]]) -> None:
            for i, (k, v) in enumerate(part):
                t.produce(TOPIC_INTERACTIONS, v, key=k)
                if i % 20 == 0:
                    t.flush()
                    time.sleep(0.05)
            t.flush()

        half = len(recs) // 2
        produce(recs[: half // 2])
        wait_for(lambda: cloud.metrics().get("updates_applied_total", 0) > 0 and cloud.metrics().get("checkpoints", 0) >= 1, 90,
                 "updates applied and checkpointed")  # fmt: skip
        producer = threading.Thread(target=produce, args=(recs[half // 2 : half],))
        producer.start()
        cloud.kill()  # mid-stream, with updates in flight
        cloud = CloudProcess(broker_process.bootstrap, tmp_path / "ckpt", tmp_path / "cloud2.log", port=cloud.port, **common, **model).start()
        assert cloud.metrics().get("restores", 0) == 1
        producer.join(60)
        wait_for(lambda: fleet.metrics().get("events_observed", 0) >= 600, 60, "fleet observing")
        fleet.kill()
        fleet = FleetProcess(broker_process.bootstrap, f"http://127.0.0.1:{cloud.port}", tmp_path / "fleet2.log", **common).start()
        produce(recs[half:])
        wait_for(lambda: cloud.metrics().get("events_applied", 0) >= len(log), 90, "cloud applied the log")
        ends = end_offsets(t, TOPIC_INTERACTIONS)
        wait_for(lambda: committed(t, TOPIC_INTERACTIONS, "fleet") == ends, 90, "replacement fleet at the log end")
        n_sent = sum(end_offsets(t, TOPIC_UPDATES).values())
        wait_stable(lambda: (cloud.metrics().get("updates_applied_total", 0), cloud.metrics().get("updates_pending", 0)), 2.0, 60,
                    "cloud drained device-updates")  # fmt: skip
        m = cloud.metrics()
        envelopes = read_all(t, TOPIC_UPDATES)
    finally:
        fleet.stop()
        code = cloud.stop()
    assert code == 0
    assert len(envelopes) == n_sent > 0
    assert m["events_applied"] == len(log) and m["event_id_sum"] == float(log.event_id.sum())
    letters = dead_letters(t, TOPIC_UPDATES)
    assert letters == [], [d.reason for d in letters]
    assert m["updates_pending"] == 0
    assert m["updates_applied_total"] == len(set(envelopes)), "every distinct envelope applied exactly once"
    t.close()
