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
from streams.datasets.checks import check_columns
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


#: Separators tried when none is given (the first that splits every sampled line alike wins).
SEPARATORS: Final[tuple[str, ...]] = ("\t", ",", ";", "|")
#: Column names recognised without a mapping, per field (compared case-insensitively).
COLUMN_ALIASES: Final[dict[str, tuple[str, ...]]] = {
    "user": ("user_id", "userid", "user", "sessionid", "session_id", "session", "visitorid", "visitor_id", "uid"),
    "item": ("item_id", "itemid", "item", "movieid", "movie_id", "product_id", "productid", "streamer_name", "iid"),
    "timestamp": ("timestamp", "time", "ts", "ts_ms", "datetime", "event_time", "start_time", "date"),
}
#: ``--columns`` keys -> ColumnMapping fields.
COLUMN_KEYS: Final[dict[str, str]] = {
    "user": "user", "item": "item", "ts": "timestamp", "time": "timestamp", "timestamp": "timestamp",
    "type": "event_type", "event_type": "event_type", "kind": "event_type", "value": "value", "category": "category",
}


def _head_lines(path: Path, n: int = 6) -> list[str]:
    import gzip

    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as fh:  # type: ignore[operator]
        return [line.rstrip("\r\n") for _, line in zip(range(n), fh) if line.strip()]


def sniff_separator(path: Path) -> str:
    """The field separator of a text table: the candidate that splits the first lines into the same number (>1) of fields."""
    lines = _head_lines(path)
    if not lines:
        raise ValueError(f"{path}: empty file")
    best, best_n = ",", 1
    for sep in SEPARATORS:
        counts = {len(line.split(sep)) for line in lines}
        if len(counts) == 1 and (n := counts.pop()) > best_n:
            best, best_n = sep, n
    return best


def sniff_header(path: Path, sep: str) -> bool:
    """True when the first line names columns: a field there is not a number while the same field below is."""
    lines = _head_lines(path, 2)
    first = [f.strip() for f in lines[0].split(sep)]
    if len(lines) < 2:
        return not any(_numeric(f) for f in first)
    second = [f.strip() for f in lines[1].split(sep)]
    if all(not _numeric(f) for f in first if f):
        return any(_numeric(f) for f in second) or len(set(first)) == len(first)
    return any(not _numeric(a) and _numeric(b) for a, b in zip(first, second))


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_columns(spec: str) -> dict[str, str]:
    """``"user=SessionId,item=ItemId,ts=Time"`` -> ColumnMapping keyword arguments."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        key, eq, col = part.partition("=")
        field_ = COLUMN_KEYS.get(key.strip().lower())
        if not eq or not col.strip() or field_ is None:
            raise ValueError(f"bad --columns entry {part!r}: use user=COL,item=COL,ts=COL (optional type=, value=, category=)")
        out[field_] = col.strip()
    return out


def guess_mapping(found: list[str], given: dict[str, str] | None = None) -> dict[str, str]:
    """Fill user/item/timestamp from well-known column names where ``given`` does not name them."""
    out = dict(given or {})
    lower = {c.lower(): c for c in found}
    for field_, aliases in COLUMN_ALIASES.items():
        if field_ in out:
            continue
        hit = next((lower[a] for a in aliases if a in lower), None)
        if hit is not None:
            out[field_] = hit
    return out


def detect_unit(values: np.ndarray) -> str:
    """``s``, ``ms`` or ``us`` from the magnitude of epoch timestamps (small values: ``s``)."""
    finite = values[np.isfinite(values)]
    if not len(finite):
        return "s"
    mid = float(np.median(np.abs(finite)))
    return "us" if mid > 1e14 else "ms" if mid > 1e11 else "s"


def table_columns(path: Path, sep: str | None = None, header: bool | None = None) -> tuple[list[str], str, bool]:
    """(column names, separator, has header) of a CSV/TSV/Parquet file; headerless columns are named 0, 1, 2..."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if path.suffix.lower() in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names), "", True
        except Exception as exc:
            raise ValueError(f"{path}: cannot read table ({type(exc).__name__}: {exc})") from None
    sep = sep or sniff_separator(path)
    header = sniff_header(path, sep) if header is None else header
    first = [f.strip() for f in _head_lines(path, 1)[0].split(sep)]
    return (first if header else [str(i) for i in range(len(first))]), sep, header


def _read_table(path: Path, columns: list[str], sep: str | None = None, header: bool | None = None) -> pd.DataFrame:
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    parquet = path.suffix.lower() in PARQUET_SUFFIXES
    try:
        found, sep, header = table_columns(path, sep, header)
    except ValueError:
        raise
    except Exception as exc:  # pandas parser errors and decoding errors alike
        raise ValueError(f"{path}: cannot read table ({type(exc).__name__}: {exc})") from None
    missing = [c for c in columns if c not in found]
    if missing:
        hint = "" if header else " (the file has no header row: name columns by position, e.g. --columns user=0,item=1,ts=2)"
        raise ValueError(f"{path}: missing column(s) {missing}; found {found}{hint}")
    try:
        if parquet:
            import pyarrow.parquet as pq

            return pq.read_table(path, columns=columns).to_pandas()
        if header:
            return pd.read_csv(path, sep=sep, usecols=columns, dtype=str)
        frame = pd.read_csv(path, sep=sep, header=None, usecols=[int(c) for c in columns], dtype=str)
        frame.columns = [str(c) for c in frame.columns]
        return frame
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
        return check_columns(path, {col: s}, ids=(col,), first_line=-1)[col]
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
    if m.unit != "step" and m.unit not in _UNIT_MS:
        raise ValueError(f"unknown time unit {m.unit!r}; use s, ms, us, step or datetime")
    return check_columns(path, {m.timestamp: v}, ts=m.timestamp, unit=m.unit, step_ms=m.step_ms, first_line=-1)[m.timestamp]


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


def load_table(
    path: str | Path,
    mapping: ColumnMapping | None = None,
    name: str | None = None,
    sep: str | None = None,
    header: bool | None = None,
) -> EventLog:
    """Load a CSV/TSV or Parquet interaction table as a time-sorted ``EventLog``.

    Args:
        path: ``.csv`` / ``.tsv`` / ``.txt`` (optionally gzip) or ``.parquet`` file.
        mapping: which columns hold which field (defaults: user_id, item_id, timestamp in seconds).
        name: log name (default: the file stem).
        sep: field separator (default: sniffed from the first lines among tab, comma, semicolon, pipe).
        header: whether the first line names the columns (default: sniffed). Without one, columns
            are named by position ("0", "1", ...).
    """
    m = mapping or ColumnMapping()
    p = Path(path)
    wanted = [m.user, m.item, m.timestamp] + [c for c in (m.event_type, m.value, m.category) if c]
    frame = _read_table(p, list(dict.fromkeys(wanted)), sep, header)
    meta: dict = {"source": str(p), "mapping": m}
    values = np.zeros(len(frame), dtype=np.float32)
    if m.value is not None:
        num = pd.to_numeric(frame[m.value], errors="coerce")
        bad = num.isna().to_numpy() & frame[m.value].notna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{p}: row {row}, column {m.value}: {frame[m.value].iloc[row]!r} is not a number")
        values = check_columns(p, {m.value: num.fillna(0.0)}, values=(m.value,), first_line=-1)[m.value].astype(np.float32)
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


def load_any_table(
    path: str | Path,
    columns: str | dict[str, str] | None = None,
    sep: str | None = None,
    ts_unit: str | None = None,
    header: bool | None = None,
    name: str | None = None,
) -> EventLog:
    """Load a table the way the CLI does: separator and header sniffed, columns guessed or mapped, time unit detected.

    Why: a user with ``SessionId;ItemId;Time`` in milliseconds should not need Python to
    load it. String ids are mapped to integers (the mapping was asked for explicitly).

    Args:
        path: the table file.
        columns: ``"user=SessionId,item=ItemId,ts=Time"`` (or the parsed dict); unnamed fields are
            guessed from well-known column names (user_id, SessionId, movieId, timestamp, Time, ...).
        sep: field separator (default: sniffed).
        ts_unit: ``s``, ``ms``, ``us``, ``step`` or ``datetime`` (default: detected from magnitudes, with a warning).
        header: first line is a header (default: sniffed).
    """
    p = Path(path)
    given = parse_columns(columns) if isinstance(columns, str) else dict(columns or {})
    found, sep_, header_ = table_columns(p, sep, header)
    fields = guess_mapping(found, given)
    missing = [f for f in ("user", "item", "timestamp") if f not in fields]
    if missing:
        raise ValueError(
            f"{p}: cannot tell which column is the {', '.join(missing)}; found columns {found}: "
            "pass --columns user=COL,item=COL,ts=COL"
        )
    unit = ts_unit
    if unit is None:
        frame = _read_table(p, [fields["timestamp"]], sep_ or None, header_)
        raw = frame[fields["timestamp"]]
        num = pd.to_numeric(raw, errors="coerce")
        if num.notna().mean() < 0.5:
            unit = "datetime"
        else:
            unit = detect_unit(num.to_numpy(dtype=np.float64))
        log.warning("%s: column %s read as %s timestamps (pass --ts-unit to override)", p.name, fields["timestamp"],
                    {"s": "unix seconds", "ms": "unix milliseconds", "us": "unix microseconds", "datetime": "date-time"}[unit])
    if unit not in ("s", "ms", "us", "step", "datetime"):
        raise ValueError(f"unknown --ts-unit {unit!r}; use s, ms, us, step or datetime")
    mapping = ColumnMapping(
        user=fields["user"], item=fields["item"], timestamp=fields["timestamp"], unit=unit,  # type: ignore[arg-type]
        event_type=fields.get("event_type"), value=fields.get("value"), category=fields.get("category"), factorize_ids=True,
    )
    return load_table(p, mapping, name=name, sep=sep_ or None, header=header_)
