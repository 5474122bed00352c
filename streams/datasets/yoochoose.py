"""YOOCHOOSE e-commerce clicks (RecSys Challenge 2015) as an event log.

Reads the session-rec benchmark's prepared files (Ludewig, Latifi, Jannach):
tab separated, header ``SessionId, ItemId, Time`` (unix seconds with a fractional
part). Sessions are anonymous, so every ``SessionId`` becomes a user the cloud has
never seen: the cold-start, session-based case that Twitch and MovieLens lack.

Given a folder, the ``*_train_full.txt`` and ``*_test.txt`` files are read together
into one time-sorted log (the test file is the last day), so a replay sees the
sessions in the order they happened; ``*_train_tr`` / ``*_train_valid`` (a split of
train_full) are not read, as they would count clicks twice.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd

from streams.datasets.base import EventLog, finalize_events
from streams.datasets.checks import check_columns
from streams.schema import EventKind

log = logging.getLogger(__name__)

#: The header row of every session-rec prepared file.
HEADER: Final[tuple[str, ...]] = ("SessionId", "ItemId", "Time")
#: File-name endings read from a folder, in time order (train_full then the last day).
FOLDER_PARTS: Final[tuple[str, ...]] = ("_train_full.txt", "_test.txt")
LICENCE: Final[str] = (
    "YOOCHOOSE clicks, RecSys Challenge 2015 (sample prepared by rn5l/session-rec): research use of "
    "the challenge data; never commit the files."
)


def has_header(path: Path) -> bool:
    """True when ``path`` is a file whose first line is the tab-separated ``SessionId, ItemId, Time`` header."""
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        first = fh.readline().decode("utf-8", errors="replace").strip()
    return tuple(f.strip().lower() for f in first.split("\t")) == tuple(h.lower() for h in HEADER)


def session_files(path: Path) -> list[Path]:
    """The click files to read for ``path``: the file itself, or a folder's train_full + test files.

    Raises ``ValueError`` naming what was found when a folder holds no such files.
    """
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"{path}: no such file or folder")
    found: list[Path] = []
    for ending in FOLDER_PARTS:
        hits = sorted(p for p in path.iterdir() if p.name.endswith(ending) and has_header(p))
        if len(hits) > 1:
            raise ValueError(f"{path}: several *{ending} files ({[p.name for p in hits]}); pass one file")
        found += hits
    if found:
        return found
    tables = sorted(p for p in path.iterdir() if has_header(p))
    if len(tables) == 1:
        return tables
    raise ValueError(
        f"{path}: expected *{FOLDER_PARTS[0]} and/or *{FOLDER_PARTS[1]} (or exactly one file) with the "
        f"header {' '.join(HEADER)}; found {len(tables)} such files"
    )


def _read(path: Path) -> pd.DataFrame:
    """One file as ``session, item, ts_ms`` (int64); ``ValueError`` naming the file, line and column on bad rows."""
    if not has_header(path):
        raise ValueError(f"{path}: line 1 is not the tab-separated header {' '.join(HEADER)}")
    try:
        raw = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, engine="c")
    except pd.errors.ParserError as exc:
        raise ValueError(f"{path}: cannot parse clicks ({exc})") from None
    raw.columns = [str(c).strip() for c in raw.columns]
    lower = {c.lower(): c for c in raw.columns}
    cols = {col: raw[lower[col.lower()]] for col in HEADER}
    out = check_columns(path, cols, ids=("SessionId", "ItemId"), ts="Time", unit="s", first_line=2)
    return pd.DataFrame({"session": out["SessionId"], "item": out["ItemId"], "ts_ms": out["Time"]})


def load_yoochoose(path: str | Path) -> EventLog:
    """Load YOOCHOOSE session clicks (folder or one file) as a time-sorted ``EventLog`` of CLICK events.

    Args:
        path: a folder holding ``*_train_full.txt`` and/or ``*_test.txt`` (read together, one log),
            or one tab-separated file with the header ``SessionId, ItemId, Time``.

    Returns:
        events with ``kind=CLICK`` (a positive), ``user_id`` = SessionId, ``item_id`` = the raw ItemId
        (int64, ~2e8, not re-coded), ``ts_ms`` = Time in ms; files in order, then a stable sort by time,
        so clicks at the same ms keep their file order. ``items`` has ``category = 0`` (the sample has no
        categories); no availability (every item is always available); ``step_ms = 1``.
    """
    files = session_files(Path(path))
    parts = [_read(f) for f in files]
    raw = pd.concat(parts, ignore_index=True)
    events = finalize_events(
        pd.DataFrame(
            {
                "ts_ms": raw.ts_ms.to_numpy(),
                "user_id": raw.session.to_numpy(),
                "item_id": raw.item.to_numpy(),
                "value": np.zeros(len(raw), dtype=np.float32),
                "kind": np.full(len(raw), int(EventKind.CLICK), dtype=np.uint8),
            }
        )
    )
    item_ids = np.unique(events.item_id.to_numpy())
    items = pd.DataFrame({"item_id": item_ids, "category": np.zeros(len(item_ids), dtype=np.int64)})
    result = EventLog(
        name="yoochoose",
        events=events,
        items=items,
        availability=None,
        step_ms=1,
        meta={
            "source": str(path),
            "files": [f.name for f in files],
            "rows_per_file": {f.name: len(p) for f, p in zip(files, parts)},
            "licence": LICENCE,
            "cold_users": "each SessionId is an anonymous session: a user seen only within it",
        },
    )
    names = ", ".join(f.name for f in files)
    log.info("loaded %d clicks from %s (%d sessions, %d items)", len(events), names, result.n_users, len(item_ids))
    return result
