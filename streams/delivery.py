"""At-least-once processing: dead letters, deduplication, and a poll-process-commit loop.

Why: transports redeliver whatever was polled but not committed when a process
dies, so handlers see some records twice; and one malformed record must not
stop a stream. ``process_stream`` decodes each record, sends what cannot be
processed to ``<topic>.dlq`` with a reason, drops events already seen (by
``event_id`` with the same content), dead-letters an event whose id was seen with
other content (an id collision between sources: never dropped silently), hands
the rest to the handler, and commits only after the handler and the dead letters
are done.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import msgspec
import numpy as np

from streams.batch import EventBatch, content_digest, decode_record, encode_batch
from streams.schema import SchemaError
from streams.transport import Consumer, Record, Transport

log = logging.getLogger(__name__)

DLQ_SUFFIX = ".dlq"


class DeadLetterRecord(msgspec.Struct, frozen=True):
    """What a dead letter says (JSON on ``<topic>.dlq``).

    ``row`` is the row index within the original record when only that row was bad
    (``payload_b64`` is then that row alone, as a one-event batch record); None when
    the whole record was unusable (``payload_b64`` is the original record).
    """

    reason: str
    topic: str
    partition: int
    offset: int
    row: int | None
    payload_b64: str

    @property
    def payload(self) -> bytes:
        return base64.b64decode(self.payload_b64)


_dlq_encoder = msgspec.json.Encoder()
_dlq_decoder = msgspec.json.Decoder(DeadLetterRecord)


def encode_dead_letter(letter: DeadLetterRecord) -> bytes:
    """The JSON bytes of a dead letter (the one wire format of every ``<topic>.dlq``)."""
    return _dlq_encoder.encode(letter)


def decode_dead_letter(data: bytes) -> DeadLetterRecord:
    """Parse a dead-letter record (for tools and tests)."""
    try:
        return _dlq_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise SchemaError(f"not a dead letter: {exc}") from None


class DeadLetter:
    """Writes unprocessable records and rows to ``<topic>.dlq`` on a transport.

    Args:
        transport: where dead letters go (usually the transport being consumed).
        partitions: partitions of a dlq topic when this writer creates it.
    """

    def __init__(self, transport: Transport, partitions: int = 1) -> None:
        self.transport = transport
        self.partitions = partitions
        self.count = 0
        self._created: set[str] = set()

    def topic_for(self, topic: str) -> str:
        return topic + DLQ_SUFFIX

    def send(self, topic: str, partition: int, offset: int, reason: str, payload: bytes, row: int | None = None) -> None:
        """Dead-letter one record (``row=None``) or one row of it."""
        dlq = self.topic_for(topic)
        if dlq not in self._created:
            self.transport.create_topic(dlq, self.partitions)
            self._created.add(dlq)
        letter = DeadLetterRecord(
            reason=reason, topic=topic, partition=int(partition), offset=int(offset),
            row=None if row is None else int(row), payload_b64=base64.b64encode(payload).decode(),
        )
        self.transport.produce(dlq, encode_dead_letter(letter), key=None, partition=int(partition) % self.partitions)
        self.count += 1
        log.debug("dead letter %s[%d]@%d row=%s: %s", topic, partition, offset, row, reason)

    def record(self, rec: Record, reason: str) -> None:
        """Dead-letter a whole record."""
        self.send(rec.topic, rec.partition, rec.offset, reason, rec.value)

    def rows(self, rec: Record, batch: EventBatch, bad: Iterable[tuple[int, str]]) -> int:
        """Dead-letter bad rows of a decoded record, each as a one-event batch; returns how many."""
        n = 0
        for row, reason in bad:
            payload = encode_batch(batch.take(np.array([row])), compress=False)
            self.send(rec.topic, rec.partition, rec.offset, reason, payload, row=row)
            n += 1
        return n

    def flush(self) -> None:
        """Make dead letters durable (before the offsets that passed them are committed)."""
        self.transport.flush()


class _SeenState(msgspec.Struct):
    capacity: int
    max_keys: int
    recent: list[int]
    hwm: list[tuple[str, int]]
    digests: list[int] = []  # content digest per ``recent`` id (0: unknown, e.g. an older state)


class SeenIds:
    """Bounded memory of processed ids, for idempotent handlers under redelivery.

    Two mechanisms:
      * a recent set of ids (event ids), evicting the oldest past ``capacity``.
        Redeliveries come from the last uncommitted polls, so a window of a few
        hundred thousand ids covers them at bounded memory. Each id keeps the digest of
        its content (``streams.batch.content_digest``), so the same id with other
        content is told apart as a collision (``conflict_mask``);
      * a high-water mark per key, for ids that grow per key (a device's update
        ``seq``): anything at or below the mark is a duplicate, with O(1) memory
        per key (at most ``max_keys`` keys, least recently used evicted).

    Save the state with the consumer's checkpoint (``to_bytes``/``save``) so a
    restart that replays from the committed offsets still recognizes ids.
    """

    def __init__(self, capacity: int = 1_000_000, max_keys: int = 1_000_000) -> None:
        if capacity < 1 or max_keys < 1:
            raise ValueError("capacity and max_keys must be >= 1")
        self.capacity = capacity
        self.max_keys = max_keys
        self._set: dict[int, int] = {}  # id -> content digest (0: not known)
        self._order: deque[int] = deque()
        self._hwm: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._set)

    def __contains__(self, ident: int) -> bool:
        return int(ident) in self._set

    # -- id set ---------------------------------------------------------------
    def new_mask(self, ids: np.ndarray | Iterable[int]) -> np.ndarray:
        """True where an id is neither remembered nor repeated earlier in ``ids`` (does not add)."""
        values = ids.tolist() if isinstance(ids, np.ndarray) else [int(i) for i in ids]
        seen = self._set
        mask = np.ones(len(values), dtype=bool)
        local: set[int] = set()
        for i, v in enumerate(values):
            if v in seen or v in local:
                mask[i] = False
            else:
                local.add(v)
        return mask

    def conflict_mask(self, ids: np.ndarray | Iterable[int], digests: np.ndarray | Iterable[int]) -> np.ndarray:
        """True where an id is remembered (or repeated earlier in ``ids``) with another content digest."""
        values = ids.tolist() if isinstance(ids, np.ndarray) else [int(i) for i in ids]
        dig = digests.tolist() if isinstance(digests, np.ndarray) else [int(d) for d in digests]
        out = np.zeros(len(values), dtype=bool)
        local: dict[int, int] = {}
        for i, (v, d) in enumerate(zip(values, dig)):
            known = self._set.get(v, local.get(v))
            if known is None:
                local[v] = d
            elif known and d and known != d:
                out[i] = True
        return out

    def add(self, ids: np.ndarray | Iterable[int], digests: np.ndarray | Iterable[int] | None = None) -> None:
        """Remember ids, with their content digests when given (call after they were processed)."""
        values = ids.tolist() if isinstance(ids, np.ndarray) else [int(i) for i in ids]
        dig = [0] * len(values) if digests is None else (digests.tolist() if isinstance(digests, np.ndarray) else list(digests))
        with self._lock:
            for v, d in zip(values, dig):
                if v not in self._set:
                    self._set[v] = int(d)
                    self._order.append(v)
            while len(self._order) > self.capacity:
                self._set.pop(self._order.popleft(), None)

    def filter_new(self, ids: np.ndarray | Iterable[int]) -> np.ndarray:
        """``new_mask`` and ``add`` in one step (when processing cannot fail in between)."""
        mask = self.new_mask(ids)
        arr = np.asarray(ids.tolist() if isinstance(ids, np.ndarray) else list(ids))
        self.add(arr[mask] if len(arr) else arr)
        return mask

    # -- per-key high-water marks -----------------------------------------------
    def check_seq(self, key: str | int, seq: int) -> bool:
        """True (and remember) when ``seq`` is above the key's mark; False for a replay."""
        k = str(key)
        with self._lock:
            mark = self._hwm.get(k)
            if mark is not None and seq <= mark:
                self._hwm.move_to_end(k)
                return False
            self._hwm[k] = int(seq)
            self._hwm.move_to_end(k)
            while len(self._hwm) > self.max_keys:
                self._hwm.popitem(last=False)
            return True

    def high_water(self, key: str | int) -> int | None:
        return self._hwm.get(str(key))

    # -- checkpoint ---------------------------------------------------------------
    def to_bytes(self) -> bytes:
        with self._lock:
            order = list(self._order)
            state = _SeenState(self.capacity, self.max_keys, order, list(self._hwm.items()), [self._set[i] for i in order])
        return msgspec.msgpack.encode(state)

    @classmethod
    def from_bytes(cls, data: bytes) -> "SeenIds":
        try:
            state = msgspec.msgpack.decode(data, type=_SeenState)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise SchemaError(f"corrupt SeenIds state: {exc}") from None
        out = cls(state.capacity, state.max_keys)
        out.add(state.recent, state.digests if len(state.digests) == len(state.recent) else None)
        for k, v in state.hwm:
            out._hwm[k] = v
        return out

    def save(self, path: Path | str) -> None:
        """Write atomically (tmp, fsync, replace) so a crash leaves the old or new state."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(self.to_bytes())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path | str) -> "SeenIds":
        return cls.from_bytes(Path(path).read_bytes())


@dataclass
class StreamStats:
    """What ``process_stream`` did."""

    records: int = 0  # records polled and finished (handled or dead-lettered)
    events: int = 0  # events handed to the handler
    dead_records: int = 0  # whole records dead-lettered
    dead_rows: int = 0  # single bad rows dead-lettered
    duplicates: int = 0  # events skipped as already seen (same id, same content)
    collisions: int = 0  # events dead-lettered: id seen with other content
    commits: int = 0

    @property
    def dead_lettered(self) -> int:
        return self.dead_records + self.dead_rows + self.collisions


def process_stream(
    consumer: Consumer,
    handler: Callable[[EventBatch], object],
    dead_letters: DeadLetter | None,
    max_records: int | None = None,
    stop: Callable[[], bool] | threading.Event | None = None,
    seen: SeenIds | None = None,
    poll_records: int = 64,
    poll_timeout_s: float = 0.5,
    idle_timeout_s: float | None = None,
) -> StreamStats:
    """Poll, decode, dead-letter, dedupe, handle, commit, until a limit is reached.

    Args:
        consumer: source; its committed offsets advance only past finished records.
        handler: gets each record's new, valid events as one ``EventBatch``.
        dead_letters: where bad records/rows go; None logs and drops them.
        max_records: stop after this many records (None: no limit).
        stop: callable or Event; checked between polls.
        seen: dedup memory (a fresh ``SeenIds`` when None); keep it across calls.
        poll_records: records per poll (bounds memory: nothing is buffered past one poll).
        idle_timeout_s: stop after this long without records (None: never).

    If the handler raises, the records finished before it are committed and the
    exception propagates; the failing record is redelivered on restart.
    """
    seen = seen if seen is not None else SeenIds()
    stats = StreamStats()
    should_stop = stop.is_set if isinstance(stop, threading.Event) else (stop or (lambda: False))
    last_data = time.monotonic()
    while not should_stop():
        if max_records is not None and stats.records >= max_records:
            break
        want = poll_records if max_records is None else min(poll_records, max_records - stats.records)
        records = consumer.poll(max_records=want, timeout_s=poll_timeout_s)
        if not records:
            if idle_timeout_s is not None and time.monotonic() - last_data >= idle_timeout_s:
                break
            continue
        last_data = time.monotonic()
        done: dict[int, int] = {}
        try:
            for rec in records:
                _process_one(rec, handler, dead_letters, seen, stats)
                done[rec.partition] = rec.offset + 1
                stats.records += 1
        finally:
            if done:
                if dead_letters is not None:
                    dead_letters.flush()
                consumer.commit(done)
                stats.commits += 1
    return stats


def _process_one(rec: Record, handler: Callable[[EventBatch], object], dead_letters: DeadLetter | None,
                 seen: SeenIds, stats: StreamStats) -> None:
    try:
        raw = decode_record(rec.value)
        batch, bad = raw.validate()
    except SchemaError as exc:
        stats.dead_records += 1
        log.warning("dead record %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, exc.reason)
        if dead_letters is not None:
            dead_letters.record(rec, exc.reason)
        return
    if bad:
        stats.dead_rows += len(bad)
        log.warning("%d bad rows in %s[%d]@%d, first: %s", len(bad), rec.topic, rec.partition, rec.offset, bad[0][1])
        if dead_letters is not None:
            dead_letters.rows(rec, raw, bad)
    if len(batch) == 0:
        return
    digests = content_digest(batch)
    clash = seen.conflict_mask(batch.event_id, digests)
    if clash.any():
        rows = np.flatnonzero(clash)
        stats.collisions += len(rows)
        log.warning("%d event id collisions in %s[%d]@%d (same id, other content)", len(rows), rec.topic, rec.partition, rec.offset)
        if dead_letters is not None:
            reason = "event_id collision: id already seen with other content"
            raw_rows = np.setdiff1d(np.arange(len(raw)), np.array([r for r, _ in bad], dtype=np.int64))[rows]
            dead_letters.rows(rec, raw, [(int(r), reason) for r in raw_rows])
        keep = ~clash
        batch, digests = batch.take(keep), digests[keep]
    mask = seen.new_mask(batch.event_id)
    dups = int(len(mask) - mask.sum())
    if dups:
        stats.duplicates += dups
        batch, digests = batch.take(mask), digests[mask]
    if len(batch) == 0:
        return
    handler(batch)
    seen.add(batch.event_id, digests)
    stats.events += len(batch)
