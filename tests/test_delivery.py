"""At-least-once helpers: dead letters, dedup, commit-after-processing."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from streams.batch import EventBatch, decode_record, encode_batch
from streams.delivery import DeadLetter, SeenIds, decode_dead_letter, process_stream
from streams.embedded_log import EmbeddedLog
from streams.schema import EventKind, SchemaError, Watch, encode_json
from streams.transport import Consumer, Record


def make_batch(ids, **override) -> EventBatch:
    ids = np.asarray(ids)
    cols = dict(event_id=ids, ts_ms=ids * 10, user_id=ids % 5, item_id=ids % 3, value=np.ones(len(ids)), kind=np.full(len(ids), int(EventKind.WATCH)))
    cols.update(override)
    return EventBatch.from_columns(**cols)


@pytest.fixture()
def log(tmp_path: Path) -> EmbeddedLog:
    transport = EmbeddedLog(tmp_path)
    transport.create_topic("interactions", 2)
    return transport


def read_all(log: EmbeddedLog, topic: str) -> list[Record]:
    return log.consumer(topic, "reader").poll(10_000, 0.05)


def test_dead_letters_hold_exactly_the_bad_records_and_rows(log: EmbeddedLog) -> None:
    bad_rows = make_batch([10, 11, 12, 13], ts_ms=[1, -5, 3, 4], value=[1.0, 1.0, np.nan, 2.0])
    log.produce("interactions", encode_batch(make_batch([1, 2, 3])), partition=0)  # offset 0: fine
    log.produce("interactions", b"TDB\x01\x01\x05\x00\x00\x00garbage", partition=0)  # offset 1: corrupt
    log.produce("interactions", encode_batch(bad_rows), partition=0)  # offset 2: two bad rows
    log.produce("interactions", b'{"type":"teleport"}', partition=1)  # p1 offset 0: out of schema
    log.produce("interactions", encode_json(Watch(event_id=20, ts_ms=1, user_id=1, item_id=1, dwell_s=3.0)), partition=1)
    handled: list[int] = []
    consumer = log.consumer("interactions", "svc")
    stats = process_stream(consumer, lambda b: handled.extend(b.event_id.tolist()), DeadLetter(log), max_records=5)
    assert sorted(handled) == [1, 2, 3, 10, 13, 20]
    assert (stats.records, stats.events, stats.dead_records, stats.dead_rows, stats.duplicates) == (5, 6, 2, 2, 0)
    letters = sorted((decode_dead_letter(r.value) for r in read_all(log, "interactions.dlq")), key=lambda d: (d.partition, d.offset, d.row or -1))
    summary = [(d.topic, d.partition, d.offset, d.row, d.reason) for d in letters]
    assert summary[0][:4] == ("interactions", 0, 1, None) and "corrupt lz4" in summary[0][4]
    assert summary[1:3] == [("interactions", 0, 2, 1, "negative timestamp"), ("interactions", 0, 2, 2, "non-finite value")]
    assert summary[3][:4] == ("interactions", 1, 0, None) and "out of schema" in summary[3][4]
    assert letters[0].payload == b"TDB\x01\x01\x05\x00\x00\x00garbage"
    row = decode_record(letters[1].payload)  # the bad row itself, values as sent
    assert row.event_id.tolist() == [11] and row.ts_ms.tolist() == [-5]
    assert consumer.committed() == {0: 3, 1: 2}
    with pytest.raises(SchemaError):
        decode_dead_letter(b"{}")


def test_duplicates_are_skipped_across_redeliveries_and_restarts(log: EmbeddedLog, tmp_path: Path) -> None:
    log.produce("interactions", encode_batch(make_batch([1, 2, 3, 3])), partition=0)  # repeat inside a record
    log.produce("interactions", encode_batch(make_batch([3, 4, 5])), partition=1)  # overlaps another record
    handled: list[int] = []
    seen = SeenIds(capacity=100)
    stats = process_stream(log.consumer("interactions", "svc"), lambda b: handled.extend(b.event_id.tolist()), DeadLetter(log), max_records=2, seen=seen)
    assert sorted(handled) == [1, 2, 3, 4, 5] and stats.duplicates == 2
    # A redelivery (e.g. a crash before commit) after a restart that loads the checkpointed ids.
    seen.save(tmp_path / "seen.bin")
    restored = SeenIds.load(tmp_path / "seen.bin")
    replay = log.consumer("interactions", "svc")
    replay.seek_to_beginning()
    again: list[int] = []
    stats2 = process_stream(replay, lambda b: again.extend(b.event_id.tolist()), DeadLetter(log), max_records=2, seen=restored)
    assert again == [] and stats2.duplicates == 7


def test_commit_happens_only_after_processing_and_a_failure_redelivers(log: EmbeddedLog) -> None:
    for i in range(5):
        log.produce("interactions", encode_batch(make_batch([i])), partition=0)
    consumer = log.consumer("interactions", "svc")
    calls: list[int] = []

    def handler(batch: EventBatch) -> None:
        eid = int(batch.event_id[0])
        # While record i is being handled, nothing at or past it is committed.
        assert consumer.committed().get(0, 0) <= eid
        if eid == 3 and eid not in calls:
            calls.append(eid)
            raise RuntimeError("model update failed")
        calls.append(eid)

    seen = SeenIds()
    with pytest.raises(RuntimeError, match="model update failed"):
        process_stream(consumer, handler, DeadLetter(log), poll_records=10, seen=seen, idle_timeout_s=0.2)
    assert consumer.committed() == {0: 3}  # records 0..2 done; 3 must come again
    restarted = log.consumer("interactions", "svc")
    stats = process_stream(restarted, handler, DeadLetter(log), seen=seen, idle_timeout_s=0.2)
    assert calls == [0, 1, 2, 3, 3, 4] and stats.records == 2 and stats.duplicates == 0
    assert restarted.committed() == {0: 5}


class RecordingConsumer(Consumer):
    """Wraps a consumer to check how much process_stream asks for per poll."""

    def __init__(self, inner: Consumer) -> None:
        self.inner, self.topic, self.group = inner, inner.topic, inner.group
        self.asked: list[int] = []

    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Record]:
        self.asked.append(max_records)
        return self.inner.poll(max_records, timeout_s)

    def commit(self, offsets=None) -> None:
        self.inner.commit(offsets)

    def committed(self):
        return self.inner.committed()

    def positions(self):
        return self.inner.positions()

    def seek(self, partition: int, offset: int) -> None:
        self.inner.seek(partition, offset)

    def seek_to_beginning(self) -> None:
        self.inner.seek_to_beginning()

    def end_offsets(self):
        return self.inner.end_offsets()

    def close(self) -> None:
        self.inner.close()


def test_polls_are_bounded_and_stop_and_limits_end_the_loop(log: EmbeddedLog) -> None:
    for i in range(100):
        log.produce("interactions", encode_batch(make_batch([i])), partition=i % 2)
    rc = RecordingConsumer(log.consumer("interactions", "svc"))
    stats = process_stream(rc, lambda b: None, None, max_records=45, poll_records=16)
    assert stats.records == 45 and max(rc.asked) <= 16 and rc.asked[-1] == 45 - 32
    stop = threading.Event()
    n = 0

    def handler(batch: EventBatch) -> None:
        nonlocal n
        n += 1
        if n == 10:
            stop.set()

    stats = process_stream(rc, handler, None, stop=stop, poll_records=4)
    assert 10 <= stats.records <= 12  # stops at the next poll boundary
    assert sum(rc.committed().values()) == 45 + stats.records


def test_seen_ids_are_bounded_and_track_per_key_high_water_marks() -> None:
    seen = SeenIds(capacity=3, max_keys=2)
    assert seen.filter_new(np.array([1, 2, 2, 3])).tolist() == [True, True, False, True]
    assert seen.new_mask([1, 4]).tolist() == [False, True]
    seen.add([4])
    assert len(seen) == 3 and 1 not in seen and 4 in seen  # oldest evicted
    assert seen.check_seq("device-7", 5) and not seen.check_seq("device-7", 5) and not seen.check_seq("device-7", 2)
    assert seen.check_seq("device-7", 6) and seen.high_water("device-7") == 6
    seen.check_seq("a", 1)
    seen.check_seq("b", 1)  # evicts device-7 (least recently used)
    assert seen.high_water("device-7") is None
    back = SeenIds.from_bytes(seen.to_bytes())
    assert back.new_mask([2, 3, 4, 9]).tolist() == [False, False, False, True]
    assert back.high_water("a") == 1 and back.capacity == 3
    with pytest.raises(SchemaError, match="corrupt SeenIds"):
        SeenIds.from_bytes(b"\x00garbage")


@pytest.mark.integration
def test_process_stream_on_kafka_dead_letters_and_commits(kafka_bootstrap: str) -> None:
    import uuid

    from streams.kafka_transport import KafkaTransport

    topic = f"d-{uuid.uuid4().hex[:8]}"
    kafka = KafkaTransport(kafka_bootstrap)
    kafka.create_topic(topic, 1)
    kafka.produce(topic, encode_batch(make_batch([1, 2])))
    kafka.produce(topic, b"not a record")
    kafka.produce(topic, encode_batch(make_batch([2, 3])))
    kafka.flush()
    handled: list[int] = []
    with kafka.consumer(topic, "svc", partitions=[0]) as consumer:
        stats = process_stream(consumer, lambda b: handled.extend(b.event_id.tolist()), DeadLetter(kafka), max_records=3)
        assert consumer.committed() == {0: 3}
    assert handled == [1, 2, 3] and stats.duplicates == 1 and stats.dead_records == 1
    with kafka.consumer(f"{topic}.dlq", "reader", partitions=[0]) as dlq:
        letters = []
        for _ in range(50):
            letters += dlq.poll(10, 0.2)
            if letters:
                break
    assert [(d.offset, d.row, d.payload) for d in map(decode_dead_letter, (r.value for r in letters))] == [(1, None, b"not a record")]
    kafka.close()
