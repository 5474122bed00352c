"""Columnar micro-batches of events: the compact binary wire format.

Why: Python spends microseconds per object, so one Kafka record per JSON event
tops out around ten thousand events/s. A record that carries a few hundred
events as raw numpy columns (lz4-compressed) is decoded with a handful of
``frombuffer`` calls, and validation is vectorized.

Layout of a record (little-endian)::

    b"TDB" | version:u8 | flags:u8 | n:u32 | body
    body = lz4(event_id:u64[n] ts_ms:i64[n] user_id:i64[n] item_id:i64[n] value:f32[n] kind:u8[n])
    (uncompressed when flags & 1 == 0)

A record that starts with ``{`` is a single JSON event (streams/schema.py), so
any outside producer can feed Tandem; ``decode_record`` accepts both.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, Iterable, Iterator, Sequence

import lz4.frame
import numpy as np
import pandas as pd

from streams.schema import (
    MAX_DWELL_S,
    MAX_ID,
    AVAILABILITY_KINDS,
    EventKind,
    SchemaError,
    decode_event,
    kind_of,
    make_event,
)
from streams.schema import Event

MAGIC: Final[bytes] = b"TDB"
VERSION: Final[int] = 1
FLAG_LZ4: Final[int] = 1
_HEADER = struct.Struct("<3sBBI")
#: A record larger than this is refused before decompression (forged or runaway).
MAX_EVENTS_PER_RECORD: Final[int] = 1_000_000

#: Column name -> dtype, in wire order. Also the canonical event-table columns.
COLUMNS: Final[dict[str, np.dtype]] = {
    "event_id": np.dtype("<u8"),
    "ts_ms": np.dtype("<i8"),
    "user_id": np.dtype("<i8"),
    "item_id": np.dtype("<i8"),
    "value": np.dtype("<f4"),
    "kind": np.dtype("u1"),
}
_ROW_BYTES: Final[int] = sum(dt.itemsize for dt in COLUMNS.values())
_N_KINDS: Final[int] = len(EventKind)
_AVAIL_CODES = np.array(sorted(int(k) for k in AVAILABILITY_KINDS), dtype=np.uint8)


@dataclass(frozen=True)
class EventBatch:
    """A batch of events as parallel numpy columns (one row per event)."""

    event_id: np.ndarray
    ts_ms: np.ndarray
    user_id: np.ndarray
    item_id: np.ndarray
    value: np.ndarray
    kind: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.event_id)
        for name in COLUMNS:
            if len(getattr(self, name)) != n:
                raise SchemaError(f"column {name} has {len(getattr(self, name))} rows, expected {n}")

    def __len__(self) -> int:
        return len(self.event_id)

    # -- construction -----------------------------------------------------
    @classmethod
    def empty(cls) -> "EventBatch":
        return cls(**{name: np.empty(0, dtype=dt) for name, dt in COLUMNS.items()})

    @classmethod
    def from_columns(cls, **cols: Sequence | np.ndarray) -> "EventBatch":
        """Build from any array-likes, cast to the wire dtypes."""
        return cls(**{name: np.ascontiguousarray(np.asarray(cols[name]), dtype=dt) for name, dt in COLUMNS.items()})

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> "EventBatch":
        """From an event table with the canonical columns (see streams/datasets/base.py)."""
        missing = [c for c in COLUMNS if c not in frame.columns]
        if missing:
            raise SchemaError(f"event table lacks columns {missing}")
        return cls.from_columns(**{c: frame[c].to_numpy() for c in COLUMNS})

    @classmethod
    def from_events(cls, events: Iterable[Event]) -> "EventBatch":
        rows = [(e.event_id, e.ts_ms, e.user_id, e.item_id, e.value, int(kind_of(e))) for e in events]
        if not rows:
            return cls.empty()
        cols = list(zip(*rows))
        return cls.from_columns(**dict(zip(COLUMNS, cols)))

    @classmethod
    def concat(cls, batches: Sequence["EventBatch"]) -> "EventBatch":
        if not batches:
            return cls.empty()
        return cls(**{name: np.concatenate([getattr(b, name) for b in batches]) for name in COLUMNS})

    # -- views ------------------------------------------------------------
    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({name: getattr(self, name) for name in COLUMNS})

    def to_events(self) -> list[Event]:
        return [
            make_event(EventKind(int(k)), event_id=int(e), ts_ms=int(t), user_id=int(u), item_id=int(i), value=float(v))
            for e, t, u, i, v, k in zip(self.event_id, self.ts_ms, self.user_id, self.item_id, self.value, self.kind)
        ]

    def take(self, index: np.ndarray) -> "EventBatch":
        """Rows selected by a boolean mask or integer index."""
        return EventBatch(**{name: getattr(self, name)[index] for name in COLUMNS})

    def __iter__(self) -> Iterator[tuple[int, int, int, int, float, int]]:
        return zip(self.event_id, self.ts_ms, self.user_id, self.item_id, self.value, self.kind)  # type: ignore[return-value]

    # -- validation -------------------------------------------------------
    def validate(self) -> tuple["EventBatch", list[tuple[int, str]]]:
        """Split into (valid rows, [(row, reason)] for invalid rows). Vectorized."""
        n = len(self)
        reasons = np.full(n, "", dtype=object)
        checks: list[tuple[np.ndarray, str]] = [
            (self.kind >= _N_KINDS, "unknown event kind"),
            (self.ts_ms < 0, "negative timestamp"),
            ((self.item_id < 0) | (self.item_id > MAX_ID), "item_id out of range"),
            (self.user_id > MAX_ID, "user_id out of range"),
            ((self.user_id < 0) & ~np.isin(self.kind, _AVAIL_CODES), "user_id missing on a user event"),
            (~np.isfinite(self.value), "non-finite value"),
            (
                np.isin(self.kind, [EventKind.WATCH, EventKind.LIVE_LEAVE]) & ((self.value < 0) | (self.value > MAX_DWELL_S)),
                "dwell out of range",
            ),
        ]
        bad = np.zeros(n, dtype=bool)
        for mask, reason in checks:
            new = mask & ~bad
            reasons[new] = reason
            bad |= mask
        if not bad.any():
            return self, []
        idx = np.flatnonzero(bad)
        return self.take(~bad), [(int(i), str(reasons[i])) for i in idx]


def encode_batch(batch: EventBatch, compress: bool = True) -> bytes:
    """Encode a batch as one wire record."""
    body = b"".join(np.ascontiguousarray(getattr(batch, name), dtype=dt).tobytes() for name, dt in COLUMNS.items())
    flags = 0
    if compress:
        body = lz4.frame.compress(body, compression_level=0, store_size=True)
        flags |= FLAG_LZ4
    return _HEADER.pack(MAGIC, VERSION, flags, len(batch)) + body


def decode_record(data: bytes) -> EventBatch:
    """Decode a wire record: a binary batch or one JSON/msgpack event. ``SchemaError`` on any problem.

    The returned batch is structurally sound; call ``.validate()`` to split off
    rows whose values are out of schema.
    """
    if not data:
        raise SchemaError("empty record")
    if data[:3] != MAGIC:
        return EventBatch.from_events([decode_event(data)])
    if len(data) < _HEADER.size:
        raise SchemaError("truncated batch header")
    _, version, flags, n = _HEADER.unpack_from(data)
    if version != VERSION:
        raise SchemaError(f"unsupported batch version {version}")
    if n > MAX_EVENTS_PER_RECORD:
        raise SchemaError(f"batch of {n} events exceeds the limit of {MAX_EVENTS_PER_RECORD}")
    body = memoryview(data)[_HEADER.size :]
    if flags & FLAG_LZ4:
        try:
            body = memoryview(lz4.frame.decompress(bytes(body)))
        except RuntimeError as exc:
            raise SchemaError(f"corrupt lz4 body: {exc}") from None
    if len(body) != n * _ROW_BYTES:
        raise SchemaError(f"batch body is {len(body)} bytes, expected {n * _ROW_BYTES} for {n} events")
    cols = {}
    offset = 0
    for name, dt in COLUMNS.items():
        size = n * dt.itemsize
        cols[name] = np.frombuffer(body, dtype=dt, count=n, offset=offset)
        offset += size
    return EventBatch(**cols)


def decode_valid(data: bytes) -> tuple[EventBatch, list[tuple[int, str]]]:
    """Decode and validate in one step: (valid rows, [(row, reason)]).

    A record that cannot be decoded at all raises ``SchemaError``.
    """
    return decode_record(data).validate()
