"""Loaders: every source becomes the same time-sorted ``EventLog`` (streams/datasets/base.py).

``load_source`` is what commands call, so a user can name a source
("synthetic", "movielens", "twitch", "yoochoose") or point at a file or folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Final

from streams.datasets.base import EventLog, finalize_events

log = logging.getLogger(__name__)

#: ../shared/data beside the checkout (the project's real logs; absent in a fresh clone).
SHARED_DATA: Final[Path] = Path(__file__).resolve().parents[2].parent / "shared" / "data"
#: Named real sources -> folder under SHARED_DATA.
SHARED_FOLDERS: Final[dict[str, str]] = {
    "movielens": "movielens-latest-small",
    "twitch": "twitch-livestream-2000u",
    "yoochoose": "yoochoose-clicks-100k",
}
SOURCES: Final[tuple[str, ...]] = ("synthetic", "movielens", "twitch", "yoochoose")

__all__ = ["EventLog", "finalize_events", "load_source", "detect_format", "data_root", "SOURCES", "SHARED_DATA", "SHARED_FOLDERS"]


def data_root() -> Path:
    """Where named real sources live: ``$TANDEM_DATA`` when set, else ``SHARED_DATA``.

    ``tandem data fetch NAME`` writes ``data_root() / SHARED_FOLDERS[NAME]`` by default.
    """
    env = os.environ.get("TANDEM_DATA")
    return Path(env).expanduser() if env else SHARED_DATA


def detect_format(path: Path) -> str:
    """Which loader reads ``path``: "movielens", "twitch", "yoochoose" or "table" (generic CSV/Parquet)."""
    from streams.datasets.yoochoose import has_header as _yoochoose_header

    if path.is_dir():
        names = {p.name for p in path.iterdir()}
        if names & {"ratings.csv", "ratings.dat", "u.data"}:
            return "movielens"
        if any(_yoochoose_header(p) for p in path.iterdir()):
            return "yoochoose"
        csvs = [p for p in path.iterdir() if p.suffix == ".csv"]
        if len(csvs) == 1:
            return detect_format(csvs[0])
        raise ValueError(f"{path}: cannot tell the format of this folder (no ratings file, {len(csvs)} csv files)")
    if not path.is_file():
        raise ValueError(f"{path}: no such file or folder")
    name = path.name.lower()
    if name in {"ratings.csv", "ratings.dat", "u.data"} or name.endswith(".dat"):
        return "movielens"
    if path.suffix.lower() in (".parquet", ".pq"):
        return "table"
    if _yoochoose_header(path):  # tab-separated SessionId, ItemId, Time (session-rec's prepared files)
        return "yoochoose"
    with open(path, "rb") as fh:
        first = fh.readline().decode("utf-8", errors="replace").strip().lower()
    if "streamer" in first or "start_time" in first:
        return "twitch"
    fields = first.split(",")
    if [f.strip().strip('"') for f in fields[:4]] == ["userid", "movieid", "rating", "timestamp"]:
        return "movielens"  # a MovieLens ratings CSV with its header, whatever the file is called
    tabs = first.split("\t")
    if "::" in first or (len(tabs) == 4 and all(_is_number(f) for f in tabs)) or (
        len(fields) == 4 and all(_is_number(f) for f in fields)
    ):
        return "movielens"
    if len(fields) == 5 and _is_number(fields[0]) and not _is_number(fields[2]):
        return "twitch"  # the original 100k layout: user, stream, streamer name, start, stop
    return "table"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _shared(name: str, path: str | Path | None) -> Path:
    if path is not None:
        return Path(path)
    folder = data_root() / SHARED_FOLDERS[name]
    if not folder.exists():
        raise ValueError(
            f"source {name!r}: {folder} not found; fetch it with `tandem data fetch {name}` "
            f"(see data/README.md) or give the file or folder as the source"
        )
    return folder


def load_source(source: str | Path, **opts: Any) -> EventLog:
    """Load a named source or a path as an ``EventLog``.

    Args:
        source: ``"synthetic"`` (opts: ``events``, ``seed``, ``users``, ``items`` or any
            ``SyntheticConfig`` field), ``"movielens"`` / ``"twitch"`` (opts: ``path`` to override
            ../shared/data; twitch also ``live_window_steps`` and ``live_window``), ``"yoochoose"``
            (opts: ``path``), or a path to a file/folder whose
            format is detected. A generic table takes ``mapping=ColumnMapping(...)``, or the CLI's
            ``sep``, ``columns`` ("user=SessionId,item=ItemId,ts=Time"), ``ts_unit`` and ``header``
            (each sniffed when absent; see streams/datasets/generic.py ``load_any_table``).
    """
    name = str(source)
    if name == "synthetic":
        from streams.datasets.synthetic import SyntheticConfig, generate

        fields = set(SyntheticConfig.__dataclass_fields__)
        unknown = sorted(set(opts) - fields)
        if unknown:
            raise ValueError(f"unknown synthetic option(s) {unknown}; known: {sorted(fields)}")
        return generate(SyntheticConfig(**opts))
    if name == "movielens":
        from streams.datasets.movielens import load_movielens

        return load_movielens(_shared(name, opts.pop("path", None)), **opts)
    if name == "twitch":
        from streams.datasets.twitch import load_twitch

        return load_twitch(_shared(name, opts.pop("path", None)), **opts)
    if name == "yoochoose":
        from streams.datasets.yoochoose import load_yoochoose

        return load_yoochoose(_shared(name, opts.pop("path", None)), **opts)
    path = Path(name).expanduser()
    if not path.exists():
        import difflib

        close = difflib.get_close_matches(name, list(SOURCES), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown source {name!r}: not one of {', '.join(SOURCES)} and no such file or folder{hint}")
    table_opts = {k: opts.pop(k) for k in ("sep", "columns", "ts_unit", "header") if k in opts}
    table_opts = {k: v for k, v in table_opts.items() if v is not None}
    if table_opts and path.is_file():
        from streams.datasets.generic import load_any_table

        return load_any_table(path, **table_opts, **opts)
    fmt = detect_format(path)
    log.info("source %s: detected format %s", path, fmt)
    if fmt == "movielens":
        from streams.datasets.movielens import load_movielens

        return load_movielens(path, **opts)
    if fmt == "twitch":
        from streams.datasets.twitch import load_twitch

        return load_twitch(path, **opts)
    if fmt == "yoochoose":
        from streams.datasets.yoochoose import load_yoochoose

        return load_yoochoose(path, **opts)
    from streams.datasets.generic import load_any_table, load_table

    if "mapping" in opts:  # the Python API's explicit ColumnMapping
        return load_table(path, **opts)
    return load_any_table(path, **table_opts, **opts)
