"""Any interaction table (CSV or Parquet) as an event log, through a column mapping.

Why: most teams' logs are a table with a user, an item, a time and maybe an
event type; a ``ColumnMapping`` says which column is which so no new loader is
needed per source.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import numpy as np
import pandas as pd

from streams.datasets.base import EventLog, finalize_events
from streams.schema import EventKind

log = logging.getLogger(__name__)

TimeUnit = Literal["s", "ms", "us", "step", "datetime"]
_UNIT_MS: Final[dict[str, float]] = {"s": 1000.0, "ms": 1.0, "us": 0.001}
PARQUET_SUFFIXES: Final[tuple[str, ...]] = (".parquet", ".pq")


@dataclass(frozen=True)
class ColumnMapping:
    """Which columns of a table hold the event fields.

    Args:
        user, item, timestamp: column names of the user id, item id and time.
        unit: time unit of ``timestamp``: ``s``, ``ms``, ``us``, ``step`` (integer steps of ``step_ms``)
            or ``datetime`` (ISO strings / datetime column, converted to epoch ms).
        step_ms: length of one step for ``unit="step"``; also the log's resolution.
        event_type: optional column of event-type strings, mapped case-insensitively to ``EventKind``
            names (``click``, ``watch``, ``live_enter``...) or through ``kind_aliases``.
        value: optional column for the scalar value (dwell seconds, rating, position).
        category: optional item category column (integer), copied into ``items``.
        default_kind: kind of every row when there is no ``event_type`` column.
        kind_aliases: extra type strings -> EventKind name, e.g. ``{"view": "WATCH"}``.
        factorize_ids: map non-integer ids (strings) to dense integers (vocabularies go to ``meta``);
            off by default so that a typo'd column fails loudly.
    """

    user: str = "user_id"
    item: str = "item_id"
    timestamp: str = "timestamp"
    unit: TimeUnit = "s"
    step_ms: int = 1000
    event_type: str | None = None
    value: str | None = None
    category: str | None = None
    default_kind: EventKind | str = EventKind.CLICK
    kind_aliases: dict[str, str] = field(default_factory=dict)
    factorize_ids: bool = False


def _kind_code(name: EventKind | str) -> int:
    if isinstance(name, EventKind):
        return int(name)
    try:
        return int(EventKind[str(name).strip().upper()])
    except KeyError:
        raise ValueError(f"unknown event kind {name!r}; known: {[k.name.lower() for k in EventKind]}") from None


def _read_table(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    suffixes = "".join(path.suffixes).lower()
    parquet = path.suffix.lower() in PARQUET_SUFFIXES
    sep = "\t" if (".tsv" in suffixes or ".tab" in suffixes) else ","
    try:
        if parquet:
            import pyarrow.parquet as pq

            found = list(pq.read_schema(path).names)
        else:
            found = pd.read_csv(path, sep=sep, nrows=0).columns.tolist()
    except Exception as exc:  # pyarrow (ArrowInvalid...) and pandas parser errors alike
        raise ValueError(f"{path}: cannot read table ({type(exc).__name__}: {exc})") from None
    missing = [c for c in columns if c not in found]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {found}")
    try:
        if parquet:
            return pq.read_table(path, columns=columns).to_pandas()
        return pd.read_csv(path, sep=sep, usecols=columns)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read table ({type(exc).__name__}: {exc})") from None


def _ids(path: Path, frame: pd.DataFrame, col: str, factorize: bool, meta: dict) -> np.ndarray:
    s = frame[col]
    if s.isna().any():
        row = int(np.flatnonzero(s.isna().to_numpy())[0])
        raise ValueError(f"{path}: row {row}, column {col}: missing id")
    num = pd.to_numeric(s, errors="coerce")
    if num.notna().all():
        v = num.to_numpy(dtype=np.float64)
        bad = (v != np.floor(v)) | (v < 0)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{path}: row {row}, column {col}: {s.iloc[row]!r} is not a non-negative integer id")
        return num.to_numpy().astype(np.int64)
    if not factorize:
        row = int(np.flatnonzero(num.isna().to_numpy())[0])
        raise ValueError(
            f"{path}: row {row}, column {col}: {s.iloc[row]!r} is not an integer id (set ColumnMapping(factorize_ids=True) "
            "to map string ids to integers)"
        )
    vocab = np.sort(s.astype(str).unique())
    meta[f"{col}_vocabulary"] = vocab
    return np.searchsorted(vocab, s.astype(str).to_numpy()).astype(np.int64)


def _times(path: Path, frame: pd.DataFrame, m: ColumnMapping) -> np.ndarray:
    s = frame[m.timestamp]
    if m.unit == "datetime" or pd.api.types.is_datetime64_any_dtype(s):
        try:
            dt = pd.to_datetime(s, utc=True, errors="raise")
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: column {m.timestamp}: not a datetime ({exc})") from None
        ms = ((dt - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)).to_numpy().astype(np.int64)
        if (ms < 0).any():
            raise ValueError(f"{path}: row {int(np.flatnonzero(ms < 0)[0])}, column {m.timestamp}: time before 1970")
        return ms
    num = pd.to_numeric(s, errors="coerce")
    if num.isna().any():
        row = int(np.flatnonzero(num.isna().to_numpy())[0])
        raise ValueError(f"{path}: row {row}, column {m.timestamp}: {s.iloc[row]!r} is not a number (unit={m.unit})")
    v = num.to_numpy(dtype=np.float64)
    if (v < 0).any():
        row = int(np.flatnonzero(v < 0)[0])
        raise ValueError(f"{path}: row {row}, column {m.timestamp}: negative time {v[row]}")
    if m.unit == "step":
        return np.round(v * m.step_ms).astype(np.int64)
    if m.unit not in _UNIT_MS:
        raise ValueError(f"unknown time unit {m.unit!r}; use s, ms, us, step or datetime")
    return np.round(v * _UNIT_MS[m.unit]).astype(np.int64)


def _kinds(path: Path, frame: pd.DataFrame, m: ColumnMapping) -> np.ndarray:
    if m.event_type is None:
        return np.full(len(frame), _kind_code(m.default_kind), dtype=np.uint8)
    table = {k.name.lower(): int(k) for k in EventKind}
    table.update({alias.strip().lower(): _kind_code(name) for alias, name in m.kind_aliases.items()})
    raw = frame[m.event_type].astype(str).str.strip().str.lower()
    uniques = raw.unique()
    unknown = sorted(u for u in uniques if u not in table)
    if unknown:
        raise ValueError(
            f"{path}: column {m.event_type}: unknown event type(s) {unknown}; known: {sorted(table)} "
            "(add ColumnMapping.kind_aliases to map them)"
        )
    return raw.map(table).to_numpy().astype(np.uint8)


def load_table(path: str | Path, mapping: ColumnMapping | None = None, name: str | None = None) -> EventLog:
    """Load a CSV/TSV or Parquet interaction table as a time-sorted ``EventLog``.

    Args:
        path: ``.csv`` / ``.tsv`` (optionally compressed) or ``.parquet`` file.
        mapping: which columns hold which field (defaults: user_id, item_id, timestamp in seconds).
        name: log name (default: the file stem).
    """
    m = mapping or ColumnMapping()
    p = Path(path)
    wanted = [m.user, m.item, m.timestamp] + [c for c in (m.event_type, m.value, m.category) if c]
    frame = _read_table(p, list(dict.fromkeys(wanted)))
    meta: dict = {"source": str(p), "mapping": m}
    values = np.zeros(len(frame), dtype=np.float32)
    if m.value is not None:
        num = pd.to_numeric(frame[m.value], errors="coerce")
        bad = num.isna().to_numpy() & frame[m.value].notna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{p}: row {row}, column {m.value}: {frame[m.value].iloc[row]!r} is not a number")
        values = num.fillna(0.0).to_numpy().astype(np.float32)
    events = pd.DataFrame(
        {
            "ts_ms": _times(p, frame, m),
            "user_id": _ids(p, frame, m.user, m.factorize_ids, meta),
            "item_id": _ids(p, frame, m.item, m.factorize_ids, meta),
            "value": values,
            "kind": _kinds(p, frame, m),
        }
    )
    items = None
    if m.category is not None:
        cat = pd.to_numeric(frame[m.category], errors="coerce").fillna(0).astype(np.int64)
        items = (
            pd.DataFrame({"item_id": events.item_id, "category": cat.to_numpy()})
            .drop_duplicates("item_id", keep="last")
            .sort_values("item_id")
            .reset_index(drop=True)
        )
    events = finalize_events(events)
    log.info("loaded %d events from %s", len(events), p)
    return EventLog(name=name or p.name.split(".")[0], events=events, items=items, availability=None, step_ms=m.step_ms, meta=meta)
