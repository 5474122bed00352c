"""Replay an ``EventLog`` into a transport, as fast as possible or at a chosen speed.

Why: every experiment (cloud training, device fleets, evaluation) consumes the
same topics, so the log is replayed once into ``interactions`` (user events)
and ``availability`` (STREAM_LIVE / STREAM_OFFLINE made from the log's live
intervals), interleaved by time: a transition at time T is produced before any
user event at T or later, so "is this stream live?" is known when the event
that needs it arrives.

Pacing sleeps between time buckets (at least ~0.1 s of wall time each), never
per event. Every event of the log is produced exactly once, per-user order
preserved (see streams/producer.py).

Event ids are made unique across sources: loaders number events from 0, so two logs
replayed into one topic would share ids and the consumers' dedup would drop the second
log's events as duplicates. Replayed ids carry the source in their top bits
(``namespaced_ids``): ``source_tag(log.name) << 48 | local id``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from streams.batch import COLUMNS, EventBatch, checked_column
from streams.datasets.base import EventLog
from streams.producer import BatchingProducer
from streams.schema import EventKind
from streams.transport import Transport

logger = logging.getLogger(__name__)

#: Rows handed to the producers per step when replaying as fast as possible.
CHUNK_EVENTS = 65_536
#: Least wall time per paced bucket: fewer, larger sleeps keep pacing cheap and accurate.
MIN_BUCKET_WALL_S = 0.1
#: Bits of an event id that hold the loader's own id; the 14 bits above hold the source tag
#: (ids stay below ``streams.schema.MAX_ID`` = 2^62).
LOCAL_ID_BITS = 48
_TAG_BITS = 14


def source_tag(name: str) -> int:
    """A stable 14-bit tag (1..16383) of a source name (BLAKE2b), the top bits of its event ids."""
    h = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big")
    return 1 + h % ((1 << _TAG_BITS) - 1)


def namespaced_ids(name: str, local_ids: np.ndarray) -> np.ndarray:
    """``source_tag(name) << 48 | local`` as uint64; ``ValueError`` when a local id needs more than 48 bits.

    Two sources collide only if their tags do (1 in 16383 per pair); then the consumers'
    dedup sees the same id with other content and dead-letters it (never drops it silently).
    """
    ids = np.asarray(local_ids)
    if len(ids) and (ids.min() < 0 or int(ids.max()) >= 1 << LOCAL_ID_BITS):
        raise ValueError(f"event ids of {name!r} must lie in [0, 2^{LOCAL_ID_BITS}) to be namespaced")
    return (np.uint64(source_tag(name)) << np.uint64(LOCAL_ID_BITS)) | ids.astype(np.uint64)


@dataclass(frozen=True)
class ReplaySummary:
    """What a replay sent.

    Args:
        events: user events produced (to ``topic``); availability_events: transitions produced.
        records, bytes: wire records and payload bytes over all topics.
        seconds: wall time; events_per_s: (events + availability_events) / seconds.
        per_topic: events per topic; records_per_topic: records per topic.
        first_ts_ms, last_ts_ms: log time span replayed (-1 when empty).
    """

    events: int
    availability_events: int
    records: int
    bytes: int
    seconds: float
    events_per_s: float
    per_topic: dict[str, int] = field(default_factory=dict)
    records_per_topic: dict[str, int] = field(default_factory=dict)
    first_ts_ms: int = -1
    last_ts_ms: int = -1


def availability_batch(
    log_: EventLog, time_range: tuple[int | None, int | None] | None = None, namespace: bool = True
) -> EventBatch:
    """STREAM_LIVE at each interval start and STREAM_OFFLINE at its end, time-sorted (user -1).

    Args:
        log_: the log whose ``availability`` intervals are turned into events.
        time_range: keep transitions with ``lo <= ts < hi`` (None ends: unbounded), for replaying a slice.
        namespace: put the source tag in the ids, as ``replay`` does for user events.

    Event ids continue after the log's largest event id, so they never collide.
    """
    a = log_.availability
    if a is None or len(a) == 0:
        return EventBatch.empty()
    item = a.item_id.to_numpy().astype(np.int64)
    start = a.start_ms.to_numpy().astype(np.int64)
    end = a.end_ms.to_numpy().astype(np.int64)
    ts = np.concatenate([start, end])
    items = np.concatenate([item, item])
    kind = np.concatenate([np.full(len(a), int(EventKind.STREAM_LIVE)), np.full(len(a), int(EventKind.STREAM_OFFLINE))])
    # at equal times an item goes offline before it (or another stream) goes live again
    order = np.lexsort((kind != int(EventKind.STREAM_OFFLINE), ts))
    ts, items, kind = ts[order], items[order], kind[order]
    if time_range is not None:
        lo, hi = time_range
        keep = np.ones(len(ts), dtype=bool)
        if lo is not None:
            keep &= ts >= lo
        if hi is not None:
            keep &= ts < hi
        ts, items, kind = ts[keep], items[keep], kind[keep]
    base = int(log_.events.event_id.max()) + 1 if len(log_.events) else 0
    ids = np.arange(base, base + len(ts), dtype=np.uint64)
    return EventBatch.from_columns(
        event_id=namespaced_ids(log_.name, ids) if namespace else ids,
        ts_ms=ts,
        user_id=np.full(len(ts), -1, dtype=np.int64),
        item_id=items,
        value=np.zeros(len(ts), dtype=np.float32),
        kind=kind.astype(np.uint8),
    )


def _chunks(ev_ts: np.ndarray, av_ts: np.ndarray, speed: float | None, step_ms: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(ev_lo, ev_hi, av_lo, av_hi, bucket_start_ms) covering both time-sorted streams in time order.

    Within a chunk availability rows go first; across chunks every row of an earlier chunk is no later
    in time than any row of a later chunk, and availability ties go before user events.
    """
    n_ev, n_av = len(ev_ts), len(av_ts)
    if n_ev + n_av == 0:
        return
    t0 = int(min(ev_ts[0] if n_ev else np.iinfo(np.int64).max, av_ts[0] if n_av else np.iinfo(np.int64).max))
    if speed is None:
        # merged position of availability row j: j + number of user events strictly before it
        av_pos = np.arange(n_av) + np.searchsorted(ev_ts, av_ts, side="left")
        total = n_ev + n_av
        bounds = list(range(0, total, CHUNK_EVENTS)) + [total]
        av_b = np.searchsorted(av_pos, bounds, side="left")
        ev_b = np.asarray(bounds) - av_b
        for i in range(len(bounds) - 1):
            yield int(ev_b[i]), int(ev_b[i + 1]), int(av_b[i]), int(av_b[i + 1]), t0
        return
    bucket_ms = max(int(step_ms), int(speed * MIN_BUCKET_WALL_S * 1000), 1)
    buckets = np.unique(np.concatenate([(ev_ts - t0) // bucket_ms, (av_ts - t0) // bucket_ms]))
    starts = t0 + buckets * bucket_ms
    edges = np.r_[starts[1:], np.iinfo(np.int64).max]
    ev_hi = np.searchsorted(ev_ts, edges, side="left")
    av_hi = np.searchsorted(av_ts, edges, side="left")
    ev_lo = np.r_[0, ev_hi[:-1]]
    av_lo = np.r_[0, av_hi[:-1]]
    for i in range(len(starts)):
        yield int(ev_lo[i]), int(ev_hi[i]), int(av_lo[i]), int(av_hi[i]), int(starts[i])


def replay(
    log: EventLog,
    transport: Transport,
    topic: str = "interactions",
    availability_topic: str | None = "availability",
    speed: float | None = None,
    batch_size: int = 512,
    progress: bool = True,
    partitions: int = 4,
    availability_range: tuple[int | None, int | None] | None = None,
    namespace_ids: bool = True,
) -> ReplaySummary:
    """Produce every event of ``log`` to ``topic`` and its availability transitions to ``availability_topic``.

    Args:
        log: the event log (time-sorted, as every loader returns).
        transport: destination; topics are created with ``partitions`` partitions if absent.
        topic: user events' topic (key = user id).
        availability_topic: STREAM_LIVE/STREAM_OFFLINE topic (key = item id); None skips availability.
        speed: None = as fast as possible; ``s`` = ``s`` x wall clock (3600: an hour of log per second).
        batch_size: events per wire record.
        progress: show a tqdm progress bar.
        partitions: partitions of topics this call creates.
        availability_range: only transitions with ``lo <= ts < hi`` (when replaying a log in slices,
            give each slice its own range so no transition is sent twice).
        namespace_ids: put the source tag in every event id (``namespaced_ids``) so logs replayed
            into one topic never share ids; False sends the loader's ids as they are.
    """
    from tqdm import tqdm

    if speed is not None and not (np.isfinite(speed) and speed > 0):
        raise ValueError(f"speed must be a finite number > 0 (or None for as fast as possible), got {speed}")
    if batch_size < 1 or partitions < 1:
        raise ValueError(f"batch_size and partitions must be >= 1, got {batch_size} and {partitions}")
    events = log.events
    transport.create_topic(topic, partitions)
    producer = BatchingProducer(transport, topic, batch_size)
    avail = availability_batch(log, availability_range, namespace_ids) if availability_topic else EventBatch.empty()
    av_producer: BatchingProducer | None = None
    if len(avail):
        assert availability_topic is not None
        transport.create_topic(availability_topic, partitions)
        av_producer = BatchingProducer(transport, availability_topic, batch_size)
    cols = {name: checked_column(name, events[name].to_numpy(), dt) for name, dt in COLUMNS.items()}
    if namespace_ids:
        cols["event_id"] = namespaced_ids(log.name, cols["event_id"])
    ev_ts = cols["ts_ms"]
    if len(ev_ts) > 1 and (np.diff(ev_ts) < 0).any():
        raise ValueError(f"log {log.name!r} is not sorted by ts_ms; finish loaders with finalize_events")
    total = len(ev_ts) + len(avail)
    wall0 = time.monotonic()
    t0: int | None = None
    bar = tqdm(total=total, unit="ev", unit_scale=True, desc=f"replay {log.name}", disable=not progress, leave=False)
    try:
        for ev_lo, ev_hi, av_lo, av_hi, bucket_ms in _chunks(ev_ts, avail.ts_ms, speed, log.step_ms):
            if speed is not None:
                if t0 is None:
                    t0 = bucket_ms
                wait = wall0 + (bucket_ms - t0) / 1000.0 / speed - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            if av_hi > av_lo and av_producer is not None:
                av_producer.send(avail.take(slice(av_lo, av_hi)))  # type: ignore[arg-type]
                av_producer.drain()  # transitions are never late: out before the user events that follow
            if ev_hi > ev_lo:
                producer.send(EventBatch(**{name: col[ev_lo:ev_hi] for name, col in cols.items()}))
            if speed is not None:
                if av_producer is not None:
                    av_producer.flush()
                producer.flush()
            bar.update((ev_hi - ev_lo) + (av_hi - av_lo))
        if av_producer is not None:
            av_producer.flush()
        producer.flush()
    finally:
        bar.close()
    seconds = time.monotonic() - wall0
    per_topic = {topic: producer.stats.events}
    records = {topic: producer.stats.records}
    nbytes = producer.stats.bytes
    if av_producer is not None:
        assert availability_topic is not None
        per_topic[availability_topic] = av_producer.stats.events
        records[availability_topic] = av_producer.stats.records
        nbytes += av_producer.stats.bytes
    sent = sum(per_topic.values())
    summary = ReplaySummary(
        events=producer.stats.events,
        availability_events=per_topic.get(availability_topic or "", 0) if av_producer else 0,
        records=sum(records.values()),
        bytes=nbytes,
        seconds=seconds,
        events_per_s=sent / seconds if seconds > 0 else float("inf"),
        per_topic=per_topic,
        records_per_topic=records,
        first_ts_ms=int(ev_ts[0]) if len(ev_ts) else -1,
        last_ts_ms=int(ev_ts[-1]) if len(ev_ts) else -1,
    )
    logger.info("replayed %s: %d events (+%d availability) in %.2fs, %.0f events/s", log.name, summary.events,
             summary.availability_events, seconds, summary.events_per_s)  # fmt: skip
    return summary
