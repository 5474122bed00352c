"""Typed, versioned interaction events for a feed and livestream app.

One struct per event type, tagged by ``type`` so a single JSON or msgpack
document decodes into the right class. Single events are the human- and
outsider-friendly format (any producer can send one JSON event); the wire
format between Tandem's own services is the columnar ``EventBatch``
(streams/batch.py), which carries the same fields.

Every decode goes through ``decode_event``; anything malformed or out of
schema raises ``SchemaError`` with a reason, never another exception type.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Final, Union

import msgspec

SCHEMA_VERSION: Final[int] = 1

#: Largest id accepted on the wire (ids are stored as int64).
MAX_ID: Final[int] = 2**62
#: A watch longer than a day is a client bug, not behaviour.
MAX_DWELL_S: Final[float] = 86_400.0
#: Largest timestamp (ms): year 2286. Seconds read as ms are far below it, microseconds
#: or nanoseconds read as ms far above it (and overflow int64 arithmetic downstream).
MAX_TS_MS: Final[int] = 10**13
#: Ratings (``Rate``) lie in [0, MAX_RATING]; impression positions in [0, MAX_POSITION].
MAX_RATING: Final[float] = 10.0
MAX_POSITION: Final[int] = 10_000
#: Any other scalar payload is finite and at most this large in magnitude.
MAX_VALUE: Final[float] = 1e9

#: Units a loader's timestamps may be in, and their factor to milliseconds.
TS_UNITS: Final[dict[str, float]] = {"s": 1000.0, "ms": 1.0, "us": 1e-3, "ns": 1e-6}


def detect_ts_unit(ts: "Any") -> str:
    """Guess the unit of epoch timestamps from their magnitude: "s", "ms", "us" or "ns".

    Epoch times since 2001 are ~1e9 s, ~1e12 ms, ~1e15 us, ~1e18 ns, so the median
    magnitude separates them by three orders. Log-relative times (small numbers) are taken
    as ms. Loaders call this unless given ``--ts-unit``; ``SchemaError`` when ambiguous.
    """
    import numpy as np

    arr = np.asarray(ts, dtype=np.float64)
    arr = arr[np.isfinite(arr) & (arr > 0)]
    if len(arr) == 0:
        return "ms"
    m = float(np.median(arr))
    if m < 1e8:
        return "ms"  # log-relative (or tiny) times: the schema's default unit
    for unit, lo, hi in (("s", 1e8, 1e11), ("ms", 1e11, 1e14), ("us", 1e14, 1e17), ("ns", 1e17, 1e20)):
        if lo <= m < hi:
            return unit
    raise SchemaError(f"cannot tell the timestamp unit of values around {m:.3g}; pass --ts-unit")


def to_ms(ts: "Any", unit: str) -> "Any":
    """Timestamps in ``unit`` converted to int64 milliseconds (``SchemaError`` if out of range)."""
    import numpy as np

    if unit not in TS_UNITS:
        raise SchemaError(f"unknown ts unit {unit!r}; expected one of {sorted(TS_UNITS)}")
    arr = np.asarray(ts, dtype=np.float64) * TS_UNITS[unit]
    if len(arr) and (not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > MAX_TS_MS):
        raise SchemaError(f"timestamps outside [0, {MAX_TS_MS}] ms after converting from {unit!r}")
    return np.floor(arr).astype(np.int64)


class EventKind(enum.IntEnum):
    """Event types; the integer code is what the columnar wire format stores."""

    IMPRESSION = 0
    CLICK = 1
    WATCH = 2
    LIKE = 3
    FOLLOW = 4
    LIVE_ENTER = 5
    LIVE_LEAVE = 6
    STREAM_LIVE = 7
    STREAM_OFFLINE = 8
    RATE = 9


#: Kinds that mean "the user engaged with the item" (training positives).
POSITIVE_KINDS: Final[frozenset[EventKind]] = frozenset(
    {EventKind.CLICK, EventKind.WATCH, EventKind.LIKE, EventKind.FOLLOW, EventKind.LIVE_ENTER, EventKind.RATE}
)
#: Kinds that describe an item's availability, not a user's action.
AVAILABILITY_KINDS: Final[frozenset[EventKind]] = frozenset({EventKind.STREAM_LIVE, EventKind.STREAM_OFFLINE})


class SchemaError(ValueError):
    """An event or record that does not fit the schema; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


Id = Annotated[int, msgspec.Meta(ge=0, le=MAX_ID)]
UserId = Annotated[int, msgspec.Meta(ge=-1, le=MAX_ID)]  # -1: no user (availability events)
TsMs = Annotated[int, msgspec.Meta(ge=0, le=MAX_TS_MS)]


class _Base(msgspec.Struct, frozen=True, tag_field="type", forbid_unknown_fields=True, kw_only=True):
    """Fields every event has. ``ts_ms`` is epoch (or log-relative) milliseconds."""

    event_id: Id
    ts_ms: TsMs
    user_id: UserId
    item_id: Id
    v: Annotated[int, msgspec.Meta(ge=1, le=SCHEMA_VERSION)] = SCHEMA_VERSION

    @property
    def value(self) -> float:
        """The scalar payload stored in the columnar format (dwell, rating, ...)."""
        return 0.0


class Impression(_Base, tag="impression"):
    """The item was shown to the user (position in the feed, when known)."""

    position: Annotated[int, msgspec.Meta(ge=0, le=MAX_POSITION)] = 0

    @property
    def value(self) -> float:
        return float(self.position)


class Click(_Base, tag="click"):
    """The user opened the item."""


class Watch(_Base, tag="watch"):
    """The user watched the item for ``dwell_s`` seconds."""

    dwell_s: Annotated[float, msgspec.Meta(ge=0.0, le=MAX_DWELL_S)] = 0.0

    @property
    def value(self) -> float:
        return float(self.dwell_s)


class Like(_Base, tag="like"):
    """Explicit positive feedback on an item."""


class Follow(_Base, tag="follow"):
    """The user followed the creator/streamer ``item_id``."""


class LiveEnter(_Base, tag="live_enter"):
    """The user entered livestream ``item_id``."""


class LiveLeave(_Base, tag="live_leave"):
    """The user left livestream ``item_id`` after ``dwell_s`` seconds."""

    dwell_s: Annotated[float, msgspec.Meta(ge=0.0, le=MAX_DWELL_S)] = 0.0

    @property
    def value(self) -> float:
        return float(self.dwell_s)


class StreamLive(_Base, tag="stream_live"):
    """Stream ``item_id`` went live (``user_id`` is -1)."""

    user_id: UserId = -1


class StreamOffline(_Base, tag="stream_offline"):
    """Stream ``item_id`` went offline (``user_id`` is -1)."""

    user_id: UserId = -1


class Rate(_Base, tag="rate"):
    """An explicit rating (MovieLens-style logs)."""

    rating: Annotated[float, msgspec.Meta(ge=0.0, le=MAX_RATING)] = 0.0

    @property
    def value(self) -> float:
        return float(self.rating)


Event = Union[Impression, Click, Watch, Like, Follow, LiveEnter, LiveLeave, StreamLive, StreamOffline, Rate]

#: Struct class per kind, and the inverse, for the columnar codec.
CLASS_BY_KIND: Final[dict[EventKind, type[_Base]]] = {
    EventKind.IMPRESSION: Impression,
    EventKind.CLICK: Click,
    EventKind.WATCH: Watch,
    EventKind.LIKE: Like,
    EventKind.FOLLOW: Follow,
    EventKind.LIVE_ENTER: LiveEnter,
    EventKind.LIVE_LEAVE: LiveLeave,
    EventKind.STREAM_LIVE: StreamLive,
    EventKind.STREAM_OFFLINE: StreamOffline,
    EventKind.RATE: Rate,
}
KIND_BY_CLASS: Final[dict[type[_Base], EventKind]] = {cls: kind for kind, cls in CLASS_BY_KIND.items()}
#: Name of the kind-specific scalar field, where the kind has one.
VALUE_FIELD: Final[dict[EventKind, str]] = {
    EventKind.IMPRESSION: "position",
    EventKind.WATCH: "dwell_s",
    EventKind.LIVE_LEAVE: "dwell_s",
    EventKind.RATE: "rating",
}

_json_decoder = msgspec.json.Decoder(Event)
_msgpack_decoder = msgspec.msgpack.Decoder(Event)
_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()


def kind_of(event: _Base) -> EventKind:
    """The ``EventKind`` of a decoded event."""
    return KIND_BY_CLASS[type(event)]


def make_event(kind: EventKind, *, event_id: int, ts_ms: int, user_id: int, item_id: int, value: float = 0.0) -> Event:
    """Build the typed event for a columnar row (inverse of ``kind_of`` + ``.value``)."""
    cls = CLASS_BY_KIND[EventKind(kind)]
    extra: dict[str, Any] = {}
    field = VALUE_FIELD.get(EventKind(kind))
    if field is not None:
        extra[field] = int(value) if field == "position" else float(value)
    return cls(event_id=int(event_id), ts_ms=int(ts_ms), user_id=int(user_id), item_id=int(item_id), **extra)  # type: ignore[return-value]


def encode_json(event: Event) -> bytes:
    """Human-readable encoding (also what outside producers may send)."""
    return _json_encoder.encode(event)


def encode_msgpack(event: Event) -> bytes:
    """Compact binary encoding of one event."""
    return _msgpack_encoder.encode(event)


def decode_event(data: bytes | str) -> Event:
    """Decode one event from JSON (starts with ``{``) or msgpack; ``SchemaError`` on any problem."""
    if isinstance(data, str):
        data = data.encode()
    if not data:
        raise SchemaError("empty payload")
    try:
        if data.lstrip()[:1] == b"{":
            return _json_decoder.decode(data)
        return _msgpack_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise SchemaError(f"out of schema: {exc}") from None
    except msgspec.DecodeError as exc:
        raise SchemaError(f"malformed: {exc}") from None
