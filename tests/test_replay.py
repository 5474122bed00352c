"""Batching producer and replay: exact counts, per-user order, availability interleaving, pacing, CLI."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.batch import EventBatch, decode_record
from streams.datasets.base import EventLog, finalize_events
from streams.datasets.synthetic import SyntheticConfig, generate
from streams.producer import BatchingProducer, partitions_for, routing_keys
from streams.replay import LOCAL_ID_BITS, availability_batch, namespaced_ids, replay, source_tag
from streams.schema import EventKind
from streams.transport import Consumer, Record, Transport, partition_for


class MemoryTransport(Transport):
    """Records in lists, plus one global production sequence to check cross-topic order."""

    def __init__(self) -> None:
        self.topics: dict[str, list[list[Record]]] = {}
        self.sequence: list[tuple[str, int, int]] = []
        self.flushes = 0

    def create_topic(self, topic: str, partitions: int = 1) -> None:
        self.topics.setdefault(topic, [[] for _ in range(partitions)])

    def partitions(self, topic: str) -> int:
        return len(self.topics[topic])

    def produce(self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None) -> None:
        parts = self.topics[topic]
        p = partition if partition is not None else (0 if key is None else partition_for(key, len(parts)))
        parts[p].append(Record(topic, p, len(parts[p]), key, bytes(value), 0))
        self.sequence.append((topic, p, len(parts[p]) - 1))

    def flush(self) -> None:
        self.flushes += 1

    def consumer(self, topic: str, group: str, partitions: list[int] | None = None) -> Consumer:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def rows(self, topic: str) -> pd.DataFrame:
        """Every row of a topic, partition by partition, with its global production index."""
        frames = []
        index = {(t, p, o): i for i, (t, p, o) in enumerate(self.sequence)}
        for parts in self.topics.get(topic, []):
            for rec in parts:
                f = decode_record(rec.value).to_frame()
                f["partition"] = rec.partition
                f["seq"] = index[(topic, rec.partition, rec.offset)]
                frames.append(f)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _per_user(frame: pd.DataFrame) -> dict[int, list[int]]:
    return {int(u): g.event_id.tolist() for u, g in frame.groupby("user_id", sort=True)}


@pytest.fixture(scope="module")
def small_log() -> EventLog:
    return generate(SyntheticConfig(events=20_000, seed=5))


@given(st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=50), st.integers(1, 64))
@settings(max_examples=50, deadline=None)
def test_vectorized_partitioning_matches_transport(keys: list[int], n: int) -> None:
    got = partitions_for(np.array(keys, dtype=np.int64), n)
    assert got.tolist() == [partition_for(k, n) for k in keys]


def test_producer_groups_by_partition_and_keeps_order() -> None:
    tr = MemoryTransport()
    tr.create_topic("t", 3)
    prod = BatchingProducer(tr, "t", batch_size=4)
    users = np.array([1, 2, 3, 1, 1, 2, 4, 5, 1, 1, 3, 2])
    batch = EventBatch.from_columns(
        event_id=np.arange(12), ts_ms=np.arange(12), user_id=users, item_id=np.full(12, 7), value=np.zeros(12), kind=np.full(12, 2)
    )
    prod.send(batch.take(np.arange(6)))
    prod.send(batch.take(np.arange(6, 12)))
    assert prod.pending > 0
    prod.flush()
    assert prod.pending == 0 and tr.flushes == 1
    assert prod.stats.events == 12 and prod.stats.records == len(tr.sequence)
    out = tr.rows("t")
    assert sorted(out.event_id) == list(range(12))
    for rec in (r for parts in tr.topics["t"] for r in parts):
        rows = decode_record(rec.value)
        assert 1 <= len(rows) <= 4
        assert {partition_for(int(u), 3) for u in rows.user_id} == {rec.partition}
        assert rec.key == int(rows.user_id[0]).to_bytes(8, "little", signed=True)
    assert _per_user(out) == _per_user(batch.to_frame())
    # availability rows (user -1) are keyed by item
    av = EventBatch.from_columns(event_id=[0], ts_ms=[0], user_id=[-1], item_id=[99], value=[0.0], kind=[int(EventKind.STREAM_LIVE)])
    assert routing_keys(av).tolist() == [99]
    with pytest.raises(ValueError):
        BatchingProducer(tr, "t", batch_size=0)


@pytest.mark.parametrize("chunk", [1_000, 65_536])
def test_replay_exact_events_order_and_availability(small_log: EventLog, chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("streams.replay.CHUNK_EVENTS", chunk)
    tr = MemoryTransport()
    s = replay(small_log, tr, batch_size=256, progress=False, partitions=3)
    assert s.events == len(small_log) == s.per_topic["interactions"]
    n_av = 2 * len(small_log.availability)
    assert s.availability_events == n_av == s.per_topic["availability"]
    assert s.records == len(tr.sequence) and s.bytes > 0 and s.events_per_s > 0
    got = tr.rows("interactions")
    assert len(got) == len(small_log)
    assert sorted(got.event_id) == sorted(namespaced_ids(small_log.name, small_log.events.event_id.to_numpy()))
    got["event_id"] = got.event_id.to_numpy() & np.uint64((1 << LOCAL_ID_BITS) - 1)  # the loader's own ids
    assert _per_user(got.sort_values("seq", kind="stable")) == _per_user(small_log.events)
    # the cross-topic contract: a transition at T is produced before any user event at T or later
    av = tr.rows("availability")
    assert set(av.kind) == {int(EventKind.STREAM_LIVE), int(EventKind.STREAM_OFFLINE)}
    assert (av.user_id == -1).all()
    ev = got.sort_values("ts_ms", kind="stable")
    # first production index among user events at time >= T, for every T
    first_seq_from = np.minimum.accumulate(ev.seq.to_numpy()[::-1])[::-1]
    at = np.searchsorted(ev.ts_ms.to_numpy(), av.ts_ms.to_numpy(), side="left")
    has = at < len(ev)
    assert (av.seq.to_numpy()[has] < first_seq_from[at[has]]).all()


@given(
    st.lists(st.tuples(st.integers(0, 50), st.integers(0, 5), st.integers(0, 3)), min_size=1, max_size=80),
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 40), st.integers(1, 20)), max_size=10),
    st.integers(1, 7),
    st.integers(1, 4),
    st.sampled_from([3, 17, 65_536]),
)
@settings(max_examples=40, deadline=None)
def test_replay_property_any_log(rows, intervals, batch_size: int, partitions: int, chunk: int) -> None:
    ts, users, items = (np.array(c) for c in zip(*rows))
    events = finalize_events(pd.DataFrame({"ts_ms": ts, "user_id": users, "item_id": items, "value": 0.0, "kind": 5}))
    avail = None
    if intervals:
        i, a, d = (np.array(c) for c in zip(*intervals))
        avail = pd.DataFrame({"item_id": i, "start_ms": a, "end_ms": a + d})
    log = EventLog(name="p", events=events, availability=avail)
    import streams.replay as rp

    old, rp.CHUNK_EVENTS = rp.CHUNK_EVENTS, chunk
    try:
        tr = MemoryTransport()
        s = replay(log, tr, batch_size=batch_size, partitions=partitions, progress=False)
    finally:
        rp.CHUNK_EVENTS = old
    got = tr.rows("interactions")
    assert s.events == len(got) == len(events)
    assert (got.event_id.to_numpy() >> np.uint64(LOCAL_ID_BITS) == np.uint64(source_tag("p"))).all()
    got["event_id"] = got.event_id.to_numpy() & np.uint64((1 << LOCAL_ID_BITS) - 1)  # the loader's own ids
    assert _per_user(got.sort_values("seq", kind="stable")) == _per_user(events)
    assert s.availability_events == (2 * len(intervals) if intervals else 0)
    if intervals:
        av = tr.rows("availability")
        ev = got.sort_values("ts_ms", kind="stable")
        first_seq_from = np.minimum.accumulate(ev.seq.to_numpy()[::-1])[::-1]
        at = np.searchsorted(ev.ts_ms.to_numpy(), av.ts_ms.to_numpy(), side="left")
        has = at < len(ev)
        assert (av.seq.to_numpy()[has] < first_seq_from[at[has]]).all()


def test_availability_batch_and_range() -> None:
    log = EventLog(
        name="t",
        events=finalize_events(pd.DataFrame({"ts_ms": [5, 15], "user_id": [1, 2], "item_id": [1, 2], "value": 0.0, "kind": 5})),
        availability=pd.DataFrame({"item_id": [1, 1, 2], "start_ms": [0, 10, 10], "end_ms": [10, 20, 30]}),
    )
    b = availability_batch(log)
    assert list(zip(b.ts_ms.tolist(), b.item_id.tolist(), b.kind.tolist())) == [
        (0, 1, 7), (10, 1, 8), (10, 1, 7), (10, 2, 7), (20, 1, 8), (30, 2, 8),
    ]  # fmt: skip
    assert b.event_id.min() > log.events.event_id.max()
    part = availability_batch(log, (10, 21))
    assert part.ts_ms.tolist() == [10, 10, 10, 20]
    tr = MemoryTransport()
    s = replay(log, tr, progress=False, availability_range=(None, 10))
    assert s.per_topic == {"interactions": 2, "availability": 1}
    s = replay(log, MemoryTransport(), progress=False, availability_topic=None)
    assert s.per_topic == {"interactions": 2} and s.availability_events == 0
    unsorted = EventLog(name="u", events=log.events.iloc[::-1].reset_index(drop=True))
    with pytest.raises(ValueError, match="not sorted"):
        replay(unsorted, MemoryTransport(), progress=False)
    with pytest.raises(ValueError, match="speed"):
        replay(log, MemoryTransport(), progress=False, speed=0)


def test_paced_replay_sleeps_per_bucket_not_per_event(monkeypatch: pytest.MonkeyPatch) -> None:
    # 200 events over 2 s of log time, 4 distinct 500 ms buckets, replayed at 4x: ~0.4 s, <= 4 sleeps
    ts = np.repeat([0, 500, 1000, 1500], 50) + np.tile(np.arange(50), 4)
    events = finalize_events(pd.DataFrame({"ts_ms": ts, "user_id": np.arange(200) % 7, "item_id": 1, "value": 0.0, "kind": 1}))
    log = EventLog(name="paced", events=events, step_ms=500)
    sleeps: list[float] = []
    real_sleep = time.sleep
    monkeypatch.setattr("streams.replay.time.sleep", lambda s: (sleeps.append(s), real_sleep(s)))
    tr = MemoryTransport()
    t = time.monotonic()
    s = replay(log, tr, speed=4.0, progress=False)
    took = time.monotonic() - t
    assert s.events == 200
    assert len(sleeps) <= 3  # the first bucket starts at once
    assert 0.3 < took < 2.0
    assert tr.flushes >= 4  # paced replays flush every bucket so consumers see events on time


def test_replay_into_embedded_log_reads_back(tmp_path: Path, small_log: EventLog) -> None:
    from streams.embedded_log import EmbeddedLog

    with EmbeddedLog(tmp_path / "log") as tr:
        s = replay(small_log, tr, batch_size=512, progress=False, partitions=4)
        assert tr.partitions("interactions") == 4
    with EmbeddedLog(tmp_path / "log") as tr:
        frames = []
        with tr.consumer("interactions", "check") as c:
            while True:
                recs = c.poll(max_records=1000, timeout_s=0.2)
                if not recs:
                    break
                frames += [decode_record(r.value).to_frame() for r in recs]
        got = pd.concat(frames, ignore_index=True)
        assert len(got) == s.events == len(small_log)
        got["event_id"] = got.event_id.to_numpy() & np.uint64((1 << LOCAL_ID_BITS) - 1)  # the loader's own ids
        assert _per_user(got) == _per_user(small_log.events)
        pd.testing.assert_frame_equal(
            got.sort_values("event_id").reset_index(drop=True), small_log.events.sort_values("event_id").reset_index(drop=True)
        )
        assert sum(tr.end_offsets("availability").values()) == s.records_per_topic["availability"]


def test_cli_replay(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tandem.cli import app
    from tandem.commands.replay import parse_speed

    assert parse_speed("max") is None and parse_speed("3600x") == 3600.0 and parse_speed("60") == 60.0
    runner = CliRunner()
    res = runner.invoke(
        app, ["replay", "synthetic", "--events", "3000", "--transport", f"embedded:{tmp_path / 'log'}", "--partitions", "2"]
    )
    assert res.exit_code == 0, res.output
    assert "interactions" in res.output and "3,000" in res.output and "events/s" in res.output
    from streams.embedded_log import EmbeddedLog

    with EmbeddedLog(tmp_path / "log") as tr:
        assert tr.partitions("interactions") == 2
    res = runner.invoke(app, ["replay", "synthetic", "--events", "10", "--transport", "carrier-pigeon://x"])
    assert res.exit_code == 2
    res = runner.invoke(app, ["replay", "no-such-source", "--transport", f"embedded:{tmp_path / 'x'}"])
    assert res.exit_code == 2 and "unknown source" in res.output
    res = runner.invoke(app, ["replay", "synthetic", "--speed", "fast"])
    assert res.exit_code != 0
    res = runner.invoke(app, ["replay", "synthetic", "--events", "2000", "--limit", "500", "--transport", f"embedded:{tmp_path / 'cut'}"])
    assert res.exit_code == 0, res.output
    with EmbeddedLog(tmp_path / "cut") as tr:
        with tr.consumer("interactions", "g") as c:
            n = 0
            while recs := c.poll(1000, timeout_s=0.2):
                n += sum(len(decode_record(r.value)) for r in recs)
        assert n == 500


@pytest.mark.shared_data
def test_replay_real_twitch_into_embedded_log(shared_data: Path, tmp_path: Path) -> None:
    from streams.datasets import load_source
    from streams.embedded_log import EmbeddedLog

    log = load_source("twitch", path=shared_data / "twitch-livestream-2000u")
    with EmbeddedLog(tmp_path / "log") as tr:
        s = replay(log, tr, progress=False)
        assert s.events == 105_745
        assert s.availability_events == 2 * len(log.availability)
        assert sum(tr.end_offsets("interactions").values()) == s.records_per_topic["interactions"]
