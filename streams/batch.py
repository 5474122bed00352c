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
    MAX_POSITION,
    MAX_RATING,
    MAX_TS_MS,
    MAX_VALUE,
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


def checked_column(name: str, values: Sequence | np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``values`` as ``dtype``, or ``SchemaError`` when a value does not fit (no silent wrap).

    Why: ``np.asarray(1e20).astype(int64)`` is INT64_MIN and a uint64 id above 2^63 turns
    negative; such a row must be refused with a reason, not become another id.
    """
    arr = np.asarray(values)
    if arr.dtype == dtype:
        return np.ascontiguousarray(arr)
    if len(arr) == 0:
        return np.empty(0, dtype=dtype)
    if dtype.kind in "iu":
        if arr.dtype == object:
            try:
                arr = np.asarray([int(v) for v in arr.tolist()], dtype=object)
            except (TypeError, ValueError, OverflowError) as exc:
                raise SchemaError(f"column {name}: not integers ({exc})") from None
            lo, hi = min(arr.tolist()), max(arr.tolist())
        elif arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)):
                raise SchemaError(f"column {name}: non-finite values")
            if np.any(arr != np.floor(arr)):
                raise SchemaError(f"column {name}: non-integer values")
            lo, hi = float(arr.min()), float(arr.max())
        elif arr.dtype.kind in "iub":
            lo, hi = int(arr.min()), int(arr.max())
        else:
            raise SchemaError(f"column {name}: dtype {arr.dtype} is not numeric")
        info = np.iinfo(dtype)
        if lo < info.min or hi > info.max:
            raise SchemaError(f"column {name}: values [{lo}, {hi}] outside {dtype} range")
    elif dtype.kind == "f" and arr.dtype.kind not in "fiub":
        raise SchemaError(f"column {name}: dtype {arr.dtype} is not numeric")
    return np.ascontiguousarray(arr.astype(dtype))


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
        """Build from any array-likes, cast to the wire dtypes; ``SchemaError`` if a value does not fit."""
        return cls(**{name: checked_column(name, cols[name], dt) for name, dt in COLUMNS.items()})

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
        value = self.value.astype(np.float64)
        checks: list[tuple[np.ndarray, str]] = [
            (self.kind >= _N_KINDS, "unknown event kind"),
            (self.ts_ms < 0, "negative timestamp"),
            (self.ts_ms > MAX_TS_MS, f"timestamp above {MAX_TS_MS} ms (seconds or microseconds read as ms?)"),
            (self.event_id > np.uint64(MAX_ID), "event_id out of range"),
            ((self.item_id < 0) | (self.item_id > MAX_ID), "item_id out of range"),
            ((self.user_id > MAX_ID) | (self.user_id < -1), "user_id out of range"),
            ((self.user_id < 0) & ~np.isin(self.kind, _AVAIL_CODES), "user_id missing on a user event"),
            (~np.isfinite(value), "non-finite value"),
            (np.abs(value) > MAX_VALUE, "value out of range"),
            (
                np.isin(self.kind, [EventKind.WATCH, EventKind.LIVE_LEAVE]) & ((value < 0) | (value > MAX_DWELL_S)),
                "dwell out of range",
            ),
            ((self.kind == EventKind.RATE) & ((value < 0) | (value > MAX_RATING)), f"rating outside [0, {MAX_RATING:g}]"),
            (
                (self.kind == EventKind.IMPRESSION) & ((value < 0) | (value > MAX_POSITION) | (value != np.floor(value))),
                "impression position out of range",
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


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer (vectorized, wraps mod 2^64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def content_digest(batch: EventBatch) -> np.ndarray:
    """A 64-bit digest of each row's content (everything but ``event_id``), vectorized.

    Why: deduplication by id must tell a redelivery (same id, same content: drop) from an
    id collision between sources (same id, other content: dead-letter, never drop).
    """
    with np.errstate(over="ignore"):
        h = np.full(len(batch), 0x9E3779B97F4A7C15, dtype=np.uint64)
        for col in (batch.ts_ms.view(np.uint64), batch.user_id.view(np.uint64), batch.item_id.view(np.uint64),
                    batch.value.view(np.uint32).astype(np.uint64), batch.kind.astype(np.uint64)):  # fmt: skip
            h = _mix(h ^ col)
    return h


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
    if flags & ~FLAG_LZ4:
        raise SchemaError(f"unknown batch flags {flags:#x}")
    body = memoryview(data)[_HEADER.size :]
    expected = n * _ROW_BYTES
    if flags & FLAG_LZ4:
        body = memoryview(_decompress_bounded(bytes(body), expected))
    if len(body) != n * _ROW_BYTES:
        raise SchemaError(f"batch body is {len(body)} bytes, expected {n * _ROW_BYTES} for {n} events")
    cols = {}
    offset = 0
    for name, dt in COLUMNS.items():
        size = n * dt.itemsize
        cols[name] = np.frombuffer(body, dtype=dt, count=n, offset=offset)
        offset += size
    return EventBatch(**cols)


def _decompress_bounded(body: bytes, expected: int) -> bytes:
    """lz4-decompress at most ``expected`` bytes, checking the declared size first.

    Why: a small forged record can declare (or just hold) hundreds of MB; the frame header's
    content size is checked against what ``n`` events take before any byte is inflated,
    and inflation never produces more than ``expected + 1`` bytes.
    """
    try:
        info = lz4.frame.get_frame_info(body)
    except (RuntimeError, ValueError) as exc:
        raise SchemaError(f"corrupt lz4 body: {exc}") from None
    declared = int(info.get("content_size") or 0)
    if declared and declared != expected:
        raise SchemaError(f"lz4 body declares {declared} bytes, expected {expected}")
    dec = lz4.frame.LZ4FrameDecompressor()
    try:
        out = dec.decompress(body, max_length=expected + 1)
    except RuntimeError as exc:
        raise SchemaError(f"corrupt lz4 body: {exc}") from None
    if len(out) > expected:
        raise SchemaError(f"lz4 body inflates past {expected} bytes")
    if not dec.eof:
        raise SchemaError("truncated lz4 body (no end of frame)")
    if dec.unused_data:
        raise SchemaError(f"{len(dec.unused_data)} bytes after the lz4 frame")
    return out


def decode_valid(data: bytes) -> tuple[EventBatch, list[tuple[int, str]]]:
    """Decode and validate in one step: (valid rows, [(row, reason)]).

    A record that cannot be decoded at all raises ``SchemaError``.
    """
    return decode_record(data).validate()
