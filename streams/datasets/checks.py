"""The one check every loader's raw columns go through: ids, timestamps, values.

Why one function: a loader that parses ids with ``astype(int64)`` wraps 2**64 to a small
id, and one that multiplies nanoseconds by 1000 overflows int64 silently. Every loader
hands its raw columns here instead, and gets int64 ids, int64 milliseconds and finite
floats back, or a one-line ``ValueError`` naming the file, line and column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from streams.schema import MAX_VALUE, SchemaError, detect_ts_unit, to_ms

#: Ids are stored as int64: 0..2**63 - 1.
ID_LIMIT: int = 2**63


def _numbers(col: Any) -> tuple[np.ndarray, pd.Series]:
    """The column parsed as numbers (int64, uint64 or float64; NaN where not a number)."""
    s = col if isinstance(col, pd.Series) else pd.Series(np.asarray(col))
    num = pd.to_numeric(s, errors="coerce")
    if num.dtype == object:  # beyond uint64: not an id, and as a float only its magnitude matters
        num = pd.to_numeric(s.astype(str), errors="coerce", downcast=None).astype(np.float64)
    return num.to_numpy(na_value=np.nan) if num.dtype.kind == "f" else num.to_numpy(), s


def _fail(path: Path | str, name: str, row: int, first_line: int, shown: Any, why: str, n_bad: int) -> ValueError:
    where = f"row {row}" if first_line < 0 else f"line {row + first_line}"  # tables name rows (0-based), text files lines
    return ValueError(f"{path}: {where}, column {name}: {shown!r} {why} ({n_bad} bad rows)")


def _ids(path: Path | str, name: str, col: Any, first_line: int) -> np.ndarray:
    v, s = _numbers(col)
    if v.dtype.kind == "i":
        ok = v >= 0
    elif v.dtype.kind == "u":
        ok = v < np.uint64(ID_LIMIT)
    else:
        f = v.astype(np.float64)
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(f) & (f == np.floor(f)) & (f >= 0) & (f < float(ID_LIMIT))
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        raise _fail(path, name, row, first_line, s.iloc[row], f"is not an integer id in 0..{ID_LIMIT - 1}", int((~ok).sum()))
    return v.astype(np.int64)


def _floats(path: Path | str, name: str, col: Any, first_line: int, what: str) -> np.ndarray:
    v, s = _numbers(col)
    f = v.astype(np.float64)
    with np.errstate(invalid="ignore"):
        bad = ~(np.abs(f) <= MAX_VALUE)  # NaN and inf too; beyond it float32 storage overflows or loses the point
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise _fail(path, name, row, first_line, s.iloc[row], f"is not {what}", int(bad.sum()))
    return f


def check_columns(
    path: Path | str,
    columns: Mapping[str, Any],
    ids: Sequence[str] = (),
    ts: str | None = None,
    unit: str | None = None,
    step_ms: int | None = None,
    values: Sequence[str] = (),
    first_line: int = 1,
) -> dict[str, np.ndarray]:
    """Parse and check a loader's raw columns (text or numbers) by role.

    Args:
        path: the file, named in every error.
        columns: raw columns by name (the file's own names, so errors point at them).
        ids: names of id columns: integers in 0..2**63 - 1, returned as int64.
        ts: name of the time column: finite, >= 0, converted to int64 ms from ``unit``
            (None: ``detect_ts_unit``; "step": multiples of ``step_ms``), at most ``MAX_TS_MS``.
        values: names of rating/value columns: finite and within +-``MAX_VALUE``, as float64.
        first_line: the file's line number of the first row (for messages); -1: say "row i"
            (0-based) instead, for tables whose lines are not rows (Parquet).
    Returns:
        The checked columns, by the same names.
    """
    out: dict[str, np.ndarray] = {}
    for name in ids:
        out[name] = _ids(path, name, columns[name], first_line)
    for name in values:
        out[name] = _floats(path, name, columns[name], first_line, f"a finite number within +-{MAX_VALUE:g}")
    if ts is not None:
        v, s = _numbers(columns[ts])
        raw = v.astype(np.float64)
        bad = ~np.isfinite(raw)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise _fail(path, ts, row, first_line, s.iloc[row], "is not a finite time", int(bad.sum()))
        neg = raw < 0
        if neg.any():
            row = int(np.flatnonzero(neg)[0])
            raise _fail(path, ts, row, first_line, float(raw[row]), "is a negative time", int(neg.sum()))
        try:
            if unit == "step":
                if step_ms is None:
                    raise SchemaError("unit 'step' needs step_ms")
                ms = raw * float(step_ms)
                u = "ms"
            else:
                u = unit or detect_ts_unit(raw)
                ms = raw * {"s": 1000.0, "ms": 1.0, "us": 1e-3, "ns": 1e-6}.get(u, 1.0)
            out[ts] = to_ms(np.rint(ms), "ms") if u in ("s", "ms", "us", "ns") else to_ms(raw, u)
        except SchemaError as exc:
            raise ValueError(f"{path}: column {ts}: {exc.reason}") from None
    return out
