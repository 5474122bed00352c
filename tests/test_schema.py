"""Schema and wire-batch round trips and rejections."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.batch import EventBatch, decode_record, decode_valid, encode_batch
from streams.schema import (
    CLASS_BY_KIND,
    EventKind,
    SchemaError,
    Watch,
    decode_event,
    encode_json,
    encode_msgpack,
    kind_of,
    make_event,
)

ids = st.integers(min_value=0, max_value=2**62)


@pytest.mark.parametrize("kind", list(EventKind))
def test_every_kind_round_trips_json_and_msgpack(kind: EventKind) -> None:
    user = -1 if kind in (EventKind.STREAM_LIVE, EventKind.STREAM_OFFLINE) else 7
    event = make_event(kind, event_id=1, ts_ms=1_000, user_id=user, item_id=42, value=3.0)
    assert kind_of(event) is kind
    assert decode_event(encode_json(event)) == event
    assert decode_event(encode_msgpack(event)) == event


@given(
    rows=st.lists(
        st.tuples(ids, st.integers(0, 2**62), st.integers(0, 2**62), ids, st.floats(0, 1000, width=32), st.sampled_from(list(EventKind))),
        max_size=300,
    ),
    compress=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_batch_round_trip_is_exact(rows: list, compress: bool) -> None:
    cols = list(zip(*rows)) if rows else [[]] * 6
    batch = EventBatch.from_columns(
        event_id=cols[0], ts_ms=cols[1], user_id=cols[2], item_id=cols[3], value=cols[4], kind=[int(k) for k in cols[5]]
    )
    back = decode_record(encode_batch(batch, compress=compress))
    for name in ("event_id", "ts_ms", "user_id", "item_id", "value", "kind"):
        np.testing.assert_array_equal(getattr(back, name), getattr(batch, name))


def test_events_survive_batch_round_trip_as_typed_objects() -> None:
    events = [make_event(k, event_id=i, ts_ms=10 * i, user_id=3, item_id=i, value=2.0) for i, k in enumerate(EventKind) if k not in (EventKind.STREAM_LIVE, EventKind.STREAM_OFFLINE)]
    assert decode_record(encode_batch(EventBatch.from_events(events))).to_events() == events


def test_single_json_event_is_accepted_as_a_record() -> None:
    record = encode_json(Watch(event_id=9, ts_ms=5, user_id=1, item_id=2, dwell_s=30.0))
    batch = decode_record(record)
    assert len(batch) == 1 and batch.kind[0] == EventKind.WATCH and batch.value[0] == 30.0


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"", "empty"),
        (b"{not json", "malformed"),
        (b'{"type":"teleport","event_id":1,"ts_ms":1,"user_id":1,"item_id":1}', "out of schema"),
        (b'{"type":"click","event_id":1,"ts_ms":1,"user_id":1}', "out of schema"),
        (b'{"type":"click","event_id":1,"ts_ms":-5,"user_id":1,"item_id":1}', "out of schema"),
        (b'{"type":"watch","event_id":1,"ts_ms":1,"user_id":1,"item_id":1,"dwell_s":1e9}', "out of schema"),
        (b'{"type":"click","event_id":1,"ts_ms":1,"user_id":1,"item_id":1,"extra":true}', "out of schema"),
        (b'{"type":"click","event_id":1,"ts_ms":1,"user_id":1,"item_id":1,"v":99}', "out of schema"),
        (b"TDB\x01\x01\x05\x00\x00\x00garbage", "corrupt lz4"),
        (b"TDB\x01\x00\x02\x00\x00\x00short", "expected"),
        (b"TDB\x07\x00\x00\x00\x00\x00", "version"),
        (b"TDB\x01\x01\xff\xff\xff\xff", "exceeds"),
    ],
)
def test_malformed_records_are_rejected_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(SchemaError) as info:
        decode_record(payload)
    assert reason in info.value.reason


def test_validate_splits_bad_rows_with_reasons() -> None:
    batch = EventBatch.from_columns(
        event_id=[1, 2, 3, 4, 5],
        ts_ms=[1, -1, 3, 4, 5],
        user_id=[1, 1, -1, 1, 1],
        item_id=[1, 1, 1, 1, 1],
        value=[1.0, 1.0, 1.0, np.nan, 1.0],
        kind=[EventKind.WATCH, EventKind.WATCH, EventKind.WATCH, EventKind.CLICK, 99],
    )
    good, bad = decode_valid(encode_batch(batch))
    assert good.event_id.tolist() == [1]
    assert dict(bad) == {1: "negative timestamp", 2: "user_id missing on a user event", 3: "non-finite value", 4: "unknown event kind"}


def test_every_kind_has_a_struct_with_a_distinct_tag() -> None:
    tags = {msgspec.inspect.type_info(cls).tag for cls in CLASS_BY_KIND.values()}
    assert len(tags) == len(EventKind)
