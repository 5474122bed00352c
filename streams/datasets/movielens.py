"""MovieLens ratings as an event log.

Reads every MovieLens layout in circulation, because users arrive with
whichever one they downloaded: ``ratings.csv`` (ml-latest*, with or without
the header row; the shared copy has none), ``ratings.dat`` (ml-1m/10m, ``::``
separated) and ml-100k's ``u.data`` (tab separated). Movie genres, when the
matching movies file is beside the ratings, become the item ``category``.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd

from streams.datasets.base import EventLog, finalize_events
from streams.datasets.checks import check_columns
from streams.schema import EventKind

log = logging.getLogger(__name__)

#: Rating files looked for, in order, when ``path`` is a folder.
RATING_FILES: Final[tuple[str, ...]] = ("ratings.csv", "ratings.dat", "u.data")
RATING_COLUMNS: Final[tuple[str, ...]] = ("userId", "movieId", "rating", "timestamp")
#: Canonical genre vocabulary (ml-latest order); category code = 1 + index, 0 = none/unknown.
GENRES: Final[tuple[str, ...]] = (
    "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "IMAX", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip
#: ml-100k u.item genre flag columns, in file order.
U_ITEM_GENRES: Final[tuple[str, ...]] = (
    "unknown", "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip
LICENCE: Final[str] = (
    "MovieLens (GroupLens, University of Minnesota): research use only, non-commercial, "
    "acknowledge GroupLens, redistribution only under the same terms (see the dataset README.txt)."
)


def _resolve(path: Path) -> Path:
    if path.is_dir():
        for name in RATING_FILES:
            if (path / name).is_file():
                return path / name
        raise ValueError(f"{path}: no MovieLens ratings file (looked for {', '.join(RATING_FILES)})")
    if not path.is_file():
        raise ValueError(f"{path}: no such file or folder")
    return path


def _first_line(path: Path) -> str:
    with open(path, "rb") as fh:
        return fh.readline().decode("utf-8", errors="replace").strip()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_ratings(path: Path) -> pd.DataFrame:
    """Ratings as ``userId, movieId, rating, ts_ms`` (checked by ``check_columns``); ``ValueError`` naming the file, line and column on bad rows."""
    first = _first_line(path)
    if not first:
        raise ValueError(f"{path}: empty ratings file")
    if "::" in first:
        sep, raw = "\t", path.read_bytes().replace(b"::", b"\t")  # the C parser takes one-char separators only
        source: Path | io.BytesIO = io.BytesIO(raw)
    elif "\t" in first:
        sep, source = "\t", path
    else:
        sep, source = ",", path
    fields = first.replace("::", "\t").split(sep)
    if len(fields) < 4:
        raise ValueError(f"{path}: line 1 has {len(fields)} fields, expected userId, movieId, rating, timestamp")
    header = not _is_number(fields[0].strip())
    try:
        frame = pd.read_csv(
            source,
            sep=sep,
            header=None,
            skiprows=1 if header else 0,
            usecols=[0, 1, 2, 3],
            names=list(RATING_COLUMNS),
            dtype=str,
            engine="c",
        )
    except (pd.errors.ParserError, ValueError) as exc:
        raise ValueError(f"{path}: cannot parse ratings ({exc})") from None
    first_data_line = 2 if header else 1
    cols = {c: frame[c] for c in RATING_COLUMNS}
    checked = check_columns(path, cols, ids=("userId", "movieId"), ts="timestamp", unit="s", values=("rating",), first_line=first_data_line)
    return pd.DataFrame({c: checked[c] for c in RATING_COLUMNS}).rename(columns={"timestamp": "ts_ms"})


def _genre_code(genres: list[str], extra: dict[str, int]) -> int:
    if not genres:
        return 0
    g = genres[0].strip()
    if g in GENRES:
        return GENRES.index(g) + 1
    if g in ("(no genres listed)", "unknown", ""):
        return 0
    return extra.setdefault(g, len(GENRES) + 1 + len(extra))


def _read_movies(folder: Path) -> pd.DataFrame | None:
    """Item table (item_id, category, genres, title) from movies.csv / movies.dat / u.item, if present."""
    rows: list[tuple[int, str, str]] = []
    csv_, dat, uitem = folder / "movies.csv", folder / "movies.dat", folder / "u.item"
    try:
        if csv_.is_file():
            header = not _is_number(_first_line(csv_).split(",")[0])
            frame = pd.read_csv(csv_, header=0 if header else None, dtype=str, keep_default_na=False, encoding="utf-8")
            frame = frame.iloc[:, :3]
            frame.columns = ["movieId", "title", "genres"]
            rows = list(zip(frame.movieId.astype(int), frame.title, frame.genres))
        elif dat.is_file():
            raw = dat.read_bytes().decode("latin-1")
            for line in raw.splitlines():
                parts = line.split("::")
                if len(parts) >= 3:
                    rows.append((int(parts[0]), parts[1], parts[2]))
        elif uitem.is_file():
            raw = uitem.read_bytes().decode("latin-1")
            for line in raw.splitlines():
                parts = line.split("|")
                if len(parts) >= 5 + len(U_ITEM_GENRES):
                    flags = parts[5 : 5 + len(U_ITEM_GENRES)]
                    genres = [g for g, f in zip(U_ITEM_GENRES, flags) if f.strip() == "1" and g != "unknown"]
                    rows.append((int(parts[0]), parts[1], "|".join(genres)))
        else:
            return None
    except (ValueError, pd.errors.ParserError) as exc:
        log.warning("ignoring unreadable movies file in %s: %s", folder, exc)
        return None
    extra: dict[str, int] = {}
    return pd.DataFrame(
        {
            "item_id": np.array([r[0] for r in rows], dtype=np.int64),
            "category": np.array([_genre_code(r[2].split("|"), extra) for r in rows], dtype=np.int64),
            "genres": [r[2] for r in rows],
            "title": [r[1] for r in rows],
        }
    )


def load_movielens(path: str | Path) -> EventLog:
    """Load MovieLens ratings (folder or file) as a time-sorted ``EventLog`` of RATE events.

    Args:
        path: a MovieLens folder, or one of ``ratings.csv`` (header optional), ``ratings.dat`` or ``u.data``.

    Returns:
        events with ``kind=RATE``, ``value=rating``, ``ts_ms=timestamp*1000``; ``items`` with the first
        genre's code as ``category`` (0 when no movies file is present); no availability (movies are
        always available).
    """
    file = _resolve(Path(path))
    raw = _read_ratings(file)
    events = pd.DataFrame(
        {
            "ts_ms": raw.ts_ms.to_numpy(),
            "user_id": raw.userId.to_numpy().astype(np.int64),
            "item_id": raw.movieId.to_numpy().astype(np.int64),
            "value": raw.rating.to_numpy().astype(np.float32),
            "kind": np.full(len(raw), int(EventKind.RATE), dtype=np.uint8),
        }
    )
    events = finalize_events(events)
    movies = _read_movies(file.parent)
    rated = np.unique(events.item_id.to_numpy())
    if movies is None:
        items = pd.DataFrame({"item_id": rated, "category": np.zeros(len(rated), dtype=np.int64)})
    else:
        missing = np.setdiff1d(rated, movies.item_id.to_numpy())
        if len(missing):
            movies = pd.concat(
                [movies, pd.DataFrame({"item_id": missing, "category": 0, "genres": "", "title": ""})], ignore_index=True
            )
        items = movies.sort_values("item_id", kind="stable").reset_index(drop=True)
    log.info("loaded %d ratings from %s (%d users, %d items)", len(events), file, events.user_id.nunique(), len(rated))
    return EventLog(
        name="movielens",
        events=events,
        items=items,
        availability=None,
        step_ms=1000,
        meta={
            "source": str(file),
            "format": file.name,
            "licence": LICENCE,
            "genres": ("(none)",) + GENRES,
        },
    )
